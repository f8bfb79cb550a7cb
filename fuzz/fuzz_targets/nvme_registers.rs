//! NVMe controller register writes (op script); the body and its format:
//! `sluice_devices::nvme::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::nvme::fuzz::nvme_registers(data));
