//! Split virtqueue (virtio 1.x §2.7), driver side, in DMA memory (phys == virt). Descriptors
//! the device may not change are shadowed here (chain links and lengths), and every used-ring
//! entry is checked against what is in flight, so a misbehaving device yields an error, not
//! corruption.

use super::queue::{BadUsedEntry, Segment};
use crate::arch::full_barrier;
use crate::mem;
use crate::phys;
use alloc::vec::Vec;
use core::sync::atomic::{compiler_fence, Ordering};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// The three areas of a split ring and the driver's state over them.
pub struct SplitRing {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    next: Vec<u16>,
    chain_len: Vec<u16>,
    avail_idx: u16,
    published_idx: u16,
    last_used: u16,
    event_idx: bool,
}

fn ring_bytes(size: u16) -> (u64, u64, u64) {
    let size = u64::from(size);
    (16 * size, 6 + 2 * size, 6 + 8 * size)
}

impl SplitRing {
    /// Allocates the rings for a queue of `size` (a power of two) entries.
    pub fn new(size: u16, event_idx: bool) -> Option<Self> {
        let (desc_len, avail_len, used_len) = ring_bytes(size);
        Some(Self {
            size,
            desc: mem::alloc_dma(desc_len)?,
            avail: mem::alloc_dma(avail_len)?,
            used: mem::alloc_dma(used_len)?,
            free: (0..size).rev().collect(),
            next: alloc::vec![0; usize::from(size)],
            chain_len: alloc::vec![0; usize::from(size)],
            avail_idx: 0,
            published_idx: 0,
            last_used: 0,
            event_idx,
        })
    }

    /// (descriptor table, driver area, device area) for the transport's queue registers.
    pub fn areas(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Asks the device not to interrupt (used in poll mode without EVENT_IDX).
    pub fn suppress_interrupts(&mut self) {
        phys::mmio_write16(self.avail, AVAIL_F_NO_INTERRUPT);
    }

    fn write_desc(&self, index: u16, segment: &Segment, flags: u16, next: u16) {
        let base = self.desc + 16 * u64::from(index);
        // SAFETY: `index < size`, so the 16-byte descriptor lies inside the table we allocated.
        unsafe {
            core::ptr::write_volatile(base as *mut u64, segment.addr);
            core::ptr::write_volatile((base + 8) as *mut u32, segment.len);
            core::ptr::write_volatile((base + 12) as *mut u16, flags);
            core::ptr::write_volatile((base + 14) as *mut u16, next);
        }
    }

    /// Queues a chain (not yet visible to the device); returns its head id.
    pub fn add(&mut self, segments: &[Segment]) -> Option<u16> {
        if segments.is_empty() || self.free.len() < segments.len() {
            return None;
        }
        let ids: Vec<u16> = (0..segments.len())
            .filter_map(|_| self.free.pop())
            .collect();
        for (i, segment) in segments.iter().enumerate() {
            let has_next = i + 1 < ids.len();
            let next = if has_next { ids[i + 1] } else { 0 };
            let mut flags = if has_next { DESC_F_NEXT } else { 0 };
            if segment.device_writes {
                flags |= DESC_F_WRITE;
            }
            self.write_desc(ids[i], segment, flags, next);
            self.next[usize::from(ids[i])] = next;
        }
        let head = ids[0];
        self.chain_len[usize::from(head)] = ids.len() as u16;
        let slot = u64::from(self.avail_idx % self.size);
        phys::mmio_write16(self.avail + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Some(head)
    }

    /// Makes queued chains visible; returns whether the device wants a notification.
    pub fn publish(&mut self) -> bool {
        if self.avail_idx == self.published_idx {
            return false;
        }
        compiler_fence(Ordering::SeqCst);
        let old = self.published_idx;
        let new = self.avail_idx;
        phys::mmio_write16(self.avail + 2, new);
        self.published_idx = new;
        full_barrier();
        if self.event_idx {
            let event = phys::mmio_read16(self.used + 4 + 8 * u64::from(self.size));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            phys::mmio_read16(self.used) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Whether the device has returned chains not yet taken.
    pub fn has_used(&self) -> bool {
        phys::mmio_read16(self.used + 2) != self.last_used
    }

    /// Takes one completed chain: `(head id, bytes written by the device)`.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, BadUsedEntry> {
        let used_idx = phys::mmio_read16(self.used + 2);
        if used_idx == self.last_used {
            return Ok(None);
        }
        compiler_fence(Ordering::SeqCst);
        let slot = u64::from(self.last_used % self.size);
        let entry = self.used + 4 + 8 * slot;
        let id = phys::mmio_read32(entry);
        let len = phys::mmio_read32(entry + 4);
        let Some(&count) = self.chain_len.get(id as usize).filter(|&&count| count != 0) else {
            return Err(BadUsedEntry { id });
        };
        let head = id as u16;
        self.chain_len[usize::from(head)] = 0;
        let mut current = head;
        for _ in 0..count {
            self.free.push(current);
            current = self.next[usize::from(current)];
        }
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            phys::mmio_write16(self.avail + 4 + 2 * u64::from(self.size), self.last_used);
            full_barrier();
        }
        Ok(Some((head, len)))
    }
}
