//! virtio-blk request parser; the body and what it checks: `sluice_devices::block::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::block::fuzz::blk_request(data));
