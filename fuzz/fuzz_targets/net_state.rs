//! virtio-net's saved state (snapshot file, migration peer); the body and what it checks:
//! `sluice_devices::net::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::net::fuzz::net_state(data));
