//! An emulated NVMe 1.4 controller (PCI class 01/08/02) with one namespace on a disk image:
//! the device a stock `nvme` driver binds to, the emulated end of sluice's I/O spectrum.
//!
//! Layout: [`registers`] (CAP/VS/CC/CSTS/AQA/ASQ/ACQ, CC validation), [`controller`] (the
//! enabled controller: admin commands, queue creation and deletion, features, reset and
//! shutdown), [`admin`] (Identify structures and log pages), [`io`] (the NVM command parser
//! and the per-queue worker), [`prp`] (the PRP / SGL walker), [`queues`] (completion queues
//! and the shadow doorbell buffers), [`command`] (entries and status codes).
//!
//! Written by hand: rust-vmm has no NVMe device model, and the Rust NVMe crates are drivers
//! (the host side), not controllers.
//!
//! # Threads and doorbells
//!
//! * The **admin queue** is served on the vCPU thread that writes its SQ tail doorbell:
//!   admin commands are rare and short, and Create I/O SQ starts a worker thread, which the
//!   vCPU's seccomp list allows (device activation) and a worker's does not.
//! * Each **I/O submission queue** has one worker thread (`sluice_sandbox::spawn`,
//!   `ThreadKind::QueueWorker`: it makes exactly a virtio queue worker's calls — epoll,
//!   eventfd reads, io_uring_enter, and the synchronous fallbacks) with its own `IoQueue`
//!   (sluice-storage's io_uring engine, the one virtio-blk uses). It sleeps in epoll on its
//!   kick eventfd and its ring's completion eventfd.
//! * **Doorbells**: a trapped MMIO write stores the tail and signals the queue's doorbell
//!   eventfd. Once the driver configured shadow doorbells, each I/O SQ doorbell also becomes a
//!   KVM ioeventfd on that same eventfd (`IoEventRegistrar`, as QEMU does): the guest's write
//!   wakes the worker without an exit and the worker takes the tail from the shadow page.
//!   Before that (and always for the admin queue and the CQ heads) doorbells stay trapped: an
//!   ioeventfd without a data match drops the written value, which only the shadow page can
//!   replace. The registrations follow BAR0 when the guest moves it and are removed before a
//!   queue's eventfd goes (deletion, reset).
//! * **Shadow doorbells** (Doorbell Buffer Config, OACS bit 8; I/O queues only — Linux never
//!   shadows the admin queue): the worker reads the SQ tail from the shadow page, and before
//!   sleeping writes the tail it saw to the EventIdx page, then re-reads the shadow tail (so a
//!   submission racing that write is taken, not missed). The driver rings the MMIO doorbell
//!   only when its new tail passes that EventIdx. CQ heads are read from the shadow when a
//!   CQ looks full, and the CQ EventIdx follows.
//! * **Interrupts**: MSI-X through `MsixVectors` (one vector per CQ as the driver chose, the
//!   admin CQ on vector 0), else INTx through `PciIntx`, level-triggered: asserted while any
//!   CQ with interrupts enabled holds entries the driver has not consumed and INTMS bit 0 is
//!   clear. Interrupt Coalescing (feature 08h, with Interrupt Vector Configuration's per-vector
//!   disable, 09h) holds an I/O CQ's interrupt until THR+1 entries wait or TIME × 100 µs passed
//!   since the first; the worker's epoll timeout is the timer (1 ms granularity, rounded up).
//! * **Reset** (CC.EN 1→0) stops every worker without posting (operations the host already
//!   runs finish first: an `IoQueue` waits for them when dropped) and drops the queues, the
//!   shadow doorbell buffers and the features; **Delete I/O SQ** and **shutdown** (CC.SHN)
//!   let in-flight commands complete and post, and shutdown makes the image durable.
//!
//! Metrics ([`sluice_virtio::DeviceMetrics`], queue 0 = admin, queue N = I/O queue N):
//! `kicks` = doorbell MMIO writes to the SQ, `notifications_suppressed` = commands the worker
//! consumed beyond the doorbell writes it got (those the shadow doorbell saved an exit for),
//! `interrupts`, `requests`, `bytes`, `errors`, latency; the device-wide `counters` hold the
//! guest's exits per register ([`REGISTER_EXIT_COUNTERS`]).

pub mod admin;
pub mod command;
pub mod controller;
pub mod fuzz;
pub mod io;
pub mod prp;
pub mod queues;
pub mod registers;
pub mod rerun;
mod snapshot;
pub mod trace;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use sluice_bus::irq::{MsiRouter, MsiSink};
use sluice_bus::{read_le, write_le, IoEventRegistrar};
use sluice_dma::DmaSpace;
use sluice_pci::{
    BarSpec, ConfigSpace, InterruptPin, MsixCapability, MsixSignal, MsixTable, MsixVectors,
    PciDevice, PciIds, PciIntx,
};
use sluice_storage::{DiskImage, IoEngine};
use sluice_virtio::{DeviceMetrics, QueueMetrics};

use admin::Identity;
use controller::{AdminQueues, Controller, DoorbellEvents};
use io::{IoKind, Namespace};
use queues::{Coalescing, CompletionQueue, Dbbuf};
use registers::*;

/// PCI identity: sluice's vendor id (as the test device), class 01/08/02 (NVM Express).
pub const NVME_VENDOR_ID: u16 = 0x1234;
pub const NVME_DEVICE_ID: u16 = 0x5c4e;
const NVME_CLASS: u32 = 0x01_0802;

const REGISTER_BAR: usize = 0;
const MSIX_BAR: usize = 4;
const REGISTER_BAR_SIZE: u64 = 0x4000;
const MSIX_BAR_SIZE: u64 = 0x2000;
const MSIX_PBA_OFFSET: u32 = 0x1000;
/// I/O queue pairs at most (MSI-X vectors: one more, for the admin CQ).
pub const MAX_IO_QUEUES: u16 = 64;

/// How to build a controller.
#[derive(Debug, Clone)]
pub struct NvmeConfig {
    pub path: PathBuf,
    /// I/O queue pairs offered (1..=64).
    pub queues: u16,
    pub serial: String,
    pub direct: bool,
    pub engine: IoEngine,
    /// Offer Doorbell Buffer Config (OACS bit 8).
    pub shadow_doorbells: bool,
}

impl NvmeConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        NvmeConfig {
            path: path.into(),
            queues: 4,
            serial: "sluice-nvme0".into(),
            direct: false,
            engine: IoEngine::Auto,
            shadow_doorbells: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("queues={0}: an NVMe controller here has 1 to {MAX_IO_QUEUES} I/O queues")]
    Queues(u16),
    #[error(transparent)]
    Image(#[from] sluice_storage::ImageError),
    #[error("the image holds no whole {0}-byte block")]
    TooSmall(u64),
    #[error(transparent)]
    Pci(#[from] sluice_pci::PciError),
    #[error("MSI-X setup: {0}")]
    Msix(String),
}

/// Counters for the SMART log.
#[derive(Debug, Default)]
pub struct SmartCounters {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub read_commands: AtomicU64,
    pub write_commands: AtomicU64,
}

/// Device-wide counters: guest exits per register (MMIO accesses to BAR0 and the MSI-X BAR),
/// exported with the device's metrics under "counters".
pub const REGISTER_EXIT_COUNTERS: [&str; 10] = [
    "exits_cap",
    "exits_vs",
    "exits_intms_intmc",
    "exits_cc",
    "exits_csts",
    "exits_aqa_asq_acq",
    "exits_sq_doorbells",
    "exits_cq_doorbells",
    "exits_msix",
    "exits_other",
];

/// The counter an access to BAR0 at `offset` counts under.
fn register_counter(offset: u64) -> &'static str {
    match offset {
        CAP..=0x07 => "exits_cap",
        VS..=0x0b => "exits_vs",
        INTMS..=0x13 => "exits_intms_intmc",
        CC..=0x17 => "exits_cc",
        CSTS..=0x1f => "exits_csts",
        AQA..=0x37 => "exits_aqa_asq_acq",
        DOORBELLS.. if ((offset - DOORBELLS) / 4).is_multiple_of(2) => "exits_sq_doorbells",
        DOORBELLS.. => "exits_cq_doorbells",
        _ => "exits_other",
    }
}

/// What the vCPU (registers, admin queue) and the I/O workers share.
pub struct Shared {
    pub name: String,
    pub dma: DmaSpace,
    pub image: Arc<DiskImage>,
    pub engine: IoEngine,
    pub namespace: Namespace,
    pub msix: Arc<MsixVectors>,
    pub intx: Arc<PciIntx>,
    /// INTMS: bit 0 masks INTx (the single-message vector).
    pub intms: AtomicU32,
    /// The Volatile Write Cache feature.
    pub write_cache: AtomicBool,
    /// The Interrupt Coalescing feature (THR | TIME << 8).
    pub coalescing: AtomicU32,
    /// Interrupt Vector Configuration: coalescing disabled (CD) per vector.
    pub coalescing_disabled: Vec<AtomicBool>,
    dbbuf: Mutex<Option<Dbbuf>>,
    /// Completion queues by id (INTx level).
    cqs: Mutex<Vec<Option<Arc<CompletionQueue>>>>,
    pub metrics: Arc<DeviceMetrics>,
    pub smart: SmartCounters,
    /// The request log (`requests=`), set before the guest runs.
    pub request_log: std::sync::OnceLock<Arc<trace::NvmeRequestLog>>,
}

impl Shared {
    pub fn dbbuf(&self) -> Option<Dbbuf> {
        *self.dbbuf_slot()
    }

    fn dbbuf_slot(&self) -> MutexGuard<'_, Option<Dbbuf>> {
        self.dbbuf.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cqs(&self) -> MutexGuard<'_, Vec<Option<Arc<CompletionQueue>>>> {
        self.cqs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_cq(&self, qid: u16, cq: Option<Arc<CompletionQueue>>) {
        if let Some(slot) = self.cqs().get_mut(usize::from(qid)) {
            *slot = cq;
        }
    }

    fn clear_queues(&self) {
        self.cqs().iter_mut().for_each(|slot| *slot = None);
        self.update_intx();
    }

    /// Queue `qid`'s counters (queue ids are bounded by the controller, the last slot is a
    /// catch-all that is never reached).
    pub fn queue_metrics(&self, qid: u16) -> &QueueMetrics {
        let queues = &self.metrics.queues;
        &queues[usize::from(qid).min(queues.len() - 1)]
    }

    fn count_io(&self, kind: IoKind, bytes: u64) {
        let (commands, total) = match kind {
            IoKind::Read => (&self.smart.read_commands, &self.smart.bytes_read),
            IoKind::Write => (&self.smart.write_commands, &self.smart.bytes_written),
            IoKind::Other => return,
        };
        QueueMetrics::add(commands, 1);
        QueueMetrics::add(total, bytes);
    }

    /// The coalescing that applies to `cq` (I/O CQs whose vector has it enabled).
    fn coalescing_for(&self, cq: &CompletionQueue) -> Option<Coalescing> {
        let disabled = self
            .coalescing_disabled
            .get(usize::from(cq.vector))
            .is_none_or(|cd| cd.load(Ordering::Relaxed));
        if cq.qid == 0 || disabled {
            return None;
        }
        Coalescing::from_feature(self.coalescing.load(Ordering::Relaxed))
    }

    /// `posted` entries were posted to `cq`: interrupts now, or returns when it is due.
    fn completions_posted(&self, cq: &CompletionQueue, qid: u16, posted: u32) -> Option<Instant> {
        match cq.coalesce(posted, self.coalescing_for(cq), Instant::now()) {
            Ok(()) => {
                self.interrupt(cq, qid);
                None
            }
            Err(deadline) => Some(deadline),
        }
    }

    /// The coalescing timer of `cq`: interrupts if due; returns the pending deadline.
    fn interrupt_if_due(&self, cq: &CompletionQueue, qid: u16) -> Option<Instant> {
        match cq.due(Instant::now()) {
            Ok(()) => {
                self.interrupt(cq, qid);
                None
            }
            Err(pending) => pending,
        }
    }

    /// Entries were posted to `cq`: its MSI-X vector, or the INTx level.
    fn interrupt(&self, cq: &CompletionQueue, qid: u16) {
        if !cq.interrupts_enabled {
            return;
        }
        QueueMetrics::add(&self.queue_metrics(qid).interrupts, 1);
        if self.msix.signal(cq.vector) == MsixSignal::NotDelivered {
            self.update_intx();
        }
    }

    /// Drives INTx to "some CQ with interrupts on holds unconsumed entries, INTMS clear".
    fn update_intx(&self) {
        if self.msix.is_enabled() {
            return;
        }
        let masked = self.intms.load(Ordering::Acquire) & 1 != 0;
        let pending = self
            .cqs()
            .iter()
            .flatten()
            .any(|cq| cq.interrupts_enabled && cq.has_pending());
        if pending && !masked {
            self.intx.raise(1);
        } else {
            self.intx.take();
        }
    }
}

/// Interrupt and doorbell plumbing from the VMM.
#[derive(Clone)]
pub struct NvmeInterrupts {
    pub msi_sink: Arc<dyn MsiSink>,
    pub msi_router: Option<Arc<dyn MsiRouter>>,
    /// Makes SQ doorbells ioeventfds once shadow doorbells are on (`None`: always trapped).
    pub ioevents: Option<Arc<dyn IoEventRegistrar>>,
}

/// The NVMe controller as a PCI function.
pub struct Nvme {
    config: ConfigSpace,
    msix_capability: usize,
    shared: Arc<Shared>,
    identity: Identity,
    max_queues: u16,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    controller: Option<Controller>,
    doorbell_events: DoorbellEvents,
}

impl Nvme {
    /// A controller over `config.path`, doing DMA through `dma`.
    pub fn new(
        config: &NvmeConfig,
        dma: DmaSpace,
        interrupts: NvmeInterrupts,
        name: &str,
    ) -> Result<Nvme, NvmeError> {
        if config.queues == 0 || config.queues > MAX_IO_QUEUES {
            return Err(NvmeError::Queues(config.queues));
        }
        let image = Arc::new(DiskImage::open(&config.path, false, config.direct)?);
        let block_size = u64::from(image.host_block_size().max(512));
        let namespace = Namespace {
            blocks: image.size() / block_size,
            block_shift: block_size.trailing_zeros(),
        };
        if namespace.blocks == 0 {
            return Err(NvmeError::TooSmall(block_size));
        }
        let ids = PciIds {
            vendor_id: NVME_VENDOR_ID,
            device_id: NVME_DEVICE_ID,
            class_code: NVME_CLASS,
            revision_id: 0,
            subsystem_vendor_id: NVME_VENDOR_ID,
            subsystem_id: NVME_DEVICE_ID,
        };
        let mut pci = ConfigSpace::new(&ids);
        pci.add_bar(REGISTER_BAR, BarSpec::mem64(REGISTER_BAR_SIZE))?;
        pci.add_bar(MSIX_BAR, BarSpec::mem32(MSIX_BAR_SIZE))?;
        let vectors = config.queues + 1;
        let capability = MsixCapability {
            vectors,
            table_bar: MSIX_BAR as u8,
            table_offset: 0,
            pba_bar: MSIX_BAR as u8,
            pba_offset: MSIX_PBA_OFFSET,
        };
        let msix_capability = capability.install(&mut pci)?;
        let intx = Arc::new(PciIntx::new(InterruptPin::IntA));
        intx.install(&mut pci);
        let doorbell_events = DoorbellEvents {
            registrar: interrupts.ioevents.clone(),
            bar0: None,
        };
        let table = MsixTable::new(vectors, interrupts.msi_sink)
            .map_err(|e| NvmeError::Msix(e.to_string()))?;
        let msix = MsixVectors::new(table, interrupts.msi_router.as_deref())
            .map_err(|e| NvmeError::Msix(e.to_string()))?;
        let shared = Shared {
            name: name.to_string(),
            dma,
            image,
            engine: config.engine,
            namespace,
            msix: Arc::new(msix),
            intx,
            intms: AtomicU32::new(0),
            write_cache: AtomicBool::new(true),
            coalescing: AtomicU32::new(0),
            coalescing_disabled: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
            dbbuf: Mutex::new(None),
            cqs: Mutex::new(vec![None; usize::from(config.queues) + 1]),
            metrics: Arc::new(DeviceMetrics::with_counters(
                name,
                usize::from(config.queues) + 1,
                &REGISTER_EXIT_COUNTERS,
            )),
            smart: SmartCounters::default(),
            request_log: std::sync::OnceLock::new(),
        };
        Ok(Nvme {
            config: pci,
            msix_capability,
            shared: Arc::new(shared),
            identity: Identity {
                vendor_id: NVME_VENDOR_ID,
                serial: config.serial.clone(),
                model: "sluice NVMe controller".into(),
                firmware: env!("CARGO_PKG_VERSION").into(),
                shadow_doorbells: config.shadow_doorbells,
            },
            max_queues: config.queues,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            controller: None,
            doorbell_events,
        })
    }

    pub fn metrics(&self) -> Arc<DeviceMetrics> {
        self.shared.metrics.clone()
    }

    /// Logs every I/O command answered from now on into a request log at `path`
    /// (`requests=`; [`trace`]). Call before the guest runs.
    pub fn log_requests(&self, path: &std::path::Path) -> std::io::Result<()> {
        let log = trace::NvmeRequestLog::create(path, &self.shared.namespace)?;
        self.shared
            .request_log
            .set(log)
            .map_err(|_| std::io::Error::other("the request log is already set"))
    }

    pub fn namespace(&self) -> Namespace {
        self.shared.namespace
    }

    /// Running I/O submission queues (0 while disabled).
    pub fn io_queues(&self) -> usize {
        self.controller.as_ref().map_or(0, Controller::io_queues)
    }

    /// Async Event Requests the controller holds.
    pub fn held_event_requests(&self) -> usize {
        self.controller
            .as_ref()
            .map_or(0, Controller::held_event_requests)
    }

    fn count_exit(&self, counter: &str) {
        self.shared.metrics.count_named(counter, 1);
    }

    fn write_cc(&mut self, value: u32) {
        let old = Configuration(self.cc);
        let new = Configuration(value);
        self.cc = value;
        match (old.enabled(), new.enabled()) {
            (false, true) => self.enable(new),
            (true, false) => self.disable(),
            (true, true) => {
                if new.shn() != 0 {
                    self.shutdown();
                }
            }
            (false, false) => {}
        }
    }

    fn enable(&mut self, cc: Configuration) {
        if !cc.valid_for_enable() {
            tracing::debug!("nvme: CC {:#x} refused at enable", cc.0);
            self.csts |= CSTS_CFS;
            return;
        }
        let controller = Controller::enable(
            self.shared.clone(),
            cc,
            AdminQueues {
                aqa: self.aqa,
                asq: self.asq,
                acq: self.acq,
            },
            self.max_queues,
            self.identity.clone(),
            self.doorbell_events.clone(),
        );
        match controller {
            Some(controller) => {
                self.controller = Some(controller);
                self.csts = CSTS_RDY;
                if cc.shn() != 0 {
                    self.shutdown();
                }
            }
            None => {
                tracing::debug!("nvme: admin queues refused at enable");
                self.csts |= CSTS_CFS;
            }
        }
    }

    fn disable(&mut self) {
        if let Some(controller) = self.controller.take() {
            controller.reset();
        }
        self.csts = 0;
        self.shared.intx.take();
    }

    fn shutdown(&mut self) {
        if let Some(controller) = self.controller.as_mut() {
            controller.shutdown();
        }
        self.csts = (self.csts & !CSTS_SHST_MASK) | CSTS_SHST_COMPLETE;
    }

    fn write_intms(&mut self, value: u32, set: bool) {
        // The registers are for INTx and MSI; with MSI-X on they are not used.
        if self.shared.msix.is_enabled() {
            return;
        }
        if set {
            self.shared.intms.fetch_or(value, Ordering::AcqRel);
        } else {
            self.shared.intms.fetch_and(!value, Ordering::AcqRel);
        }
        self.shared.update_intx();
    }

    fn register_read(&mut self, offset: u64, data: &mut [u8]) {
        let value: u64 = match (offset, data.len()) {
            (CAP, 8) => capabilities(),
            (CAP, 4) => capabilities() & 0xffff_ffff,
            (0x04, 4) => capabilities() >> 32,
            (VS, 4) => u64::from(VERSION),
            (INTMS | INTMC, 4) => u64::from(self.shared.intms.load(Ordering::Acquire)),
            (CC, 4) => u64::from(self.cc),
            (CSTS, 4) => u64::from(self.csts),
            (AQA, 4) => u64::from(self.aqa),
            (ASQ, 8) => self.asq,
            (ASQ, 4) => self.asq & 0xffff_ffff,
            (0x2c, 4) => self.asq >> 32,
            (ACQ, 8) => self.acq,
            (ACQ, 4) => self.acq & 0xffff_ffff,
            (0x34, 4) => self.acq >> 32,
            _ => 0,
        };
        write_le(data, value);
    }

    fn register_write(&mut self, offset: u64, data: &[u8]) {
        let value = read_le(data);
        // 4-byte registers take 4-byte writes.
        let low = value as u32;
        match (offset, data.len()) {
            (INTMS, 4) => self.write_intms(low, true),
            (INTMC, 4) => self.write_intms(low, false),
            (CC, 4) => self.write_cc(low),
            (CSTS, 4) => {} // NSSRO is never set: NSSR is not supported.
            (NSSR, 4) => {}
            (AQA, 4) => self.aqa = low & 0x0fff_0fff,
            (ASQ, 8) => self.asq = value & !0xfff,
            (ASQ, 4) => self.asq = (self.asq & !0xffff_ffff) | u64::from(low & !0xfff),
            (0x2c, 4) => self.asq = (self.asq & 0xffff_ffff) | (u64::from(low) << 32),
            (ACQ, 8) => self.acq = value & !0xfff,
            (ACQ, 4) => self.acq = (self.acq & !0xffff_ffff) | u64::from(low & !0xfff),
            (0x34, 4) => self.acq = (self.acq & 0xffff_ffff) | (u64::from(low) << 32),
            (DOORBELLS.., 4) => self.doorbell(offset, low),
            _ => tracing::debug!("nvme: ignored register write at {offset:#x}"),
        }
    }

    fn doorbell(&mut self, offset: u64, value: u32) {
        let index = (offset - DOORBELLS) / 4;
        let Ok(qid) = u16::try_from(index / 2) else {
            return;
        };
        let Some(controller) = self.controller.as_mut() else {
            return;
        };
        let accepted = if index.is_multiple_of(2) {
            controller.sq_doorbell(qid, value)
        } else {
            controller.cq_doorbell(qid, value)
        };
        if let Err(info) = accepted {
            tracing::debug!("nvme: doorbell {index} refused value {value}");
            controller.invalid_doorbell(info);
        }
    }

    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let pba = u64::from(MSIX_PBA_OFFSET);
        if offset < pba {
            self.shared.msix.read_table(offset, data);
        } else {
            self.shared.msix.read_pba(offset - pba, data);
        }
    }

    fn msix_write(&self, offset: u64, data: &[u8]) {
        let pba = u64::from(MSIX_PBA_OFFSET);
        if offset < pba {
            self.shared.msix.write_table(offset, data);
        } else {
            self.shared.msix.write_pba(offset - pba, data);
        }
    }
}

impl PciDevice for Nvme {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        self.shared
            .msix
            .config_written(&self.config, self.msix_capability, offset, data.len());
        self.shared.intx.config_written(&self.config);
        self.shared
            .intx
            .set_msi_active(self.shared.msix.is_enabled());
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        self.shared.intx.patch_status_read(offset, data);
    }

    fn intx(&self) -> Option<Arc<PciIntx>> {
        Some(self.shared.intx.clone())
    }

    fn save_state(&mut self) -> Option<Result<serde_json::Value, String>> {
        Some(self.save())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.restore(state)
    }

    fn bar_moved(&mut self, bar: usize, _old: Option<u64>, new: Option<u64>) {
        if bar != REGISTER_BAR {
            return;
        }
        self.doorbell_events.bar0 = new;
        if let Some(controller) = self.controller.as_mut() {
            controller.set_bar0(new);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            REGISTER_BAR => {
                self.count_exit(register_counter(offset));
                self.register_read(offset, data);
            }
            MSIX_BAR => {
                self.count_exit("exits_msix");
                self.msix_read(offset, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            REGISTER_BAR => {
                self.count_exit(register_counter(offset));
                self.register_write(offset, data);
            }
            MSIX_BAR => {
                self.count_exit("exits_msix");
                self.msix_write(offset, data);
            }
            _ => {}
        }
    }
}
