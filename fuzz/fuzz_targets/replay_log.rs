//! The record/replay log `sluice replay` reads; the body and what it checks:
//! `sluice_vmm::replay::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_vmm::replay::fuzz::replay_log(data));
