//! The VMM-side dirty log: guest pages written by device models while a live migration runs.
//!
//! KVM's dirty log (KVM_MEM_LOG_DIRTY_PAGES) only sees what the vCPUs write; a device model
//! writes guest RAM through the VMM's own mapping, which KVM never notices. So every place where
//! a device model obtains *writable* guest memory marks the pages here:
//!
//! * sluice-virtio's `VirtQueue::pop`/`pop_all` mark every device-writable buffer of each popped
//!   chain (virtio-blk's data and status bytes, virtio-rng's buffers, virtio-net RX buffers),
//!   and the ring areas the device side writes (split: the used ring with `avail_event`;
//!   packed: the descriptor ring and the device event area) whenever it answers or changes
//!   notifications (`add_used`, `enable_notification`, ...).
//! * [`crate::GuestIovecs::resolve`] marks buffers resolved for `Permissions::Write` (the disk
//!   reads io_uring or `preadv` place into guest memory, NVMe's data buffers).
//! * Device models that write guest memory through the space directly mark before they do:
//!   NVMe's completion entries, admin data transfers (Identify, log pages) and EventIdx
//!   writes.
//!
//! Marking happens when the buffer is *acquired*, before the device writes it. A round that
//! clears the bit between the mark and the write would lose the write, so each mark also sets a
//! *sticky* bit that only the stop-and-copy reads: once the devices have quiesced (no request
//! in flight) every page a device acquired during the migration is sent again with its final
//! content. Conservative (a buffer that was never written is sent too) but never misses a
//! write made through these paths.
//!
//! Not covered, and so refused by the migration: VFIO devices (the hardware writes), and
//! devices the snapshot cannot carry anyway. Marks are by device address, which is a guest
//! physical address only without an IOMMU (a VM with a vIOMMU is refused too).
//!
//! One log per process (a sluice process runs one VM), so that device models need no plumbing:
//! disabled it costs one relaxed atomic load per acquisition. Hand-written: an atomic bitmap is
//! a few lines, and vm-memory's bitmap feature tracks writes through its own accessors only,
//! not the iovecs handed to the kernel.
//!
//! The same marking points also feed a *space's own* log ([`DeviceWriteLog`], installed on a
//! [`DmaSpace`](crate::DmaSpace) with `DmaTranslator::set_write_log`): a vhost-user backend
//! (sluice-vhost) serves another process's guest and logs into the frontend's
//! VHOST_USER_SET_LOG_BASE bitmap instead of this process's one. Its marks arrive as guest
//! physical addresses: on a translated space (the frontend's vIOMMU) the device address is
//! translated first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use vm_memory::{GuestAddress, Iommu, Permissions};

use crate::DmaSpace;

const PAGE_SHIFT: u32 = 12;

/// Whether a log is installed: the fast path for every device acquisition.
static LOGGING: AtomicBool = AtomicBool::new(false);
static LOG: RwLock<Option<Arc<PageLog>>> = RwLock::new(None);

/// One guest RAM region: where it sits in guest physical memory and in the RAM file (the page
/// numbers the log reports are the file's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Two atomic page bitmaps over the RAM file: the current round's and the sticky one.
#[derive(Debug)]
pub struct PageLog {
    regions: Vec<RamRegion>,
    round: Vec<AtomicU64>,
    sticky: Vec<AtomicU64>,
}

impl PageLog {
    /// A log over `regions`, which must lie within a RAM file of `ram_size` bytes.
    pub fn new(regions: Vec<RamRegion>, ram_size: u64) -> Self {
        let words = (ram_size >> PAGE_SHIFT).div_ceil(64) as usize;
        let bitmap = || (0..words).map(|_| AtomicU64::new(0)).collect();
        Self {
            regions,
            round: bitmap(),
            sticky: bitmap(),
        }
    }

    /// Marks every page of guest physical range `gpa..gpa+len` that is RAM (the rest is
    /// ignored: a device cannot write there).
    pub fn mark(&self, gpa: u64, len: u64) {
        let Some(end) = gpa.checked_add(len).filter(|_| len > 0) else {
            return;
        };
        for region in &self.regions {
            let region_end = region.gpa + region.len;
            let (start, stop) = (gpa.max(region.gpa), end.min(region_end));
            if start >= stop {
                continue;
            }
            let first = (start - region.gpa + region.file_offset) >> PAGE_SHIFT;
            let last = (stop - 1 - region.gpa + region.file_offset) >> PAGE_SHIFT;
            self.set_range(first, last);
        }
    }

    /// Sets pages `first..=last` a word at a time: a guest's 4 GiB buffer costs 16 Ki atomic
    /// operations, not a million.
    fn set_range(&self, first: u64, last: u64) {
        let mut page = first;
        while page <= last {
            let (word, bit) = ((page / 64) as usize, page % 64);
            let count = (64 - bit).min(last - page + 1);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            let (Some(round), Some(sticky)) = (self.round.get(word), self.sticky.get(word)) else {
                return;
            };
            round.fetch_or(mask, Ordering::Release);
            sticky.fetch_or(mask, Ordering::Release);
            page += count;
        }
    }

    /// The pages marked since the last call (file page numbers, ascending), clearing them.
    pub fn take_round(&self) -> Vec<u64> {
        take(&self.round)
    }

    /// Every page marked since the log started (for the stop-and-copy), clearing them.
    pub fn take_sticky(&self) -> Vec<u64> {
        take(&self.sticky)
    }
}

fn take(bitmap: &[AtomicU64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (index, word) in bitmap.iter().enumerate() {
        let mut bits = word.swap(0, Ordering::AcqRel);
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            pages.push(index as u64 * 64 + bit);
            bits &= bits - 1;
        }
    }
    pages
}

/// Installs `log` as the process's device dirty log (replacing any other).
pub fn start(log: Arc<PageLog>) {
    *LOG.write().unwrap_or_else(PoisonError::into_inner) = Some(log);
    LOGGING.store(true, Ordering::SeqCst);
}

/// Removes the process's device dirty log.
pub fn stop() {
    LOGGING.store(false, Ordering::SeqCst);
    *LOG.write().unwrap_or_else(PoisonError::into_inner) = None;
}

/// Whether device writes are being logged.
pub fn is_logging() -> bool {
    LOGGING.load(Ordering::Relaxed)
}

/// A device is about to write guest physical range `gpa..gpa+len`: marked in the process's
/// log while a migration runs (no-op otherwise). Device models mark through [`mark_on`], which
/// also reaches their space's own log.
pub fn mark(gpa: u64, len: u64) {
    if !is_logging() {
        return;
    }
    if let Some(log) = LOG.read().unwrap_or_else(PoisonError::into_inner).as_ref() {
        log.mark(gpa, len);
    }
}

/// A log of the guest pages the devices on one [`DmaSpace`] write (a vhost-user backend's
/// VHOST_USER_SET_LOG_BASE bitmap). `gpa..gpa+len` is guest physical; an implementation
/// ignores what is outside the guest RAM it knows (a hostile driver's address).
pub trait DeviceWriteLog: std::fmt::Debug + Send + Sync {
    fn mark(&self, gpa: u64, len: u64);
}

/// Whether writes through `space` are logged anywhere (the cheap test before walking a chain).
pub fn is_logging_for(space: &DmaSpace) -> bool {
    is_logging() || space.iommu().logs_writes()
}

/// A device on `space` is about to write device range `addr..addr+len`: marked in the
/// process's log (while a migration runs) and in the space's own log (if one is installed).
pub fn mark_on(space: &DmaSpace, addr: u64, len: u64) {
    mark(addr, len);
    let translator = space.iommu();
    if !translator.logs_writes() || len == 0 {
        return;
    }
    if !space.get_iommu_enabled() {
        translator.log_write(addr, len);
        return;
    }
    // An IOVA: log where it lands. A refused translation is the device's fault (its access
    // fails the same way right after), so nothing is written there and nothing is logged.
    let Ok(len_usize) = usize::try_from(len) else {
        return;
    };
    if let Ok(ranges) = translator.translate(GuestAddress(addr), len_usize, Permissions::Write) {
        let ranges: Vec<_> = ranges.collect();
        for range in ranges {
            translator.log_write(range.base.0, range.length as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> PageLog {
        // RAM file: 8 pages; GPA 0..4 pages at file 0, GPA 0x10_0000.. at file page 4.
        PageLog::new(
            vec![
                RamRegion {
                    gpa: 0,
                    len: 0x4000,
                    file_offset: 0,
                },
                RamRegion {
                    gpa: 0x10_0000,
                    len: 0x4000,
                    file_offset: 0x4000,
                },
            ],
            0x8000,
        )
    }

    #[test]
    fn marks_land_on_file_pages_and_rounds_clear_but_sticky_keeps() {
        let log = two_regions();

        log.mark(0x1ff0, 0x20); // pages 1 and 2
        log.mark(0x10_1000, 1); // file page 5
        log.mark(0x5000, 0x1000); // a hole: ignored
        let first = log.take_round();
        log.mark(0x3000, 4);
        let second = log.take_round();

        assert_eq!(first, vec![1, 2, 5]);
        assert_eq!(second, vec![3]);
        assert_eq!(log.take_sticky(), vec![1, 2, 3, 5]);
        assert!(log.take_sticky().is_empty());
    }

    #[test]
    fn hostile_ranges_do_not_overflow_or_escape_the_bitmap() {
        let log = two_regions();

        log.mark(u64::MAX - 2, 100);
        log.mark(0x10_3fff, u64::MAX);
        log.mark(0, 0);

        assert_eq!(log.take_round(), Vec::<u64>::new());
    }

    #[test]
    fn ranges_across_word_boundaries_mark_exactly_their_pages() {
        let region = RamRegion {
            gpa: 0,
            len: 300 << 12,
            file_offset: 0,
        };
        let log = PageLog::new(vec![region], 300 << 12);

        log.mark(60 << 12, 70 << 12); // pages 60..=129: three words
        log.mark(299 << 12, 1 << 12); // the last page
        log.mark(0, 300 << 12);
        let all = log.take_round();
        log.mark(60 << 12, 70 << 12);
        log.mark(299 << 12, 1 << 12);

        assert_eq!(all, (0..300).collect::<Vec<u64>>());
        let expected: Vec<u64> = (60..130).chain([299]).collect();
        assert_eq!(log.take_round(), expected);
    }

    #[test]
    fn a_range_across_both_regions_marks_only_ram() {
        let log = two_regions();

        log.mark(0x3000, 0x10_0000);

        assert_eq!(log.take_round(), vec![3, 4, 5, 6]);
    }
}
