//! PCI hot-plug of a running VM: devices added and removed through the control API
//! (`vm.add-disk`, `vm.add-net`, `vm.add-device`, `vm.remove-device`) while the guest runs.
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
//! - **Assigned functions (VFIO)**: `vm.add-device` wires the host function as boot does
//!   ([`VfioWiring::assign`]: container and group, DMA, BAR windows, MSI-X irqfds, the VM's
//!   one KVM VFIO device). On eject the vCPU only takes it off the root (its memory slots go:
//!   calls the vCPU filter allows); the reset, the VT-d watch, the group's removal from KVM's
//!   VFIO device and the container's close happen on the `vfio-teardown` thread
//!   ([`Hotplug::teardown_queue`] says why).
//!
//! Virtio devices (disk, net, rng) and assigned functions are plugged and removed; NVMe,
//! e1000 and the vIOMMU are listed with ids but refused. A VM whose devices changed since
//! boot refuses snapshots by name (a restore is built from the boot configuration).

pub mod registers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use serde::Serialize;
use sluice_bus::irq::IrqLine;
use sluice_bus::BusDevice;
use sluice_dma::DmaSpaces;
use sluice_pci::{PciAddress, PciRoot, SharedPciDevice};
use sluice_virtio::{DeviceMetrics, VirtioDevice};

use crate::config::{DiskSpec, NetSpec, VfioSpec};
use crate::interrupts::VmInterrupts;
use crate::vfio::{VfioHandle, VfioWiring};
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
    /// Assigning host functions (`vm.add-device`); `None`: this VM takes none.
    pub vfio: Option<Arc<VfioWiring>>,
}

/// An ejected assigned function on its way to the teardown thread: the root's reference and
/// the VM's handle (dropping both releases it).
type Teardown = (SharedPciDevice, VfioHandle);

struct DeviceEntry {
    info: DeviceInfo,
    address: PciAddress,
    metrics: Option<Arc<DeviceMetrics>>,
    removable: bool,
    /// An assigned (VFIO) function.
    vfio: Option<VfioHandle>,
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
    /// Where ejected assigned functions go to be torn down (see [`Hotplug::teardown_queue`]).
    teardown: Mutex<Option<Sender<Teardown>>>,
    /// Ejected functions the teardown thread could not take: released with the controller,
    /// on the thread that drops it last (the VM's main thread), never on a vCPU.
    stranded: Mutex<Vec<Teardown>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hotplug {
    /// The controller of a VM whose boot-time devices are on `root` (`wired`: the virtio ones,
    /// with ids; `vfio`: the assigned functions; every other function is listed under its own
    /// name, not removable). Runs on the VM's main thread, which starts the teardown thread
    /// when functions are assigned.
    pub(crate) fn new(
        root: Arc<PciRoot>,
        irq: Arc<dyn IrqLine>,
        wiring: Wiring,
        metrics: Arc<Mutex<Vec<Arc<DeviceMetrics>>>>,
        wired: &[WiredDevice],
        vfio: Vec<VfioHandle>,
    ) -> Arc<Self> {
        let mut registers = HotplugRegisters::default();
        let mut devices = Vec::new();
        for (address, name) in root.functions() {
            let virtio = wired.iter().find(|w| w.bdf == address.bdf());
            let assigned = vfio.iter().find(|h| h.address == address);
            // Only what sluice can take away is ejectable: the guest's `_EJ0` on an NVMe,
            // e1000 or vIOMMU slot is ignored and counted.
            let removable = virtio.is_some() || assigned.is_some();
            if removable {
                registers.present_at_boot(address.device);
            }
            let id = match virtio {
                Some(w) => w.id.clone(),
                None => unique_id(&devices, &name),
            };
            devices.push(DeviceEntry {
                info: DeviceInfo {
                    id,
                    kind: if assigned.is_some() {
                        VFIO_KIND.into()
                    } else {
                        kind_of(&name)
                    },
                    bdf: address.to_string(),
                    hotplugged: false,
                    state: DeviceState::Present,
                    backing: assigned.map(|h| h.host.to_string()),
                },
                address,
                metrics: virtio.map(|w| w.metrics.clone()),
                removable,
                vfio: assigned.cloned(),
            });
        }
        let hotplug = Arc::new(Self {
            root,
            registers: Mutex::new(registers),
            irq,
            wiring,
            devices: Mutex::new(devices),
            metrics,
            changed: AtomicBool::new(false),
            teardown: Mutex::new(None),
            stranded: Mutex::new(Vec::new()),
        });
        if !vfio.is_empty() {
            if let Err(e) = hotplug.teardown_queue() {
                tracing::warn!("hotplug: {e}");
            }
        }
        hotplug
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

    /// Why the VM cannot migrate as its devices are now, if it cannot: an eject the guest has
    /// not completed (the device would be on both sides of the question), or an assigned
    /// function still plugged (its state is in the host device; remove it first — the
    /// failover dance: unplug the VF, migrate, plug one at the destination).
    pub fn migration_blocker(&self) -> Option<String> {
        let devices = locked(&self.devices);
        if let Some(d) = devices
            .iter()
            .find(|d| d.info.state == DeviceState::EjectRequested)
        {
            return Some(format!(
                "`{}` at {} has an eject pending (the guest has not run its _EJ0 yet); migrate \
                 once it is gone",
                d.info.id, d.info.bdf
            ));
        }
        devices.iter().find(|d| d.vfio.is_some()).map(|d| {
            format!(
                "assigned device `{}` ({} at {}) cannot be migrated: remove it first \
                 (vm.remove-device), then plug one at the destination",
                d.info.id,
                d.info.backing.as_deref().unwrap_or("vfio"),
                d.info.bdf
            )
        })
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

    /// Assigns the host function `spec` names to the running VM (VFIO, wired as at boot: its
    /// container and group, DMA, BAR windows, MSI-X irqfds, the VM's KVM VFIO device).
    pub fn add_vfio(
        &self,
        spec: &VfioSpec,
        id: Option<String>,
    ) -> Result<DeviceInfo, HotplugError> {
        let wiring =
            self.wiring.vfio.clone().ok_or_else(|| {
                HotplugError::Conflict("this VM cannot take assigned devices".into())
            })?;
        let path = spec.host.sysfs_path(std::path::Path::new("/"));
        if !path.exists() {
            return Err(HotplugError::BadRequest(format!(
                "no host PCI function {} ({} does not exist)",
                spec.host,
                path.display()
            )));
        }
        let mut assigned: Vec<_> = self.vfio_handles().into_iter().map(|h| h.host).collect();
        if assigned.contains(&spec.host) {
            return Err(HotplugError::Conflict(format!(
                "{} is already assigned to this VM",
                spec.host
            )));
        }
        assigned.push(spec.host.clone());
        let id = self.claim_id(id, "vfio")?;
        // Before the guest can eject it: its `_EJ0` hands it to the teardown thread.
        self.teardown_queue()?;
        // Refusals (group not viable, not bound to vfio-pci, busy) are the host's state, not
        // sluice failing: 409 with the reason.
        let handle = wiring
            .assign(&self.root, spec, &assigned)
            .map_err(|e| HotplugError::Conflict(format!("{}: {e}", spec.host)))?;
        let info = DeviceInfo {
            id,
            kind: VFIO_KIND.into(),
            bdf: handle.address.to_string(),
            hotplugged: true,
            state: DeviceState::Present,
            backing: Some(spec.host.to_string()),
        };
        let slot = handle.address.device;
        locked(&self.devices).push(DeviceEntry {
            info: info.clone(),
            address: handle.address,
            metrics: None,
            removable: true,
            vfio: Some(handle),
        });
        self.changed.store(true, Ordering::Release);
        locked(&self.registers).inserted(slot);
        self.notify_guest();
        tracing::info!(
            "hotplug: {} ({}) assigned at {}",
            info.id,
            spec.host,
            info.bdf
        );
        Ok(info)
    }

    /// The assigned functions the VM holds now.
    pub fn vfio_handles(&self) -> Vec<VfioHandle> {
        locked(&self.devices)
            .iter()
            .filter_map(|d| d.vfio.clone())
            .collect()
    }

    /// The queue of the thread that tears ejected assigned functions down, started at first
    /// need. Not on the vCPU that ran the guest's `_EJ0`: the reset, the group's removal from
    /// KVM's VFIO device and the container's teardown are calls its seccomp filter refuses
    /// (it keeps the VFIO calls a guest config write needs, no more). Started by the VM's
    /// main thread or the API's, which are not filtered, so the thread is not either.
    fn teardown_queue(&self) -> Result<Sender<Teardown>, HotplugError> {
        let mut queue = locked(&self.teardown);
        if let Some(sender) = queue.as_ref() {
            return Ok(sender.clone());
        }
        let (sender, receiver) = std::sync::mpsc::channel::<Teardown>();
        std::thread::Builder::new()
            .name("vfio-teardown".into())
            .spawn(move || {
                for (device, handle) in receiver {
                    handle.detach();
                    tracing::info!("hotplug: {} torn down", handle.name);
                    drop(device);
                }
            })
            .map_err(|e| {
                HotplugError::Failed(format!("cannot start the VFIO teardown thread: {e}"))
            })?;
        *queue = Some(sender.clone());
        Ok(sender)
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
            vfio: None,
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
                    "`{id}` ({}) cannot be removed: only virtio and assigned (VFIO) devices can",
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
                (
                    Some(DeviceEntry {
                        vfio: Some(handle),
                        info,
                        ..
                    }),
                    Ok(device),
                ) => {
                    tracing::info!("hotplug: {} at {address} ejected by the guest", info.id);
                    self.tear_down(device, handle.clone());
                }
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

impl Hotplug {
    /// Hands an ejected assigned function to the teardown thread. Should the thread be gone,
    /// the function is kept until the controller goes rather than torn down here on a vCPU.
    fn tear_down(&self, device: SharedPciDevice, handle: VfioHandle) {
        let queue = locked(&self.teardown).clone();
        let refused = match queue {
            Some(queue) => queue.send((device, handle)).err().map(|e| e.0),
            None => Some((device, handle)),
        };
        if let Some(kept) = refused {
            tracing::error!(
                "hotplug: {}: no teardown thread; the function stays open until the VM ends",
                kept.1.name
            );
            locked(&self.stranded).push(kept);
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

/// `vm.info`'s kind of an assigned function.
const VFIO_KIND: &str = "vfio";

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

/// Ids are 1..=32 bytes of letters, digits, `-` and `_`; `device` names the I/O scheduler in
/// `vm.qos` ([`crate::qos::DEVICE_ID`]), so no device may take it.
pub fn check_id(id: &str) -> Result<(), HotplugError> {
    if id == crate::qos::DEVICE_ID {
        return Err(HotplugError::BadRequest(format!(
            "id `{id}` names the I/O scheduler in vm.qos"
        )));
    }
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
