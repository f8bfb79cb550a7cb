//! A PCI function's config space as `sluice host-check` reads it from sysfs (standard and
//! extended capability lists, PCIe port type, ACS); the body: `sluice_host::config_space::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_host::config_space::fuzz(data));
