//! virtio-iommu requests (ATTACH, DETACH, MAP, UNMAP, PROBE) with DMA by the endpoints after
//! each; the body and what it checks: `sluice_iommu::fuzz::virtio_iommu_request`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_iommu::fuzz::virtio_iommu_request(data));
