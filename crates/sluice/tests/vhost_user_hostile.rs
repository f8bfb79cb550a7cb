//! `sluice run --disk vhost_user=on` against a backend that accepts the connection and never
//! answers: sluice must give up within the disk's `timeout=` (default 5 s), exit 125 and name
//! the socket and the request that got no answer, instead of waiting forever.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

mod common;

use common::{run_sluice, skip_without_kvm, EXIT_VMM_ERROR};

/// Longest the whole run may take: VM setup on a slow host plus the timeout.
const BOUND: Duration = Duration::from_secs(60);

/// A unix listener that accepts every connection, keeps it open and never reads from it.
struct SilentBackend {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SilentBackend {
    fn start(name: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vhost-user-hostile");
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join(format!("{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut accepted = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => accepted.push(stream),
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Self {
            socket,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SilentBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn run_against_silent_backend(name: &str, disk_options: &str) {
    if skip_without_kvm(name) {
        return;
    }
    let backend = SilentBackend::start(name);
    let disk = format!(
        "--disk=vhost_user=on,socket={}{disk_options}",
        backend.socket.display()
    );

    let run = run_sluice(&["run".to_string(), disk], BOUND);

    assert!(
        !run.timed_out,
        "sluice waited forever: {}",
        run.transcript()
    );
    assert_eq!(run.status, Some(EXIT_VMM_ERROR), "{}", run.transcript());
    assert!(
        run.stderr.contains(&*backend.socket.to_string_lossy())
            && run.stderr.contains("GET_FEATURES"),
        "the error names neither the socket nor the request: {}",
        run.transcript()
    );
}

#[test]
fn a_backend_that_never_answers_is_a_startup_error_within_the_timeout() {
    run_against_silent_backend("silent_with_timeout", ",timeout=1s");
}

#[test]
fn the_default_timeout_bounds_the_wait_too() {
    run_against_silent_backend("silent_default_timeout", "");
}
