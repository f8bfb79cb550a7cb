//! Mapping-change notification, for whoever keeps a copy of a requester's DMA mappings outside
//! the unit: an assigned (VFIO) function's DMA does not go through sluice, so the host IOMMU
//! must be told what the guest's tables say (the "shadow" tables of issue 14).
//!
//! The unit advertises caching mode (CAP.CM), so the guest invalidates after *every* change to
//! its tables, non-present → present included: an invalidation is exactly the moment a copy
//! must be brought up to date. [`Vtd::watch`](crate::Vtd::watch) registers a
//! [`MappingObserver`] for one requester; after each context-cache or IOTLB invalidation
//! (register-based or queued; global, domain- or device-selective, page-selective) that covers
//! the requester, the observer gets the invalidated [`IovaRange`] and a [`MappingView`] that
//! walks the requester's current tables. The call is made with the unit's state locked, before
//! the invalidation completes (before a later wait descriptor writes its status), so a guest
//! that waited for its invalidation knows the copy follows its tables.
//!
//! The range walk is written here rather than as repeated [`Tables::translate`] calls: a
//! domain-wide invalidation covers 2^48 bytes, and only a walk that skips non-present entries
//! at every level visits what is mapped. The guest writes the tables, so the walk is bounded
//! ([`MAX_ENTRIES_VISITED`]: a table can point at itself), and an entry that would fault on
//! access (reserved bits, beyond the address width, misaligned large page) is left out of the
//! result — fewer mappings, never more.

use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::queue::Scope;
use crate::regs::MGAW_BITS;
use crate::tables::{
    beyond_width, ContextKind, Tables, PAGE_SHIFT, SL_PAGE_SIZE, SL_READ, SL_TM, SL_WRITE,
};

/// Page-table entries one walk may read before it gives up (4M: 16 GiB of 4 KiB pages).
pub const MAX_ENTRIES_VISITED: usize = 1 << 22;

/// IOVAs `start..end` (end exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaRange {
    pub start: u64,
    pub end: u64,
}

impl IovaRange {
    /// Every IOVA the unit translates (below 2^MGAW).
    pub const ALL: IovaRange = IovaRange {
        start: 0,
        end: 1 << MGAW_BITS,
    };

    fn from_scope(scope: Scope) -> Self {
        match scope.range() {
            Some((start, length)) => IovaRange {
                start,
                end: start.saturating_add(length).min(Self::ALL.end),
            },
            None => Self::ALL,
        }
    }

    fn clipped_to(self, end: u64) -> Self {
        IovaRange {
            start: self.start.min(end),
            end: self.end.min(end),
        }
    }
}

/// `len` bytes at `iova` reach guest physical `gpa` with these permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingRun {
    pub iova: u64,
    pub gpa: u64,
    pub len: u64,
    pub read: bool,
    pub write: bool,
}

impl MappingRun {
    /// Appends `run` to `runs`, extending the last run instead when `run` continues it.
    fn push_merged(runs: &mut Vec<MappingRun>, run: MappingRun) {
        if let Some(last) = runs.last_mut() {
            if last.iova + last.len == run.iova
                && last.gpa + last.len == run.gpa
                && (last.read, last.write) == (run.read, run.write)
            {
                last.len += run.len;
                return;
            }
        }
        runs.push(run);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("the requester's page tables have more than {MAX_ENTRIES_VISITED} entries in range")]
    TooManyEntries,
}

/// Told about invalidations that cover one requester.
pub trait MappingObserver: Send + Sync {
    /// The guest invalidated `range` for this requester: what `view` reports there now is what
    /// it wants mapped. Called with the unit locked: do not call back into the [`crate::Vtd`].
    fn invalidated(&self, view: &MappingView<'_>, range: IovaRange);
}

/// A requester's translation as the unit stands (tables, root, translation enable).
pub struct MappingView<'a> {
    pub(crate) tables: Tables<'a>,
    pub(crate) root: u64,
    pub(crate) translating: bool,
    pub(crate) requester: u16,
}

impl MappingView<'_> {
    pub fn requester(&self) -> u16 {
        self.requester
    }

    /// The requester's mappings in `range`, clipped to it, in IOVA order, contiguous pieces
    /// merged. Translation disabled and pass-through contexts map guest RAM at its own address;
    /// a context that is missing or invalid maps nothing.
    pub fn runs(&self, range: IovaRange) -> Result<Vec<MappingRun>, WalkError> {
        if !self.translating {
            return Ok(self.identity(range.clipped_to(IovaRange::ALL.end)));
        }
        let Ok(context) = self.tables.context(self.root, self.requester) else {
            return Ok(Vec::new());
        };
        match context.kind {
            ContextKind::PassThrough => Ok(self.identity(range.clipped_to(1 << self.tables.haw))),
            ContextKind::Translated { table, levels } => {
                let width = (PAGE_SHIFT + 9 * levels).min(MGAW_BITS);
                let range = range.clipped_to(1 << width);
                let mut out = WalkOutput {
                    budget: MAX_ENTRIES_VISITED,
                    runs: Vec::new(),
                };
                if range.start < range.end {
                    self.walk(table, levels, 0, range, (true, true), &mut out)?;
                }
                Ok(out.runs)
            }
        }
    }

    /// Guest RAM inside `range`, at its own address, read/write.
    fn identity(&self, range: IovaRange) -> Vec<MappingRun> {
        let mut runs = Vec::new();
        for region in self.tables.memory.iter() {
            let start = region.start_addr().0.max(range.start);
            let end = (region.start_addr().0 + region.len()).min(range.end);
            if start < end {
                MappingRun::push_merged(
                    &mut runs,
                    MappingRun {
                        iova: start,
                        gpa: start,
                        len: end - start,
                        read: true,
                        write: true,
                    },
                );
            }
        }
        runs
    }

    /// The entries of the level-`level` `table` (covering IOVAs from `base`) inside `range`;
    /// `allowed` is what the levels above permit.
    fn walk(
        &self,
        table: u64,
        level: u32,
        base: u64,
        range: IovaRange,
        allowed: (bool, bool),
        out: &mut WalkOutput,
    ) -> Result<(), WalkError> {
        let shift = PAGE_SHIFT + 9 * (level - 1);
        let size = 1u64 << shift;
        let first = (range.start.max(base) - base) >> shift;
        let last = ((range.end - 1).min(base + (size << 9) - 1) - base) >> shift;
        let haw = self.tables.haw;
        for index in first..=last {
            out.budget = out.budget.checked_sub(1).ok_or(WalkError::TooManyEntries)?;
            let Ok(entry) = self
                .tables
                .memory
                .read_obj::<u64>(GuestAddress(table + index * 8))
            else {
                continue;
            };
            let read = allowed.0 && entry & SL_READ != 0;
            let write = allowed.1 && entry & SL_WRITE != 0;
            let large = entry & SL_PAGE_SIZE != 0;
            if !(read || write)
                || entry & beyond_width(haw) != 0
                || entry & SL_TM != 0
                || (large && level > 3)
            {
                continue;
            }
            let address = entry & beyond_width(PAGE_SHIFT) & ((1 << haw) - 1);
            let iova = base + index * size;
            if level > 1 && !large {
                self.walk(address, level - 1, iova, range, (read, write), out)?;
                continue;
            }
            if address & (size - 1) != 0 {
                continue;
            }
            let start = iova.max(range.start);
            let end = (iova + size).min(range.end);
            MappingRun::push_merged(
                &mut out.runs,
                MappingRun {
                    iova: start,
                    gpa: address + (start - iova),
                    len: end - start,
                    read,
                    write,
                },
            );
        }
        Ok(())
    }
}

/// What a walk found so far, and how many more entries it may read.
struct WalkOutput {
    budget: usize,
    runs: Vec<MappingRun>,
}

/// The unit's observers, by requester.
#[derive(Default)]
pub(crate) struct Watchers(Mutex<Vec<(u16, Arc<dyn MappingObserver>)>>);

impl Watchers {
    pub(crate) fn add(&self, requester: u16, observer: Arc<dyn MappingObserver>) {
        self.lock().push((requester, observer));
    }

    /// Forgets every observer of `requester` (its function was unplugged).
    pub(crate) fn remove(&self, requester: u16) {
        self.lock().retain(|(watched, _)| *watched != requester);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u16, Arc<dyn MappingObserver>)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the observers of every requester `scope` covers. The list is copied first, so an
    /// observer runs without the list locked.
    pub(crate) fn notify(&self, tables: Tables<'_>, root: u64, translating: bool, scope: Scope) {
        let watched: Vec<_> = self.lock().clone();
        let range = IovaRange::from_scope(scope);
        for (requester, observer) in watched {
            let concerned = match scope {
                Scope::All => true,
                Scope::Device {
                    source,
                    function_mask,
                    ..
                } => {
                    let ignored = (1u16 << function_mask) - 1;
                    requester & !ignored == source & !ignored
                }
                // A context entry that no longer reads back may have named the domain.
                Scope::Domain(domain) | Scope::Pages { domain, .. } => tables
                    .context(root, requester)
                    .map_or(true, |context| context.domain == domain),
            };
            if concerned {
                let view = MappingView {
                    tables,
                    root,
                    translating,
                    requester,
                };
                // A device-selective context invalidation says the whole context may have
                // changed, whatever range the scope's type would suggest.
                observer.invalidated(&view, range);
            }
        }
    }

    /// Tells `requester`'s observers that everything may have changed.
    pub(crate) fn refresh(&self, tables: Tables<'_>, root: u64, translating: bool, requester: u16) {
        let watched: Vec<_> = self.lock().clone();
        let view = MappingView {
            tables,
            root,
            translating,
            requester,
        };
        for (_, observer) in watched.iter().filter(|(r, _)| *r == requester) {
            observer.invalidated(&view, IovaRange::ALL);
        }
    }
}
