//! virtio-blk request logs (`--disk ...,requests=LOG`, `sluice replay --device`); the body and
//! what it checks: `sluice_devices::block::fuzz::blk_trace`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::block::fuzz::blk_trace(data));
