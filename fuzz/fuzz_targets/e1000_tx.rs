//! e1000 transmit descriptor processing; the body and what it checks: `sluice_devices::e1000::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::e1000::fuzz::e1000_tx(data));
