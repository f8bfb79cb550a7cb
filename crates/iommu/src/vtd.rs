//! The emulated VT-d remapping unit: its register page (a [`BusDevice`] on the MMIO bus), the
//! translation of each requester's DMA (as the [`DomainProvider`] of the VM's [`DmaSpaces`]),
//! the fault recording registers and fault event, and invalidation (register-based and queued)
//! that drops the affected spaces' IOTLB entries.
//!
//! Locking: the register state has one mutex. A translation (an IOTLB miss in a `DmaSpace`)
//! takes it while it walks the tables and records a fault; an invalidation takes it and then the
//! spaces' IOTLB locks. A `DmaSpace` never holds its IOTLB lock while it asks for a translation,
//! so the two orders cannot deadlock.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use sluice_bus::irq::{MsiMessage, MsiSink};
use sluice_bus::BusDevice;
use sluice_dma::{DmaSpaces, DomainProvider, Mapping, RequesterId, TranslationSource};
use sluice_virtio::DeviceMetrics;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

use crate::intremap::{InterruptTable, RemapClient, ECAP_IR, IRTA, IRTA_WRITABLE};
use crate::queue::{self, Descriptor, Scope};
use crate::regs::*;
use crate::tables::{FaultReason, Tables};
use crate::watch::{IovaRange, MappingObserver, MappingRun, MappingView, WalkError, Watchers};

/// What a translation-disabled unit (GSTS.TES = 0) maps: everything below 2^MGAW, identically.
const IDENTITY_LENGTH: u64 = 1 << MGAW_BITS;

/// Named counters in the unit's metrics (`--metrics`, `SLUICE_LOG=info`).
pub const COUNTER_NAMES: &[&str] = &[
    "walks",
    "faults",
    "faults_not_recorded",
    "interrupts",
    "context_invalidations",
    "iotlb_invalidations",
    "queue_descriptors",
    "interrupt_remaps",
    "interrupts_remapped",
    "interrupt_faults",
    "interrupt_entry_invalidations",
];
/// Page walks on an IOTLB miss.
const WALKS: usize = 0;
/// DMA accesses refused (recorded or not).
const FAULTS: usize = 1;
/// Faults lost to a full fault log (FSTS.PFO) or suppressed by the context entry (FPD).
const FAULTS_NOT_RECORDED: usize = 2;
/// Fault and invalidation-completion events sent as MSI.
const INTERRUPTS: usize = 3;
const CONTEXT_INVALIDATIONS: usize = 4;
const IOTLB_INVALIDATIONS: usize = 5;
/// Invalidation queue descriptors processed.
const QUEUE_DESCRIPTORS: usize = 6;
// Counters 7.. belong to interrupt remapping (vtd/interrupts.rs).

mod interrupts;

/// One fault recording register (128 bits).
#[derive(Debug, Default, Clone, Copy)]
struct FaultRecord {
    lo: u64,
    hi: u64,
}

const FRCD_HI_F: u64 = 1 << 63;
const FRCD_HI_T_READ: u64 = 1 << 62;

impl FaultRecord {
    fn new(source: RequesterId, iova: u64, reason: FaultReason, write: bool) -> Self {
        let read_flag = if write { 0 } else { FRCD_HI_T_READ };
        Self {
            lo: iova & !0xfff,
            hi: FRCD_HI_F | read_flag | (u64::from(reason as u8) << 32) | u64::from(source),
        }
    }

    fn pending(&self) -> bool {
        self.hi & FRCD_HI_F != 0
    }
}

#[derive(Debug, Default)]
struct State {
    gsts: u32,
    rtaddr: u64,
    /// The root table latched by the last SRTP.
    root: u64,
    ccmd: u64,
    /// FSTS without PPF, which is derived from the records.
    fsts: u32,
    fectl: u32,
    fedata: u32,
    feaddr: u32,
    feuaddr: u32,
    iqa: u64,
    iqh: u64,
    iqt: u64,
    ics: u32,
    iectl: u32,
    iedata: u32,
    ieaddr: u32,
    ieuaddr: u32,
    iva: u64,
    iotlb: u64,
    records: [FaultRecord; FAULT_RECORDS],
    next_record: usize,
    /// ECAP: the constant part plus IR when offered.
    ecap: u64,
    irta: u64,
    /// The interrupt remapping table latched by the last SIRTP.
    interrupt_table: InterruptTable,
    /// A translation of interrupts may have changed: clients are told after the write.
    remap_changed: bool,
}

struct Shared {
    memory: GuestMemoryMmap,
    haw: u32,
    msi: Arc<dyn MsiSink>,
    state: Mutex<State>,
    spaces: Mutex<Weak<DmaSpaces>>,
    /// Told after every invalidation that covers their requester (crate::watch).
    watchers: Watchers,
    metrics: Arc<DeviceMetrics>,
    /// ECAP.IR offered.
    interrupt_remapping: bool,
    remap_clients: Mutex<Vec<Weak<dyn RemapClient>>>,
}

/// An emulated Intel VT-d remapping unit. Clones share the unit.
#[derive(Clone)]
pub struct Vtd {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Vtd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vtd")
            .field("haw", &self.shared.haw)
            .finish_non_exhaustive()
    }
}

impl Vtd {
    /// A unit over `memory` whose tables and pages lie below 2^`haw` (the DMAR table's host
    /// address width), signalling faults through `msi`.
    pub fn new(memory: GuestMemoryMmap, haw: u32, msi: Arc<dyn MsiSink>) -> Self {
        Self::build(memory, haw, msi, false)
    }

    /// A unit that also offers interrupt remapping (ECAP.IR; xAPIC destinations only).
    pub fn with_interrupt_remapping(
        memory: GuestMemoryMmap,
        haw: u32,
        msi: Arc<dyn MsiSink>,
    ) -> Self {
        Self::build(memory, haw, msi, true)
    }

    fn build(memory: GuestMemoryMmap, haw: u32, msi: Arc<dyn MsiSink>, ir: bool) -> Self {
        let state = State {
            ecap: ECAP_VALUE | if ir { ECAP_IR } else { 0 },
            ..State::default()
        };
        Self {
            shared: Arc::new(Shared {
                memory,
                haw: haw.clamp(32, 52),
                msi,
                state: Mutex::new(state),
                spaces: Mutex::new(Weak::new()),
                watchers: Watchers::default(),
                metrics: Arc::new(DeviceMetrics::with_counters("vt-d", 0, COUNTER_NAMES)),
                interrupt_remapping: ir,
                remap_clients: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The DMA spaces whose IOTLBs invalidations drop (those this unit is the provider of).
    pub fn attach_spaces(&self, spaces: &Arc<DmaSpaces>) {
        *self
            .shared
            .spaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(spaces);
    }

    /// Calls `observer` after every invalidation that covers `requester` (crate::watch).
    pub fn watch(&self, requester: RequesterId, observer: Arc<dyn MappingObserver>) {
        let _state = self.shared.lock();
        self.shared.watchers.add(requester, observer);
    }

    /// Stops calling `requester`'s observers (its function left the VM: hot-unplug).
    pub fn unwatch(&self, requester: RequesterId) {
        let _state = self.shared.lock();
        self.shared.watchers.remove(requester);
    }

    /// Calls `requester`'s observers as if all its mappings had been invalidated (a watcher
    /// that ignored notifications for a while catches up).
    pub fn refresh(&self, requester: RequesterId) {
        let state = self.shared.lock();
        let translating = state.gsts & GCMD_TE != 0;
        let tables = self.tables();
        (self.shared.watchers).refresh(tables, state.root, translating, requester);
    }

    /// `requester`'s current mappings in `range` (crate::watch).
    pub fn mappings(
        &self,
        requester: RequesterId,
        range: IovaRange,
    ) -> Result<Vec<MappingRun>, WalkError> {
        let state = self.shared.lock();
        MappingView {
            tables: self.tables(),
            root: state.root,
            translating: state.gsts & GCMD_TE != 0,
            requester,
        }
        .runs(range)
    }

    /// Walks, faults, interrupts and invalidations so far.
    pub fn metrics(&self) -> Arc<DeviceMetrics> {
        self.shared.metrics.clone()
    }

    /// Reads the register at `offset` (4 or 8 bytes, naturally aligned; others read zero).
    pub fn read_register(&self, offset: u64, data: &mut [u8]) {
        let state = self.shared.lock();
        let value = match (data.len(), offset % data.len().max(1) as u64) {
            (8, 0) if is_register64(offset) => state.read64(offset),
            (8, 0) => u64::from(state.read32(offset)) | (u64::from(state.read32(offset + 4)) << 32),
            (4, 0) if is_register64(offset & !7) => state.read64(offset & !7) >> (8 * (offset & 4)),
            (4, 0) => u64::from(state.read32(offset)),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(8);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    /// Applies a guest write to the register at `offset` (4 or 8 bytes, naturally aligned;
    /// others are dropped).
    pub fn write_register(&self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let len = data.len().min(8);
        raw[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(raw);
        let mut state = self.shared.lock();
        match (data.len(), offset % data.len().max(1) as u64) {
            (8, 0) if is_register64(offset) => self.write64(&mut state, offset, value, true, true),
            (8, 0) => {
                self.write32(&mut state, offset, value as u32);
                self.write32(&mut state, offset + 4, (value >> 32) as u32);
            }
            (4, 0) if is_register64(offset & !7) => {
                let base = offset & !7;
                let high = offset & 4 != 0;
                let old = state.read64_raw(base);
                let merged = if high {
                    (old & 0xffff_ffff) | (value << 32)
                } else {
                    (old & !0xffff_ffff) | (value & 0xffff_ffff)
                };
                self.write64(&mut state, base, merged, !high, high);
            }
            (4, 0) => self.write32(&mut state, offset, value as u32),
            _ => tracing::debug!("vt-d: dropped a {len}-byte write at {offset:#x}"),
        }
        drop(state);
        self.notify_remap_clients();
    }

    fn write32(&self, state: &mut State, offset: u64, value: u32) {
        match offset {
            GCMD => self.write_gcmd(state, value),
            FSTS => {
                state.fsts &= !(value & FSTS_RW1C);
                if !state.fault_condition() {
                    state.fectl &= !CTL_IP;
                }
            }
            FECTL => {
                state.fectl = (state.fectl & CTL_IP) | (value & CTL_IM);
                if state.fectl & (CTL_IM | CTL_IP) == CTL_IP {
                    state.fectl &= !CTL_IP;
                    self.send(state.feuaddr, state.feaddr, state.fedata);
                }
            }
            FEDATA => state.fedata = value & 0xffff,
            FEADDR => state.feaddr = value & MSI_ADDR_MASK,
            FEUADDR => state.feuaddr = value,
            ICS => {
                state.ics &= !(value & ICS_IWC);
                if state.ics & ICS_IWC == 0 {
                    state.iectl &= !CTL_IP;
                }
            }
            IECTL => {
                state.iectl = (state.iectl & CTL_IP) | (value & CTL_IM);
                if state.iectl & (CTL_IM | CTL_IP) == CTL_IP {
                    state.iectl &= !CTL_IP;
                    self.send(state.ieuaddr, state.ieaddr, state.iedata);
                }
            }
            IEDATA => state.iedata = value & 0xffff,
            IEADDR => state.ieaddr = value & MSI_ADDR_MASK,
            IEUADDR => state.ieuaddr = value,
            _ => {}
        }
    }

    fn write64(&self, state: &mut State, offset: u64, value: u64, low: bool, high: bool) {
        match offset {
            RTADDR => state.rtaddr = value & RTADDR_MASK,
            CCMD => {
                state.ccmd = value & !(CCMD_ICC | (0b11 << CCMD_CAIG_SHIFT));
                if high && value & CCMD_ICC != 0 {
                    let done = self.context_command(state, value);
                    state.ccmd |= u64::from(done) << CCMD_CAIG_SHIFT;
                }
            }
            IVA => state.iva = value & !0xf80,
            IOTLB => {
                state.iotlb = value & !(IOTLB_IVT | (0b11 << IOTLB_IAIG_SHIFT));
                if high && value & IOTLB_IVT != 0 {
                    let done = self.iotlb_command(state, value);
                    state.iotlb |= u64::from(done) << IOTLB_IAIG_SHIFT;
                }
            }
            IQA => state.iqa = value & (IQA_BASE_MASK | IQA_QS_MASK),
            IRTA if self.shared.interrupt_remapping => state.irta = value & IRTA_WRITABLE,
            IQT => {
                state.iqt = value & IQ_INDEX_MASK;
                if low {
                    self.run_queue(state);
                }
            }
            o if (FRCD..FRCD_END).contains(&o) && o % 16 == 8 => {
                let index = ((o - FRCD) / 16) as usize;
                if let Some(record) = state.records.get_mut(index) {
                    if high && value & FRCD_HI_F != 0 {
                        record.hi &= !FRCD_HI_F;
                    }
                }
                if !state.fault_condition() {
                    state.fectl &= !CTL_IP;
                }
            }
            _ => {}
        }
    }

    fn write_gcmd(&self, state: &mut State, value: u32) {
        if value & GCMD_SRTP != 0 {
            state.root = state.rtaddr;
            state.gsts |= GCMD_SRTP;
            self.invalidate(state, Scope::All);
        }
        if (value ^ state.gsts) & GCMD_TE != 0 {
            state.gsts ^= GCMD_TE;
            tracing::info!(
                "vt-d: translation {}",
                if state.gsts & GCMD_TE != 0 {
                    "enabled"
                } else {
                    "disabled"
                }
            );
            self.invalidate(state, Scope::All);
        }
        if (value ^ state.gsts) & GCMD_QIE != 0 {
            if value & GCMD_QIE != 0 {
                state.iqh = 0;
                state.gsts |= GCMD_QIE;
            } else if state.iqh == state.iqt {
                state.gsts &= !GCMD_QIE;
            }
        }
        self.interrupt_commands(state, value);
        // SFL/EAFL (no advanced fault log) and WBF (no RWBF) are not offered by CAP/ECAP: their
        // status bits stay clear.
    }

    /// CCMD with ICC set; returns the granularity performed (0: invalid request).
    fn context_command(&self, state: &mut State, value: u64) -> u8 {
        let domain = (value & 0xffff) as u16;
        let scope = match (value >> CCMD_CIRG_SHIFT) & 0b11 {
            1 => Scope::All,
            2 => Scope::Domain(domain),
            3 => Scope::Device {
                domain,
                source: ((value >> 16) & 0xffff) as u16,
                function_mask: ((value >> 32) & 0b11) as u8,
            },
            _ => return 0,
        };
        self.shared.metrics.count(CONTEXT_INVALIDATIONS, 1);
        self.invalidate(state, scope);
        ((value >> CCMD_CIRG_SHIFT) & 0b11) as u8
    }

    /// IOTLB command with IVT set; returns the granularity performed (0: invalid request).
    fn iotlb_command(&self, state: &mut State, value: u64) -> u8 {
        let granularity = (value >> IOTLB_IIRG_SHIFT) & 0b11;
        let domain = ((value >> 32) & 0xffff) as u16;
        let Some(scope) = queue::iotlb_scope(granularity, domain, state.iva) else {
            return 0;
        };
        self.shared.metrics.count(IOTLB_INVALIDATIONS, 1);
        self.invalidate(state, scope);
        granularity as u8
    }

    /// Processes the invalidation queue from IQH up to IQT; an invalid descriptor, or one that
    /// cannot be read or completed, stops it at that descriptor with FSTS.IQE.
    fn run_queue(&self, state: &mut State) {
        if state.gsts & GCMD_QIE == 0 || state.fsts & FSTS_IQE != 0 {
            return;
        }
        let entries = 256u64 << (state.iqa & IQA_QS_MASK);
        let base = state.iqa & IQA_BASE_MASK;
        let tail = state.iqt >> 4;
        let mut head = state.iqh >> 4;
        if tail >= entries {
            self.queue_error(state);
            return;
        }
        while head != tail {
            let mut raw = [0u8; 16];
            let read = base.checked_add(head * 16).and_then(|at| {
                self.shared
                    .memory
                    .read_slice(&mut raw, GuestAddress(at))
                    .ok()
            });
            let lo = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
            let hi = u64::from_le_bytes(raw[8..].try_into().unwrap_or_default());
            let done =
                read.is_some() && queue::decode(lo, hi).is_some_and(|d| self.execute(state, d));
            if !done {
                tracing::debug!("vt-d: invalid queue descriptor {head} ({lo:#x}, {hi:#x})");
                state.iqh = head << 4;
                self.queue_error(state);
                return;
            }
            self.shared.metrics.count(QUEUE_DESCRIPTORS, 1);
            head = (head + 1) % entries;
        }
        state.iqh = head << 4;
    }

    fn queue_error(&self, state: &mut State) {
        let was = state.fault_condition();
        state.fsts |= FSTS_IQE;
        if !was {
            self.fault_event(state);
        }
    }

    /// Carries out one descriptor; false if it could not be completed (a status write outside
    /// guest memory).
    fn execute(&self, state: &mut State, descriptor: Descriptor) -> bool {
        match descriptor {
            Descriptor::ContextCache(scope) => {
                self.shared.metrics.count(CONTEXT_INVALIDATIONS, 1);
                self.invalidate(state, scope);
            }
            Descriptor::Iotlb(scope) => {
                self.shared.metrics.count(IOTLB_INVALIDATIONS, 1);
                self.invalidate(state, scope);
            }
            Descriptor::InterruptEntryCache(scope) => {
                return self.invalidate_interrupt_entries(state, scope);
            }
            Descriptor::Wait { status, interrupt } => {
                // Every earlier descriptor is already complete: the queue runs synchronously.
                if let Some((address, data)) = status {
                    if address >> self.shared.haw != 0
                        || self
                            .shared
                            .memory
                            .write_obj(data, GuestAddress(address))
                            .is_err()
                    {
                        return false;
                    }
                }
                if interrupt {
                    state.ics |= ICS_IWC;
                    if state.iectl & CTL_IP == 0 {
                        if state.iectl & CTL_IM != 0 {
                            state.iectl |= CTL_IP;
                        } else {
                            self.send(state.ieuaddr, state.ieaddr, state.iedata);
                        }
                    }
                }
            }
        }
        true
    }

    /// Drops what `scope` covers from the spaces' IOTLBs, then tells the watchers.
    fn invalidate(&self, state: &State, scope: Scope) {
        self.drop_cached(state, scope);
        let translating = state.gsts & GCMD_TE != 0;
        (self.shared.watchers).notify(self.tables(), state.root, translating, scope);
    }

    /// Drops the cached translations `scope` covers from the spaces it concerns. The unit
    /// caches no context entries of its own, so a context-cache invalidation also drops the
    /// IOTLBs of the devices it names.
    fn drop_cached(&self, state: &State, scope: Scope) {
        let Some(spaces) = self
            .shared
            .spaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade()
        else {
            return;
        };
        let tables = self.tables();
        for requester in spaces.requesters() {
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
                Scope::Domain(domain) | Scope::Pages { domain, .. } => {
                    // A context entry that no longer reads back (the guest is tearing it down)
                    // may have named this domain: drop it too.
                    tables
                        .context(state.root, requester)
                        .map_or(true, |context| context.domain == domain)
                }
            };
            let Some(translator) = spaces.translator(requester).filter(|_| concerned) else {
                continue;
            };
            match scope.range() {
                Some((start, length)) => translator.invalidate(start, length),
                None => translator.invalidate_all(),
            }
        }
    }

    fn tables(&self) -> Tables<'_> {
        Tables {
            memory: &self.shared.memory,
            haw: self.shared.haw,
        }
    }

    /// The mapping covering `iova` for `requester`, or `None` after recording a fault.
    fn translate(&self, requester: RequesterId, iova: u64, access: Permissions) -> Option<Mapping> {
        let mut state = self.shared.lock();
        if state.gsts & GCMD_TE == 0 {
            return (iova < IDENTITY_LENGTH).then_some(Mapping {
                iova: 0,
                target: 0,
                length: IDENTITY_LENGTH,
                permissions: Permissions::ReadWrite,
            });
        }
        self.shared.metrics.count(WALKS, 1);
        let write = matches!(access, Permissions::Write | Permissions::ReadWrite);
        let walked = self
            .tables()
            .translate(state.root, requester, iova, MGAW_BITS);
        let fault = match walked {
            Ok(page) if page.permissions.allow(access) => {
                return Some(Mapping {
                    iova: page.iova,
                    target: page.target,
                    length: page.size,
                    permissions: page.permissions,
                })
            }
            Ok(page) => {
                let denied_read = !page.permissions.allow(Permissions::Read)
                    && matches!(access, Permissions::Read | Permissions::ReadWrite);
                let reason = if denied_read {
                    FaultReason::ReadDenied
                } else {
                    FaultReason::WriteDenied
                };
                crate::tables::WalkFault {
                    reason,
                    suppressed: false,
                }
            }
            Err(mut fault) => {
                if fault.reason == FaultReason::ReadDenied && write {
                    fault.reason = FaultReason::WriteDenied;
                }
                fault
            }
        };
        self.shared.metrics.count(FAULTS, 1);
        if fault.suppressed {
            self.shared.metrics.count(FAULTS_NOT_RECORDED, 1);
        } else {
            self.record_fault(&mut state, requester, iova, fault.reason, write);
        }
        None
    }

    /// Primary fault logging: the next fault recording register, unless it still holds a fault
    /// the guest has not cleared (then FSTS.PFO, and further faults are lost until it clears PFO).
    fn record_fault(
        &self,
        state: &mut State,
        requester: RequesterId,
        iova: u64,
        reason: FaultReason,
        write: bool,
    ) {
        tracing::debug!("vt-d: fault {reason:?} for {requester:#06x} at {iova:#x}");
        self.store_record(state, FaultRecord::new(requester, iova, reason, write));
    }

    /// Logs `record` in the next fault recording register (see [`Vtd::record_fault`]).
    fn store_record(&self, state: &mut State, record: FaultRecord) {
        let index = state.next_record;
        if state.fsts & FSTS_PFO != 0 || state.records[index].pending() {
            self.shared.metrics.count(FAULTS_NOT_RECORDED, 1);
            if state.fsts & FSTS_PFO == 0 {
                let was = state.fault_condition();
                state.fsts |= FSTS_PFO;
                if !was {
                    self.fault_event(state);
                }
            }
            return;
        }
        let was = state.fault_condition();
        let first_pending = !state.records.iter().any(FaultRecord::pending);
        state.records[index] = record;
        state.next_record = (index + 1) % FAULT_RECORDS;
        if first_pending {
            state.fsts =
                (state.fsts & !(0xff << FSTS_FRI_SHIFT)) | ((index as u32) << FSTS_FRI_SHIFT);
        }
        if !was {
            self.fault_event(state);
        }
    }

    /// A new fault condition: the fault event interrupt, or FECTL.IP while it is masked.
    fn fault_event(&self, state: &mut State) {
        if state.fectl & CTL_IP != 0 {
            return;
        }
        if state.fectl & CTL_IM != 0 {
            state.fectl |= CTL_IP;
        } else {
            self.send(state.feuaddr, state.feaddr, state.fedata);
        }
    }

    fn send(&self, upper: u32, address: u32, data: u32) {
        self.shared.metrics.count(INTERRUPTS, 1);
        let message = MsiMessage {
            address: (u64::from(upper) << 32) | u64::from(address),
            data,
        };
        if let Err(error) = self.shared.msi.send(message) {
            tracing::warn!("vt-d: cannot send an event interrupt: {error}");
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn is_register64(offset: u64) -> bool {
    matches!(
        offset,
        CAP | ECAP | RTADDR | CCMD | IQH | IQT | IQA | IRTA | IVA | IOTLB
    ) || (FRCD..FRCD_END).contains(&offset)
}

impl State {
    /// Any primary fault pending, an overflow, or an invalidation queue error.
    fn fault_condition(&self) -> bool {
        self.fsts & FSTS_RW1C != 0 || self.records.iter().any(FaultRecord::pending)
    }

    fn read32(&self, offset: u64) -> u32 {
        match offset {
            VER => VER_VALUE,
            GSTS => self.gsts,
            FSTS => {
                let pending = self.records.iter().any(FaultRecord::pending);
                self.fsts | if pending { FSTS_PPF } else { 0 }
            }
            FECTL => self.fectl,
            FEDATA => self.fedata,
            FEADDR => self.feaddr,
            FEUADDR => self.feuaddr,
            ICS => self.ics,
            IECTL => self.iectl,
            IEDATA => self.iedata,
            IEADDR => self.ieaddr,
            IEUADDR => self.ieuaddr,
            // GCMD is write-only; reserved and unimplemented registers read zero.
            _ => 0,
        }
    }

    fn read64(&self, offset: u64) -> u64 {
        self.read64_raw(offset)
    }

    fn read64_raw(&self, offset: u64) -> u64 {
        match offset {
            CAP => CAP_VALUE,
            ECAP => self.ecap,
            IRTA => self.irta,
            RTADDR => self.rtaddr,
            CCMD => self.ccmd,
            IQH => self.iqh,
            IQT => self.iqt,
            IQA => self.iqa,
            IVA => self.iva,
            IOTLB => self.iotlb,
            o if (FRCD..FRCD_END).contains(&o) => {
                let record = self.records[((o - FRCD) / 16) as usize];
                if o % 16 == 0 {
                    record.lo
                } else {
                    record.hi
                }
            }
            _ => 0,
        }
    }
}

/// The register page on the MMIO bus.
impl BusDevice for Vtd {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.read_register(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.write_register(offset, data);
    }
}

impl crate::requester::TranslatingUnit for Vtd {
    const KIND: &'static str = "vt-d";

    fn translate_for(
        &self,
        requester: RequesterId,
        iova: u64,
        access: Permissions,
    ) -> Option<Mapping> {
        self.translate(requester, iova, access)
    }
}

impl DomainProvider for Vtd {
    fn domain(&self, requester: RequesterId) -> Option<Box<dyn TranslationSource>> {
        crate::requester::requester_view(self, requester)
    }
}
