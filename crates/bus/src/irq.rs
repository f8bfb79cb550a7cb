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
