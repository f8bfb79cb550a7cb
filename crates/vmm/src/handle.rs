//! [`VmHandle`]: what code outside the vCPU threads (the control API, a signal thread) may do
//! to a running VM — read its state, configuration and device counters, pause and resume its
//! vCPUs, shut it down — without reaching into `machine::run`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sluice_virtio::DeviceMetrics;

use crate::machine::VmConfig;
use crate::vcpu::{PauseError, RunControl, VmOutcome};

/// How long a pause may take to park every vCPU.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

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
}

/// A running (or starting, or ended) VM as seen from outside its threads.
pub struct VmHandle {
    control: Arc<RunControl>,
    config: VmConfig,
    devices: Mutex<Vec<Arc<DeviceMetrics>>>,
    started: AtomicBool,
}

impl VmHandle {
    pub fn new(config: VmConfig) -> Arc<Self> {
        Arc::new(Self {
            control: Arc::new(RunControl::default()),
            config,
            devices: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
        })
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

    pub(crate) fn vcpus_started(&self) {
        self.started.store(true, Ordering::Release);
    }
}
