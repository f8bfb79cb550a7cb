//! [`DmaSpaces`]: one [`DmaSpace`] per requester id (a PCI function's bus/device/function), so
//! that an IOMMU can give each device its own translation domain. Without an IOMMU every space
//! is an identity view of guest memory; with one, the [`DomainProvider`] (the vIOMMU model)
//! hands each requester's space its own [`TranslationSource`], and the IOMMU reaches that
//! space's IOTLB and fault log through [`DmaSpaces::translator`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::{GuestMemoryMmap, IommuMemory};

use crate::{DmaSpace, DmaTranslator, TranslationSource};

/// A PCI requester id: `bus << 8 | device << 3 | function`.
pub type RequesterId = u16;

/// The IOMMU's view: which translations a requester's DMA goes through.
pub trait DomainProvider: Send + Sync {
    /// `requester`'s translation source, or `None` to let it bypass translation (identity).
    fn domain(&self, requester: RequesterId) -> Option<Box<dyn TranslationSource>>;
}

/// The DMA spaces of one VM, by requester id.
pub struct DmaSpaces {
    memory: GuestMemoryMmap,
    provider: Option<Arc<dyn DomainProvider>>,
    spaces: Mutex<BTreeMap<RequesterId, DmaSpace>>,
}

impl std::fmt::Debug for DmaSpaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaSpaces")
            .field("iommu", &self.provider.is_some())
            .field("requesters", &self.requesters())
            .finish()
    }
}

impl DmaSpaces {
    /// No IOMMU: every requester sees guest physical memory.
    pub fn identity(memory: GuestMemoryMmap) -> Self {
        Self {
            memory,
            provider: None,
            spaces: Mutex::new(BTreeMap::new()),
        }
    }

    /// Behind an IOMMU: each requester's space translates through the domain `provider` gives.
    pub fn with_iommu(memory: GuestMemoryMmap, provider: Arc<dyn DomainProvider>) -> Self {
        Self {
            memory,
            provider: Some(provider),
            spaces: Mutex::new(BTreeMap::new()),
        }
    }

    /// `requester`'s DMA space, created on first use; later calls return the same space (clones
    /// share its IOTLB and fault log).
    pub fn space(&self, requester: RequesterId) -> DmaSpace {
        let mut spaces = self.spaces.lock().unwrap_or_else(PoisonError::into_inner);
        spaces
            .entry(requester)
            .or_insert_with(|| self.create(requester))
            .clone()
    }

    fn create(&self, requester: RequesterId) -> DmaSpace {
        let source = self.provider.as_ref().and_then(|p| p.domain(requester));
        match source {
            Some(source) => IommuMemory::new(
                self.memory.clone(),
                DmaTranslator::with_source(source),
                true,
                (),
            ),
            None => crate::identity(self.memory.clone()),
        }
    }

    /// The translator (IOTLB, fault log) of `requester`'s space, if one was created.
    pub fn translator(&self, requester: RequesterId) -> Option<Arc<DmaTranslator>> {
        let spaces = self.spaces.lock().unwrap_or_else(PoisonError::into_inner);
        spaces.get(&requester).map(|space| space.iommu().clone())
    }

    /// Requesters that have a space, in order.
    pub fn requesters(&self) -> Vec<RequesterId> {
        let spaces = self.spaces.lock().unwrap_or_else(PoisonError::into_inner);
        spaces.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mapping;
    use vm_memory::{Bytes, GuestAddress, Permissions};

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Requester r's domain maps IOVA 0x10_0000 + x to GPA r * 0x1000 + x for one page; odd
    /// requesters bypass translation.
    #[derive(Debug)]
    struct PerRequester(RequesterId);

    impl TranslationSource for PerRequester {
        fn lookup(&self, iova: u64, _access: Permissions) -> Option<Mapping> {
            (0x10_0000..0x10_1000).contains(&iova).then(|| Mapping {
                iova: 0x10_0000,
                target: u64::from(self.0) * 0x1000,
                length: 0x1000,
                permissions: Permissions::ReadWrite,
            })
        }
    }

    struct Provider;

    impl DomainProvider for Provider {
        fn domain(&self, requester: RequesterId) -> Option<Box<dyn TranslationSource>> {
            requester
                .is_multiple_of(2)
                .then(|| Box::new(PerRequester(requester)) as _)
        }
    }

    #[test]
    fn identity_spaces_see_guest_physical_memory_for_every_requester() {
        let mem = ram();
        mem.write_obj(0xabcd_u32, GuestAddress(0x3000)).unwrap();
        let spaces = DmaSpaces::identity(mem);

        for requester in [0x08, 0x10] {
            let space = spaces.space(requester);
            assert!(!space.get_iommu_enabled());
            assert_eq!(space.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0xabcd);
        }
        assert_eq!(spaces.requesters(), vec![0x08, 0x10]);
    }

    #[test]
    fn each_requester_gets_its_own_domain_and_fault_log() {
        let mem = ram();
        mem.write_obj(0x1111_u32, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x2222_u32, GuestAddress(0x4000)).unwrap();
        let spaces = DmaSpaces::with_iommu(mem, Arc::new(Provider));

        let two = spaces.space(2);
        let four = spaces.space(4);
        let odd = spaces.space(3);

        assert_eq!(
            two.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
            0x1111
        );
        assert_eq!(
            four.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
            0x2222
        );
        assert!(
            two.read_obj::<u32>(GuestAddress(0x2000)).is_err(),
            "GPA is no IOVA"
        );
        assert_eq!(spaces.translator(2).unwrap().faults().len(), 1);
        assert!(
            spaces.translator(4).unwrap().faults().is_empty(),
            "separate logs"
        );
        assert!(!odd.get_iommu_enabled(), "bypassing requester");
        assert_eq!(odd.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0x1111);
    }

    #[test]
    fn a_requester_keeps_one_space() {
        let spaces = DmaSpaces::with_iommu(ram(), Arc::new(Provider));

        let first = spaces.space(2);
        let _ = first.read_obj::<u32>(GuestAddress(0));
        let again = spaces.space(2);

        assert!(Arc::ptr_eq(first.iommu(), again.iommu()));
        assert_eq!(again.iommu().faults().len(), 1, "the same fault log");
        assert!(spaces.translator(9).is_none());
    }
}
