//! VFIO config-space trap policy; the body and what it checks: `sluice_vfio::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_vfio::fuzz::config_policy(data));
