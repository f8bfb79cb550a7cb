//! The unit's interrupt remapping half (offered with [`Vtd::with_interrupt_remapping`]): IRTA,
//! GCMD.SIRTP/IRE/CFI with their GSTS bits, interrupt entry cache invalidation, the translation
//! of interrupt requests and its fault recording. The table and entry formats are in
//! [`crate::intremap`].
//!
//! The unit caches no IRTEs: each translation reads the entry from guest memory. What is cached
//! are the translated messages its clients (a device's MSI routes, the IOAPIC's pins) hand to
//! KVM; those are the "interrupt entry cache", and every event that may change a translation
//! (an IEC invalidation, SIRTP, IRE or CFI toggled) asks every client to translate again, after
//! the register lock is released (a client's re-translation takes that lock).

use std::sync::{PoisonError, Weak};

use sluice_bus::irq::MsiMessage;
use sluice_dma::RequesterId;

use super::{FaultRecord, State, Vtd, FRCD_HI_F};
use crate::intremap::{
    self, InterruptTable, IrFault, RemapClient, RemapSettings, GSTS_CFIS, GSTS_IRES, GSTS_IRTPS,
};
use crate::regs::{GCMD_CFI, GCMD_IRE, GCMD_SIRTP};

/// Successful IRTE lookups (route programming and direct sends).
pub(super) const INTERRUPT_REMAPS: usize = 7;
/// Interrupts delivered through a remapped route or sink.
pub(super) const INTERRUPTS_REMAPPED: usize = 8;
/// Interrupt requests refused (recorded or not).
pub(super) const INTERRUPT_FAULTS: usize = 9;
pub(super) const INTERRUPT_ENTRY_INVALIDATIONS: usize = 10;

impl FaultRecord {
    /// An interrupt-remapping fault: bits 63:48 of the low quadword hold the interrupt index;
    /// the type bit is clear (a write request).
    fn interrupt(source: RequesterId, fault: &IrFault) -> Self {
        Self {
            lo: u64::from(fault.index) << 48,
            hi: FRCD_HI_F | (u64::from(fault.reason as u8) << 32) | u64::from(source),
        }
    }
}

impl Vtd {
    /// Whether the unit offers interrupt remapping (ECAP.IR).
    pub fn offers_interrupt_remapping(&self) -> bool {
        self.shared.interrupt_remapping
    }

    /// Registers `client` to translate its interrupts again whenever a translation may have
    /// changed. Dropped clients are forgotten.
    pub fn add_remap_client(&self, client: Weak<dyn RemapClient>) {
        let mut clients = self
            .shared
            .remap_clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        clients.retain(|c| c.strong_count() > 0);
        clients.push(client);
    }

    /// Translates `message` from `requester` without recording a fault: what a route is
    /// programmed with. A refusal here is recorded only when an interrupt really arrives
    /// ([`Vtd::remap_interrupt`]); a stale message of a vector the guest already tore down
    /// must not fault.
    pub fn translate_interrupt(
        &self,
        requester: RequesterId,
        message: MsiMessage,
    ) -> Result<MsiMessage, IrFault> {
        let settings = self.shared.lock().remap_settings(self.shared.haw);
        let translated = intremap::remap(&self.shared.memory, &settings, requester, message);
        if translated.is_ok() && settings.enabled {
            self.shared.metrics.count(INTERRUPT_REMAPS, 1);
        }
        translated
    }

    /// Translates an interrupt request that is being delivered now: the message for KVM, or
    /// `None` after recording the fault (unless the IRTE's FPD suppresses it).
    pub fn remap_interrupt(
        &self,
        requester: RequesterId,
        message: MsiMessage,
    ) -> Option<MsiMessage> {
        let mut state = self.shared.lock();
        let settings = state.remap_settings(self.shared.haw);
        match intremap::remap(&self.shared.memory, &settings, requester, message) {
            Ok(translated) => {
                if settings.enabled {
                    self.shared.metrics.count(INTERRUPT_REMAPS, 1);
                    self.shared.metrics.count(INTERRUPTS_REMAPPED, 1);
                }
                Some(translated)
            }
            Err(fault) => {
                self.interrupt_fault(&mut state, requester, &fault);
                None
            }
        }
    }

    /// Counts one interrupt delivered through a route translated earlier.
    pub fn count_remapped_delivery(&self) {
        self.shared.metrics.count(INTERRUPTS_REMAPPED, 1);
    }

    fn interrupt_fault(&self, state: &mut State, requester: RequesterId, fault: &IrFault) {
        tracing::debug!(
            "vt-d: interrupt fault {:?} for {requester:#06x}, index {}",
            fault.reason,
            fault.index
        );
        self.shared.metrics.count(INTERRUPT_FAULTS, 1);
        if fault.suppressed {
            self.shared.metrics.count(super::FAULTS_NOT_RECORDED, 1);
        } else {
            self.store_record(state, FaultRecord::interrupt(requester, fault));
        }
    }

    /// GCMD's interrupt-remapping commands (ignored when not offered: their status bits stay
    /// clear).
    pub(super) fn interrupt_commands(&self, state: &mut State, value: u32) {
        if !self.shared.interrupt_remapping {
            return;
        }
        if value & GCMD_SIRTP != 0 {
            state.interrupt_table = InterruptTable::from_irta(state.irta);
            state.gsts |= GSTS_IRTPS;
            state.remap_changed = true;
        }
        for (command, status, what) in [
            (GCMD_IRE, GSTS_IRES, "interrupt remapping"),
            (GCMD_CFI, GSTS_CFIS, "compatibility-format interrupts"),
        ] {
            if (value & command != 0) != (state.gsts & status != 0) {
                state.gsts ^= status;
                state.remap_changed = true;
                let now = if state.gsts & status != 0 {
                    "enabled"
                } else {
                    "disabled"
                };
                tracing::info!("vt-d: {what} {now}");
            }
        }
    }

    /// An interrupt entry cache descriptor; false (an invalid descriptor) when interrupt
    /// remapping is not offered.
    pub(super) fn invalidate_interrupt_entries(
        &self,
        state: &mut State,
        scope: Option<(u16, u8)>,
    ) -> bool {
        if !self.shared.interrupt_remapping {
            return false;
        }
        tracing::trace!("vt-d: interrupt entry cache invalidation {scope:?}");
        self.shared.metrics.count(INTERRUPT_ENTRY_INVALIDATIONS, 1);
        // Index-selective or not, every client translates again: the unit does not track which
        // index each client uses, and translating more than asked is always allowed.
        state.remap_changed = true;
        true
    }

    /// After a register write, with the register lock released: if a translation may have
    /// changed, every client translates again.
    pub(super) fn notify_remap_clients(&self) {
        let changed = std::mem::take(&mut self.shared.lock().remap_changed);
        if !changed {
            return;
        }
        let clients: Vec<_> = self
            .shared
            .remap_clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for client in clients {
            client.remapping_changed();
        }
    }
}

impl State {
    fn remap_settings(&self, haw: u32) -> RemapSettings {
        RemapSettings {
            enabled: self.gsts & GSTS_IRES != 0,
            compatibility_allowed: self.gsts & GSTS_CFIS != 0,
            table: self.interrupt_table,
            haw,
        }
    }
}
