//! [`MsixVectors`]: a device's [`MsixTable`] plus one exitless route per vector, shared between
//! the guest's register accesses (under the device lock) and the threads that signal vectors
//! (queue workers, completion threads) without that lock. Any `PciDevice` with MSI-X (virtio,
//! NVMe, e1000, VFIO) uses it the same way:
//!
//! * the guest's table/PBA accesses go to [`MsixVectors::read_table`] / [`MsixVectors::write_table`]
//!   / [`MsixVectors::read_pba`], its config writes to [`MsixVectors::config_written`];
//! * the device signals with [`MsixVectors::signal`].
//!
//! Delivery: when the VMM gave an [`MsiRouter`], each vector has an [`MsiRoute`] (a KVM GSI
//! route + irqfd). While a vector is deliverable (MSI-X enabled, neither function nor vector
//! masked) a signal is one eventfd write, no lock. Otherwise it goes through
//! [`MsixTable::trigger`], which records it pending while masked and sends it on unmask. A route
//! is reprogrammed (a GSI table rewrite) only when the guest changed the vector's message. A
//! route update or a mask racing a signal that already chose the route can let one extra
//! interrupt through; MSI-X drivers tolerate that (the message is not lost either way).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sluice_bus::irq::{MsiMessage, MsiRoute, MsiRouter};

use crate::config::ConfigSpace;
use crate::msix::{MsixCapability, MsixDelivery, MsixError, MsixTable};

/// Offset of message control inside the MSI-X capability.
const MESSAGE_CONTROL: usize = 2;

/// What [`MsixVectors::signal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixSignal {
    /// Sent (through the route or the sink), or held pending while masked: the guest will see it.
    Delivered,
    /// MSI-X is disabled (or the vector does not exist): the device must use INTx instead.
    NotDelivered,
}

/// The MSI-X table with per-vector irqfd routes and the fast-path deliverability flags.
pub struct MsixVectors {
    table: Mutex<MsixTable>,
    /// One route per vector, or empty without a router.
    routes: Vec<Arc<dyn MsiRoute>>,
    /// The message each route was last pointed at (only changed messages are reprogrammed).
    routed: Mutex<Vec<Option<MsiMessage>>>,
    /// Per vector: MSI-X enabled and neither function nor vector masked.
    deliverable: Vec<AtomicBool>,
    /// MSI-X enable, readable without the table lock.
    enabled: AtomicBool,
}

impl std::fmt::Debug for MsixVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixVectors")
            .field("table", &*self.table())
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl MsixVectors {
    /// Wraps `table`; with a `router`, allocates one route per vector.
    pub fn new(table: MsixTable, router: Option<&dyn MsiRouter>) -> io::Result<Self> {
        let vectors = usize::from(table.vectors());
        let routes = match router {
            Some(router) => (0..vectors)
                .map(|_| router.allocate())
                .collect::<io::Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok(Self {
            table: Mutex::new(table),
            routed: Mutex::new(vec![None; routes.len()]),
            routes,
            deliverable: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
            enabled: AtomicBool::new(false),
        })
    }

    /// The table (a poisoned lock is taken over: the table stays consistent per access).
    pub fn table(&self) -> MutexGuard<'_, MsixTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn vectors(&self) -> u16 {
        // The deliverable flags were sized from the table (at most 2048 vectors).
        self.deliverable.len() as u16
    }

    /// The eventfd of `vector`'s irqfd route (see [`MsiRoute::trigger_fd`]), if routed that way.
    pub fn route_fd(&self, vector: u16) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.routes.get(usize::from(vector))?.trigger_fd()
    }

    /// Whether the guest enabled MSI-X (a function using MSI-X must not assert INTx).
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Guest read of the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        self.table().read_table(offset, data);
    }

    /// Guest write of the table: the vector's route follows its new message or mask.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        self.table().write_table(offset, data);
        self.refresh();
    }

    /// Guest read of the PBA.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        self.table().read_pba(offset, data);
    }

    /// Guest write of the PBA (read-only: dropped).
    pub fn write_pba(&self, offset: u64, data: &[u8]) {
        self.table().write_pba(offset, data);
    }

    /// Applies a message control value (enable, function mask).
    pub fn set_message_control(&self, control: u16) {
        self.table().set_message_control(control);
        self.refresh();
    }

    /// After a guest config write of `len` bytes at `offset`: if it touched message control of
    /// the capability at `cap_offset`, applies it. Returns whether it did.
    pub fn config_written(
        &self,
        config: &ConfigSpace,
        cap_offset: usize,
        offset: usize,
        len: usize,
    ) -> bool {
        let control = cap_offset + MESSAGE_CONTROL;
        let touched = offset < control + 2 && control < offset.saturating_add(len);
        if touched {
            self.set_message_control(MsixCapability::message_control(config, cap_offset));
        }
        touched
    }

    /// The table's state for a snapshot.
    pub fn save(&self) -> crate::msix::MsixTableState {
        self.table().save()
    }

    /// Puts back a saved table and points the routes at its messages.
    pub fn restore(&self, state: &crate::msix::MsixTableState) -> Result<(), MsixError> {
        self.table().restore(state)?;
        self.refresh();
        Ok(())
    }

    /// Back to the reset state (function reset): all vectors masked, MSI-X off.
    pub fn reset(&self) {
        self.table().reset();
        self.refresh();
    }

    /// Re-derives the fast-path flags (and route messages) from the table.
    pub fn refresh(&self) {
        let table = self.table();
        let mut routed = self.routed.lock().unwrap_or_else(PoisonError::into_inner);
        let open = table.is_enabled() && !table.is_function_masked();
        self.enabled.store(table.is_enabled(), Ordering::Release);
        for (vector, flag) in self.deliverable.iter().enumerate() {
            // At most 2048 vectors.
            let v = vector as u16;
            let mut deliverable = open && !table.is_vector_masked(v);
            if deliverable {
                deliverable = self.point_route(vector, table.message(v), &mut routed);
            }
            flag.store(deliverable, Ordering::Release);
        }
    }

    /// Points `vector`'s route at `message` if it changed; false if the route cannot be used
    /// (the slow path through the table then delivers).
    fn point_route(
        &self,
        vector: usize,
        message: Option<MsiMessage>,
        routed: &mut [Option<MsiMessage>],
    ) -> bool {
        let (Some(route), Some(message), Some(last)) =
            (self.routes.get(vector), message, routed.get_mut(vector))
        else {
            return true;
        };
        if *last == Some(message) {
            return true;
        }
        match route.update(message) {
            Ok(()) => {
                *last = Some(message);
                true
            }
            Err(e) => {
                tracing::warn!("MSI-X: route update for vector {vector} failed: {e}");
                *last = None;
                false
            }
        }
    }

    /// Signals `vector`: through its route when deliverable, else through the table (sent, or
    /// pending while masked).
    pub fn signal(&self, vector: u16) -> MsixSignal {
        let v = usize::from(vector);
        let fast = self
            .deliverable
            .get(v)
            .is_some_and(|flag| flag.load(Ordering::Acquire));
        if let (true, Some(route)) = (fast, self.routes.get(v)) {
            if let Err(e) = route.trigger() {
                tracing::warn!("MSI-X: route for vector {vector} failed: {e}");
            }
            return MsixSignal::Delivered;
        }
        match self.table().trigger(vector) {
            Ok(MsixDelivery::Sent | MsixDelivery::Pending) => MsixSignal::Delivered,
            Ok(MsixDelivery::Disabled) => MsixSignal::NotDelivered,
            Err(MsixError::Sink(e)) => {
                tracing::warn!("MSI-X: vector {vector} delivery failed: {e}");
                MsixSignal::Delivered
            }
            Err(_) => MsixSignal::NotDelivered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msix::{MSIX_ENABLE, MSIX_FUNCTION_MASK, MSIX_TABLE_ENTRY_SIZE};
    use crate::testing::{RecordingRouter, RecordingSink};

    fn vectors(count: u16) -> (MsixVectors, Arc<RecordingRouter>, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        let router = Arc::new(RecordingRouter::default());
        let table = MsixTable::new(count, sink.clone()).unwrap();
        let vectors = MsixVectors::new(table, Some(router.as_ref())).unwrap();
        (vectors, router, sink)
    }

    fn program(vectors: &MsixVectors, vector: u64, data: u32, masked: bool) {
        let base = vector * MSIX_TABLE_ENTRY_SIZE;
        vectors.write_table(base, &0xfee0_0000u64.to_le_bytes());
        vectors.write_table(base + 8, &data.to_le_bytes());
        vectors.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn message(data: u32) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000,
            data,
        }
    }

    #[test]
    fn one_route_per_vector_is_allocated() {
        let (vectors, router, _) = vectors(3);

        assert_eq!(vectors.vectors(), 3);
        assert_eq!(router.allocated(), 3);
    }

    #[test]
    fn an_unmasked_enabled_vector_goes_through_its_route_only() {
        let (vectors, router, sink) = vectors(2);
        vectors.set_message_control(MSIX_ENABLE);
        program(&vectors, 1, 0x41, false);

        assert_eq!(vectors.signal(1), MsixSignal::Delivered);

        let route = router.route(1);
        assert_eq!(route.update_list(), vec![message(0x41)]);
        assert_eq!(route.trigger_count(), 1);
        assert!(sink.sent().is_empty(), "no slow-path message");
    }

    #[test]
    fn the_route_follows_a_rewritten_entry_and_is_not_reprogrammed_needlessly() {
        let (vectors, router, _) = vectors(1);
        vectors.set_message_control(MSIX_ENABLE);
        program(&vectors, 0, 0x41, false);
        // Rewriting the same message, and toggling the function mask, reprograms nothing.
        program(&vectors, 0, 0x41, false);
        vectors.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        vectors.set_message_control(MSIX_ENABLE);

        vectors.write_table(8, &0x42u32.to_le_bytes());

        let updates = router.route(0).update_list();
        assert_eq!(updates, vec![message(0x41), message(0x42)]);
    }

    #[test]
    fn masked_vectors_are_held_pending_and_sent_on_unmask() {
        let (vectors, router, sink) = vectors(2);
        vectors.set_message_control(MSIX_ENABLE);
        program(&vectors, 0, 0x30, true);

        assert_eq!(vectors.signal(0), MsixSignal::Delivered);
        assert!(vectors.table().is_pending(0));
        assert_eq!(router.route(0).trigger_count(), 0);

        vectors.write_table(12, &0u32.to_le_bytes());

        assert_eq!(sink.sent(), vec![message(0x30)]);
        assert!(!vectors.table().is_pending(0));
        vectors.signal(0);
        assert_eq!(router.route(0).trigger_count(), 1, "now routed");
    }

    #[test]
    fn disabled_msix_is_not_delivered_so_the_device_falls_back_to_intx() {
        let (vectors, _, sink) = vectors(2);
        program(&vectors, 0, 0x30, false);

        assert!(!vectors.is_enabled());
        assert_eq!(vectors.signal(0), MsixSignal::NotDelivered);
        assert_eq!(
            vectors.signal(7),
            MsixSignal::NotDelivered,
            "no such vector"
        );
        assert!(sink.sent().is_empty());
    }

    #[test]
    fn a_failed_route_update_falls_back_to_the_sink() {
        let (vectors, router, sink) = vectors(1);
        router.route(0).fail_updates.store(true, Ordering::Relaxed);
        vectors.set_message_control(MSIX_ENABLE);
        program(&vectors, 0, 0x55, false);

        assert_eq!(vectors.signal(0), MsixSignal::Delivered);

        assert_eq!(sink.sent(), vec![message(0x55)]);
        assert_eq!(router.route(0).trigger_count(), 0);
    }

    #[test]
    fn config_writes_reach_message_control_only_when_they_overlap_it() {
        let (vectors, _, _) = vectors(1);
        let mut config = ConfigSpace::new(&crate::PciIds::default());
        config.add_bar(0, crate::BarSpec::mem32(0x1000)).unwrap();
        let cap = MsixCapability {
            vectors: 1,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x800,
        }
        .install(&mut config)
        .unwrap();
        config.write(cap + 2, &MSIX_ENABLE.to_le_bytes());

        assert!(!vectors.config_written(&config, cap, cap + 4, 4));
        assert!(!vectors.is_enabled());
        assert!(vectors.config_written(&config, cap, cap, 4));
        assert!(vectors.is_enabled());

        vectors.reset();
        assert!(!vectors.is_enabled());
    }
}
