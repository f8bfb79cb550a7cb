//! e1000 register writes and reads (and received frames); the body and what it checks: `sluice_devices::e1000::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::e1000::fuzz::e1000_registers(data));
