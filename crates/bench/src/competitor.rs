//! The competitors and how each runs a scenario. Adding one is one enum variant plus one arm in
//! each `match` below (id, description, what it supports, what it needs, how it runs).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_guest_kit::{
    find_qemu, Accel, Device, ExitKind, Firmware, GuestKitReport, GuestKitRun, Machine,
};

use crate::anchors::{self, Anchors};
use crate::exec::{self, Ended, Measured};
use crate::first_insn;
use crate::net;
use crate::scenario::{BlkParams, NetParams, Scenario, Workload};

/// Metric values of one run, by name (see [`crate::metric`]).
pub type Metrics = BTreeMap<String, f64>;

/// Every competitor the matrix knows, in the order they alternate.
pub const ALL: [Competitor; 14] = [
    Competitor::Sluice,
    Competitor::SluicePoll,
    Competitor::SluiceBatch,
    Competitor::SluicePacked,
    Competitor::SluiceNvme,
    Competitor::SluiceVhostServe,
    Competitor::SluiceVhostQsd,
    Competitor::QemuVhostServe,
    Competitor::QemuVhostServePacked,
    Competitor::Qemu,
    Competitor::QemuNvme,
    Competitor::CloudHypervisor,
    Competitor::Firecracker,
    Competitor::Fio,
];

/// One way of running a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Competitor {
    /// `sluice run` with its in-process virtio devices (`--disk path=`, `--net tap=`), with the
    /// default notify policy (`notify=irq`: the worker sleeps until a kick).
    Sluice,
    /// The same with `notify=poll`: after a kick or completion the worker polls the ring and
    /// the completions (adaptive window, at most the default 50 µs), on the disk and the net
    /// device.
    SluicePoll,
    /// The same with `notify=batch:16:50`: interrupts coalesced (16 requests or 50 µs).
    SluiceBatch,
    /// The same devices with packed virtqueues (`packed=on`, the guest kit's `vq=packed`).
    SluicePacked,
    /// `sluice run --nvme`: the emulated NVMe controller, driven by the guest kit's NVMe driver
    /// (`w=nvme`, shadow doorbells on) with the same block workload.
    SluiceNvme,
    /// `sluice run --disk vhost_user=on` served by `sluice serve blk`.
    SluiceVhostServe,
    /// `sluice run --disk vhost_user=on` served by qemu-storage-daemon.
    SluiceVhostQsd,
    /// QEMU -accel kvm with vhost-user-blk-pci served by `sluice serve blk`, split rings.
    QemuVhostServe,
    /// The same with packed rings: QEMU `packed=on`, the guest kit `vq=packed`.
    QemuVhostServePacked,
    /// QEMU -accel kvm: virtio-blk-pci with an iothread, aio=io_uring, cache=none; virtio-net on
    /// the UDP socket netdev.
    Qemu,
    /// QEMU -accel kvm with its emulated NVMe controller (aio=io_uring, cache=none), driven
    /// by the guest kit's NVMe driver.
    QemuNvme,
    /// Cloud Hypervisor from the anchors directory (see [`crate::anchors`]).
    CloudHypervisor,
    /// Firecracker from the anchors directory (see [`crate::anchors`]).
    Firecracker,
    /// fio on the host, io_uring, O_DIRECT, on the same image.
    Fio,
}

/// Everything a run needs from the host.
#[derive(Debug, Clone)]
pub struct Env {
    pub sluice: PathBuf,
    /// The guest kit ELF, written to a file.
    pub kernel: PathBuf,
    pub image: PathBuf,
    /// Scratch directory for sockets and metrics files.
    pub workdir: PathBuf,
    pub timeout: Duration,
    pub fio_runtime_s: u32,
    /// Where the Cloud Hypervisor and Firecracker binaries are.
    pub anchors: Anchors,
}

/// A process that took part in a run, with its rusage.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProcessUsage {
    pub role: String,
    pub cpu_s: f64,
    pub max_rss_kib: u64,
}

/// What one run produced.
#[derive(Debug, Clone, Default)]
pub struct RunOutput {
    pub metrics: Metrics,
    pub processes: Vec<ProcessUsage>,
    pub command: Vec<String>,
}

impl Competitor {
    pub fn id(self) -> &'static str {
        match self {
            Competitor::Sluice => "sluice",
            Competitor::SluicePoll => "sluice-poll",
            Competitor::SluiceBatch => "sluice-batch",
            Competitor::SluicePacked => "sluice-packed",
            Competitor::SluiceNvme => "sluice-nvme",
            Competitor::SluiceVhostServe => "sluice-vhost-serve",
            Competitor::SluiceVhostQsd => "sluice-vhost-qsd",
            Competitor::QemuVhostServe => "qemu-vhost-serve",
            Competitor::QemuVhostServePacked => "qemu-vhost-serve-packed",
            Competitor::Qemu => "qemu",
            Competitor::QemuNvme => "qemu-nvme",
            Competitor::CloudHypervisor => "cloud-hypervisor",
            Competitor::Firecracker => "firecracker",
            Competitor::Fio => "fio",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Competitor::Sluice => "sluice run, in-process virtio-blk (direct=on, notify=irq) / virtio-net on a tap",
            Competitor::SluicePoll => "sluice run, in-process virtio-blk (direct=on) / virtio-net with notify=poll: ring and completion polling after a kick or completion, adaptive window up to 50 µs",
            Competitor::SluiceBatch => "sluice run, in-process virtio-blk (direct=on, notify=batch:16:50: interrupt coalescing)",
            Competitor::SluicePacked => "sluice run, in-process virtio-blk (direct=on) / virtio-net with packed virtqueues (packed=on; guest kit vq=packed)",
            Competitor::SluiceNvme => "sluice run --nvme (direct=on): emulated NVMe, guest kit NVMe driver (w=nvme, polled completions, shadow doorbells)",
            Competitor::SluiceVhostServe => "sluice run --disk vhost_user=on, backend: sluice serve blk --direct",
            Competitor::SluiceVhostQsd => "sluice run --disk vhost_user=on, backend: qemu-storage-daemon (io_uring, cache.direct=on)",
            Competitor::QemuVhostServe => "QEMU -accel kvm q35: vhost-user-blk-pci (split rings), backend: sluice serve blk --direct --packed off",
            Competitor::QemuVhostServePacked => "QEMU -accel kvm q35: vhost-user-blk-pci packed=on, guest kit vq=packed, backend: sluice serve blk --direct",
            Competitor::Qemu => "QEMU -accel kvm q35: virtio-blk-pci + iothread, aio=io_uring, cache=none (SeaBIOS); virtio-net-pci on the UDP socket netdev; startup with qboot",
            Competitor::QemuNvme => "QEMU -accel kvm q35: emulated NVMe (-device nvme), aio=io_uring, cache=none; guest kit NVMe driver (w=nvme, shadow doorbells)",
            Competitor::CloudHypervisor => "Cloud Hypervisor (anchors dir): virtio-blk-pci (direct=on), virtio-net-pci on a tap it creates; stopped after the GUEST-KIT line (its ACPI power-off is not the guest kit's), so no exit time; not 2-queue blk (it refuses more queues than the 1 vCPU), startup-first-insn (needs sluice's exit log), -gbatch or seqread",
            Competitor::Firecracker => "Firecracker --no-api --enable-pci (anchors dir): virtio-blk io_engine=Async (io_uring) through the host page cache (it has no O_DIRECT option), one queue only (no 2-queue scenarios); virtio-net on a tap the bench creates; stopped after the GUEST-KIT line, so no exit time; not startup-first-insn nor -gbatch/seqread",
            Competitor::Fio => "host-native fio, io_uring, --direct=1, same image, one job per queue",
        }
    }

    /// The `--disk notify=` policy of the in-process sluice variants.
    fn notify(self) -> Option<&'static str> {
        match self {
            Competitor::SluicePoll => Some("poll"),
            Competitor::SluiceBatch => Some("batch:16:50"),
            _ => None,
        }
    }

    /// Whether the devices offer packed virtqueues and the guest kit asks for them.
    fn packed(self) -> bool {
        matches!(
            self,
            Competitor::SluicePacked | Competitor::QemuVhostServePacked
        )
    }

    /// Whether the guest kit drives the disk with its NVMe driver.
    fn nvme(self) -> bool {
        matches!(self, Competitor::SluiceNvme | Competitor::QemuNvme)
    }

    /// The guest kit command line of `scenario` on this competitor: the NVMe competitors run
    /// the block workload as `w=nvme` (same knobs), the packed one asks for `vq=packed`.
    pub fn guest_cmdline(self, scenario: &Scenario) -> String {
        let cmdline = scenario.guest_cmdline();
        match (self, &scenario.workload) {
            (_, Workload::Blk(_)) if self.nvme() => cmdline.replacen("w=blk:", "w=nvme:", 1),
            _ if self.packed() => cmdline.replacen("quiet ", "quiet vq=packed ", 1),
            _ => cmdline,
        }
    }

    /// The workload name in the guest kit's RESULT line for `scenario` on this competitor.
    pub fn result_workload(self, scenario: &Scenario) -> &'static str {
        match scenario.workload {
            Workload::Blk(_) if self.nvme() => "nvme",
            _ => scenario.result_workload(),
        }
    }

    /// Whether this competitor has an entry for the scenario at all. The notify-policy variants
    /// run the single-queue random reads (what the policies trade: kicks, interrupts and CPU
    /// per I/O), which keeps the matrix short; `sluice-poll` also the 2-queue QD32 reads and
    /// net tx (`notify=poll` on the net device too).
    pub fn supports(self, scenario: &Scenario) -> bool {
        match (self, &scenario.workload) {
            (Competitor::Sluice, _) => true,
            (Competitor::Qemu, w) => !matches!(w, Workload::FirstInstruction),
            // The anchors run what the issue compares: startup, random I/O and net. Both are
            // single-queue here: Firecracker's virtio-blk has one queue, and Cloud Hypervisor
            // refuses more queues than vCPUs (every VM in the matrix has one).
            (Competitor::CloudHypervisor | Competitor::Firecracker, Workload::Blk(b)) => {
                let random = matches!(b.op, "randread" | "randwrite") && b.guest_batch.is_none();
                random && b.queues == 1
            }
            (
                Competitor::CloudHypervisor | Competitor::Firecracker,
                Workload::Net(_) | Workload::Startup,
            ) => true,
            (Competitor::SluicePoll, Workload::Blk(b)) => {
                b.op == "randread" && (b.queues == 1 || b.qd == 32)
            }
            (Competitor::SluiceBatch, Workload::Blk(b)) => b.op == "randread" && b.queues == 1,
            // Packed against split rings: the single-queue random reads and net tx.
            (Competitor::SluicePacked, Workload::Blk(b)) => {
                b.op == "randread" && b.queues == 1 && b.guest_batch.is_none()
            }
            (Competitor::SluicePacked, Workload::Net(n)) => n.dir == "tx",
            // Emulation against paravirtualisation: every block workload the guest kit's NVMe
            // driver runs alike (it has no guest-side batching knob).
            // Device-side polling is what stops the per-frame kick of the guest kit's tx path.
            (Competitor::SluicePoll, Workload::Net(n)) => n.dir == "tx",
            // Guest-side batching is compared between in-process sluice and QEMU only (the
            // vhost-user rings behave alike); fio's run would be the same either way.
            (
                Competitor::SluiceVhostServe
                | Competitor::SluiceVhostQsd
                | Competitor::SluiceNvme
                | Competitor::QemuNvme
                | Competitor::Fio,
                Workload::Blk(b),
            ) => b.guest_batch.is_none(),
            // Split against packed rings through one backend: the random reads.
            (Competitor::QemuVhostServe | Competitor::QemuVhostServePacked, Workload::Blk(b)) => {
                b.op == "randread" && b.guest_batch.is_none()
            }
            _ => false,
        }
    }

    /// `Err(reason)` when this host cannot run the competitor at all.
    pub fn availability(self, anchors: &Anchors) -> Result<(), String> {
        match self {
            Competitor::Sluice
            | Competitor::SluicePoll
            | Competitor::SluiceBatch
            | Competitor::SluicePacked
            | Competitor::SluiceNvme
            | Competitor::SluiceVhostServe => kvm(),
            Competitor::SluiceVhostQsd => kvm().and_then(|_| {
                on_path(
                    "qemu-storage-daemon",
                    "apt-get install -y --no-install-recommends qemu-system-common",
                )
            }),
            Competitor::Qemu
            | Competitor::QemuNvme
            | Competitor::QemuVhostServe
            | Competitor::QemuVhostServePacked => {
                kvm().and_then(|_| find_qemu().map(drop).map_err(|e| e.to_string()))
            }
            // The binary first: where to find it is the more useful message.
            Competitor::CloudHypervisor => anchors
                .binary(anchors::CLOUD_HYPERVISOR)
                .and_then(|_| kvm()),
            Competitor::Firecracker => anchors.binary(anchors::FIRECRACKER).and_then(|_| kvm()),
            Competitor::Fio => on_path("fio", "apt-get install -y --no-install-recommends fio"),
        }
    }

    /// `Err(reason)` when this scenario cannot run on this competitor here (e.g. no tap).
    pub fn scenario_availability(self, scenario: &Scenario) -> Result<(), String> {
        match (self, &scenario.workload) {
            (
                Competitor::Sluice
                | Competitor::SluicePoll
                | Competitor::SluicePacked
                | Competitor::CloudHypervisor
                | Competitor::Firecracker,
                Workload::Net(_),
            ) => tap_available(),
            (Competitor::Sluice, Workload::FirstInstruction) => first_insn::probe_tools(),
            _ => Ok(()),
        }
    }

    /// Runs `scenario` once.
    pub fn run(self, scenario: &Scenario, env: &Env) -> Result<RunOutput, String> {
        match self {
            Competitor::Sluice if scenario.workload == Workload::FirstInstruction => {
                first_insn::run(env)
            }
            Competitor::Sluice
            | Competitor::SluicePoll
            | Competitor::SluiceBatch
            | Competitor::SluicePacked
            | Competitor::SluiceNvme => run_sluice(self, scenario, env, None),
            Competitor::SluiceVhostServe => {
                let socket = env.workdir.join("serve.sock");
                let queues = blk_params(scenario)?.queues.to_string();
                let mut command = Command::new(&env.sluice);
                command.args(["serve", "blk", "--direct", "--queues", &queues, "--socket"]);
                command.arg(&socket).arg("--image").arg(&env.image);
                let backend = Backend::start(command, socket, "sluice serve blk")?;
                run_sluice(self, scenario, env, Some(backend))
            }
            Competitor::SluiceVhostQsd => {
                let socket = env.workdir.join("qsd.sock");
                let queues = blk_params(scenario)?.queues;
                let mut command = Command::new("qemu-storage-daemon");
                command.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f,filename={},aio=io_uring,cache.direct=on",
                    env.image.display()
                ));
                command.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e,addr.type=unix,addr.path={},node-name=f,\
                     writable=on,num-queues={queues}",
                    socket.display()
                ));
                let backend = Backend::start(command, socket, "qemu-storage-daemon")?;
                run_sluice(self, scenario, env, Some(backend))
            }
            Competitor::QemuVhostServe | Competitor::QemuVhostServePacked => {
                let packed = self.packed();
                let socket = env.workdir.join("serve.sock");
                let queues = blk_params(scenario)?.queues;
                let mut command = Command::new(&env.sluice);
                command.args(["serve", "blk", "--direct", "--queues", &queues.to_string()]);
                command.args(["--packed", if packed { "on" } else { "off" }, "--socket"]);
                command.arg(&socket).arg("--image").arg(&env.image);
                let backend = Backend::start(command, socket.clone(), "sluice serve blk")?;
                run_qemu_vhost_user(self, scenario, env, backend, &socket)
            }
            Competitor::Qemu | Competitor::QemuNvme => run_qemu(self, scenario, env),
            Competitor::CloudHypervisor => {
                let binary = env.anchors.binary(anchors::CLOUD_HYPERVISOR)?;
                anchors::run_cloud_hypervisor(&binary, scenario, env)
            }
            Competitor::Firecracker => {
                let binary = env.anchors.binary(anchors::FIRECRACKER)?;
                anchors::run_firecracker(&binary, scenario, env)
            }
            Competitor::Fio => run_fio(blk_params(scenario)?, env),
        }
    }
}

pub(crate) fn kvm() -> Result<(), String> {
    sluice_guest_kit::kvm_unavailable_reason().map_or(Ok(()), Err)
}

pub(crate) fn on_path(program: &str, hint: &str) -> Result<(), String> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|dir| dir.join(program).is_file());
    if found {
        Ok(())
    } else {
        Err(format!(
            "{program} not found on PATH; install it with: {hint}"
        ))
    }
}

fn tap_available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("creating a tap needs CAP_NET_ADMIN; run as root".into());
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(drop)
        .map_err(|e| format!("/dev/net/tun unusable: {e}"))
}

fn blk_params(scenario: &Scenario) -> Result<&BlkParams, String> {
    match &scenario.workload {
        Workload::Blk(params) => Ok(params),
        _ => Err(format!("{} is not a block scenario", scenario.id)),
    }
}

/// A vhost-user backend process; killed and reaped on drop if still running.
struct Backend {
    child: Option<Child>,
    role: &'static str,
}

impl Backend {
    fn start(mut command: Command, socket: PathBuf, role: &'static str) -> Result<Backend, String> {
        let _ = std::fs::remove_file(&socket);
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {role}: {e}"))?;
        let mut backend = Backend {
            child: Some(child),
            role,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err(format!("{role} never listened on {}", socket.display()));
            }
            if let Some(Ok(Some(status))) = backend.child.as_mut().map(Child::try_wait) {
                return Err(format!("{role} exited: {status}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(backend)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the backend and returns its rusage.
    fn finish(mut self) -> Option<ProcessUsage> {
        let child = self.child.take()?;
        let usage = exec::kill_and_reap(child.id())?;
        Some(ProcessUsage {
            role: self.role.into(),
            cpu_s: usage.cpu_s,
            max_rss_kib: usage.max_rss_kib,
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn command_line(command: &Command) -> Vec<String> {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

pub(crate) fn unique() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A fresh tap name for one run (at most 15 bytes).
pub(crate) fn tap_name() -> String {
    format!("sbn{}x{}", std::process::id() % 100_000, unique() % 100)
}

/// The options an in-process sluice device of `competitor` adds to `--disk` / `--net`.
fn sluice_device_options(competitor: Competitor) -> String {
    let notify = competitor
        .notify()
        .map(|n| format!(",notify={n}"))
        .unwrap_or_default();
    let packed = if competitor.packed() {
        ",packed=on"
    } else {
        ""
    };
    format!("{notify}{packed}")
}

/// The disk argument of an in-process sluice run: virtio-blk, or the emulated NVMe.
fn sluice_disk_arg(competitor: Competitor, image: &Path, queues: u16) -> String {
    let device = if competitor.nvme() { "nvme" } else { "disk" };
    format!(
        "--{device}=path={},queues={queues},direct=on{}",
        image.display(),
        sluice_device_options(competitor)
    )
}

fn run_sluice(
    competitor: Competitor,
    scenario: &Scenario,
    env: &Env,
    backend: Option<Backend>,
) -> Result<RunOutput, String> {
    let metrics_path = env.workdir.join(format!("metrics-{}.json", unique()));
    let mut run = GuestKitRun::sluice(&env.sluice, &competitor.guest_cmdline(scenario));
    run.memory_mib = scenario.memory_mib();
    let mut extra = vec![format!("--metrics={}", metrics_path.display())];
    let mut feeder = None;
    match &scenario.workload {
        Workload::Blk(b) => extra.push(match &backend {
            Some(_) => format!(
                "--disk=vhost_user=on,socket={},queues={}",
                env.workdir.join(backend_socket(&backend)).display(),
                b.queues
            ),
            None => sluice_disk_arg(competitor, &env.image, b.queues),
        }),
        Workload::Net(n) => {
            let tap = tap_name();
            let options = sluice_device_options(competitor);
            extra.push(format!("--net=tap={tap}{options}"));
            if n.dir == "rx" {
                feeder = Some(net::feed_tap(tap, n.size as usize));
            }
        }
        Workload::Startup | Workload::FirstInstruction => {}
    }
    if let sluice_guest_kit::Vmm::Sluice { extra_args, .. } = &mut run.vmm {
        extra_args.extend(extra);
    }
    let command = run.command(&env.kernel).map_err(|e| e.to_string())?;
    let argv = command_line(&command);
    let extra_pids: Vec<u32> = backend.iter().filter_map(Backend::pid).collect();
    let measured = exec::run_measured(command, env.timeout, &extra_pids);
    if let Some(feeder) = feeder {
        feeder.stop();
    }
    let backend_usage = backend.and_then(Backend::finish);
    let measured = measured.map_err(|e| format!("starting sluice: {e}"))?;
    let exit = match measured.ended {
        Some(Ended::Code(code)) => ExitKind::from_sluice_status(code),
        _ => ExitKind::Killed,
    };
    let workload = competitor.result_workload(scenario);
    let mut output = guest_output(workload, &measured, exit, "sluice", argv)?;
    output.processes.extend(backend_usage);
    if let Ok(text) = std::fs::read_to_string(&metrics_path) {
        let _ = std::fs::remove_file(&metrics_path);
        if let Ok(json) = serde_json::from_str::<Value>(&text) {
            output
                .metrics
                .extend(sluice_metrics(&json, workload, &output.metrics));
        }
    }
    Ok(output)
}

/// File name of the socket `Competitor::run` gave the backend (both live in the workdir).
fn backend_socket(backend: &Option<Backend>) -> &'static str {
    match backend.as_ref().map(|b| b.role) {
        Some("qemu-storage-daemon") => "qsd.sock",
        _ => "serve.sock",
    }
}

/// Per-op counts from sluice's `--metrics` JSON: exits (all, and without the COM1 console),
/// doorbell kicks and interrupts of the scenario's device (absent for vhost-user devices,
/// whose rings sluice does not see).
fn sluice_metrics(json: &Value, workload: &str, guest: &Metrics) -> Metrics {
    let mut out = Metrics::new();
    let Some(&ops) = guest.get(crate::metric::OPS).filter(|&&ops| ops > 0.0) else {
        return out;
    };
    let count = |v: &Value| v.as_f64().unwrap_or(0.0);
    let total = count(&json["exits"]["total"]);
    let console: f64 = json["exits"]["per_device"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["device"] == "com1")
        .map(|d| count(&d["reads"]) + count(&d["writes"]))
        .sum();
    out.insert(crate::metric::EXITS_PER_OP.into(), total / ops);
    out.insert(
        crate::metric::EXITS_PER_OP_NO_CONSOLE.into(),
        (total - console) / ops,
    );
    // The device names in the metrics start with the workload's device class.
    let prefix = match workload {
        "blk" | "net" | "nvme" => workload,
        _ => return out,
    };
    let queues: Vec<&Value> = json["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["device"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .flat_map(|d| d["queues"].as_array().into_iter().flatten())
        .collect();
    if !queues.is_empty() {
        let sum = |key: &str| queues.iter().map(|q| count(&q[key])).sum::<f64>();
        out.insert(crate::metric::KICKS_PER_OP.into(), sum("kicks") / ops);
        out.insert(
            crate::metric::INTERRUPTS_PER_OP.into(),
            sum("interrupts") / ops,
        );
        let busiest = queues
            .iter()
            .max_by_key(|q| q["requests"].as_u64().unwrap_or(0));
        let latency = |p: &str| busiest.and_then(|q| q["latency_ns"][p].as_f64());
        for (metric, p) in [
            (crate::metric::DEVICE_LAT_P50_US, "p50"),
            (crate::metric::DEVICE_LAT_P99_US, "p99"),
        ] {
            if let Some(ns) = latency(p).filter(|&ns| ns > 0.0) {
                out.insert(metric.into(), ns / 1e3);
            }
        }
    }
    out
}

/// Metrics from the guest kit's console and the measured process.
pub(crate) fn guest_output(
    workload: &str,
    measured: &Measured,
    exit: ExitKind,
    role: &str,
    command: Vec<String>,
) -> Result<RunOutput, String> {
    use crate::metric as m;
    let mut report = GuestKitReport::parse(&measured.console, exit);
    report.vmm_stderr = measured.stderr.clone();
    report.host_timed_out = measured.timed_out;
    if !report.passed() {
        let tail: String = report.describe().chars().rev().take(1500).collect();
        return Err(format!(
            "guest kit did not pass: …{}",
            tail.chars().rev().collect::<String>()
        ));
    }
    let result = report
        .results_for(workload)
        .next()
        .ok_or_else(|| format!("no {workload} RESULT line"))?;
    let mut metrics = Metrics::new();
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    metrics.insert(
        m::VMM_MAX_RSS_MIB.into(),
        measured.usage.max_rss_kib as f64 / 1024.0,
    );
    metrics.insert(m::EXIT_MS.into(), measured.wall.as_secs_f64() * 1e3);
    if let Some(first) = ms(measured.first_line) {
        metrics.insert(m::FIRST_LINE_MS.into(), first);
    }
    if let Some(ready) = ms(measured.first_result) {
        metrics.insert(m::READY_MS.into(), ready);
    }
    if let (Some(ops), Some(elapsed_ns)) = (result.ops, result.elapsed_ns) {
        let ops = ops as f64;
        metrics.insert(m::OPS.into(), ops);
        if elapsed_ns > 0 {
            let seconds = elapsed_ns as f64 / 1e9;
            metrics.insert(m::RATE.into(), ops / seconds);
            if let Some(bytes) = result.bytes {
                metrics.insert(m::MIB_PER_S.into(), bytes as f64 / seconds / 1048576.0);
            }
        }
        if let Some(cpu) = measured.workload_cpu_s() {
            metrics.insert(m::HOST_CPU_S.into(), cpu);
            if ops > 0.0 {
                metrics.insert(m::HOST_CPU_US_PER_OP.into(), cpu / ops * 1e6);
            }
        }
    }
    // Net tx/rx keep no latency histogram (all zero).
    if let Some(lat) = result.lat_ns.as_ref().filter(|l| l.p50 > 0) {
        metrics.insert(m::LAT_P50_US.into(), lat.p50 as f64 / 1e3);
        metrics.insert(m::LAT_P99_US.into(), lat.p99 as f64 / 1e3);
    }
    Ok(RunOutput {
        metrics,
        processes: vec![ProcessUsage {
            role: role.into(),
            cpu_s: measured.usage.cpu_s,
            max_rss_kib: measured.usage.max_rss_kib,
        }],
        command,
    })
}

fn run_qemu(competitor: Competitor, scenario: &Scenario, env: &Env) -> Result<RunOutput, String> {
    let cmdline = competitor.guest_cmdline(scenario);
    let mut run = GuestKitRun::qemu(Accel::Kvm, Machine::Q35, &cmdline);
    run.memory_mib = scenario.memory_mib();
    // Kept bound for the run: QEMU sends tx frames here, so they never bounce as ICMP errors.
    let mut sink: Option<UdpSocket> = None;
    let mut feeder = None;
    match &scenario.workload {
        Workload::Net(NetParams { dir, size, .. }) => {
            let host = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let host_port = host.local_addr().map_err(|e| e.to_string())?.port();
            let vmm_port = net::free_udp_port().map_err(|e| e.to_string())?;
            sink = Some(host);
            run = run.with_device(Device::VirtioNet {
                host_port,
                vmm_port,
            });
            if *dir == "rx" {
                feeder = Some(net::feed_udp(vmm_port, *size as usize).map_err(|e| e.to_string())?);
            }
        }
        // qboot starts in ~0.4 s against SeaBIOS's ~4 s here; `w=info` needs no PCI BARs.
        Workload::Startup => run = run.with_firmware(Firmware::Qboot),
        Workload::Blk(_) | Workload::FirstInstruction => {}
    }
    let mut command = run.command(&env.kernel).map_err(|e| e.to_string())?;
    if let Workload::Blk(b) = &scenario.workload {
        if competitor.nvme() {
            command.args(qemu_nvme_args(&env.image, b.queues));
        } else {
            command.args(qemu_blk_args(&env.image, b.queues));
        }
    }
    let argv = command_line(&command);
    let measured = exec::run_measured(command, env.timeout, &[]);
    if let Some(feeder) = feeder {
        feeder.stop();
    }
    drop(sink);
    let measured = measured.map_err(|e| format!("starting QEMU: {e}"))?;
    let exit = match measured.ended {
        Some(Ended::Code(code)) => ExitKind::from_qemu_status(code),
        _ => ExitKind::Killed,
    };
    let workload = competitor.result_workload(scenario);
    guest_output(workload, &measured, exit, "qemu", argv)
}

/// QEMU (KVM) with a vhost-user-blk disk on `socket` served by `backend`; with `packed`, QEMU
/// offers packed rings and the guest kit asks for them.
fn run_qemu_vhost_user(
    competitor: Competitor,
    scenario: &Scenario,
    env: &Env,
    backend: Backend,
    socket: &Path,
) -> Result<RunOutput, String> {
    let b = blk_params(scenario)?;
    let packed = competitor.packed();
    let cmdline = competitor.guest_cmdline(scenario);
    let mut run =
        GuestKitRun::qemu(Accel::Kvm, Machine::Q35, &cmdline).with_device(Device::VhostUserBlk {
            socket: socket.to_path_buf(),
            queues: b.queues,
            reconnect: false,
        });
    run.memory_mib = scenario.memory_mib();
    run.packed_virtqueues = packed;
    let command = run.command(&env.kernel).map_err(|e| e.to_string())?;
    let argv = command_line(&command);
    let extra_pids: Vec<u32> = backend.pid().into_iter().collect();
    let measured = exec::run_measured(command, env.timeout, &extra_pids);
    let backend_usage = backend.finish();
    let measured = measured.map_err(|e| format!("starting QEMU: {e}"))?;
    let exit = match measured.ended {
        Some(Ended::Code(code)) => ExitKind::from_qemu_status(code),
        _ => ExitKind::Killed,
    };
    // The comparison is only worth anything if the rings were the ones asked for.
    let layout = if packed { "packed" } else { "split" };
    if !measured.console.contains(&format!("\"vq\":\"{layout}\"")) {
        return Err(format!("the guest kit did not run {layout} rings"));
    }
    let workload = competitor.result_workload(scenario);
    let mut output = guest_output(workload, &measured, exit, "qemu", argv)?;
    output.processes.extend(backend_usage);
    Ok(output)
}

/// virtio-blk-pci on an iothread, io_uring, O_DIRECT (the blk benchmark's QEMU setup).
pub fn qemu_blk_args(image: &Path, queues: u16) -> Vec<String> {
    vec![
        "-object".into(),
        "iothread,id=io0".into(),
        "-drive".into(),
        format!(
            "if=none,id=d0,file={},format=raw,aio=io_uring,cache=none",
            image.display().to_string().replace(',', ",,")
        ),
        "-device".into(),
        format!("virtio-blk-pci,drive=d0,iothread=io0,num-queues={queues}"),
    ]
}

/// QEMU's emulated NVMe controller on the image, io_uring, O_DIRECT, `queues` I/O queue pairs.
pub fn qemu_nvme_args(image: &Path, queues: u16) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "if=none,id=n0,file={},format=raw,aio=io_uring,cache=none",
            image.display().to_string().replace(',', ",,")
        ),
        "-device".into(),
        format!("nvme,drive=n0,serial=sluicebench,max_ioqpairs={queues}"),
    ]
}

fn run_fio(b: &BlkParams, env: &Env) -> Result<RunOutput, String> {
    use crate::metric as m;
    let mut command = Command::new("fio");
    command.args([
        "--name=bench".to_owned(),
        format!("--filename={}", env.image.display()),
        // fio and the guest kit name the ops alike (randread, randwrite, read).
        format!("--rw={}", b.op),
        format!("--bs={}", b.bs),
        format!("--iodepth={}", b.qd),
        format!("--numjobs={}", b.queues),
        format!("--size={}M", b.span_mb),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        "--thread".into(),
        "--group_reporting".into(),
        format!("--runtime={}", env.fio_runtime_s),
        "--time_based".into(),
        // Total latency (submission included), which is what the guest kit measures per
        // request; fio's default percentiles are completion latency only.
        "--lat_percentiles=1".into(),
        "--output-format=json".into(),
    ]);
    let argv = command_line(&command);
    let timeout = Duration::from_secs(u64::from(env.fio_runtime_s) + 60);
    let measured = exec::run_measured(command, timeout, &[]).map_err(|e| format!("fio: {e}"))?;
    if measured.ended != Some(Ended::Code(0)) {
        return Err(format!(
            "fio failed ({:?}): {}",
            measured.ended, measured.stderr
        ));
    }
    let json: Value =
        serde_json::from_str(&measured.console).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &json["jobs"][0];
    let side = if b.op.contains("write") {
        &job["write"]
    } else {
        &job["read"]
    };
    let ops = side["total_ios"].as_f64().unwrap_or(0.0);
    let runtime_s = side["runtime"].as_f64().unwrap_or(0.0) / 1e3;
    let mut metrics = Metrics::new();
    metrics.insert(m::OPS.into(), ops);
    if runtime_s > 0.0 {
        metrics.insert(m::RATE.into(), ops / runtime_s);
        metrics.insert(
            m::MIB_PER_S.into(),
            ops * f64::from(b.bs) / runtime_s / 1048576.0,
        );
    }
    metrics.insert(m::HOST_CPU_S.into(), measured.usage.cpu_s);
    if ops > 0.0 {
        metrics.insert(
            m::HOST_CPU_US_PER_OP.into(),
            measured.usage.cpu_s / ops * 1e6,
        );
    }
    let percentile = |p: &str| side["lat_ns"]["percentile"][p].as_f64().map(|ns| ns / 1e3);
    if let Some(p50) = percentile("50.000000") {
        metrics.insert(m::LAT_P50_US.into(), p50);
    }
    if let Some(p99) = percentile("99.000000") {
        metrics.insert(m::LAT_P99_US.into(), p99);
    }
    Ok(RunOutput {
        metrics,
        processes: vec![ProcessUsage {
            role: "fio".into(),
            cpu_s: measured.usage.cpu_s,
            max_rss_kib: measured.usage.max_rss_kib,
        }],
        command: argv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::matrix;

    #[test]
    fn ids_are_unique() {
        let mut ids: Vec<&str> = ALL.iter().map(|c| c.id()).collect();
        ids.sort();
        ids.dedup();

        assert_eq!(ids.len(), ALL.len());
    }

    #[test]
    fn only_vm_competitors_run_net_and_startup() {
        let scenarios = matrix(true, 64);
        let startup = scenarios
            .iter()
            .find(|s| s.id == "startup")
            .expect("startup");
        let net = scenarios
            .iter()
            .find(|s| s.id == "net-rx-64b")
            .expect("net");

        let on_startup: Vec<_> = ALL
            .iter()
            .filter(|c| c.supports(startup))
            .map(|c| c.id())
            .collect();
        let on_net: Vec<_> = ALL
            .iter()
            .filter(|c| c.supports(net))
            .map(|c| c.id())
            .collect();

        assert_eq!(
            on_startup,
            ["sluice", "qemu", "cloud-hypervisor", "firecracker"]
        );
        assert_eq!(
            on_net,
            ["sluice", "qemu", "cloud-hypervisor", "firecracker"]
        );
    }

    /// The ids of the scenarios in `scenarios` that `competitor` runs.
    fn scenario_ids_run_by(scenarios: &[Scenario], competitor: Competitor) -> Vec<&str> {
        scenarios
            .iter()
            .filter(|s| competitor.supports(s))
            .map(|s| s.id.as_str())
            .collect()
    }

    #[test]
    fn anchors_run_single_queue_random_io_net_and_startup() {
        let scenarios = matrix(true, 64);
        let ran_by = |c: Competitor| scenario_ids_run_by(&scenarios, c);

        let cloud_hypervisor = ran_by(Competitor::CloudHypervisor);
        let firecracker = ran_by(Competitor::Firecracker);

        for both in [
            "blk-randread-4k-qd32-1q",
            "net-tx-64b",
            "net-rx-1500b",
            "startup",
        ] {
            assert!(cloud_hypervisor.contains(&both), "{both}");
            assert!(firecracker.contains(&both), "{both}");
        }
        for neither in [
            "startup-first-insn",
            "blk-randread-4k-qd32-1q-gbatch",
            "blk-seqread-128k-qd4-1q",
            "blk-randwrite-4k-qd32-2q",
        ] {
            assert!(!cloud_hypervisor.contains(&neither), "{neither}");
            assert!(!firecracker.contains(&neither), "{neither}");
        }
    }

    #[test]
    fn notify_variants_run_their_scenarios_with_their_policy() {
        let scenarios = matrix(true, 64);
        let ran_by = |c: Competitor| scenario_ids_run_by(&scenarios, c);

        let disk = sluice_disk_arg(Competitor::SluiceBatch, Path::new("/d.img"), 1);

        assert_eq!(
            ran_by(Competitor::SluicePoll),
            [
                "blk-randread-4k-qd1-1q",
                "blk-randread-4k-qd32-1q",
                "blk-randread-4k-qd32-2q",
                "blk-randread-4k-qd32-1q-gbatch",
                "net-tx-64b",
                "net-tx-1500b"
            ]
        );
        assert_eq!(
            ran_by(Competitor::SluiceBatch),
            [
                "blk-randread-4k-qd1-1q",
                "blk-randread-4k-qd32-1q",
                "blk-randread-4k-qd32-1q-gbatch"
            ]
        );
        assert_eq!(
            disk,
            "--disk=path=/d.img,queues=1,direct=on,notify=batch:16:50"
        );
        assert_eq!(Competitor::Sluice.notify(), None);
        assert!(!ran_by(Competitor::Fio).contains(&"blk-randread-4k-qd32-1q-gbatch"));
        assert_eq!(ran_by(Competitor::Qemu).last(), Some(&"startup"));
    }

    #[test]
    fn sluice_metrics_divide_counts_by_guest_ops() {
        let json = serde_json::json!({
            "exits": {"total": 120, "per_device": [{"device": "com1", "reads": 10, "writes": 90}]},
            "devices": [{"device": "blk:x.img", "queues": [
                {"kicks": 30, "interrupts": 5, "requests": 30,
                 "latency_ns": {"p50": 65536, "p99": 4194304}},
                {"kicks": 10, "interrupts": 15, "requests": 10,
                 "latency_ns": {"p50": 1024, "p99": 2048}}]}],
        });
        let guest = Metrics::from([(crate::metric::OPS.to_owned(), 40.0)]);

        let metrics = sluice_metrics(&json, "blk", &guest);

        assert_eq!(metrics[crate::metric::EXITS_PER_OP], 3.0);
        assert_eq!(metrics[crate::metric::EXITS_PER_OP_NO_CONSOLE], 0.5);
        assert_eq!(metrics[crate::metric::KICKS_PER_OP], 1.0);
        assert_eq!(metrics[crate::metric::INTERRUPTS_PER_OP], 0.5);
        assert_eq!(metrics[crate::metric::DEVICE_LAT_P50_US], 65.536);
        assert_eq!(metrics[crate::metric::DEVICE_LAT_P99_US], 4194.304);
    }

    #[test]
    fn nvme_competitors_run_the_block_workload_as_nvme_on_an_nvme_disk() {
        let scenarios = matrix(true, 64);
        let qd32 = scenarios
            .iter()
            .find(|s| s.id == "blk-randread-4k-qd32-1q")
            .expect("qd32");

        let cmdline = Competitor::SluiceNvme.guest_cmdline(qd32);
        let disk = sluice_disk_arg(Competitor::SluiceNvme, Path::new("/d.img"), 2);
        let qemu = qemu_nvme_args(Path::new("/d.img"), 2).join(" ");

        assert_eq!(
            cmdline,
            qd32.guest_cmdline().replace("w=blk:", "w=nvme:"),
            "same knobs, NVMe driver"
        );
        assert_eq!(Competitor::QemuNvme.guest_cmdline(qd32), cmdline);
        assert_eq!(Competitor::SluiceNvme.result_workload(qd32), "nvme");
        assert_eq!(disk, "--nvme=path=/d.img,queues=2,direct=on");
        assert!(qemu.contains("-device nvme,drive=n0") && qemu.contains("max_ioqpairs=2"));
        let ran_by_nvme = scenario_ids_run_by(&scenarios, Competitor::SluiceNvme);
        assert!(ran_by_nvme.contains(&"blk-seqread-128k-qd4-1q"));
        assert!(!ran_by_nvme.contains(&"blk-randread-4k-qd32-1q-gbatch"));
        assert!(!ran_by_nvme.iter().any(|id| id.starts_with("net")));
    }

    #[test]
    fn packed_competitor_asks_the_device_and_the_guest_for_packed_rings() {
        let scenarios = matrix(true, 64);
        let net_tx = scenarios
            .iter()
            .find(|s| s.id == "net-tx-64b")
            .expect("net tx");

        let cmdline = Competitor::SluicePacked.guest_cmdline(net_tx);
        let disk = sluice_disk_arg(Competitor::SluicePacked, Path::new("/d.img"), 1);

        assert!(cmdline.starts_with("quiet vq=packed w=net:"), "{cmdline}");
        assert_eq!(disk, "--disk=path=/d.img,queues=1,direct=on,packed=on");
        assert_eq!(Competitor::SluicePacked.result_workload(net_tx), "net");
        assert_eq!(
            scenario_ids_run_by(&scenarios, Competitor::SluicePacked),
            [
                "blk-randread-4k-qd1-1q",
                "blk-randread-4k-qd32-1q",
                "net-tx-64b",
                "net-tx-1500b"
            ]
        );
    }
}
