//! Interrupt traits: how a device model signals the guest without knowing about KVM.

use std::io;

/// An MSI message as programmed by the guest (address/data pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Delivers MSI messages to the guest (KVM_SIGNAL_MSI, or a routed irqfd).
pub trait MsiSink: Send + Sync {
    fn send(&self, msg: MsiMessage) -> io::Result<()>;
}

/// An edge-triggered interrupt line (an IOAPIC/PIC pin), e.g. a UART's IRQ 4.
pub trait IrqLine: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// One MSI vector routed to the guest without a userspace exit per interrupt (a KVM GSI route
/// plus an irqfd). The transport reprograms it when the guest rewrites the MSI-X entry.
pub trait MsiRoute: Send + Sync {
    /// Points the route at `msg` (what the guest programmed in the MSI-X table).
    fn update(&self, msg: MsiMessage) -> io::Result<()>;
    /// Injects the interrupt (one eventfd write when backed by an irqfd).
    fn trigger(&self) -> io::Result<()>;
    /// The eventfd behind the route's irqfd, for a producer outside sluice (VFIO's
    /// VFIO_DEVICE_SET_IRQS) to signal the guest with no userspace hop. `None` when the route
    /// is not an eventfd.
    fn trigger_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

/// Hands out [`MsiRoute`]s (the VMM owns the GSI routing table).
pub trait MsiRouter: Send + Sync {
    fn allocate(&self) -> io::Result<std::sync::Arc<dyn MsiRoute>>;
}

/// A level-triggered interrupt source (a PCI INTx pin's wire into an IOAPIC pin). The line
/// stays asserted until deasserted; an implementation re-asserts it after the guest's EOI while
/// the level is still high (KVM: an irqfd with a resample fd).
pub trait LevelIrqLine: Send + Sync {
    /// Drives the line high (`true`) or low.
    fn set_level(&self, asserted: bool) -> io::Result<()>;
}

/// Connects level-triggered sources to GSIs (the VMM owns the interrupt controller). Several
/// sources may share a GSI: the line is high while any of them is.
pub trait LevelIrqRouter: Send + Sync {
    fn connect(&self, gsi: u32) -> io::Result<std::sync::Arc<dyn LevelIrqLine>>;
}
