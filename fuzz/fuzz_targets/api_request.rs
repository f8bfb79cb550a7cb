//! Control API requests and answers; the body and what it checks: `sluice_api::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_api::fuzz::request(data));
