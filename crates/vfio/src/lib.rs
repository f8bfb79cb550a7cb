//! VFIO device assignment for sluice: what is particular to handing a host PCI function to a
//! guest, below the VMM's wiring (crates/vmm/src/vfio.rs puts it on the PCI root).
//!
//! * [`host`]: the checks before anything is opened — the function's IOMMU group (every member
//!   bound to vfio-pci and given to this VM, bridges excepted as the kernel does), interrupt
//!   remapping, and the pinned-memory limits (RLIMIT_MEMLOCK, memory cgroup) for `dma=all`.
//! * [`policy`]: config-space virtualization by a declarative trap policy (which registers pass
//!   through, which are emulated, which are hidden; vendor quirks as data) over a
//!   [`policy::DeviceConfig`], so it is tested without VFIO.
//! * [`device`]: the VFIO side, on vfio-ioctls (container/group/device, regions, MSI-X
//!   eventfds) with the few ioctls it lacks written by hand (device flags, a reset whose failure
//!   is seen) and the region mmaps.
//!
//! Only the legacy container/group API (VFIO_TYPE1v2_IOMMU) is used. iommufd (/dev/iommu with
//! the vfio cdev) is not: vfio-ioctls has it behind its `vfio_cdev` feature, which pulls
//! iommufd-ioctls, and the lab's L1 kernel (6.1) is served by type1 anyway.

pub mod device;
pub mod fuzz;
pub mod host;
pub mod policy;

pub use device::{AssignedFunction, OpenError, RegionMmap, VfioConfig};
pub use host::{
    check_group, check_interrupt_remapping, check_pin_limits, current_pin_limits,
    interrupt_remapping, GroupError, HostBdf, InterruptRemapping, PinLimits,
};
pub use policy::{Access, DeviceConfig, MsixLayout, PolicyError, Rule, VirtualConfig};
pub use vfio_ioctls::VfioDeviceFd;

#[cfg(test)]
mod tests;
