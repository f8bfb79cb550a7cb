//! Failure containment, through the real binary: whatever fails — stderr, a thread, a system
//! call, the metrics path — sluice ends with a clear message and a distinct status, or keeps
//! serving, and never hangs (every wait is bounded; a timeout kills sluice and fails).
//!
//! Panics and forbidden calls are injected with `SLUICE_TEST_FAULT` (crates/sandbox/src/
//! fault.rs), compiled into the binary only for tests.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{skip_without_kvm, EXIT_VMM_ERROR, SLUICE};

const EXIT_PANIC: i32 = 122;
const EXIT_SECCOMP: i32 = 123;
const TIMEOUT: Duration = Duration::from_secs(30);
/// A guest-kit run that starts a queue worker (virtio-rng) and finishes quickly.
const RNG_RUN: &[&str] = &["run", "--rng", "--cmdline", "quiet w=rng:bytes=4096"];

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("containment");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}", std::process::id()))
}

/// Where sluice's stderr goes.
#[derive(Debug, Clone, Copy)]
enum Stderr {
    /// Captured, for the messages.
    Captured,
    /// /dev/full: every write fails with ENOSPC.
    DevFull,
    /// A pipe whose reader is gone: every write fails with EPIPE.
    ClosedPipe,
}

fn stderr_stdio(kind: Stderr) -> Stdio {
    match kind {
        Stderr::Captured => Stdio::piped(),
        Stderr::DevFull => Stdio::from(OpenOptions::new().write(true).open("/dev/full").unwrap()),
        Stderr::ClosedPipe => {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: both descriptors were just created and are owned here alone.
            let (reader, writer) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            drop(reader);
            Stdio::from(writer)
        }
    }
}

fn start(args: &[&str], env: &[(&str, &str)], stderr: Stderr) -> Child {
    let mut command = Command::new(SLUICE);
    command
        .args(args)
        .env_remove("SLUICE_LOG")
        .env_remove("SLUICE_TEST_FAULT")
        .env_remove("SLUICE_SECCOMP")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr_stdio(stderr));
    command.spawn().expect("start sluice")
}

#[derive(Debug)]
struct Ended {
    /// Exit status; `None` if killed by a signal.
    status: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
}

/// Waits for `child` at most `TIMEOUT`, killing it then.
fn finish(mut child: Child) -> Ended {
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let deadline = Instant::now() + TIMEOUT;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break (status.code(), false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break (child.wait().unwrap().code(), true);
        }
        thread::sleep(Duration::from_millis(20));
    };
    let text =
        |h: Option<thread::JoinHandle<String>>| h.map(|h| h.join().unwrap()).unwrap_or_default();
    Ended {
        status,
        timed_out,
        stdout: text(out),
        stderr: text(err),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

fn run(args: &[&str], env: &[(&str, &str)], stderr: Stderr) -> Ended {
    finish(start(args, env, stderr))
}

#[test]
fn run_with_unwritable_stderr_and_logging_on_finishes() {
    if skip_without_kvm("run_with_unwritable_stderr_and_logging_on_finishes") {
        return;
    }
    for stderr in [Stderr::DevFull, Stderr::ClosedPipe] {
        let mut args = RNG_RUN.to_vec();
        args.extend(["--log", "debug"]);

        let ended = run(&args, &[], stderr);

        assert!(!ended.timed_out, "{stderr:?}: hung: {ended:?}");
        assert_eq!(ended.status, Some(0), "{stderr:?}: {ended:?}");
        assert!(
            ended.stdout.contains("GUEST-KIT PASS"),
            "{stderr:?}: {ended:?}"
        );
    }
}

/// A `sluice serve rng` on a fresh socket, killed on drop.
struct Served {
    child: Option<Child>,
    socket: PathBuf,
}

impl Served {
    fn start(name: &str, env: &[(&str, &str)], stderr: Stderr, extra: &[&str]) -> Served {
        let socket = scratch(&format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut args = vec!["serve", "rng", "--socket", socket.to_str().unwrap()];
        args.extend_from_slice(extra);
        Served::wrap(start(&args, env, stderr), socket)
    }

    /// Waits for `child` to listen on `socket`.
    fn wrap(mut child: Child, socket: PathBuf) -> Served {
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("sluice serve exited early: {status}");
            }
            assert!(Instant::now() < deadline, "sluice serve never listened");
            thread::sleep(Duration::from_millis(10));
        }
        Served {
            child: Some(child),
            socket,
        }
    }

    fn still_running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Kills the server and returns what it said.
    fn stop(mut self) -> Ended {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        finish(child)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// VHOST_USER_GET_FEATURES on a new connection: the features, or `None` if the connection
/// ended without an answer.
fn get_features(socket: &Path) -> Option<u64> {
    let mut stream = UnixStream::connect(socket).expect("connect to sluice serve");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (request, version) = (1u32, 1u32);
    let mut message = Vec::new();
    for word in [request, version, 0] {
        message.extend_from_slice(&word.to_ne_bytes());
    }
    stream.write_all(&message).ok()?;
    let mut reply = [0u8; 20];
    match stream.read_exact(&mut reply) {
        Ok(()) => Some(u64::from_ne_bytes(reply[12..].try_into().unwrap())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("no answer from sluice serve: {e}"),
    }
}

#[test]
fn serve_with_unwritable_stderr_and_logging_on_keeps_serving() {
    for stderr in [Stderr::DevFull, Stderr::ClosedPipe] {
        let mut served = Served::start("stderr", &[], stderr, &["--log", "debug"]);

        let first = get_features(&served.socket);
        let second = get_features(&served.socket);

        assert!(first.is_some() && second.is_some(), "{stderr:?}");
        assert!(served.still_running(), "{stderr:?}: {:?}", served.stop());
    }
}

#[test]
fn a_panic_in_a_queue_worker_stops_the_vm_with_a_clear_message() {
    if skip_without_kvm("a_panic_in_a_queue_worker_stops_the_vm_with_a_clear_message") {
        return;
    }

    let ended = run(
        RNG_RUN,
        &[("SLUICE_TEST_FAULT", "queue-worker:panic")],
        Stderr::Captured,
    );

    assert!(!ended.timed_out, "hung: {ended:?}");
    assert_eq!(ended.status, Some(EXIT_PANIC), "{ended:?}");
    assert!(
        ended.stderr.contains("thread `virtio-rng")
            && ended.stderr.contains("` panicked at ")
            && ended.stderr.contains("stopping the VM"),
        "{ended:?}"
    );
}

#[test]
fn a_panic_in_a_vcpu_stops_the_vm_with_a_clear_message() {
    if skip_without_kvm("a_panic_in_a_vcpu_stops_the_vm_with_a_clear_message") {
        return;
    }
    let mut args = RNG_RUN.to_vec();
    args.extend(["--cpus", "2"]);

    let ended = run(
        &args,
        &[("SLUICE_TEST_FAULT", "vcpu1:panic")],
        Stderr::Captured,
    );

    assert!(!ended.timed_out, "hung: {ended:?}");
    assert_eq!(ended.status, Some(EXIT_PANIC), "{ended:?}");
    assert!(
        ended.stderr.contains("thread `vcpu1` panicked"),
        "{ended:?}"
    );
}

#[test]
fn a_panic_in_a_vcpu_device_access_mid_run_stops_the_vm() {
    if skip_without_kvm("a_panic_in_a_vcpu_device_access_mid_run_stops_the_vm") {
        return;
    }
    // Mid-run: the guest kit is enumerating PCI (ECAM) and setting up virtio-rng (its BAR).
    let fault = [("SLUICE_TEST_FAULT", "vcpu-mmio-write:panic:20")];

    let ended = run(RNG_RUN, &fault, Stderr::Captured);

    assert!(!ended.timed_out, "hung: {ended:?}");
    assert_eq!(ended.status, Some(EXIT_PANIC), "{ended:?}");
    assert!(
        ended.stderr.contains("thread `vcpu0` panicked")
            && ended.stderr.contains("vcpu-mmio-write")
            && ended.stdout.contains("sluice-guest: "),
        "{ended:?}"
    );
}

#[test]
fn a_panic_in_a_connection_drops_only_that_connection() {
    let fault = [("SLUICE_TEST_FAULT", "connection:panic")];
    let mut served = Served::start("panic", &fault, Stderr::Captured, &[]);

    let first = get_features(&served.socket);
    let second = get_features(&served.socket);

    assert_eq!(first, None, "the panicking connection must be dropped");
    assert!(second.is_some(), "the next connection must be served");
    assert!(served.still_running());
    let ended = served.stop();
    assert!(
        ended.stderr.contains("panicked")
            && ended.stderr.contains("dropping this vhost-user connection"),
        "{ended:?}"
    );
}

#[test]
fn a_panic_in_a_served_queue_worker_drops_only_its_connection_and_the_vm_reconnects() {
    if skip_without_kvm(
        "a_panic_in_a_served_queue_worker_drops_only_its_connection_and_the_vm_reconnects",
    ) {
        return;
    }
    let image = scratch("served.img");
    File::create(&image).unwrap().set_len(2 << 20).unwrap();
    let fault = [("SLUICE_TEST_FAULT", "queue-worker:panic")];
    let socket = scratch("served.sock");
    let _ = std::fs::remove_file(&socket);
    let serve_args = [
        "serve",
        "blk",
        "--socket",
        socket.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ];
    let mut served = Served::wrap(start(&serve_args, &fault, Stderr::Captured), socket.clone());
    let disk = format!("--disk=vhost_user=on,socket={}", socket.display());
    let cmdline = "quiet w=blk:op=verify:bs=4096:qd=8:queues=1:span_mb=1:seed=23";

    let vm = run(&["run", &disk, "--cmdline", cmdline], &[], Stderr::Captured);

    assert_eq!(vm.status, Some(0), "{vm:?}");
    assert!(vm.stdout.contains("GUEST-KIT PASS"), "{vm:?}");
    assert!(served.still_running());
    let server = served.stop();
    assert!(
        server.stderr.contains("thread `vhost-user-q0` panicked")
            && server
                .stderr
                .contains("dropping this vhost-user connection"),
        "{server:?}"
    );
    let _ = std::fs::remove_file(&image);
}

#[test]
fn a_forbidden_system_call_in_a_queue_worker_ends_sluice_unless_seccomp_is_off_or_log() {
    if skip_without_kvm(
        "a_forbidden_system_call_in_a_queue_worker_ends_sluice_unless_seccomp_is_off",
    ) {
        return;
    }
    let fault = [("SLUICE_TEST_FAULT", "queue-worker:syscall")];

    let filtered = run(RNG_RUN, &fault, Stderr::Captured);
    let mut unfiltered_args = RNG_RUN.to_vec();
    unfiltered_args.extend(["--seccomp", "off"]);
    let unfiltered = run(&unfiltered_args, &fault, Stderr::Captured);
    let mut logged_args = RNG_RUN.to_vec();
    logged_args.extend(["--seccomp", "log"]);
    let logged = run(&logged_args, &fault, Stderr::Captured);

    assert_eq!(filtered.status, Some(EXIT_SECCOMP), "{filtered:?}");
    assert!(
        filtered.stderr.contains("thread `virtio-rng")
            && filtered.stderr.contains("made a forbidden system call"),
        "{filtered:?}"
    );
    assert_eq!(unfiltered.status, Some(0), "{unfiltered:?}");
    assert!(
        unfiltered.stdout.contains("GUEST-KIT PASS"),
        "{unfiltered:?}"
    );
    assert_eq!(
        logged.status,
        Some(0),
        "`log` lets the call through: {logged:?}"
    );
}

#[test]
fn a_forbidden_system_call_in_serve_ends_the_server() {
    let fault = [("SLUICE_TEST_FAULT", "connection:syscall")];
    let served = Served::start("syscall", &fault, Stderr::Captured, &[]);

    let answer = get_features(&served.socket);
    let ended = served.stop();

    assert_eq!(answer, None);
    assert_eq!(ended.status, Some(EXIT_SECCOMP), "{ended:?}");
    assert!(ended.stderr.contains("forbidden system call"), "{ended:?}");
}

#[test]
fn an_unwritable_metrics_path_is_refused_before_the_vm_runs() {
    let metrics = scratch("no-such-dir").join("metrics.json");
    let mut args = RNG_RUN.to_vec();
    let flag = format!("--metrics={}", metrics.display());
    args.push(&flag);

    let ended = run(&args, &[], Stderr::Captured);

    assert_eq!(ended.status, Some(EXIT_VMM_ERROR), "{ended:?}");
    assert!(ended.stderr.contains("cannot write metrics"), "{ended:?}");
    assert!(
        !ended.stdout.contains("sluice-guest"),
        "the guest ran: {ended:?}"
    );
}

#[test]
fn metrics_are_written_to_the_file_opened_up_front() {
    if skip_without_kvm("metrics_are_written_to_the_file_opened_up_front") {
        return;
    }
    let metrics = scratch("metrics.json");
    let mut args = RNG_RUN.to_vec();
    let flag = format!("--metrics={}", metrics.display());
    args.push(&flag);

    let ended = run(&args, &[], Stderr::Captured);

    assert_eq!(ended.status, Some(0), "{ended:?}");
    let mut text = String::new();
    File::open(&metrics)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["outcome"], "DebugExit(0)");
}
