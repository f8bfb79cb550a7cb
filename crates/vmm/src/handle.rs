//! [`VmHandle`]: what code outside the vCPU threads (the control API, a signal thread) may do
//! to a running VM — read its state, configuration and device counters, pause and resume its
//! vCPUs, shut it down — without reaching into `machine::run`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kvm_ioctls::VmFd;
use sluice_pci::PciRoot;
use sluice_virtio::DeviceMetrics;

use crate::machine::VmConfig;
use crate::memory::GuestRam;
use crate::vcpu::{PauseError, RunControl, VmOutcome};

/// How long a pause may take to park every vCPU.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the parked vCPUs may take to read their state for a snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Being built: devices, memory, boot; no vCPU runs yet.
    Created,
    Running,
    /// Every vCPU parked; devices keep their state.
    Paused,
    /// An outcome was decided; the VM is stopping or stopped.
    Shutdown,
}

/// Why [`VmHandle`] refused an action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    #[error("the VM is {0:?}, not running")]
    NotRunning(VmState),
    #[error("the VM is not paused")]
    NotPaused,
    #[error("cannot pause: {0}")]
    Pause(#[from] PauseError),
    #[error("cannot snapshot: {0}")]
    Snapshot(String),
    #[error("migration failed: {0}")]
    Migration(String),
}

/// What a snapshot reads from a built VM.
#[derive(Clone)]
pub(crate) struct MachineParts {
    pub vm: Arc<VmFd>,
    pub ram: GuestRam,
    pub pci: Arc<PciRoot>,
    pub platform: crate::platform::PlatformDevices,
}

/// A running (or starting, or ended) VM as seen from outside its threads.
pub struct VmHandle {
    control: Arc<RunControl>,
    config: VmConfig,
    /// Shared with the hot-plug controller, which adds and removes devices' counters.
    devices: Arc<Mutex<Vec<Arc<DeviceMetrics>>>>,
    /// PCI hot-plug (set once the devices are attached).
    hotplug: Mutex<Option<Arc<crate::hotplug::Hotplug>>>,
    /// The disks behind the I/O scheduler (boot-time ones, then hot-plugged ones).
    qos: Arc<crate::qos::QosDisks>,
    started: AtomicBool,
    /// The VM and its RAM, for snapshots (set once the VM exists).
    machine: Mutex<Option<MachineParts>>,
    /// The snapshot this VM starts from instead of booting (`sluice run --restore`).
    restore_from: Option<PathBuf>,
    /// The migration stream this VM starts from (`sluice run --migrate-from`).
    incoming: Mutex<Option<crate::migration::Incoming>>,
}

impl VmHandle {
    pub fn new(config: VmConfig) -> Arc<Self> {
        Self::build(config, None)
    }

    /// A VM that resumes from the snapshot in `dir` (`config` gives the same shape).
    pub fn restoring(config: VmConfig, dir: PathBuf) -> Arc<Self> {
        Self::build(config, Some(dir))
    }

    fn build(config: VmConfig, restore_from: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            control: Arc::new(RunControl::default()),
            config,
            devices: Arc::new(Mutex::new(Vec::new())),
            hotplug: Mutex::new(None),
            qos: Arc::default(),
            started: AtomicBool::new(false),
            machine: Mutex::new(None),
            restore_from,
            incoming: Mutex::new(None),
        })
    }

    /// A VM that resumes from an accepted migration stream (`config` gives the shape its
    /// `Hello` announced).
    pub fn migrating_in(config: VmConfig, incoming: crate::migration::Incoming) -> Arc<Self> {
        let handle = Self::build(config, None);
        *handle
            .incoming
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(incoming);
        handle
    }

    pub(crate) fn take_incoming(&self) -> Option<crate::migration::Incoming> {
        self.incoming
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Live-migrates the running VM to `url` (see crate::migration); on success the VM has
    /// ended here (outcome `Migrated`), on failure it runs on here.
    pub fn send_migration(
        &self,
        url: &str,
    ) -> Result<crate::migration::MigrationReport, HandleError> {
        let state = self.state();
        if state != VmState::Running {
            return Err(HandleError::NotRunning(state));
        }
        if let Some(why) = self.hotplug().and_then(|h| h.migration_blocker()) {
            return Err(HandleError::Migration(why));
        }
        if let Some(device) = self.device_without_migration() {
            return Err(HandleError::Migration(format!(
                "{device} cannot be migrated (virtio-blk on an image or a logging vhost-user \
                 backend, NVMe, virtio-net, the e1000, virtio-rng and the TPM can)"
            )));
        }
        let parts = self.machine_parts().ok_or(HandleError::NotRunning(state))?;
        crate::migration::send(self, &parts, url).map_err(|e| HandleError::Migration(e.to_string()))
    }

    /// The first configured device a migration cannot carry: what a snapshot cannot, and
    /// nothing whose guest-memory writes the dirty log misses (see sluice_dma::dirty). Unlike
    /// a snapshot, a VM whose devices changed since boot may go: the destination is started
    /// with the source's current devices and its restore checks them (`PciRoot::
    /// restore_states`); assigned functions are judged by what the VM holds now
    /// (`Hotplug::migration_blocker`), so one removed before the migration does not refuse it.
    fn device_without_migration(&self) -> Option<&'static str> {
        let c = &self.config;
        [
            (c.iommu.is_some(), "the virtual IOMMU"),
            (c.test_device, "the PCI test device"),
        ]
        .into_iter()
        .find_map(|(present, what)| present.then_some(what))
    }

    pub(crate) fn machine_parts(&self) -> Option<MachineParts> {
        self.machine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Captures the paused VM's state: vCPUs (read by their parked threads), in-kernel
    /// irqchip and clock, PCI functions (quiescing virtio queues), platform devices.
    pub(crate) fn capture_state(
        &self,
        parts: &MachineParts,
    ) -> Result<crate::snapshot::MachineState, String> {
        let fail = |e: &dyn std::fmt::Display| e.to_string();
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| fail(&e))?;
        let msrs = Arc::new(crate::vcpu::state::saveable_msrs(&kvm).map_err(|e| fail(&e))?);
        let vcpus =
            self.control
                .capture_vcpus(usize::from(self.config.cpus), msrs, SNAPSHOT_TIMEOUT)?;
        let irqchip = crate::snapshot::IrqchipState::capture(&parts.vm).map_err(|e| fail(&e))?;
        let devices = parts.pci.save_states()?;
        Ok(crate::snapshot::MachineState {
            cpus: self.config.cpus,
            memory: self.config.memory,
            vcpus,
            irqchip,
            devices,
            platform: Some(parts.platform.save()?),
            memory_checksum: 0,
        })
    }

    pub fn restore_source(&self) -> Option<&Path> {
        self.restore_from.as_deref()
    }

    /// Writes a snapshot of the paused VM into `dir` (see crate::snapshot). A VM with devices
    /// whose state cannot be saved yet is refused.
    pub fn snapshot(&self, dir: &Path) -> Result<(), HandleError> {
        let state = self.state();
        if state != VmState::Paused {
            return Err(HandleError::NotPaused);
        }
        if let Some(device) = self.device_without_snapshot() {
            return Err(HandleError::Snapshot(format!(
                "{device} cannot be saved in a snapshot yet (virtio-blk on an image or a \
                 vhost-user backend, NVMe, virtio-net, the e1000, virtio-rng and the TPM can)"
            )));
        }
        let Some(parts) = self.machine_parts() else {
            return Err(HandleError::NotRunning(state));
        };
        let machine_state = self.capture_state(&parts).map_err(HandleError::Snapshot)?;
        crate::snapshot::write(dir, machine_state, &parts.ram)
            .map_err(|e| HandleError::Snapshot(e.to_string()))
    }

    /// The first configured device a snapshot cannot carry yet, if any.
    fn device_without_snapshot(&self) -> Option<&'static str> {
        let c = &self.config;
        let hotplugged = self.hotplug().is_some_and(|h| h.changed());
        [
            (
                hotplugged,
                "a device hot-plugged or removed since boot (the VM no longer has its boot \
                 configuration)",
            ),
            (!c.vfio.is_empty(), "an assigned device"),
            (c.iommu.is_some(), "the virtual IOMMU"),
            (c.test_device, "the PCI test device"),
        ]
        .into_iter()
        .find_map(|(present, what)| present.then_some(what))
    }

    pub(crate) fn attach_machine(&self, parts: MachineParts) {
        *self.machine.lock().unwrap_or_else(PoisonError::into_inner) = Some(parts);
    }

    /// The run control the VM's vCPUs follow.
    pub fn control(&self) -> &Arc<RunControl> {
        &self.control
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn state(&self) -> VmState {
        if self.control.is_stopping() {
            VmState::Shutdown
        } else if !self.started.load(Ordering::Acquire) {
            VmState::Created
        } else if self.control.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// The devices' counters (empty until the devices are attached).
    pub fn device_metrics(&self) -> Vec<Arc<DeviceMetrics>> {
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn pause(&self) -> Result<(), HandleError> {
        match self.state() {
            VmState::Running => Ok(self.control.pause(PAUSE_TIMEOUT)?),
            state => Err(HandleError::NotRunning(state)),
        }
    }

    pub fn resume(&self) -> Result<(), HandleError> {
        match self.state() {
            VmState::Paused => {
                // Devices stopped by a snapshot take up their work first.
                if let Some(parts) = self.machine_parts() {
                    parts.pci.resume_after_save();
                }
                self.control.resume();
                Ok(())
            }
            _ => Err(HandleError::NotPaused),
        }
    }

    /// Ends the VM (as if the guest powered off; the report says who did it).
    pub fn shutdown(&self) {
        self.control.finish(VmOutcome::Shutdown);
    }

    /// `machine::run` attached the devices and is about to start the vCPUs.
    pub(crate) fn devices_attached(&self, metrics: &[Arc<DeviceMetrics>]) {
        *self.devices.lock().unwrap_or_else(PoisonError::into_inner) = metrics.to_vec();
    }

    /// The disks behind the I/O scheduler, by API id (`vm.qos`).
    pub fn qos_disks(&self) -> &Arc<crate::qos::QosDisks> {
        &self.qos
    }

    /// The counters list the hot-plug controller keeps in step with the devices.
    pub(crate) fn metrics_list(&self) -> Arc<Mutex<Vec<Arc<DeviceMetrics>>>> {
        self.devices.clone()
    }

    pub(crate) fn attach_hotplug(&self, hotplug: Arc<crate::hotplug::Hotplug>) {
        *self.hotplug.lock().unwrap_or_else(PoisonError::into_inner) = Some(hotplug);
    }

    /// The VM's hot-plug controller, once its devices are attached.
    pub fn hotplug(&self) -> Option<Arc<crate::hotplug::Hotplug>> {
        self.hotplug
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs a hot-plug action on a running or paused VM.
    pub fn with_hotplug<T>(
        &self,
        action: impl FnOnce(&crate::hotplug::Hotplug) -> Result<T, crate::hotplug::HotplugError>,
    ) -> Result<T, crate::hotplug::HotplugError> {
        let state = self.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(crate::hotplug::HotplugError::Conflict(format!(
                "the VM is {state:?}: devices are plugged into a running or paused VM"
            )));
        }
        let hotplug = self.hotplug().ok_or_else(|| {
            crate::hotplug::HotplugError::Conflict("the VM's devices are not attached yet".into())
        })?;
        action(&hotplug)
    }

    pub(crate) fn vcpus_started(&self) {
        self.started.store(true, Ordering::Release);
    }
}
