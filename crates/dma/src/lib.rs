//! The one way device models reach guest memory.
//!
//! A [`DmaSpace`] is vm-memory's `IommuMemory` over the guest RAM: with translation off it is an
//! identity view of guest physical memory; with translation on, every access goes through a
//! [`DmaTranslator`] (IOTLB with permissions, filled on demand from a [`TranslationSource`] —
//! an emulated VT-d, virtio-iommu, or a vhost-user frontend — with faults logged).
//! virtio-queue's chains, `Reader` and `Writer` work on any `vm_memory::GuestMemory`, so device
//! models written against `DmaSpace` run unchanged inside the VMM or behind vhost-user, with or
//! without an IOMMU.
//!
//! Built on vm-memory's `iommu` module rather than by hand; this crate adds the fault log and the
//! miss path.

pub mod dirty;
pub mod shared_log;
mod spaces;

pub use spaces::{DmaSpaces, DomainProvider, RequesterId};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemoryMmap, Iommu, IommuMemory, Iotlb, Permissions};

mod iovec;
pub use iovec::{GuestIovecs, IovecError};

/// Guest memory as a device sees it.
pub type DmaSpace = IommuMemory<GuestMemoryMmap, DmaTranslator>;

/// An identity DMA space over `memory` (no IOMMU): device addresses are guest physical addresses.
pub fn identity(memory: GuestMemoryMmap) -> DmaSpace {
    IommuMemory::new(memory, DmaTranslator::default(), false, ())
}

/// A translated DMA space: every access needs a mapping from `source`.
pub fn translated(memory: GuestMemoryMmap, source: Box<dyn TranslationSource>) -> DmaSpace {
    IommuMemory::new(memory, DmaTranslator::with_source(source), true, ())
}

/// One IOVA mapping as an IOMMU model reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub iova: u64,
    pub target: u64,
    pub length: u64,
    pub permissions: Permissions,
}

/// Where translations come from on an IOTLB miss (an IOMMU model's page walk, or a vhost-user
/// IOTLB miss message). Returns the mapping covering `iova`, or `None` if there is none.
pub trait TranslationSource: std::fmt::Debug + Send + Sync {
    fn lookup(&self, iova: u64, access: Permissions) -> Option<Mapping>;
}

/// A DMA access the IOMMU refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault {
    pub iova: u64,
    pub length: u64,
    pub access: Permissions,
}

/// Faults kept for inspection (bounded: a hostile guest cannot grow it).
const FAULT_LOG_CAPACITY: usize = 256;

/// How often a miss is looked up again when invalidations keep overtaking it, before the
/// access is refused (a guest that invalidates without pause cannot stall a device forever).
const MAX_FILL_ATTEMPTS: usize = 8;

/// Why a miss could not be filled.
enum FillError {
    /// The source has no mapping allowing the access: a fault.
    Refused,
    /// An invalidation ran while the source was asked: its answer may be stale; ask again.
    Overtaken,
}

/// The IOTLB plus the miss path and the fault log.
#[derive(Debug, Default)]
pub struct DmaTranslator {
    iotlb: RwLock<Iotlb>,
    source: Option<Box<dyn TranslationSource>>,
    faults: Mutex<VecDeque<DmaFault>>,
    /// Bumped (under the IOTLB write lock) by every invalidation, so that a fill whose lookup
    /// raced with one does not cache what the guest just invalidated.
    generation: AtomicU64,
    /// The space's own device write log (see [`dirty::DeviceWriteLog`]), and whether there is
    /// one (the fast path: one relaxed load per acquisition when there is none).
    write_log: RwLock<Option<std::sync::Arc<dyn dirty::DeviceWriteLog>>>,
    write_logging: AtomicBool,
}

impl DmaTranslator {
    pub fn with_source(source: Box<dyn TranslationSource>) -> Self {
        Self {
            source: Some(source),
            ..Self::default()
        }
    }

    /// Drops cached translations in a range (the guest invalidated them). The range is clipped
    /// to the address space; an empty one drops nothing.
    pub fn invalidate(&self, iova: u64, length: u64) {
        let length = length.min(u64::MAX - iova);
        let mut iotlb = self.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        self.generation.fetch_add(1, Ordering::AcqRel);
        if length > 0 {
            iotlb.invalidate_mapping(GuestAddress(iova), length as usize);
        }
    }

    /// Installs (or with `None` removes) the log of guest pages the devices on this space
    /// write; see [`dirty`].
    pub fn set_write_log(&self, log: Option<std::sync::Arc<dyn dirty::DeviceWriteLog>>) {
        let mut slot = self
            .write_log
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.write_logging.store(log.is_some(), Ordering::SeqCst);
        *slot = log;
    }

    /// Whether a write log is installed.
    pub fn logs_writes(&self) -> bool {
        self.write_logging.load(Ordering::Relaxed)
    }

    /// Marks guest physical range `gpa..gpa+len` in the write log, if there is one.
    fn log_write(&self, gpa: u64, len: u64) {
        let log = self
            .write_log
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(log) = log.as_ref() {
            log.mark(gpa, len);
        }
    }

    /// Drops every cached translation.
    pub fn invalidate_all(&self) {
        let mut iotlb = self.iotlb.write().unwrap_or_else(PoisonError::into_inner);
        self.generation.fetch_add(1, Ordering::AcqRel);
        iotlb.invalidate_all();
    }

    /// The faults recorded so far, oldest first.
    pub fn faults(&self) -> Vec<DmaFault> {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }

    /// The mapping covering `iova` as the translation source has it now — its whole page or
    /// run and every permission it grants, not only `access` — for a frontend that hands
    /// translations on to another process (a vhost-user IOTLB UPDATE). The source is asked
    /// directly, so a refusal is the unit's fault like any device access's, and is logged here
    /// too. `None` for an identity space (no source) or when the source refuses `access`.
    pub fn source_mapping(&self, iova: u64, access: Permissions) -> Option<Mapping> {
        let source = self.source.as_ref()?;
        let found = source.lookup(iova, access).filter(|m| {
            m.length > 0
                && m.iova <= iova
                && iova - m.iova < m.length
                && m.iova.checked_add(m.length).is_some()
                && m.permissions.allow(access)
        });
        if found.is_none() {
            self.record_fault(DmaFault {
                iova,
                length: 1,
                access,
            });
        }
        found
    }

    fn record_fault(&self, fault: DmaFault) {
        let mut log = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == FAULT_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(fault);
    }

    /// Fills the IOTLB for the missing pieces of a failed lookup. A mapping is cached only if
    /// no invalidation ran since the source was asked for it (else the caller asks again).
    fn fill(&self, iova: u64, length: u64, access: Permissions) -> Result<(), FillError> {
        let Some(source) = &self.source else {
            return Err(FillError::Refused);
        };
        let end = iova.saturating_add(length);
        let mut at = iova;
        while at < end {
            let generation = self.generation.load(Ordering::Acquire);
            let Some(m) = source.lookup(at, access) else {
                return Err(FillError::Refused);
            };
            let covers = m.iova <= at && at < m.iova.saturating_add(m.length);
            // vm-memory's IOTLB adds iova + length unchecked.
            let fits = m.iova.checked_add(m.length).is_some();
            if !covers || !fits || m.length == 0 || !m.permissions.allow(access) {
                return Err(FillError::Refused);
            }
            let mut iotlb = self.iotlb.write().unwrap_or_else(PoisonError::into_inner);
            if self.generation.load(Ordering::Acquire) != generation {
                return Err(FillError::Overtaken);
            }
            let inserted = iotlb.set_mapping(
                GuestAddress(m.iova),
                GuestAddress(m.target),
                m.length as usize,
                m.permissions,
            );
            if inserted.is_err() {
                return Err(FillError::Refused);
            }
            at = m.iova.saturating_add(m.length);
        }
        Ok(())
    }
}

fn cannot_resolve(iova: GuestAddress, length: usize, reason: &str) -> IommuError {
    IommuError::CannotResolve {
        iova_range: IovaRange { base: iova, length },
        reason: reason.to_string(),
    }
}

impl Iommu for DmaTranslator {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let fault = DmaFault {
            iova: iova.0,
            length: length as u64,
            access,
        };
        // vm-memory adds iova + length unchecked; a range wrapping the address space is a fault.
        if iova.0.checked_add(length as u64).is_none() {
            self.record_fault(fault);
            return Err(cannot_resolve(
                iova,
                length,
                "range wraps the address space",
            ));
        }
        let mut attempts = 0;
        loop {
            let guard = self.iotlb.read().unwrap_or_else(PoisonError::into_inner);
            let fails = match Iotlb::lookup(guard, iova, length, access) {
                Ok(iter) => return Ok(iter),
                Err(fails) => fails,
            };
            attempts += 1;
            let retry = attempts <= MAX_FILL_ATTEMPTS
                && match self.fill(iova.0, length as u64, access) {
                    Ok(()) | Err(FillError::Overtaken) => true,
                    Err(FillError::Refused) => false,
                };
            if !retry {
                self.record_fault(fault);
                let reason = format!(
                    "{} unmapped and {} forbidden subranges",
                    fails.misses.len(),
                    fails.access_fails.len()
                );
                return Err(cannot_resolve(iova, length, &reason));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory};

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Maps IOVA 0x10_0000.. to GPA 0x2000 for one page, read-only above 0x10_0800.
    #[derive(Debug)]
    struct OnePage;

    impl TranslationSource for OnePage {
        fn lookup(&self, iova: u64, _access: Permissions) -> Option<Mapping> {
            match iova {
                0x10_0000..=0x10_07ff => Some(Mapping {
                    iova: 0x10_0000,
                    target: 0x2000,
                    length: 0x800,
                    permissions: Permissions::ReadWrite,
                }),
                0x10_0800..=0x10_0fff => Some(Mapping {
                    iova: 0x10_0800,
                    target: 0x2800,
                    length: 0x800,
                    permissions: Permissions::Read,
                }),
                _ => None,
            }
        }
    }

    fn read_u32(space: &DmaSpace, addr: u64) -> Option<u32> {
        let mut buf = [0u8; 4];
        let slices = space
            .get_slices(GuestAddress(addr), 4, Permissions::Read)
            .ok()?;
        let mut at = 0;
        for slice in slices {
            let slice = slice.ok()?;
            slice.copy_to(&mut buf[at..]);
            at += slice.len();
        }
        Some(u32::from_le_bytes(buf))
    }

    #[test]
    fn identity_space_reads_guest_physical_memory() {
        let mem = ram();
        mem.write_obj(0xfeed_f00d_u32, GuestAddress(0x2000))
            .unwrap();

        let space = identity(mem);

        assert_eq!(read_u32(&space, 0x2000), Some(0xfeed_f00d));
    }

    #[test]
    fn translated_space_maps_through_the_source_and_logs_faults() {
        let mem = ram();
        mem.write_obj(0x1234_5678_u32, GuestAddress(0x2004))
            .unwrap();
        let space = translated(mem, Box::new(OnePage));

        assert_eq!(read_u32(&space, 0x10_0004), Some(0x1234_5678));
        assert_eq!(read_u32(&space, 0x2004), None, "GPA is not an IOVA");
        assert!(space.check_range(GuestAddress(0x10_0900), 4, Permissions::Read));
        assert!(!space.check_range(GuestAddress(0x10_0900), 4, Permissions::Write));

        let faults = space.iommu().faults();
        assert_eq!(faults.len(), 2);
        assert_eq!(faults[0].iova, 0x2004);
        assert_eq!(faults[1].access, Permissions::Write);
    }

    #[test]
    fn wrapping_ranges_fault_instead_of_overflowing() {
        let space = translated(ram(), Box::new(OnePage));

        assert!(!space.check_range(GuestAddress(u64::MAX - 1), 16, Permissions::Read));
        assert_eq!(space.iommu().faults().len(), 1);
    }

    #[test]
    fn invalidation_forces_a_new_lookup() {
        let space = translated(ram(), Box::new(OnePage));
        assert!(space.check_range(GuestAddress(0x10_0000), 4, Permissions::Read));

        space.iommu().invalidate_all();

        assert!(space.check_range(GuestAddress(0x10_0000), 4, Permissions::Read));
        assert!(space.iommu().faults().is_empty());
    }

    /// Maps one page to 0x2000, but runs an invalidation of its own translator while it is
    /// asked the first time (the guest invalidating while a miss is being filled), and maps it
    /// to 0x3000 from then on (what the guest changed before invalidating).
    #[derive(Debug)]
    struct RacedByInvalidation {
        translator: std::sync::OnceLock<std::sync::Weak<DmaTranslator>>,
        asked: std::sync::atomic::AtomicU32,
    }

    impl TranslationSource for std::sync::Arc<RacedByInvalidation> {
        fn lookup(&self, iova: u64, _access: Permissions) -> Option<Mapping> {
            let first = self.asked.fetch_add(1, Ordering::SeqCst) == 0;
            let target = if first {
                if let Some(translator) = self.translator.get().and_then(|t| t.upgrade()) {
                    translator.invalidate(iova & !0xfff, 0x1000);
                }
                0x2000
            } else {
                0x3000
            };
            Some(Mapping {
                iova: iova & !0xfff,
                target,
                length: 0x1000,
                permissions: Permissions::ReadWrite,
            })
        }
    }

    #[test]
    fn a_translation_overtaken_by_an_invalidation_is_not_cached() {
        let mem = ram();
        mem.write_obj(0x2222_u32, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x3333_u32, GuestAddress(0x3000)).unwrap();
        let source = std::sync::Arc::new(RacedByInvalidation {
            translator: std::sync::OnceLock::new(),
            asked: std::sync::atomic::AtomicU32::new(0),
        });
        let space = translated(mem, Box::new(source.clone()));
        source
            .translator
            .set(std::sync::Arc::downgrade(space.iommu()))
            .unwrap();

        let value = read_u32(&space, 0x10_0000);

        assert_eq!(value, Some(0x3333), "the stale answer was not used");
        assert_eq!(source.asked.load(Ordering::SeqCst), 2);
        assert!(space.iommu().faults().is_empty());
    }

    #[test]
    fn invalidating_a_range_at_the_top_of_the_address_space_does_not_overflow() {
        let space = translated(ram(), Box::new(OnePage));

        space.iommu().invalidate(u64::MAX - 0xfff, 0x10_0000);
        space.iommu().invalidate(0x10_0000, 0);

        assert!(space.check_range(GuestAddress(0x10_0000), 4, Permissions::Read));
    }

    #[test]
    fn fault_log_is_bounded() {
        let space = translated(ram(), Box::new(OnePage));

        for i in 0..(FAULT_LOG_CAPACITY as u64 + 10) {
            space.check_range(GuestAddress(0x4000_0000 + i * 8), 4, Permissions::Read);
        }

        assert_eq!(space.iommu().faults().len(), FAULT_LOG_CAPACITY);
    }
}
