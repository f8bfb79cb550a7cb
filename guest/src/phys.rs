//! Access to physical memory and MMIO through the identity map, with bounds checks.

/// First 4 GiB are identity mapped by the boot code.
pub const IDENTITY_LIMIT: u64 = 1 << 32;

/// Bytes of RAM at `[addr, addr + len)`, if that range lies in the boot identity map.
pub fn bytes(addr: u64, len: usize) -> Option<&'static [u8]> {
    let end = addr.checked_add(len as u64)?;
    if addr == 0 || end > IDENTITY_LIMIT {
        return None;
    }
    // SAFETY: the range is identity mapped; firmware tables are never written while we read.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// Little-endian integer helpers over byte slices; out-of-range offsets read as 0.
pub fn le_u8(data: &[u8], offset: usize) -> u8 {
    data.get(offset).copied().unwrap_or(0)
}

pub fn le_u16(data: &[u8], offset: usize) -> u16 {
    u16::from(le_u8(data, offset)) | (u16::from(le_u8(data, offset + 1)) << 8)
}

pub fn le_u32(data: &[u8], offset: usize) -> u32 {
    u32::from(le_u16(data, offset)) | (u32::from(le_u16(data, offset + 2)) << 16)
}

pub fn le_u64(data: &[u8], offset: usize) -> u64 {
    u64::from(le_u32(data, offset)) | (u64::from(le_u32(data, offset + 4)) << 32)
}

/// Volatile MMIO accessors.
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: callers pass addresses inside BARs/ECAM/LAPIC that are identity mapped uncached.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

pub fn mmio_read64(addr: u64) -> u64 {
    // SAFETY: as `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

pub fn mmio_write64(addr: u64, value: u64) {
    // SAFETY: as `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

pub fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: as `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

pub fn mmio_write16(addr: u64, value: u16) {
    // SAFETY: as `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

pub fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: as `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: as `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}
