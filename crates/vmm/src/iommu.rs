//! Wiring of `--iommu vtd`: the VM's [`DmaSpaces`] get an emulated VT-d ([`sluice_iommu::Vtd`])
//! as their domain provider, its register page goes on the MMIO bus at `layout::VTD_START`,
//! its fault events go out through KVM_SIGNAL_MSI, and the ACPI tables gain a DMAR naming it.
//! Without `--iommu` the spaces are identity views and nothing else changes.
//!
//! Every device gets its `DmaSpace` from these spaces by its BDF (virtio.rs, e1000.rs), so all
//! of them sit behind the unit; virtio devices then offer VIRTIO_F_ACCESS_PLATFORM. A
//! vhost-user disk too: its rings are run by another process, which translates IOVAs through a
//! device IOTLB sluice fills from the disk's space on each MISS and empties on the unit's
//! invalidations (`sluice_devices::vhost_user_blk::iotlb`, registered with `Vtd::watch` in
//! virtio.rs). Behind `--iommu virtio` a vhost-user disk is refused: the virtio-iommu has no
//! such hook.
//!
//! `--iommu virtio` wires a virtio-iommu ([`sluice_iommu::VirtioIommu`]) the same way: it is
//! the spaces' domain provider, and it is itself a virtio-pci device, put on the PCI root before
//! any other device ([`VmIommu::attach_virtio_iommu`]) with an identity DMA space of its own (it
//! is not behind itself; its rings hold guest physical addresses, so it offers no
//! ACCESS_PLATFORM). Once every device is on the bus, [`VmIommu::finish`] names the other PCI
//! functions as its endpoints (endpoint id = requester id) and builds the VIOT
//! (`acpi/viot.rs`): the IOMMU's BDF and one PCI range from the first endpoint to the last.
//!
//! Interrupt remapping is on by default (`--iommu vtd`; `--iommu vtd,intremap=off` leaves
//! ECAP.IR clear): the DMAR then sets INTR_REMAP and scopes the IOAPIC, each device's MSI goes
//! through the unit (`VmInterrupts::msi_for`), and the MADT names the remapping IOAPIC front
//! (crate::intremap says why it is a front of the in-kernel IOAPIC and not a split irqchip).

use std::sync::{Arc, Mutex};

use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use kvm_ioctls::VmFd;
use sluice_dma::DmaSpaces;
use sluice_iommu::virtio::Limits;
use sluice_iommu::{VirtioIommu, Vtd};
use sluice_pci::{PciRoot, SharedPciDevice};
use sluice_virtio::{DeviceMetrics, VirtioPciDevice, VirtioPciOptions};

use crate::interrupts::{KvmMsi, VmInterrupts};
use crate::layout;
use crate::machine::{device_err, VmError};
use crate::memory::GuestRam;
use crate::vcpu::ExitDispatch;

/// Which virtual IOMMU the guest gets (`--iommu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuKind {
    /// An emulated Intel VT-d with a DMAR table; interrupt remapping unless `intremap=off`.
    Vtd { interrupt_remapping: bool },
    /// A virtio-iommu (virtio-pci) with a VIOT table.
    Virtio,
}

impl IommuKind {
    /// `vtd` or `vtd,intremap=on|off`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "virtio" {
            return Ok(Self::Virtio);
        }
        let mut parts = s.split(',');
        if parts.next() != Some("vtd") {
            return Err(format!(
                "--iommu {s}: unknown IOMMU (sluice has vtd and virtio)"
            ));
        }
        let mut interrupt_remapping = true;
        for option in parts {
            interrupt_remapping = match option {
                "intremap=on" => true,
                "intremap=off" => false,
                _ => {
                    return Err(format!(
                        "--iommu {s}: unknown option {option} (intremap=on|off)"
                    ))
                }
            };
        }
        Ok(Self::Vtd {
            interrupt_remapping,
        })
    }
}

/// The VM's DMA spaces and, with `--iommu`, the unit behind them.
pub struct VmIommu {
    /// Every device's DMA space, by requester id.
    pub dma: Arc<DmaSpaces>,
    vtd: Option<(Vtd, Sdt)>,
    /// `--iommu virtio`: the device, its BDF once on the bus, and the VIOT once finished.
    virtio: Option<VirtioIommuWiring>,
}

struct VirtioIommuWiring {
    device: VirtioIommu,
    bdf: Option<u16>,
    viot: Option<Sdt>,
}

impl VmIommu {
    /// ACPI tables the IOMMU adds (the DMAR, or the VIOT).
    pub fn acpi_tables(&self) -> Vec<&dyn Aml> {
        let viot = self.virtio.iter().filter_map(|v| v.viot.as_ref());
        self.vtd
            .iter()
            .map(|(_, dmar)| dmar)
            .chain(viot)
            .map(|table| table as &dyn Aml)
            .collect()
    }

    /// The emulated VT-d, if there is one (assigned functions follow its tables).
    pub fn vtd(&self) -> Option<&Vtd> {
        self.vtd.as_ref().map(|(vtd, _)| vtd)
    }

    /// The unit that remaps interrupts, if interrupt remapping is offered.
    pub fn interrupt_remapper(&self) -> Option<Vtd> {
        self.vtd
            .as_ref()
            .map(|(vtd, _)| vtd.clone())
            .filter(Vtd::offers_interrupt_remapping)
    }

    /// The IOAPIC address the MADT gives the guest: the remapping front with interrupt
    /// remapping, KVM's in-kernel IOAPIC otherwise.
    pub fn ioapic_address(&self) -> u32 {
        if self.interrupt_remapper().is_some() {
            layout::REMAPPING_IOAPIC_START as u32
        } else {
            crate::acpi::DEFAULT_IOAPIC_ADDRESS
        }
    }

    /// The unit's counters (walks, faults, invalidations), if there is one. (The virtio-iommu's
    /// come with the device from [`VmIommu::attach_virtio_iommu`].)
    pub fn metrics(&self) -> Option<Arc<DeviceMetrics>> {
        self.vtd.as_ref().map(|(vtd, _)| vtd.metrics())
    }

    /// With `--iommu virtio`: puts the virtio-iommu on `root` (call before any other device, so
    /// the endpoints' BDFs follow it) with an identity DMA space; returns its metrics.
    pub fn attach_virtio_iommu(
        &mut self,
        root: &PciRoot,
        ram: &GuestRam,
        interrupts: &VmInterrupts,
    ) -> Result<Option<Arc<DeviceMetrics>>, VmError> {
        let Some(wiring) = self.virtio.as_mut() else {
            return Ok(None);
        };
        let mut options = VirtioPciOptions::new(interrupts.msi_sink.clone());
        options.name = Some("virtio-iommu".into());
        options.msi_router = Some(interrupts.msi_router.clone());
        options.ioevents = Some(interrupts.ioevents.clone());
        let device = Box::new(wiring.device.clone());
        let metrics = sluice_virtio::VirtioDevice::metrics(&*device);
        let space = sluice_dma::identity(ram.memory.clone());
        let address = root
            .add_device_with(|_| {
                let pci = VirtioPciDevice::new(device, space, options)?;
                Ok::<SharedPciDevice, sluice_virtio::VirtioPciError>(Arc::new(Mutex::new(pci)))
            })
            .map_err(|e| device_err("virtio-iommu", e))?;
        tracing::info!("virtio-iommu at PCI {address}");
        wiring.bdf = Some(address.bdf());
        Ok(Some(metrics))
    }

    /// With `--iommu virtio`, after every device is on `root`: the other functions (the host
    /// bridge aside) become the IOMMU's endpoints and the VIOT names them.
    pub fn finish(&mut self, root: &PciRoot) {
        let Some(wiring) = self.virtio.as_mut() else {
            return;
        };
        let Some(iommu_bdf) = wiring.bdf else {
            return;
        };
        let endpoints: Vec<u16> = root
            .devices()
            .iter()
            .map(|address| address.bdf())
            .filter(|&bdf| bdf != 0 && bdf != iommu_bdf)
            .collect();
        wiring.device.set_endpoints(endpoints.iter().copied());
        let range = endpoints
            .iter()
            .min()
            .zip(endpoints.iter().max())
            .map(|(&first, &last)| (first, last));
        tracing::info!("virtio-iommu endpoints: {endpoints:04x?}");
        wiring.viot = Some(crate::acpi::build_viot(iommu_bdf, range));
    }
}

/// The host address width the DMAR states: enough bits for every RAM address (DMA can only
/// target RAM), and never below the 39 bits of the smallest table format.
pub fn host_address_width(ram_size: u64) -> u8 {
    let top = layout::ram_top(ram_size).max(1);
    let bits = u64::BITS - (top - 1).leading_zeros();
    bits.max(39) as u8
}

/// Creates the VM's DMA spaces, with the IOMMU `kind` (if any) as their provider.
pub fn attach_iommu(
    vm: &Arc<VmFd>,
    dispatch: &ExitDispatch,
    kind: Option<IommuKind>,
    ram: &GuestRam,
    ram_size: u64,
) -> Result<VmIommu, VmError> {
    if kind == Some(IommuKind::Virtio) {
        let device = VirtioIommu::new(Limits::default(), false);
        let dma = Arc::new(DmaSpaces::with_iommu(
            ram.memory.clone(),
            Arc::new(device.clone()),
        ));
        device.attach_spaces(&dma);
        return Ok(VmIommu {
            dma,
            vtd: None,
            virtio: Some(VirtioIommuWiring {
                device,
                bdf: None,
                viot: None,
            }),
        });
    }
    let Some(IommuKind::Vtd {
        interrupt_remapping,
    }) = kind
    else {
        return Ok(VmIommu {
            dma: Arc::new(DmaSpaces::identity(ram.memory.clone())),
            vtd: None,
            virtio: None,
        });
    };
    let haw = host_address_width(ram_size);
    // The unit's own fault and completion events are never remapped: straight to KVM.
    let events = Arc::new(KvmMsi::new(vm.clone()));
    let vtd = if interrupt_remapping {
        Vtd::with_interrupt_remapping(ram.memory.clone(), u32::from(haw), events)
    } else {
        Vtd::new(ram.memory.clone(), u32::from(haw), events)
    };
    let dma = Arc::new(DmaSpaces::with_iommu(
        ram.memory.clone(),
        Arc::new(vtd.clone()),
    ));
    vtd.attach_spaces(&dma);
    dispatch
        .mmio
        .insert(
            "vt-d",
            Arc::new(Mutex::new(vtd.clone())),
            layout::VTD_START,
            layout::VTD_SIZE,
        )
        .map_err(|e| device_err("vt-d", e))?;
    tracing::info!("vt-d at {:#x}, host address width {haw}", layout::VTD_START);
    if interrupt_remapping {
        let ioapic = crate::intremap::RemappingIoapic::new(vm.clone(), vtd.clone());
        dispatch
            .mmio
            .insert(
                "ioapic-remap",
                Arc::new(Mutex::new(ioapic)),
                layout::REMAPPING_IOAPIC_START,
                layout::REMAPPING_IOAPIC_SIZE,
            )
            .map_err(|e| device_err("ioapic-remap", e))?;
        tracing::info!(
            "vt-d interrupt remapping on; IOAPIC front at {:#x}",
            layout::REMAPPING_IOAPIC_START
        );
    }
    let scope = interrupt_remapping.then_some((layout::IOAPIC_ID, layout::IOAPIC_REQUESTER_ID));
    let dmar = crate::acpi::build_dmar(haw, layout::VTD_START, scope);
    Ok(VmIommu {
        dma,
        vtd: Some((vtd, dmar)),
        virtio: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_address_width_covers_ram_and_is_at_least_39_bits() {
        assert_eq!(host_address_width(128 << 20), 39);
        assert_eq!(host_address_width(600 << 30), 40);
    }

    /// With remapping the MADT names the IOAPIC front, which answers on the MMIO bus (its
    /// version register); with `intremap=off` nothing of it exists and ECAP.IR is clear.
    #[test]
    fn interrupt_remapping_adds_the_ioapic_front_and_intremap_off_leaves_it_out() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            println!("SKIP iommu wiring test: /dev/kvm unusable");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let ram = GuestRam::new(64 << 20).unwrap();
        let attach = |interrupt_remapping| {
            let dispatch = ExitDispatch {
                pio: Arc::new(sluice_bus::Bus::new()),
                mmio: Arc::new(sluice_bus::Bus::new()),
                control: Arc::default(),
                stats: Arc::default(),
                hook: None,
            };
            let kind = IommuKind::Vtd {
                interrupt_remapping,
            };
            let iommu = attach_iommu(&vm, &dispatch, Some(kind), &ram, 64 << 20).unwrap();
            (iommu, dispatch)
        };
        let ecap_ir = |dispatch: &ExitDispatch| {
            let mut ecap = [0u8; 8];
            dispatch.mmio.read(layout::VTD_START + 0x10, &mut ecap);
            u64::from_le_bytes(ecap) & sluice_iommu::intremap::ECAP_IR != 0
        };

        let (on, on_bus) = attach(true);
        let (off, off_bus) = attach(false);

        assert_eq!(on.ioapic_address(), layout::REMAPPING_IOAPIC_START as u32);
        assert!(on.interrupt_remapper().is_some() && ecap_ir(&on_bus));
        let select = 1u32.to_le_bytes();
        let mut version = [0u8; 4];
        on_bus.mmio.write(layout::REMAPPING_IOAPIC_START, &select);
        on_bus
            .mmio
            .read(layout::REMAPPING_IOAPIC_START + 0x10, &mut version);
        assert_eq!(
            u32::from_le_bytes(version),
            0x0017_0011,
            "24 pins, version 0x11"
        );
        assert_eq!(off.ioapic_address(), layout::IOAPIC_START as u32);
        assert!(off.interrupt_remapper().is_none() && !ecap_ir(&off_bus));
        assert!(!off_bus
            .mmio
            .read(layout::REMAPPING_IOAPIC_START + 0x10, &mut version));
    }

    #[test]
    fn vtd_with_interrupt_remapping_on_by_default_and_virtio_are_known() {
        let vtd = |interrupt_remapping| IommuKind::Vtd {
            interrupt_remapping,
        };
        assert_eq!(IommuKind::parse("vtd"), Ok(vtd(true)));
        assert_eq!(IommuKind::parse("vtd,intremap=off"), Ok(vtd(false)));
        assert_eq!(IommuKind::parse("vtd,intremap=on"), Ok(vtd(true)));
        assert!(IommuKind::parse("vtd,intremap=maybe").is_err());
        assert_eq!(IommuKind::parse("virtio"), Ok(IommuKind::Virtio));
        assert!(IommuKind::parse("amd").is_err());
    }
}
