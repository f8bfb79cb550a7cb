//! A virtqueue as the drivers see it: chains in, completions out, kicks when the device asks.
//! The ring layout under it (split, §2.7, or packed, §2.8) is fixed at setup by the negotiated
//! features; the drivers do not know which one runs.

use super::packed::PackedRing;
use super::split::SplitRing;
use crate::cmdline::VqLayout;
use crate::phys;

/// Largest ring the kit uses: a blk request takes 3 descriptors, so `qd=256` needs 1024.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// One buffer of a chain.
#[derive(Clone, Copy)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    /// The device writes this buffer (else it reads it).
    pub device_writes: bool,
}

/// The device returned something it was never given.
#[derive(Debug)]
pub struct BadUsedEntry {
    pub id: u32,
}

enum Ring {
    Split(SplitRing),
    Packed(PackedRing),
}

pub struct Queue {
    pub index: u16,
    notify_addr: u64,
    ring: Ring,
    /// Notify-register writes made.
    pub notifies: u64,
}

impl Queue {
    /// Allocates the rings for a queue of `size` (a power of two) entries in `layout`.
    pub fn new(index: u16, size: u16, event_idx: bool, layout: VqLayout) -> Option<Self> {
        let ring = match layout {
            VqLayout::Split => Ring::Split(SplitRing::new(size, event_idx)?),
            VqLayout::Packed => Ring::Packed(PackedRing::new(size, event_idx)?),
        };
        Some(Self {
            index,
            notify_addr: 0,
            ring,
            notifies: 0,
        })
    }

    /// (descriptor area, driver area, device area) for the transport's queue registers.
    pub fn areas(&self) -> (u64, u64, u64) {
        match &self.ring {
            Ring::Split(ring) => ring.areas(),
            Ring::Packed(ring) => ring.areas(),
        }
    }

    pub fn size(&self) -> u16 {
        match &self.ring {
            Ring::Split(ring) => ring.size(),
            Ring::Packed(ring) => ring.size(),
        }
    }

    pub fn set_notify_addr(&mut self, addr: u64) {
        self.notify_addr = addr;
    }

    /// Poll mode: asks the device not to interrupt, where the layout lets the driver say so
    /// (a split ring with EVENT_IDX has no such flag; its queues then have no vector).
    pub fn suppress_interrupts(&mut self, event_idx: bool) {
        match &mut self.ring {
            Ring::Split(ring) if !event_idx => ring.suppress_interrupts(),
            Ring::Split(_) => {}
            Ring::Packed(ring) => ring.suppress_interrupts(),
        }
    }

    /// Queues a chain; returns its id (below `size()`), which `pop_used` hands back.
    pub fn add(&mut self, segments: &[Segment]) -> Option<u16> {
        match &mut self.ring {
            Ring::Split(ring) => ring.add(segments),
            Ring::Packed(ring) => ring.add(segments),
        }
    }

    /// Makes queued chains visible; returns whether the device wants a notification.
    pub fn publish(&mut self) -> bool {
        match &mut self.ring {
            Ring::Split(ring) => ring.publish(),
            Ring::Packed(ring) => ring.publish(),
        }
    }

    /// Writes the notify register.
    pub fn notify(&mut self) {
        phys::mmio_write16(self.notify_addr, self.index);
        self.notifies += 1;
    }

    /// Publishes and notifies if the device asks for it.
    pub fn kick(&mut self) {
        if self.publish() {
            self.notify();
        }
    }

    /// Whether the device has returned chains not yet taken.
    pub fn has_used(&self) -> bool {
        match &self.ring {
            Ring::Split(ring) => ring.has_used(),
            Ring::Packed(ring) => ring.has_used(),
        }
    }

    /// Takes one completed chain: `(id, bytes written by the device)`.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, BadUsedEntry> {
        match &mut self.ring {
            Ring::Split(ring) => ring.pop_used(),
            Ring::Packed(ring) => ring.pop_used(),
        }
    }
}
