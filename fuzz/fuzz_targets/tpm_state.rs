//! The TPM in snapshots and migration: a hostile swtpm's answers to the state-blob commands,
//! then a saved state restored into the CRB; the body and what it checks:
//! `sluice_devices::tpm::fuzz::tpm_state`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_devices::tpm::fuzz::tpm_state(data));
