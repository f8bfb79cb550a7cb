//! [`PackedDriver`]: the driver side of a packed ring in guest memory, for tests (what
//! virtio-queue's `MockSplitQueue` is for split rings). It publishes chains the way Linux's
//! virtio_ring does (descriptors first, the head's flags last behind a release store) and reads
//! used descriptors back; `write_descriptor` lets hostile tests write anything.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use sluice_dma::DmaSpace;
use vm_memory::{Bytes, GuestAddress};

use super::packed::{PackedQueue, DESCRIPTOR_SIZE, EVENT_SIZE};

const AVAIL: u16 = 1 << 7;
const USED: u16 = 1 << 15;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// A driver over a packed ring at a fixed place in `mem`.
pub struct PackedDriver<'m> {
    mem: &'m DmaSpace,
    size: u16,
    ring: GuestAddress,
    driver_event: GuestAddress,
    device_event: GuestAddress,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// Ring descriptors per buffer id in flight.
    counts: HashMap<u16, u16>,
}

impl<'m> PackedDriver<'m> {
    /// A ring of `size` entries at `base`, the driver event area right after it, then the
    /// device event area.
    pub fn new(mem: &'m DmaSpace, base: u64, size: u16) -> Self {
        let ring = GuestAddress(base);
        let driver_event = GuestAddress(base + u64::from(size) * DESCRIPTOR_SIZE);
        let device_event = GuestAddress(driver_event.0 + EVENT_SIZE);
        let zeros = vec![0u8; usize::from(size) * DESCRIPTOR_SIZE as usize + 8];
        mem.write_slice(&zeros, ring).unwrap();
        PackedDriver {
            mem,
            size,
            ring,
            driver_event,
            device_event,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            counts: HashMap::new(),
        }
    }

    /// The device's queue over this ring.
    pub fn queue(&self) -> PackedQueue {
        PackedQueue::new(self.size, self.ring, self.driver_event, self.device_event)
    }

    pub fn ring_address(&self) -> GuestAddress {
        self.ring
    }

    /// Avail / used flags for a descriptor published now.
    fn avail_flags(&self) -> u16 {
        if self.avail_wrap {
            AVAIL
        } else {
            USED
        }
    }

    /// Writes descriptor `index` as is (hostile tests), flags included.
    pub fn write_descriptor(&self, index: u16, addr: u64, len: u32, id: u16, flags: u16) {
        let at = self.ring.0 + u64::from(index) * DESCRIPTOR_SIZE;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(id, GuestAddress(at + 12)).unwrap();
        self.mem
            .store(flags, GuestAddress(at + 14), Ordering::Release)
            .unwrap();
    }

    /// Flags that make a descriptor available at the next avail position, plus `extra`.
    pub fn available(&self, extra: u16) -> u16 {
        self.avail_flags() | extra
    }

    /// Publishes buffer `id` as a chain of `(addr, len, device_writable)` buffers.
    pub fn add_chain(&mut self, id: u16, buffers: &[(u64, u32, bool)]) {
        let head = self.next_avail;
        let head_flags_wrap = self.avail_flags();
        let mut head_flags = 0;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let mut flags = self.avail_flags();
            if writable {
                flags |= F_WRITE;
            }
            if i + 1 < buffers.len() {
                flags |= F_NEXT;
            }
            if i == 0 {
                head_flags = flags;
                // The head goes last: write it unavailable for now.
                self.write_descriptor(self.next_avail, addr, len, id, flags ^ head_flags_wrap);
            } else {
                self.write_descriptor(self.next_avail, addr, len, id, flags);
            }
            self.step_avail();
        }
        self.publish_head(head, head_flags);
        self.counts.insert(id, buffers.len() as u16);
    }

    /// Publishes buffer `id` as one indirect descriptor whose table at `table` holds `buffers`.
    pub fn add_indirect(&mut self, id: u16, table: u64, buffers: &[(u64, u32, bool)]) {
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let at = table + i as u64 * DESCRIPTOR_SIZE;
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(0u16, GuestAddress(at + 12)).unwrap();
            let flags = if writable { F_WRITE } else { 0 };
            self.mem.write_obj(flags, GuestAddress(at + 14)).unwrap();
        }
        let len = (buffers.len() as u64 * DESCRIPTOR_SIZE) as u32;
        let flags = self.avail_flags() | F_INDIRECT;
        self.write_descriptor(self.next_avail, table, len, id, 0);
        let head = self.next_avail;
        self.step_avail();
        self.publish_head(head, flags);
        self.counts.insert(id, 1);
    }

    fn publish_head(&self, head: u16, flags: u16) {
        let at = self.ring.0 + u64::from(head) * DESCRIPTOR_SIZE + 14;
        self.mem
            .store(flags, GuestAddress(at), Ordering::Release)
            .unwrap();
    }

    fn step_avail(&mut self) {
        self.next_avail += 1;
        if self.next_avail == self.size {
            self.next_avail = 0;
            self.avail_wrap = !self.avail_wrap;
        }
    }

    /// The next used buffer `(id, len)`, if the device wrote one.
    pub fn used(&mut self) -> Option<(u16, u32)> {
        let at = self.ring.0 + u64::from(self.next_used) * DESCRIPTOR_SIZE;
        let flags: u16 = self
            .mem
            .load(GuestAddress(at + 14), Ordering::Acquire)
            .unwrap();
        let avail = flags & AVAIL != 0;
        let used = flags & USED != 0;
        if avail != self.used_wrap || used != self.used_wrap {
            return None;
        }
        let id: u16 = self.mem.read_obj(GuestAddress(at + 12)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 8)).unwrap();
        let count = self.counts.remove(&id).unwrap_or(1);
        for _ in 0..count {
            self.next_used += 1;
            if self.next_used == self.size {
                self.next_used = 0;
                self.used_wrap = !self.used_wrap;
            }
        }
        Some((id, len))
    }

    /// Sets the driver event suppression structure (when the device should interrupt).
    pub fn set_driver_event(&self, off_wrap: u16, flags: u16) {
        self.mem.write_obj(off_wrap, self.driver_event).unwrap();
        self.mem
            .write_obj(flags, GuestAddress(self.driver_event.0 + 2))
            .unwrap();
    }

    /// The device event suppression structure `(off_wrap, flags)` (when to kick).
    pub fn device_event(&self) -> (u16, u16) {
        let off_wrap = self.mem.read_obj(self.device_event).unwrap();
        let flags = self
            .mem
            .read_obj(GuestAddress(self.device_event.0 + 2))
            .unwrap();
        (off_wrap, flags)
    }

    /// The driver's next avail position with its wrap counter in bit 15.
    pub fn avail_off_wrap(&self) -> u16 {
        self.next_avail | if self.avail_wrap { 1 << 15 } else { 0 }
    }

    /// The driver's next used position with its wrap counter in bit 15.
    pub fn used_off_wrap(&self) -> u16 {
        self.next_used | if self.used_wrap { 1 << 15 } else { 0 }
    }
}
