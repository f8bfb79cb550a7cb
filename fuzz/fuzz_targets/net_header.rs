//! virtio-net TX header validation; the body and what it checks: `sluice_devices::net::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::net::fuzz::net_header(data));
