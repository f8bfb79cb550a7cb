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
