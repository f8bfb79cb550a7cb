//! The qos option strings (`--disk` keys, `--qos-device`, `vm.qos` changes); the body and what
//! it checks: `sluice_qos::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_qos::fuzz::spec(data));
