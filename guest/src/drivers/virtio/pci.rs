//! virtio-pci modern transport (virtio 1.x §4.1): vendor capabilities (common, notify, ISR,
//! device config), device status handshake, feature negotiation, queue setup and MSI-X.
//! Every wait has a deadline; capability windows are checked against their BAR's size.

use super::queue::{Queue, MAX_QUEUE_SIZE};
use crate::cmdline::VqLayout;
use crate::interrupts;
use crate::pci::{self, Device};
use crate::phys;
use crate::time::Deadline;

pub const VENDOR_VIRTIO: u16 = 0x1af4;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_RING_PACKED: u64 = 1 << 34;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;
const NO_VECTOR: u16 = 0xffff;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

// Common configuration layout.
const DEVICE_FEATURE_SELECT: u64 = 0;
const DEVICE_FEATURE: u64 = 4;
const DRIVER_FEATURE_SELECT: u64 = 8;
const DRIVER_FEATURE: u64 = 12;
const MSIX_CONFIG: u64 = 16;
const NUM_QUEUES: u64 = 18;
const DEVICE_STATUS: u64 = 20;
const QUEUE_SELECT: u64 = 22;
const QUEUE_SIZE: u64 = 24;
const QUEUE_MSIX_VECTOR: u64 = 26;
const QUEUE_ENABLE: u64 = 28;
const QUEUE_NOTIFY_OFF: u64 = 30;
const QUEUE_DESC: u64 = 32;
const QUEUE_DRIVER: u64 = 40;
const QUEUE_DEVICE: u64 = 48;

/// Why a device could not be used.
#[derive(Debug)]
#[allow(
    dead_code,
    reason = "the fields are read through Debug, in the workload's failure line"
)]
pub enum VirtioError {
    NotFound,
    MissingCapability(&'static str),
    BadBar,
    Timeout(&'static str),
    FeaturesRejected,
    NoVersion1,
    NoQueue(u16),
    NoMemory,
    NoVector,
    NeedsReset,
    BadUsed(u32),
}

/// Virtio device type ids (§5).
pub const TYPE_NET: u16 = 1;
pub const TYPE_BLOCK: u16 = 2;
pub const TYPE_RNG: u16 = 4;

fn transitional_id(device_type: u16) -> Option<u16> {
    match device_type {
        TYPE_NET => Some(0x1000),
        TYPE_BLOCK => Some(0x1001),
        TYPE_RNG => Some(0x1005),
        _ => None,
    }
}

/// The `index`-th virtio device of `device_type` in enumeration order.
pub fn find(device_type: u16, index: usize) -> Option<&'static Device> {
    let modern = 0x1040 + device_type;
    let legacy = transitional_id(device_type);
    pci::devices()
        .iter()
        .filter(|d| d.vendor == VENDOR_VIRTIO && (d.device == modern || Some(d.device) == legacy))
        .nth(index)
}

struct Msix {
    cap: u16,
    table: u64,
    entries: u16,
}

/// An initialised (not yet DRIVER_OK) modern virtio-pci device.
pub struct VirtioPci {
    pub pci: Device,
    common: u64,
    notify_base: u64,
    notify_multiplier: u32,
    notify_len: u64,
    device_cfg: u64,
    device_cfg_len: u64,
    msix: Option<Msix>,
    pub features: u64,
    next_msix_entry: u16,
    /// Vectors assigned to queues (for interrupt counting).
    pub vectors: alloc::vec::Vec<u8>,
    timeout_ms: u64,
}

/// Address of `[offset, offset + len)` inside BAR `bar`, mapped, or an error.
fn bar_window(device: &Device, bar: u8, offset: u32, len: u32) -> Result<u64, VirtioError> {
    let bar = device
        .bars
        .get(usize::from(bar))
        .ok_or(VirtioError::BadBar)?;
    let end = u64::from(offset) + u64::from(len);
    if bar.is_io || bar.addr == 0 || bar.size < end {
        return Err(VirtioError::BadBar);
    }
    let addr = bar.addr + u64::from(offset);
    if addr + u64::from(len) > phys::IDENTITY_LIMIT {
        crate::arch::paging::map_identity(addr, u64::from(len)).map_err(|_| VirtioError::BadBar)?;
    }
    Ok(addr)
}

impl VirtioPci {
    fn common_read8(&self, off: u64) -> u8 {
        phys::mmio_read8(self.common + off)
    }
    fn common_write8(&self, off: u64, v: u8) {
        phys::mmio_write8(self.common + off, v)
    }
    fn common_read16(&self, off: u64) -> u16 {
        phys::mmio_read16(self.common + off)
    }
    fn common_write16(&self, off: u64, v: u16) {
        phys::mmio_write16(self.common + off, v)
    }
    fn common_read32(&self, off: u64) -> u32 {
        phys::mmio_read32(self.common + off)
    }
    fn common_write32(&self, off: u64, v: u32) {
        phys::mmio_write32(self.common + off, v)
    }
    fn common_write64(&self, off: u64, v: u64) {
        self.common_write32(off, v as u32);
        self.common_write32(off + 4, (v >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.common_read8(DEVICE_STATUS)
    }

    fn add_status(&self, bits: u8) {
        let status = self.status();
        self.common_write8(DEVICE_STATUS, status | bits);
    }

    /// Whether the device reported DEVICE_NEEDS_RESET.
    pub fn needs_reset(&self) -> bool {
        self.status() & STATUS_NEEDS_RESET != 0
    }

    /// Resets the device and waits until it reads back 0.
    pub fn reset(&self) -> Result<(), VirtioError> {
        self.common_write8(DEVICE_STATUS, 0);
        let deadline = Deadline::after_ms(self.timeout_ms);
        while self.status() != 0 {
            if deadline.expired() {
                return Err(VirtioError::Timeout("reset"));
            }
            crate::arch::pause();
        }
        Ok(())
    }

    fn read_capabilities(device: &Device, timeout_ms: u64) -> Result<Self, VirtioError> {
        let mut transport = VirtioPci {
            pci: device.clone(),
            common: 0,
            notify_base: 0,
            notify_multiplier: 0,
            notify_len: 0,
            device_cfg: 0,
            device_cfg_len: 0,
            msix: None,
            features: 0,
            next_msix_entry: 0,
            vectors: alloc::vec::Vec::new(),
            timeout_ms,
        };
        let bdf = device.bdf;
        for cap in device.capabilities(CAP_VENDOR) {
            let cfg_type = pci::read8(bdf, cap + 3);
            let bar = pci::read8(bdf, cap + 4);
            let offset = pci::read32(bdf, cap + 8);
            let len = pci::read32(bdf, cap + 12);
            match cfg_type {
                CFG_COMMON if transport.common == 0 && len >= 56 => {
                    transport.common = bar_window(device, bar, offset, len)?
                }
                CFG_NOTIFY if transport.notify_base == 0 => {
                    transport.notify_base = bar_window(device, bar, offset, len)?;
                    transport.notify_len = u64::from(len);
                    transport.notify_multiplier = pci::read32(bdf, cap + 16);
                }
                CFG_ISR => {}
                CFG_DEVICE if transport.device_cfg == 0 => {
                    transport.device_cfg = bar_window(device, bar, offset, len)?;
                    transport.device_cfg_len = u64::from(len);
                }
                _ => {}
            }
        }
        if transport.common == 0 {
            return Err(VirtioError::MissingCapability("common"));
        }
        if transport.notify_base == 0 {
            return Err(VirtioError::MissingCapability("notify"));
        }
        transport.msix = Self::read_msix(device);
        Ok(transport)
    }

    fn read_msix(device: &Device) -> Option<Msix> {
        let cap = *device.capabilities(CAP_MSIX).first()?;
        let control = pci::read16(device.bdf, cap + 2);
        let table = pci::read32(device.bdf, cap + 4);
        let entries = (control & 0x7ff) + 1;
        let addr = bar_window(
            device,
            (table & 7) as u8,
            table & !7,
            u32::from(entries) * 16,
        )
        .ok()?;
        Some(Msix {
            cap,
            table: addr,
            entries,
        })
    }

    /// Finds the capabilities, resets, acknowledges and negotiates `wanted` features
    /// (VERSION_1 is required; RING_PACKED when `vq=packed` asked for it). Leaves the device at
    /// FEATURES_OK.
    pub fn open(device: &Device, wanted: u64, timeout_ms: u64) -> Result<Self, VirtioError> {
        device.set_command_bits(
            pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER | pci::COMMAND_INTX_DISABLE,
        );
        let mut transport = Self::read_capabilities(device, timeout_ms)?;
        transport.reset()?;
        transport.add_status(STATUS_ACKNOWLEDGE);
        transport.add_status(STATUS_DRIVER);
        let offered = transport.device_features();
        if offered & F_VERSION_1 == 0 {
            transport.add_status(STATUS_FAILED);
            return Err(VirtioError::NoVersion1);
        }
        let layout = match super::wanted_layout() {
            VqLayout::Packed => F_RING_PACKED,
            VqLayout::Split => 0,
        };
        let features = offered & (wanted | layout | F_VERSION_1 | F_ACCESS_PLATFORM);
        transport.common_write32(DRIVER_FEATURE_SELECT, 0);
        transport.common_write32(DRIVER_FEATURE, features as u32);
        transport.common_write32(DRIVER_FEATURE_SELECT, 1);
        transport.common_write32(DRIVER_FEATURE, (features >> 32) as u32);
        transport.add_status(STATUS_FEATURES_OK);
        if transport.status() & STATUS_FEATURES_OK == 0 {
            transport.add_status(STATUS_FAILED);
            return Err(VirtioError::FeaturesRejected);
        }
        transport.features = features;
        transport.enable_msix();
        transport.common_write16(MSIX_CONFIG, NO_VECTOR);
        Ok(transport)
    }

    fn device_features(&self) -> u64 {
        self.common_write32(DEVICE_FEATURE_SELECT, 0);
        let low = self.common_read32(DEVICE_FEATURE);
        self.common_write32(DEVICE_FEATURE_SELECT, 1);
        let high = self.common_read32(DEVICE_FEATURE);
        (u64::from(high) << 32) | u64::from(low)
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// The ring layout negotiated (what the queues use).
    pub fn layout(&self) -> VqLayout {
        if self.has(F_RING_PACKED) {
            VqLayout::Packed
        } else {
            VqLayout::Split
        }
    }

    fn enable_msix(&self) {
        if let Some(msix) = &self.msix {
            let control = pci::read16(self.pci.bdf, msix.cap + 2);
            pci::write16(self.pci.bdf, msix.cap + 2, (control | 0x8000) & !0x4000);
        }
    }

    /// Programs the next free MSI-X table entry for a fresh vector delivered to the CPU with
    /// APIC id `destination`; returns (entry, vector).
    fn claim_msix_entry(&mut self, destination: u32) -> Result<(u16, u8), VirtioError> {
        let msix = self.msix.as_ref().ok_or(VirtioError::NoVector)?;
        if self.next_msix_entry >= msix.entries {
            return Err(VirtioError::NoVector);
        }
        let entry = self.next_msix_entry;
        let bdf = self.pci.bdf;
        let owner = (u32::from(bdf.bus) << 24)
            | (u32::from(bdf.device) << 19)
            | (u32::from(bdf.function) << 16)
            | u32::from(entry);
        let vector = interrupts::vector_for(owner).ok_or(VirtioError::NoVector)?;
        let (address, data) = interrupts::msi_message(vector, destination);
        let base = msix.table + 16 * u64::from(entry);
        // Mask while reprogramming: hypervisors (QEMU with irqfd routes) pick up a new
        // message on the mask -> unmask transition.
        phys::mmio_write32(base + 12, 1);
        phys::mmio_write32(base, address as u32);
        phys::mmio_write32(base + 4, (address >> 32) as u32);
        phys::mmio_write32(base + 8, data);
        phys::mmio_write32(base + 12, 0);
        self.next_msix_entry += 1;
        self.vectors.push(vector);
        Ok((entry, vector))
    }

    /// Queues the device offers.
    pub fn num_queues(&self) -> u16 {
        self.common_read16(NUM_QUEUES)
    }

    /// Sets up queue `index` with at most `limit` entries; with `interrupts`, gives it its own
    /// MSI-X vector aimed at this CPU, else none (poll mode).
    pub fn setup_queue(
        &mut self,
        index: u16,
        limit: u16,
        interrupts: bool,
    ) -> Result<Queue, VirtioError> {
        self.setup_queue_for_cpu(index, limit, interrupts, interrupts::apic_id())
    }

    /// `setup_queue` for a queue that the CPU with APIC id `apic_id` will drive: its MSI-X
    /// message is delivered there, so that CPU's HLT wakes on its completions.
    pub fn setup_queue_for_cpu(
        &mut self,
        index: u16,
        limit: u16,
        interrupts: bool,
        apic_id: u32,
    ) -> Result<Queue, VirtioError> {
        self.common_write16(QUEUE_SELECT, index);
        let max = self.common_read16(QUEUE_SIZE);
        if max == 0 || index >= self.num_queues() {
            return Err(VirtioError::NoQueue(index));
        }
        let wanted = max.min(limit).min(MAX_QUEUE_SIZE);
        let size = 1u16 << (15 - wanted.leading_zeros());
        let event_idx = self.has(F_EVENT_IDX);
        let mut queue =
            Queue::new(index, size, event_idx, self.layout()).ok_or(VirtioError::NoMemory)?;
        let (desc, driver_area, device_area) = queue.areas();
        self.common_write16(QUEUE_SIZE, size);
        self.common_write64(QUEUE_DESC, desc);
        self.common_write64(QUEUE_DRIVER, driver_area);
        self.common_write64(QUEUE_DEVICE, device_area);
        let entry = if interrupts {
            self.claim_msix_entry(apic_id)?.0
        } else {
            NO_VECTOR
        };
        self.common_write16(QUEUE_MSIX_VECTOR, entry);
        if self.common_read16(QUEUE_MSIX_VECTOR) != entry {
            return Err(VirtioError::NoVector);
        }
        let notify_off =
            u64::from(self.common_read16(QUEUE_NOTIFY_OFF)) * u64::from(self.notify_multiplier);
        if notify_off + 2 > self.notify_len {
            return Err(VirtioError::BadBar);
        }
        queue.set_notify_addr(self.notify_base + notify_off);
        if !interrupts {
            queue.suppress_interrupts(event_idx);
        }
        self.common_write16(QUEUE_ENABLE, 1);
        Ok(queue)
    }

    /// Final step of initialisation.
    pub fn driver_ok(&self) -> Result<(), VirtioError> {
        self.add_status(STATUS_DRIVER_OK);
        if self.needs_reset() {
            return Err(VirtioError::NeedsReset);
        }
        Ok(())
    }

    /// Device configuration space reads (little-endian); out of range reads give 0.
    pub fn config_read8(&self, off: u64) -> u8 {
        if self.device_cfg == 0 || off >= self.device_cfg_len {
            return 0;
        }
        phys::mmio_read8(self.device_cfg + off)
    }

    pub fn config_read16(&self, off: u64) -> u16 {
        if self.device_cfg == 0 || off + 2 > self.device_cfg_len {
            return 0;
        }
        phys::mmio_read16(self.device_cfg + off)
    }

    pub fn config_read32(&self, off: u64) -> u32 {
        if self.device_cfg == 0 || off + 4 > self.device_cfg_len {
            return 0;
        }
        phys::mmio_read32(self.device_cfg + off)
    }

    /// 64-bit config field, re-read until the config generation is stable.
    pub fn config_read64(&self, off: u64) -> u64 {
        for _ in 0..16 {
            let generation = self.common_read8(21);
            let value =
                u64::from(self.config_read32(off)) | (u64::from(self.config_read32(off + 4)) << 32);
            if self.common_read8(21) == generation {
                return value;
            }
        }
        0
    }

    /// Interrupts received so far on this device's queue vectors.
    pub fn interrupt_count(&self) -> u64 {
        self.vectors.iter().map(|&v| interrupts::count(v)).sum()
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        let _ = self.reset();
    }
}
