//! `sluice`: the command-line front end. Parses flags, runs the VM, maps how it ended to an
//! exit status (see `exit_status`).

mod api;
mod guest_kit;
mod host;
mod serve;
mod signals;
mod size;
mod spectrum;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use std::fs::File;
use std::io::Write;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sluice_sandbox::{Role, SeccompMode};
use sluice_vmm::config::{DiskSpec, E1000Spec, NetSpec, NvmeSpec, RngSpec};
use sluice_vmm::cpu_placement::{CpuPlacement, CpuSpec};
use sluice_vmm::handle::VmHandle;
use sluice_vmm::iommu::IommuKind;
use sluice_vmm::machine::{self, SerialTarget, VmConfig, VmReport};
use sluice_vmm::numa::NumaPolicy;
use sluice_vmm::vcpu::VmOutcome;

/// Exit status when the guest asked for a reset (sluice does not reboot guests).
const EXIT_GUEST_RESET: u8 = 120;
/// Exit status when the VM crashed (triple fault, emulation failure, failed entry).
const EXIT_GUEST_CRASH: u8 = 121;
// 122 (a sluice thread panicked) and 123 (a forbidden system call) are sluice_sandbox's
// EXIT_PANIC and EXIT_SECCOMP, set where those failures are caught.
/// Exit status when sluice itself could not start or run the VM (bad input, no KVM, ...).
const EXIT_VMM_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A KVM virtual machine monitor built around its I/O layer"
)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `sluice_vmm=debug`.
    #[arg(long, global = true, env = "SLUICE_LOG", default_value = "warn")]
    log: String,
    /// seccomp filters per thread kind (`run`, `serve`): `on` ends sluice on a forbidden system
    /// call, `log` lets it through and has the kernel log it, `off` installs none.
    #[arg(long, global = true, env = "SLUICE_SECCOMP", default_value = "on")]
    seccomp: SeccompMode,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM. Without --kernel, boots the embedded guest kit.
    Run(Box<RunArgs>),
    /// Serve a device model to another VMM over vhost-user.
    Serve(serve::ServeArgs),
    /// Run the benchmark matrix (sluice, vhost-user, QEMU, fio) and write results to --out.
    Bench(sluice_bench::BenchArgs),
    /// Check that this host can give a VM a PCI function (IOMMU, interrupt remapping, groups,
    /// ACS, VFIO, limits); exit status 0 ready, 1 not ready.
    HostCheck(host::HostCheckArgs),
    /// SR-IOV virtual functions: create, reset, quarantine.
    Vf(host::VfArgs),
    /// Talk to a running VM's control API (`sluice run --api-socket`).
    Ctl(api::CtlArgs),
    /// Re-run a VM recorded with `sluice run --record FILE` from the log alone (no kernel,
    /// disk image or tap): every exit checked against the log, the first difference reported.
    Replay(ReplayArgs),
}

#[derive(Args)]
struct ReplayArgs {
    /// The log `sluice run --record` wrote (with `--device`: a disk's or an NVMe controller's
    /// `requests=` log).
    #[arg(value_name = "LOG")]
    recording: PathBuf,
    /// Where the replayed COM1 output goes: `stdout`, `file=PATH` or `off`.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    serial: SerialTarget,
    /// LOG is a request log (`--disk ...,requests=LOG` or `--nvme ...,requests=LOG`, told
    /// apart by its header): re-run its requests against the device model alone, no VM,
    /// checking every answer.
    #[arg(long)]
    device: bool,
    /// With --device: start from a copy of this image instead of a fresh all-zero one.
    #[arg(long, requires = "device")]
    image: Option<PathBuf>,
    /// With --device: also write each request as a fuzz seed into DIR (`blk_request` for a
    /// disk's log, `nvme_command` for an NVMe log).
    #[arg(long, value_name = "DIR", requires = "device")]
    corpus: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Kernel: a Linux bzImage, or an ELF (PVH entry note, or a 64-bit vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk loaded for the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs (1..=254) and where they run: `N[,affinity=V:LIST[,V:LIST]...]
    /// [,workers=LIST]` pins vCPU V's thread to the host CPUs LIST and every device worker
    /// thread to `workers` (default: the CPUs sluice started on); a LIST is a kernel cpulist
    /// with `+` for `,` (`2-3+6`).
    #[arg(long, default_value = "1", value_parser = CpuSpec::parse)]
    cpus: CpuSpec,
    /// The CPUs in `--cpus ...,affinity=` are this VM's alone: refuse to start if another sluice
    /// VM has pinned any of them (and keep later VMs off them); reports what the host offers
    /// (isolcpus, nohz_full, cgroup cpuset).
    #[arg(long)]
    isolate: bool,
    /// Guest RAM, e.g. `128M`, `2G`; a bare number means MiB; at least 16M.
    #[arg(long, default_value = "128M", value_parser = size::parse_memory_size)]
    memory: u64,
    /// Where COM1 output goes: `stdout`, `file=PATH` or `off`.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    serial: SerialTarget,
    /// Add the PCI test device (MSI-X doorbell) used by sluice's own tests.
    #[arg(long, hide = true)]
    test_device: bool,
    /// A virtio-blk disk (repeatable): `path=FILE[,readonly=on][,direct=on][,queues=N]
    /// [,queue_size=N][,serial=S][,notify=irq|poll[:us]|sched[:us]|batch[:n[:us]]][,block_size=N]
    /// [,packed=on]` (poll and batch delays at most 10000 us; sched: polled while the I/O
    /// scheduler sees a backlog, for a disk with weight=/iops=/bps=; block_size defaults to the host's;
    /// packed=on offers packed virtqueues, VIRTIO_F_RING_PACKED, default off), or served
    /// by a vhost-user backend: `vhost_user=on,socket=PATH[,queues=N][,queue_size=N]`.
    #[arg(long, value_parser = DiskSpec::parse)]
    disk: Vec<DiskSpec>,
    /// A virtio-net device on a tap (repeatable; created if missing, needs CAP_NET_ADMIN):
    /// `tap=NAME[,mac=52:54:00:..][,queues=N][,notify=..][,packed=on][,standby=on]`
    /// (`standby=on`: VIRTIO_NET_F_STANDBY, for net_failover with a passthrough NIC of the
    /// same MAC; needs `mac=`).
    #[arg(long, value_parser = NetSpec::parse)]
    net: Vec<NetSpec>,
    /// A virtio-rng device fed by getrandom(2): `--rng`, or `--rng=packed=on`.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "",
          value_parser = RngSpec::parse)]
    rng: Option<RngSpec>,
    /// An emulated Intel 82540EM (e1000) NIC on a tap (repeatable; created if missing):
    /// `tap=NAME[,mac=52:54:00:..]`.
    #[arg(long, value_parser = E1000Spec::parse)]
    e1000: Vec<E1000Spec>,
    /// A virtual IOMMU in front of every PCI device: `vtd[,intremap=on|off]` (an emulated Intel
    /// VT-d with a DMAR table, remapping interrupts unless `intremap=off`; the guest needs
    /// `intel_iommu=on`) or `virtio` (a virtio-iommu with a VIOT table; the guest needs
    /// CONFIG_VIRTIO_IOMMU and CONFIG_ACPI_VIOT).
    #[arg(long, value_parser = IommuKind::parse)]
    iommu: Option<IommuKind>,
    /// An emulated NVMe 1.4 controller (repeatable) with one namespace on IMG:
    /// `path=IMG[,queues=N][,serial=S][,direct=on][,dbbuf=off][,requests=FILE]` (queues
    /// 1..=64, default 4; dbbuf=off hides Doorbell Buffer Config, for comparisons; requests=
    /// logs every I/O command for `sluice replay --device`).
    #[arg(long, value_parser = NvmeSpec::parse)]
    nvme: Vec<NvmeSpec>,
    /// A host PCI function assigned with VFIO (repeatable):
    /// `vfio=BDF|SYSFS_PATH[,dma=all|on-demand][,allow_unsafe_interrupts=on]`. The function must
    /// be bound to vfio-pci with every other member of its IOMMU group; dma=all (the default
    /// without --iommu) pins all guest RAM for its DMA (RLIMIT_MEMLOCK / CAP_IPC_LOCK);
    /// dma=on-demand (the default and the only mode with --iommu vtd) maps what the guest's
    /// IOMMU tables map; without host interrupt remapping sluice refuses unless
    /// allow_unsafe_interrupts=on.
    #[arg(long, value_parser = sluice_vmm::config::parse_device)]
    device: Vec<sluice_vmm::config::VfioSpec>,
    /// A TPM 2.0 (CRB interface, ACPI TPM2 table) backed by swtpm: `socket=PATH` (a running
    /// `swtpm socket --tpm2 --ctrl type=unixio,path=PATH`) or `state=DIR` (sluice starts swtpm
    /// with this guest's state in DIR).
    #[arg(long, value_parser = sluice_vmm::config::TpmSpec::parse)]
    tpm: Option<sluice_vmm::config::TpmSpec>,
    /// Write exit counts and per-queue device metrics here when the VM stops: JSON, or
    /// Prometheus text if the name ends in `.prom`.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// NUMA placement of guest RAM, vCPU and device threads: `auto` (the node of the first
    /// assigned device), `off` (default) or a node number.
    #[arg(long, default_value = "off", value_parser = NumaPolicy::parse)]
    numa: NumaPolicy,
    /// Serve the control API (HTTP/JSON, docs/api.yaml) on this Unix socket while the VM runs:
    /// info, pause, resume, shutdown, counters, Prometheus metrics (`sluice ctl`).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Resume the VM saved in this snapshot directory (`sluice ctl snapshot DIR`) instead of
    /// booting a kernel: its vCPU count and RAM size come from the snapshot.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    restore: Option<PathBuf>,
    /// Receive a live-migrated VM (`sluice ctl migrate URL` on the source) at this address,
    /// `unix:PATH` or `tcp:HOST:PORT`, instead of booting a kernel: its vCPU count and RAM
    /// size come from the stream; give it the same devices as the source.
    #[arg(long, value_name = "URL", conflicts_with_all = ["kernel", "initrd", "cmdline", "restore"])]
    migrate_from: Option<String>,
    /// Progress of snapshots (`sluice ctl snapshot`), restores and live migrations (both ends)
    /// on stderr: `bar`, `json` (one object per line, for tools) or `off`. Default: a bar when
    /// stderr is a terminal, nothing otherwise.
    #[arg(long, value_parser = sluice_vmm::progress::ProgressMode::parse)]
    progress: Option<sluice_vmm::progress::ProgressMode>,
    /// Record the run's device I/O into this log for `sluice replay` (docs/replay.md): one
    /// vCPU, in-process virtio-blk and virtio-rng only, devices run inline in the exits.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["restore", "migrate_from", "api_socket"])]
    record: Option<PathBuf>,
}

fn parse_serial(s: &str) -> Result<SerialTarget, String> {
    match s {
        "stdout" => Ok(SerialTarget::Stdout),
        "off" => Ok(SerialTarget::Off),
        _ => match s.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(SerialTarget::File(path.into())),
            _ => Err(format!("expected stdout, off or file=PATH, got `{s}`")),
        },
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Run(args) => contain(Role::Vm, cli.seccomp).and_then(|()| run(*args)),
        Command::Serve(args) => contain(Role::Server, cli.seccomp).and_then(|()| serve::run(args)),
        Command::Bench(args) => std::env::current_exe()
            .context("cannot find the sluice binary")
            .and_then(|sluice| sluice_bench::run(&args, &sluice)),
        Command::HostCheck(args) => host::check(args),
        Command::Vf(args) => host::vf(args),
        Command::Ctl(args) => api::ctl(args),
        Command::Replay(args) => contain(Role::Vm, cli.seccomp).and_then(|()| replay(&args)),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            say(format_args!("sluice: error: {}", error_line(&e)));
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

/// The failure policy (docs/architecture.md, "Failure containment"): panics end the VM or the
/// one vhost-user connection, seccomp filters per thread kind.
fn contain(role: Role, seccomp: SeccompMode) -> anyhow::Result<()> {
    sluice_sandbox::install(sluice_sandbox::Config { role, seccomp })
        .context("cannot set up the sandbox (try --seccomp off)")
}

/// One line on stderr; a full disk or a closed pipe must not end sluice (nor panic it, as
/// `eprintln!` would).
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// stderr for the log: write errors are dropped so that logging can never fail a thread.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One line: the error and each cause not already quoted in the text before it (error types
/// that embed their source in the message would otherwise repeat it).
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        // Reporting a failed write would itself write to stderr, with `eprintln!`.
        .log_internal_errors(false)
        .init();
}

fn run(args: RunArgs) -> anyhow::Result<u8> {
    sluice_vmm::progress::set_mode(
        args.progress
            .unwrap_or_else(sluice_vmm::progress::ProgressMode::default_for_stderr),
    );
    // Opened before the VM boots: a bad path is an error now, not after the guest ran.
    let metrics = match &args.metrics {
        Some(path) => Some(
            File::create(path)
                .with_context(|| format!("cannot write metrics to {}", path.display()))?,
        ),
        None => None,
    };
    // The main job: with nothing asked for, show the spectrum (paravirtual vs emulated).
    if args.asks_for_nothing() {
        // The memfd must outlive every run's kernel load.
        let embedded = guest_kit::embedded_guest_kit()?;
        return spectrum::run(&embedded.path, args.cpus.count, args.memory);
    }
    // Without --kernel, boot the embedded guest kit; the memfd must outlive the kernel load.
    let (kernel, _embedded) = match args.kernel {
        Some(path) => (path, None),
        None => {
            let embedded = guest_kit::embedded_guest_kit()?;
            (embedded.path.clone(), Some(embedded))
        }
    };
    let config = VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        cpus: args.cpus.count,
        memory: args.memory,
        serial: args.serial,
        test_device: args.test_device,
        disks: args.disk,
        nets: args.net,
        rng: args.rng,
        numa: args.numa,
        placement: CpuPlacement {
            isolate: args.isolate,
            ..args.cpus.placement.clone()
        },
        e1000s: args.e1000,
        iommu: args.iommu,
        nvmes: args.nvme,
        vfio: args.device,
        tpm: args.tpm,
    };
    // Before the stop signals are blocked: until a stream arrives, SIGTERM ends the waiting
    // destination like any process.
    let incoming = match &args.migrate_from {
        Some(url) => Some(sluice_vmm::migration::Incoming::accept(url)?),
        None => None,
    };
    // Before the VM's threads start, so that none of them takes the signal.
    let stop_signals = signals::StopSignals::block().context("cannot set up signal handling")?;
    let handle = match &args.restore {
        Some(dir) => {
            let saved = sluice_vmm::snapshot::read(dir)?;
            let config = VmConfig {
                cpus: saved.cpus,
                memory: saved.memory,
                ..config
            };
            VmHandle::restoring(config, dir.clone())
        }
        None => match incoming {
            Some(incoming) => {
                let hello = incoming.hello();
                let config = VmConfig {
                    cpus: hello.cpus,
                    memory: hello.memory,
                    ..config
                };
                VmHandle::migrating_in(config, incoming)
            }
            None => VmHandle::new(config),
        },
    };
    // The signal and API threads below run on the VM's NUMA node too.
    machine::place_threads(handle.config())?;
    let stopper = handle.control().clone();
    stop_signals.on_signal(move |signal| {
        tracing::info!("signal {signal}: stopping the VM");
        stopper.finish(VmOutcome::Stopped { signal });
    })?;
    let _api = match &args.api_socket {
        Some(path) => Some(
            sluice_api::ApiServer::start(path, Arc::new(api::ApiVm(handle.clone())))
                .context("cannot serve the control API")?,
        ),
        None => None,
    };
    let (report, recorded) = machine::run_handle_with(&handle, args.record.as_deref())?;
    if let (Some(summary), Some(path)) = (recorded, &args.record) {
        say(format_args!(
            "sluice: recorded {} exits and {} device page writes into {} ({} bytes) in {} ms; \
             memory hash {:#018x}",
            summary.exits,
            summary.dma_pages,
            path.display(),
            summary.log_bytes,
            summary.elapsed.as_millis(),
            summary.memory_hash
        ));
    }
    tracing::info!(
        setup_us = report.setup_time.as_micros() as u64,
        rss_overhead_kib = report.rss.overhead(),
        guest_ram_resident_kib = report.rss.shmem,
        first_exit_unix_ns = report.first_exit_unix_ns.unwrap_or(0),
        "VM stopped: {:?}",
        report.outcome
    );
    tracing::info!(
        "exits: total {} (pio {}, mmio {}); per device: {:?}",
        report.exits_total,
        report.exits_pio,
        report.exits_mmio,
        report.device_exits
    );
    for vfio in &report.vfio {
        tracing::info!(
            "{}: dma={}, {} bytes mapped at the end, {} at most",
            vfio.name,
            vfio.dma,
            vfio.dma_mapped_bytes,
            vfio.dma_mapped_peak_bytes
        );
        if let Some(why) = &vfio.quarantined {
            say(format_args!("sluice: {} was quarantined: {why}", vfio.name));
        }
    }
    if let (Some(file), Some(path)) = (metrics, &args.metrics) {
        write_metrics(file, path, &report, &handle)?;
    }
    Ok(exit_status(&report.outcome))
}

/// Exit status of a replay that diverged from its log.
const EXIT_REPLAY_DIVERGED: u8 = 124;

fn replay(args: &ReplayArgs) -> anyhow::Result<u8> {
    if args.device {
        return rerun_device(args);
    }
    let report = sluice_vmm::replay::replay(&args.recording, &args.serial)
        .with_context(|| format!("cannot replay {}", args.recording.display()))?;
    if let Some(divergence) = &report.divergence {
        say(format_args!("sluice: {divergence}"));
        return Ok(EXIT_REPLAY_DIVERGED);
    }
    let outcome = report.outcome.unwrap_or(VmOutcome::PowerOff);
    say(format_args!(
        "sluice: replay matched the log: {} exits in {} ms, memory hash {:#018x}",
        report.exits,
        report.elapsed.as_millis(),
        report.memory_hash
    ));
    Ok(exit_status(&outcome))
}

/// `sluice replay --device LOG`: a virtio-blk or NVMe request log (told apart by its magic)
/// re-run against the device model.
fn rerun_device(args: &ReplayArgs) -> anyhow::Result<u8> {
    use sluice_devices::block::rerun::RerunOptions;
    let options = RerunOptions {
        image: args.image.clone(),
        corpus: args.corpus.clone(),
    };
    let report = if is_nvme_request_log(&args.recording) {
        sluice_devices::nvme::rerun::rerun(&args.recording, &options)
    } else {
        sluice_devices::block::rerun::rerun(&args.recording, &options)
    }
    .with_context(|| format!("cannot re-run {}", args.recording.display()))?;
    if let Some(mismatch) = &report.mismatch {
        say(format_args!("sluice: {mismatch}"));
        return Ok(EXIT_REPLAY_DIVERGED);
    }
    let seeds = match &args.corpus {
        Some(dir) => format!(", {} new fuzz seeds in {}", report.seeds, dir.display()),
        None => String::new(),
    };
    let skipped = match report.skipped {
        0 => String::new(),
        n => format!(" ({n} refused by their data-pointer walk not re-run)"),
    };
    say(format_args!(
        "sluice: device re-run matched the log: {} requests in {} ms{skipped}{seeds}",
        report.matched,
        report.elapsed.as_millis()
    ));
    Ok(0)
}

/// Whether `path` starts with the NVMe request log's magic (an unreadable file is left to
/// the blk reader, which reports it).
fn is_nvme_request_log(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| sluice_devices::nvme::trace::is_nvme_log(&magic))
}

impl RunArgs {
    /// No kernel, command line, device, serial or NUMA choice: the main job's spectrum run.
    fn asks_for_nothing(&self) -> bool {
        self.kernel.is_none()
            && self.cmdline.is_empty()
            && self.disk.is_empty()
            && self.net.is_empty()
            && self.rng.is_none()
            && self.e1000.is_empty()
            && self.nvme.is_empty()
            && self.device.is_empty()
            && self.iommu.is_none()
            && self.tpm.is_none()
            && !self.test_device
            && self.numa == NumaPolicy::Off
            && !self.cpus.placement.is_set()
            && !self.isolate
            && self.api_socket.is_none()
            && self.restore.is_none()
            && self.migrate_from.is_none()
            && self.record.is_none()
            && matches!(self.serial, SerialTarget::Stdout)
    }
}

fn write_metrics(
    mut file: File,
    path: &std::path::Path,
    report: &VmReport,
    handle: &VmHandle,
) -> anyhow::Result<()> {
    let text = if path.extension().is_some_and(|e| e == "prom") {
        let mut text = format!(
            "sluice_exits_total{{kind=\"pio\"}} {}\nsluice_exits_total{{kind=\"mmio\"}} {}\n",
            report.exits_pio, report.exits_mmio
        );
        for device in &report.device_metrics {
            text.push_str(&device.to_prometheus());
        }
        for vfio in &report.vfio {
            let labels = format!("device=\"{}\",dma=\"{}\"", vfio.name, vfio.dma);
            text.push_str(&format!(
                "sluice_vfio_dma_mapped_bytes{{{labels}}} {}\n\
                 sluice_vfio_dma_mapped_peak_bytes{{{labels}}} {}\n\
                 sluice_vfio_quarantined{{{labels}}} {}\n",
                vfio.dma_mapped_bytes,
                vfio.dma_mapped_peak_bytes,
                u8::from(vfio.quarantined.is_some()),
            ));
        }
        text.push_str(&handle.qos_disks().prometheus());
        text
    } else {
        let devices: Vec<_> = report.device_metrics.iter().map(|d| d.to_json()).collect();
        let exits: Vec<_> = report
            .device_exits
            .iter()
            .map(|d| serde_json::json!({"device": d.name, "reads": d.reads, "writes": d.writes}))
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({
            "outcome": format!("{:?}", report.outcome),
            "exits": {"total": report.exits_total, "pio": report.exits_pio, "mmio": report.exits_mmio,
                      "per_device": exits},
            "setup_us": report.setup_time.as_micros() as u64,
            "rss_overhead_kib": report.rss.overhead(),
            "devices": devices,
            "vfio": report.vfio.iter()
                .map(|v| serde_json::json!({
                    "device": v.name,
                    "dma": v.dma,
                    "dma_mapped_bytes": v.dma_mapped_bytes,
                    "dma_mapped_peak_bytes": v.dma_mapped_peak_bytes,
                    "dma_mappings_peak": v.dma_mappings_peak,
                    "dma_updates": v.dma_updates,
                    "quarantined": v.quarantined,
                }))
                .collect::<Vec<_>>(),
            "qos": api::qos_json(handle),
        }))?
    };
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write metrics to {}", path.display()))
}

/// Maps how the VM ended to sluice's exit status; resets and crashes are also explained on stderr.
pub(crate) fn exit_status(outcome: &VmOutcome) -> u8 {
    match outcome {
        VmOutcome::PowerOff => 0,
        VmOutcome::DebugExit(v) => *v,
        VmOutcome::Reset => {
            say(format_args!(
                "sluice: the guest requested a reset; the VM was stopped"
            ));
            EXIT_GUEST_RESET
        }
        VmOutcome::Crash(why) => {
            say(format_args!("sluice: the VM crashed: {why}"));
            EXIT_GUEST_CRASH
        }
        VmOutcome::Shutdown => 0,
        VmOutcome::Migrated => {
            say(format_args!(
                "sluice: migrated; the VM runs on at the destination"
            ));
            0
        }
        VmOutcome::Stopped { signal } => {
            say(format_args!("sluice: stopped by signal {signal}"));
            // The shell's convention for a process ended by a signal.
            128u8.saturating_add(u8::try_from(*signal).unwrap_or(0))
        }
    }
}
