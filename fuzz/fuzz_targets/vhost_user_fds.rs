//! The vhost-user server with file descriptors: a scripted hostile frontend passes memfds of
//! chosen sizes as guest RAM and inflight areas, eventfds as kick / call / err fds (a call fd
//! may be saturated), shrinks and rewrites the memfds after the backend mapped them, and kicks
//! rings that point into them. The server must survive every script (a SIGBUS from a shrunk
//! file ends only that connection), never hang, and keep serving. The script format and the
//! player are `sluice_vhost::fuzz` (crates/vhost/src/fuzz.rs), so `cargo test` replays the
//! seeds too (crates/vhost/tests/fuzz_corpus.rs).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_vhost::fuzz::run_frontend_script;

fuzz_target!(|data: &[u8]| {
    // Scripts past a few hundred operations only repeat themselves, slower.
    let script = &data[..data.len().min(1024)];
    let _ = run_frontend_script(script);
});
