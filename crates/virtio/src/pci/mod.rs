//! The virtio-pci modern transport (virtio 1.2 §4.1): [`VirtioPciDevice`] puts any
//! [`VirtioDevice`] on the PCI bus as a `sluice_pci::PciDevice`.
//!
//! Written by hand: rust-vmm has no virtio-pci transport crate (`virtio-device`/`vm-virtio`'s
//! transports are MMIO-only or unmaintained), and the VMMs that have one do not publish it.
//!
//! Identity: vendor 0x1AF4, device 0x1040 + device type, revision 1, subsystem vendor 0x1AF4,
//! subsystem id = device type; class 0x020000 (net), 0x010000 (block), 0xff0000 (others).
//! Interrupts: MSI-X through irqfd routes; INTA (level-triggered, deasserted by the ISR read)
//! when the driver does not enable MSI-X or assigns no vector.
//!
//! Everything lives in one 32 KiB 64-bit memory BAR (BAR0, non-prefetchable: ISR reads clear):
//!
//! | offset | region                 | capability (cfg_type)                       |
//! |--------|------------------------|---------------------------------------------|
//! | 0x0000 | common configuration   | 1 (length 0x38)                             |
//! | 0x1000 | ISR status             | 3 (length 4; byte 0 read-to-clear)          |
//! | 0x2000 | device configuration   | 4 (length 0x1000, forwarded to the model)   |
//! | 0x3000 | notifications          | 2, `notify_off_multiplier` 4: queue i at 0x3000 + 4 i |
//! | 0x4000 | MSI-X table            | MSI-X capability (queues + 1 vectors, ≤ 256)|
//! | 0x5000 | MSI-X PBA              |                                             |
//!
//! plus the PCI configuration access capability (cfg_type 5) in config space.
//!
//! Guest accesses are validated: common-config fields need their exact offset and width
//! (64-bit queue addresses also take two aligned dword accesses); anything else reads zero and
//! drops writes. Queue registers are frozen once a queue is enabled or DRIVER_OK is set;
//! FEATURES_OK does not stick unless the driver accepted only offered features and
//! VIRTIO_F_VERSION_1 (VIRTIO_F_ACCESS_PLATFORM is offered when the DMA space is translated by
//! an IOMMU, and only then); DRIVER_OK activates the device with the enabled queues after checking
//! their rings fit the DMA space (else DEVICE_NEEDS_RESET).
//!
//! Notifications: each queue has an eventfd. With an [`IoEventRegistrar`] it is registered as
//! an ioeventfd on the queue's notify address whenever BAR0 is placed, so kicks never reach
//! userspace; writes that do reach [`PciDevice::bar_write`] signal the same eventfd.

mod common;
pub mod fuzz;
mod interrupt;
mod snapshot;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sluice_bus::irq::{MsiRouter, MsiSink};
use sluice_bus::{read_le, write_le, IoEventRegistrar};
use sluice_dma::DmaSpace;
use sluice_pci::{
    BarSpec, ConfigSpace, InterruptPin, MsixCapability, MsixError, MsixTable, MsixVectors,
    PciDevice, PciError, PciIds, PciIntx,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::activation::ActiveQueues;
use crate::device::{
    NotifyPolicy, QueueBinding, VirtioDevice, DEVICE_TYPE_BLOCK, DEVICE_TYPE_NET, DEVICE_TYPE_RNG,
};
use crate::ring::{PackedQueue, QueuePosition, VirtQueue};
use common::{CommonConfig, Field, QueueRegisters};
use interrupt::{InterruptState, PciInterrupt};

pub use interrupt::VIRTIO_MSI_NO_VECTOR;

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are this plus the device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The BAR holding every virtio structure and the MSI-X table.
pub const VIRTIO_PCI_BAR: usize = 0;
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x8000;
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const ISR_CFG_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Each structure gets one 4 KiB page of the BAR.
const REGION_SIZE: u64 = 0x1000;
/// Queues whose doorbells fit the notify page.
pub const MAX_QUEUES: usize = (REGION_SIZE / NOTIFY_OFF_MULTIPLIER as u64) as usize;
/// Vectors whose entries fit the MSI-X table page.
const MAX_VECTORS: usize = (REGION_SIZE / sluice_pci::MSIX_TABLE_ENTRY_SIZE) as usize;
/// Bytes the ISR capability declares.
const ISR_CFG_LEN: u32 = 4;
/// Width drivers use for the queue-index doorbell write (what the ioeventfd is registered for).
const NOTIFY_WIDTH: u32 = 2;
/// Largest split queue (virtio 1.2 §2.7).
const MAX_QUEUE_SIZE: u16 = 32768;

/// `cfg_type` values of the virtio vendor capabilities.
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI: u8 = 5;
}

/// PCI capability id of vendor-specific capabilities.
pub const PCI_CAP_ID_VENDOR: u8 = 0x09;
/// Bytes of a `virtio_pci_cap` (header included).
const VIRTIO_CAP_LEN: usize = 16;
/// Offsets inside `virtio_pci_cfg_cap`.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const FEATURE_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const FEATURE_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const FEATURE_RING_PACKED: u64 = 1 << VIRTIO_F_RING_PACKED;
const FEATURE_ACCESS_PLATFORM: u64 = 1 << VIRTIO_F_ACCESS_PLATFORM;

/// How the transport is wired into the VM.
#[derive(Clone)]
pub struct VirtioPciOptions {
    /// Name for logs and exit counters (default: "virtio-blk", "virtio-net", ...).
    pub name: Option<String>,
    /// Notify policy of queues without an entry in `queue_policies`.
    pub policy: NotifyPolicy,
    /// Per-queue notify policies (index = queue index).
    pub queue_policies: Vec<NotifyPolicy>,
    /// Where MSI-X messages go when no irqfd route is used (KVM_SIGNAL_MSI).
    pub msi_sink: Arc<dyn MsiSink>,
    /// Irqfd routes, one per vector, updated when the guest programs the table.
    pub msi_router: Option<Arc<dyn MsiRouter>>,
    /// Ioeventfds for the doorbells.
    pub ioevents: Option<Arc<dyn IoEventRegistrar>>,
    /// Offer VIRTIO_F_RING_PACKED (sluice's packed rings) on top of the device's features;
    /// ignored for devices whose rings another process runs ([`crate::ExternalQueues`]).
    pub packed_ring: bool,
    /// Deterministic device mode (record and replay, docs/replay.md): queues run inline on the
    /// vCPU that writes the doorbell, which returns to the guest only once the requests it
    /// published are answered. Give no `ioevents` with it (a doorbell must be an exit).
    pub inline_queues: bool,
}

impl VirtioPciOptions {
    /// Interrupt policy on every queue, messages through `msi_sink`, no irqfd / ioeventfd.
    pub fn new(msi_sink: Arc<dyn MsiSink>) -> Self {
        Self {
            name: None,
            policy: NotifyPolicy::Interrupt,
            queue_policies: Vec::new(),
            msi_sink,
            msi_router: None,
            ioevents: None,
            packed_ring: false,
            inline_queues: false,
        }
    }

    fn policy_for(&self, queue: usize) -> NotifyPolicy {
        self.queue_policies
            .get(queue)
            .copied()
            .unwrap_or(self.policy)
    }
}

/// Why a transport could not be built (never from guest accesses).
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("device has {0} queues; the transport supports 1..={MAX_QUEUES}")]
    QueueCount(usize),
    #[error("queue {index} max size {size} is not a power of two in 1..=32768")]
    QueueSize { index: usize, size: u16 },
    #[error("device type {0} has no modern PCI device id")]
    DeviceType(u32),
    #[error("the device does not offer VIRTIO_F_VERSION_1 (required by a modern transport)")]
    NotModern,
    #[error("PCI: {0}")]
    Pci(#[from] PciError),
    #[error("MSI-X: {0}")]
    Msix(#[from] MsixError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A virtio device behind the virtio-pci modern transport.
pub struct VirtioPciDevice {
    name: String,
    device: Box<dyn VirtioDevice>,
    mem: DmaSpace,
    config: ConfigSpace,
    msix_cap: usize,
    pci_cfg_cap: usize,
    common: CommonConfig,
    state: Arc<InterruptState>,
    kicks: Vec<EventFd>,
    policies: Vec<NotifyPolicy>,
    ioevents: Option<Arc<dyn IoEventRegistrar>>,
    /// See [`VirtioPciOptions::inline_queues`].
    inline_queues: bool,
    /// BAR0 base the doorbells are registered at, and which registrations succeeded.
    ioevent_base: Option<u64>,
    registered: Vec<bool>,
    /// The running queues from DRIVER_OK until the next reset.
    active: Option<ActiveQueues>,
    /// Where the rings of an active device stopped for a snapshot: they stay stopped (nothing
    /// taken from a tap or a disk after the state was captured) until
    /// [`PciDevice::resume_after_save`].
    quiesced: Option<Vec<(u16, QueuePosition)>>,
    /// A restored device not yet activated: `resume_after_save` tells the model it was
    /// restored.
    restored_pending: bool,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("name", &self.name)
            .field("status", &self.device_status())
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl VirtioPciDevice {
    /// Wraps `device`, which reaches guest memory through `mem`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: DmaSpace,
        options: VirtioPciOptions,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes();
        validate_queues(&max_sizes)?;
        let mut device = device;
        let mut offered = device.device_features();
        if options.packed_ring && device.external_queues().is_none() {
            offered |= FEATURE_RING_PACKED;
        }
        // Behind an IOMMU the device's addresses are IOVAs: the driver must use its DMA API
        // (Linux bypasses the IOMMU for a virtio device without this bit).
        if mem.get_iommu_enabled() && device.external_queues().is_none() {
            offered |= FEATURE_ACCESS_PLATFORM;
        }
        if offered & FEATURE_VERSION_1 == 0 {
            return Err(VirtioPciError::NotModern);
        }
        let device_type = device.device_type();
        let mut config = ConfigSpace::new(&pci_ids(device_type)?);
        config.add_bar(VIRTIO_PCI_BAR, BarSpec::mem64(VIRTIO_PCI_BAR_SIZE))?;
        let queues = max_sizes.len();
        let pci_cfg_cap = install_virtio_capabilities(&mut config, queues)?;
        // queues <= MAX_QUEUES, so the vector count fits u16.
        let vectors = (queues + 1).min(MAX_VECTORS) as u16;
        let msix_cap = MsixCapability {
            vectors,
            table_bar: VIRTIO_PCI_BAR as u8,
            table_offset: MSIX_TABLE_OFFSET as u32,
            pba_bar: VIRTIO_PCI_BAR as u8,
            pba_offset: MSIX_PBA_OFFSET as u32,
        }
        .install(&mut config)?;
        let table = MsixTable::new(vectors, options.msi_sink.clone())?;
        let msix = MsixVectors::new(table, options.msi_router.as_deref())?;
        let intx = Arc::new(PciIntx::new(InterruptPin::IntA));
        intx.install(&mut config);
        let kicks = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            name: options
                .name
                .clone()
                .unwrap_or_else(|| default_name(device_type)),
            device,
            mem,
            config,
            msix_cap,
            pci_cfg_cap,
            common: CommonConfig::new(offered, &max_sizes),
            state: Arc::new(InterruptState::new(queues, msix, intx)),
            kicks,
            policies: (0..queues).map(|i| options.policy_for(i)).collect(),
            ioevents: options.ioevents,
            inline_queues: options.inline_queues,
            ioevent_base: None,
            registered: vec![false; queues],
            active: None,
            quiesced: None,
            restored_pending: false,
        })
    }

    /// The device status register.
    pub fn device_status(&self) -> u8 {
        self.state.status.load(Ordering::Acquire)
    }

    /// Whether DRIVER_OK activated the device (until the next reset).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Queue `queue`'s doorbell eventfd.
    pub fn kick_event(&self, queue: usize) -> Option<&EventFd> {
        self.kicks.get(queue)
    }

    /// Features the driver accepted that the device offered.
    pub fn negotiated_features(&self) -> u64 {
        self.common.offered & self.common.accepted
    }

    fn common_read(&self, at: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(field) = Field::decode(at, data.len()) else {
            tracing::debug!(
                "{}: bad common cfg read at {at:#x}/{}",
                self.name,
                data.len()
            );
            return;
        };
        write_le(data, self.field_value(field));
    }

    fn field_value(&self, field: Field) -> u64 {
        let common = &self.common;
        let selected = common.selected();
        let load16 = |v: &std::sync::atomic::AtomicU16| u64::from(v.load(Ordering::Acquire));
        match field {
            Field::DeviceFeatureSelect => common.device_feature_select.into(),
            Field::DeviceFeature => common.device_feature_window().into(),
            Field::DriverFeatureSelect => common.driver_feature_select.into(),
            Field::DriverFeature => common.driver_feature_window().into(),
            Field::ConfigMsixVector => load16(&self.state.config_vector),
            Field::NumQueues => common.num_queues().into(),
            Field::DeviceStatus => self.device_status().into(),
            Field::ConfigGeneration => self.state.config_generation.load(Ordering::Acquire).into(),
            Field::QueueSelect => common.queue_select.into(),
            Field::QueueSize => selected.map_or(0, |q| q.size.into()),
            Field::QueueMsixVector => self
                .state
                .queue_vectors
                .get(usize::from(common.queue_select))
                .map_or(0, load16),
            Field::QueueEnable => selected.map_or(0, |q| q.enabled.into()),
            Field::QueueNotifyOff => selected.map_or(0, |_| common.queue_select.into()),
            Field::QueueAddress(register, part) => selected.map_or(0, |q| {
                let address = q.address(register);
                match part {
                    common::Part::Full => address,
                    common::Part::Low => address & 0xffff_ffff,
                    common::Part::High => address >> 32,
                }
            }),
        }
    }

    fn common_write(&mut self, at: u64, data: &[u8]) {
        let Some(field) = Field::decode(at, data.len()) else {
            tracing::debug!(
                "{}: bad common cfg write at {at:#x}/{}",
                self.name,
                data.len()
            );
            return;
        };
        let value = read_le(data);
        match field {
            // Fields are at most 32 bits wide except the queue addresses (decoded by width).
            Field::DeviceFeatureSelect => self.common.device_feature_select = value as u32,
            Field::DriverFeatureSelect => self.common.driver_feature_select = value as u32,
            Field::DriverFeature => {
                if self.device_status() & STATUS_FEATURES_OK == 0 {
                    self.common.set_driver_feature_window(value as u32);
                }
            }
            Field::ConfigMsixVector => {
                let vector = self.state.checked_vector(value as u16);
                self.state.config_vector.store(vector, Ordering::Release);
            }
            Field::DeviceStatus => self.write_status(value as u8),
            Field::QueueSelect => self.common.queue_select = value as u16,
            Field::QueueMsixVector => self.set_queue_vector(value as u16),
            Field::QueueSize => {
                if let Some(queue) = self.configurable_queue() {
                    queue.size = value as u16;
                }
            }
            Field::QueueEnable => self.enable_queue(value),
            Field::QueueAddress(register, part) => {
                if let Some(queue) = self.configurable_queue() {
                    queue.set_address(register, part, value);
                }
            }
            Field::DeviceFeature
            | Field::NumQueues
            | Field::ConfigGeneration
            | Field::QueueNotifyOff => {}
        }
    }

    /// The selected queue if its registers may still change (not enabled, no DRIVER_OK).
    fn configurable_queue(&mut self) -> Option<&mut QueueRegisters> {
        if self.device_status() & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.common.selected_mut().filter(|q| !q.enabled)
    }

    fn set_queue_vector(&mut self, vector: u16) {
        let checked = self.state.checked_vector(vector);
        if let Some(slot) = self
            .state
            .queue_vectors
            .get(usize::from(self.common.queue_select))
        {
            slot.store(checked, Ordering::Release);
        }
    }

    fn enable_queue(&mut self, value: u64) {
        if value != 1 {
            // Disabling a queue needs VIRTIO_F_RING_RESET, which is not offered.
            return;
        }
        let name = self.name.clone();
        let packed = self.common.accepted & FEATURE_RING_PACKED != 0;
        if let Some(queue) = self.configurable_queue() {
            if queue.size_is_valid(packed) {
                queue.enabled = true;
            } else {
                tracing::debug!("{name}: refused enabling a queue of size {}", queue.size);
            }
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status();
        // NEEDS_RESET belongs to the device; the driver may only add bits.
        let mut new = (value & !STATUS_NEEDS_RESET) | (old & STATUS_NEEDS_RESET);
        if new & old != old {
            tracing::debug!(
                "{}: driver cleared status bits ({old:#x} -> {value:#x})",
                self.name
            );
            return;
        }
        let setting = |new: u8, bit: u8| new & bit != 0 && old & bit == 0;
        if setting(new, STATUS_FEATURES_OK) && !self.features_acceptable() {
            new &= !STATUS_FEATURES_OK;
        }
        let activate = setting(new, STATUS_DRIVER_OK);
        if activate && new & STATUS_FEATURES_OK == 0 {
            new &= !STATUS_DRIVER_OK;
            self.state.status.store(new, Ordering::Release);
            return;
        }
        self.state.status.store(new, Ordering::Release);
        if activate {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let accepted = self.common.accepted;
        let unoffered = accepted & !self.common.offered;
        if unoffered != 0 {
            tracing::debug!(
                "{}: driver accepted unoffered features {unoffered:#x}",
                self.name
            );
            return false;
        }
        accepted & FEATURE_VERSION_1 != 0
    }

    fn activate(&mut self) {
        self.activate_at(&[]);
    }

    /// Activates with the queues in `positions` resuming where a snapshot left them (the
    /// others start from the beginning, as at DRIVER_OK).
    fn activate_at(&mut self, positions: &[(u16, QueuePosition)]) {
        let features = self.negotiated_features();
        let event_idx = features & FEATURE_EVENT_IDX != 0;
        let packed = features & FEATURE_RING_PACKED != 0;
        let mut bindings = Vec::new();
        for (index, regs) in self.common.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let resume_at = positions.iter().find(|(i, _)| usize::from(*i) == index);
            let built = build_queue(regs, packed, event_idx, &self.mem).and_then(|mut queue| {
                if let Some((_, position)) = resume_at {
                    queue
                        .set_position(*position)
                        .map_err(|_| "saved position does not fit the ring")?;
                }
                let kick = self.kicks.get(index).ok_or("no doorbell")?;
                let kick = kick.try_clone().map_err(|_| "cannot clone the doorbell")?;
                Ok((queue, kick))
            });
            let (queue, kick) = match built {
                Ok(parts) => parts,
                Err(reason) => {
                    tracing::warn!("{}: queue {index}: {reason}; device needs reset", self.name);
                    self.state.set_needs_reset();
                    return;
                }
            };
            bindings.push(QueueBinding {
                // index < MAX_QUEUES.
                index: index as u16,
                queue,
                kick,
                policy: self
                    .policies
                    .get(index)
                    .copied()
                    .unwrap_or(NotifyPolicy::Interrupt),
            });
        }
        self.state.epoch.fetch_add(1, Ordering::AcqRel);
        let interrupt = Arc::new(PciInterrupt::new(self.state.clone()));
        let started = ActiveQueues::start_with(
            self.device.as_mut(),
            &self.name,
            features,
            self.mem.clone(),
            bindings,
            interrupt,
            self.inline_queues,
        );
        match started {
            Ok(active) => self.active = Some(active),
            Err(e) => {
                tracing::warn!("{}: activation failed: {e}; device needs reset", self.name);
                self.state.set_needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        self.quiesced = None;
        self.restored_pending = false;
        match self.active.take() {
            Some(active) => active.reset(self.device.as_mut()),
            None => self.device.reset(),
        }
        self.common.reset();
        self.state.reset();
        for kick in &self.kicks {
            // Non-blocking: an empty eventfd returns WouldBlock, which is what we want.
            let _ = kick.read();
        }
    }

    fn isr_read(&self, at: u64, data: &mut [u8]) {
        data.fill(0);
        if at == 0 {
            if let Some(first) = data.first_mut() {
                *first = self.state.take_isr();
            }
        }
    }

    fn notify_write(&mut self, at: u64, data: &[u8]) {
        let multiplier = u64::from(NOTIFY_OFF_MULTIPLIER);
        if !at.is_multiple_of(multiplier) || !(1..=4).contains(&data.len()) {
            return;
        }
        let queue = at / multiplier;
        if let (Some(active), Ok(index)) = (self.active.as_mut(), u16::try_from(queue)) {
            if active.kick_inline(index) {
                return;
            }
        }
        let Some(kick) = usize::try_from(queue).ok().and_then(|q| self.kicks.get(q)) else {
            return;
        };
        if let Err(e) = kick.write(1) {
            tracing::warn!("{}: doorbell eventfd write failed: {e}", self.name);
        }
    }

    /// `virtio_pci_cfg_cap` window: (offset, length) if the driver programmed a valid access.
    fn pci_cfg_access(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = usize::from(self.config.read_u8(cap + PCI_CFG_BAR));
        let offset = u64::from(self.config.read_u32(cap + PCI_CFG_OFFSET));
        let length = self.config.read_u32(cap + PCI_CFG_LENGTH);
        let valid = bar == VIRTIO_PCI_BAR
            && matches!(length, 1 | 2 | 4)
            && offset.is_multiple_of(u64::from(length))
            && offset + u64::from(length) <= VIRTIO_PCI_BAR_SIZE;
        valid.then_some((offset, length as usize))
    }

    fn pci_cfg_read(&mut self) {
        let Some((offset, length)) = self.pci_cfg_access() else {
            return;
        };
        let mut window = [0u8; 4];
        self.bar_read(VIRTIO_PCI_BAR, offset, &mut window[..length]);
        self.config
            .set_bytes(self.pci_cfg_cap + PCI_CFG_DATA, &window);
    }

    fn pci_cfg_write(&mut self) {
        let Some((offset, length)) = self.pci_cfg_access() else {
            return;
        };
        let mut window = [0u8; 4];
        self.config
            .read(self.pci_cfg_cap + PCI_CFG_DATA, &mut window);
        self.bar_write(VIRTIO_PCI_BAR, offset, &window[..length]);
    }

    fn register_ioevents(&mut self, base: u64) {
        let Some(registrar) = self.ioevents.clone() else {
            return;
        };
        self.ioevent_base = Some(base);
        for (index, kick) in self.kicks.iter().enumerate() {
            let addr = notify_address(base, index);
            let result = registrar.register(kick, addr, NOTIFY_WIDTH, None);
            if let Err(e) = &result {
                tracing::warn!(
                    "{}: ioeventfd for queue {index} at {addr:#x}: {e}",
                    self.name
                );
            }
            if let Some(slot) = self.registered.get_mut(index) {
                *slot = result.is_ok();
            }
        }
    }

    fn unregister_ioevents(&mut self) {
        let (Some(registrar), Some(base)) = (self.ioevents.clone(), self.ioevent_base.take())
        else {
            return;
        };
        for (index, kick) in self.kicks.iter().enumerate() {
            if !self.registered.get(index).copied().unwrap_or(false) {
                continue;
            }
            let addr = notify_address(base, index);
            if let Err(e) = registrar.unregister(kick, addr, NOTIFY_WIDTH, None) {
                tracing::warn!("{}: removing ioeventfd at {addr:#x}: {e}", self.name);
            }
        }
        self.registered.fill(false);
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.unregister_ioevents();
        if let Some(active) = self.active.take() {
            active.reset(self.device.as_mut());
        }
    }
}

/// Whether `[a, a + a_len)` and `[b, b + b_len)` intersect.
fn overlaps(a: usize, a_len: usize, b: usize, b_len: usize) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

fn notify_address(base: u64, queue: usize) -> u64 {
    base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}

/// A region of BAR0 and the offset inside it, for accesses that stay inside one region.
fn split_bar_offset(offset: u64, len: usize) -> Option<(u64, u64)> {
    let region = offset / REGION_SIZE;
    let inside = offset % REGION_SIZE;
    let fits = inside
        .checked_add(len as u64)
        .is_some_and(|end| end <= REGION_SIZE);
    (fits && offset < VIRTIO_PCI_BAR_SIZE).then_some((region * REGION_SIZE, inside))
}

impl PciDevice for VirtioPciDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if overlaps(offset, data.len(), self.pci_cfg_cap + PCI_CFG_DATA, 4) {
            self.pci_cfg_read();
        }
        self.config.read(offset, data);
        self.state.intx.patch_status_read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let msix = &self.state.msix;
        if msix.config_written(&self.config, self.msix_cap, offset, data.len()) {
            self.state.msix_control_changed();
        }
        self.state.intx.config_written(&self.config);
        if overlaps(offset, data.len(), self.pci_cfg_cap + PCI_CFG_DATA, 4) {
            self.pci_cfg_write();
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((region, at)) = split_bar_offset(offset, data.len()) else {
            return;
        };
        if bar != VIRTIO_PCI_BAR {
            return;
        }
        match region {
            COMMON_CFG_OFFSET => self.common_read(at, data),
            ISR_CFG_OFFSET => self.isr_read(at, data),
            DEVICE_CFG_OFFSET => self.device.read_config(at, data),
            MSIX_TABLE_OFFSET => self.state.msix.read_table(at, data),
            MSIX_PBA_OFFSET => self.state.msix.read_pba(at, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let Some((region, at)) = split_bar_offset(offset, data.len()) else {
            return;
        };
        if bar != VIRTIO_PCI_BAR {
            return;
        }
        match region {
            COMMON_CFG_OFFSET => self.common_write(at, data),
            DEVICE_CFG_OFFSET => self.device.write_config(at, data),
            NOTIFY_OFFSET => self.notify_write(at, data),
            MSIX_TABLE_OFFSET => self.state.msix.write_table(at, data),
            MSIX_PBA_OFFSET => self.state.msix.write_pba(at, data),
            _ => {}
        }
    }

    fn intx(&self) -> Option<Arc<PciIntx>> {
        Some(self.state.intx.clone())
    }

    fn save_state(&mut self) -> Option<Result<serde_json::Value, String>> {
        Some(self.save())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.restore(state)
    }

    fn resume_after_save(&mut self) {
        self.resume_saved();
    }

    fn bar_moved(&mut self, bar: usize, _old: Option<u64>, new: Option<u64>) {
        if bar != VIRTIO_PCI_BAR {
            return;
        }
        self.unregister_ioevents();
        if let Some(base) = new {
            self.register_ioevents(base);
        }
    }
}

fn validate_queues(max_sizes: &[u16]) -> Result<(), VirtioPciError> {
    if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
        return Err(VirtioPciError::QueueCount(max_sizes.len()));
    }
    for (index, &size) in max_sizes.iter().enumerate() {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(VirtioPciError::QueueSize { index, size });
        }
    }
    Ok(())
}

fn pci_ids(device_type: u32) -> Result<PciIds, VirtioPciError> {
    let device_id = u16::try_from(device_type)
        .ok()
        .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
        .ok_or(VirtioPciError::DeviceType(device_type))?;
    let class_code = match device_type {
        DEVICE_TYPE_NET => 0x02_0000,
        DEVICE_TYPE_BLOCK => 0x01_0000,
        _ => 0xff_0000,
    };
    Ok(PciIds {
        vendor_id: VIRTIO_PCI_VENDOR_ID,
        device_id,
        class_code,
        revision_id: 1,
        subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
        // Checked above: the type fits 16 bits.
        subsystem_id: device_type as u16,
    })
}

fn default_name(device_type: u32) -> String {
    match device_type {
        DEVICE_TYPE_NET => "virtio-net".into(),
        DEVICE_TYPE_BLOCK => "virtio-blk".into(),
        DEVICE_TYPE_RNG => "virtio-rng".into(),
        other => format!("virtio-{other}"),
    }
}

/// A `virtio_pci_cap` body (after the id/next header) for a structure in BAR0.
fn virtio_cap(cfg_type: u8, offset: u64, length: u32, extra: &[u8]) -> Vec<u8> {
    let cap_len = (VIRTIO_CAP_LEN + extra.len()) as u8;
    let mut body = vec![cap_len, cfg_type, VIRTIO_PCI_BAR as u8, 0, 0, 0];
    // Region offsets are below the 32 KiB BAR size.
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    body.extend_from_slice(extra);
    body
}

/// Installs the five virtio vendor capabilities; returns the PCI cfg access capability offset.
fn install_virtio_capabilities(config: &mut ConfigSpace, queues: usize) -> Result<usize, PciError> {
    let notify_len = (queues as u32) * NOTIFY_OFF_MULTIPLIER;
    let common_len = common::COMMON_CONFIG_LEN as u32;
    let caps = [
        virtio_cap(cfg_type::COMMON, COMMON_CFG_OFFSET, common_len, &[]),
        virtio_cap(
            cfg_type::NOTIFY,
            NOTIFY_OFFSET,
            notify_len,
            &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
        ),
        virtio_cap(cfg_type::ISR, ISR_CFG_OFFSET, ISR_CFG_LEN, &[]),
        virtio_cap(cfg_type::DEVICE, DEVICE_CFG_OFFSET, REGION_SIZE as u32, &[]),
    ];
    for body in caps {
        config.add_capability(PCI_CAP_ID_VENDOR, &body)?;
    }
    // The access window starts zeroed: bar 0, offset 0, length 0 (no access until programmed).
    let pci_cfg = virtio_cap(cfg_type::PCI, 0, 0, &[0; 4]);
    let cap = config.add_capability(PCI_CAP_ID_VENDOR, &pci_cfg)?;
    config.set_write_mask(cap + PCI_CFG_BAR, &[0xff])?;
    config.set_write_mask(cap + PCI_CFG_OFFSET, &[0xff; 12])?;
    Ok(cap)
}

/// The queue the driver's registers describe (packed if VIRTIO_F_RING_PACKED was negotiated:
/// then desc / driver / device are the descriptor ring and the driver and device event
/// suppression areas), checked against the DMA space.
fn build_queue(
    regs: &QueueRegisters,
    packed: bool,
    event_idx: bool,
    mem: &DmaSpace,
) -> Result<VirtQueue, &'static str> {
    if packed {
        build_packed_queue(regs, event_idx, mem).map(VirtQueue::Packed)
    } else {
        build_split_queue(regs, event_idx, mem).map(VirtQueue::Split)
    }
}

fn build_packed_queue(
    regs: &QueueRegisters,
    event_idx: bool,
    mem: &DmaSpace,
) -> Result<PackedQueue, &'static str> {
    if !regs.size_is_valid(true) {
        return Err("bad queue size");
    }
    let mut queue = PackedQueue::new(
        regs.size,
        GuestAddress(regs.desc),
        GuestAddress(regs.driver),
        GuestAddress(regs.device),
    );
    queue.set_event_idx(event_idx);
    if !queue.is_valid(mem) {
        return Err("packed ring misaligned or outside the DMA space");
    }
    Ok(queue)
}

fn build_split_queue(
    regs: &QueueRegisters,
    event_idx: bool,
    mem: &DmaSpace,
) -> Result<Queue, &'static str> {
    let mut queue = Queue::new(regs.max_size).map_err(|_| "bad maximum size")?;
    queue
        .try_set_size(regs.size)
        .map_err(|_| "bad queue size")?;
    queue
        .try_set_desc_table_address(GuestAddress(regs.desc))
        .map_err(|_| "misaligned descriptor table")?;
    queue
        .try_set_avail_ring_address(GuestAddress(regs.driver))
        .map_err(|_| "misaligned driver area")?;
    queue
        .try_set_used_ring_address(GuestAddress(regs.device))
        .map_err(|_| "misaligned device area")?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Err("rings outside the DMA space");
    }
    Ok(queue)
}
