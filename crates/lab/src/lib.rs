//! The nested lab from Rust tests: `scripts/lab run` boots an L1 Debian Linux in QEMU TCG
//! whose `/dev/kvm` is kvm_amd with nested paging (so sluice meets hardware-KVM semantics, a
//! stock Linux boots on it, and VT-d / NVMe SR-IOV exist), runs one shell script there and
//! returns what it printed and its exit status.
//!
//! The image and the machine are the script's business (docs/testing.md); this crate only
//! composes the command line, reads the result and prints a `SKIP <test>: <reason>` line when
//! the lab cannot run here (no QEMU, no packages to build the image from). It is a thin
//! wrapper on purpose: the same lab is what a developer runs by hand.
//!
//! In L1 the repository (target/ and .cache/ included) is at its host path, read-only with a
//! tmpfs overlay, and the run's share directory is at [`SCRATCH`], read-write.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Where the share directory appears in L1.
pub const SCRATCH: &str = "/scratch";

/// What the L1 machine has besides a CPU with SVM+NPT (see `scripts/lab --help`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Intel VT-d with interrupt remapping and an NVMe PF with SR-IOV (`lab-enable-vfs N`).
    Iommu,
    /// A PCIe switch with an e1000e below a downstream port.
    Switch,
    /// Two NUMA nodes and a pxb-pcie root bus on node 1 with an NVMe controller.
    Numa,
}

impl Topology {
    fn name(self) -> &'static str {
        match self {
            Topology::Iommu => "iommu",
            Topology::Switch => "switch",
            Topology::Numa => "numa",
        }
    }
}

/// One L1 boot: its topology, shares and hard timeout.
#[derive(Clone, Debug)]
pub struct Lab {
    topologies: Vec<Topology>,
    vfs: u32,
    smp: u32,
    share: Option<PathBuf>,
    readonly: Vec<PathBuf>,
    timeout: Duration,
}

/// What a lab run gave back.
#[derive(Clone, Debug)]
pub struct LabRun {
    /// The script's exit status; `None` when it never finished (see `reason`).
    pub status: Option<i32>,
    pub reason: Option<String>,
    pub stdout: String,
    pub stderr: String,
    /// Seconds from QEMU's start to the script's start (L1 boot), and the script's own time.
    pub boot_seconds: Option<f64>,
    pub command_seconds: Option<f64>,
    /// Seconds from QEMU's start to its end (a run's turn and the image build not counted).
    pub total_seconds: Option<f64>,
    /// The last lines of L1's console.
    pub console_tail: String,
}

impl LabRun {
    /// Everything a failed assertion should show.
    pub fn transcript(&self) -> String {
        format!(
            "lab status {:?} ({})\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- L1 console (tail) ---\n{}",
            self.status,
            self.reason.as_deref().unwrap_or("finished"),
            self.stdout,
            self.stderr,
            self.console_tail
        )
    }

    /// Panics with the transcript unless the script exited 0.
    pub fn assert_success(&self) {
        assert_eq!(self.status, Some(0), "{}", self.transcript());
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    /// A plain L1 (no IOMMU, no extra devices) with a 15-minute hard timeout.
    pub fn new() -> Lab {
        Lab {
            topologies: Vec::new(),
            vfs: 2,
            smp: 1,
            share: None,
            readonly: default_readonly_dirs(),
            timeout: Duration::from_secs(900),
        }
    }

    pub fn topology(mut self, topology: Topology) -> Lab {
        self.topologies.push(topology);
        self
    }

    /// SR-IOV VFs the iommu topology's NVMe PF offers.
    pub fn vfs(mut self, count: u32) -> Lab {
        self.vfs = count;
        self
    }

    /// L1's CPUs (default 1). With 2, MTTCG can livelock L1 in the kernel's INT3 text patching
    /// (docs/testing.md), so only a run that needs two (the numa topology's node 1 gets the
    /// last CPU) asks for them.
    pub fn smp(mut self, cpus: u32) -> Lab {
        self.smp = cpus;
        self
    }

    /// A host directory that L1 sees read-write at [`SCRATCH`].
    pub fn share(mut self, dir: &Path) -> Lab {
        self.share = Some(dir.to_path_buf());
        self
    }

    /// Another host directory L1 sees read-only at the same path.
    pub fn readonly(mut self, dir: &Path) -> Lab {
        self.readonly.push(dir.to_path_buf());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Lab {
        self.timeout = timeout;
        self
    }

    /// Boots L1, runs `script` there with `sh -c` and waits for it (at most the timeout, plus
    /// a grace period in case the lab script itself hangs).
    pub fn run(&self, script: &str) -> LabRun {
        let result = unique_temp_path("result.json");
        let mut command = Command::new("python3");
        command
            .arg(repo_root().join("scripts/lab"))
            .arg("run")
            .arg("--timeout")
            .arg(self.timeout.as_secs().to_string())
            .arg("--result")
            .arg(&result);
        if !self.topologies.is_empty() {
            let names: Vec<&str> = self.topologies.iter().map(|t| t.name()).collect();
            command.arg("--topology").arg(names.join(","));
            command.arg("--vfs").arg(self.vfs.to_string());
        }
        if self.smp != 1 {
            command.arg("--smp").arg(self.smp.to_string());
        }
        if let Some(share) = &self.share {
            command.arg("--share").arg(share);
        }
        for dir in &self.readonly {
            command.arg("--ro").arg(dir);
        }
        command.arg("--").arg(script);
        // Runs wait for each other in scripts/lab (one L1 at a time), so this backstop is loose.
        let output = run_to_end(&mut command, self.timeout * 3 + Duration::from_secs(120));
        let run = read_result(&result, output);
        let _ = std::fs::remove_file(&result);
        if let (Some(boot), Some(took)) = (run.boot_seconds, run.command_seconds) {
            println!("lab: L1 booted in {boot:.1} s, the script took {took:.1} s");
        }
        run
    }
}

/// Why the lab cannot run on this host, or `None` if it can: QEMU is installed and the L1
/// image builds (downloading Debian's packages on the first call, cached afterwards).
pub fn unavailable_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            if find_program("qemu-system-x86_64").is_none() {
                return Some(
                    "qemu-system-x86_64 is not installed (scripts/install-deps.sh)".into(),
                );
            }
            let output = Command::new("python3")
                .arg(repo_root().join("scripts/lab"))
                .arg("build")
                .stdin(Stdio::null())
                .output();
            match output {
                Ok(output) if output.status.success() => None,
                Ok(output) => Some(format!(
                    "the L1 image does not build: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )),
                Err(e) => Some(format!("cannot run scripts/lab: {e}")),
            }
        })
        .clone()
}

/// L1's kernel (Debian's generic flavour) and its uncompressed newc initramfs, as
/// `scripts/lab build` finds or builds them. Tests that want a stock generic kernel as L2 (its
/// modules are in the initramfs under `lab/modules/`) start from these.
pub fn l1_image() -> Result<(PathBuf, PathBuf), String> {
    let output = Command::new("python3")
        .arg(repo_root().join("scripts/lab"))
        .arg("build")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run scripts/lab: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines().map(|l| PathBuf::from(l.trim()));
    match (lines.next(), lines.next()) {
        (Some(kernel), Some(initramfs)) => Ok((kernel, initramfs)),
        _ => Err(format!("scripts/lab build printed {stdout:?}")),
    }
}

/// Prints `SKIP <test>: <reason>` and returns true when the lab cannot run here.
pub fn skip_without_lab(test: &str) -> bool {
    match unavailable_reason() {
        Some(reason) => {
            println!("SKIP {test}: {reason}");
            true
        }
        None => false,
    }
}

/// True inside L1 (its hostname), where tests that start a lab of their own must not.
pub fn inside_lab() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/hostname").is_ok_and(|h| h.trim() == "lab-l1")
}

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The repository, and the target and Linux-cache directories when they live outside it.
fn default_readonly_dirs() -> Vec<PathBuf> {
    let root = repo_root();
    let mut dirs = vec![root.clone()];
    let elsewhere = [
        Some(target_dir()),
        std::env::var_os("SLUICE_LINUX_CACHE").map(PathBuf::from),
    ];
    for dir in elsewhere.into_iter().flatten() {
        if let Ok(dir) = dir.canonicalize() {
            if !dir.starts_with(&root) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn unique_temp_path(name: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("sluice-lab-{}-{n}-{name}", std::process::id()))
}

struct Output {
    stdout: String,
    stderr: String,
    /// Why the lab script itself did not finish, if it did not.
    failure: Option<String>,
}

/// Runs the lab script to its end; kills its process group after `limit` (the script's own
/// hard timeout should have fired long before).
fn run_to_end(command: &mut Command, limit: Duration) -> Output {
    use std::os::unix::process::CommandExt;
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) => {
            return Output {
                stdout: String::new(),
                stderr: String::new(),
                failure: Some(format!("cannot run scripts/lab: {e}")),
            }
        }
    };
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let output = child.wait_with_output();
        let _ = done_tx.send(());
        output
    });
    let killed = done_rx.recv_timeout(limit).is_err();
    if killed {
        let group = -i32::try_from(pid).expect("a pid fits in i32");
        // SAFETY: kill(2) with a negative pid signals the process group the lab script leads
        // (process_group(0) above); it touches no memory of ours.
        unsafe { libc::kill(group, libc::SIGKILL) };
    }
    match waiter.join().expect("the waiter thread does not panic") {
        Ok(output) => Output {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            failure: killed.then(|| format!("scripts/lab did not stop within {limit:?}")),
        },
        Err(e) => Output {
            stdout: String::new(),
            stderr: String::new(),
            failure: Some(format!("waiting for scripts/lab: {e}")),
        },
    }
}

fn read_result(path: &Path, output: Output) -> LabRun {
    let parsed: Option<serde_json::Value> = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name)).cloned();
    let reason = output.failure.or_else(|| {
        if parsed.is_none() {
            Some("scripts/lab wrote no result (see stderr)".into())
        } else {
            field("reason").and_then(|r| r.as_str().map(str::to_string))
        }
    });
    LabRun {
        status: field("status")
            .and_then(|s| s.as_i64())
            .and_then(|s| i32::try_from(s).ok()),
        reason,
        stdout: output.stdout,
        stderr: output.stderr,
        boot_seconds: field("boot_s").and_then(|v| v.as_f64()),
        command_seconds: field("command_s").and_then(|v| v.as_f64()),
        total_seconds: field("total_s").and_then(|v| v.as_f64()),
        console_tail: field("console_tail")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    }
}
