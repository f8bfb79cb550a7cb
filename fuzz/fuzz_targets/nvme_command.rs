//! NVMe command parser (admin + NVM, PRP/SGL walker); the body and what it checks:
//! `sluice_devices::nvme::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::nvme::fuzz::nvme_command(data));
