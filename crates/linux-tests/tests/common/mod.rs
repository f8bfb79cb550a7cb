//! Shared harness for the real-driver tests: the guest image (scripts/guest-image.py), QEMU
//! boots (`qemu`), vhost-user-blk backends (`backend`), other `sluice serve` devices (`serve`)
//! and fio's on-disk verify format (`fio`).
//!
//! Everything a test needs from the host is checked up front; a missing tool or a failed
//! download prints a `SKIP <test>: <reason>` line and the test returns without failing.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod backend;
pub mod fio;
pub mod qemu;
pub mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Building the image from a cold cache downloads ~60 MB of packages.
const IMAGE_BUILD_TIMEOUT: Duration = Duration::from_secs(600);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// The kernel and initramfs that scripts/guest-image.py built.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Builds (or finds in the cache) the guest image once per test binary.
pub fn guest_image() -> Result<GuestImage, String> {
    static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    IMAGE.get_or_init(|| build_guest_image(&[])).clone()
}

/// The guest image with tpm2-tools (`guest-image.py --tpm`), for the TPM lab test only: the
/// tools and their libraries add 4 MB, and a 256 MiB guest (the migration tests') failed to
/// unpack the larger initramfs.
pub fn guest_image_with_tpm() -> Result<GuestImage, String> {
    static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    IMAGE.get_or_init(|| build_guest_image(&["--tpm"])).clone()
}

fn build_guest_image(args: &[&str]) -> Result<GuestImage, String> {
    let script = repo_root().join("scripts/guest-image.py");
    let output = run_with_timeout(
        Command::new("python3").arg(&script).args(args),
        IMAGE_BUILD_TIMEOUT,
        "guest-image.py",
    )?;
    let lines: Vec<&str> = output.lines().collect();
    match lines.as_slice() {
        [kernel, initramfs] => Ok(GuestImage {
            kernel: PathBuf::from(kernel),
            initramfs: PathBuf::from(initramfs),
        }),
        _ => Err(format!("guest-image.py printed {output:?}")),
    }
}

/// Runs a command to completion (killing it after `timeout`) and returns its stdout, or the
/// last line of its stderr as the reason it failed.
pub fn run_with_timeout(
    command: &mut Command,
    timeout: Duration,
    what: &str,
) -> Result<String, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let deadline = Instant::now() + timeout;
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} took longer than {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr.lines().last().unwrap_or("no message").to_string();
        return Err(format!("{what} failed: {reason}"));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The path of `program` on PATH, if any.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The guest image and the host tools a QEMU test needs, or a printed SKIP line.
pub fn prerequisites(test: &str, tools: &[&str]) -> Option<GuestImage> {
    for tool in tools {
        if find_program(tool).is_none() {
            println!("SKIP {test}: {tool} is not installed (scripts/install-deps.sh)");
            return None;
        }
    }
    match guest_image() {
        Ok(image) => Some(image),
        Err(reason) => {
            println!("SKIP {test}: cannot build the guest image ({reason})");
            None
        }
    }
}

/// A scratch directory (socket, disk image, logs) removed on drop unless the test panicked,
/// so a failure leaves its evidence behind.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("sluice-linux-{test}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A sparse, zero-filled disk image of `size` bytes.
    pub fn disk(&self, name: &str, size: u64) -> PathBuf {
        let path = self.path(name);
        let file = std::fs::File::create(&path).expect("create the disk image");
        file.set_len(size).expect("size the disk image");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
