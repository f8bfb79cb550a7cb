//! PCI for sluice: the config space model, BARs and their allocation, MSI-X, the root complex
//! (segment 0, bus 0, host bridge at 00:00.0) and the two ways the guest reaches config space
//! (port I/O at 0xcf8..0xd00 and ECAM over MMIO).
//!
//! Written by hand: rust-vmm has no maintained PCI crate (`vm-device` is dormant and has no PCI
//! model), and the VMMs that have one (Cloud Hypervisor, crosvm, Firecracker) do not publish it as
//! a reusable crate. The pieces here are small and every guest-facing path is validated.
//!
//! How the parts fit:
//! * A device model owns a [`ConfigSpace`] (declaring its BARs with [`ConfigSpace::add_bar`] and
//!   capabilities with [`ConfigSpace::add_capability`]) and implements [`PciDevice`].
//! * [`PciRoot::add_device`] gives it a slot, assigns BAR addresses with a [`BarAllocator`] and maps
//!   each BAR on the MMIO or PIO [`sluice_bus::Bus`]; guest BAR rewrites and decode toggles move
//!   those mappings.
//! * [`PciConfigIo`] and [`PciConfigMmio`] are the [`sluice_bus::BusDevice`]s to put on the PIO bus
//!   at 0xcf8 and on the MMIO bus at the ECAM base.
//! * [`MsixCapability`] and [`MsixTable`] give a device MSI-X, and [`MsixVectors`] routes its
//!   vectors through exitless irqfd routes; [`PciTestDevice`] exercises it.
//! * [`PciIntx`] is a level-triggered INTx pin with ISR-style causes; the root connects it to
//!   the GSI [`IntxRouting`] assigns (set with [`PciRoot::set_intx`]) and fills the interrupt
//!   line register.

mod access;
mod bar;
mod config;
mod device;
mod intx;
mod msix;
mod msix_routes;
mod root;
mod test_device;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub use access::{
    PciConfigIo, PciConfigMmio, CONFIG_ADDRESS_ENABLE, CONFIG_ADDRESS_PORT, CONFIG_PORT_LEN,
};
pub use bar::{AddressWindow, BarAllocator, BarKind, BarSpec, DEFAULT_IO_WINDOW};
pub use config::{
    ConfigSpace, PciIds, CAPABILITIES_POINTER, CLASS_CODE, COMMAND, COMMAND_BUS_MASTER,
    COMMAND_INTX_DISABLE, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, CONFIG_SPACE_SIZE,
    CONVENTIONAL_CONFIG_SIZE, DEVICE_ID, HEADER_TYPE, INTERRUPT_LINE, INTERRUPT_PIN, NUM_BARS,
    REVISION_ID, STATUS, STATUS_CAPABILITY_LIST, SUBSYSTEM_ID, SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
pub use device::{PciAddress, PciDevice, SharedPciDevice};
pub use intx::{InterruptPin, IntxRouting, PciIntx, INTERRUPT_LINE_UNKNOWN, STATUS_INTERRUPT};
pub use msix::{
    MsixCapability, MsixDelivery, MsixError, MsixTable, MsixTableState, MSIX_CAPABILITY_ID,
    MSIX_ENABLE, MSIX_FUNCTION_MASK, MSIX_MAX_VECTORS, MSIX_TABLE_ENTRY_SIZE,
};
pub use msix_routes::{MsixSignal, MsixVectors};
pub use root::{PciRoot, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};
pub use test_device::{PciTestDevice, TEST_DEVICE_DEVICE_ID, TEST_DEVICE_VENDOR_ID};

use sluice_bus::BusError;

/// Errors from building devices and the PCI topology (never from guest accesses, which are
/// validated and dropped instead).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("the saved config space belongs to another function (ids or length differ)")]
    RestoreMismatch,
    #[error("capability {id:#x} of {len} bytes does not fit in config space")]
    CapabilityOverflow { id: u16, len: usize },
    #[error("config space range {offset:#x}+{len} is out of bounds")]
    OutOfBounds { offset: usize, len: usize },
    #[error("BAR index {0} is out of range or already in use")]
    BarSlotUnavailable(usize),
    #[error("invalid BAR: {0}")]
    InvalidBar(&'static str),
    #[error("BAR {0} is not declared")]
    NoSuchBar(usize),
    #[error("address {address:#x} is not aligned to the BAR size {size:#x}")]
    MisalignedBarAddress { address: u64, size: u64 },
    #[error("invalid address window {start:#x}+{size:#x}")]
    InvalidWindow { start: u64, size: u64 },
    #[error("no room for a {size:#x}-byte {kind:?} BAR in its window")]
    WindowExhausted { kind: BarKind, size: u64 },
    #[error("invalid PCI address {bus:02x}:{device:02x}.{function}")]
    InvalidAddress { bus: u8, device: u8, function: u8 },
    #[error("no free device slot on bus 0")]
    NoFreeSlot,
    #[error("no removable function at {0}")]
    NoDevice(PciAddress),
    #[error("invalid MSI-X capability: {0}")]
    InvalidMsix(&'static str),
    #[error("invalid INTx routing: {gsis} GSIs from {first_gsi}")]
    InvalidIntxRouting { first_gsi: u32, gsis: u32 },
    #[error("the INTx pin is already connected")]
    IntxAlreadyConnected,
    #[error("connecting INTx to GSI {gsi}: {reason}")]
    IntxConnect { gsi: u32, reason: String },
    #[error("bus mapping failed: {0}")]
    Bus(#[from] BusError),
}

#[cfg(test)]
mod tests;
