//! `--device vfio=BDF,dma=on-demand` behind `--iommu vtd`: the host IOMMU maps, for the
//! assigned function, what the guest's own VT-d tables map — IOVA → the host address of the
//! guest physical page — and nothing else (the nested case gpa2 → gpa1 → hpa). The function's
//! DMA never passes through sluice, so only the physical IOMMU can enforce the guest's
//! mappings; `dma=all` (all RAM at IOVA = GPA) would let the device ignore them.
//!
//! sluice's VT-d advertises caching mode: the guest invalidates after every change to its
//! tables, so [`DmaShadow`] is a [`MappingObserver`] of the function's requester id: on each
//! invalidation it walks the invalidated range and brings the VFIO mappings (its ledger) in line
//! with a [`Plan`] — unmap what changed or went, map what is new — before the invalidation
//! completes. The plan is a pure function of the ledger, the range and the walk, so it is
//! tested with a fake [`DmaMapper`].
//!
//! * Contiguous pieces that appear in one notification become one mapping; a mapping is never
//!   merged with one made earlier: VFIO type1v2 unmaps whole mappings only, and growing a live
//!   mapping would mean unmapping it while the device may be using it. A mapping the guest
//!   changed in part is unmapped whole and its unchanged parts mapped again (a short window in
//!   which they fault; Linux unmaps what it mapped, so this is rare).
//! * Nothing is mapped while the guest keeps Bus Master off (the function cannot DMA): the
//!   reset function at start maps nothing, and a guest that enables the vIOMMU before its
//!   driver turns Bus Master on never has identity maps of all RAM. Bus Master on → the whole
//!   space is walked again (`Vtd::refresh`).
//! * Bounded: at most [`MAX_MAPPINGS`] mappings (vfio_iommu_type1's default
//!   `dma_entry_limit`), the walk by sluice-iommu's own budget. A failure — memlock limit,
//!   overlap, too many mappings, a walk over budget — quarantines the function (every mapping
//!   undone, Bus Master cleared, the reason in the VM's report), never a panic.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sluice_iommu::{IovaRange, MappingObserver, MappingRun, MappingView};

/// Most VFIO mappings a function may hold (vfio_iommu_type1's default dma_entry_limit).
pub const MAX_MAPPINGS: usize = 65_535;

/// `len` bytes at `iova` reach the host virtual address `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub iova: u64,
    pub len: u64,
    pub host: u64,
    pub read: bool,
    pub write: bool,
}

impl Extent {
    fn end(&self) -> u64 {
        self.iova + self.len
    }

    /// The part of this extent in IOVAs `start..end`, if any.
    fn slice(&self, start: u64, end: u64) -> Option<Extent> {
        let from = self.iova.max(start);
        let to = self.end().min(end);
        if from >= to {
            return None;
        }
        Some(Extent {
            iova: from,
            len: to - from,
            host: self.host + (from - self.iova),
            ..*self
        })
    }

    /// Same IOVA → host offset and permissions.
    fn same_translation(&self, other: &Extent) -> bool {
        self.host.wrapping_sub(self.iova) == other.host.wrapping_sub(other.iova)
            && (self.read, self.write) == (other.read, other.write)
    }

    fn continued_by(&self, next: &Extent) -> bool {
        self.end() == next.iova && self.same_translation(next)
    }
}

/// What maps and unmaps for the function (VFIO in sluice, a recorder in tests).
pub trait DmaMapper: Send + Sync {
    fn map(&self, extent: &Extent) -> io::Result<()>;
    fn unmap(&self, extent: &Extent) -> io::Result<()>;
    /// Stops the function's DMA (Bus Master off) after a failure.
    fn quarantine(&self);
}

/// What one notification changes: unmapped first (a new mapping may take an old one's IOVAs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub unmap: Vec<Extent>,
    pub map: Vec<Extent>,
}

/// Guest RAM as (guest physical start, length, host address).
pub type RamRegions = Vec<(u64, u64, u64)>;

/// The walk's runs as host extents, in IOVA order; the parts of a run outside guest RAM (a
/// guest mapping an MMIO address) cannot be pinned and are left out: the device's DMA there
/// faults in the host IOMMU.
pub fn host_extents(runs: &[MappingRun], ram: &[(u64, u64, u64)]) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for run in runs.iter().filter(|r| r.read || r.write) {
        for &(gpa, len, host) in ram {
            let from = run.gpa.max(gpa);
            let to = (run.gpa + run.len).min(gpa + len);
            if from >= to {
                continue;
            }
            extents.push(Extent {
                iova: run.iova + (from - run.gpa),
                len: to - from,
                host: host + (from - gpa),
                read: run.read,
                write: run.write,
            });
        }
    }
    extents.sort_by_key(|e| e.iova);
    merged(extents)
}

/// `extents` (sorted, disjoint) with each extent that continues the previous one joined to it.
fn merged(extents: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for extent in extents {
        match out.last_mut() {
            Some(last) if last.continued_by(&extent) => last.len += extent.len,
            _ => out.push(extent),
        }
    }
    out
}

/// Whether `wanted` (sorted, disjoint) maps all of `part` the way `part` does.
fn covers(wanted: &[Extent], part: &Extent) -> bool {
    let mut next = part.iova;
    for extent in wanted
        .iter()
        .filter(|w| w.end() > part.iova && w.iova < part.end())
    {
        if extent.iova > next || !extent.same_translation(part) {
            return false;
        }
        next = extent.end();
    }
    next >= part.end()
}

/// `wanted` without IOVAs `start..end`.
fn without(wanted: Vec<Extent>, start: u64, end: u64) -> Vec<Extent> {
    wanted
        .into_iter()
        .flat_map(|w| [w.slice(w.iova, start), w.slice(end, w.end())])
        .flatten()
        .collect()
}

/// How to bring `ledger` (the mappings made, by IOVA) in line with `desired` (what the guest's
/// tables map in `range` now, sorted host extents): mappings that `desired` confirms inside
/// `range` stay; the others overlapping `range` go, their parts outside `range` mapped again.
pub fn plan(ledger: &BTreeMap<u64, Extent>, range: IovaRange, desired: &[Extent]) -> Plan {
    let mut wanted: Vec<Extent> = desired
        .iter()
        .filter_map(|d| d.slice(range.start, range.end))
        .collect();
    let mut plan = Plan::default();
    // Disjoint and sorted by IOVA: walking down from the range's end, the first mapping that
    // ends at or before its start is the last one to look at.
    let overlapping: Vec<Extent> = ledger
        .range(..range.end)
        .rev()
        .take_while(|(_, e)| e.end() > range.start)
        .map(|(_, e)| *e)
        .collect();
    for mapping in overlapping.into_iter().rev() {
        let Some(inside) = mapping.slice(range.start, range.end) else {
            continue;
        };
        if covers(&wanted, &inside) {
            wanted = without(wanted, inside.iova, inside.end());
        } else {
            plan.unmap.push(mapping);
            plan.map.extend(mapping.slice(mapping.iova, range.start));
            plan.map.extend(mapping.slice(range.end, mapping.end()));
        }
    }
    plan.map.extend(wanted);
    plan.map.sort_by_key(|e| e.iova);
    plan.map = merged(std::mem::take(&mut plan.map));
    plan
}

/// What the VM reports of a function's on-demand mappings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShadowStats {
    pub mapped_bytes: u64,
    pub peak_bytes: u64,
    pub mappings: usize,
    pub peak_mappings: usize,
    /// Notifications that changed something.
    pub updates: u64,
    pub quarantined: Option<String>,
}

#[derive(Default)]
struct ShadowState {
    ledger: BTreeMap<u64, Extent>,
    bus_master: bool,
    stats: ShadowStats,
}

/// One function's host IOMMU mappings, following its requester's VT-d tables.
pub struct DmaShadow {
    name: String,
    mapper: Arc<dyn DmaMapper>,
    ram: RamRegions,
    state: Mutex<ShadowState>,
}

impl DmaShadow {
    pub fn new(name: String, mapper: Arc<dyn DmaMapper>, ram: RamRegions) -> Self {
        Self {
            name,
            mapper,
            ram,
            state: Mutex::new(ShadowState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ShadowState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn stats(&self) -> ShadowStats {
        self.lock().stats.clone()
    }

    pub fn is_quarantined(&self) -> bool {
        self.lock().stats.quarantined.is_some()
    }

    /// The guest turned Bus Master off (everything is unmapped) or on (the caller then asks the
    /// unit to announce every mapping: `Vtd::refresh`).
    pub fn set_bus_master(&self, on: bool) {
        let mut state = self.lock();
        state.bus_master = on;
        if !on {
            let everything: Vec<Extent> = state.ledger.values().copied().collect();
            let plan = Plan {
                unmap: everything,
                map: Vec::new(),
            };
            self.apply_or_quarantine(&mut state, plan);
        }
    }

    /// The guest invalidated `range`; `walk` reads what its tables map there now.
    pub fn sync(&self, range: IovaRange, walk: impl FnOnce() -> Result<Vec<MappingRun>, String>) {
        let mut state = self.lock();
        if state.stats.quarantined.is_some() {
            return;
        }
        let desired = if state.bus_master {
            match walk() {
                Ok(runs) => host_extents(&runs, &self.ram),
                Err(why) => {
                    self.quarantine(&mut state, why);
                    return;
                }
            }
        } else {
            Vec::new()
        };
        let plan = plan(&state.ledger, range, &desired);
        self.apply_or_quarantine(&mut state, plan);
    }

    fn apply_or_quarantine(&self, state: &mut ShadowState, plan: Plan) {
        if plan.map.is_empty() && plan.unmap.is_empty() {
            return;
        }
        state.stats.updates += 1;
        if let Err(why) = self.apply(state, plan) {
            self.quarantine(state, why);
        }
    }

    fn apply(&self, state: &mut ShadowState, plan: Plan) -> Result<(), String> {
        let after = (state.ledger.len() + plan.map.len()).saturating_sub(plan.unmap.len());
        if after > MAX_MAPPINGS {
            return Err(format!(
                "the guest's IOMMU tables need {after} DMA mappings, more than {MAX_MAPPINGS}"
            ));
        }
        for extent in &plan.unmap {
            self.mapper.unmap(extent).map_err(|e| {
                format!(
                    "VFIO_IOMMU_UNMAP_DMA {:#x}+{:#x}: {e}",
                    extent.iova, extent.len
                )
            })?;
            state.ledger.remove(&extent.iova);
            state.stats.mapped_bytes -= extent.len;
        }
        for extent in &plan.map {
            self.mapper.map(extent).map_err(|e| {
                format!(
                    "VFIO_IOMMU_MAP_DMA {:#x}+{:#x}: {e}",
                    extent.iova, extent.len
                )
            })?;
            state.ledger.insert(extent.iova, *extent);
            state.stats.mapped_bytes += extent.len;
        }
        let stats = &mut state.stats;
        stats.mappings = state.ledger.len();
        stats.peak_bytes = stats.peak_bytes.max(stats.mapped_bytes);
        stats.peak_mappings = stats.peak_mappings.max(stats.mappings);
        Ok(())
    }

    /// Undoes every mapping, stops the function's DMA and ignores the guest's tables from now.
    fn quarantine(&self, state: &mut ShadowState, why: String) {
        for extent in std::mem::take(&mut state.ledger).into_values() {
            if let Err(e) = self.mapper.unmap(&extent) {
                tracing::warn!(
                    "{}: unmapping {:#x}+{:#x}: {e}",
                    self.name,
                    extent.iova,
                    extent.len
                );
            }
        }
        self.mapper.quarantine();
        tracing::error!(
            "{}: quarantined ({why}): DMA unmapped, Bus Master cleared",
            self.name
        );
        state.stats.mapped_bytes = 0;
        state.stats.mappings = 0;
        state.stats.quarantined = Some(why);
    }
}

impl MappingObserver for DmaShadow {
    fn invalidated(&self, view: &MappingView<'_>, range: IovaRange) {
        self.sync(range, || view.runs(range).map_err(|e| e.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM_HOST: u64 = 0x7f00_0000_0000;
    const MIB: u64 = 1 << 20;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Map(Extent),
        Unmap(Extent),
        Quarantine,
    }

    /// Records every call; maps fail once `fail_maps_after` maps were made.
    #[derive(Default)]
    struct FakeMapper {
        calls: Mutex<Vec<Call>>,
        maps_made: std::sync::atomic::AtomicUsize,
        fail_maps_after: Option<usize>,
    }

    impl FakeMapper {
        fn take(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl DmaMapper for FakeMapper {
        fn map(&self, extent: &Extent) -> io::Result<()> {
            let made = self
                .maps_made
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.fail_maps_after.is_some_and(|limit| made >= limit) {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            self.calls.lock().unwrap().push(Call::Map(*extent));
            Ok(())
        }

        fn unmap(&self, extent: &Extent) -> io::Result<()> {
            self.calls.lock().unwrap().push(Call::Unmap(*extent));
            Ok(())
        }

        fn quarantine(&self) {
            self.calls.lock().unwrap().push(Call::Quarantine);
        }
    }

    fn run(iova: u64, gpa: u64, len: u64) -> MappingRun {
        MappingRun {
            iova,
            gpa,
            len,
            read: true,
            write: true,
        }
    }

    fn extent(iova: u64, gpa: u64, len: u64) -> Extent {
        Extent {
            iova,
            len,
            host: RAM_HOST + gpa,
            read: true,
            write: true,
        }
    }

    fn range(start: u64, end: u64) -> IovaRange {
        IovaRange { start, end }
    }

    /// A shadow over 64 MiB of RAM at 0, Bus Master on.
    fn shadow(mapper: &Arc<FakeMapper>) -> DmaShadow {
        let shadow = DmaShadow::new("test".into(), mapper.clone(), vec![(0, 64 * MIB, RAM_HOST)]);
        shadow.set_bus_master(true);
        shadow
    }

    #[test]
    fn contiguous_new_pages_become_one_mapping_at_the_host_address_of_their_gpa() {
        let mapper = Arc::new(FakeMapper::default());
        let shadow = shadow(&mapper);

        shadow.sync(range(0x1000, 0x4000), || {
            Ok(vec![
                run(0x1000, 0x10_0000, 0x2000),
                run(0x3000, 0x10_2000, 0x1000),
            ])
        });

        assert_eq!(
            mapper.take(),
            vec![Call::Map(extent(0x1000, 0x10_0000, 0x3000))]
        );
        let stats = shadow.stats();
        assert_eq!((stats.mapped_bytes, stats.mappings), (0x3000, 1));
    }

    #[test]
    fn an_unchanged_mapping_is_left_alone_and_a_new_neighbour_gets_its_own() {
        let mapper = Arc::new(FakeMapper::default());
        let shadow = shadow(&mapper);
        shadow.sync(range(0x1000, 0x2000), || {
            Ok(vec![run(0x1000, 0x10_0000, 0x1000)])
        });
        mapper.take();

        // The guest maps the next page (contiguous in both spaces) and invalidates its domain.
        shadow.sync(IovaRange::ALL, || Ok(vec![run(0x1000, 0x10_0000, 0x2000)]));

        assert_eq!(
            mapper.take(),
            vec![Call::Map(extent(0x2000, 0x10_1000, 0x1000))],
            "the live mapping at 0x1000 is never unmapped"
        );
        assert_eq!(shadow.stats().mapped_bytes, 0x2000);
    }

    #[test]
    fn a_page_unmapped_by_the_guest_is_unmapped_and_the_rest_of_its_mapping_restored() {
        let mapper = Arc::new(FakeMapper::default());
        let shadow = shadow(&mapper);
        shadow.sync(range(0, 0x3000), || Ok(vec![run(0, 0x20_0000, 0x3000)]));
        mapper.take();

        shadow.sync(range(0x1000, 0x2000), || Ok(Vec::new()));

        assert_eq!(
            mapper.take(),
            vec![
                Call::Unmap(extent(0, 0x20_0000, 0x3000)),
                Call::Map(extent(0, 0x20_0000, 0x1000)),
                Call::Map(extent(0x2000, 0x20_2000, 0x1000)),
            ]
        );
        let stats = shadow.stats();
        assert_eq!((stats.mapped_bytes, stats.peak_bytes), (0x2000, 0x3000));
    }

    #[test]
    fn a_changed_target_or_permission_is_remapped() {
        let mapper = Arc::new(FakeMapper::default());
        let shadow = shadow(&mapper);
        shadow.sync(range(0, 0x2000), || {
            Ok(vec![
                run(0, 0x10_0000, 0x1000),
                run(0x1000, 0x30_0000, 0x1000),
            ])
        });
        mapper.take();
        let read_only = MappingRun {
            write: false,
            ..run(0x1000, 0x30_0000, 0x1000)
        };

        shadow.sync(range(0, 0x2000), || {
            Ok(vec![run(0, 0x40_0000, 0x1000), read_only])
        });

        assert_eq!(
            mapper.take(),
            vec![
                Call::Unmap(extent(0, 0x10_0000, 0x1000)),
                Call::Unmap(extent(0x1000, 0x30_0000, 0x1000)),
                Call::Map(extent(0, 0x40_0000, 0x1000)),
                Call::Map(Extent {
                    write: false,
                    ..extent(0x1000, 0x30_0000, 0x1000)
                }),
            ]
        );
    }

    #[test]
    fn targets_outside_guest_ram_are_not_mapped_and_a_run_is_split_at_region_ends() {
        let ram = vec![(0, MIB, RAM_HOST), (4 * MIB, MIB, RAM_HOST + 0x1000_0000)];
        let runs = [run(0x10_0000, MIB - 0x1000, 4 * MIB)];

        let extents = host_extents(&runs, &ram);

        assert_eq!(
            extents,
            vec![
                Extent {
                    iova: 0x10_0000,
                    len: 0x1000,
                    host: RAM_HOST + MIB - 0x1000,
                    read: true,
                    write: true,
                },
                Extent {
                    iova: 0x10_0000 + 3 * MIB + 0x1000,
                    len: MIB - 0x1000,
                    host: RAM_HOST + 0x1000_0000,
                    read: true,
                    write: true,
                },
            ]
        );
    }

    #[test]
    fn nothing_is_mapped_without_bus_master_and_turning_it_off_unmaps_everything() {
        let mapper = Arc::new(FakeMapper::default());
        let shadow = DmaShadow::new("test".into(), mapper.clone(), vec![(0, 64 * MIB, RAM_HOST)]);
        let mut walked = false;
        shadow.sync(IovaRange::ALL, || {
            walked = true;
            Ok(vec![run(0, 0, 64 * MIB)])
        });
        let before = mapper.take();
        shadow.set_bus_master(true);
        shadow.sync(IovaRange::ALL, || Ok(vec![run(0, 0, 64 * MIB)]));
        mapper.take();

        shadow.set_bus_master(false);

        assert!(!walked && before.is_empty(), "{before:?}");
        assert_eq!(mapper.take(), vec![Call::Unmap(extent(0, 0, 64 * MIB))]);
        let stats = shadow.stats();
        assert_eq!((stats.mapped_bytes, stats.peak_bytes), (0, 64 * MIB));
    }

    #[test]
    fn a_failed_map_quarantines_the_function_and_later_notifications_are_ignored() {
        let mapper = Arc::new(FakeMapper {
            fail_maps_after: Some(1),
            ..FakeMapper::default()
        });
        let shadow = shadow(&mapper);
        shadow.sync(range(0, 0x1000), || Ok(vec![run(0, 0x10_0000, 0x1000)]));
        mapper.take();

        shadow.sync(range(0x8000, 0x9000), || {
            Ok(vec![run(0x8000, 0x20_0000, 0x1000)])
        });
        shadow.sync(range(0x9000, 0xa000), || {
            Ok(vec![run(0x9000, 0x30_0000, 0x1000)])
        });

        assert_eq!(
            mapper.take(),
            vec![Call::Unmap(extent(0, 0x10_0000, 0x1000)), Call::Quarantine]
        );
        let stats = shadow.stats();
        assert_eq!(stats.mapped_bytes, 0);
        assert!(stats
            .quarantined
            .is_some_and(|why| why.contains("VFIO_IOMMU_MAP_DMA 0x8000+0x1000")));
    }

    #[test]
    fn a_walk_over_budget_or_too_many_mappings_quarantine_instead_of_mapping() {
        let mapper = Arc::new(FakeMapper::default());
        let over_budget = shadow(&mapper);
        let too_many = shadow(&mapper);
        // Every other page: no two runs merge.
        let scattered: Vec<MappingRun> = (0..=MAX_MAPPINGS as u64)
            .map(|i| run(i * 0x2000, 0, 0x1000))
            .collect();

        over_budget.sync(IovaRange::ALL, || Err("too many entries".into()));
        too_many.sync(IovaRange::ALL, || Ok(scattered));

        assert_eq!(mapper.take(), vec![Call::Quarantine, Call::Quarantine]);
        assert!(over_budget.is_quarantined() && too_many.is_quarantined());
    }

    /// Replays map/unmap calls as VFIO type1v2 would: a map may not overlap a mapping, an unmap
    /// must name a whole mapping. Returns the host address and permissions of each mapped page.
    fn host_iommu(calls: &[Call]) -> BTreeMap<u64, (u64, bool, bool)> {
        let mut mappings: BTreeMap<u64, Extent> = BTreeMap::new();
        for call in calls {
            match call {
                Call::Map(e) => {
                    assert!(
                        mappings
                            .values()
                            .all(|m| m.end() <= e.iova || e.end() <= m.iova),
                        "{e:?} overlaps a mapping"
                    );
                    mappings.insert(e.iova, *e);
                }
                Call::Unmap(e) => {
                    assert_eq!(
                        mappings.remove(&e.iova),
                        Some(*e),
                        "unmap of no whole mapping"
                    )
                }
                Call::Quarantine => panic!("quarantined"),
            }
        }
        let mut pages = BTreeMap::new();
        for m in mappings.values() {
            for offset in (0..m.len).step_by(0x1000) {
                pages.insert(m.iova + offset, (m.host + offset, m.read, m.write));
            }
        }
        pages
    }

    #[test]
    fn after_every_notification_the_host_iommu_maps_exactly_what_the_guest_tables_map() {
        // The guest's tables: IOVA page → (gpa, read, write), over 64 pages so that runs
        // touch, merge and split; changes are random (a fixed LCG), each followed by a
        // page-selective or (one in eight) a domain-wide notification.
        let mapper = Arc::new(FakeMapper::default());
        let shadow = shadow(&mapper);
        let mut tables: BTreeMap<u64, (u64, bool, bool)> = BTreeMap::new();
        let mut seed: u64 = 0x5eed;
        let mut next = || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            seed >> 33
        };
        let mut calls = Vec::new();

        for step in 0..2000 {
            let first = next() % 64;
            let count = 1 + next() % 4;
            let gpa = (next() % 8) * 0x1000;
            let mapped = next() % 3 != 0;
            let write = next() % 4 != 0;
            for page in first..(first + count).min(64) {
                let iova = page * 0x1000;
                if mapped {
                    tables.insert(iova, (gpa + iova, true, write));
                } else {
                    tables.remove(&iova);
                }
            }
            let notified = if next() % 8 == 0 {
                IovaRange::ALL
            } else {
                range(first * 0x1000, (first + count) * 0x1000)
            };
            let runs: Vec<MappingRun> = tables
                .iter()
                .map(|(&iova, &(gpa, read, write))| MappingRun {
                    iova,
                    gpa,
                    len: 0x1000,
                    read,
                    write,
                })
                .filter(|r| r.iova >= notified.start && r.iova < notified.end)
                .collect();

            shadow.sync(notified, || Ok(runs));

            calls.extend(mapper.take());
            let expected: BTreeMap<u64, (u64, bool, bool)> = tables
                .iter()
                .map(|(&iova, &(gpa, read, write))| (iova, (RAM_HOST + gpa, read, write)))
                .collect();
            assert_eq!(host_iommu(&calls), expected, "after step {step}");
        }
        let stats = shadow.stats();
        assert_eq!(stats.mapped_bytes, tables.len() as u64 * 0x1000);
        assert!(stats.mappings <= tables.len());
    }

    #[test]
    fn the_plan_for_an_unaffected_range_is_empty() {
        let mut ledger = BTreeMap::new();
        ledger.insert(0x1000, extent(0x1000, 0x10_0000, 0x1000));
        ledger.insert(0x5000, extent(0x5000, 0x20_0000, 0x1000));

        let plan = plan(&ledger, range(0x2000, 0x5000), &[]);

        assert_eq!(plan, Plan::default());
    }
}
