//! The shared inflight-tracking area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the split-ring
//! layout here, the packed-ring one in [`crate::inflight_packed`]. Which one an area has is
//! decided when it is set up (GET_INFLIGHT_FD / SET_INFLIGHT_FD), from the features negotiated
//! then: QEMU sends SET_FEATURES first for that reason (`vhost_dev_prepare_inflight`).
//!
//! The backend keeps, in memory the frontend holds on to (a memfd), which descriptor heads it
//! has taken from the avail ring and not yet returned through the used ring. If the backend
//! dies, the frontend hands the same area to the next backend process (SET_INFLIGHT_FD), which
//! resubmits those requests instead of leaving the guest waiting forever.
//!
//! Per queue, at `queue * queue_region_size(desc_num)` (64-byte aligned):
//!
//! ```text
//! 0   u64 features        (unused, zero)
//! 8   u16 version         (0 = never started, 1 = in use)
//! 10  u16 desc_num        (entries in desc[])
//! 12  u16 last_batch_head (head of the last used entry written)
//! 14  u16 used_idx        (used->idx once the entries below were cleared for it)
//! 16  desc[desc_num]: { u8 inflight; u8 pad[5]; u16 next; u64 counter }  (16 bytes each)
//! ```
//!
//! Every access is bounds-checked through vm-memory's volatile slices: the area may come from
//! the frontend and its size is only as trustworthy as the frontend. An area the backend
//! allocates (GET_INFLIGHT_FD) is sealed against shrinking; one the frontend brings
//! (SET_INFLIGHT_FD) is mapped watched by [`crate::sigbus`] unless it is sealed, so a frontend
//! that shrinks it afterwards loses its connection, not the server.
//!
//! Recovery ([`QueueInflight::recover`]) follows the scheme of QEMU's libvhost-user
//! (`vu_check_queue_inflights`), learned from reading it, with one strengthening: libvhost-user
//! assumes at most one used entry was published ahead of the area's `used_idx` and clears only
//! `last_batch_head`; here every used entry between the area's `used_idx` and the ring's
//! `used->idx` is cleared, because this backend publishes used entries in batches (the device
//! model writes them; the tracker clears them afterwards). Then:
//! * `inuse` = heads still marked; every popped chain is either in the used ring or marked, so
//!   the next avail position to pop is `used->idx + inuse` — whatever SET_VRING_BASE said
//!   (after a crash QEMU sends the used index there);
//! * the marked heads, sorted by their counter (pop order), are resubmitted before anything new.

use std::any::Any;
use std::fs::File;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{ByteValued, Bytes, FileOffset, MmapRegion, VolatileMemory};

use crate::sigbus::{self, Tripwire};

/// Bytes before `desc[]` in a queue region.
const HEADER_BYTES: usize = 16;
/// Bytes of one `DescStateSplit`.
const DESC_BYTES: usize = 16;
/// Queue regions start on this boundary.
const QUEUE_ALIGN: usize = 64;
/// The only layout version.
pub const INFLIGHT_VERSION: u16 = 1;

const VERSION_OFFSET: usize = 8;
const DESC_NUM_OFFSET: usize = 10;
const LAST_BATCH_HEAD_OFFSET: usize = 12;
const USED_IDX_OFFSET: usize = 14;
const DESC_COUNTER_OFFSET: usize = 8;

/// Why an inflight area could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("{queues} queues of {queue_size} entries: invalid inflight geometry")]
    Geometry { queues: u16, queue_size: u16 },
    #[error("cannot create the inflight memfd: {0}")]
    Create(io::Error),
    #[error("inflight area of {size:#x} bytes at {offset:#x} does not fit its {file_size:#x}-byte file, or is smaller than the {needed:#x} bytes needed")]
    Size {
        size: u64,
        offset: u64,
        file_size: u64,
        needed: u64,
    },
    #[error("cannot map the inflight area: {0}")]
    Map(String),
    #[error("cannot watch the inflight area: {0}")]
    Watch(io::Error),
}

/// Bytes of one queue's region for `desc_num` entries.
pub fn queue_region_size(desc_num: u16) -> usize {
    let raw = HEADER_BYTES + DESC_BYTES * usize::from(desc_num);
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// The ring layout an area's queue regions describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingLayout {
    Split,
    Packed,
}

impl RingLayout {
    /// Bytes of one queue's region for `desc_num` entries.
    pub fn region_size(self, desc_num: u16) -> usize {
        match self {
            RingLayout::Split => queue_region_size(desc_num),
            RingLayout::Packed => crate::inflight_packed::queue_region_size(desc_num),
        }
    }
}

/// The whole mapped area: one region per queue.
#[derive(Debug, Clone)]
pub struct InflightArea {
    mapping: Arc<MmapRegion>,
    queues: u16,
    desc_num: u16,
    layout: RingLayout,
}

impl InflightArea {
    /// GET_INFLIGHT_FD: a zeroed, sealed memfd for `queues` queues of `queue_size` entries.
    /// Returns the area, its fd (for the frontend) and its size.
    pub fn allocate(queues: u16, queue_size: u16) -> Result<(Self, File, u64), InflightError> {
        Self::allocate_for(queues, queue_size, RingLayout::Split)
    }

    /// [`InflightArea::allocate`] for rings of `layout`.
    pub fn allocate_for(
        queues: u16,
        queue_size: u16,
        layout: RingLayout,
    ) -> Result<(Self, File, u64), InflightError> {
        let size = total_size(queues, queue_size, layout)?;
        let file = create_memfd(size).map_err(InflightError::Create)?;
        let mapping = map(&file, 0, size)?;
        let area = InflightArea {
            mapping: Arc::new(mapping),
            queues,
            desc_num: queue_size,
            layout,
        };
        area.write_desc_num();
        Ok((area, file, size as u64))
    }

    /// SET_INFLIGHT_FD: maps an area the frontend kept from an earlier backend; a fault in
    /// it (the frontend shrank the file) trips `tripwire`.
    pub fn attach(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        queues: u16,
        queue_size: u16,
        tripwire: &Tripwire,
    ) -> Result<Self, InflightError> {
        let geometry = (queues, queue_size, RingLayout::Split);
        Self::attach_for(file, mmap_size, mmap_offset, geometry, tripwire)
    }

    /// [`InflightArea::attach`] for `(queues, queue_size, layout)`.
    pub fn attach_for(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        (queues, queue_size, layout): (u16, u16, RingLayout),
        tripwire: &Tripwire,
    ) -> Result<Self, InflightError> {
        let needed = total_size(queues, queue_size, layout)?;
        let file_size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let size_error = InflightError::Size {
            size: mmap_size,
            offset: mmap_offset,
            file_size,
            needed: needed as u64,
        };
        let fits = mmap_offset
            .checked_add(mmap_size)
            .is_some_and(|end| end <= file_size);
        if !fits || mmap_size < needed as u64 {
            return Err(size_error);
        }
        let mapping = Arc::new(map(file, mmap_offset, needed)?);
        if !sigbus::shrink_sealed(file.as_raw_fd()) {
            let owner: Arc<dyn Any + Send + Sync> = mapping.clone();
            sigbus::watch(
                mapping.as_ptr() as usize,
                needed,
                Arc::downgrade(&owner),
                tripwire,
            )
            .map_err(InflightError::Watch)?;
        }
        let area = InflightArea {
            mapping,
            queues,
            desc_num: queue_size,
            layout,
        };
        area.write_desc_num();
        Ok(area)
    }

    /// The ring layout the area was set up for.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Queues covered by the area.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// The split-ring view of queue `index`, if the area covers it and has that layout.
    pub fn queue(&self, index: u16) -> Option<QueueInflight> {
        (index < self.queues && self.layout == RingLayout::Split).then(|| QueueInflight {
            mapping: Arc::clone(&self.mapping),
            base: usize::from(index) * queue_region_size(self.desc_num),
            desc_num: self.desc_num,
        })
    }

    /// The packed-ring view of queue `index`, if the area covers it and has that layout.
    pub fn packed_queue(&self, index: u16) -> Option<crate::inflight_packed::PackedInflight> {
        (index < self.queues && self.layout == RingLayout::Packed).then(|| {
            let base = usize::from(index) * self.layout.region_size(self.desc_num);
            crate::inflight_packed::PackedInflight::new(
                Arc::clone(&self.mapping),
                base,
                self.desc_num,
            )
        })
    }

    fn write_desc_num(&self) {
        let slice = self.mapping.as_volatile_slice();
        for index in 0..usize::from(self.queues) {
            let at = index * self.layout.region_size(self.desc_num) + DESC_NUM_OFFSET;
            let _ = slice.write_obj(self.desc_num, at);
        }
    }
}

fn total_size(queues: u16, queue_size: u16, layout: RingLayout) -> Result<usize, InflightError> {
    if queues == 0 || queue_size == 0 {
        return Err(InflightError::Geometry { queues, queue_size });
    }
    Ok(layout.region_size(queue_size) * usize::from(queues))
}

fn create_memfd(size: usize) -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; the return value is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"sluice-vhost-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    // A sealed size means nobody can shrink the file under our mapping (SIGBUS).
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own; the return value is checked.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

fn map(file: &File, offset: u64, size: usize) -> Result<MmapRegion, InflightError> {
    let file = file
        .try_clone()
        .map_err(|e| InflightError::Map(e.to_string()))?;
    MmapRegionBuilder::new(size)
        .with_file_offset(FileOffset::new(file, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .map_err(|e| InflightError::Map(e.to_string()))
}

/// What a queue start does with the inflight state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where popping resumes.
    pub next_avail: u16,
    /// Heads to process again, in the order they were first popped.
    pub resubmit: Vec<u16>,
    /// The counter value for the next popped head.
    pub next_counter: u64,
}

/// One queue's part of the area.
#[derive(Debug, Clone)]
pub struct QueueInflight {
    mapping: Arc<MmapRegion>,
    base: usize,
    desc_num: u16,
}

impl QueueInflight {
    /// Entries in `desc[]`.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    pub fn version(&self) -> u16 {
        self.load(VERSION_OFFSET)
    }

    pub fn used_idx(&self) -> u16 {
        self.load(USED_IDX_OFFSET)
    }

    pub fn set_used_idx(&self, idx: u16) {
        self.store(USED_IDX_OFFSET, idx);
    }

    pub fn set_last_batch_head(&self, head: u16) {
        self.store(LAST_BATCH_HEAD_OFFSET, head);
    }

    /// Whether `head` is marked in flight (false for heads outside the area).
    pub fn is_inflight(&self, head: u16) -> bool {
        self.desc_offset(head)
            .is_some_and(|at| self.load::<u8>(at) == 1)
    }

    /// The pop counter of `head`.
    pub fn counter(&self, head: u16) -> Option<u64> {
        self.desc_offset(head)
            .map(|at| self.load::<u64>(at + DESC_COUNTER_OFFSET))
    }

    /// Marks `head` popped; `counter` orders resubmission. False if outside the area.
    pub fn mark(&self, head: u16, counter: u64) -> bool {
        let Some(at) = self.desc_offset(head) else {
            return false;
        };
        self.store(at + DESC_COUNTER_OFFSET, counter);
        self.store(at, 1u8);
        true
    }

    /// Marks `head` completed.
    pub fn clear(&self, head: u16) {
        if let Some(at) = self.desc_offset(head) {
            self.store(at, 0u8);
        }
    }

    /// Heads still marked, in pop order, with their counters.
    pub fn marked(&self) -> Vec<(u16, u64)> {
        let mut marked: Vec<(u16, u64)> = (0..self.desc_num)
            .filter(|&head| self.is_inflight(head))
            .filter_map(|head| self.counter(head).map(|c| (head, c)))
            .collect();
        marked.sort_by_key(|&(_, counter)| counter);
        marked
    }

    /// Called when the queue starts. `used_idx` is the ring's `used->idx`, `used_id(pos)` reads
    /// the id of used ring entry `pos` (free-running index), `base` is what SET_VRING_BASE said.
    pub fn recover(
        &self,
        used_idx: u16,
        queue_size: u16,
        base: u16,
        used_id: impl Fn(u16) -> Option<u32>,
    ) -> Recovery {
        if self.version() != INFLIGHT_VERSION {
            // A fresh area: nothing to recover, the frontend's base is right.
            self.reset(used_idx);
            return Recovery {
                next_avail: base,
                resubmit: Vec::new(),
                next_counter: 0,
            };
        }
        self.clear_published(used_idx, queue_size, &used_id);
        let marked = self.marked();
        let next_counter = marked.last().map_or(0, |&(_, c)| c.wrapping_add(1));
        let inuse = u16::try_from(marked.len()).unwrap_or(u16::MAX);
        Recovery {
            next_avail: (Wrapping(used_idx) + Wrapping(inuse)).0,
            resubmit: marked.into_iter().map(|(head, _)| head).collect(),
            next_counter,
        }
    }

    /// Clears heads whose used entries were published after the area last saw `used_idx`.
    fn clear_published(
        &self,
        used_idx: u16,
        queue_size: u16,
        used_id: &impl Fn(u16) -> Option<u32>,
    ) {
        let seen = self.used_idx();
        let ahead = (Wrapping(used_idx) - Wrapping(seen)).0;
        if ahead > queue_size {
            tracing::warn!(
                "inflight area saw used index {seen}, the ring says {used_idx}: not trusting the gap"
            );
        } else {
            for step in 0..ahead {
                let position = (Wrapping(seen) + Wrapping(step)).0;
                if let Some(head) = used_id(position).and_then(|id| u16::try_from(id).ok()) {
                    self.clear(head);
                    self.set_last_batch_head(head);
                }
            }
        }
        self.set_used_idx(used_idx);
    }

    /// Starts tracking from scratch at `used_idx`.
    fn reset(&self, used_idx: u16) {
        for head in 0..self.desc_num {
            self.clear(head);
        }
        self.set_used_idx(used_idx);
        self.store(VERSION_OFFSET, INFLIGHT_VERSION);
    }

    fn desc_offset(&self, head: u16) -> Option<usize> {
        (head < self.desc_num).then(|| HEADER_BYTES + DESC_BYTES * usize::from(head))
    }

    /// Reads the field at `offset` in this queue's region (zero if out of bounds).
    fn load<T: ByteValued + Default>(&self, offset: usize) -> T {
        let slice = self.mapping.as_volatile_slice();
        self.base
            .checked_add(offset)
            .and_then(|at| slice.read_obj::<T>(at).ok())
            .unwrap_or_default()
    }

    /// Writes the field at `offset` in this queue's region.
    fn store<T: ByteValued>(&self, offset: usize, value: T) {
        let slice = self.mapping.as_volatile_slice();
        let written = self
            .base
            .checked_add(offset)
            .is_some_and(|at| slice.write_obj(value, at).is_ok());
        if !written {
            tracing::warn!("inflight area write at {offset:#x} out of bounds");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Used ring contents for `recover`: ids by free-running position.
    fn used_ring(entries: &[(u16, u32)]) -> impl Fn(u16) -> Option<u32> + '_ {
        move |position| {
            entries
                .iter()
                .find(|&&(p, _)| p == position)
                .map(|&(_, id)| id)
        }
    }

    #[test]
    fn fresh_area_keeps_the_frontend_base_and_starts_tracking() {
        let (area, _file, _) = InflightArea::allocate(1, 8).unwrap();
        let queue = area.queue(0).unwrap();

        let recovery = queue.recover(5, 8, 5, used_ring(&[]));

        assert_eq!(recovery.next_avail, 5);
        assert!(recovery.resubmit.is_empty());
        assert_eq!(queue.version(), INFLIGHT_VERSION);
        assert_eq!(queue.used_idx(), 5);
    }

    #[test]
    fn entries_published_after_the_last_clear_are_not_resubmitted() {
        let (area, _file, _) = InflightArea::allocate(1, 8).unwrap();
        let queue = area.queue(0).unwrap();
        queue.recover(0, 8, 0, used_ring(&[]));
        queue.mark(1, 10);
        queue.mark(2, 11);
        queue.mark(3, 12);
        // The backend died after publishing used entries for heads 2 and 1, before clearing.

        let recovery = queue.recover(2, 8, 0, used_ring(&[(0, 2), (1, 1)]));

        assert_eq!(recovery.resubmit, vec![3]);
        assert_eq!(recovery.next_avail, 3, "used 2 + one still in flight");
        assert_eq!(recovery.next_counter, 13);
        assert!(!queue.is_inflight(1) && !queue.is_inflight(2));
        assert_eq!(queue.used_idx(), 2);
    }

    #[test]
    fn resubmission_is_in_counter_order_across_index_wrap() {
        let (area, _file, _) = InflightArea::allocate(2, 4).unwrap();
        let queue = area.queue(1).unwrap();
        queue.recover(65534, 4, 65534, used_ring(&[]));
        queue.mark(3, 100);
        queue.mark(0, 101);

        let recovery = queue.recover(65534, 4, 0, used_ring(&[]));

        assert_eq!(recovery.resubmit, vec![3, 0]);
        assert_eq!(recovery.next_avail, 0, "65534 + 2 wraps");
        assert!(
            !area.queue(0).unwrap().is_inflight(3),
            "queues are disjoint"
        );
    }

    #[test]
    fn a_used_gap_larger_than_the_ring_is_not_trusted() {
        let (area, _file, _) = InflightArea::allocate(1, 4).unwrap();
        let queue = area.queue(0).unwrap();
        queue.recover(0, 4, 0, used_ring(&[]));
        queue.mark(1, 1);

        let recovery = queue.recover(100, 4, 0, |_| Some(1));

        assert_eq!(recovery.resubmit, vec![1], "mark kept");
        assert_eq!(queue.used_idx(), 100);
    }

    #[test]
    fn heads_outside_the_area_are_ignored() {
        let (area, _file, _) = InflightArea::allocate(1, 4).unwrap();
        let queue = area.queue(0).unwrap();

        assert!(!queue.mark(4, 0));
        queue.clear(400);

        assert!(!queue.is_inflight(4));
        assert!(area.queue(1).is_none());
    }

    #[test]
    fn attach_refuses_areas_that_do_not_fit_their_file() {
        let (_, file, size) = InflightArea::allocate(1, 16).unwrap();
        let tripwire = Tripwire::new().unwrap();

        let too_big = InflightArea::attach(&file, size * 2, 0, 1, 16, &tripwire);
        let too_small = InflightArea::attach(&file, size, 0, 2, 16, &tripwire);
        let shifted = InflightArea::attach(&file, size, 4096, 1, 16, &tripwire);
        let fits = InflightArea::attach(&file, size, 0, 1, 16, &tripwire);

        assert!(matches!(too_big, Err(InflightError::Size { .. })));
        assert!(matches!(too_small, Err(InflightError::Size { .. })));
        assert!(matches!(shifted, Err(InflightError::Size { .. })));
        assert!(fits.is_ok());
    }

    #[test]
    fn queue_regions_are_64_byte_aligned_and_hold_their_entries() {
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(3), 64);
        assert_eq!(queue_region_size(4), 128);
        assert_eq!(queue_region_size(256), 16 + 16 * 256 + 48);
    }
}
