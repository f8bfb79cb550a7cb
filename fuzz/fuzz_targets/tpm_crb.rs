//! TPM CRB register and buffer accesses against a backend answering with the input's bytes;
//! the body and what it checks: `sluice_devices::tpm::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::tpm::fuzz::tpm_crb(data));
