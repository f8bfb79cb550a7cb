//! Shared helpers for sluice's end-to-end tests: building the assembler test guests in
//! `tests/guests/`, running the real `sluice` binary with a hard timeout, and deciding whether
//! this host can run KVM guests at all (if not, tests print a SKIP line and pass).

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use sluice_guest_kit::{GuestKitReport, GuestKitRun, Vmm};

/// Path of the binary under test.
pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// sluice's exit statuses (see `crates/sluice/src/main.rs`).
pub const EXIT_GUEST_RESET: i32 = 120;
pub const EXIT_GUEST_CRASH: i32 = 121;
pub const EXIT_VMM_ERROR: i32 = 125;

/// Longest a guest-kit boot may take before the test kills sluice.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn guest_sources() -> PathBuf {
    repo_root().join("tests/guests")
}

/// Why /dev/kvm cannot be used here, or `None` when it can be opened read-write.
pub fn kvm_unusable_reason() -> Option<String> {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Prints the SKIP line and returns true when KVM is unusable; tests then return early.
pub fn skip_without_kvm(test: &str) -> bool {
    match kvm_unusable_reason() {
        Some(reason) => {
            println!("SKIP {test}: /dev/kvm unusable ({reason})");
            true
        }
        None => false,
    }
}

/// True on a kvm_pvm host (no hardware-backed kvm_intel / kvm_amd), where long-mode `int3`
/// and a few instructions fail emulation (see docs/platform-notes.md).
pub fn is_kvm_pvm_host() -> bool {
    let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
    loaded("kvm_pvm") && !loaded("kvm_intel") && !loaded("kvm_amd")
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Assembles and links `tests/guests/<name>.S` into a PVH ELF under the target directory and
/// returns its path. The ELF is rebuilt only when it is older than its inputs.
pub fn build_guest(name: &str) -> PathBuf {
    let src_dir = guest_sources();
    let source = src_dir.join(format!("{name}.S"));
    let inputs = [
        source.clone(),
        src_dir.join("common.inc"),
        src_dir.join("interrupts.inc"),
        src_dir.join("guest.ld"),
    ];
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    fs::create_dir_all(&out_dir).expect("create the guest output directory");
    let elf = out_dir.join(format!("{name}.elf"));
    let newest_input = inputs.iter().filter_map(|p| modified(p)).max();
    if modified(&elf).is_some_and(|built| Some(built) >= newest_input) {
        return elf;
    }
    // Unique intermediate names: test binaries, and test threads within one, build guests
    // concurrently.
    static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let build = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag = format!("{name}.{}.{build}", std::process::id());
    let object = out_dir.join(format!("{tag}.o"));
    let partial = out_dir.join(format!("{tag}.elf.part"));
    run_tool(
        Command::new("gcc")
            .args(["-c", "-x", "assembler-with-cpp", "-I"])
            .arg(&src_dir)
            .arg(&source)
            .arg("-o")
            .arg(&object),
    );
    run_tool(
        Command::new("ld")
            .args(["-static", "-nostdlib", "--no-warn-rwx-segments", "-T"])
            .arg(src_dir.join("guest.ld"))
            .arg("-o")
            .arg(&partial)
            .arg(&object),
    );
    fs::rename(&partial, &elf).expect("move the linked guest into place");
    let _ = fs::remove_file(&object);
    elf
}

fn run_tool(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e} (gcc and binutils are required)"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What a sluice run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit status; `None` when killed (by the timeout or a signal).
    pub status: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// Everything the run printed, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "status {:?}{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            if self.timed_out { " (timed out)" } else { "" },
            self.stdout,
            self.stderr
        )
    }

    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }
}

fn drain<R: Read + Send + 'static>(mut pipe: R) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `sluice` with `args`, killing it after `timeout`.
pub fn run_sluice<S: AsRef<std::ffi::OsStr>>(args: &[S], timeout: Duration) -> Run {
    let started = Instant::now();
    let mut child = Command::new(SLUICE)
        .args(args)
        .env_remove("SLUICE_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the sluice binary");
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let (status, timed_out) = wait_with_timeout(&mut child, timeout);
    Run {
        status,
        timed_out,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> (Option<i32>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().expect("wait for sluice") {
            Some(status) => return (status.code(), false),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let status = child.wait().expect("reap sluice");
                return (status.code(), true);
            }
            None => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Boots the test guest `name` with extra sluice arguments and returns the run.
pub fn boot_guest(name: &str, extra: &[&str]) -> Run {
    let elf = build_guest(name);
    let mut args = vec![
        "run".to_string(),
        "--kernel".to_string(),
        elf.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run_sluice(&args, GUEST_TIMEOUT)
}

/// Requests completed by the first device in a `--metrics` JSON, summed over its queues.
pub fn metrics_requests(metrics: &serde_json::Value) -> u64 {
    metrics["devices"][0]["queues"]
        .as_array()
        .unwrap_or_else(|| panic!("no device queues in {metrics}"))
        .iter()
        .map(|q| q["requests"].as_u64().unwrap_or(0))
        .sum()
}

/// Userspace exits (reads + writes) of the bus device whose name contains `name`.
pub fn metrics_device_exits(metrics: &serde_json::Value, name: &str) -> u64 {
    metrics["exits"]["per_device"]
        .as_array()
        .unwrap_or_else(|| panic!("no per-device exits in {metrics}"))
        .iter()
        .find(|d| d["device"].as_str().is_some_and(|n| n.contains(name)))
        .map(|d| d["reads"].as_u64().unwrap_or(0) + d["writes"].as_u64().unwrap_or(0))
        .unwrap_or_else(|| panic!("no device named like {name} in {metrics}"))
}

pub fn run_on_sluice(cmdline: &str, args: Vec<String>) -> (GuestKitReport, serde_json::Value) {
    // One file per run: tests of one binary run in parallel.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run_number = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let metrics = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("metrics-{}-{run_number}.json", std::process::id(),));
    let mut run = GuestKitRun::sluice(Path::new(env!("CARGO_BIN_EXE_sluice")), cmdline);
    run.timeout = Duration::from_secs(120);
    if let Vmm::Sluice { extra_args, .. } = &mut run.vmm {
        extra_args.extend(args);
        extra_args.push(format!("--metrics={}", metrics.display()));
    }
    let report = run.run().expect("run sluice");
    // Missing or empty when sluice did not end normally: the report then says why.
    let metrics = fs::read_to_string(&metrics)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    (report, metrics)
}

/// Echoes every frame of EtherType 0x88b5 that arrives on `ifname` back out of it, until the
/// returned flag is set. The interface appears when sluice creates the tap.
pub fn spawn_echo_peer(
    ifname: String,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    JoinHandle<u64>,
) {
    let peer = spawn_counting_echo_peer(ifname);
    (peer.stop, peer.handle)
}

/// An echo peer's handles: what stops it, what it echoed so far, its thread.
pub struct EchoPeer {
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Frames echoed so far.
    pub echoed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The last frame echoed.
    pub last: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Returns the number of frames echoed.
    pub handle: JoinHandle<u64>,
}

/// [`spawn_echo_peer`] that also shows what it echoed so far.
pub fn spawn_counting_echo_peer(ifname: String) -> EchoPeer {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stop_peer = stop.clone();
    let counter = std::sync::Arc::new(AtomicU64::new(0));
    let live = counter.clone();
    let last = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let last_echoed = last.clone();
    let handle = thread::spawn(move || {
        let name = std::ffi::CString::new(ifname).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let ifindex = loop {
            // SAFETY: `name` is a valid NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if index != 0 || stop_peer.load(Ordering::Relaxed) || Instant::now() > deadline {
                break index;
            }
            thread::sleep(Duration::from_millis(5));
        };
        if ifindex == 0 {
            return 0;
        }
        let proto = 0x88b5u16.to_be();
        // SAFETY: plain socket creation; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: an all-zero sockaddr_ll is valid; the fields set below make it a bind address.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        let len = size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: `addr` is a valid sockaddr_ll of `len` bytes.
        let rc = unsafe { libc::bind(fd, (&raw const addr).cast::<libc::sockaddr>(), len) };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setting a receive timeout with a valid timeval.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast::<libc::c_void>(),
                size_of::<libc::timeval>() as u32,
            )
        };
        let mut echoed = 0;
        let mut frame = [0u8; 2048];
        while !stop_peer.load(Ordering::Relaxed) {
            // SAFETY: an all-zero sockaddr_ll is valid as an out-parameter.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = len;
            // SAFETY: `frame` and `from` are valid for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    frame.as_mut_ptr().cast::<libc::c_void>(),
                    frame.len(),
                    0,
                    (&raw mut from).cast::<libc::sockaddr>(),
                    &raw mut from_len,
                )
            };
            if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            // SAFETY: sends `n` bytes of `frame` to the interface bound in `addr`.
            unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast::<libc::c_void>(),
                    n as usize,
                    0,
                    (&raw const addr).cast::<libc::sockaddr>(),
                    len,
                )
            };
            echoed += 1;
            *last_echoed.lock().unwrap() = frame[..n as usize].to_vec();
            live.store(echoed, Ordering::Relaxed);
        }
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        echoed
    });
    EchoPeer {
        stop,
        echoed: counter,
        last,
        handle,
    }
}

/// Sends `frame` (a whole Ethernet frame) out of interface `ifname`, as a peer on its wire.
pub fn send_frame(ifname: &str, frame: &[u8]) -> std::io::Result<()> {
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket creation; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set below make it a destination.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    let len = size_of::<libc::sockaddr_ll>() as u32;
    // SAFETY: sends `frame.len()` bytes of `frame` to the interface named in `addr`.
    let sent = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast::<libc::c_void>(),
            frame.len(),
            0,
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    let result = if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    result
}

/// The child's exit status, or `None` if it had to be killed after `timeout`.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for sluice") {
            return status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `ready` until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// `sluice run` of the `wait` test guest (it idles until stopped) with the control API on
/// `socket`, COM1 off, and `extra` arguments (devices); its output is discarded.
pub fn start_idle_vm_with_api(socket: &Path, extra: &[String]) -> Child {
    Command::new(SLUICE)
        .args(["run", "--kernel"])
        .arg(build_guest("wait"))
        .args(["--serial", "off", "--api-socket"])
        .arg(socket)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice")
}

/// `sluice ctl --api-socket SOCKET ARGS...`: its status and stdout.
pub fn ctl(socket: &Path, args: &[&str]) -> (i32, String) {
    let out = ctl_output(socket, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// [`ctl`] with stderr after stdout (where a refusal says why).
pub fn ctl_with_stderr(socket: &Path, args: &[&str]) -> (i32, String) {
    let out = ctl_output(socket, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn ctl_output(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(SLUICE)
        .args(["ctl", "--api-socket"])
        .arg(socket)
        .args(args)
        .output()
        .expect("run sluice ctl")
}

/// One request with curl over the API's Unix socket: HTTP status and body.
pub fn curl(socket: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "10"])
        .arg("--unix-socket")
        .arg(socket)
        .args(["--request", method, "--write-out", "\n%{http_code}"]);
    if let Some(body) = body {
        command.args(["--header", "Content-Type: application/json", "--data", body]);
    }
    let out = command
        .arg(format!("http://localhost/api/v1/{endpoint}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A fresh, empty directory for one test's files: `CARGO_TARGET_TMPDIR/SUITE/NAME-PID` (keep
/// NAME short where a Unix socket goes inside: paths of sockets are limited to 107 bytes).
pub fn scratch_dir(suite: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(suite)
        .join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}
