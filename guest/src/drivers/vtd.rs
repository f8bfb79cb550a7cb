//! Intel VT-d DMA remapping for the kit (`iommu=vtd`): every PCI function on bus 0 goes behind
//! the remapping unit the ACPI DMAR names, in one second-level domain that maps only the
//! buffers taken with `mem::alloc_dma` (IOVA = physical address, read/write). The kernel image,
//! stacks, page tables and anything taken with `mem::alloc_private` stay out of the devices'
//! reach, so a device told to DMA there is refused and the unit records a fault, which
//! [`take_faults`] reads back from the fault recording registers.
//!
//! Legacy root/context tables, 3- or 4-level tables as the unit's SAGAW allows, 4 KiB pages,
//! register-based global invalidation (context cache and IOTLB) after every change: the kit
//! maps a handful of times per run, and a unit in caching mode (sluice's; QEMU's with
//! `caching-mode=on`) needs an invalidation even when a page goes from absent to present.
//!
//! Interrupt remapping ([`enable_interrupt_remapping`], when ECAP.IR offers it): a one-page
//! table of 256 IRTEs the devices cannot reach (`mem::alloc_private`), xAPIC mode (IRTA.EIME
//! = 0: 8-bit destinations), compatibility-format interrupts left blocked (GCMD.CFI clear), so
//! every MSI must name an IRTE. The interrupt entry cache can only be invalidated through the
//! invalidation queue (VT-d spec 6.5.2.7), so turning remapping on also turns queued
//! invalidation on, and from then every invalidation (context cache, IOTLB, IEC) goes through
//! the queue: register-based invalidation is not allowed while QIE is set (spec 6.5.2).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::global::SpinLock;
use crate::mem::{self, PAGE_SIZE};
use crate::phys::{self, le_u16, le_u64};
use crate::time::Deadline;

const REG_CAP: u64 = 0x08;
const REG_ECAP: u64 = 0x10;
const REG_GCMD: u64 = 0x18;
const REG_GSTS: u64 = 0x1c;
const REG_RTADDR: u64 = 0x20;
const REG_CCMD: u64 = 0x28;
const REG_FSTS: u64 = 0x34;
const REG_IQT: u64 = 0x88;
const REG_IQA: u64 = 0x90;
const REG_IRTA: u64 = 0xb8;

const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;
const GCMD_QIE: u32 = 1 << 26;
const GCMD_IRE: u32 = 1 << 25;
const GCMD_SIRTP: u32 = 1 << 24;
const GCMD_CFI: u32 = 1 << 23;
/// The GCMD bits that stay set (their GSTS bits say so); the others are one-shot commands that
/// must not be repeated when another bit is written.
const GCMD_PERSISTENT: u32 = GCMD_TE | GCMD_QIE | GCMD_IRE | GCMD_CFI;
const ECAP_QI: u64 = 1 << 1;
const ECAP_IR: u64 = 1 << 3;
const CCMD_ICC: u64 = 1 << 63;
const CCMD_GLOBAL: u64 = 1 << 61;
const IOTLB_IVT: u64 = 1 << 63;
const IOTLB_GLOBAL: u64 = 1 << 60;
const IOTLB_DRAIN: u64 = 3 << 48;
const FSTS_PPF: u32 = 1 << 1;
/// An invalidation queue error: the unit refused a descriptor.
const FSTS_IQE: u32 = 1 << 4;
const FRCD_F: u64 = 1 << 63;
/// The fault reasons of interrupt requests (0x20..0x27): their record holds the interrupt
/// index in bits 63:48 of the low quadword instead of a page address.
const INTERRUPT_FAULT_REASONS: core::ops::RangeInclusive<u8> = 0x20..=0x27;

// Invalidation queue descriptors (legacy 128-bit form, spec 6.5.2): type in bits 3:0.
const QUEUE_ENTRIES: u64 = 256;
const DESC_CONTEXT_GLOBAL: u64 = 0x1 | 1 << 4;
/// IOTLB, global, draining reads and writes.
const DESC_IOTLB_GLOBAL: u64 = 0x2 | 1 << 4 | 0b11 << 6;
/// Interrupt entry cache, global (granularity bit 4 clear).
const DESC_IEC_GLOBAL: u64 = 0x4;
/// Invalidation wait with a status write (SW): the data is bits 63:32.
const DESC_WAIT_STATUS: u64 = 0x5 | 1 << 5;

/// IRTA.S for a table of 2^(S+1) = 256 entries: one page.
const IRTA_SIZE_256: u64 = 7;
const IRT_ENTRIES: u16 = 256;
const IRTE_PRESENT: u64 = 1;
/// IRTE bit 12: reserved (must be zero; reason 0x24 when set).
const IRTE_RESERVED_BIT: u64 = 1 << 12;
/// IRTE high quadword: SVT = 1, verify the requester id in SID (all 16 bits, SQ = 0).
const IRTE_SVT_REQUESTER: u64 = 1 << 18;

const DMAR_HEADER_LEN: usize = 48;
const DRHD: u16 = 0;
/// The one domain every device shares.
const DOMAIN_ID: u64 = 1;
const PTE_READ_WRITE: u64 = 0b11;
const ENTRY_PRESENT: u64 = 1;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const REGISTER_WAIT_MS: u64 = 1000;

/// One fault the unit recorded: who, where, why.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    /// Requester id (bus << 8 | device << 3 | function).
    pub source: u16,
    /// The page the device tried to reach (0 for an interrupt request).
    pub address: u64,
    /// The spec's fault reason code.
    pub reason: u8,
    /// The IRTE index an interrupt-remapping fault (reasons 0x20..0x27) names.
    pub interrupt_index: Option<u16>,
    /// A read (true) or a write (false) request.
    pub read: bool,
}

/// Why the unit could not be set up.
pub enum VtdError {
    NoDmar,
    NoMemory,
    /// Neither 3- nor 4-level second-level tables (SAGAW).
    NoTableFormat,
    /// A command the unit did not acknowledge in time (which register).
    Timeout(&'static str),
    /// Interrupt remapping asked of a unit without ECAP.IR (or without queued invalidation),
    /// or before DMA remapping is on.
    NoInterruptRemapping,
    /// The unit refused an invalidation descriptor (FSTS.IQE).
    QueueError,
    /// An IRTE index beyond the table.
    BadIndex,
}

impl core::fmt::Display for VtdError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VtdError::NoDmar => write!(f, "no DMAR table with a DRHD"),
            VtdError::NoMemory => write!(f, "out of memory for the tables"),
            VtdError::NoTableFormat => write!(f, "the unit offers neither 3- nor 4-level tables"),
            VtdError::Timeout(register) => write!(f, "{register} did not complete in time"),
            VtdError::NoInterruptRemapping => write!(f, "the unit offers no interrupt remapping"),
            VtdError::QueueError => write!(f, "the unit refused an invalidation descriptor"),
            VtdError::BadIndex => write!(f, "IRTE index beyond the table"),
        }
    }
}

struct Unit {
    base: u64,
    /// Top-level table of the domain.
    root_table: u64,
    levels: u32,
    iotlb_reg: u64,
    fault_regs: u64,
    fault_count: u64,
    ecap: u64,
    /// Queued invalidation, once interrupt remapping turned it on.
    queue: Option<InvalidationQueue>,
    /// The interrupt remapping table, once remapping is on.
    interrupt_table: Option<u64>,
}

/// The invalidation queue: one page of descriptors and a dword the unit writes when a wait
/// descriptor completes (both private: the unit reads and writes them, no device).
struct InvalidationQueue {
    base: u64,
    /// The next free descriptor (what IQT points at).
    tail: u64,
    status: u64,
    /// The value the next wait descriptor writes to `status`.
    sequence: u32,
}

static ACTIVE: AtomicBool = AtomicBool::new(false);
static MAPPED_BYTES: AtomicU64 = AtomicU64::new(0);
static UNIT: SpinLock<Option<Unit>> = SpinLock::new(None);

/// Whether DMA goes through the unit.
pub fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

/// Bytes mapped for the devices so far.
pub fn mapped_bytes() -> u64 {
    MAPPED_BYTES.load(Ordering::Relaxed)
}

/// Finds the unit, builds the tables for every function on bus 0 and turns translation on.
pub fn enable() -> Result<(), VtdError> {
    let base = register_base().ok_or(VtdError::NoDmar)?;
    let cap = phys::mmio_read64(base + REG_CAP);
    let ecap = phys::mmio_read64(base + REG_ECAP);
    let sagaw = (cap >> 8) & 0x1f;
    let (levels, address_width) = if sagaw & 0b100 != 0 {
        (4, 2)
    } else if sagaw & 0b010 != 0 {
        (3, 1)
    } else {
        return Err(VtdError::NoTableFormat);
    };
    let root_entries = mem::alloc_zeroed_page().ok_or(VtdError::NoMemory)?;
    let context_table = mem::alloc_zeroed_page().ok_or(VtdError::NoMemory)?;
    let domain_root = mem::alloc_zeroed_page().ok_or(VtdError::NoMemory)?;
    write_entry(root_entries, 0, context_table | ENTRY_PRESENT, 0);
    for device in crate::pci::devices().iter().filter(|d| d.bdf.bus == 0) {
        let devfn = u64::from(device.bdf.device) << 3 | u64::from(device.bdf.function);
        write_entry(
            context_table,
            devfn,
            domain_root | ENTRY_PRESENT,
            DOMAIN_ID << 8 | address_width,
        );
    }
    let mut unit = Unit {
        base,
        root_table: domain_root,
        levels,
        iotlb_reg: base + ((ecap >> 8) & 0x3ff) * 16 + 8,
        fault_regs: base + ((cap >> 24) & 0x3ff) * 16,
        fault_count: ((cap >> 40) & 0xff) + 1,
        ecap,
        queue: None,
        interrupt_table: None,
    };
    phys::mmio_write64(base + REG_RTADDR, root_entries);
    command(base, GCMD_SRTP)?;
    unit.invalidate()?;
    command(base, GCMD_TE)?;
    crate::chatter!(
        "vt-d @{:#x}: translation on, {}-level tables, bus 0 behind domain {}",
        base,
        levels,
        DOMAIN_ID
    );
    *UNIT.lock() = Some(unit);
    ACTIVE.store(true, Ordering::Release);
    Ok(())
}

/// `mem::alloc_dma` handed out `[addr, addr + len)`: map it for the devices.
pub fn on_dma_alloc(addr: u64, len: u64) {
    if !active() {
        return;
    }
    let mut unit = UNIT.lock();
    let Some(unit) = unit.as_mut() else {
        return;
    };
    let mapped = (addr..addr + len)
        .step_by(PAGE_SIZE as usize)
        .all(|page| unit.map_page(page));
    if !mapped {
        crate::say!("vt-d: out of memory for page tables at {:#x}", addr);
    }
    MAPPED_BYTES.fetch_add(len, Ordering::Relaxed);
    if let Err(error) = unit.invalidate() {
        crate::say!("vt-d: {} after mapping {:#x}", error, addr);
    }
}

/// The faults recorded since the last call (each record is cleared once read).
pub fn take_faults() -> Vec<Fault> {
    let unit = UNIT.lock();
    let Some(unit) = unit.as_ref() else {
        return Vec::new();
    };
    let mut faults = Vec::new();
    for index in 0..unit.fault_count {
        let record = unit.fault_regs + index * 16;
        let high = phys::mmio_read64(record + 8);
        if high & FRCD_F == 0 {
            continue;
        }
        let low = phys::mmio_read64(record);
        let reason = (high >> 32) as u8;
        let interrupt = INTERRUPT_FAULT_REASONS.contains(&reason);
        faults.push(Fault {
            source: high as u16,
            address: if interrupt { 0 } else { low & !(PAGE_SIZE - 1) },
            reason,
            interrupt_index: interrupt.then_some((low >> 48) as u16),
            read: high & (1 << 62) != 0,
        });
        // F is write-1-to-clear.
        phys::mmio_write64(record + 8, FRCD_F);
    }
    // PPF clears once no record is left; writing it is harmless.
    phys::mmio_write32(unit.base + REG_FSTS, FSTS_PPF);
    faults
}

/// Whether the unit offers interrupt remapping (ECAP.IR) with the queued invalidation it
/// needs (ECAP.QI); false when DMA remapping is off.
pub fn offers_interrupt_remapping() -> bool {
    UNIT.lock()
        .as_ref()
        .is_some_and(|unit| unit.ecap & (ECAP_IR | ECAP_QI) == ECAP_IR | ECAP_QI)
}

/// Turns interrupt remapping on (after [`enable`]): queued invalidation, a table of
/// [`IRT_ENTRIES`] not-present entries in xAPIC mode, SIRTP, a global interrupt entry cache
/// invalidation, then IRE. From here on every MSI must be in remappable format.
pub fn enable_interrupt_remapping() -> Result<(), VtdError> {
    let mut unit = UNIT.lock();
    let unit = unit.as_mut().ok_or(VtdError::NoInterruptRemapping)?;
    if unit.ecap & (ECAP_IR | ECAP_QI) != ECAP_IR | ECAP_QI {
        return Err(VtdError::NoInterruptRemapping);
    }
    if unit.interrupt_table.is_some() {
        return Ok(());
    }
    unit.enable_queue()?;
    let table = mem::alloc_private(PAGE_SIZE).ok_or(VtdError::NoMemory)?;
    // EIME (bit 11) clear: xAPIC destinations.
    phys::mmio_write64(unit.base + REG_IRTA, table | IRTA_SIZE_256);
    command(unit.base, GCMD_SIRTP)?;
    unit.interrupt_table = Some(table);
    unit.invalidate_interrupt_entries()?;
    command(unit.base, GCMD_IRE)?;
    crate::chatter!(
        "vt-d @{:#x}: interrupt remapping on, {} IRTEs at {:#x}, queued invalidation",
        unit.base,
        IRT_ENTRIES,
        table
    );
    Ok(())
}

/// Makes IRTE `index` deliver `vector` (fixed, edge, physical) to the CPU with xAPIC id
/// `destination`, for requests from `requester` only; then invalidates the interrupt entry
/// cache.
pub fn program_irte(
    index: u16,
    vector: u8,
    destination: u8,
    requester: u16,
) -> Result<(), VtdError> {
    write_irte(index, irte_low(vector, destination), irte_high(requester))
}

/// Writes IRTE `index` as [`program_irte`] would, but with reserved bit 12 set: a present
/// entry the unit must refuse to use (fault reason 0x24, "reserved field set in the IRTE").
pub fn program_bad_irte(
    index: u16,
    vector: u8,
    destination: u8,
    requester: u16,
) -> Result<(), VtdError> {
    write_irte(
        index,
        irte_low(vector, destination) | IRTE_RESERVED_BIT,
        irte_high(requester),
    )
}

/// The fault reason a present IRTE with a reserved bit set is recorded with.
pub const REASON_IRTE_RESERVED: u8 = 0x24;

/// The remappable-format MSI (address, data) that names IRTE `index` (no subhandle): address
/// bit 4 the format, bits 19:5 index 14:0, bit 2 index 15.
pub fn remappable_msi(index: u16) -> (u64, u32) {
    let address =
        0xfee0_0000 | u64::from(index & 0x7fff) << 5 | 1 << 4 | u64::from(index >> 15) << 2;
    (address, 0)
}

fn irte_low(vector: u8, destination: u8) -> u64 {
    IRTE_PRESENT | u64::from(vector) << 16 | u64::from(destination) << 40
}

fn irte_high(requester: u16) -> u64 {
    u64::from(requester) | IRTE_SVT_REQUESTER
}

fn write_irte(index: u16, low: u64, high: u64) -> Result<(), VtdError> {
    let mut unit = UNIT.lock();
    let unit = unit.as_mut().ok_or(VtdError::NoInterruptRemapping)?;
    let table = unit.interrupt_table.ok_or(VtdError::NoInterruptRemapping)?;
    if index >= IRT_ENTRIES {
        return Err(VtdError::BadIndex);
    }
    // The high half first: the present bit is in the low half.
    write_qword(table, u64::from(index) * 2 + 1, high);
    write_qword(table, u64::from(index) * 2, low);
    unit.invalidate_interrupt_entries()
}

impl Unit {
    /// Turns queued invalidation on: an empty queue of one page, then GCMD.QIE.
    fn enable_queue(&mut self) -> Result<(), VtdError> {
        if self.queue.is_some() {
            return Ok(());
        }
        let base = mem::alloc_private(PAGE_SIZE).ok_or(VtdError::NoMemory)?;
        let status = mem::alloc_private(PAGE_SIZE).ok_or(VtdError::NoMemory)?;
        phys::mmio_write64(self.base + REG_IQT, 0);
        // QS = 0: 256 descriptors of 16 bytes, one page.
        phys::mmio_write64(self.base + REG_IQA, base);
        command(self.base, GCMD_QIE)?;
        self.queue = Some(InvalidationQueue {
            base,
            tail: 0,
            status,
            sequence: 0,
        });
        Ok(())
    }

    /// Queues `descriptors` and a wait descriptor behind them, and waits until the unit wrote
    /// the wait's status (every descriptor before it is then done).
    fn run_queue(&mut self, descriptors: &[u64]) -> Result<(), VtdError> {
        let base = self.base;
        let queue = self.queue.as_mut().ok_or(VtdError::NoInterruptRemapping)?;
        queue.sequence = queue.sequence.wrapping_add(1);
        let sequence = queue.sequence;
        let wait = (DESC_WAIT_STATUS | u64::from(sequence) << 32, queue.status);
        for (low, high) in descriptors.iter().map(|&low| (low, 0)).chain([wait]) {
            write_entry(queue.base, queue.tail, low, high);
            queue.tail = (queue.tail + 1) % QUEUE_ENTRIES;
        }
        phys::mmio_write64(base + REG_IQT, queue.tail << 4);
        let deadline = Deadline::after_ms(REGISTER_WAIT_MS);
        // SAFETY: the status dword is in a private page the kit allocated for the unit.
        let status = || unsafe { core::ptr::read_volatile(queue.status as *const u32) };
        while status() != sequence {
            if phys::mmio_read32(base + REG_FSTS) & FSTS_IQE != 0 {
                return Err(VtdError::QueueError);
            }
            if deadline.expired() {
                return Err(VtdError::Timeout("invalidation wait"));
            }
            crate::arch::pause();
        }
        Ok(())
    }

    /// Global interrupt entry cache invalidation (queued: there is no register form).
    fn invalidate_interrupt_entries(&mut self) -> Result<(), VtdError> {
        self.run_queue(&[DESC_IEC_GLOBAL])
    }

    /// Maps `page` at IOVA `page`, read/write; false when a table page could not be had.
    fn map_page(&mut self, page: u64) -> bool {
        let mut table = self.root_table;
        for level in (1..self.levels).rev() {
            let index = (page >> (12 + 9 * level)) & 0x1ff;
            let entry = read_qword(table, index);
            table = if entry & PTE_READ_WRITE != 0 {
                entry & ADDRESS_MASK
            } else {
                let Some(next) = mem::alloc_zeroed_page() else {
                    return false;
                };
                write_qword(table, index, next | PTE_READ_WRITE);
                next
            };
        }
        write_qword(table, (page >> 12) & 0x1ff, page | PTE_READ_WRITE);
        true
    }

    /// Global context-cache and IOTLB invalidation, waiting for both: through the queue once
    /// it is on, else with the registers.
    fn invalidate(&mut self) -> Result<(), VtdError> {
        if self.queue.is_some() {
            return self.run_queue(&[DESC_CONTEXT_GLOBAL, DESC_IOTLB_GLOBAL]);
        }
        phys::mmio_write64(self.base + REG_CCMD, CCMD_ICC | CCMD_GLOBAL);
        wait_clear(self.base + REG_CCMD, CCMD_ICC, "CCMD")?;
        phys::mmio_write64(self.iotlb_reg, IOTLB_IVT | IOTLB_GLOBAL | IOTLB_DRAIN);
        wait_clear(self.iotlb_reg, IOTLB_IVT, "IOTLB")
    }
}

/// The first DRHD's register base in the DMAR table.
fn register_base() -> Option<u64> {
    let info = crate::acpi::info()?;
    let &(_, addr, len) = info.tables.iter().find(|(sig, _, _)| sig == b"DMAR")?;
    let data = phys::bytes(addr, len as usize)?;
    let mut offset = DMAR_HEADER_LEN;
    while offset + 16 <= data.len() {
        let kind = le_u16(data, offset);
        let length = usize::from(le_u16(data, offset + 2));
        if length < 4 || offset + length > data.len() {
            return None;
        }
        if kind == DRHD {
            return Some(le_u64(data, offset + 8));
        }
        offset += length;
    }
    None
}

/// Sets `bit` in GCMD on top of what is enabled, and waits for GSTS to show it.
fn command(base: u64, bit: u32) -> Result<(), VtdError> {
    let enabled = phys::mmio_read32(base + REG_GSTS) & GCMD_PERSISTENT;
    phys::mmio_write32(base + REG_GCMD, enabled | bit);
    let deadline = Deadline::after_ms(REGISTER_WAIT_MS);
    while phys::mmio_read32(base + REG_GSTS) & bit == 0 {
        if deadline.expired() {
            return Err(VtdError::Timeout("GSTS"));
        }
        crate::arch::pause();
    }
    Ok(())
}

fn wait_clear(register: u64, bit: u64, name: &'static str) -> Result<(), VtdError> {
    let deadline = Deadline::after_ms(REGISTER_WAIT_MS);
    while phys::mmio_read64(register) & bit != 0 {
        if deadline.expired() {
            return Err(VtdError::Timeout(name));
        }
        crate::arch::pause();
    }
    Ok(())
}

/// Writes the 128-bit root or context entry `index` of `table`.
fn write_entry(table: u64, index: u64, low: u64, high: u64) {
    write_qword(table, index * 2 + 1, high);
    write_qword(table, index * 2, low);
}

fn read_qword(table: u64, index: u64) -> u64 {
    // SAFETY: `table` is a page the kit allocated for the unit and `index` < 512.
    unsafe { core::ptr::read_volatile((table + index * 8) as *const u64) }
}

fn write_qword(table: u64, index: u64, value: u64) {
    // SAFETY: as `read_qword`; the unit reads these pages, so the writes are volatile.
    unsafe { core::ptr::write_volatile((table + index * 8) as *mut u64, value) }
}
