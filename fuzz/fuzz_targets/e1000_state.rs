//! The e1000's saved state (snapshot file, migration peer); the body and what it checks:
//! `sluice_devices::e1000::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::e1000::fuzz::e1000_state(data));
