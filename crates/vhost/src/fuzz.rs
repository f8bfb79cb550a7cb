//! The body of the `vhost_user_messages` fuzz target (fuzz/fuzz_targets/vhost_user_messages.rs
//! is a thin wrapper), here so that `cargo test` replays the committed corpus through it
//! (tests/fuzz_corpus.rs).
//!
//! The input is a raw byte stream as if from a frontend: malformed, truncated and out-of-order
//! messages, and messages whose file descriptors are missing (a byte stream cannot carry
//! SCM_RIGHTS). The server must end the connection cleanly (closed or dropped with an error) —
//! never panic, never hang. The caller supplies the serving (this crate does not pick a device).

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

/// Writes `data` into one end of a socketpair, closes it for writing, and hands the other end
/// to `serve` (e.g. `|stream| { server.serve_connection(stream); }`), which must return.
pub fn vhost_user_messages(data: &[u8], serve: impl FnOnce(UnixStream)) {
    let (mut frontend, backend) = UnixStream::pair().expect("socketpair");
    // The socket buffer holds far more than libFuzzer's default input size, so this never blocks.
    if frontend.write_all(data).is_err() {
        return;
    }
    // EOF after the input; replies stay unread in our receive buffer (no SIGPIPE).
    frontend
        .shutdown(Shutdown::Write)
        .expect("shutdown of a socketpair end");
    serve(backend);
}
