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

const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;
const CCMD_ICC: u64 = 1 << 63;
const CCMD_GLOBAL: u64 = 1 << 61;
const IOTLB_IVT: u64 = 1 << 63;
const IOTLB_GLOBAL: u64 = 1 << 60;
const IOTLB_DRAIN: u64 = 3 << 48;
const FSTS_PPF: u32 = 1 << 1;
const FRCD_F: u64 = 1 << 63;

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
    /// The page the device tried to reach.
    pub address: u64,
    /// The spec's fault reason code.
    pub reason: u8,
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
}

impl core::fmt::Display for VtdError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VtdError::NoDmar => write!(f, "no DMAR table with a DRHD"),
            VtdError::NoMemory => write!(f, "out of memory for the tables"),
            VtdError::NoTableFormat => write!(f, "the unit offers neither 3- nor 4-level tables"),
            VtdError::Timeout(register) => write!(f, "{register} did not complete in time"),
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
    let unit = Unit {
        base,
        root_table: domain_root,
        levels,
        iotlb_reg: base + ((ecap >> 8) & 0x3ff) * 16 + 8,
        fault_regs: base + ((cap >> 24) & 0x3ff) * 16,
        fault_count: ((cap >> 40) & 0xff) + 1,
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
        faults.push(Fault {
            source: high as u16,
            address: phys::mmio_read64(record) & !(PAGE_SIZE - 1),
            reason: (high >> 32) as u8,
            read: high & (1 << 62) != 0,
        });
        // F is write-1-to-clear.
        phys::mmio_write64(record + 8, FRCD_F);
    }
    // PPF clears once no record is left; writing it is harmless.
    phys::mmio_write32(unit.base + REG_FSTS, FSTS_PPF);
    faults
}

impl Unit {
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

    /// Global context-cache and IOTLB invalidation, waiting for both.
    fn invalidate(&self) -> Result<(), VtdError> {
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
    let enabled = phys::mmio_read32(base + REG_GSTS) & (GCMD_TE);
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
