//! The [`PciDevice`] trait every PCI function model implements (virtio-pci, NVMe, e1000, VFIO,
//! the test device), and [`PciAddress`] (bus/device/function).

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::config::ConfigSpace;
use crate::intx::PciIntx;
use crate::PciError;

/// Devices per bus and functions per device.
pub(crate) const DEVICES_PER_BUS: u8 = 32;
pub(crate) const FUNCTIONS_PER_DEVICE: u8 = 8;

/// A function's location on segment 0.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, PciError> {
        if device >= DEVICES_PER_BUS || function >= FUNCTIONS_PER_DEVICE {
            return Err(PciError::InvalidAddress {
                bus,
                device,
                function,
            });
        }
        Ok(Self {
            bus,
            device,
            function,
        })
    }

    /// Requester id / BDF as a 16-bit value (bus << 8 | device << 3 | function).
    pub fn bdf(&self) -> u16 {
        (u16::from(self.bus) << 8) | (u16::from(self.device) << 3) | u16::from(self.function)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// A PCI function model.
///
/// BARs are declared in the device's [`ConfigSpace`] with [`ConfigSpace::add_bar`] before the
/// device is added to a [`crate::PciRoot`]; the root assigns their addresses and maps them, then
/// forwards guest accesses to [`PciDevice::bar_read`] / [`PciDevice::bar_write`] with the BAR index
/// and the offset inside the BAR. The root reads BAR addresses and the command register from
/// [`PciDevice::config`], so a device that overrides the config accessors must keep those emulated
/// there.
///
/// Implementations must not call back into the [`crate::PciRoot`] from any of these methods.
pub trait PciDevice: Send {
    /// Short name used for exit counters and logs (e.g. "virtio-blk").
    fn name(&self) -> &str;

    fn config(&self) -> &ConfigSpace;

    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// Guest config read of `data.len()` (1..=8) bytes at `offset` (< 4096).
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    /// Guest config write. Override to react to capability registers (e.g. MSI-X enable), calling
    /// [`ConfigSpace::write`] for the masked update.
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }

    /// Guest read of `data.len()` (1..=8) bytes at `offset` inside BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// Guest write of `data.len()` (1..=8) bytes at `offset` inside BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// BAR `bar` now decodes at `new` instead of `old` (`None`: not mapped). Devices with
    /// ioeventfds or mmapped regions re-register them here.
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}

    /// The function's INTx pin, if it has one (declared in config space with
    /// [`PciIntx::install`]). The root connects it to the pin's GSI when the device is added.
    fn intx(&self) -> Option<Arc<PciIntx>> {
        None
    }

    /// Everything the guest changed in the function, for a snapshot (the VM is paused);
    /// `None` when the device cannot save its state (the snapshot is then refused).
    fn save_state(&mut self) -> Option<Result<serde_json::Value, String>> {
        None
    }

    /// Puts back what [`PciDevice::save_state`] returned, on a function built the same way.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Err(format!("{} cannot restore a saved state", self.name()))
    }

    /// The VM runs on after [`PciDevice::save_state`] (a snapshot of a VM that is resumed, a
    /// migration that failed) or after [`PciDevice::restore_state`] (its vCPUs started): a
    /// device that stopped its work to save takes it up again, a restored one may interrupt.
    /// Default: nothing to do.
    fn resume_after_save(&mut self) {}
}

/// How devices are shared between the root, the bus adapters and the VMM.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_validates_and_formats() {
        let address = PciAddress::new(0, 0x1f, 7).unwrap();

        assert_eq!(address.to_string(), "00:1f.7");
        assert_eq!(address.bdf(), 0xff);
        assert!(PciAddress::new(0, 32, 0).is_err());
        assert!(PciAddress::new(0, 0, 8).is_err());
    }
}
