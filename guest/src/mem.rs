//! Physical memory: one bump allocator over the largest RAM region above the kernel (below
//! 4 GiB, so it is identity mapped and phys == virt). It backs the `alloc` heap, page-table
//! pages and DMA buffers alike. Nothing is ever freed: a test run is short and bounded, and a
//! bump allocator cannot corrupt itself.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU64, Ordering};

pub const PAGE_SIZE: u64 = 4096;
/// Used when the loader gives no memory map: a size any configuration has.
const FALLBACK_RAM: u64 = 16 << 20;
const FOUR_GIB: u64 = 1 << 32;

static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static __kernel_end: u8;
}

fn kernel_end() -> u64 {
    // Only the address of the linker symbol is taken (safe since Rust 1.82).
    core::ptr::addr_of!(__kernel_end) as u64
}

/// Picks the largest usable RAM range above the kernel image and below 4 GiB.
pub fn init(ram: &[(u64, u64)]) {
    let floor = kernel_end().max(1 << 20);
    let mut best = (floor, floor + FALLBACK_RAM);
    let mut best_len = 0;
    for &(start, len) in ram {
        let end = start.saturating_add(len).min(FOUR_GIB);
        let start = start.max(floor);
        if end > start && end - start > best_len {
            best = (start, end);
            best_len = end - start;
        }
    }
    NEXT.store(best.0.next_multiple_of(PAGE_SIZE), Ordering::Relaxed);
    END.store(best.1 & !(PAGE_SIZE - 1), Ordering::Relaxed);
}

/// Bytes still available.
pub fn free_bytes() -> u64 {
    END.load(Ordering::Relaxed)
        .saturating_sub(NEXT.load(Ordering::Relaxed))
}

/// Allocates `size` bytes aligned to `align` (a power of two); returns the physical address.
pub fn alloc_phys(size: u64, align: u64) -> Option<u64> {
    let align = align.max(1);
    let mut current = NEXT.load(Ordering::Relaxed);
    loop {
        let start = current.checked_next_multiple_of(align)?;
        let end = start.checked_add(size)?;
        if end > END.load(Ordering::Relaxed) {
            return None;
        }
        match NEXT.compare_exchange(current, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(start),
            Err(seen) => current = seen,
        }
    }
}

/// Allocates zeroed, page-aligned memory for DMA; phys == virt. Behind the kit's IOMMU
/// (`iommu=vtd`) the pages are also mapped for the devices: DMA buffers are the only memory
/// a device may reach.
pub fn alloc_dma(size: u64) -> Option<u64> {
    let addr = alloc_private(size)?;
    crate::drivers::vtd::on_dma_alloc(addr, size.max(1).next_multiple_of(PAGE_SIZE));
    Some(addr)
}

/// Allocates zeroed, page-aligned memory no device is given (stacks, CPU tables, page
/// tables); phys == virt.
pub fn alloc_private(size: u64) -> Option<u64> {
    let addr = alloc_phys(size.max(1).next_multiple_of(PAGE_SIZE), PAGE_SIZE)?;
    // SAFETY: the range was just handed out by the bump allocator and is identity mapped RAM.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, size as usize) };
    Some(addr)
}

/// One zeroed 4 KiB page no device is given.
pub fn alloc_zeroed_page() -> Option<u64> {
    alloc_private(PAGE_SIZE)
}

struct BumpHeap;

// SAFETY: hands out disjoint, suitably aligned ranges of identity-mapped RAM; never reuses them.
unsafe impl GlobalAlloc for BumpHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match alloc_phys(layout.size() as u64, layout.align() as u64) {
            Some(addr) => addr as *mut u8,
            None => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static HEAP: BumpHeap = BumpHeap;
