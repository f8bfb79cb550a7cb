//! The packed-ring form of the inflight area (vhost-user spec, "Inflight I/O tracking", packed
//! virtqueue): [`PackedInflight`] is one queue's region, kept up to date through the
//! `sluice_virtio::PackedJournal` hooks of the queue's `PackedQueue`, and read back by
//! [`PackedInflight::recover`] when a ring starts.
//!
//! Layout of a queue region (the spec's `QueueRegionPacked`, 64-byte aligned):
//!
//! ```text
//! 0   u64 features         (zero)
//! 8   u16 version          (0 = never started, 1 = in use)
//! 10  u16 desc_num
//! 12  u16 free_head        (first free desc[] entry)
//! 14  u16 old_free_head    (free_head at the last committed step)
//! 16  u16 used_idx         (ring index of the next used descriptor)
//! 18  u16 old_used_idx
//! 20  u8  used_wrap_counter
//! 21  u8  old_used_wrap_counter
//! 22  u8  padding[7]
//! 32  desc[desc_num]: DescStatePacked, 32 bytes each:
//!     { u8 inflight; u8 pad; u16 next; u16 last; u16 num; u64 counter;
//!       u16 id; u16 flags; u32 len; u64 addr }
//! ```
//!
//! Why it is more than a mark per buffer: a packed ring's used descriptors are written over
//! ring slots, and completions may come out of order, so the ring slot of a buffer still in
//! flight can be overwritten by another buffer's used entry. The area therefore keeps a copy of
//! every ring descriptor of every buffer in flight, in `desc[]` entries taken from a free list
//! (`next` links); the chain's head entry holds `inflight`, `num` (descriptors), `last` (its
//! last entry) and `counter` (pop order).
//!
//! Steps, as the spec orders them:
//! * pop: the chain's descriptors go into entries from `free_head` on, the head gets `num`,
//!   `last`, `counter`, then `inflight = 1`; then `free_head` and `old_free_head` move past it
//!   (a crash before that leaves the entries in the free list, where recovery clears them).
//! * used: the chain's entries go back to the front of the free list and `used_idx` /
//!   `used_wrap_counter` move past the buffer, *then* the queue writes the used descriptor's
//!   flags, then the head's `inflight = 0` and the `old_*` fields take the new values (commit).
//! * recovery: if `used_idx` differs from `old_used_idx`, the ring descriptor at
//!   `old_used_idx` tells whether the used entry reached the driver (its flags no longer say
//!   "available" at `old_used_wrap_counter`): then commit, else roll back to the `old_*` values.
//!   Entries on the free list are not in flight. The heads still marked are resubmitted in
//!   counter order.
//!
//! Positions: the spec's region has no avail position. Every pop advances the avail position
//! and every used entry the used position by the buffer's ring descriptors, so at rest
//! `avail = used + Σ num` over the buffers in flight — the packed form of the split ring's
//! `used->idx + inuse`. After a crash the frontend's SET_VRING_BASE is stale (QEMU cannot
//! read a packed ring's positions from memory and resends the last ones it got), so a region
//! in use decides both positions; a fresh one takes SET_VRING_BASE's.
//!
//! Departures from the spec's text, both within its layout: recovery rebuilds the free list
//! from scratch (every entry not in a chain in flight), so a crash between two free-list
//! updates can never leak entries; and everything read from the region is bounds-checked —
//! the frontend holds the memfd and may write anything into it, which costs its own guest
//! requests (a chain that does not make sense is dropped with a warning), never the backend.

use std::sync::{Arc, Mutex, MutexGuard};

use sluice_virtio::ring::packed::is_available;
use sluice_virtio::ring::{PackedError, PackedJournal, RingDescriptor};
use vm_memory::{ByteValued, Bytes, MmapRegion, VolatileMemory};

use crate::inflight::INFLIGHT_VERSION;

const HEADER_BYTES: usize = 32;
const DESC_BYTES: usize = 32;
const QUEUE_ALIGN: usize = 64;

const VERSION: usize = 8;
const FREE_HEAD: usize = 12;
const OLD_FREE_HEAD: usize = 14;
const USED_IDX: usize = 16;
const OLD_USED_IDX: usize = 18;
const USED_WRAP: usize = 20;
const OLD_USED_WRAP: usize = 21;

// Offsets inside a DescStatePacked.
const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 2;
const D_LAST: usize = 4;
const D_NUM: usize = 6;
const D_COUNTER: usize = 8;
const D_ID: usize = 16;
const D_FLAGS: usize = 18;
const D_LEN: usize = 20;
const D_ADDR: usize = 24;

const WRAP_BIT: u16 = 1 << 15;
/// No entry (ends the free list; "no head" in the id map).
const NONE: u16 = u16::MAX;

/// Bytes of one packed queue region for `desc_num` entries.
pub fn queue_region_size(desc_num: u16) -> usize {
    (HEADER_BYTES + DESC_BYTES * usize::from(desc_num)).div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// What a packed ring resumes with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRecovery {
    /// Next avail position, `off_wrap` form.
    pub avail: u16,
    /// Next used position, `off_wrap` form.
    pub used: u16,
    /// The ring descriptors of each buffer still in flight, in pop order.
    pub chains: Vec<Vec<RingDescriptor>>,
}

/// In-memory side of the journal: which head entry holds each buffer id in flight.
#[derive(Debug)]
struct Heads {
    by_id: Vec<u16>,
    counter: u64,
}

/// One queue's packed region; the queue's `PackedJournal`.
#[derive(Debug)]
pub struct PackedInflight {
    mapping: Arc<MmapRegion>,
    base: usize,
    desc_num: u16,
    heads: Mutex<Heads>,
}

impl PackedInflight {
    pub(crate) fn new(mapping: Arc<MmapRegion>, base: usize, desc_num: u16) -> Self {
        PackedInflight {
            mapping,
            base,
            desc_num,
            heads: Mutex::new(Heads {
                by_id: vec![NONE; usize::from(desc_num)],
                counter: 0,
            }),
        }
    }

    pub fn version(&self) -> u16 {
        self.load(VERSION)
    }

    /// The committed used position (`off_wrap` form).
    pub fn used_position(&self) -> u16 {
        off_wrap(self.load(OLD_USED_IDX), self.load::<u8>(OLD_USED_WRAP) != 0)
    }

    /// Whether the head entry `entry` is marked in flight.
    pub fn is_inflight(&self, entry: u16) -> bool {
        self.desc_load::<u8>(entry, D_INFLIGHT) == Some(1)
    }

    /// Called when a ring of `ring_size` entries starts. `base` is SET_VRING_BASE's avail and
    /// used positions; `ring_flags(index)` reads the flags of ring descriptor `index`.
    pub fn recover(
        &self,
        ring_size: u16,
        base: (u16, u16),
        ring_flags: impl Fn(u16) -> Option<u16>,
    ) -> PackedRecovery {
        if self.version() != INFLIGHT_VERSION {
            self.reset(base.1);
            return PackedRecovery {
                avail: base.0,
                used: base.1,
                chains: Vec::new(),
            };
        }
        self.settle_last_used(&ring_flags);
        let used = self.used_position();
        let mut chains = self.chains_in_flight();
        let slots: usize = chains.iter().map(|(_, entries)| entries.len()).sum();
        if slots > usize::from(ring_size) || index_of(used) >= ring_size {
            tracing::warn!(
                "packed inflight area: {slots} descriptors in flight, used position {used:#06x}, \
                 on a ring of {ring_size}: not trusting it"
            );
            chains.clear();
        }
        self.rebuild_free_list(&chains);
        let used = if index_of(used) < ring_size {
            used
        } else {
            base.1
        };
        let avail = advance(used, slots_of(&chains), ring_size);
        let mut heads = self.lock_heads();
        heads.by_id.fill(NONE);
        heads.counter = chains
            .iter()
            .map(|&(counter, _)| counter.wrapping_add(1))
            .max()
            .unwrap_or(0);
        let mut resumed = Vec::new();
        for (_, entries) in &chains {
            let descriptors: Vec<RingDescriptor> =
                entries.iter().map(|&e| self.descriptor(e)).collect();
            let id = descriptors.last().map_or(NONE, |d| d.id);
            if let Some(slot) = heads.by_id.get_mut(usize::from(id)) {
                *slot = entries[0];
            }
            resumed.push(descriptors);
        }
        PackedRecovery {
            avail,
            used,
            chains: resumed,
        }
    }

    /// Drops a recovered buffer the queue could not take back (its entries return to the
    /// free list, so it is not resubmitted again).
    pub fn forget(&self, id: u16) {
        self.unpopped(id);
    }

    /// Commits or rolls back the last used step (see the module doc).
    fn settle_last_used(&self, ring_flags: &impl Fn(u16) -> Option<u16>) {
        let new = (self.load::<u16>(USED_IDX), self.load::<u8>(USED_WRAP));
        let old = (
            self.load::<u16>(OLD_USED_IDX),
            self.load::<u8>(OLD_USED_WRAP),
        );
        let old_free = self.load::<u16>(OLD_FREE_HEAD);
        if new != old {
            let reached_driver =
                ring_flags(old.0).is_some_and(|flags| !is_available(flags, old.1 != 0));
            if reached_driver {
                self.store(OLD_USED_IDX, new.0);
                self.store(OLD_USED_WRAP, new.1);
                let free = self.load::<u16>(FREE_HEAD);
                self.store(OLD_FREE_HEAD, free);
                // The head whose used entry was committed: no longer in flight. It is the
                // free list's first entry (the used step put its chain there).
                self.desc_store(free, D_INFLIGHT, 0u8);
                return;
            }
        }
        self.store(USED_IDX, old.0);
        self.store(USED_WRAP, old.1);
        self.store(FREE_HEAD, old_free);
    }

    /// Head entries still in flight with their counters and entries (head first), in counter
    /// order; entries on the free list are cleared first.
    fn chains_in_flight(&self) -> Vec<(u64, Vec<u16>)> {
        let n = usize::from(self.desc_num);
        let mut free = vec![false; n];
        let mut entry = self.load::<u16>(FREE_HEAD);
        for _ in 0..n {
            let Some(seen) = free.get_mut(usize::from(entry)) else {
                break;
            };
            if *seen {
                break;
            }
            *seen = true;
            self.desc_store(entry, D_INFLIGHT, 0u8);
            entry = self.desc_load(entry, D_NEXT).unwrap_or(NONE);
        }
        let mut taken = free;
        let mut chains = Vec::new();
        for head in 0..self.desc_num {
            if !self.is_inflight(head) {
                continue;
            }
            match self.chain_entries(head, &mut taken) {
                Some(entries) => {
                    let counter = self.desc_load(head, D_COUNTER).unwrap_or(0);
                    chains.push((counter, entries));
                }
                None => {
                    tracing::warn!(
                        "packed inflight area: entry {head} is not a valid chain; dropped"
                    );
                    self.desc_store(head, D_INFLIGHT, 0u8);
                }
            }
        }
        chains.sort_by_key(|&(counter, _)| counter);
        chains
    }

    /// The `num` entries of the chain at `head`, none of them `taken` already.
    fn chain_entries(&self, head: u16, taken: &mut [bool]) -> Option<Vec<u16>> {
        let num = self.desc_load::<u16>(head, D_NUM)?;
        if num == 0 || num > self.desc_num {
            return None;
        }
        let mut entries = Vec::with_capacity(usize::from(num));
        let mut entry = head;
        for step in 0..num {
            let slot = taken.get_mut(usize::from(entry))?;
            if *slot {
                return None;
            }
            entries.push(entry);
            if step + 1 < num {
                entry = self.desc_load(entry, D_NEXT)?;
            }
        }
        if self.desc_load::<u16>(head, D_LAST) != Some(entry) {
            return None;
        }
        for &entry in &entries {
            taken[usize::from(entry)] = true;
        }
        Some(entries)
    }

    /// Links every entry outside `chains` into the free list, in index order.
    fn rebuild_free_list(&self, chains: &[(u64, Vec<u16>)]) {
        let mut used = vec![false; usize::from(self.desc_num)];
        for (_, entries) in chains {
            for &entry in entries {
                used[usize::from(entry)] = true;
            }
        }
        let mut head = NONE;
        for entry in (0..self.desc_num).rev() {
            if !used[usize::from(entry)] {
                self.desc_store(entry, D_INFLIGHT, 0u8);
                self.desc_store(entry, D_NEXT, head);
                head = entry;
            }
        }
        self.store(FREE_HEAD, head);
        self.store(OLD_FREE_HEAD, head);
    }

    /// Starts tracking from scratch with the used position `used`.
    fn reset(&self, used: u16) {
        self.rebuild_free_list(&[]);
        let (index, wrap) = (index_of(used), u8::from(used & WRAP_BIT != 0));
        self.store(USED_IDX, index);
        self.store(OLD_USED_IDX, index);
        self.store(USED_WRAP, wrap);
        self.store(OLD_USED_WRAP, wrap);
        self.store(VERSION, INFLIGHT_VERSION);
        let mut heads = self.lock_heads();
        heads.by_id.fill(NONE);
        heads.counter = 0;
    }

    fn descriptor(&self, entry: u16) -> RingDescriptor {
        RingDescriptor {
            addr: self.desc_load(entry, D_ADDR).unwrap_or(0),
            len: self.desc_load(entry, D_LEN).unwrap_or(0),
            id: self.desc_load(entry, D_ID).unwrap_or(NONE),
            flags: self.desc_load(entry, D_FLAGS).unwrap_or(0),
        }
    }

    fn lock_heads(&self) -> MutexGuard<'_, Heads> {
        self.heads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn desc_offset(&self, entry: u16, field: usize) -> Option<usize> {
        (entry < self.desc_num).then(|| HEADER_BYTES + DESC_BYTES * usize::from(entry) + field)
    }

    fn desc_load<T: ByteValued + Default>(&self, entry: u16, field: usize) -> Option<T> {
        self.desc_offset(entry, field).map(|at| self.load(at))
    }

    fn desc_store<T: ByteValued>(&self, entry: u16, field: usize, value: T) {
        if let Some(at) = self.desc_offset(entry, field) {
            self.store(at, value);
        }
    }

    /// Reads the field at `offset` in this queue's region (zero if out of bounds).
    fn load<T: ByteValued + Default>(&self, offset: usize) -> T {
        let slice = self.mapping.as_volatile_slice();
        self.base
            .checked_add(offset)
            .and_then(|at| slice.read_obj::<T>(at).ok())
            .unwrap_or_default()
    }

    fn store<T: ByteValued>(&self, offset: usize, value: T) {
        let slice = self.mapping.as_volatile_slice();
        let written = self
            .base
            .checked_add(offset)
            .is_some_and(|at| slice.write_obj(value, at).is_ok());
        if !written {
            tracing::warn!("packed inflight area write at {offset:#x} out of bounds");
        }
    }
}

impl PackedJournal for PackedInflight {
    fn popped(&self, id: u16, descriptors: &[RingDescriptor]) -> Result<(), PackedError> {
        let mut heads = self.lock_heads();
        if heads
            .by_id
            .get(usize::from(id))
            .is_none_or(|&head| head != NONE)
        {
            return Err(PackedError::Journal(id));
        }
        let head = self.load::<u16>(FREE_HEAD);
        let mut entry = head;
        let mut last = head;
        for desc in descriptors {
            if entry >= self.desc_num {
                return Err(PackedError::Journal(id));
            }
            self.desc_store(entry, D_ADDR, desc.addr);
            self.desc_store(entry, D_LEN, desc.len);
            self.desc_store(entry, D_ID, desc.id);
            self.desc_store(entry, D_FLAGS, desc.flags);
            last = entry;
            entry = self.desc_load(entry, D_NEXT).unwrap_or(NONE);
        }
        let num = u16::try_from(descriptors.len()).map_err(|_| PackedError::Journal(id))?;
        self.desc_store(head, D_NUM, num);
        self.desc_store(head, D_LAST, last);
        self.desc_store(head, D_COUNTER, heads.counter);
        self.desc_store(head, D_INFLIGHT, 1u8);
        // Commit: the chain's entries leave the free list.
        self.store(FREE_HEAD, entry);
        self.store(OLD_FREE_HEAD, entry);
        heads.counter = heads.counter.wrapping_add(1);
        heads.by_id[usize::from(id)] = head;
        Ok(())
    }

    fn unpopped(&self, id: u16) {
        let mut heads = self.lock_heads();
        let Some(head) = heads
            .by_id
            .get_mut(usize::from(id))
            .map(|h| std::mem::replace(h, NONE))
        else {
            return;
        };
        if head == NONE {
            return;
        }
        self.desc_store(head, D_INFLIGHT, 0u8);
        let last = self.desc_load(head, D_LAST).unwrap_or(head);
        let free = self.load::<u16>(FREE_HEAD);
        self.desc_store(last, D_NEXT, free);
        self.store(FREE_HEAD, head);
        self.store(OLD_FREE_HEAD, head);
    }

    fn using(&self, id: u16, next_used: u16) {
        let heads = self.lock_heads();
        let Some(&head) = heads.by_id.get(usize::from(id)).filter(|&&h| h != NONE) else {
            return;
        };
        let last = self.desc_load(head, D_LAST).unwrap_or(head);
        let free = self.load::<u16>(FREE_HEAD);
        self.desc_store(last, D_NEXT, free);
        self.store(FREE_HEAD, head);
        self.store(USED_IDX, index_of(next_used));
        self.store(USED_WRAP, u8::from(next_used & WRAP_BIT != 0));
    }

    fn used(&self, id: u16) {
        let mut heads = self.lock_heads();
        let Some(head) = heads
            .by_id
            .get_mut(usize::from(id))
            .map(|h| std::mem::replace(h, NONE))
        else {
            return;
        };
        if head == NONE {
            return;
        }
        self.desc_store(head, D_INFLIGHT, 0u8);
        // Commit the step.
        let free = self.load::<u16>(FREE_HEAD);
        self.store(OLD_FREE_HEAD, free);
        self.store(OLD_USED_IDX, self.load::<u16>(USED_IDX));
        self.store(OLD_USED_WRAP, self.load::<u8>(USED_WRAP));
    }
}

fn index_of(off_wrap: u16) -> u16 {
    off_wrap & !WRAP_BIT
}

fn off_wrap(index: u16, wrap: bool) -> u16 {
    (index & !WRAP_BIT) | if wrap { WRAP_BIT } else { 0 }
}

fn slots_of(chains: &[(u64, Vec<u16>)]) -> u16 {
    chains
        .iter()
        .map(|(_, entries)| entries.len())
        .sum::<usize>()
        .try_into()
        .unwrap_or(u16::MAX)
}

/// `position` (`off_wrap`) moved `count` slots on a ring of `size` (count <= size).
fn advance(position: u16, count: u16, size: u16) -> u16 {
    let mut index = u32::from(index_of(position)) + u32::from(count);
    let mut wrap = position & WRAP_BIT != 0;
    let size = u32::from(size.max(1));
    while index >= size {
        index -= size;
        wrap = !wrap;
    }
    off_wrap(index as u16, wrap)
}

#[cfg(test)]
mod tests;
