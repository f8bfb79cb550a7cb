//! A virtio-iommu (virtio 1.2 §5.13, device type 23), `--iommu virtio`: a paravirtual IOMMU
//! whose driver sends ATTACH / DETACH / MAP / UNMAP / PROBE requests on a virtqueue instead of
//! writing page tables.
//!
//! * [`request`]: the request layout and its parser (lengths, types, reserved fields; UNSUPP
//!   for unknown types, INVAL for short or malformed ones; fuzzed as `virtio_iommu_request`).
//! * [`domains`]: domains with their mapping trees (an interval map: non-overlapping
//!   `start..=end → phys` with READ/WRITE flags), endpoints (PCI requester ids) and which
//!   domain each is attached to; the spec's status codes (RANGE for a misaligned map or an
//!   unmap that would split a mapping, INVAL for overlaps, NOENT for unknown domains or
//!   endpoints, NOMEM past the per-VM caps on domains and mappings).
//! * [`device`]: [`VirtioIommu`], a [`sluice_virtio::VirtioDevice`] (config: page_size_mask
//!   with the 4 KiB granule, input_range 0..2^48, domain_range 0..=0xffff, probe_size 512,
//!   bypass; features INPUT_RANGE, DOMAIN_RANGE, MAP_UNMAP, PROBE, BYPASS_CONFIG) and the
//!   [`sluice_dma::DomainProvider`] of the VM's `DmaSpaces`, like the VT-d: each endpoint's
//!   `DmaSpace` asks it on an IOTLB miss, and ATTACH / DETACH / UNMAP drop the affected IOTLB
//!   entries before the request completes. PROBE reports the x86 MSI window
//!   0xfee00000..=0xfeefffff as a RESV_MEM MSI region. An endpoint attached to no domain faults
//!   unless `bypass` is set (off at reset). Not built: VIRTIO_IOMMU_F_MMIO, and fault reports
//!   on the event queue (the device never takes the driver's event buffers; faults are counted
//!   in the metrics and kept in each `DmaSpace`'s fault log).
//!
//! Why here, in sluice-iommu, and not in sluice-devices: it is the VM's IOMMU, the domain
//! provider of `DmaSpaces` next to the VT-d, and the vmm wires either through the same
//! `DmaSpaces::with_iommu`; it needs nothing from sluice-devices, whose models are endpoints
//! *behind* it. Written by hand: no rust-vmm crate models a virtio-iommu device (cloud-hypervisor's
//! lives inside its VMM).

pub mod device;
pub mod domains;
pub mod fuzz;
pub mod request;

#[cfg(test)]
mod tests;

pub use device::{VirtioIommu, COUNTER_NAMES as VIRTIO_IOMMU_COUNTERS, DEVICE_TYPE_IOMMU};
pub use domains::Limits;
