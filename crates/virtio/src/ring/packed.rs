//! [`PackedQueue`]: the device side of a packed virtqueue (virtio 1.2 §2.8, VIRTIO_F_RING_PACKED).
//!
//! Written by hand: rust-vmm's `virtio-queue` (0.18) has only split rings — it defines the
//! packed descriptor and event structures but no queue over them — and no other crate has a
//! device-side packed ring that works through an arbitrary `GuestMemory` (sluice's
//! [`DmaSpace`], identity or IOMMU-translated).
//!
//! Layout (the three addresses of the transport's queue registers):
//! * descriptor ring: `size` 16-byte descriptors {addr u64, len u32, id u16, flags u16};
//! * driver event suppression (the "driver area"), written by the driver, read here: when the
//!   device should interrupt;
//! * device event suppression (the "device area"), written here: when the driver should kick.
//!
//! A descriptor at the device's next position is available when its AVAIL flag equals the
//! device's avail wrap counter and its USED flag does not. Buffers are chains of descriptors
//! (NEXT) or one indirect descriptor whose table holds the buffers; the buffer id is the last
//! descriptor's. A used buffer is written back at the device's used position as one descriptor
//! {id, len, flags with AVAIL = USED = used wrap counter}, flags last behind a release store so
//! the driver never sees the flags before the id and length; the used position then advances by
//! the number of ring descriptors the buffer occupied (so completions may be out of order).
//!
//! Everything the driver writes is checked: ring and event areas must fit the DMA space
//! ([`PackedQueue::is_valid`]), a chain may not be longer than the ring, an indirect table must
//! be a non-empty multiple of 16 bytes of at most [`MAX_INDIRECT_DESCRIPTORS`] entries inside the
//! DMA space, indirect descriptors may not be chained or nested, buffer ids must be below the
//! queue size and not already in flight, and a used entry must name a buffer in flight. Any
//! violation is a [`PackedError`] (the worker then sets DEVICE_NEEDS_RESET); buffers that lie
//! outside the DMA space are refused later, when the device model maps them.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use sluice_dma::DmaSpace;
use virtio_bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED, VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_F_WRAP_CTR,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// Bytes per packed descriptor.
pub const DESCRIPTOR_SIZE: u64 = 16;
/// Bytes of one event suppression structure {off_wrap u16, flags u16}.
pub const EVENT_SIZE: u64 = 4;
/// Largest packed queue: positions must fit the 15 offset bits of `off_wrap`.
pub const MAX_QUEUE_SIZE: u16 = 1 << 15;
/// Most entries in one indirect table (virtio-blk's seg_max is at most 254; net needs ~20).
pub const MAX_INDIRECT_DESCRIPTORS: u32 = 1024;

const AVAIL_FLAG: u16 = 1 << VRING_PACKED_DESC_F_AVAIL;
const USED_FLAG: u16 = 1 << VRING_PACKED_DESC_F_USED;
const NEXT_FLAG: u16 = VRING_DESC_F_NEXT as u16;
const WRITE_FLAG: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT_FLAG: u16 = VRING_DESC_F_INDIRECT as u16;
const EVENT_ENABLE: u16 = VRING_PACKED_EVENT_FLAG_ENABLE as u16;
const EVENT_DISABLE: u16 = VRING_PACKED_EVENT_FLAG_DISABLE as u16;
const EVENT_DESC: u16 = VRING_PACKED_EVENT_FLAG_DESC as u16;
const WRAP_BIT: u16 = 1 << VRING_PACKED_EVENT_F_WRAP_CTR;

/// Offsets inside a descriptor and an event structure.
const DESC_LEN_OFFSET: u64 = 8;
const DESC_ID_OFFSET: u64 = 12;
const DESC_FLAGS_OFFSET: u64 = 14;
const EVENT_FLAGS_OFFSET: u64 = 2;

/// A ring the driver broke (the device needs a reset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackedError {
    #[error("guest memory access failed at {0:#x}")]
    Memory(u64),
    #[error("descriptor chain longer than the ring ({0} entries)")]
    ChainTooLong(u16),
    #[error("an indirect descriptor is chained or inside an indirect table")]
    BadIndirect,
    #[error("indirect table of {0} bytes (not a non-empty multiple of 16 within the limit)")]
    BadIndirectTable(u32),
    #[error("buffer id {0} is not below the queue size")]
    BadId(u16),
    #[error("buffer id {0} is already in flight")]
    IdInFlight(u16),
    #[error("used entry for buffer {0}, which is not in flight")]
    NotInFlight(u16),
    #[error("the queue is not ready")]
    NotReady,
    #[error("ring positions {0:#06x} (avail) / {1:#06x} (used) do not fit the ring")]
    BadPosition(u16, u16),
    #[error("the in-flight journal cannot record buffer {0}")]
    Journal(u16),
}

/// A ring descriptor as the driver wrote it (what a [`PackedJournal`] keeps, because the
/// device's used entries overwrite ring slots of buffers still in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingDescriptor {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

/// Keeps the buffers in flight of a packed ring where they outlive the device process
/// (vhost-user's INFLIGHT_SHMFD area). The queue calls it on every pop, given-back pop and
/// used entry; a journal must not fail a used entry (it may only refuse a pop).
pub trait PackedJournal: Send + Sync {
    /// Buffer `id` was taken; `descriptors` are its ring descriptors in ring order. An error
    /// fails the pop (the ring is then broken: nothing is lost silently).
    fn popped(&self, id: u16, descriptors: &[RingDescriptor]) -> Result<(), PackedError>;
    /// The pop of buffer `id` was given back (`undo_pop`).
    fn unpopped(&self, id: u16);
    /// Buffer `id` is being written back; the used position after it is `next_used`
    /// (`off_wrap` form). Called before the used descriptor's flags are written.
    fn using(&self, id: u16, next_used: u16);
    /// Buffer `id`'s used descriptor is visible to the driver.
    fn used(&self, id: u16);
}

/// A queue's journal, if any (the `Debug` of `PackedQueue` does not look inside).
#[derive(Clone, Default)]
struct Journal(Option<Arc<dyn PackedJournal>>);

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Journal" } else { "None" })
    }
}

/// One buffer of a chain as the driver described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedBuffer {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub writable: bool,
}

/// One available buffer popped from the ring: its id and its buffers in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedChain {
    pub id: u16,
    pub buffers: Vec<PackedBuffer>,
}

/// A ring position together with its wrap counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    index: u16,
    wrap: bool,
}

impl Position {
    const START: Position = Position {
        index: 0,
        wrap: true,
    };

    /// `count` entries further on a ring of `size` (count <= size).
    fn advance(self, count: u16, size: u16) -> Position {
        let next = u32::from(self.index) + u32::from(count);
        if next >= u32::from(size) {
            // next < 2 * size <= 2^16, and the difference is below size.
            Position {
                index: (next - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            Position {
                index: next as u16,
                wrap: self.wrap,
            }
        }
    }

    /// The position on the doubled ring (0..2*size), where distances are plain differences.
    fn linear(self, size: u16) -> u32 {
        u32::from(self.index) + if self.wrap { 0 } else { u32::from(size) }
    }

    /// The `off_wrap` encoding: offset in bits 0..15, wrap counter in bit 15.
    fn off_wrap(self) -> u16 {
        self.index | if self.wrap { WRAP_BIT } else { 0 }
    }

    fn from_off_wrap(off_wrap: u16) -> Position {
        Position {
            index: off_wrap & !WRAP_BIT,
            wrap: off_wrap & WRAP_BIT != 0,
        }
    }
}

/// A popped buffer that may still be given back ([`PackedQueue::undo_pop`]).
#[derive(Debug, Clone)]
struct Popped {
    at: Position,
    id: u16,
    /// The chain, if it came from the resumed buffers rather than the ring.
    resumed: Option<PackedChain>,
}

/// The device side of one packed virtqueue.
#[derive(Debug, Clone)]
pub struct PackedQueue {
    size: u16,
    ring: GuestAddress,
    driver_event: GuestAddress,
    device_event: GuestAddress,
    event_idx: bool,
    next_avail: Position,
    next_used: Position,
    /// Per buffer id: ring descriptors it occupies while in flight, 0 when not in flight.
    in_flight: Vec<u16>,
    /// The last pops (at most `size`), newest last, for `undo_pop`.
    recent: VecDeque<Popped>,
    /// Buffers written back since the queue started (wrapping), for progress counting.
    used_count: u16,
    /// Used position when `needs_notification` last ran (None before the first time).
    signalled: Option<Position>,
    /// Descriptors used since then (saturating): a whole lap means the event was crossed.
    used_since_signal: u32,
    /// Slots from `next_avail` on that [`PackedQueue::available_end`] already saw available.
    /// They stay available until popped (the driver never takes a published slot back, and
    /// used entries are written behind `next_avail`), so the next scan resumes after them: a
    /// poll loop whose handler declines the chains (RX without frames) reads one flags word
    /// per spin instead of the whole run. Pops shrink it, `undo_pop` grows it back.
    known_available: Cell<u16>,
    /// Buffers an earlier device left in flight, handed out by `pop` before the ring's.
    resumed: VecDeque<PackedChain>,
    journal: Journal,
}

impl PackedQueue {
    /// A queue of `size` entries (1..=32768) at the driver's three addresses; the device starts
    /// at position 0 with both wrap counters set (virtio 1.2 §2.8.1).
    pub fn new(
        size: u16,
        ring: GuestAddress,
        driver_event: GuestAddress,
        device_event: GuestAddress,
    ) -> Self {
        PackedQueue {
            size,
            ring,
            driver_event,
            device_event,
            event_idx: false,
            next_avail: Position::START,
            next_used: Position::START,
            in_flight: vec![0; usize::from(size)],
            recent: VecDeque::new(),
            used_count: 0,
            signalled: None,
            used_since_signal: 0,
            known_available: Cell::new(0),
            resumed: VecDeque::new(),
            journal: Journal::default(),
        }
    }

    /// Records every pop and used entry in `journal` from now on.
    pub fn set_journal(&mut self, journal: Arc<dyn PackedJournal>) {
        self.journal = Journal(Some(journal));
    }

    /// Takes over a buffer an earlier device popped and did not answer (recovered from a
    /// journal, `descriptors` in ring order): `pop` hands it out before anything in the ring,
    /// and it is answered like any other. The caller places the avail position after all such
    /// buffers ([`PackedQueue::set_positions`]). Returns the buffer id.
    pub fn resume_in_flight(
        &mut self,
        mem: &DmaSpace,
        descriptors: &[RingDescriptor],
    ) -> Result<u16, PackedError> {
        let count = u16::try_from(descriptors.len())
            .ok()
            .filter(|&n| n > 0 && n <= self.size)
            .ok_or(PackedError::ChainTooLong(self.size))?;
        let chain = chain_of(mem, descriptors)?;
        let slot = self.id_slot(chain.id)?;
        if *slot != 0 {
            return Err(PackedError::IdInFlight(chain.id));
        }
        *slot = count;
        let id = chain.id;
        self.resumed.push_back(chain);
        Ok(id)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated (descriptor-position event suppression).
    pub fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    /// The avail position and wrap counter in `off_wrap` form (vhost-user's ring base).
    pub fn avail_off_wrap(&self) -> u16 {
        self.next_avail.off_wrap()
    }

    /// The used position and wrap counter in `off_wrap` form.
    pub fn used_off_wrap(&self) -> u16 {
        self.next_used.off_wrap()
    }

    /// Moves the device's avail and used positions (`off_wrap` form: index in bits 0..15, wrap
    /// counter in bit 15) to where an earlier device left the ring (vhost-user's
    /// SET_VRING_BASE). The buffers between the two positions are not known to be in flight
    /// here unless they are handed over with [`PackedQueue::resume_in_flight`].
    pub fn set_positions(&mut self, avail: u16, used: u16) -> Result<(), PackedError> {
        let (avail, used) = (
            Position::from_off_wrap(avail),
            Position::from_off_wrap(used),
        );
        if avail.index >= self.size || used.index >= self.size {
            return Err(PackedError::BadPosition(avail.off_wrap(), used.off_wrap()));
        }
        self.next_avail = avail;
        self.next_used = used;
        self.known_available.set(0);
        self.recent.clear();
        self.resumed.clear();
        self.signalled = None;
        Ok(())
    }

    /// The guest memory the device side writes: the descriptor ring (used descriptors) and
    /// the device event area, as (device address, length).
    pub fn device_written_areas(&self) -> [(u64, u64); 2] {
        [
            (self.ring.0, u64::from(self.size) * DESCRIPTOR_SIZE),
            (self.device_event.0, EVENT_SIZE),
        ]
    }

    /// Buffers popped and not yet used.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight.iter().filter(|&&slots| slots != 0).count()
    }

    /// Buffers written back so far (wrapping): grows by one per `add_used`.
    pub fn used_count(&self) -> u16 {
        self.used_count
    }

    /// Checks size, alignment and that the ring and both event areas lie in `mem`.
    pub fn is_valid(&self, mem: &DmaSpace) -> bool {
        let size_ok = self.size > 0 && self.size <= MAX_QUEUE_SIZE;
        let aligned = self.ring.0.is_multiple_of(DESCRIPTOR_SIZE)
            && self.driver_event.0.is_multiple_of(EVENT_SIZE)
            && self.device_event.0.is_multiple_of(EVENT_SIZE);
        let ring_bytes = u64::from(self.size) * DESCRIPTOR_SIZE;
        size_ok
            && aligned
            && fits(mem, self.ring, ring_bytes, Permissions::ReadWrite)
            && fits(mem, self.driver_event, EVENT_SIZE, Permissions::Read)
            && fits(mem, self.device_event, EVENT_SIZE, Permissions::Write)
    }

    /// Whether the descriptor at the avail position is available.
    pub fn has_available(&self, mem: &DmaSpace) -> Result<bool, PackedError> {
        if !self.resumed.is_empty() {
            return Ok(true);
        }
        let flags = self.load_flags(mem, self.next_avail.index)?;
        Ok(is_available(flags, self.next_avail.wrap))
    }

    /// The end of the run of available slots from the avail position on (at most a ring's
    /// worth), in `off_wrap` form: the driver's publishing frontier as the device sees it. It
    /// moves when the driver publishes and stays when the device takes buffers, so two reads
    /// tell whether the driver published in between even if a pass took buffers meanwhile (a
    /// count of available slots would not: taking n slots while n more are published leaves it
    /// unchanged, and a worker comparing counts then slept on published buffers it had asked
    /// not to be kicked for).
    ///
    /// The scan resumes where the previous one stopped (`known_available`).
    pub fn available_end(&self, mem: &DmaSpace) -> Result<u16, PackedError> {
        let mut count = self.known_available.get().min(self.size);
        let mut at = self.next_avail.advance(count, self.size);
        while count < self.size && is_available(self.load_flags(mem, at.index)?, at.wrap) {
            at = at.advance(1, self.size);
            count += 1;
        }
        self.known_available.set(count);
        Ok(at.off_wrap())
    }

    /// Takes the next available buffer, if any.
    pub fn pop(&mut self, mem: &DmaSpace) -> Result<Option<PackedChain>, PackedError> {
        if let Some(chain) = self.resumed.pop_front() {
            self.remember_pop(self.next_avail, chain.id, Some(chain.clone()));
            return Ok(Some(chain));
        }
        if !self.has_available(mem)? {
            return Ok(None);
        }
        let start = self.next_avail;
        let (chain, consumed) = self.walk(mem, start)?;
        let slot = self.id_slot(chain.id)?;
        if *slot != 0 {
            return Err(PackedError::IdInFlight(chain.id));
        }
        if let Some(journal) = &self.journal.0 {
            let descriptors = self.ring_descriptors(mem, start, consumed)?;
            journal.popped(chain.id, &descriptors)?;
        }
        if let Some(slot) = self.in_flight.get_mut(usize::from(chain.id)) {
            *slot = consumed;
        }
        self.next_avail = start.advance(consumed, self.size);
        self.known_available
            .set(self.known_available.get().saturating_sub(consumed));
        self.remember_pop(start, chain.id, None);
        Ok(Some(chain))
    }

    fn remember_pop(&mut self, at: Position, id: u16, resumed: Option<PackedChain>) {
        if self.recent.len() >= usize::from(self.size) {
            self.recent.pop_front();
        }
        self.recent.push_back(Popped { at, id, resumed });
    }

    /// The `count` ring descriptors from `start` on, as the driver wrote them.
    fn ring_descriptors(
        &self,
        mem: &DmaSpace,
        start: Position,
        count: u16,
    ) -> Result<Vec<RingDescriptor>, PackedError> {
        let mut at = start;
        (0..count)
            .map(|_| {
                let raw = self.read_descriptor(mem, at.index)?;
                at = at.advance(1, self.size);
                Ok(RingDescriptor {
                    addr: raw.addr.0,
                    len: raw.len,
                    id: raw.id,
                    flags: raw.flags,
                })
            })
            .collect()
    }

    /// Gives the most recently popped buffer back to the ring (only buffers popped after the
    /// last `add_used`; later calls walk further back).
    pub fn undo_pop(&mut self) {
        let Some(popped) = self.recent.pop_back() else {
            return;
        };
        if let Some(chain) = popped.resumed {
            // Back to the resumed buffers: still in flight, still journaled.
            self.resumed.push_front(chain);
            return;
        }
        let mut given_back = 0;
        if let Some(slot) = self.in_flight.get_mut(usize::from(popped.id)) {
            given_back = std::mem::take(slot);
        }
        if let Some(journal) = &self.journal.0 {
            journal.unpopped(popped.id);
        }
        self.next_avail = popped.at;
        // The chain's slots were available before the pop and are again.
        let known = self.known_available.get().saturating_add(given_back);
        self.known_available.set(known.min(self.size));
    }

    /// Writes buffer `id` back as used with `len` bytes written into it.
    pub fn add_used(&mut self, mem: &DmaSpace, id: u16, len: u32) -> Result<(), PackedError> {
        let slot = self.id_slot(id)?;
        let consumed = *slot;
        if consumed == 0 {
            return Err(PackedError::NotInFlight(id));
        }
        *slot = 0;
        // Only pops since the last used entry can be given back.
        self.recent.clear();
        let at = self.descriptor_address(self.next_used.index)?;
        let id_addr = offset(at, DESC_ID_OFFSET)?;
        let len_addr = offset(at, DESC_LEN_OFFSET)?;
        mem.write_obj(len, len_addr)
            .map_err(|_| PackedError::Memory(len_addr.0))?;
        mem.write_obj(id, id_addr)
            .map_err(|_| PackedError::Memory(id_addr.0))?;
        let mut flags = if self.next_used.wrap {
            AVAIL_FLAG | USED_FLAG
        } else {
            0
        };
        if len > 0 {
            flags |= WRITE_FLAG;
        }
        let next_used = self.next_used.advance(consumed, self.size);
        if let Some(journal) = &self.journal.0 {
            journal.using(id, next_used.off_wrap());
        }
        // Release: the driver must see id and len before the flags that hand the slot back.
        let flags_addr = offset(at, DESC_FLAGS_OFFSET)?;
        mem.store(flags, flags_addr, Ordering::Release)
            .map_err(|_| PackedError::Memory(flags_addr.0))?;
        if let Some(journal) = &self.journal.0 {
            journal.used(id);
        }
        self.next_used = next_used;
        self.used_count = self.used_count.wrapping_add(1);
        self.used_since_signal = self.used_since_signal.saturating_add(u32::from(consumed));
        Ok(())
    }

    /// Asks the driver not to kick (device event suppression: DISABLE).
    pub fn disable_notification(&mut self, mem: &DmaSpace) -> Result<(), PackedError> {
        self.write_device_event(mem, 0, EVENT_DISABLE)
    }

    /// Asks the driver to kick again: at the next avail position with EVENT_IDX, for every
    /// buffer otherwise. Returns whether a buffer became available meanwhile (then the caller
    /// must process it: the driver may have checked the flags before they changed).
    pub fn enable_notification(&mut self, mem: &DmaSpace) -> Result<bool, PackedError> {
        if self.event_idx {
            self.write_device_event(mem, self.next_avail.off_wrap(), EVENT_DESC)?;
        } else {
            self.write_device_event(mem, 0, EVENT_ENABLE)?;
        }
        // The flags store must be visible before the ring is read again (store-load order).
        fence(Ordering::SeqCst);
        self.has_available(mem)
    }

    /// Asks the driver to kick when it makes a descriptor available past the ones available now
    /// (EVENT_IDX: at the available end), or for every buffer otherwise; returns the available
    /// end it armed at (see `VirtQueue::enable_notification_past_available`).
    pub fn enable_notification_past_available(
        &mut self,
        mem: &DmaSpace,
    ) -> Result<u16, PackedError> {
        let end = self.available_end(mem)?;
        if self.event_idx {
            self.write_device_event(mem, end, EVENT_DESC)?;
        } else {
            self.write_device_event(mem, 0, EVENT_ENABLE)?;
        }
        fence(Ordering::SeqCst);
        Ok(end)
    }

    /// Whether the driver wants an interrupt for the buffers used since the last call
    /// (driver event suppression: ENABLE / DISABLE / DESC at an `off_wrap` position).
    pub fn needs_notification(&mut self, mem: &DmaSpace) -> Result<bool, PackedError> {
        // The used descriptors must be visible before the driver's event is read.
        fence(Ordering::SeqCst);
        let flags_addr = offset(self.driver_event, EVENT_FLAGS_OFFSET)?;
        let flags: u16 = mem
            .load(flags_addr, Ordering::Acquire)
            .map_err(|_| PackedError::Memory(flags_addr.0))?;
        let off_wrap: u16 = mem
            .load(self.driver_event, Ordering::Acquire)
            .map_err(|_| PackedError::Memory(self.driver_event.0))?;
        let old = self.signalled.replace(self.next_used);
        let crossed_lap = std::mem::take(&mut self.used_since_signal) >= u32::from(self.size);
        Ok(match flags {
            EVENT_DISABLE => false,
            EVENT_DESC if self.event_idx => match old {
                None => true,
                Some(_) if crossed_lap => true,
                Some(old) => self.event_crossed(Position::from_off_wrap(off_wrap), old),
            },
            // ENABLE, DESC without EVENT_IDX and the reserved value: interrupt (never lose one).
            _ => true,
        })
    }

    /// Whether `event` lies in [old, next_used) on the doubled ring (vring_need_event).
    fn event_crossed(&self, event: Position, old: Position) -> bool {
        let lap = 2 * u32::from(self.size);
        let distance = |from: Position, to: Position| {
            (to.linear(self.size) + lap - from.linear(self.size)) % lap
        };
        distance(old, event) < distance(old, self.next_used)
    }

    /// Reads the chain starting at `start`; returns it and the ring descriptors it occupies.
    fn walk(&self, mem: &DmaSpace, start: Position) -> Result<(PackedChain, u16), PackedError> {
        let mut buffers = Vec::new();
        let mut at = start;
        let mut consumed: u16 = 0;
        loop {
            if consumed >= self.size {
                return Err(PackedError::ChainTooLong(self.size));
            }
            let desc = self.read_descriptor(mem, at.index)?;
            consumed += 1;
            at = at.advance(1, self.size);
            if desc.flags & INDIRECT_FLAG != 0 {
                if !buffers.is_empty() || desc.flags & NEXT_FLAG != 0 {
                    return Err(PackedError::BadIndirect);
                }
                let buffers = read_indirect(mem, desc.addr, desc.len)?;
                return Ok((
                    PackedChain {
                        id: desc.id,
                        buffers,
                    },
                    consumed,
                ));
            }
            buffers.push(desc.buffer());
            if desc.flags & NEXT_FLAG == 0 {
                return Ok((
                    PackedChain {
                        id: desc.id,
                        buffers,
                    },
                    consumed,
                ));
            }
        }
    }

    fn id_slot(&mut self, id: u16) -> Result<&mut u16, PackedError> {
        self.in_flight
            .get_mut(usize::from(id))
            .ok_or(PackedError::BadId(id))
    }

    fn descriptor_address(&self, index: u16) -> Result<GuestAddress, PackedError> {
        offset(self.ring, u64::from(index) * DESCRIPTOR_SIZE)
    }

    fn load_flags(&self, mem: &DmaSpace, index: u16) -> Result<u16, PackedError> {
        let addr = offset(self.descriptor_address(index)?, DESC_FLAGS_OFFSET)?;
        // Acquire: the rest of the descriptor is read after the flags that made it available.
        mem.load(addr, Ordering::Acquire)
            .map_err(|_| PackedError::Memory(addr.0))
    }

    fn read_descriptor(&self, mem: &DmaSpace, index: u16) -> Result<RawDescriptor, PackedError> {
        read_raw_descriptor(mem, self.descriptor_address(index)?)
    }

    fn write_device_event(
        &self,
        mem: &DmaSpace,
        off_wrap: u16,
        flags: u16,
    ) -> Result<(), PackedError> {
        mem.write_obj(off_wrap, self.device_event)
            .map_err(|_| PackedError::Memory(self.device_event.0))?;
        let flags_addr = offset(self.device_event, EVENT_FLAGS_OFFSET)?;
        // Release: a driver that reads DESC must also see the matching off_wrap.
        mem.store(flags, flags_addr, Ordering::Release)
            .map_err(|_| PackedError::Memory(flags_addr.0))
    }
}

/// A descriptor as read from guest memory.
#[derive(Debug, Clone, Copy)]
struct RawDescriptor {
    addr: GuestAddress,
    len: u32,
    id: u16,
    flags: u16,
}

impl RawDescriptor {
    fn buffer(&self) -> PackedBuffer {
        PackedBuffer {
            addr: self.addr,
            len: self.len,
            writable: self.flags & WRITE_FLAG != 0,
        }
    }
}

fn read_raw_descriptor(mem: &DmaSpace, at: GuestAddress) -> Result<RawDescriptor, PackedError> {
    let mut raw = [0u8; DESCRIPTOR_SIZE as usize];
    mem.read_slice(&mut raw, at)
        .map_err(|_| PackedError::Memory(at.0))?;
    let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, i0, i1, f0, f1] = raw;
    Ok(RawDescriptor {
        addr: GuestAddress(u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7])),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        id: u16::from_le_bytes([i0, i1]),
        flags: u16::from_le_bytes([f0, f1]),
    })
}

/// The buffers of an indirect table at `addr` of `len` bytes (its NEXT flags are ignored: the
/// table is sequential, virtio 1.2 §2.8.10).
fn read_indirect(
    mem: &DmaSpace,
    addr: GuestAddress,
    len: u32,
) -> Result<Vec<PackedBuffer>, PackedError> {
    let count = len / DESCRIPTOR_SIZE as u32;
    if len == 0
        || !u64::from(len).is_multiple_of(DESCRIPTOR_SIZE)
        || count > MAX_INDIRECT_DESCRIPTORS
    {
        return Err(PackedError::BadIndirectTable(len));
    }
    if !fits(mem, addr, u64::from(len), Permissions::Read) {
        return Err(PackedError::Memory(addr.0));
    }
    (0..u64::from(count))
        .map(|i| {
            let desc = read_raw_descriptor(mem, offset(addr, i * DESCRIPTOR_SIZE)?)?;
            if desc.flags & INDIRECT_FLAG != 0 {
                return Err(PackedError::BadIndirect);
            }
            Ok(desc.buffer())
        })
        .collect()
}

/// The buffer described by a chain's ring descriptors (as `walk` reads them from the ring).
fn chain_of(mem: &DmaSpace, descriptors: &[RingDescriptor]) -> Result<PackedChain, PackedError> {
    let mut buffers = Vec::new();
    for (index, desc) in descriptors.iter().enumerate() {
        let raw = RawDescriptor {
            addr: GuestAddress(desc.addr),
            len: desc.len,
            id: desc.id,
            flags: desc.flags,
        };
        let last = index + 1 == descriptors.len();
        if raw.flags & INDIRECT_FLAG != 0 {
            if index != 0 || !last {
                return Err(PackedError::BadIndirect);
            }
            buffers = read_indirect(mem, raw.addr, raw.len)?;
        } else {
            buffers.push(raw.buffer());
        }
        if last {
            return Ok(PackedChain {
                id: raw.id,
                buffers,
            });
        }
    }
    Err(PackedError::ChainTooLong(0))
}

/// Whether a descriptor with `flags` is available to a device whose avail wrap counter is `wrap`.
pub fn is_available(flags: u16, wrap: bool) -> bool {
    let avail = flags & AVAIL_FLAG != 0;
    let used = flags & USED_FLAG != 0;
    avail == wrap && used != wrap
}

fn offset(base: GuestAddress, by: u64) -> Result<GuestAddress, PackedError> {
    base.checked_add(by).ok_or(PackedError::Memory(base.0))
}

fn fits(mem: &DmaSpace, addr: GuestAddress, len: u64, access: Permissions) -> bool {
    usize::try_from(len).is_ok_and(|len| mem.check_range(addr, len, access))
}

#[cfg(test)]
mod tests;
