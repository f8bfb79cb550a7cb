//! Identity mappings beyond the boot tables: the boot code maps the first 4 GiB; device BARs
//! placed higher (64-bit windows) are mapped here on demand with uncached 2 MiB pages. Every
//! mapping is user-accessible, like the boot tables', so that the workloads' data paths can
//! run at CPL3 (arch::ring3); the kit has no user/kernel secrets to keep apart.

use core::ptr::addr_of_mut;

/// Present, writable and user-accessible: ring 3 (arch::ring3) reaches BARs and RAM too.
const PRESENT_WRITABLE: u64 = 0x7;
const HUGE: u64 = 0x80;
const UNCACHED: u64 = 0x18;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const TWO_MIB: u64 = 2 << 20;
/// Addresses the 4-level tables can name (48-bit, lower half).
const MAX_IDENTITY: u64 = 1 << 47;

extern "C" {
    static mut boot_pml4: [u64; 512];
}

/// Error from `map_identity`.
#[derive(Debug)]
pub enum MapError {
    OutOfRange,
    OutOfMemory,
}

fn table_at(phys: u64) -> &'static mut [u64; 512] {
    // SAFETY: page tables are identity mapped (they live in low RAM or bss) and owned by us.
    unsafe { &mut *(phys as *mut [u64; 512]) }
}

fn next_table(entry: &mut u64) -> Result<&'static mut [u64; 512], MapError> {
    if *entry & 1 == 0 {
        let frame = crate::mem::alloc_zeroed_page().ok_or(MapError::OutOfMemory)?;
        *entry = frame | PRESENT_WRITABLE;
    }
    Ok(table_at(*entry & ADDRESS_MASK))
}

/// Identity-maps `[phys, phys + len)` uncached, unless already mapped.
pub fn map_identity(phys: u64, len: u64) -> Result<(), MapError> {
    let end = phys.checked_add(len).ok_or(MapError::OutOfRange)?;
    if end > MAX_IDENTITY {
        return Err(MapError::OutOfRange);
    }
    let mut page = phys & !(TWO_MIB - 1);
    // SAFETY: boot_pml4 is the live top-level table; single CPU, no concurrent walkers.
    let pml4 = unsafe { &mut *addr_of_mut!(boot_pml4) };
    while page < end {
        let pdpt = next_table(&mut pml4[((page >> 39) & 511) as usize])?;
        let pd = next_table(&mut pdpt[((page >> 30) & 511) as usize])?;
        let entry = &mut pd[((page >> 21) & 511) as usize];
        if *entry & 1 == 0 {
            *entry = page | PRESENT_WRITABLE | HUGE | UNCACHED;
        }
        page += TWO_MIB;
    }
    super::flush_tlb();
    Ok(())
}
