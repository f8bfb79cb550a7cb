//! KVM implementations of the device interrupt traits in `sluice_bus::irq`.

use std::io;
use std::sync::Arc;

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use sluice_bus::irq::{IrqLine, MsiMessage, MsiSink};
use vmm_sys_util::eventfd::EventFd;

/// An IOAPIC/PIC pin driven through an irqfd: a trigger is one eventfd write, no ioctl.
pub struct IrqfdLine {
    event: EventFd,
}

impl IrqfdLine {
    pub fn new(vm: &VmFd, gsi: u32) -> io::Result<Self> {
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&event, gsi).map_err(io::Error::from)?;
        Ok(Self { event })
    }
}

impl IrqLine for IrqfdLine {
    fn trigger(&self) -> io::Result<()> {
        self.event.write(1)
    }
}

/// MSI delivery with KVM_SIGNAL_MSI.
pub struct KvmMsi {
    vm: Arc<VmFd>,
}

impl KvmMsi {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl MsiSink for KvmMsi {
    fn send(&self, msg: MsiMessage) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            // 0 means the guest blocked it (e.g. LAPIC disabled): not an error of ours.
            Ok(_) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}
