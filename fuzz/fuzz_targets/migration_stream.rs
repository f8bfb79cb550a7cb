//! The live-migration stream a destination reads; the body and what it checks:
//! `sluice_vmm::migration::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_vmm::migration::fuzz::migration_stream(data));
