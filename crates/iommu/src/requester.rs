//! One requester's view of an IOMMU: what each device's `DmaSpace` asks on an IOTLB miss. The
//! VT-d and the virtio-iommu hand out the same view, differing only in how they translate.

use sluice_dma::{Mapping, RequesterId, TranslationSource};
use vm_memory::Permissions;

/// An IOMMU that translates per requester id.
pub(crate) trait TranslatingUnit: Clone + Send + Sync + 'static {
    /// How the unit names itself in debug output.
    const KIND: &'static str;

    /// `requester`'s translation of `iova` for `access`, or `None` (the unit records a fault).
    fn translate_for(
        &self,
        requester: RequesterId,
        iova: u64,
        access: Permissions,
    ) -> Option<Mapping>;
}

/// `unit` as seen by one requester.
struct RequesterView<U> {
    unit: U,
    requester: RequesterId,
}

impl<U: TranslatingUnit> std::fmt::Debug for RequesterView<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} view of {:#06x}", U::KIND, self.requester)
    }
}

impl<U: TranslatingUnit> TranslationSource for RequesterView<U> {
    fn lookup(&self, iova: u64, access: Permissions) -> Option<Mapping> {
        self.unit.translate_for(self.requester, iova, access)
    }
}

/// `unit`'s domain for `requester`: the body of each unit's `DomainProvider::domain`.
pub(crate) fn requester_view<U: TranslatingUnit>(
    unit: &U,
    requester: RequesterId,
) -> Option<Box<dyn TranslationSource>> {
    Some(Box::new(RequesterView {
        unit: unit.clone(),
        requester,
    }))
}
