//! NVMe request logs (`--nvme ...,requests=LOG`, `sluice replay --device`); the body and
//! what it checks: `sluice_devices::nvme::fuzz::nvme_trace`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::nvme::fuzz::nvme_trace(data));
