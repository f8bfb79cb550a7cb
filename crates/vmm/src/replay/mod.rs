//! Record and replay of a VM's device I/O (`sluice run --record FILE`, `sluice replay FILE`;
//! docs/replay.md says what is and is not deterministic, and why).
//!
//! Both sides run the *deterministic device mode*: one vCPU, no ioeventfd (every doorbell is an
//! exit), virtio queues processed inline on the vCPU during that exit (storage I/O completed
//! before the vCPU re-enters), MSIs sent with KVM_SIGNAL_MSI from the vCPU during the exit.
//! Device effects then happen only at exits, and an exit is identified by its ordinal, kind,
//! address, size and the vCPU's RIP and register hash.
//!
//! * [`Recorder`] is the vCPU's [`ExitHook`] while recording: it lets the buses handle each
//!   exit, then logs the exit, every page a device acquired for writing during it (through
//!   sluice-dma's device dirty log, with the page's content when the exit ends) and every MSI
//!   sent during it ([`RecordingMsi`]). Before the first instruction it logs the VM's shape,
//!   the boot vCPU's entry and every non-zero RAM page; at the end the outcome and a hash of
//!   all RAM.
//! * [`replay`] builds a VM from the log alone (no kernel, disk image or tap) and runs it with
//!   [`Replayer`] as the hook: each exit is checked against the log and answered from it (the
//!   value of a read), the logged pages and MSIs are applied at the same point, COM1 output is
//!   re-created from the logged port writes. The first difference stops the VM and is reported
//!   as a [`Divergence`].

pub mod format;
pub mod fuzz;

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd};
use sluice_bus::irq::{MsiMessage, MsiSink};
use sluice_devices::platform::SerialOutput;

use crate::boot::{BootInfo, BootProtocol};
use crate::machine::{SerialTarget, VmConfig, VmError};
use crate::memory::GuestRam;
use crate::vcpu::{ExitDispatch, ExitHook, ExitKind, VcpuThread, VmOutcome};
use format::{EndRecord, Event, ExitRecord, LogMeta, LogReader, LogWriter, PAGE_SIZE};

/// Why a configuration cannot be recorded deterministically; `None` if it can.
pub fn refusal(config: &VmConfig) -> Option<String> {
    let why = if config.cpus != 1 {
        "more than one vCPU (the interleaving of vCPUs is not logged)"
    } else if config.disks.iter().any(|d| d.vhost_user) {
        "a vhost-user disk (another process writes guest memory, outside any exit)"
    } else if config.disks.iter().any(|d| d.qos.is_some()) {
        "a disk behind the I/O scheduler (weight=, iops=, bps=: its grants come from a timer \
         thread, between exits)"
    } else if !config.vfio.is_empty() {
        "a VFIO device (the hardware writes guest memory and interrupts at any time)"
    } else if !config.e1000s.is_empty() {
        "an e1000 (its receive side runs on a worker thread that writes guest memory whenever \
         a frame arrives; only virtio-net polls its tap inside exits)"
    } else if !config.nvmes.is_empty() {
        "an NVMe controller (its I/O queues run on worker threads; not made inline yet)"
    } else if config.iommu.is_some() {
        "a virtual IOMMU (device writes are logged by guest physical address)"
    } else if config.test_device {
        "the PCI test device"
    } else {
        return None;
    };
    Some(format!("--record cannot make this VM deterministic: {why}"))
}

/// Wraps the recorder and the hook interface for `machine::run_handle_with`.
pub struct Recorder {
    state: Mutex<RecordState>,
    ram: Mutex<Option<GuestRam>>,
    page_log: Arc<sluice_dma::dirty::PageLog>,
    started: Instant,
}

struct RecordState {
    /// The log file until `begin` writes its meta chunk, then the writer.
    file: Option<(File, LogMeta)>,
    writer: Option<LogWriter<BufWriter<File>>>,
    /// The exit between `access` and `complete`.
    pending: Option<ExitRecord>,
    /// MSIs devices sent during the current exit.
    msis: Vec<MsiMessage>,
    exits: u64,
    dma_pages: u64,
    error: Option<String>,
}

impl Recorder {
    /// Creates the log at `path` for a VM of `config` over `ram` and turns sluice-dma's device
    /// dirty log on (the recorder's source of device writes).
    pub fn create(path: &Path, config: &VmConfig, ram: &GuestRam) -> Result<Arc<Self>, VmError> {
        if let Some(why) = refusal(config) {
            return Err(crate::machine::device_err("record", why));
        }
        let file = File::create(path).map_err(|e| {
            crate::machine::device_err("record", format!("cannot create {}: {e}", path.display()))
        })?;
        let meta = LogMeta {
            memory: config.memory,
            cpus: config.cpus,
            cmdline: config.cmdline.clone(),
            devices: describe_devices(config),
            entry: 0,
            protocol: String::new(),
            protocol_pointer: 0,
        };
        let regions = ram_regions(ram);
        let page_log = Arc::new(sluice_dma::dirty::PageLog::new(regions, ram.size));
        Ok(Arc::new(Self {
            state: Mutex::new(RecordState {
                file: Some((file, meta)),
                writer: None,
                pending: None,
                msis: Vec::new(),
                exits: 0,
                dma_pages: 0,
                error: None,
            }),
            ram: Mutex::new(Some(ram.clone())),
            page_log,
            started: Instant::now(),
        }))
    }

    /// Logs the boot entry and the initial RAM (every non-zero page), then starts logging
    /// device writes. Called after the kernel is loaded, before the vCPU starts.
    pub fn begin(&self, boot: &BootInfo, ram: &GuestRam) -> Result<(), VmError> {
        let mut state = self.lock();
        let io = |e: std::io::Error| crate::machine::device_err("record", e);
        let (file, mut meta) = state
            .file
            .take()
            .ok_or_else(|| io(std::io::Error::other("begun twice")))?;
        (meta.protocol, meta.protocol_pointer) = match boot.protocol {
            BootProtocol::Pvh { start_info } => ("pvh".into(), start_info.0),
            BootProtocol::LinuxBoot64 { zero_page } => ("linux64".into(), zero_page.0),
        };
        meta.entry = boot.entry.0;
        let mut writer = LogWriter::new(BufWriter::new(file), &meta).map_err(io)?;
        for_each_nonzero_page(ram, |page, bytes| {
            writer.push(&Event::InitPage {
                page,
                bytes: bytes.into(),
            })
        })
        .map_err(io)?;
        state.writer = Some(writer);
        sluice_dma::dirty::start(self.page_log.clone());
        Ok(())
    }

    /// An MSI sink that sends through `inner` and logs the message at the current exit.
    pub fn msi_sink(self: &Arc<Self>, inner: Arc<dyn MsiSink>) -> Arc<dyn MsiSink> {
        Arc::new(RecordingMsi {
            recorder: self.clone(),
            inner,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecordState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs the outcome and the RAM hash, and closes the log. Returns (exits, device pages,
    /// log bytes).
    pub fn finish(&self, outcome: &VmOutcome) -> Result<RecordSummary, VmError> {
        sluice_dma::dirty::stop();
        let ram = self
            .ram
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut state = self.lock();
        if let Some(error) = state.error.take() {
            return Err(crate::machine::device_err("record", error));
        }
        let memory_hash = ram.as_ref().map_or(0, memory_hash);
        let (outcome, value) = outcome_code(outcome);
        let end = EndRecord {
            outcome,
            value,
            exits: state.exits,
            memory_hash,
        };
        let io = |e: std::io::Error| crate::machine::device_err("record", e);
        let exits = state.exits;
        let dma_pages = state.dma_pages;
        let writer = state
            .writer
            .as_mut()
            .ok_or_else(|| io(std::io::Error::other("the VM never started")))?;
        writer.push(&Event::End(end)).map_err(io)?;
        writer.finish().map_err(io)?;
        Ok(RecordSummary {
            exits,
            dma_pages,
            log_bytes: writer.written,
            memory_hash,
            elapsed: self.started.elapsed(),
        })
    }
}

/// What a recording cost.
#[derive(Debug, Clone, Copy)]
pub struct RecordSummary {
    pub exits: u64,
    pub dma_pages: u64,
    pub log_bytes: u64,
    pub memory_hash: u64,
    pub elapsed: std::time::Duration,
}

impl ExitHook for Recorder {
    fn access(&self, kind: ExitKind, addr: u64, data: &mut [u8], d: &ExitDispatch) {
        let bus = match kind {
            ExitKind::PioIn | ExitKind::PioOut => &d.pio,
            ExitKind::MmioRead | ExitKind::MmioWrite => &d.mmio,
        };
        if kind.is_read() {
            bus.read(addr, data);
        } else {
            bus.write(addr, data);
        }
        let mut state = self.lock();
        state.exits += 1;
        // Completed with the registers in `complete`.
        state.pending = Some(ExitRecord {
            kind,
            addr,
            data: data.to_vec(),
            rip: 0,
            regs_hash: 0,
        });
    }

    fn complete(&self, vcpu: &VcpuFd, _d: &ExitDispatch) {
        let ram = self.ram.lock().unwrap_or_else(PoisonError::into_inner);
        let mut state = self.lock();
        let Some(mut exit) = state.pending.take() else {
            return;
        };
        (exit.rip, exit.regs_hash) = registers(vcpu);
        let pages = self.page_log.take_round();
        let mut result = push(&mut state.writer, &Event::Exit(exit));
        for page in pages {
            let mut bytes = vec![0u8; PAGE_SIZE];
            if let Some(ram) = ram.as_ref() {
                if let Err(e) = read_page(ram, page, &mut bytes) {
                    result = result.and(Err(e));
                }
            }
            state.dma_pages += 1;
            result = result.and_then(|()| {
                push(
                    &mut state.writer,
                    &Event::DmaPage {
                        page,
                        bytes: bytes.into(),
                    },
                )
            });
        }
        for msg in std::mem::take(&mut state.msis) {
            result = result.and_then(|()| {
                push(
                    &mut state.writer,
                    &Event::Msi {
                        address: msg.address,
                        data: msg.data,
                    },
                )
            });
        }
        if let Err(e) = result {
            if state.error.is_none() {
                state.error = Some(format!("cannot write the log: {e}"));
            }
        }
    }
}

/// Appends to the log once it has begun (exits before `begin` cannot happen: no vCPU runs).
fn push(writer: &mut Option<LogWriter<BufWriter<File>>>, event: &Event) -> std::io::Result<()> {
    match writer {
        Some(writer) => writer.push(event),
        None => Err(std::io::Error::other("an exit before the log began")),
    }
}

/// Sends through the VM's MSI sink and notes the message for the current exit's record.
struct RecordingMsi {
    recorder: Arc<Recorder>,
    inner: Arc<dyn MsiSink>,
}

impl MsiSink for RecordingMsi {
    fn send(&self, msg: MsiMessage) -> std::io::Result<()> {
        self.recorder.lock().msis.push(msg);
        self.inner.send(msg)
    }
}

fn registers(vcpu: &VcpuFd) -> (u64, u64) {
    match vcpu.get_regs() {
        Ok(r) => (
            r.rip,
            format::regs_hash(&[
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
            ]),
        ),
        Err(_) => (0, 0),
    }
}

fn outcome_code(outcome: &VmOutcome) -> (u8, u64) {
    match outcome {
        VmOutcome::PowerOff => (0, 0),
        VmOutcome::Reset => (1, 0),
        VmOutcome::DebugExit(v) => (2, u64::from(*v)),
        _ => (3, 0),
    }
}

fn describe_devices(config: &VmConfig) -> Vec<String> {
    let mut devices: Vec<String> = config
        .disks
        .iter()
        .map(|d| format!("virtio-blk {}", d.path.display()))
        .collect();
    devices.extend(
        config
            .nets
            .iter()
            .map(|n| format!("virtio-net tap {}", n.tap)),
    );
    if config.rng.is_some() {
        devices.push("virtio-rng".into());
    }
    devices
}

fn ram_regions(ram: &GuestRam) -> Vec<sluice_dma::dirty::RamRegion> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    ram.memory
        .iter()
        .map(|region| sluice_dma::dirty::RamRegion {
            gpa: region.start_addr().0,
            len: region.len(),
            file_offset: region.file_offset().map_or(0, |f| f.start()),
        })
        .collect()
}

/// The guest physical address of RAM file page `page`.
fn page_address(ram: &GuestRam, page: u64) -> Option<vm_memory::GuestAddress> {
    let offset = page.checked_mul(PAGE_SIZE as u64)?;
    ram_regions(ram)
        .into_iter()
        .find(|r| (r.file_offset..r.file_offset + r.len).contains(&offset))
        .map(|r| vm_memory::GuestAddress(r.gpa + (offset - r.file_offset)))
}

/// Reads RAM file page `page` through the VMM's mapping (a vCPU thread's seccomp filter has
/// no pread on the RAM file).
fn read_page(ram: &GuestRam, page: u64, bytes: &mut [u8]) -> std::io::Result<()> {
    use vm_memory::Bytes;
    let addr = page_address(ram, page).ok_or_else(|| std::io::Error::other("page outside RAM"))?;
    ram.memory
        .read_slice(bytes, addr)
        .map_err(std::io::Error::other)
}

/// Writes RAM file page `page` through the VMM's mapping.
fn write_page(ram: &GuestRam, page: u64, bytes: &[u8]) -> Result<(), String> {
    use vm_memory::Bytes;
    let addr = page_address(ram, page).ok_or(format!("page {page} outside guest RAM"))?;
    ram.memory
        .write_slice(bytes, addr)
        .map_err(|e| format!("cannot write guest RAM: {e}"))
}

/// Calls `f` with every non-zero page of the RAM file (page number, bytes).
fn for_each_nonzero_page(
    ram: &GuestRam,
    mut f: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    const BLOCK: usize = 1 << 20;
    let mut block = vec![0u8; BLOCK];
    let mut offset = 0u64;
    while offset < ram.size {
        let len = BLOCK.min((ram.size - offset) as usize);
        ram.file.read_exact_at(&mut block[..len], offset)?;
        for (i, page) in block[..len].chunks(PAGE_SIZE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                f(offset / PAGE_SIZE as u64 + i as u64, page)?;
            }
        }
        offset += len as u64;
    }
    Ok(())
}

/// FNV-1a (64-bit words) of the whole RAM file: the final-state comparison of a replay.
pub fn memory_hash(ram: &GuestRam) -> u64 {
    const BLOCK: usize = 1 << 20;
    let mut block = vec![0u8; BLOCK];
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut offset = 0u64;
    while offset < ram.size {
        let len = BLOCK.min((ram.size - offset) as usize);
        if ram.file.read_exact_at(&mut block[..len], offset).is_err() {
            return 0;
        }
        hash ^= crate::migration::protocol::checksum(0, len as u32, &block[..len]);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        offset += len as u64;
    }
    hash
}

/// Where a replay first differed from its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// 1-based ordinal of the exit at which it happened (0: before the first exit).
    pub exit: u64,
    pub rip: u64,
    pub what: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replay diverged at exit #{} (rip {:#x}): {}",
            self.exit, self.rip, self.what
        )
    }
}

/// How a replay went.
#[derive(Debug)]
pub struct ReplayReport {
    /// The recorded outcome, reached by the replay (None if it diverged first).
    pub outcome: Option<VmOutcome>,
    pub divergence: Option<Divergence>,
    pub exits: u64,
    pub memory_hash: u64,
    pub recorded_memory_hash: u64,
    pub elapsed: std::time::Duration,
}

/// Errors before the replay runs: an unreadable, corrupt or unsupported log.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot open the log {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] format::LogError),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The replay side of the hook: answers exits from the log.
pub struct Replayer {
    state: Mutex<ReplayState>,
    ram: GuestRam,
    vm: Arc<kvm_ioctls::VmFd>,
}

struct ReplayState {
    reader: LogReader<BufReader<File>>,
    /// An event read ahead (the one after an exit's effects).
    peeked: Option<Event>,
    exits: u64,
    serial: SerialOutput,
    /// COM1's LCR divisor latch bit: port 0x3f8 writes are output only without it.
    dlab: bool,
    divergence: Option<Divergence>,
    end: Option<EndRecord>,
    /// The exit `access` matched, completed by `complete`.
    current: Option<ExitRecord>,
}

impl ReplayState {
    fn next(&mut self) -> Result<Option<Event>, String> {
        match self.peeked.take() {
            Some(event) => Ok(Some(event)),
            None => self.reader.next_event().map_err(|e| e.to_string()),
        }
    }
}

const COM1: u64 = 0x3f8;

impl Replayer {
    fn diverge(&self, state: &mut ReplayState, rip: u64, what: String, d: &ExitDispatch) {
        if state.divergence.is_none() {
            state.divergence = Some(Divergence {
                exit: state.exits,
                rip,
                what,
            });
        }
        d.control
            .finish(VmOutcome::Crash("replay diverged from the log".into()));
    }

    /// Re-creates COM1's output from the guest's port writes.
    fn console(state: &mut ReplayState, addr: u64, data: &[u8]) {
        match (addr, data.first()) {
            (a, Some(&byte)) if a == COM1 + 3 => state.dlab = byte & 0x80 != 0,
            (COM1, Some(&byte)) if !state.dlab => {
                let _ = state.serial.write_all(&[byte]);
            }
            _ => {}
        }
    }

    /// Applies the effects logged after the current exit, up to the next exit or the end.
    fn apply_effects(&self, state: &mut ReplayState, d: &ExitDispatch) -> Result<(), String> {
        loop {
            match state.next()? {
                None => return Err("the log ends without an end record".into()),
                Some(Event::DmaPage { page, bytes }) => {
                    write_page(&self.ram, page, &bytes)?;
                }
                Some(Event::Msi { address, data }) => {
                    let msg = kvm_bindings::kvm_msi {
                        address_lo: address as u32,
                        address_hi: (address >> 32) as u32,
                        data,
                        ..Default::default()
                    };
                    self.vm
                        .signal_msi(msg)
                        .map_err(|e| format!("KVM_SIGNAL_MSI: {e}"))?;
                }
                Some(Event::End(end)) => {
                    state.end = Some(end);
                    d.control.finish(match end.outcome {
                        0 => VmOutcome::PowerOff,
                        1 => VmOutcome::Reset,
                        2 => VmOutcome::DebugExit(end.value as u8),
                        _ => VmOutcome::Crash("the recorded run crashed".into()),
                    });
                    return Ok(());
                }
                Some(event @ Event::Exit(_)) => {
                    state.peeked = Some(event);
                    return Ok(());
                }
                Some(Event::InitPage { .. }) => {
                    return Err("an initial RAM page after the first exit".into())
                }
            }
        }
    }
}

impl ExitHook for Replayer {
    fn access(&self, kind: ExitKind, addr: u64, data: &mut [u8], d: &ExitDispatch) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.divergence.is_some() || state.end.is_some() {
            return;
        }
        state.exits += 1;
        let logged = match state.next() {
            Ok(Some(Event::Exit(exit))) => exit,
            Ok(Some(other)) => {
                let what = format!("the guest made a {kind} at {addr:#x}; the log has {other:?}");
                return self.diverge(&mut state, 0, what, d);
            }
            Ok(None) => {
                let what = format!("the guest made a {kind} at {addr:#x} past the end of the log");
                return self.diverge(&mut state, 0, what, d);
            }
            Err(e) => return self.diverge(&mut state, 0, format!("the log: {e}"), d),
        };
        if logged.kind != kind || logged.addr != addr || logged.data.len() != data.len() {
            let what = format!(
                "the guest made a {kind} of {} bytes at {addr:#x}; the log has a {} of {} bytes at {:#x}",
                data.len(),
                logged.kind,
                logged.data.len(),
                logged.addr
            );
            return self.diverge(&mut state, logged.rip, what, d);
        }
        if kind.is_read() {
            data.copy_from_slice(&logged.data);
        } else if logged.data != data {
            let what = format!(
                "the guest's {kind} at {addr:#x} wrote {:02x?}; the log has {:02x?}",
                data, logged.data
            );
            return self.diverge(&mut state, logged.rip, what, d);
        } else if kind == ExitKind::PioOut {
            Self::console(&mut state, addr, data);
        }
        state.current = Some(logged);
    }

    fn complete(&self, vcpu: &VcpuFd, d: &ExitDispatch) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(logged) = state.current.take() else {
            return;
        };
        let (rip, regs_hash) = registers(vcpu);
        if rip != logged.rip || regs_hash != logged.regs_hash {
            let what = format!(
                "{} at {:#x}: rip {rip:#x} / register hash {regs_hash:#018x}, the log has rip {:#x} / {:#018x}",
                logged.kind, logged.addr, logged.rip, logged.regs_hash
            );
            return self.diverge(&mut state, rip, what, d);
        }
        if let Err(what) = self.apply_effects(&mut state, d) {
            self.diverge(&mut state, rip, what, d);
        }
    }
}

/// Replays the log at `path`, COM1 output going to `serial`.
pub fn replay(path: &Path, serial: &SerialTarget) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let file = File::open(path).map_err(|source| ReplayError::Open {
        path: path.display().to_string(),
        source,
    })?;
    verify(&file)?;
    let mut reader = LogReader::new(BufReader::new(file))?;
    let meta = reader.meta.clone();
    if meta.cpus != 1 {
        return Err(ReplayError::Setup(format!(
            "the log is of a {}-vCPU VM; replay runs one",
            meta.cpus
        )));
    }
    let boot = boot_info(&meta)?;
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm = Arc::new(crate::machine::create_vm(&kvm)?);
    let ram = GuestRam::new(meta.memory).map_err(VmError::from)?;
    ram.register(&vm).map_err(VmError::from)?;
    let first = load_initial_ram(&mut reader, &ram)?;
    let replayer = Arc::new(Replayer {
        state: Mutex::new(ReplayState {
            reader,
            peeked: first,
            exits: 0,
            serial: crate::machine::serial_output(serial)?,
            dlab: false,
            divergence: None,
            end: None,
            current: None,
        }),
        ram: ram.clone(),
        vm: vm.clone(),
    });
    let dispatch = ExitDispatch {
        pio: Arc::new(sluice_bus::Bus::new()),
        mmio: Arc::new(sluice_bus::Bus::new()),
        control: Arc::default(),
        stats: Arc::default(),
        hook: Some(replayer.clone()),
    };
    let thread = start_boot_vcpu(&kvm, &vm, &ram, &boot, &dispatch)?;
    let outcome = dispatch.control.wait();
    thread.stop();
    let state = replayer
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let memory_hash = memory_hash(&ram);
    let mut divergence = state.divergence.clone();
    let recorded = state.end;
    if let (None, Some(end)) = (&divergence, recorded) {
        if end.memory_hash != memory_hash {
            divergence = Some(Divergence {
                exit: state.exits,
                rip: 0,
                what: format!(
                    "final guest memory hash {memory_hash:#018x}, the log has {:#018x}",
                    end.memory_hash
                ),
            });
        }
    }
    if divergence.is_none() && recorded.is_none() {
        divergence = Some(Divergence {
            exit: state.exits,
            rip: 0,
            what: format!("the VM ended ({outcome:?}) before the log did"),
        });
    }
    Ok(ReplayReport {
        outcome: divergence.is_none().then_some(outcome),
        divergence,
        exits: state.exits,
        memory_hash,
        recorded_memory_hash: recorded.map_or(0, |e| e.memory_hash),
        elapsed: started.elapsed(),
    })
}

/// Reads the whole log once before anything runs: a corrupt chunk, an undecodable event or a
/// log without its end record (a recording cut short) is refused up front, not met half-way.
/// Leaves the file at its start.
fn verify(file: &File) -> Result<(), ReplayError> {
    use std::io::{Seek, SeekFrom};
    let mut input = BufReader::new(file);
    let mut reader = LogReader::new(&mut input)?;
    let mut ended = false;
    while let Some(event) = reader.next_event()? {
        if ended {
            return Err(ReplayError::Setup("events after the end record".into()));
        }
        ended = matches!(event, Event::End(_));
    }
    if !ended {
        return Err(ReplayError::Setup(
            "the log has no end record (the recording did not finish)".into(),
        ));
    }
    drop(reader);
    let mut file = file;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| ReplayError::Setup(format!("cannot rewind the log: {e}")))?;
    Ok(())
}

/// The boot vCPU's entry from the log's meta chunk.
fn boot_info(meta: &LogMeta) -> Result<BootInfo, ReplayError> {
    let pointer = vm_memory::GuestAddress(meta.protocol_pointer);
    let protocol = match meta.protocol.as_str() {
        "pvh" => BootProtocol::Pvh {
            start_info: pointer,
        },
        "linux64" => BootProtocol::LinuxBoot64 { zero_page: pointer },
        other => {
            return Err(ReplayError::Setup(format!(
                "unknown boot protocol `{other}` in the log"
            )))
        }
    };
    Ok(BootInfo {
        entry: vm_memory::GuestAddress(meta.entry),
        protocol,
    })
}

/// Writes the logged initial pages; returns the first event after them.
fn load_initial_ram(
    reader: &mut LogReader<BufReader<File>>,
    ram: &GuestRam,
) -> Result<Option<Event>, ReplayError> {
    loop {
        match reader.next_event()? {
            Some(Event::InitPage { page, bytes }) => {
                write_page(ram, page, &bytes).map_err(ReplayError::Setup)?;
            }
            other => return Ok(other),
        }
    }
}

/// The recorded run's one vCPU, set up as `machine` does for a booting VM.
fn start_boot_vcpu(
    kvm: &Kvm,
    vm: &kvm_ioctls::VmFd,
    ram: &GuestRam,
    boot: &BootInfo,
    dispatch: &ExitDispatch,
) -> Result<VcpuThread, VmError> {
    use crate::vcpu::setup;
    let base = setup::base_cpuid(kvm, setup::HostKvm::detect())?;
    let vcpu = vm.create_vcpu(0).map_err(|source| VmError::KvmSetup {
        what: "create vCPU",
        source,
    })?;
    let cpuid = setup::vcpu_cpuid(&base, 0, 1, vcpu.get_tsc_khz().ok());
    setup::configure_vcpu(&vcpu, &cpuid)?;
    crate::boot::setup_boot_vcpu(&vcpu, &ram.memory, boot)?;
    VcpuThread::spawn(0, vcpu, dispatch.clone()).map_err(VmError::Thread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskSpec, E1000Spec, NetSpec, NvmeSpec, RngSpec};

    fn config() -> VmConfig {
        VmConfig {
            kernel: "kit".into(),
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 64 << 20,
            serial: SerialTarget::Off,
            test_device: false,
            disks: vec![DiskSpec::parse("path=disk.img").unwrap()],
            nets: Vec::new(),
            rng: Some(RngSpec::parse("").unwrap()),
            placement: Default::default(),
            tpm: None,
            numa: crate::numa::NumaPolicy::default(),
            e1000s: Vec::new(),
            iommu: None,
            nvmes: Vec::new(),
            vfio: Vec::new(),
        }
    }

    #[test]
    fn an_in_process_disk_and_rng_on_one_vcpu_can_be_recorded() {
        assert_eq!(refusal(&config()), None);
    }

    #[test]
    fn a_virtio_net_nic_on_a_tap_can_be_recorded() {
        let config = VmConfig {
            nets: vec![NetSpec::parse("tap=t0").unwrap()],
            ..config()
        };
        assert_eq!(refusal(&config), None);
    }

    #[test]
    fn every_nondeterministic_configuration_is_refused_with_its_reason() {
        let cases: Vec<(VmConfig, &str)> = vec![
            (
                VmConfig {
                    cpus: 2,
                    ..config()
                },
                "more than one vCPU",
            ),
            (
                VmConfig {
                    disks: vec![DiskSpec::parse("vhost_user=on,socket=/s").unwrap()],
                    ..config()
                },
                "vhost-user disk",
            ),
            (
                VmConfig {
                    disks: vec![DiskSpec::parse("path=disk.img,weight=2").unwrap()],
                    ..config()
                },
                "I/O scheduler",
            ),
            (
                VmConfig {
                    vfio: vec![crate::config::parse_device("vfio=01:00.0").unwrap()],
                    ..config()
                },
                "VFIO device",
            ),
            (
                VmConfig {
                    e1000s: vec![E1000Spec::parse("tap=t0").unwrap()],
                    ..config()
                },
                "an e1000",
            ),
            (
                VmConfig {
                    nvmes: vec![NvmeSpec::parse("path=n.img").unwrap()],
                    ..config()
                },
                "NVMe controller",
            ),
            (
                VmConfig {
                    iommu: Some(crate::iommu::IommuKind::parse("vtd").unwrap()),
                    ..config()
                },
                "virtual IOMMU",
            ),
            (
                VmConfig {
                    test_device: true,
                    ..config()
                },
                "test device",
            ),
        ];
        for (config, why) in cases {
            let refused = refusal(&config).unwrap_or_else(|| panic!("{why}: not refused"));
            assert!(refused.contains(why), "{refused}");
        }
    }
}
