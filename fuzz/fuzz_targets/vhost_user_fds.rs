//! The vhost-user server with file descriptors: a scripted hostile frontend passes memfds of
//! chosen sizes as guest RAM and inflight areas, eventfds as kick / call / err fds (a call fd
//! may be saturated), shrinks and rewrites the memfds after the backend mapped them, and kicks
//! rings that point into them. The server must survive every script (a SIGBUS from a shrunk
//! file ends only that connection), never hang, and keep serving. The script format, the player
//! and the body are `sluice_vhost::fuzz` (crates/vhost/src/fuzz.rs), so `cargo test` replays the
//! seeds too (crates/vhost/tests/fuzz_corpus.rs).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_vhost::fuzz::vhost_user_fds(data));
