//! VT-d register writes, invalidation queue and table walks over guest memory from the input;
//! the body and what it checks: `sluice_iommu::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_iommu::fuzz::vtd_registers(data));
