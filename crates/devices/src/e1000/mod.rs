//! An emulated Intel 82540EM Gigabit Ethernet controller (the "e1000" every OS has a driver
//! for) on a tap device — the fully emulated end of sluice's NIC spectrum, next to virtio-net.
//!
//! Register-level emulation written by hand: no rust-vmm crate models an e1000, and the parts
//! are small. Facts come from Intel's 8254x developer's manual and from what Linux's `e1000`
//! driver does with the device (it bit-bangs the EEPROM through EECD, resets through the I/O
//! BAR, and uses checksum and segmentation offloads without asking).
//!
//! * [`regs`]: offsets and bits.
//! * [`eeprom`]: the 64-word EEPROM (MAC, ids, checksum 0xBABA), EERD and Microwire.
//! * [`phy`]: the M88E1011 PHY behind MDIC (link up, autonegotiation complete).
//! * [`tx`]: legacy / context / data descriptors and offloads → the tap's vnet header.
//! * [`core`]: the register file, ICR/IMS interrupt logic on INTx, transmit and receive
//!   rings, address filters (RAL/RAH, MTA, UPE/MPE/BAM), clear-on-read statistics.
//! * [`device`]: the PCI function (BAR0 registers, BAR1 IOADDR/IODATA, INTA) and the receive
//!   worker; its module doc says which thread does what and why.
//! * [`fuzz`]: bodies of the `e1000_tx` and `e1000_registers` fuzz targets.
//!
//! Every guest value is validated: ring lengths (multiples of 128 bytes, at most 64 Ki
//! descriptors), head and tail inside the ring (otherwise the ring is idle), buffer addresses
//! (a buffer outside guest memory drops its frame), frame sizes (64 KiB + headers on transmit,
//! 1522 or 16 KiB with LPE on receive). A transmit kick looks at each descriptor at most once.
//! Not modelled: flow control frames, VLAN filtering (VFTA), wake-on-LAN, the delay timers and
//! ITR (interrupts are raised per batch; see [`core`]), receive checksum offload (IXSM is set in
//! every receive descriptor, telling the driver to check checksums itself), EEPROM writes.

pub mod core;
pub mod device;
pub mod eeprom;
pub mod fuzz;
pub mod phy;
pub mod regs;
pub mod tx;

#[cfg(test)]
mod tests;

pub use self::core::{E1000Core, Rx};
pub use device::{DEVICE_ID, E1000, VENDOR_ID};
