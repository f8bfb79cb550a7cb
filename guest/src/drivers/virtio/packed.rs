//! Packed virtqueue (virtio 1.2 §2.8, VIRTIO_F_RING_PACKED), driver side, in DMA memory
//! (phys == virt).
//!
//! Hand-written like the split ring: the kit is freestanding `no_std` with its own DMA
//! allocator, and no crate has a driver-side packed ring for that setting.
//!
//! Layout: `size` 16-byte descriptors {addr u64, len u32, id u16, flags u16}; the driver event
//! suppression area (written here: when the device should interrupt) and the device event
//! suppression area (read here: when the device wants a kick), each {off_wrap u16, flags u16}.
//!
//! A chain of n buffers takes the next n ring positions; every descriptor carries the chain's
//! buffer id, and its AVAIL/USED flags encode the avail wrap counter of its own position. The
//! head's flags are stored last, so the device never sees a partly written chain. The device
//! writes one used descriptor per chain at its used position and then skips the chain's length,
//! so the driver's used position advances by the length of the chain whose id it finds there.
//! Ids come from a pool of `size`, so an id names at most one chain in flight, and every used
//! descriptor is checked against that (unknown id: [`BadUsedEntry`], never corruption).

use super::queue::{BadUsedEntry, Segment};
use crate::arch::full_barrier;
use crate::mem;
use crate::phys;
use alloc::vec::Vec;
use core::sync::atomic::{compiler_fence, Ordering};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_AVAIL: u16 = 1 << 7;
const DESC_F_USED: u16 = 1 << 15;
const EVENT_ENABLE: u16 = 0;
const EVENT_DISABLE: u16 = 1;
const EVENT_DESC: u16 = 2;
const WRAP_BIT: u16 = 1 << 15;
const DESCRIPTOR_SIZE: u64 = 16;
const EVENT_SIZE: u64 = 4;
const DESC_ID_OFFSET: u64 = 12;
const DESC_FLAGS_OFFSET: u64 = 14;
const EVENT_FLAGS_OFFSET: u64 = 2;

/// A ring position and the wrap counter that goes with it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Position {
    index: u16,
    wrap: bool,
}

impl Position {
    /// Where both rings start: index 0, wrap counters set (§2.8.1).
    const START: Position = Position {
        index: 0,
        wrap: true,
    };

    fn advance(self, count: u16, size: u16) -> Position {
        let index = u32::from(self.index) + u32::from(count);
        if index >= u32::from(size) {
            Position {
                index: (index - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            Position {
                index: index as u16,
                wrap: self.wrap,
            }
        }
    }

    /// The position on the doubled ring (0..2*size), where wrap-counter laps are comparable.
    fn linear(self, size: u16) -> u32 {
        u32::from(self.index) + if self.wrap { 0 } else { u32::from(size) }
    }

    fn off_wrap(self) -> u16 {
        self.index | if self.wrap { WRAP_BIT } else { 0 }
    }

    fn from_off_wrap(off_wrap: u16) -> Position {
        Position {
            index: off_wrap & !WRAP_BIT,
            wrap: off_wrap & WRAP_BIT != 0,
        }
    }

    /// Steps from `self` forward to `to` on the doubled ring.
    fn distance_to(self, to: Position, size: u16) -> u32 {
        let ring = 2 * u32::from(size);
        (to.linear(size) + ring - self.linear(size)) % ring
    }

    /// The AVAIL/USED bits that make a descriptor at this position available.
    fn avail_flags(self) -> u16 {
        if self.wrap {
            DESC_F_AVAIL
        } else {
            DESC_F_USED
        }
    }

    /// Whether `flags` mark the descriptor at this position as used by the device.
    fn is_used(self, flags: u16) -> bool {
        let avail = flags & DESC_F_AVAIL != 0;
        let used = flags & DESC_F_USED != 0;
        avail == used && used == self.wrap
    }
}

/// How the driver asks the device to interrupt (driver event suppression).
#[derive(Clone, Copy, PartialEq, Eq)]
enum InterruptRequest {
    Always,
    Never,
    /// EVENT_IDX: at the used descriptor at the driver's next used position.
    AtNextUsed,
}

/// The three areas of a packed ring and the driver's state over them.
pub struct PackedRing {
    size: u16,
    ring: u64,
    driver_event: u64,
    device_event: u64,
    next_avail: Position,
    published: Position,
    next_used: Position,
    free_descriptors: u16,
    free_ids: Vec<u16>,
    /// Ring positions the chain with this id occupies; 0: not in flight.
    chain_len: Vec<u16>,
    event_idx: bool,
    interrupts: InterruptRequest,
}

impl PackedRing {
    /// Allocates a packed ring of `size` (at most 2^15) descriptors.
    pub fn new(size: u16, event_idx: bool) -> Option<Self> {
        let mut ring = Self {
            size,
            ring: mem::alloc_dma(DESCRIPTOR_SIZE * u64::from(size))?,
            driver_event: mem::alloc_dma(EVENT_SIZE)?,
            device_event: mem::alloc_dma(EVENT_SIZE)?,
            next_avail: Position::START,
            published: Position::START,
            next_used: Position::START,
            free_descriptors: size,
            free_ids: (0..size).rev().collect(),
            chain_len: alloc::vec![0; usize::from(size)],
            event_idx,
            interrupts: InterruptRequest::Always,
        };
        if event_idx {
            ring.request_interrupts(InterruptRequest::AtNextUsed);
        }
        Some(ring)
    }

    /// (descriptor ring, driver area, device area) for the transport's queue registers.
    pub fn areas(&self) -> (u64, u64, u64) {
        (self.ring, self.driver_event, self.device_event)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Asks the device never to interrupt (poll mode).
    pub fn suppress_interrupts(&mut self) {
        self.request_interrupts(InterruptRequest::Never);
    }

    fn request_interrupts(&mut self, request: InterruptRequest) {
        self.interrupts = request;
        let flags = match request {
            InterruptRequest::Always => EVENT_ENABLE,
            InterruptRequest::Never => EVENT_DISABLE,
            InterruptRequest::AtNextUsed => {
                phys::mmio_write16(self.driver_event, self.next_used.off_wrap());
                EVENT_DESC
            }
        };
        compiler_fence(Ordering::Release);
        phys::mmio_write16(self.driver_event + EVENT_FLAGS_OFFSET, flags);
    }

    fn descriptor(&self, at: Position) -> u64 {
        self.ring + DESCRIPTOR_SIZE * u64::from(at.index)
    }

    fn write_descriptor(&self, at: Position, segment: &Segment, id: u16) {
        let base = self.descriptor(at);
        // SAFETY: `at.index < size`, so the 16-byte descriptor lies inside the ring we allocated.
        unsafe {
            core::ptr::write_volatile(base as *mut u64, segment.addr);
            core::ptr::write_volatile((base + 8) as *mut u32, segment.len);
            core::ptr::write_volatile((base + DESC_ID_OFFSET) as *mut u16, id);
        }
    }

    fn write_flags(&self, at: Position, flags: u16) {
        phys::mmio_write16(self.descriptor(at) + DESC_FLAGS_OFFSET, flags);
    }

    /// Makes a chain available; returns its buffer id.
    pub fn add(&mut self, segments: &[Segment]) -> Option<u16> {
        let count = u16::try_from(segments.len()).ok()?;
        if count == 0 || count > self.free_descriptors {
            return None;
        }
        let id = self.free_ids.pop()?;
        let head = self.next_avail;
        let mut head_flags = 0;
        let mut at = head;
        for (i, segment) in segments.iter().enumerate() {
            self.write_descriptor(at, segment, id);
            let mut flags = at.avail_flags();
            if i + 1 < segments.len() {
                flags |= DESC_F_NEXT;
            }
            if segment.device_writes {
                flags |= DESC_F_WRITE;
            }
            if i == 0 {
                head_flags = flags;
            } else {
                self.write_flags(at, flags);
            }
            at = at.advance(1, self.size);
        }
        // The head's flags hand the whole chain over: everything else must be visible first
        // (x86 keeps stores in order; the fence keeps the compiler from reordering them).
        compiler_fence(Ordering::Release);
        self.write_flags(head, head_flags);
        self.chain_len[usize::from(id)] = count;
        self.free_descriptors -= count;
        self.next_avail = at;
        Some(id)
    }

    /// Ends a batch of `add`s; returns whether the device wants a notification for it.
    pub fn publish(&mut self) -> bool {
        let old = self.published;
        let new = self.next_avail;
        if old == new {
            return false;
        }
        self.published = new;
        // The new flags must be visible before the device's event area is read.
        full_barrier();
        let event = phys::mmio_read32(self.device_event);
        let off_wrap = event as u16;
        match (event >> 16) as u16 {
            EVENT_DISABLE => false,
            EVENT_DESC if self.event_idx => {
                let wanted = Position::from_off_wrap(off_wrap);
                if wanted.index >= self.size {
                    return true;
                }
                old.distance_to(wanted, self.size) < old.distance_to(new, self.size)
            }
            // ENABLE, DESC without EVENT_IDX and reserved values: notify (never lose a kick).
            _ => true,
        }
    }

    /// Whether the device has returned chains not yet taken.
    pub fn has_used(&self) -> bool {
        let flags = phys::mmio_read16(self.descriptor(self.next_used) + DESC_FLAGS_OFFSET);
        self.next_used.is_used(flags)
    }

    /// Takes one completed chain: `(buffer id, bytes written by the device)`.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, BadUsedEntry> {
        if !self.has_used() {
            return Ok(None);
        }
        // The id and length are read only after the flags said the descriptor is used.
        compiler_fence(Ordering::Acquire);
        let base = self.descriptor(self.next_used);
        let len = phys::mmio_read32(base + 8);
        let id = phys::mmio_read16(base + DESC_ID_OFFSET);
        let Some(&count) = self
            .chain_len
            .get(usize::from(id))
            .filter(|&&count| count != 0)
        else {
            return Err(BadUsedEntry { id: u32::from(id) });
        };
        self.chain_len[usize::from(id)] = 0;
        self.free_ids.push(id);
        self.free_descriptors += count;
        self.next_used = self.next_used.advance(count, self.size);
        if self.interrupts == InterruptRequest::AtNextUsed {
            phys::mmio_write16(self.driver_event, self.next_used.off_wrap());
            full_barrier();
        }
        Ok(Some((id, len)))
    }
}
