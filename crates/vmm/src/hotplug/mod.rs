//! PCI hot-plug of a running VM: devices added and removed through the control API
//! (`vm.add-disk`, `vm.add-net`, `vm.remove-device`) while the guest runs.
//!
//! The mechanism is ACPI PCI hot-plug as Linux's `acpiphp` driver understands it, with no
//! PCIe hot-plug controller: every slot of bus 0 is a device object `Sxx_` under
//! `\_SB_.PCI0` with `_ADR`, `_SUN` and `_EJ0` (crate::acpi::hotplug), a small register block
//! says which slots changed ([`registers`]), and an ACPI Generic Event Device (ACPI0013) with
//! an edge interrupt runs the `_EVT` method that reads the block and sends `Notify (Sxx_, 1)`
//! (device check: acpiphp scans the slot) or `Notify (Sxx_, 3)` (eject request: acpiphp
//! removes the driver and calls `_EJ0`). A GED and not a GPE block in the FADT: the GED is one
//! interrupt line, where a GPE block would add status/enable registers to emulate and share
//! the SCI with the PM block. The AML is written with `acpi_tables::aml`; the registers and
//! the plumbing are sluice's own because no crate models a VMM's side of ACPI hot-plug.
//!
//! - **Plug**: the device is built as boot-time wiring builds it (crate::virtio: its BDF's
//!   `DmaSpace`, MSI-X routes and ioeventfds, workers at DRIVER_OK), put in the first free
//!   slot ([`PciRoot::add_device_with`]), its bit set in `PCIU`, the GED interrupt raised.
//! - **Unplug**: `vm.remove-device` sets the slot's `PCID` bit and raises the interrupt: the
//!   device stays until the guest agrees. The guest's `_EJ0` writes `PCEJ`; on that vCPU
//!   exit the function leaves the root ([`PciRoot::remove_device`]: config space gone, BARs
//!   unmapped, ioeventfds unregistered), then the device is dropped: its queue workers stop,
//!   MSI routes and irqfds go back to KVM, the image (and its lock) or the tap is closed.
//!   A guest that never ejects keeps the device (`vm.info` shows `eject-requested`).
//!
//! Only virtio devices (disk, net, rng) are plugged or removed; NVMe, e1000, VFIO and the
//! vIOMMU are listed with ids but refused. A VM whose devices changed since boot refuses
//! snapshot and migration by name (the destination is built from the boot configuration).

pub mod registers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use serde::Serialize;
use sluice_bus::irq::IrqLine;
use sluice_bus::BusDevice;
use sluice_dma::DmaSpaces;
use sluice_pci::{PciAddress, PciRoot};
use sluice_virtio::{DeviceMetrics, VirtioDevice};

use crate::config::{DiskSpec, NetSpec};
use crate::interrupts::VmInterrupts;
use crate::virtio::WiredDevice;
use registers::{HotplugCounters, HotplugRegisters};

/// Longest device id the API takes.
const MAX_ID_LEN: usize = 32;

/// Where a listed device is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    Present,
    /// The host asked the guest to eject it; it goes when the guest's `_EJ0` runs.
    EjectRequested,
}

/// One PCI function as `vm.info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    pub id: String,
    /// `virtio-blk`, `virtio-net`, `virtio-rng`, or the function's own name.
    pub kind: String,
    /// `00:03.0`.
    pub bdf: String,
    pub hotplugged: bool,
    pub state: DeviceState,
    /// The image or the tap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
}

/// Why a hot-plug request was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HotplugError {
    /// Bad options (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such device id (404).
    #[error("no device with id `{0}`")]
    NotFound(String),
    /// Not possible now or for this device (409): id taken, no free slot, not removable.
    #[error("{0}")]
    Conflict(String),
    /// The device could not be built (500): the image cannot be opened, the tap is missing.
    #[error("{0}")]
    Failed(String),
}

/// What a plugged device is built with: the VM's shared DMA spaces and interrupt plumbing.
pub(crate) struct Wiring {
    pub dma: Arc<DmaSpaces>,
    pub interrupts: VmInterrupts,
    /// The VM's scheduled disks: a plugged disk with a weight or limits joins them.
    pub qos: Arc<crate::qos::QosDisks>,
}

struct DeviceEntry {
    info: DeviceInfo,
    address: PciAddress,
    metrics: Option<Arc<DeviceMetrics>>,
    removable: bool,
}

/// The VM's hot-plug controller: the device list with ids, the register block, the GED line.
pub struct Hotplug {
    root: Arc<PciRoot>,
    registers: Mutex<HotplugRegisters>,
    irq: Arc<dyn IrqLine>,
    wiring: Wiring,
    devices: Mutex<Vec<DeviceEntry>>,
    /// The VM's device counters (`VmHandle::device_metrics`): plugged devices join, removed
    /// ones leave.
    metrics: Arc<Mutex<Vec<Arc<DeviceMetrics>>>>,
    /// A device was plugged, or its removal requested, since boot.
    changed: AtomicBool,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hotplug {
    /// The controller of a VM whose boot-time devices are on `root` (`wired`: the virtio ones,
    /// with ids; every other function is listed under its own name, not removable).
    pub(crate) fn new(
        root: Arc<PciRoot>,
        irq: Arc<dyn IrqLine>,
        wiring: Wiring,
        metrics: Arc<Mutex<Vec<Arc<DeviceMetrics>>>>,
        wired: &[WiredDevice],
    ) -> Arc<Self> {
        let mut registers = HotplugRegisters::default();
        let mut devices = Vec::new();
        for (address, name) in root.functions() {
            let virtio = wired.iter().find(|w| w.bdf == address.bdf());
            // Only what sluice can take away is ejectable: the guest's `_EJ0` on an NVMe,
            // e1000, VFIO or vIOMMU slot is ignored and counted.
            if virtio.is_some() {
                registers.present_at_boot(address.device);
            }
            let id = match virtio {
                Some(w) => w.id.clone(),
                None => unique_id(&devices, &name),
            };
            devices.push(DeviceEntry {
                info: DeviceInfo {
                    id,
                    kind: kind_of(&name),
                    bdf: address.to_string(),
                    hotplugged: false,
                    state: DeviceState::Present,
                    backing: None,
                },
                address,
                metrics: virtio.map(|w| w.metrics.clone()),
                removable: virtio.is_some(),
            });
        }
        Arc::new(Self {
            root,
            registers: Mutex::new(registers),
            irq,
            wiring,
            devices: Mutex::new(devices),
            metrics,
            changed: AtomicBool::new(false),
        })
    }

    /// The register block for the PIO bus (it holds the controller weakly: the bus outlives
    /// nothing it should not).
    pub(crate) fn port(self: &Arc<Self>) -> HotplugPort {
        HotplugPort(Arc::downgrade(self))
    }

    /// Every PCI function with its id.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        locked(&self.devices)
            .iter()
            .map(|d| d.info.clone())
            .collect()
    }

    pub fn counters(&self) -> HotplugCounters {
        locked(&self.registers).counters()
    }

    /// Whether the VM's devices differ from its boot configuration (snapshots refuse then).
    pub fn changed(&self) -> bool {
        self.changed.load(Ordering::Acquire)
    }

    /// Plugs an in-process virtio-blk disk on `spec`'s image.
    pub fn add_disk(
        &self,
        spec: &DiskSpec,
        id: Option<String>,
    ) -> Result<DeviceInfo, HotplugError> {
        if spec.vhost_user {
            return Err(HotplugError::Conflict(
                "hot-plugging a vhost-user disk is not supported (in-process disks are)".into(),
            ));
        }
        if spec.requests.is_some() {
            // The API would otherwise create files wherever sluice may write.
            return Err(HotplugError::BadRequest(
                "requests= (a request log) is for disks given at start, not hot-plugged ones"
                    .into(),
            ));
        }
        let id = self.claim_id(id, "disk")?;
        let (block, scheduled) = crate::virtio::in_process_disk(spec)
            .map_err(|e| HotplugError::Failed(format!("{}: {e}", spec.path.display())))?;
        let options = crate::virtio::transport_options(
            &self.wiring.interrupts,
            format!("virtio-blk-{id}"),
            spec.notify,
            spec.packed,
        );
        let backing = spec.path.display().to_string();
        let info = self.plug(id, "virtio-blk", backing, Box::new(block), options)?;
        if let Some(scheduled) = scheduled {
            self.wiring.qos.add(info.id.clone(), scheduled);
        }
        Ok(info)
    }

    /// Plugs a virtio-net device on `spec`'s tap.
    pub fn add_net(&self, spec: &NetSpec, id: Option<String>) -> Result<DeviceInfo, HotplugError> {
        let id = self.claim_id(id, "net")?;
        let net =
            crate::virtio::net_device(spec).map_err(|e| HotplugError::Failed(e.to_string()))?;
        let options = crate::virtio::transport_options(
            &self.wiring.interrupts,
            format!("virtio-net-{id}"),
            spec.notify,
            spec.packed,
        );
        self.plug(id, "virtio-net", spec.tap.clone(), Box::new(net), options)
    }

    /// A valid id not in use: the caller's, or `PREFIX<n>` with the lowest free n.
    fn claim_id(&self, id: Option<String>, prefix: &str) -> Result<String, HotplugError> {
        let devices = locked(&self.devices);
        let taken = |id: &str| devices.iter().any(|d| d.info.id == id);
        if self.root.functions().len() >= usize::from(*crate::acpi::hotplug::HOTPLUG_SLOTS.end()) {
            return Err(HotplugError::Conflict(
                "no free PCI slot on bus 0 (all 31 hold a device)".into(),
            ));
        }
        match id {
            Some(id) => {
                check_id(&id)?;
                if taken(&id) {
                    return Err(HotplugError::Conflict(format!("id `{id}` is in use")));
                }
                Ok(id)
            }
            None => Ok((0..)
                .map(|n| format!("{prefix}{n}"))
                .find(|id| !taken(id))
                .unwrap_or_default()),
        }
    }

    fn plug(
        &self,
        id: String,
        kind: &str,
        backing: String,
        device: Box<dyn VirtioDevice>,
        options: sluice_virtio::VirtioPciOptions,
    ) -> Result<DeviceInfo, HotplugError> {
        let (metrics, bdf) = crate::virtio::attach(
            &self.root,
            &self.wiring.dma,
            &self.wiring.interrupts,
            None,
            device,
            options,
        )
        .map_err(|e| match e.to_string() {
            why if why.contains("no free device slot") => HotplugError::Conflict(why),
            why => HotplugError::Failed(why),
        })?;
        let address = PciAddress::new(0, (bdf >> 3) as u8 & 0x1f, 0)
            .map_err(|e| HotplugError::Failed(e.to_string()))?;
        let info = DeviceInfo {
            id,
            kind: kind.into(),
            bdf: address.to_string(),
            hotplugged: true,
            state: DeviceState::Present,
            backing: Some(backing),
        };
        locked(&self.metrics).push(metrics.clone());
        locked(&self.devices).push(DeviceEntry {
            info: info.clone(),
            address,
            metrics: Some(metrics),
            removable: true,
        });
        self.changed.store(true, Ordering::Release);
        locked(&self.registers).inserted(address.device);
        self.notify_guest();
        tracing::info!("hotplug: {} ({kind}) plugged at {}", info.id, info.bdf);
        Ok(info)
    }

    /// Asks the guest to eject device `id`; it goes when the guest's `_EJ0` runs.
    pub fn remove(&self, id: &str) -> Result<DeviceInfo, HotplugError> {
        let info = {
            let mut devices = locked(&self.devices);
            let entry = devices
                .iter_mut()
                .find(|d| d.info.id == id)
                .ok_or_else(|| HotplugError::NotFound(id.to_string()))?;
            if !entry.removable {
                return Err(HotplugError::Conflict(format!(
                    "`{id}` ({}) cannot be removed: only virtio devices can",
                    entry.info.kind
                )));
            }
            if !locked(&self.registers).request_eject(entry.address.device) {
                return Err(HotplugError::Failed(format!(
                    "`{id}`: slot {} is not marked present",
                    entry.address
                )));
            }
            entry.info.state = DeviceState::EjectRequested;
            entry.info.clone()
        };
        // A snapshot would lose the pending request: from now on the VM is not its boot shape.
        self.changed.store(true, Ordering::Release);
        self.notify_guest();
        tracing::info!("hotplug: eject of {id} at {} requested", info.bdf);
        Ok(info)
    }

    fn notify_guest(&self) {
        if let Err(e) = self.irq.trigger() {
            tracing::warn!("hotplug: raising the GED interrupt: {e}");
        }
    }

    /// The guest ejected `slots` (its `_EJ0` wrote `PCEJ`): take their devices away. Runs on
    /// the vCPU that wrote, with no hot-plug lock held while devices are dropped.
    fn eject(&self, slots: &[u8]) {
        for &slot in slots {
            let Ok(address) = PciAddress::new(0, slot, 0) else {
                continue;
            };
            let entry = {
                let mut devices = locked(&self.devices);
                let index = devices.iter().position(|d| d.address == address);
                index.map(|i| devices.remove(i))
            };
            let removed = self.root.remove_device(address);
            if let Some(metrics) = entry.as_ref().and_then(|e| e.metrics.as_ref()) {
                locked(&self.metrics).retain(|m| !Arc::ptr_eq(m, metrics));
            }
            self.changed.store(true, Ordering::Release);
            if let Some(entry) = &entry {
                self.wiring.qos.forget(&entry.info.id);
            }
            match (&entry, removed) {
                (Some(entry), Ok(device)) => {
                    tracing::info!(
                        "hotplug: {} at {address} ejected by the guest",
                        entry.info.id
                    );
                    // The last reference: stops its workers, frees routes, closes its backing.
                    drop(device);
                }
                (_, Err(e)) => tracing::warn!("hotplug: eject of {address}: {e}"),
                (None, Ok(_)) => tracing::warn!("hotplug: {address} ejected had no id"),
            }
        }
    }
}

/// The register block on the PIO bus.
pub(crate) struct HotplugPort(Weak<Hotplug>);

impl BusDevice for HotplugPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match self.0.upgrade() {
            Some(hotplug) => locked(&hotplug.registers).read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(hotplug) = self.0.upgrade() else {
            return;
        };
        // The register lock is released before the devices go (their drop joins threads).
        let slots = locked(&hotplug.registers).write(offset, data);
        if !slots.is_empty() {
            hotplug.eject(&slots);
        }
    }
}

/// The API's kind for a function named `name` by its model.
fn kind_of(name: &str) -> String {
    let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
    trimmed.to_string()
}

/// A function's name made into an id not yet in `devices` (`nvme0`, `e1000-1`).
fn unique_id(devices: &[DeviceEntry], name: &str) -> String {
    let base: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(MAX_ID_LEN - 4)
        .collect();
    let taken = |id: &str| devices.iter().any(|d| d.info.id == id);
    if !taken(&base) {
        return base;
    }
    (1..)
        .map(|n| format!("{base}-{n}"))
        .find(|id| !taken(id))
        .unwrap_or(base)
}

/// Ids are 1..=32 bytes of letters, digits, `-` and `_`.
pub fn check_id(id: &str) -> Result<(), HotplugError> {
    let good = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if good {
        Ok(())
    } else {
        Err(HotplugError::BadRequest(format!(
            "id `{id}`: 1 to {MAX_ID_LEN} letters, digits, `-` or `_`"
        )))
    }
}

#[cfg(test)]
mod tests;
