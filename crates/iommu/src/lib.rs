//! The VM's IOMMUs: an emulated Intel VT-d (DMA remapping), `--iommu vtd`, and a virtio-iommu
//! ([`virtio`]), `--iommu virtio`.
//!
//! [`Vtd`] is a remapping unit with legacy root/context tables and second-level page tables
//! (3 and 4 levels, 2 MiB and 1 GiB pages), pass-through contexts, register-based and queued
//! invalidation, and primary fault logging with a fault event MSI. It is the
//! [`sluice_dma::DomainProvider`] of a VM's `DmaSpaces`: every device's `DmaSpace` asks it for a
//! translation on an IOTLB miss, and its invalidations drop those IOTLBs and are announced to
//! the requester's [`watch::MappingObserver`]s (an assigned function's shadow mappings). Built
//! with [`Vtd::with_interrupt_remapping`] it also remaps interrupts ([`intremap`], ECAP.IR, xAPIC
//! destinations): the VMM translates each device's MSI messages and the IOAPIC's redirection
//! entries through it before KVM sees them.
//!
//! Written by hand: no rust-vmm crate models VT-d; the register layout and table formats follow
//! the Intel VT-d specification (rev. 4.x), legacy mode only.

pub mod intremap;
pub mod queue;
pub mod regs;
mod requester;
pub mod tables;
pub mod virtio;
mod vtd;
pub mod watch;

pub mod fuzz;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_intremap;

pub use virtio::VirtioIommu;
pub use vtd::{Vtd, COUNTER_NAMES};
pub use watch::{IovaRange, MappingObserver, MappingRun, MappingView, WalkError};
