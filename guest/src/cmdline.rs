//! Command-line parsing (contract: `w=<kind>[:key=value]...`, `timeout_ms=N`, `ring=0|3`,
//! `vq=split|packed`, `clock=tsc|virtual`, `quiet`).
//! Unknown top-level tokens are ignored (loaders add their own); a malformed `w=` is an error
//! that ends the run with status 5.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// How completions are noticed (and, for `Batch`, how submissions are grouped).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Notify per request; wait for MSI-X interrupts (HLT).
    Irq,
    /// Notify per `batch` requests (blk; default qd); poll the used ring, no interrupts.
    Poll,
    /// Submit `batch` requests per notify; wait for interrupts.
    Batch,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Irq => "irq",
            Mode::Poll => "poll",
            Mode::Batch => "batch",
        }
    }
}

/// Virtqueue layout the drivers ask for (`vq=`): packed is used only if the device offers
/// VIRTIO_F_RING_PACKED; the RESULT lines report what was negotiated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VqLayout {
    Split,
    Packed,
}

impl VqLayout {
    pub fn name(self) -> &'static str {
        match self {
            VqLayout::Split => "split",
            VqLayout::Packed => "packed",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BlkOp {
    Read,
    Write,
    RandRead,
    RandWrite,
    Verify,
    /// Read the span and compare it with the verify pattern; writes nothing.
    Check,
}

impl BlkOp {
    pub fn name(self) -> &'static str {
        match self {
            BlkOp::Read => "read",
            BlkOp::Write => "write",
            BlkOp::RandRead => "randread",
            BlkOp::RandWrite => "randwrite",
            BlkOp::Verify => "verify",
            BlkOp::Check => "check",
        }
    }

    /// Verify and check both read the pattern back over the whole span.
    pub fn compares(self) -> bool {
        matches!(self, BlkOp::Verify | BlkOp::Check)
    }

    pub fn writes(self) -> bool {
        matches!(self, BlkOp::Write | BlkOp::RandWrite)
    }

    pub fn random(self) -> bool {
        matches!(self, BlkOp::RandRead | BlkOp::RandWrite)
    }
}

#[derive(Clone, Debug)]
pub struct BlkParams {
    pub op: BlkOp,
    pub bs: u32,
    pub qd: u32,
    pub queues: u32,
    pub ops: u64,
    pub dur_ms: Option<u64>,
    pub mode: Mode,
    pub batch: u32,
    pub event_idx: bool,
    pub seed: u64,
    pub span_mb: Option<u64>,
    pub dev: usize,
    /// CPUs driving the queues (queue i by CPU i % cpus); `None`: the BSP drives them all.
    pub cpus: Option<u32>,
    /// Mixed I/O priorities (virtio-blk): the first N slots of each queue send requests with
    /// ioprio class real-time, the others class idle; `None`: ioprio 0 on every request.
    pub hi_slots: Option<u32>,
}

/// `w=nvme`: the blk workload's knobs on an NVMe controller, plus its own.
#[derive(Clone, Debug)]
pub struct NvmeParams {
    pub blk: BlkParams,
    /// Use Doorbell Buffer Config (shadow doorbells + EventIdx) when the controller offers it.
    pub dbbuf: bool,
    /// A hostile command issued on the first I/O queue before the workload (`hostile=`).
    pub hostile: Option<NvmeHostile>,
}

/// What `w=nvme:hostile=...` makes the controller do before the normal workload.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NvmeHostile {
    /// One Read whose PRP1 points far beyond guest RAM (`hostile=dma_outside`): the device is
    /// asked to DMA where the VMM mapped nothing; the host's IOMMU must refuse it.
    DmaOutside,
    /// One Read into a page of guest RAM the kit never gave the device
    /// (`hostile=dma_unmapped`): behind `iommu=vtd` the guest's own IOMMU must refuse it,
    /// leave the page untouched and record a fault naming the device and the page.
    DmaUnmapped,
    /// The first I/O queue's MSI-X vector in remappable format through an IRTE with a
    /// reserved bit set (`hostile=bad_irte`, behind `iommu=vtd` with interrupt remapping):
    /// the unit must refuse the interrupt and record the fault; a repaired IRTE then
    /// delivers.
    BadIrte,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum NetDir {
    Tx,
    Rx,
    Echo,
}

impl NetDir {
    pub fn name(self) -> &'static str {
        match self {
            NetDir::Tx => "tx",
            NetDir::Rx => "rx",
            NetDir::Echo => "echo",
        }
    }
}

#[derive(Clone, Debug)]
pub struct NetParams {
    pub dir: NetDir,
    pub size: u32,
    pub frames: u64,
    pub mode: Mode,
    pub dev: usize,
}

#[derive(Clone, Debug)]
pub enum Workload {
    Info,
    Blk(BlkParams),
    Nvme(NvmeParams),
    Rng {
        bytes: u64,
        dev: usize,
    },
    Net(NetParams),
    /// The net workload on an e1000 (82540EM); polled only.
    E1000(NetParams),
    /// Every CPU adds 1 to a shared counter `iters` times.
    Smp {
        iters: u64,
    },
    /// Puts every PCI function behind the virtio-iommu in one identity-mapped domain.
    Viommu,
    /// TPM 2.0 over CRB: Startup, GetRandom, PCR 16 read, extend, read; with `hold_ms`, then
    /// waits that long (a snapshot or migration happens meanwhile) and reads PCR 16 again.
    Tpm {
        hold_ms: u64,
    },
    /// Spins `ms` milliseconds and reports the gaps between TSC reads.
    Jitter {
        ms: u64,
    },
    /// Waits up to `wait_ms` for the host's hot-plug eject request and acknowledges it.
    Eject {
        wait_ms: u64,
    },
}

pub struct Config {
    pub workloads: Vec<Workload>,
    pub timeout_ms: u64,
    pub quiet: bool,
    /// The privilege level the workloads' data paths run at (`ring=0|3`, default 3).
    pub ring: u8,
    /// The virtqueue layout asked for (`vq=split|packed`, default split).
    pub vq: VqLayout,
    /// Every device behind the DMAR's VT-d, DMA buffers only mapped (`iommu=vtd`).
    pub iommu: bool,
    /// `clock=virtual`: time from a counter, not the TSC, and no LAPIC wake-up timer, so
    /// that a run depends only on its device inputs (sluice's record and replay).
    pub virtual_clock: bool,
}

/// Default ring: on kvm_pvm CPL3 code runs natively, CPL0 code in KVM's emulator.
const DEFAULT_RING: u8 = 3;

/// Completion mode when `mode=` is not given: polling in ring 3 (each interrupt that reaches
/// ring 3 costs ~75 µs on kvm_pvm), interrupts in ring 0 (where a poll loop is emulated).
fn default_mode(ring: u8) -> Mode {
    if ring == 3 {
        Mode::Poll
    } else {
        Mode::Irq
    }
}

fn number(key: &str, value: &str) -> Result<u64, String> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|_| alloc::format!("{key}={value} is not a number"))
}

fn bounded(key: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    let n = number(key, value)?;
    if n < min || n > max {
        return Err(alloc::format!("{key}={n} out of range {min}..={max}"));
    }
    Ok(n)
}

fn mode(value: &str) -> Result<Mode, String> {
    match value {
        "irq" => Ok(Mode::Irq),
        "poll" => Ok(Mode::Poll),
        "batch" => Ok(Mode::Batch),
        _ => Err(alloc::format!("mode={value} unknown")),
    }
}

fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "1" | "true" => Ok(true),
        "off" | "0" | "false" => Ok(false),
        _ => Err(alloc::format!("{key}={value}: expected on|off")),
    }
}

fn key_values(rest: &str) -> Result<Vec<(&str, &str)>, String> {
    rest.split(':')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .ok_or_else(|| alloc::format!("'{kv}' is not key=value"))
        })
        .collect()
}

fn parse_blk(rest: &str, default_mode: Mode) -> Result<Workload, String> {
    blk_params("blk", rest, default_mode).map(Workload::Blk)
}

/// `w=nvme`: blk's keys (the driver polls: `mode` other than `poll` and `event_idx` are
/// refused) plus `dbbuf=on|off` (default on) and `hostile=dma_outside|dma_unmapped|bad_irte`.
fn parse_nvme(rest: &str) -> Result<Workload, String> {
    let mut dbbuf = true;
    let mut hostile = None;
    let mut blk_keys = Vec::new();
    for (key, value) in key_values(rest)? {
        match key {
            "dbbuf" => dbbuf = on_off(key, value)?,
            "hostile" => {
                hostile = match value {
                    "dma_outside" => Some(NvmeHostile::DmaOutside),
                    "dma_unmapped" => Some(NvmeHostile::DmaUnmapped),
                    "bad_irte" => Some(NvmeHostile::BadIrte),
                    _ => return Err(alloc::format!("nvme: hostile={value} unknown")),
                }
            }
            "mode" if value != "poll" => {
                return Err(alloc::format!(
                    "nvme: mode={value}: the NVMe driver polls its completion queues"
                ))
            }
            "event_idx" => return Err("nvme: event_idx is virtio's; use dbbuf=on|off".into()),
            _ => blk_keys.push(alloc::format!("{key}={value}")),
        }
    }
    let blk = blk_params("nvme", &blk_keys.join(":"), Mode::Poll)?;
    Ok(Workload::Nvme(NvmeParams {
        blk,
        dbbuf,
        hostile,
    }))
}

/// The blk workload's keys (shared by `w=blk` and `w=nvme`; `kind` names it in errors).
fn blk_params(kind: &str, rest: &str, default_mode: Mode) -> Result<BlkParams, String> {
    let mut p = BlkParams {
        op: BlkOp::Read,
        bs: 4096,
        qd: 1,
        queues: 1,
        ops: 1000,
        dur_ms: None,
        mode: default_mode,
        batch: 0,
        event_idx: true,
        seed: 1,
        span_mb: None,
        dev: 0,
        cpus: None,
        hi_slots: None,
    };
    for (key, value) in key_values(rest)? {
        match key {
            "op" => {
                p.op = match value {
                    "read" => BlkOp::Read,
                    "write" => BlkOp::Write,
                    "randread" => BlkOp::RandRead,
                    "randwrite" => BlkOp::RandWrite,
                    "verify" => BlkOp::Verify,
                    "check" => BlkOp::Check,
                    _ => return Err(alloc::format!("op={value} unknown")),
                }
            }
            "bs" => {
                let bs = bounded(key, value, 512, 1 << 20)?;
                if bs % 512 != 0 {
                    return Err(alloc::format!("bs={bs} is not a multiple of 512"));
                }
                p.bs = bs as u32;
            }
            "qd" => p.qd = bounded(key, value, 1, 256)? as u32,
            "queues" => p.queues = bounded(key, value, 1, 16)? as u32,
            "ops" => p.ops = bounded(key, value, 1, u64::MAX)?,
            "dur_ms" => p.dur_ms = Some(bounded(key, value, 1, 3_600_000)?),
            "mode" => p.mode = mode(value)?,
            "batch" => p.batch = bounded(key, value, 1, 256)? as u32,
            "event_idx" => p.event_idx = on_off(key, value)?,
            "seed" => p.seed = number(key, value)?,
            "span_mb" => p.span_mb = Some(bounded(key, value, 1, 1 << 24)?),
            "dev" => p.dev = bounded(key, value, 0, 63)? as usize,
            "cpus" => p.cpus = Some(bounded(key, value, 1, 16)? as u32),
            "hi_slots" => p.hi_slots = Some(bounded(key, value, 1, 256)? as u32),
            _ => return Err(alloc::format!("{kind}: unknown key {key}")),
        }
    }
    if let Some(cpus) = p.cpus.filter(|&cpus| cpus > p.queues) {
        return Err(alloc::format!(
            "{kind}: cpus={cpus} exceeds queues={}: each CPU drives its own queue",
            p.queues
        ));
    }
    if let Some(hi) = p.hi_slots.filter(|&hi| hi > p.qd) {
        return Err(alloc::format!("{kind}: hi_slots={hi} exceeds qd={}", p.qd));
    }
    if p.batch == 0 {
        p.batch = p.qd;
    }
    Ok(p)
}

fn parse_rng(rest: &str) -> Result<Workload, String> {
    let mut bytes = 4096;
    let mut dev = 0;
    for (key, value) in key_values(rest)? {
        match key {
            "bytes" => bytes = bounded(key, value, 1, 64 << 20)?,
            "dev" => dev = bounded(key, value, 0, 63)? as usize,
            _ => return Err(alloc::format!("rng: unknown key {key}")),
        }
    }
    Ok(Workload::Rng { bytes, dev })
}

fn parse_net(rest: &str, default_mode: Mode) -> Result<Workload, String> {
    let mut p = NetParams {
        dir: NetDir::Echo,
        size: 1500,
        frames: 100,
        mode: default_mode,
        dev: 0,
    };
    for (key, value) in key_values(rest)? {
        match key {
            "dir" => {
                p.dir = match value {
                    "tx" => NetDir::Tx,
                    "rx" => NetDir::Rx,
                    "echo" => NetDir::Echo,
                    _ => return Err(alloc::format!("dir={value} unknown")),
                }
            }
            "size" => p.size = bounded(key, value, 46, 1500)? as u32,
            "frames" => p.frames = bounded(key, value, 1, u64::MAX)?,
            "mode" => p.mode = mode(value)?,
            "dev" => p.dev = bounded(key, value, 0, 63)? as usize,
            _ => return Err(alloc::format!("net: unknown key {key}")),
        }
    }
    Ok(Workload::Net(p))
}

/// `w=e1000:` takes the net workload's keys; its driver polls (the kit routes no INTx), so
/// `mode` is poll whatever the ring, and asking for another mode is an error.
fn parse_e1000(rest: &str) -> Result<Workload, String> {
    let Workload::Net(p) = parse_net(rest, Mode::Poll)? else {
        return Err("e1000: bad parameters".into());
    };
    if p.mode != Mode::Poll {
        return Err(alloc::format!(
            "e1000: mode={} unsupported, the driver polls",
            p.mode.name()
        ));
    }
    Ok(Workload::E1000(p))
}

fn parse_smp(rest: &str) -> Result<Workload, String> {
    let mut iters = 10_000;
    for (key, value) in key_values(rest)? {
        match key {
            "iters" => iters = bounded(key, value, 1, 1 << 32)?,
            _ => return Err(alloc::format!("smp: unknown key {key}")),
        }
    }
    Ok(Workload::Smp { iters })
}

fn parse_jitter(rest: &str) -> Result<Workload, String> {
    let mut ms = 1000;
    for (key, value) in key_values(rest)? {
        match key {
            "ms" => ms = bounded(key, value, 1, 600_000)?,
            _ => return Err(alloc::format!("jitter: unknown key {key}")),
        }
    }
    Ok(Workload::Jitter { ms })
}

fn parse_eject(rest: &str) -> Result<Workload, String> {
    let mut wait_ms = 60_000;
    for (key, value) in key_values(rest)? {
        match key {
            "wait" => wait_ms = bounded(key, value, 1, 600_000)?,
            _ => return Err(alloc::format!("eject: unknown key {key}")),
        }
    }
    Ok(Workload::Eject { wait_ms })
}

fn parse_tpm(rest: &str) -> Result<Workload, String> {
    let mut hold_ms = 0;
    for (key, value) in key_values(rest)? {
        match key {
            "hold" => hold_ms = bounded(key, value, 0, 600_000)?,
            _ => return Err(alloc::format!("tpm: unknown key {key}")),
        }
    }
    Ok(Workload::Tpm { hold_ms })
}

fn parse_workload(spec: &str, default_mode: Mode) -> Result<Workload, String> {
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    match kind {
        "info" => Ok(Workload::Info),
        "blk" => parse_blk(rest, default_mode),
        "nvme" => parse_nvme(rest),
        "rng" => parse_rng(rest),
        "net" => parse_net(rest, default_mode),
        "e1000" => parse_e1000(rest),
        "smp" => parse_smp(rest),
        "viommu" if rest.is_empty() => Ok(Workload::Viommu),
        "viommu" => Err(alloc::format!("w=viommu takes no keys, got '{rest}'")),
        "tpm" => parse_tpm(rest),
        "jitter" => parse_jitter(rest),
        "eject" => parse_eject(rest),
        _ => Err(alloc::format!("unknown workload kind '{kind}'")),
    }
}

/// Parses the whole command line.
pub fn parse(cmdline: &str) -> Result<Config, String> {
    let mut config = Config {
        workloads: Vec::new(),
        timeout_ms: 5000,
        quiet: false,
        ring: DEFAULT_RING,
        vq: VqLayout::Split,
        iommu: false,
        virtual_clock: false,
    };
    // `ring=` applies to every workload wherever it stands, and picks their default mode.
    for token in cmdline.split_ascii_whitespace() {
        if let Some(value) = token.strip_prefix("ring=") {
            config.ring = match value {
                "0" => 0,
                "3" => 3,
                _ => return Err(alloc::format!("ring={value}: expected 0 or 3")),
            };
        }
    }
    let default_mode = default_mode(config.ring);
    for token in cmdline.split_ascii_whitespace() {
        if token.starts_with("ring=") {
            continue;
        }
        if let Some(spec) = token.strip_prefix("w=") {
            config.workloads.push(parse_workload(spec, default_mode)?);
        } else if let Some(value) = token.strip_prefix("vq=") {
            config.vq = match value {
                "split" => VqLayout::Split,
                "packed" => VqLayout::Packed,
                _ => return Err(alloc::format!("vq={value}: expected split or packed")),
            };
        } else if let Some(value) = token.strip_prefix("timeout_ms=") {
            config.timeout_ms = bounded("timeout_ms", value, 1, 3_600_000)?;
        } else if let Some(value) = token.strip_prefix("iommu=") {
            config.iommu = match value {
                "vtd" => true,
                "off" => false,
                _ => return Err(alloc::format!("iommu={value}: expected vtd or off")),
            };
        } else if let Some(value) = token.strip_prefix("clock=") {
            config.virtual_clock = match value {
                "virtual" => true,
                "tsc" => false,
                _ => return Err(alloc::format!("clock={value}: expected tsc or virtual")),
            };
        } else if token == "quiet" {
            config.quiet = true;
        } else {
            crate::say!("ignoring command-line token {}", token.to_string());
        }
    }
    if config.workloads.is_empty() {
        config.workloads.push(Workload::Info);
    }
    Ok(config)
}
