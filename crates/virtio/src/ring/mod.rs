//! One ring interface over both virtqueue layouts, so device models never know which one runs.
//!
//! * [`VirtQueue`] is an enum over virtio-queue's split [`Queue`] and sluice's hand-written
//!   [`PackedQueue`] (`packed`). The split arm calls virtio-queue exactly as the handlers did
//!   before, so the split path keeps its behaviour; the match is the only added cost.
//! * [`Chain`] is one popped buffer: a virtio-queue `DescriptorChain` or a [`PackedChain`].
//!   Handlers read it through [`Chain::descriptors`] (buffers as split `Descriptor`s: address,
//!   length, WRITE flag), [`Chain::reader`] and [`Chain::writer`].
//! * [`ChainReader`] / [`ChainWriter`] are virtio-queue's `Reader` / `Writer` for split chains
//!   and a [`BufferCursor`] with the same semantics for packed ones (virtio-queue's cannot be
//!   built from anything but its own split chains).

mod cursor;
pub mod fuzz;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod packed;

use std::io;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use sluice_dma::DmaSpace;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress};

pub use cursor::BufferCursor;
pub use packed::{
    PackedBuffer, PackedChain, PackedError, PackedJournal, PackedQueue, RingDescriptor,
};

use crate::device::QueueError;

/// A virtqueue in either layout.
#[derive(Debug)]
pub enum VirtQueue {
    Split(Queue),
    Packed(PackedQueue),
}

impl From<Queue> for VirtQueue {
    fn from(queue: Queue) -> Self {
        VirtQueue::Split(queue)
    }
}

impl From<PackedQueue> for VirtQueue {
    fn from(queue: PackedQueue) -> Self {
        VirtQueue::Packed(queue)
    }
}

impl VirtQueue {
    /// Number of entries.
    pub fn size(&self) -> u16 {
        match self {
            VirtQueue::Split(q) => q.size(),
            VirtQueue::Packed(q) => q.size(),
        }
    }

    pub fn is_packed(&self) -> bool {
        matches!(self, VirtQueue::Packed(_))
    }

    /// The split queue, if this is one (vhost-user's ring state and inflight tracking).
    pub fn as_split(&self) -> Option<&Queue> {
        match self {
            VirtQueue::Split(q) => Some(q),
            VirtQueue::Packed(_) => None,
        }
    }

    pub fn into_split(self) -> Option<Queue> {
        match self {
            VirtQueue::Split(q) => Some(q),
            VirtQueue::Packed(_) => None,
        }
    }

    pub fn as_split_mut(&mut self) -> Option<&mut Queue> {
        match self {
            VirtQueue::Split(q) => Some(q),
            VirtQueue::Packed(_) => None,
        }
    }

    /// Whether the rings fit `mem` (and, for split, the queue is ready and sized right).
    pub fn is_valid(&self, mem: &DmaSpace) -> bool {
        match self {
            VirtQueue::Split(q) => q.is_valid(mem),
            VirtQueue::Packed(q) => q.is_valid(mem),
        }
    }

    pub fn set_event_idx(&mut self, enabled: bool) {
        match self {
            VirtQueue::Split(q) => q.set_event_idx(enabled),
            VirtQueue::Packed(q) => q.set_event_idx(enabled),
        }
    }

    /// A counter that grows by one per used entry (wrapping); the worker compares it around a
    /// pass to see how many buffers were answered.
    pub fn used_progress(&self) -> u16 {
        match self {
            VirtQueue::Split(q) => q.next_used(),
            VirtQueue::Packed(q) => q.used_count(),
        }
    }

    /// Whether the driver made a buffer available that was not popped yet.
    pub fn has_available(&self, mem: &DmaSpace) -> Result<bool, QueueError> {
        match self {
            VirtQueue::Split(q) => {
                let avail = q.avail_idx(mem, Ordering::Acquire)?;
                Ok(avail != Wrapping(q.next_avail()))
            }
            VirtQueue::Packed(q) => Ok(q.has_available(mem)?),
        }
    }

    /// Buffers the driver published that the device has not taken: exact for a split ring,
    /// 0 or 1 for a packed one (only the next slot is looked at).
    pub fn unread(&self, mem: &DmaSpace) -> Result<u16, QueueError> {
        match self {
            VirtQueue::Split(q) => {
                let avail = q.avail_idx(mem, Ordering::Acquire)?;
                Ok((avail - Wrapping(q.next_avail())).0)
            }
            VirtQueue::Packed(q) => Ok(u16::from(q.has_available(mem)?)),
        }
    }

    /// A value that changes whenever the driver publishes buffers, and only then: the split
    /// ring's avail index, or for a packed ring the end of the available slots (position and
    /// wrap counter).
    /// Comparing two reads tells whether the driver published in between (a worker uses it to
    /// tell chains its handler left in the ring from new ones).
    pub fn avail_marker(&self, mem: &DmaSpace) -> Result<u16, QueueError> {
        match self {
            VirtQueue::Split(q) => Ok(q.avail_idx(mem, Ordering::Acquire)?.0),
            VirtQueue::Packed(q) => Ok(q.available_end(mem)?),
        }
    }

    /// Asks the driver to kick when it publishes buffers past those available now, and returns
    /// the avail marker it armed at. For a worker whose handler left chains in the ring (RX
    /// buffers too few for the waiting packet): with EVENT_IDX, `enable_notification` asks for
    /// a kick at the first chain left, a position the driver has already passed, so it would
    /// not kick again and the ring would stall. The caller must compare the marker afterwards:
    /// the driver may have published before it saw the new event.
    pub fn enable_notification_past_available(
        &mut self,
        mem: &DmaSpace,
    ) -> Result<u16, QueueError> {
        self.log_ring_writes(mem);
        match self {
            VirtQueue::Split(q) => {
                q.enable_notification(mem)?;
                let avail = q.avail_idx(mem, Ordering::Acquire)?.0;
                if q.event_idx_enabled() {
                    set_split_avail_event(q, mem, avail)?;
                }
                fence(Ordering::SeqCst);
                Ok(avail)
            }
            VirtQueue::Packed(q) => Ok(q.enable_notification_past_available(mem)?),
        }
    }

    /// Where the device takes the next buffer (split: next avail index; packed: position and
    /// wrap counter): unchanged across a pass when the handler took nothing.
    pub fn avail_position(&self) -> u16 {
        match self {
            VirtQueue::Split(q) => q.next_avail(),
            VirtQueue::Packed(q) => q.avail_off_wrap(),
        }
    }

    /// Pops the next available buffer; `Err` only for a broken ring.
    pub fn pop<'m>(&mut self, mem: &'m DmaSpace) -> Result<Option<Chain<'m>>, QueueError> {
        let chain = match self {
            VirtQueue::Split(q) => q.iter(mem)?.next().map(Chain::Split),
            VirtQueue::Packed(q) => q.pop(mem)?.map(Chain::Packed),
        };
        if sluice_dma::dirty::is_logging_for(mem) {
            chain.iter().for_each(|c| c.log_device_writes(mem));
        }
        Ok(chain)
    }

    /// Pops every available buffer (split: against one read of the avail index).
    pub fn pop_all<'m>(&mut self, mem: &'m DmaSpace) -> Result<Vec<Chain<'m>>, QueueError> {
        let chains = match self {
            VirtQueue::Split(q) => q.iter(mem)?.map(Chain::Split).collect(),
            VirtQueue::Packed(q) => {
                let mut chains = Vec::new();
                while let Some(chain) = q.pop(mem)? {
                    chains.push(Chain::Packed(chain));
                }
                chains
            }
        };
        if sluice_dma::dirty::is_logging_for(mem) {
            chains.iter().for_each(|c| c.log_device_writes(mem));
        }
        Ok(chains)
    }

    /// Marks the ring memory the device side writes in the migration's dirty log (see
    /// sluice_dma::dirty): split, the used ring with `avail_event`; packed, the descriptor
    /// ring and the device event area.
    fn log_ring_writes(&self, mem: &DmaSpace) {
        if !sluice_dma::dirty::is_logging_for(mem) {
            return;
        }
        match self {
            VirtQueue::Split(q) => {
                // flags, idx, the elements, avail_event (virtio 1.2 §2.7.8).
                let len = 6 + 8 * u64::from(q.size());
                sluice_dma::dirty::mark_on(mem, q.used_ring(), len);
            }
            VirtQueue::Packed(q) => {
                for (addr, len) in q.device_written_areas() {
                    sluice_dma::dirty::mark_on(mem, addr, len);
                }
            }
        }
    }

    /// Gives the last popped (unanswered) buffer back to the ring.
    pub fn undo_pop(&mut self) {
        match self {
            VirtQueue::Split(q) => q.go_to_previous_position(),
            VirtQueue::Packed(q) => q.undo_pop(),
        }
    }

    /// Answers buffer `head` (the chain's [`Chain::head_index`]) with `len` bytes written.
    pub fn add_used(&mut self, mem: &DmaSpace, head: u16, len: u32) -> Result<(), QueueError> {
        self.log_ring_writes(mem);
        match self {
            VirtQueue::Split(q) => Ok(q.add_used(mem, head, len)?),
            VirtQueue::Packed(q) => Ok(q.add_used(mem, head, len)?),
        }
    }

    /// Asks the driver to kick again; true if a buffer arrived meanwhile.
    pub fn enable_notification(&mut self, mem: &DmaSpace) -> Result<bool, QueueError> {
        self.log_ring_writes(mem);
        match self {
            VirtQueue::Split(q) => Ok(q.enable_notification(mem)?),
            VirtQueue::Packed(q) => Ok(q.enable_notification(mem)?),
        }
    }

    /// Asks the driver not to kick.
    pub fn disable_notification(&mut self, mem: &DmaSpace) -> Result<(), QueueError> {
        self.log_ring_writes(mem);
        match self {
            VirtQueue::Split(q) => Ok(q.disable_notification(mem)?),
            VirtQueue::Packed(q) => Ok(q.disable_notification(mem)?),
        }
    }

    /// Whether the driver wants an interrupt now (EVENT_IDX / suppression flags).
    pub fn needs_notification(&mut self, mem: &DmaSpace) -> Result<bool, QueueError> {
        self.log_ring_writes(mem);
        match self {
            VirtQueue::Split(q) => Ok(q.needs_notification(mem)?),
            VirtQueue::Packed(q) => Ok(q.needs_notification(mem)?),
        }
    }
}

/// Where a ring's device side stands, for a snapshot: the next buffer it takes and the next
/// used slot it fills (split: indices; packed: offset and wrap counter, as
/// [`PackedQueue::set_positions`] takes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum QueuePosition {
    Split { next_avail: u16, next_used: u16 },
    Packed { avail: u16, used: u16 },
}

impl VirtQueue {
    pub fn position(&self) -> QueuePosition {
        match self {
            VirtQueue::Split(q) => QueuePosition::Split {
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            },
            VirtQueue::Packed(q) => QueuePosition::Packed {
                avail: q.avail_off_wrap(),
                used: q.used_off_wrap(),
            },
        }
    }

    /// Moves the device side to `position` (a fresh queue built from the same registers).
    pub fn set_position(&mut self, position: QueuePosition) -> Result<(), QueueError> {
        match (self, position) {
            (
                VirtQueue::Split(q),
                QueuePosition::Split {
                    next_avail,
                    next_used,
                },
            ) => {
                q.set_next_avail(next_avail);
                q.set_next_used(next_used);
                Ok(())
            }
            (VirtQueue::Packed(q), QueuePosition::Packed { avail, used }) => {
                Ok(q.set_positions(avail, used)?)
            }
            _ => Err(QueueError::Layout),
        }
    }
}

/// What a worker keeps to hand back a sane queue if its thread died.
#[derive(Debug, Clone)]
pub(crate) enum InitialQueue {
    Split(QueueState),
    Packed(PackedQueue),
}

impl InitialQueue {
    pub(crate) fn of(queue: &VirtQueue) -> Self {
        match queue {
            VirtQueue::Split(q) => InitialQueue::Split(q.state()),
            VirtQueue::Packed(q) => InitialQueue::Packed(q.clone()),
        }
    }

    pub(crate) fn into_queue(self) -> VirtQueue {
        match self {
            InitialQueue::Split(state) => {
                VirtQueue::Split(Queue::try_from(state).unwrap_or_default())
            }
            InitialQueue::Packed(q) => VirtQueue::Packed(q),
        }
    }
}

/// One popped buffer.
#[derive(Debug, Clone)]
pub enum Chain<'m> {
    Split(DescriptorChain<&'m DmaSpace>),
    Packed(PackedChain),
}

impl<'m> Chain<'m> {
    /// The id to answer with in [`VirtQueue::add_used`] (split: head index, packed: buffer id).
    pub fn head_index(&self) -> u16 {
        match self {
            Chain::Split(c) => c.head_index(),
            Chain::Packed(c) => c.id,
        }
    }

    /// The chain's buffers in order (address, length and WRITE flag are meaningful).
    pub fn descriptors(&self) -> Descriptors<'m> {
        match self {
            Chain::Split(c) => Descriptors::Split(c.clone()),
            Chain::Packed(c) => Descriptors::Packed(c.buffers.clone().into_iter()),
        }
    }

    /// Marks the chain's device-writable buffers in the migration's dirty log.
    fn log_device_writes(&self, mem: &DmaSpace) {
        for descriptor in self.descriptors() {
            if descriptor.flags() & VRING_DESC_F_WRITE as u16 != 0 {
                sluice_dma::dirty::mark_on(mem, descriptor.addr().0, u64::from(descriptor.len()));
            }
        }
    }

    /// The device-readable bytes, resolved through `mem`.
    pub fn reader(&self, mem: &'m DmaSpace) -> Result<ChainReader<'m>, virtio_queue::Error> {
        match self {
            Chain::Split(c) => Ok(ChainReader::Split(Reader::new(mem, c.clone())?)),
            Chain::Packed(c) => Ok(ChainReader::Packed(BufferCursor::new(
                mem,
                c.buffers.iter().filter(|b| !b.writable),
                vm_memory::Permissions::Read,
            )?)),
        }
    }

    /// The device-writable bytes, resolved through `mem`.
    pub fn writer(&self, mem: &'m DmaSpace) -> Result<ChainWriter<'m>, virtio_queue::Error> {
        match self {
            Chain::Split(c) => Ok(ChainWriter::Split(Writer::new(mem, c.clone())?)),
            Chain::Packed(c) => Ok(ChainWriter::Packed(BufferCursor::new(
                mem,
                c.buffers.iter().filter(|b| b.writable),
                vm_memory::Permissions::Write,
            )?)),
        }
    }
}

/// Iterator over a chain's buffers (see [`Chain::descriptors`]).
pub enum Descriptors<'m> {
    Split(DescriptorChain<&'m DmaSpace>),
    Packed(std::vec::IntoIter<PackedBuffer>),
}

impl Iterator for Descriptors<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        match self {
            Descriptors::Split(c) => c.next(),
            Descriptors::Packed(buffers) => buffers.next().map(|b| {
                let flags = if b.writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                Descriptor::new(b.addr.0, b.len, flags, 0)
            }),
        }
    }
}

/// Reads a chain's device-readable bytes.
#[derive(Clone)]
pub enum ChainReader<'m> {
    Split(Reader<'m>),
    Packed(BufferCursor<'m>),
}

impl ChainReader<'_> {
    /// Bytes left to read.
    pub fn available_bytes(&self) -> usize {
        match self {
            ChainReader::Split(r) => r.available_bytes(),
            ChainReader::Packed(c) => c.available_bytes(),
        }
    }
}

impl io::Read for ChainReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ChainReader::Split(r) => r.read(buf),
            ChainReader::Packed(c) => Ok(c.read_into(buf)),
        }
    }
}

/// Writes a chain's device-writable bytes.
#[derive(Clone)]
pub enum ChainWriter<'m> {
    Split(Writer<'m>),
    Packed(BufferCursor<'m>),
}

impl ChainWriter<'_> {
    /// Bytes left to write.
    pub fn available_bytes(&self) -> usize {
        match self {
            ChainWriter::Split(w) => w.available_bytes(),
            ChainWriter::Packed(c) => c.available_bytes(),
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> usize {
        match self {
            ChainWriter::Split(w) => w.bytes_written(),
            ChainWriter::Packed(c) => c.bytes_done(),
        }
    }

    /// Keeps the first `offset` bytes here and returns a writer for the rest.
    pub fn split_at(&mut self, offset: usize) -> Result<Self, virtio_queue::Error> {
        match self {
            ChainWriter::Split(w) => Ok(ChainWriter::Split(w.split_at(offset)?)),
            ChainWriter::Packed(c) => Ok(ChainWriter::Packed(c.split_at(offset)?)),
        }
    }
}

impl io::Write for ChainWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ChainWriter::Split(w) => w.write(buf),
            ChainWriter::Packed(c) => Ok(c.write_from(buf)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes a split ring's `avail_event` (after the used ring's entries, virtio 1.2 §2.7.10),
/// which virtio-queue only sets to its own next avail index.
fn set_split_avail_event(queue: &Queue, mem: &DmaSpace, value: u16) -> Result<(), QueueError> {
    const USED_HEADER: u64 = 4;
    const USED_ELEMENT: u64 = 8;
    let offset = USED_HEADER + USED_ELEMENT * u64::from(queue.size());
    let addr = queue
        .used_ring()
        .checked_add(offset)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    mem.store(u16::to_le(value), GuestAddress(addr), Ordering::Release)
        .map_err(|e| QueueError::from(virtio_queue::Error::GuestMemory(e)))
}
