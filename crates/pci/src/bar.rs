//! Base address registers: what a device declares ([`BarSpec`]), how the register encodes it, and
//! the [`BarAllocator`] that assigns naturally aligned addresses from the host bridge windows.
//!
//! The windows come in as parameters (the VMM owns the memory map); the allocator is a bump
//! allocator because devices are only added at VM build time, never removed.

use crate::PciError;

/// Address space a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR: one register.
    Mem32,
    /// 64-bit memory BAR: takes this register and the next one (upper half).
    Mem64,
    /// I/O port BAR.
    Io,
}

/// A BAR a device declares: its kind, size (a power of two) and prefetchable flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    pub kind: BarKind,
    pub size: u64,
    pub prefetchable: bool,
}

/// Type bits in the low nibble of a memory BAR.
const BAR_MEM_TYPE_64: u32 = 0b100;
const BAR_MEM_PREFETCHABLE: u32 = 0b1000;
const BAR_IO_SPACE: u32 = 0b1;
/// Low bits of a memory BAR that hold type information, not address.
pub(crate) const BAR_MEM_FLAGS_MASK: u32 = 0xf;
/// Low bits of an I/O BAR that hold type information, not address.
pub(crate) const BAR_IO_FLAGS_MASK: u32 = 0x3;

/// The smallest memory BAR the PCI spec allows.
const MIN_MEM_BAR_SIZE: u64 = 16;
/// I/O BARs are between 4 and 256 bytes.
const MIN_IO_BAR_SIZE: u64 = 4;
const MAX_IO_BAR_SIZE: u64 = 256;
/// The largest 32-bit memory BAR (half of the 4 GiB space).
const MAX_MEM32_BAR_SIZE: u64 = 1 << 31;
/// Highest I/O port + 1.
pub(crate) const IO_SPACE_END: u64 = 0x1_0000;
/// MMIO BARs are placed at least page-aligned so each can later be mmapped or given ioeventfds
/// without sharing a page with another device.
const MMIO_MIN_ALIGN: u64 = 4096;

/// The default I/O port window for BARs: above the legacy ISA/PCI ports.
pub const DEFAULT_IO_WINDOW: (u64, u64) = (0xc000, 0x4000);

impl BarSpec {
    pub fn mem32(size: u64) -> Self {
        Self {
            kind: BarKind::Mem32,
            size,
            prefetchable: false,
        }
    }

    pub fn mem64(size: u64) -> Self {
        Self {
            kind: BarKind::Mem64,
            size,
            prefetchable: false,
        }
    }

    pub fn io(size: u64) -> Self {
        Self {
            kind: BarKind::Io,
            size,
            prefetchable: false,
        }
    }

    /// Marks a memory BAR prefetchable.
    pub fn prefetchable(mut self) -> Self {
        self.prefetchable = true;
        self
    }

    /// Checks the size and flags against what the BAR kind can express.
    pub fn validate(&self) -> Result<(), PciError> {
        if !self.size.is_power_of_two() {
            return Err(PciError::InvalidBar("size is not a power of two"));
        }
        let (min, max) = match self.kind {
            BarKind::Mem32 => (MIN_MEM_BAR_SIZE, MAX_MEM32_BAR_SIZE),
            BarKind::Mem64 => (MIN_MEM_BAR_SIZE, 1 << 63),
            BarKind::Io => (MIN_IO_BAR_SIZE, MAX_IO_BAR_SIZE),
        };
        if self.size < min || self.size > max {
            return Err(PciError::InvalidBar("size out of range for its kind"));
        }
        if self.kind == BarKind::Io && self.prefetchable {
            return Err(PciError::InvalidBar("I/O BARs cannot be prefetchable"));
        }
        Ok(())
    }

    /// The read-only type bits of the (low) BAR register.
    pub(crate) fn type_bits(&self) -> u32 {
        let prefetch = if self.prefetchable {
            BAR_MEM_PREFETCHABLE
        } else {
            0
        };
        match self.kind {
            BarKind::Mem32 => prefetch,
            BarKind::Mem64 => BAR_MEM_TYPE_64 | prefetch,
            BarKind::Io => BAR_IO_SPACE,
        }
    }

    /// Guest-writable bits of the low register: address bits at or above the size.
    pub(crate) fn low_write_mask(&self) -> u32 {
        let flags = match self.kind {
            BarKind::Io => BAR_IO_FLAGS_MASK,
            _ => BAR_MEM_FLAGS_MASK,
        };
        // Truncation keeps bits 31:0 of the address mask; a Mem64 BAR of 4 GiB or more has none.
        (!(self.size - 1) as u32) & !flags
    }

    /// Guest-writable bits of the upper register of a 64-bit BAR.
    pub(crate) fn high_write_mask(&self) -> u32 {
        (!(self.size - 1) >> 32) as u32
    }

    /// The bus the BAR is mapped on is the I/O one.
    pub fn is_io(&self) -> bool {
        self.kind == BarKind::Io
    }

    /// Whether `address` is a place this BAR can decode at (inside its address space, no wrap).
    pub(crate) fn can_decode_at(&self, address: u64) -> bool {
        let Some(last) = address.checked_add(self.size - 1) else {
            return false;
        };
        match self.kind {
            BarKind::Io => last < IO_SPACE_END,
            BarKind::Mem32 => last <= u64::from(u32::MAX),
            BarKind::Mem64 => true,
        }
    }
}

/// A range of addresses BARs may be placed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressWindow {
    start: u64,
    /// Last address in the window (inclusive, so a window may end at `u64::MAX`).
    last: u64,
    /// First address not yet handed out.
    next: u64,
}

impl AddressWindow {
    pub fn new(start: u64, size: u64) -> Result<Self, PciError> {
        let last = size
            .checked_sub(1)
            .and_then(|s| start.checked_add(s))
            .ok_or(PciError::InvalidWindow { start, size })?;
        Ok(Self {
            start,
            last,
            next: start,
        })
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    /// Size in bytes (saturating for a window spanning all 2^64 addresses).
    pub fn size(&self) -> u64 {
        (self.last - self.start).saturating_add(1)
    }

    /// Hands out `size` bytes aligned to `align` (both powers of two), or `None` if full.
    fn allocate(&mut self, size: u64, align: u64) -> Option<u64> {
        let base = self.next.checked_next_multiple_of(align)?;
        let last = base.checked_add(size - 1)?;
        if last > self.last {
            return None;
        }
        self.next = last.saturating_add(1);
        Some(base)
    }
}

/// Assigns BAR addresses: 32-bit memory BARs from the 32-bit window, 64-bit ones from the 64-bit
/// window (falling back to the 32-bit window when it is full), I/O BARs from the port window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarAllocator {
    mmio32: AddressWindow,
    mmio64: AddressWindow,
    io: AddressWindow,
}

impl BarAllocator {
    /// `mmio32` must lie below 4 GiB and `io` below port 0x10000.
    pub fn new(
        mmio32: AddressWindow,
        mmio64: AddressWindow,
        io: AddressWindow,
    ) -> Result<Self, PciError> {
        if mmio32.last > u64::from(u32::MAX) {
            return Err(PciError::InvalidWindow {
                start: mmio32.start,
                size: mmio32.size(),
            });
        }
        if io.last >= IO_SPACE_END {
            return Err(PciError::InvalidWindow {
                start: io.start,
                size: io.size(),
            });
        }
        Ok(Self { mmio32, mmio64, io })
    }

    /// Returns a naturally aligned base address for `spec`.
    pub fn allocate(&mut self, spec: &BarSpec) -> Result<u64, PciError> {
        spec.validate()?;
        let exhausted = PciError::WindowExhausted {
            kind: spec.kind,
            size: spec.size,
        };
        let mmio_align = spec.size.max(MMIO_MIN_ALIGN);
        match spec.kind {
            BarKind::Io => self.io.allocate(spec.size, spec.size),
            BarKind::Mem32 => self.mmio32.allocate(spec.size, mmio_align),
            BarKind::Mem64 => self
                .mmio64
                .allocate(spec.size, mmio_align)
                .or_else(|| self.mmio32.allocate(spec.size, mmio_align)),
        }
        .ok_or(exhausted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocator() -> BarAllocator {
        BarAllocator::new(
            AddressWindow::new(0xc000_0000, 0x2000_0000).unwrap(),
            AddressWindow::new(0x1_0000_0000, 0x4_0000_0000).unwrap(),
            AddressWindow::new(DEFAULT_IO_WINDOW.0, DEFAULT_IO_WINDOW.1).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn write_masks_encode_size() {
        assert_eq!(BarSpec::mem32(0x1000).low_write_mask(), 0xffff_f000);
        assert_eq!(BarSpec::io(0x20).low_write_mask(), 0xffff_ffe0);
        let big = BarSpec::mem64(1 << 33);
        assert_eq!(big.low_write_mask(), 0);
        assert_eq!(big.high_write_mask(), 0xffff_fffe);
        assert_eq!(BarSpec::mem64(0x4000).high_write_mask(), 0xffff_ffff);
    }

    #[test]
    fn validate_rejects_impossible_bars() {
        assert!(BarSpec::mem32(0x3000).validate().is_err());
        assert!(BarSpec::mem32(8).validate().is_err());
        assert!(BarSpec::mem32(1 << 32).validate().is_err());
        assert!(BarSpec::io(512).validate().is_err());
        assert!(BarSpec::io(16).prefetchable().validate().is_err());
        assert!(BarSpec::mem64(0).validate().is_err());
        assert!(BarSpec::mem64(1 << 40).prefetchable().validate().is_ok());
    }

    #[test]
    fn allocations_are_aligned_and_inside_their_windows() {
        let mut alloc = allocator();
        let specs = [
            BarSpec::io(0x20),
            BarSpec::mem32(0x100),
            BarSpec::mem32(0x10_0000),
            BarSpec::io(0x4),
            BarSpec::mem64(0x4000).prefetchable(),
            BarSpec::mem64(1 << 30),
            BarSpec::io(0x100),
        ];

        for spec in specs {
            let base = alloc.allocate(&spec).unwrap();

            assert_eq!(base % spec.size, 0, "{spec:?} at {base:#x}");
            let (start, size) = match spec.kind {
                BarKind::Io => DEFAULT_IO_WINDOW,
                BarKind::Mem32 => (0xc000_0000, 0x2000_0000),
                BarKind::Mem64 => (0x1_0000_0000, 0x4_0000_0000),
            };
            assert!(base >= start && base + spec.size <= start + size);
            if spec.kind != BarKind::Io {
                assert_eq!(base % MMIO_MIN_ALIGN, 0);
            }
        }
    }

    #[test]
    fn allocations_do_not_overlap() {
        let mut alloc = allocator();
        let a = alloc.allocate(&BarSpec::mem32(0x1000)).unwrap();
        let b = alloc.allocate(&BarSpec::mem32(0x10_0000)).unwrap();
        let c = alloc.allocate(&BarSpec::mem32(0x1000)).unwrap();

        assert!(a + 0x1000 <= b);
        assert!(b + 0x10_0000 <= c);
    }

    #[test]
    fn exhausted_window_is_an_error_and_mem64_falls_back() {
        let mut alloc = BarAllocator::new(
            AddressWindow::new(0xc000_0000, 0x2000).unwrap(),
            AddressWindow::new(0x1_0000_0000, 0x1000).unwrap(),
            AddressWindow::new(0xc000, 0x10).unwrap(),
        )
        .unwrap();

        assert_eq!(alloc.allocate(&BarSpec::mem64(0x1000)), Ok(0x1_0000_0000));
        assert_eq!(alloc.allocate(&BarSpec::mem64(0x1000)), Ok(0xc000_0000));
        assert_eq!(alloc.allocate(&BarSpec::mem32(0x1000)), Ok(0xc000_1000));
        assert!(matches!(
            alloc.allocate(&BarSpec::mem32(0x1000)),
            Err(PciError::WindowExhausted { .. })
        ));
        assert!(alloc.allocate(&BarSpec::io(0x10)).is_ok());
        assert!(alloc.allocate(&BarSpec::io(0x4)).is_err());
    }

    #[test]
    fn windows_outside_their_space_are_refused() {
        let high32 = AddressWindow::new(0xffff_f000, 0x2000).unwrap();
        let io = AddressWindow::new(0xc000, 0x4000).unwrap();
        let mmio64 = AddressWindow::new(1 << 32, 1 << 32).unwrap();
        assert!(BarAllocator::new(high32, mmio64.clone(), io).is_err());
        let big_io = AddressWindow::new(0xc000, 0x8000).unwrap();
        let low = AddressWindow::new(0xc000_0000, 0x1000).unwrap();
        assert!(BarAllocator::new(low, mmio64, big_io).is_err());
        assert!(AddressWindow::new(u64::MAX, 2).is_err());
        assert!(AddressWindow::new(0, 0).is_err());
    }
}
