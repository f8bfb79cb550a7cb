//! The vhost-user-blk *frontend* against a hostile backend: a scripted backend on a unix socket
//! answers each request sluice sends (handshake, DRIVER_OK setup, reset) as the input says —
//! healthy answers, fuzzed bodies, sizes, flags and codes, stray fds, raw garbage, silence and
//! hang-ups. sluice must never panic or hang, each step returns within a bound, the config space
//! the guest reads stays consistent, and a healthy backend gets a working device. The script
//! format and the checks are `sluice_devices::vhost_user_blk::fuzz`
//! (crates/devices/src/vhost_user_blk/fuzz.rs), so `cargo test` replays the seeds too
//! (crates/devices/tests/fuzz_corpus.rs).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_devices::vhost_user_blk::fuzz::hostile_backend(data)
});
