//! `sluice run --disk vhost_user=on` against backends that stop answering. One that accepts the
//! connection and never answers: sluice gives up within the disk's `timeout=` (default 5 s),
//! exits 125 and names the socket and the request, instead of waiting forever. One that stalls
//! after the handshake, at the guest's DRIVER_OK: the guest's status write returns at once and
//! the guest finds the disk DEVICE_NEEDS_RESET, instead of its vCPU blocking for good.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;

use common::{run_sluice, skip_without_kvm, EXIT_VMM_ERROR, SLUICE};
use sluice_guest_kit::{GuestKitRun, Vmm};

/// Longest the whole run may take: VM setup on a slow host plus the timeout.
const BOUND: Duration = Duration::from_secs(60);

/// A unix listener that accepts every connection, keeps it open and never reads from it.
struct SilentBackend {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn scratch(name: &str, suffix: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vhost-user-hostile");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.{suffix}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

impl SilentBackend {
    fn start(name: &str) -> Self {
        let socket = scratch(name, "sock");
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

/// Requests of the connect-time handshake (GET_FEATURES, SET_OWNER, GET/SET_PROTOCOL_FEATURES,
/// GET_QUEUE_NUM, GET_CONFIG, GET_MAX_MEM_SLOTS): none carries an fd.
const HANDSHAKE: [u32; 7] = [1, 3, 15, 16, 17, 24, 36];

/// `sluice serve blk` behind a proxy that passes the handshake through and then forwards
/// nothing more: a backend that stalls at the first DRIVER_OK request, connection open.
struct StallingBackend {
    server: Child,
    socket: PathBuf,
    paths: Vec<PathBuf>,
}

impl StallingBackend {
    fn start(name: &str) -> Self {
        let image = scratch(name, "img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let upstream = scratch(name, "backend.sock");
        let server = Command::new(SLUICE)
            .args(["serve", "blk", "--socket"])
            .arg(&upstream)
            .arg("--image")
            .arg(&image)
            .stdin(Stdio::null())
            .spawn()
            .expect("start sluice serve blk");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !upstream.exists() {
            assert!(Instant::now() < deadline, "sluice serve never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let socket = scratch(name, "sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let target = upstream.clone();
        // Detached: it ends when sluice closes its side.
        std::thread::spawn(move || stall_after_handshake(&listener, &target));
        Self {
            server,
            socket,
            paths: vec![image, upstream],
        }
    }
}

impl Drop for StallingBackend {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        for path in self.paths.iter().chain([&self.socket]) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn stall_after_handshake(listener: &UnixListener, upstream: &Path) {
    let Ok((mut client, _)) = listener.accept() else {
        return;
    };
    let Ok(mut backend) = UnixStream::connect(upstream) else {
        return;
    };
    let (mut replies, mut to_client) = (backend.try_clone().unwrap(), client.try_clone().unwrap());
    std::thread::spawn(move || std::io::copy(&mut replies, &mut to_client));
    loop {
        let mut header = [0u8; 12];
        if client.read_exact(&mut header).is_err() {
            return;
        }
        let word = |i: usize| u32::from_le_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
        if !HANDSHAKE.contains(&word(0)) {
            break;
        }
        let mut body = vec![0u8; word(2).min(4096) as usize];
        if client.read_exact(&mut body).is_err()
            || backend.write_all(&header).is_err()
            || backend.write_all(&body).is_err()
        {
            return;
        }
    }
    // Stalled: read (and drop) whatever comes, answer nothing, until sluice hangs up.
    let _ = std::io::copy(&mut client, &mut std::io::sink());
    drop(backend);
}

#[test]
fn a_backend_stalled_at_driver_ok_makes_the_disk_need_reset_not_the_vcpu_hang() {
    let name = "stalled_at_driver_ok";
    if skip_without_kvm(name) {
        return;
    }
    let backend = StallingBackend::start(name);
    let mut run = GuestKitRun::sluice(Path::new(SLUICE), "quiet w=blk:op=write:bs=4096:qd=1:ops=4");
    run.timeout = Duration::from_secs(120);
    if let Vmm::Sluice { extra_args, .. } = &mut run.vmm {
        extra_args.push(format!(
            "--disk=vhost_user=on,socket={},timeout=1s",
            backend.socket.display()
        ));
    }

    let report = run.run().expect("run sluice");

    assert!(!report.host_timed_out, "the VM hung: {}", report.describe());
    let blk = report.results_for("blk").next().expect("a blk result");
    assert_eq!(blk.raw["error"], "NeedsReset", "{}", report.describe());
    let log = &report.vmm_stderr;
    assert!(
        log.contains("cannot start the device") && log.contains("got no answer within 1s"),
        "{log}"
    );
}
