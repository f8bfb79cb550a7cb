//! `--device vfio=BDF` and `vm.add-device`: a host PCI function assigned to the guest through
//! VFIO (sluice-vfio), at boot or hot-plugged ([`VfioWiring`] does both the same way; removal
//! is crate::hotplug's).
//!
//! * Before anything is opened: the function's IOMMU group must be viable for this VM, the host
//!   must remap interrupts (or the user said `allow_unsafe_interrupts=on`), and with `dma=all`
//!   the pinned-memory limits must cover guest RAM.
//! * DMA, `dma=all` (the default without `--iommu`): all guest RAM is mapped IOVA = GPA with
//!   VFIO_IOMMU_MAP_DMA (pinned) before the guest runs.
//! * DMA, `dma=on-demand` (the default, and the only mode, behind `--iommu vtd`): the host
//!   IOMMU maps what the guest's VT-d tables map for the function's requester id, following
//!   every invalidation ([`crate::vfio_shadow`]); nothing while Bus Master is off. `dma=all`
//!   behind the vIOMMU is refused (machine.rs): the device would ignore the guest's tables.
//! * Config space: sluice-vfio's trap policy ([`VirtualConfig`]).
//! * BARs: the data pages are mmapped from the VFIO region and registered as KVM memory slots
//!   at the BAR's guest address (no exit per access); they follow guest BAR moves in
//!   [`PciDevice::bar_moved`]. The pages holding the MSI-X table and PBA are left out and trap:
//!   the table is sluice-pci's [`MsixVectors`], whose per-vector irqfd eventfds are handed to
//!   VFIO_DEVICE_SET_IRQS, so a device interrupt reaches the guest with no userspace hop. Other
//!   registers on those pages are forwarded to the region.
//! * Reset: VFIO_DEVICE_RESET when the VM starts and stops (if the device offers it); a failed
//!   reset quarantines the device (DMA unmapped, Bus Master cleared, logged).
//!
//! * MSI-X masking: while the guest masks a vector (or the function), VFIO signals a mask
//!   eventfd of sluice's instead of the irqfd; what arrived there becomes the vector's pending
//!   bit (PBA) and is delivered on unmask.
//!
//! Not built: INTx (the device gets MSI-X only; its pin reads 0), MSI (hidden), expansion ROMs.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use sluice_pci::{
    BarKind, BarSpec, ConfigSpace, MsixCapability, MsixTable, MsixVectors, PciAddress, PciDevice,
    PciRoot, SharedPciDevice, COMMAND, NUM_BARS,
};
use sluice_vfio::{AssignedFunction, HostBdf, MsixLayout, VirtualConfig};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VfioSpec;
use crate::interrupts::VmInterrupts;
use crate::machine::{device_err, VmError};
use crate::memory::GuestRam;
use crate::vfio_shadow::{DmaMapper, DmaShadow, Extent, RamRegions};
use sluice_bus::irq::{MsiRouter, MsiSink};
use sluice_iommu::Vtd;

/// Host page size for memslots (x86).
const PAGE_SIZE: u64 = 4096;
/// First KVM memory slot for BAR windows (guest RAM takes the first few).
const FIRST_BAR_SLOT: u32 = 32;

/// What a running VM keeps of each assigned function.
#[derive(Clone)]
pub struct VfioHandle {
    device: Arc<Mutex<VfioPciDevice>>,
    pub name: String,
    /// The host function (`0000:01:00.0`).
    pub host: HostBdf,
    /// Where the guest sees it.
    pub address: PciAddress,
    /// `dma=all`: what was mapped at start.
    dma_all_bytes: u64,
    /// `dma=on-demand`: the mappings that follow the guest's tables.
    shadow: Option<Arc<DmaShadow>>,
    /// `dma=on-demand`: the vIOMMU watch to drop when the function leaves.
    vtd: Option<Vtd>,
}

/// What the VM reports of an assigned function (`--metrics`, `report.vfio`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioReport {
    pub name: String,
    /// `all` or `on-demand`.
    pub dma: &'static str,
    /// Guest RAM mapped for the function's DMA when the VM stopped.
    pub dma_mapped_bytes: u64,
    /// The most that was mapped at any time.
    pub dma_mapped_peak_bytes: u64,
    /// The most VFIO mappings held at any time.
    pub dma_mappings_peak: usize,
    /// Invalidations that changed the host IOMMU mappings (`on-demand`).
    pub dma_updates: u64,
    /// Why the function was quarantined while the VM ran, if it was.
    pub quarantined: Option<String>,
}

impl VfioHandle {
    pub fn report(&self) -> VfioReport {
        match &self.shadow {
            Some(shadow) => {
                let stats = shadow.stats();
                VfioReport {
                    name: self.name.clone(),
                    dma: "on-demand",
                    dma_mapped_bytes: stats.mapped_bytes,
                    dma_mapped_peak_bytes: stats.peak_bytes,
                    dma_mappings_peak: stats.peak_mappings,
                    dma_updates: stats.updates,
                    quarantined: stats.quarantined,
                }
            }
            None => VfioReport {
                name: self.name.clone(),
                dma: "all",
                dma_mapped_bytes: self.dma_all_bytes,
                dma_mapped_peak_bytes: self.dma_all_bytes,
                dma_mappings_peak: 0,
                dma_updates: 0,
                quarantined: None,
            },
        }
    }

    /// Stops the device when the VM stops: MSI-X off, reset (or quarantine).
    pub fn stop(&self) {
        let mut device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        device.stop();
    }

    /// The function left the VM (hot-unplug, after the guest's `_EJ0` took it off the bus):
    /// no more vIOMMU notifications, MSI-X off, reset. Its DMA mappings, BAR mmaps, container
    /// and group (and the group's entry in KVM's VFIO device) go when the last handle drops.
    /// Makes VFIO and KVM device calls a vCPU thread's filter refuses: run on the
    /// hot-plug teardown thread (crate::hotplug).
    pub fn detach(&self) {
        if let Some(vtd) = &self.vtd {
            vtd.unwatch(self.address.bdf());
        }
        self.stop();
    }
}

/// What assigning a function to a running VM needs, at boot and at hot-plug: the VM, its RAM
/// (`dma=all` maps it), its interrupt plumbing, the vIOMMU (`dma=on-demand`), the KVM VFIO
/// pseudo-device (one per VM, made at the first assignment) and the next free KVM memory
/// slot for BAR windows.
pub struct VfioWiring {
    vm: Arc<VmFd>,
    ram: GuestRam,
    interrupts: VmInterrupts,
    vtd: Option<Vtd>,
    kvm_vfio: Mutex<Option<Arc<sluice_vfio::VfioDeviceFd>>>,
    /// Slots of unplugged functions are not reused: KVM has hundreds, a VM plugs a few.
    slots: Arc<AtomicU32>,
}

impl VfioWiring {
    pub fn new(
        vm: &Arc<VmFd>,
        ram: &GuestRam,
        interrupts: &VmInterrupts,
        vtd: Option<&Vtd>,
    ) -> Arc<Self> {
        Arc::new(Self {
            vm: vm.clone(),
            ram: ram.clone(),
            interrupts: interrupts.clone(),
            vtd: vtd.cloned(),
            kvm_vfio: Mutex::new(None),
            slots: Arc::new(AtomicU32::new(FIRST_BAR_SLOT)),
        })
    }

    /// The VM's KVM VFIO pseudo-device, created at first use.
    fn kvm_vfio(&self) -> Result<Arc<sluice_vfio::VfioDeviceFd>, VmError> {
        let mut device = self.kvm_vfio.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(device) = device.as_ref() {
            return Ok(device.clone());
        }
        let made = Arc::new(kvm_vfio_device(&self.vm)?);
        *device = Some(made.clone());
        Ok(made)
    }

    /// Assigns `spec`'s function and adds it to `root` (`assigned`: every function this VM
    /// holds or is being given, which the IOMMU group may contain).
    pub fn assign(
        &self,
        root: &PciRoot,
        spec: &VfioSpec,
        assigned: &[HostBdf],
    ) -> Result<VfioHandle, VmError> {
        let what = "vfio";
        let host_root = Path::new("/");
        let ram = &self.ram;
        let vtd = self.vtd.as_ref();
        sluice_vfio::check_group(host_root, &spec.host, assigned)
            .map_err(|e| device_err(what, e))?;
        let ir = sluice_vfio::interrupt_remapping(host_root);
        sluice_vfio::check_interrupt_remapping(ir, spec.allow_unsafe_interrupts)
            .map_err(|e| device_err(what, format!("{}: {e}", spec.host)))?;
        let limits = sluice_vfio::current_pin_limits(host_root).map_err(|e| device_err(what, e))?;
        if vtd.is_none() {
            sluice_vfio::check_pin_limits(&limits, ram.size).map_err(|e| device_err(what, e))?;
        }
        let function = open_function(spec, self.kvm_vfio()?)?;
        if vtd.is_none() {
            map_guest_ram(&function, ram)?;
        }
        let dma_all_bytes = function.mapped_bytes();
        let mut on_demand = None;
        let mut built = None;
        let address = root.add_device_with(|address| {
            // With VT-d interrupt remapping the guest programs remappable MSI-X messages:
            // the routes go through the unit for this requester like any device's.
            let (msi_sink, router) = self.interrupts.msi_for(address.bdf());
            let mut device = VfioPciDevice::new(
                spec,
                function.clone(),
                self.vm.clone(),
                self.slots.clone(),
                router.as_ref(),
                msi_sink,
            )?;
            if let Some(vtd) = vtd {
                let shadow = Arc::new(DmaShadow::new(
                    format!("vfio {} at PCI {address}", spec.host),
                    Arc::new(FunctionDma(function.clone())),
                    ram_regions(ram),
                ));
                device.on_demand = Some(OnDemand {
                    shadow: shadow.clone(),
                    vtd: vtd.clone(),
                    requester: address.bdf(),
                });
                on_demand = Some((shadow, address.bdf()));
            }
            let device = Arc::new(Mutex::new(device));
            built = Some(device.clone());
            let shared: SharedPciDevice = device;
            Ok::<_, VmError>(shared)
        })?;
        let Some(device) = built else {
            return Err(device_err(what, "the PCI root did not build the device"));
        };
        let name = format!("vfio {} at PCI {address}", spec.host);
        let shadow = match (vtd, on_demand) {
            (Some(vtd), Some((shadow, requester))) => {
                // Before the guest can reach the function: no invalidation can be missed.
                vtd.watch(requester, shadow.clone());
                tracing::info!(
                    "{name}: dma=on-demand, following requester {requester:#06x} in the vIOMMU"
                );
                Some(shadow)
            }
            _ => {
                tracing::info!(
                    "{name}: {dma_all_bytes} bytes of guest RAM mapped for DMA (dma=all)"
                );
                None
            }
        };
        Ok(VfioHandle {
            device,
            name,
            host: spec.host.clone(),
            address,
            dma_all_bytes,
            vtd: shadow.as_ref().and(vtd.cloned()),
            shadow,
        })
    }
}

/// Assigns every `--device vfio=` function and adds it to `root`; behind the vIOMMU each
/// function's DMA mappings follow its requester's tables there (`dma=on-demand`).
pub fn attach_vfio_devices(
    wiring: &VfioWiring,
    root: &PciRoot,
    specs: &[VfioSpec],
) -> Result<Vec<VfioHandle>, VmError> {
    let assigned: Vec<HostBdf> = specs.iter().map(|s| s.host.clone()).collect();
    specs
        .iter()
        .map(|spec| wiring.assign(root, spec, &assigned))
        .collect()
}

/// The VM's KVM VFIO pseudo-device (one per VM): KVM learns which groups the VM uses.
fn kvm_vfio_device(vm: &VmFd) -> Result<sluice_vfio::VfioDeviceFd, VmError> {
    let mut request = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let fd = vm
        .create_device(&mut request)
        .map_err(|e| device_err("vfio", format!("KVM_CREATE_DEVICE(VFIO): {e}")))?;
    Ok(sluice_vfio::VfioDeviceFd::new_from_kvm(fd))
}

/// Opens the function and resets it (VM start); a failed reset quarantines and refuses.
fn open_function(
    spec: &VfioSpec,
    kvm_vfio: Arc<sluice_vfio::VfioDeviceFd>,
) -> Result<Arc<AssignedFunction>, VmError> {
    let path = spec.host.sysfs_path(Path::new("/"));
    let function =
        AssignedFunction::open(&path, Some(kvm_vfio)).map_err(|e| device_err("vfio", e))?;
    if function.can_reset() {
        if let Err(e) = function.reset() {
            let mut config = function.config();
            quarantine_config(&mut config);
            return Err(device_err(
                "vfio",
                format!(
                    "{}: VFIO_DEVICE_RESET failed at start ({e}); device quarantined",
                    spec.host
                ),
            ));
        }
    } else {
        tracing::warn!(
            "vfio: {}: no VFIO_DEVICE_RESET; the device starts as the host left it",
            spec.host
        );
    }
    Ok(Arc::new(function))
}

/// The host IOMMU side of `dma=on-demand`: the function's VFIO container.
struct FunctionDma(Arc<AssignedFunction>);

impl DmaMapper for FunctionDma {
    fn map(&self, extent: &Extent) -> std::io::Result<()> {
        // SAFETY: `extent.host` lies inside guest RAM (vfio_shadow only maps what its RAM
        // regions hold), which stays mapped for the VM's life, longer than the function (whose
        // drop unmaps its DMA); sluice touches it only through vm-memory's volatile accessors.
        unsafe {
            self.0.map_dma_with(
                extent.iova,
                extent.len,
                extent.host,
                extent.read,
                extent.write,
            )
        }
    }

    fn unmap(&self, extent: &Extent) -> std::io::Result<()> {
        self.0.unmap_dma(extent.iova, extent.len)
    }

    fn quarantine(&self) {
        quarantine_config(&mut self.0.config());
    }
}

/// Guest RAM as (guest physical start, length, host address) for `dma=on-demand`.
fn ram_regions(ram: &GuestRam) -> RamRegions {
    ram.memory
        .iter()
        .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
        .collect()
}

/// `dma=on-demand`: the function's mappings and the vIOMMU they follow.
struct OnDemand {
    shadow: Arc<DmaShadow>,
    vtd: Vtd,
    requester: u16,
}

/// Bus Master off on the device itself (no shadow yet).
fn quarantine_config(config: &mut sluice_vfio::VfioConfig) {
    use sluice_vfio::DeviceConfig;
    let mut command = [0u8; 2];
    config.read(COMMAND, &mut command);
    let cleared = u16::from_le_bytes(command) & !sluice_pci::COMMAND_BUS_MASTER;
    config.write(COMMAND, &cleared.to_le_bytes());
}

/// `dma=all`: every guest RAM region mapped at IOVA = guest physical address, pinned.
fn map_guest_ram(function: &AssignedFunction, ram: &GuestRam) -> Result<(), VmError> {
    for region in ram.memory.iter() {
        // SAFETY: guest RAM stays mapped for the VM's life, longer than the device (whose drop
        // unmaps the DMA); sluice touches it only through vm-memory's volatile accessors.
        unsafe { function.map_dma(region.start_addr().0, region.len(), region.as_ptr() as u64) }
            .map_err(|e| {
                device_err(
                    "vfio",
                    format!(
                        "{}: VFIO_IOMMU_MAP_DMA of {:#x}+{:#x}: {e}",
                        function.path().display(),
                        region.start_addr().0,
                        region.len()
                    ),
                )
            })?;
    }
    Ok(())
}

/// Part of a BAR mapped straight into the guest.
struct DirectWindow {
    offset: u64,
    mmap: sluice_vfio::RegionMmap,
    slot: u32,
    mapped_at: Option<u64>,
}

/// One BAR: its spec and the windows that bypass sluice.
struct BarRegion {
    windows: Vec<DirectWindow>,
}

/// The assigned function as a `PciDevice`.
pub struct VfioPciDevice {
    name: String,
    function: Arc<AssignedFunction>,
    config: VirtualConfig,
    msix: Option<(MsixLayout, Arc<MsixVectors>)>,
    /// Per vector, the eventfd VFIO signals while the guest masks it: read back into the
    /// table's pending bits (and delivered on unmask) instead of reaching the guest.
    mask_fds: Vec<EventFd>,
    /// What VFIO_DEVICE_SET_IRQS last programmed: `None` MSI-X off on the device; per vector
    /// `true` = the irqfd (deliverable), `false` = its mask eventfd.
    device_vectors: Option<Vec<bool>>,
    bars: [Option<BarRegion>; NUM_BARS],
    vm: Arc<VmFd>,
    stopped: bool,
    /// `dma=on-demand`: set once the function's requester id is known.
    on_demand: Option<OnDemand>,
}

impl VfioPciDevice {
    fn new(
        spec: &VfioSpec,
        function: Arc<AssignedFunction>,
        vm: Arc<VmFd>,
        slots: Arc<AtomicU32>,
        router: &dyn MsiRouter,
        msi_sink: Arc<dyn MsiSink>,
    ) -> Result<Self, VmError> {
        let what = "vfio";
        let bar_specs = bar_specs(&function);
        let config = VirtualConfig::build(Box::new(function.config()), &bar_specs)
            .map_err(|e| device_err(what, format!("{}: {e}", spec.host)))?;
        let msix = match config.msix() {
            Some(layout) => {
                let table = MsixTable::new(layout.capability.vectors, msi_sink)
                    .map_err(|e| device_err(what, e))?;
                let vectors =
                    MsixVectors::new(table, Some(router)).map_err(|e| device_err(what, e))?;
                Some((layout, Arc::new(vectors)))
            }
            None => None,
        };
        let vector_count = msix.as_ref().map_or(0, |(_, v)| v.vectors());
        let mask_fds = (0..vector_count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| device_err(what, e))?;
        let trapped = msix
            .as_ref()
            .map(|(layout, _)| trapped_pages(&layout.capability));
        let mut bars: [Option<BarRegion>; NUM_BARS] = Default::default();
        for (index, spec) in bar_specs.iter().enumerate() {
            let Some(spec) = spec.filter(|s| s.kind != BarKind::Io) else {
                continue;
            };
            let trapped: Vec<(u64, u64)> = trapped
                .iter()
                .flatten()
                .filter(|t| t.0 == index)
                .map(|t| (t.1, t.2))
                .collect();
            let windows = direct_windows(&function, index as u32, spec.size, &trapped, &slots)
                .map_err(|e| device_err(what, format!("{}: BAR {index} mmap: {e}", spec.size)))?;
            bars[index] = Some(BarRegion { windows });
        }
        Ok(Self {
            name: format!("vfio-{}", spec.host),
            function,
            config,
            mask_fds,
            msix,
            device_vectors: None,
            bars,
            vm,
            stopped: false,
            on_demand: None,
        })
    }

    /// Follows the guest's MSI-X state on the device: off when the guest disabled it; else each
    /// vector signals its irqfd while deliverable and its mask eventfd while masked (so a
    /// masked vector never reaches the guest). Reprograms only when that choice changed.
    fn sync_msix(&mut self) {
        let Some((_, vectors)) = &self.msix else {
            return;
        };
        if !vectors.is_enabled() {
            if self.device_vectors.take().is_some() {
                if let Err(e) = self.function.disable_msix() {
                    tracing::warn!("{}: disabling MSI-X on the device: {e}", self.name);
                }
            }
            return;
        }
        let wanted: Vec<bool> = {
            let table = vectors.table();
            (0..vectors.vectors())
                .map(|v| !table.is_function_masked() && !table.is_vector_masked(v))
                .collect()
        };
        if self.device_vectors.as_ref() != Some(&wanted) {
            let fds: Option<Vec<BorrowedFd<'_>>> = wanted
                .iter()
                .zip(0..)
                .map(|(&open, v)| match open {
                    true => vectors.route_fd(v),
                    // SAFETY: the eventfd lives in `self.mask_fds` for the device's life.
                    false => Some(unsafe {
                        BorrowedFd::borrow_raw(self.mask_fds[usize::from(v)].as_raw_fd())
                    }),
                })
                .collect();
            let result = match fds {
                Some(fds) => self.function.enable_msix(&fds),
                None => Err(std::io::Error::other("MSI-X vectors have no irqfd")),
            };
            match result {
                Ok(()) => self.device_vectors = Some(wanted),
                Err(e) => tracing::warn!("{}: programming MSI-X on the device: {e}", self.name),
            }
        }
        self.collect_masked_signals();
    }

    /// Moves what the device signalled while vectors were masked into the table: pending while
    /// still masked, sent now if unmasked.
    fn collect_masked_signals(&self) {
        let Some((_, vectors)) = &self.msix else {
            return;
        };
        for (vector, fd) in (0..).zip(&self.mask_fds) {
            if fd.read().is_ok_and(|count| count > 0) {
                vectors.signal(vector);
            }
        }
    }

    /// (Un)registers `window` as a KVM memory slot at `gpa`.
    fn set_slot(
        vm: &VmFd,
        window: &DirectWindow,
        gpa: Option<u64>,
    ) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot: window.slot,
            flags: 0,
            guest_phys_addr: gpa.unwrap_or(0),
            memory_size: if gpa.is_some() {
                window.mmap.len() as u64
            } else {
                0
            },
            userspace_addr: window.mmap.host_addr(),
        };
        // SAFETY: the mapping lives in `window` for as long as the slot exists: the slot is
        // removed in `stop` / before a move, and the device outlives the VM's vCPUs.
        unsafe { vm.set_user_memory_region(region) }
    }

    /// VM stop: MSI-X off, memslots gone, reset; a failed reset quarantines the device.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if self.device_vectors.take().is_some() {
            let _ = self.function.disable_msix();
        }
        for region in self.bars.iter_mut().flatten() {
            for window in &mut region.windows {
                if window.mapped_at.take().is_some() {
                    let _ = Self::set_slot(&self.vm, window, None);
                }
            }
        }
        if self.function.can_reset() {
            if let Err(e) = self.function.reset() {
                self.quarantine(&format!("VFIO_DEVICE_RESET failed at stop: {e}"));
            }
        }
    }

    /// Unmaps all DMA and clears Bus Master.
    fn quarantine(&mut self, why: &str) {
        self.function.unmap_all_dma();
        self.config.clear_bus_master();
        tracing::error!(
            "{}: quarantined ({why}): DMA unmapped, Bus Master cleared",
            self.name
        );
    }

    fn dma_quarantined(&self) -> bool {
        self.on_demand
            .as_ref()
            .is_some_and(|d| d.shadow.is_quarantined())
    }

    fn bus_master(&self) -> bool {
        self.config.shadow().command() & sluice_pci::COMMAND_BUS_MASTER != 0
    }

    /// `dma=on-demand`: no mappings while Bus Master is off; all of the guest's when it is
    /// turned on. A quarantined function keeps Bus Master off whatever the guest writes.
    fn bus_master_changed(&mut self) {
        let Some(on_demand) = &self.on_demand else {
            return;
        };
        let on = self.bus_master();
        if on && on_demand.shadow.is_quarantined() {
            self.config.clear_bus_master();
            return;
        }
        on_demand.shadow.set_bus_master(on);
        if on {
            // Takes the unit's lock, then the shadow's, as an invalidation does.
            on_demand.vtd.refresh(on_demand.requester);
        }
    }

    fn msix_access(&self, bar: usize, offset: u64) -> Option<(&Arc<MsixVectors>, bool, u64)> {
        let (layout, vectors) = self.msix.as_ref()?;
        let cap = &layout.capability;
        let within = |b: u8, start: u32, len: u64| {
            usize::from(b) == bar && offset >= u64::from(start) && offset < u64::from(start) + len
        };
        if within(cap.table_bar, cap.table_offset, cap.table_len()) {
            return Some((vectors, true, offset - u64::from(cap.table_offset)));
        }
        if within(cap.pba_bar, cap.pba_offset, cap.pba_len()) {
            return Some((vectors, false, offset - u64::from(cap.pba_offset)));
        }
        None
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.stop();
        // The BAR mmaps hold the device file: unmapped first, so that dropping the last
        // reference closes it and its group can leave the container (vfio-ioctls unsets the
        // container when the device goes; with a mapping left the kernel answers EBUSY and
        // the group stays bound until sluice exits — which matters once functions are
        // unplugged from a VM that runs on).
        self.bars = Default::default();
    }
}

/// BAR specs from VFIO's region sizes and the BAR registers' type bits.
fn bar_specs(function: &AssignedFunction) -> [Option<BarSpec>; NUM_BARS] {
    use sluice_vfio::DeviceConfig;
    let config = function.config();
    let mut specs = [None; NUM_BARS];
    let mut index = 0;
    while index < NUM_BARS {
        let size = function.region_size(index as u32);
        let mut register = [0u8; 4];
        config.read(0x10 + index * 4, &mut register);
        let bits = u32::from_le_bytes(register);
        let is_64 = bits & 0x1 == 0 && (bits >> 1) & 0x3 == 0x2;
        if size > 0 {
            let spec = if bits & 0x1 == 1 {
                BarSpec::io(size)
            } else if is_64 {
                BarSpec::mem64(size)
            } else {
                BarSpec::mem32(size)
            };
            let spec = if bits & 0x1 == 0 && bits & 0x8 != 0 {
                spec.prefetchable()
            } else {
                spec
            };
            specs[index] = spec.validate().is_ok().then_some(spec);
        }
        index += if is_64 { 2 } else { 1 };
    }
    specs
}

/// `(bar, start, end)` of the pages holding the MSI-X table and PBA: they must trap.
fn trapped_pages(cap: &MsixCapability) -> Vec<(usize, u64, u64)> {
    let page = |bar: u8, offset: u32, len: u64| {
        let start = u64::from(offset) & !(PAGE_SIZE - 1);
        let end = (u64::from(offset) + len).next_multiple_of(PAGE_SIZE);
        (usize::from(bar), start, end)
    };
    vec![
        page(cap.table_bar, cap.table_offset, cap.table_len()),
        page(cap.pba_bar, cap.pba_offset, cap.pba_len()),
    ]
}

/// The mappable areas of BAR `index` minus `trapped` ranges, page aligned, each mmapped.
fn direct_windows(
    function: &AssignedFunction,
    index: u32,
    bar_size: u64,
    trapped: &[(u64, u64)],
    slots: &AtomicU32,
) -> std::io::Result<Vec<DirectWindow>> {
    let mut windows = Vec::new();
    for (offset, size) in function.mappable_areas(index) {
        let end = (offset + size).min(bar_size);
        for (start, stop) in subtract_ranges(offset, end, trapped) {
            let start = start.next_multiple_of(PAGE_SIZE);
            let stop = stop & !(PAGE_SIZE - 1);
            if stop <= start {
                continue;
            }
            let mmap = function.mmap(index, start, stop - start)?;
            windows.push(DirectWindow {
                offset: start,
                mmap,
                slot: slots.fetch_add(1, Ordering::Relaxed),
                mapped_at: None,
            });
        }
    }
    Ok(windows)
}

/// `[start, end)` minus every range in `holes`.
fn subtract_ranges(start: u64, end: u64, holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pieces = vec![(start, end)];
    for &(hole_start, hole_end) in holes {
        pieces = pieces
            .into_iter()
            .flat_map(|(s, e)| {
                let mut out = Vec::new();
                if hole_end <= s || e <= hole_start {
                    out.push((s, e));
                } else {
                    if s < hole_start {
                        out.push((s, hole_start));
                    }
                    if hole_end < e {
                        out.push((hole_end, e));
                    }
                }
                out
            })
            .collect();
    }
    pieces
}

impl PciDevice for VfioPciDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &ConfigSpace {
        self.config.shadow()
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        self.config.shadow_mut()
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let bus_master_was = self.bus_master();
        self.config.write(offset, data);
        if self.bus_master() != bus_master_was || self.dma_quarantined() {
            self.bus_master_changed();
        }
        let touched = self.msix.as_ref().is_some_and(|(layout, vectors)| {
            vectors.config_written(self.config.shadow(), layout.cap_offset, offset, data.len())
        });
        if touched {
            self.sync_msix();
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_access(bar, offset) {
            Some((vectors, true, at)) => vectors.read_table(at, data),
            Some((_, false, at)) => {
                self.collect_masked_signals();
                if let Some((_, vectors)) = &self.msix {
                    vectors.read_pba(at, data);
                }
            }
            None => self.function.region_read(bar as u32, offset, data),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_access(bar, offset) {
            Some((vectors, true, at)) => {
                vectors.write_table(at, data);
                self.sync_msix();
            }
            Some((_, false, _)) => {}
            None => self.function.region_write(bar as u32, offset, data),
        }
    }

    fn bar_moved(&mut self, bar: usize, _old: Option<u64>, new: Option<u64>) {
        if self.stopped {
            return;
        }
        // The device must decode what the guest's command register says before its pages are
        // reachable (vfio-pci faults mmap accesses while memory decode is off).
        let command = self.config.shadow().command().to_le_bytes();
        self.config.write(COMMAND, &command);
        let Some(region) = self.bars.get_mut(bar).and_then(Option::as_mut) else {
            return;
        };
        for window in &mut region.windows {
            if window.mapped_at.take().is_some() {
                if let Err(e) = Self::set_slot(&self.vm, window, None) {
                    tracing::warn!("{}: removing BAR {bar} slot: {e}", self.name);
                }
            }
            let Some(base) = new else { continue };
            let gpa = base + window.offset;
            match Self::set_slot(&self.vm, window, Some(gpa)) {
                Ok(()) => window.mapped_at = Some(gpa),
                Err(e) => tracing::warn!("{}: BAR {bar} window at {gpa:#x}: {e}", self.name),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trapped_msix_pages_are_cut_out_of_the_direct_windows() {
        let cap = MsixCapability {
            vectors: 2,
            table_bar: 0,
            table_offset: 0x2000,
            pba_bar: 0,
            pba_offset: 0x3000,
        };

        let pages = trapped_pages(&cap);
        let holes: Vec<(u64, u64)> = pages.iter().map(|p| (p.1, p.2)).collect();
        let windows = subtract_ranges(0, 0x4000, &holes);

        assert_eq!(pages, vec![(0, 0x2000, 0x3000), (0, 0x3000, 0x4000)]);
        assert_eq!(windows, vec![(0, 0x2000)]);
    }

    #[test]
    fn a_table_mid_bar_leaves_windows_on_both_sides() {
        let windows = subtract_ranges(0, 0x10000, &[(0x4000, 0x5000)]);

        assert_eq!(windows, vec![(0, 0x4000), (0x5000, 0x10000)]);
    }
}
