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

mod spaces;

pub use spaces::{DmaSpaces, DomainProvider, RequesterId};

use std::collections::VecDeque;
use std::sync::{Mutex, RwLock, RwLockReadGuard};

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

/// The IOTLB plus the miss path and the fault log.
#[derive(Debug, Default)]
pub struct DmaTranslator {
    iotlb: RwLock<Iotlb>,
    source: Option<Box<dyn TranslationSource>>,
    faults: Mutex<VecDeque<DmaFault>>,
}

impl DmaTranslator {
    pub fn with_source(source: Box<dyn TranslationSource>) -> Self {
        Self {
            source: Some(source),
            ..Self::default()
        }
    }

    /// Drops cached translations in a range (the guest invalidated them).
    pub fn invalidate(&self, iova: u64, length: u64) {
        self.iotlb
            .write()
            .unwrap()
            .invalidate_mapping(GuestAddress(iova), length as usize);
    }

    /// Drops every cached translation.
    pub fn invalidate_all(&self) {
        self.iotlb.write().unwrap().invalidate_all();
    }

    /// The faults recorded so far, oldest first.
    pub fn faults(&self) -> Vec<DmaFault> {
        self.faults.lock().unwrap().iter().copied().collect()
    }

    fn record_fault(&self, fault: DmaFault) {
        let mut log = self.faults.lock().unwrap();
        if log.len() == FAULT_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(fault);
    }

    /// Fills the IOTLB for the missing pieces of a failed lookup; false if the source has none.
    fn fill(&self, iova: u64, length: u64, access: Permissions) -> bool {
        let Some(source) = &self.source else {
            return false;
        };
        let end = iova.saturating_add(length);
        let mut at = iova;
        while at < end {
            let Some(m) = source.lookup(at, access) else {
                return false;
            };
            let covers = m.iova <= at && at < m.iova.saturating_add(m.length);
            if !covers || m.length == 0 || !m.permissions.allow(access) {
                return false;
            }
            let inserted = self.iotlb.write().unwrap().set_mapping(
                GuestAddress(m.iova),
                GuestAddress(m.target),
                m.length as usize,
                m.permissions,
            );
            if inserted.is_err() {
                return false;
            }
            at = m.iova.saturating_add(m.length);
        }
        true
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
        let mut refilled = false;
        loop {
            let guard = self.iotlb.read().unwrap();
            match Iotlb::lookup(guard, iova, length, access) {
                Ok(iter) => return Ok(iter),
                Err(_) if !refilled && self.fill(iova.0, length as u64, access) => refilled = true,
                Err(fails) => {
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

    #[test]
    fn fault_log_is_bounded() {
        let space = translated(ram(), Box::new(OnePage));

        for i in 0..(FAULT_LOG_CAPACITY as u64 + 10) {
            space.check_range(GuestAddress(0x4000_0000 + i * 8), 4, Permissions::Read);
        }

        assert_eq!(space.iommu().faults().len(), FAULT_LOG_CAPACITY);
    }
}
