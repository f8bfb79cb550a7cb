//! The NVMe function in a snapshot (`PciDevice::save_state`): its PCI config space and MSI-X
//! table, the controller registers (CC, CSTS, AQA, ASQ, ACQ, INTMS), the features kept outside
//! the controller (volatile write cache, interrupt coalescing and the per-vector coalescing
//! disable), the shadow doorbell buffers, and the enabled controller's own state
//! ([`super::controller::SavedController`]: queues, held Async Event Requests, features),
//! taken after its I/O workers quiesced. Restoring needs a function built the same way (same
//! number of I/O queues); it enables nothing the state does not say and starts the I/O
//! workers of the saved queues. The SMART counters and the power-on clock restart.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use sluice_pci::MsixTableState;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::controller::{Controller, SavedController};
use super::queues::Dbbuf;
use super::registers::{Configuration, CSTS_RDY};
use super::Nvme;

#[derive(Serialize, Deserialize)]
struct SavedNvme {
    config: Vec<u8>,
    msix: MsixTableState,
    /// The function's shape: a restore target must have as many I/O queues.
    max_queues: u16,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    intms: u32,
    write_cache: bool,
    coalescing: u32,
    coalescing_disabled: Vec<bool>,
    /// Doorbell Buffer Config: (shadow, EventIdx).
    dbbuf: Option<(u64, u64)>,
    controller: Option<SavedController>,
}

impl Nvme {
    /// See the module documentation.
    pub(super) fn save(&mut self) -> Result<serde_json::Value, String> {
        let controller = match self.controller.as_mut() {
            Some(controller) => Some(controller.save()?),
            None => None,
        };
        let shared = &self.shared;
        let saved = SavedNvme {
            config: self.config.bytes().to_vec(),
            msix: shared.msix.save(),
            max_queues: self.max_queues,
            cc: self.cc,
            csts: self.csts,
            aqa: self.aqa,
            asq: self.asq,
            acq: self.acq,
            intms: shared.intms.load(Ordering::Acquire),
            write_cache: shared.write_cache.load(Ordering::Relaxed),
            coalescing: shared.coalescing.load(Ordering::Relaxed),
            coalescing_disabled: shared
                .coalescing_disabled
                .iter()
                .map(|cd| cd.load(Ordering::Relaxed))
                .collect(),
            dbbuf: shared.dbbuf().map(|d| (d.shadow, d.event_idx)),
            controller,
        };
        serde_json::to_value(saved).map_err(|e| e.to_string())
    }

    /// Puts back what [`Nvme::save`] returned, on a function built the same way.
    pub(super) fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let saved = SavedNvme::deserialize(state).map_err(|e| e.to_string())?;
        if saved.max_queues != self.max_queues
            || saved.coalescing_disabled.len() != self.shared.coalescing_disabled.len()
        {
            return Err("the saved controller had another number of queues".into());
        }
        if self.controller.is_some() {
            return Err("the controller is already enabled".into());
        }
        self.config
            .restore_bytes(&saved.config)
            .map_err(|e| e.to_string())?;
        self.shared
            .msix
            .restore(&saved.msix)
            .map_err(|e| e.to_string())?;
        self.shared.intx.config_written(&self.config);
        self.shared
            .intx
            .set_msi_active(self.shared.msix.is_enabled());
        let shared = &self.shared;
        shared.intms.store(saved.intms, Ordering::Release);
        shared
            .write_cache
            .store(saved.write_cache, Ordering::Relaxed);
        shared
            .coalescing
            .store(saved.coalescing & 0xffff, Ordering::Relaxed);
        for (own, &cd) in shared
            .coalescing_disabled
            .iter()
            .zip(&saved.coalescing_disabled)
        {
            own.store(cd, Ordering::Relaxed);
        }
        (self.aqa, self.asq, self.acq) = (saved.aqa & 0x0fff_0fff, saved.asq, saved.acq);
        self.cc = saved.cc;
        self.csts = saved.csts;
        let Some(controller) = &saved.controller else {
            return Ok(());
        };
        let cc = Configuration(saved.cc);
        if !cc.enabled() || !cc.valid_for_enable() || saved.csts & CSTS_RDY == 0 {
            return Err("an enabled controller saved without a valid CC.EN".into());
        }
        *shared.dbbuf_slot() = match saved.dbbuf {
            None => None,
            Some((shadow, event_idx)) => Some(self.checked_dbbuf(cc, shadow, event_idx)?),
        };
        let restored = Controller::restore(
            shared.clone(),
            cc,
            controller,
            self.max_queues,
            self.identity.clone(),
            self.doorbell_events.clone(),
        );
        match restored {
            Ok(controller) => {
                self.controller = Some(controller);
                Ok(())
            }
            Err(e) => {
                shared.clear_queues();
                *shared.dbbuf_slot() = None;
                Err(e)
            }
        }
    }

    /// Doorbell Buffer Config's checks, for a saved pair of pages.
    fn checked_dbbuf(
        &self,
        cc: Configuration,
        shadow: u64,
        event_idx: u64,
    ) -> Result<Dbbuf, String> {
        let page = cc.page_size();
        let mem = &self.shared.dma;
        let usable = |addr: u64| {
            addr & (page - 1) == 0
                && mem.check_range(GuestAddress(addr), page as usize, Permissions::ReadWrite)
        };
        if !usable(shadow) || !usable(event_idx) || shadow == event_idx {
            return Err("bad shadow doorbell buffers".into());
        }
        Ok(Dbbuf { shadow, event_idx })
    }
}
