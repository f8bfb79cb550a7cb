//! A virtio-pci function's state for a snapshot: what the driver programmed (config space,
//! MSI-X table, feature selection and acceptance, queue registers and vectors, status), for an
//! active device where each ring's device side stands, and the model's own state
//! ([`VirtioDevice::save_state`](crate::VirtioDevice::save_state): virtio-net's queue pairs,
//! RX mode and the frames it read from its tap but could not deliver yet). Saving quiesces the
//! queues — requests already taken complete and are answered first — and leaves them stopped
//! until the VM runs on here ([`VirtioPciDevice::resume_saved`], at the same positions): a
//! device that takes work from outside the guest (a NIC's receive side) must not move on after
//! its state was captured, or what it took would be in neither copy of the VM. Saving again
//! while stopped returns the same positions. A restored device is activated at those
//! positions once the vCPUs run (`PciRoot::resume_after_save` after they started: an interrupt
//! raised before their LAPICs are restored would be lost), chains the driver published
//! meanwhile are found by the first pass; the model is then told it was restored (a NIC asks
//! its driver to announce itself, through a configuration interrupt).
//!
//! Not carried: the ISR bits of a device on INTx (drivers that use MSI-X, as Linux and the guest
//! kit do, never look at them). A device whose rings run in another process (vhost-user) is
//! quiesced through its `ExternalQueues::quiesce` (the backend stops its rings, requests in
//! flight completed, and says where they stand) and refused if it cannot.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use sluice_pci::MsixTableState;

use super::common::QueueRegisters;
use super::{VirtioPciDevice, STATUS_DRIVER_OK};
use crate::ring::QueuePosition;

#[derive(Serialize, Deserialize)]
struct SavedTransport {
    config: Vec<u8>,
    msix: MsixTableState,
    /// The features the function offered: a restore target must offer the same.
    offered: u64,
    accepted: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    queues: Vec<QueueRegisters>,
    status: u8,
    config_generation: u8,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    /// The active rings' device-side positions, by queue index.
    positions: Vec<(u16, QueuePosition)>,
    /// The model's own state (`VirtioDevice::save_state`).
    #[serde(default)]
    device: Option<serde_json::Value>,
}

impl VirtioPciDevice {
    /// See the module documentation.
    pub(super) fn save(&mut self) -> Result<serde_json::Value, String> {
        let positions = match (self.active.take(), self.quiesced.take()) {
            (None, Some(positions)) => positions,
            (None, None) => Vec::new(),
            (Some(active), _) => match active.quiesce() {
                Ok(queues) => queues
                    .iter()
                    .map(|(index, queue)| (*index, queue.position()))
                    .collect(),
                Err(active) => match active.quiesce_external(self.device.as_mut()) {
                    Ok(positions) => positions,
                    Err((active, why)) => {
                        self.active = Some(active);
                        return Err(why);
                    }
                },
            },
        };
        let saved = SavedTransport {
            config: self.config.bytes().to_vec(),
            msix: self.state.msix.save(),
            offered: self.common.offered,
            accepted: self.common.accepted,
            device_feature_select: self.common.device_feature_select,
            driver_feature_select: self.common.driver_feature_select,
            queue_select: self.common.queue_select,
            queues: self.common.queues.clone(),
            status: self.device_status(),
            config_generation: self.state.config_generation.load(Ordering::Acquire),
            config_vector: self.state.config_vector.load(Ordering::Acquire),
            queue_vectors: self
                .state
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect(),
            device: None,
            positions,
        };
        if saved.status & STATUS_DRIVER_OK != 0 {
            // Taken up again when the VM runs on here.
            self.quiesced = Some(saved.positions.clone());
        }
        let saved = SavedTransport {
            device: self.device.save_state()?,
            ..saved
        };
        serde_json::to_value(saved).map_err(|e| e.to_string())
    }

    /// The VM runs on after a save (the rings stopped by it run again where they stopped) or
    /// after a restore (a config change the model made is signalled).
    pub(super) fn resume_saved(&mut self) {
        let Some(positions) = self.quiesced.take() else {
            return;
        };
        self.activate_at(&positions);
        let restored = std::mem::take(&mut self.restored_pending);
        if restored && self.active.is_some() && self.device.restored() {
            self.state.config_generation.fetch_add(1, Ordering::AcqRel);
            self.state.signal_config();
        }
    }

    /// Puts back what [`VirtioPciDevice::save`] returned, on a function built the same way.
    pub(super) fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let saved = SavedTransport::deserialize(state).map_err(|e| e.to_string())?;
        let same_shape = saved.offered == self.common.offered
            && saved.queues.len() == self.common.queues.len()
            && saved.queue_vectors.len() == self.state.queue_vectors.len()
            && saved
                .queues
                .iter()
                .zip(&self.common.queues)
                .all(|(saved, own)| saved.max_size == own.max_size);
        if !same_shape {
            return Err("the saved function offered other features or queues".into());
        }
        if self.active.is_some() {
            return Err("the function is already active".into());
        }
        self.config
            .restore_bytes(&saved.config)
            .map_err(|e| e.to_string())?;
        self.state
            .msix
            .restore(&saved.msix)
            .map_err(|e| e.to_string())?;
        self.state.intx.config_written(&self.config);
        self.common.accepted = saved.accepted;
        self.common.device_feature_select = saved.device_feature_select;
        self.common.driver_feature_select = saved.driver_feature_select;
        self.common.queue_select = saved.queue_select;
        self.common.queues = saved.queues;
        self.state
            .config_generation
            .store(saved.config_generation, Ordering::Release);
        let config_vector = self.state.checked_vector(saved.config_vector);
        self.state
            .config_vector
            .store(config_vector, Ordering::Release);
        for (own, &vector) in self.state.queue_vectors.iter().zip(&saved.queue_vectors) {
            own.store(self.state.checked_vector(vector), Ordering::Release);
        }
        if let Some(device) = &saved.device {
            self.device.restore_state(device)?;
        }
        self.state.status.store(saved.status, Ordering::Release);
        if saved.status & STATUS_DRIVER_OK != 0 {
            // Activated once the vCPUs run (`resume_after_save`): a queue that interrupted
            // before their LAPICs are restored would lose the interrupt (KVM_SET_LAPIC
            // overwrites it), and with EVENT_IDX never interrupt again.
            self.quiesced = Some(saved.positions);
            self.restored_pending = true;
        }
        Ok(())
    }
}
