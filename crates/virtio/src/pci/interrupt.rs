//! Interrupt state shared between the transport (guest register accesses, under the device
//! lock) and the queue workers (which signal from their own threads), and the
//! [`VirtioInterrupt`] handed to the device at activation.
//!
//! Delivery: a queue's or the config's MSI-X vector goes out through a per-vector
//! [`MsiRoute`] (an irqfd: one eventfd write, no lock) when the transport was given an
//! [`sluice_bus::MsiRouter`] and the vector is currently deliverable (MSI-X enabled, function and
//! vector unmasked). Otherwise it goes through [`MsixTable::trigger`], which records it pending
//! while masked. With no vector assigned (or MSI-X off) only the ISR bit is set: the device has
//! no INTx pin. A route update and the guest masking a vector can race with a worker that
//! already decided to use the route; one extra interrupt is harmless to virtio drivers.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sluice_bus::irq::{MsiMessage, MsiRoute};
use sluice_pci::{MsixDelivery, MsixError, MsixTable, MSIX_TABLE_ENTRY_SIZE};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

use crate::device::VirtioInterrupt;

/// "No vector" in config_msix_vector / queue_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// ISR bit 0: a queue has used buffers.
pub(crate) const ISR_QUEUE: u8 = 1;
/// ISR bit 1: the configuration changed (or the device needs a reset).
pub(crate) const ISR_CONFIG: u8 = 2;
const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
/// Offset of the vector control dword inside an MSI-X table entry.
const VECTOR_CONTROL: u64 = 12;
const VECTOR_MASKED: u32 = 1;

/// What both sides of the transport see.
pub(crate) struct InterruptState {
    pub status: AtomicU8,
    pub isr: AtomicU8,
    pub config_generation: AtomicU8,
    pub config_vector: AtomicU16,
    pub queue_vectors: Vec<AtomicU16>,
    /// Bumped on every reset and activation so a late signal from a previous activation's
    /// worker is dropped.
    pub epoch: AtomicU64,
    msix: Mutex<MsixTable>,
    /// One irqfd route per vector, or empty without a router.
    routes: Vec<Arc<dyn MsiRoute>>,
    /// The message each route was last pointed at (route updates are GSI table rewrites: only
    /// done when the message changed).
    routed: Mutex<Vec<Option<MsiMessage>>>,
    /// Per vector: MSI-X enabled and neither function nor vector masked (fast-path check).
    deliverable: Vec<AtomicBool>,
}

impl InterruptState {
    pub(crate) fn new(queues: usize, msix: MsixTable, routes: Vec<Arc<dyn MsiRoute>>) -> Self {
        let vectors = usize::from(msix.vectors());
        Self {
            status: AtomicU8::new(0),
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            epoch: AtomicU64::new(0),
            msix: Mutex::new(msix),
            routed: Mutex::new(vec![None; routes.len()]),
            routes,
            deliverable: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The MSI-X table (a poisoned lock is taken over: the table stays consistent per access).
    pub(crate) fn msix(&self) -> MutexGuard<'_, MsixTable> {
        self.msix.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn vectors(&self) -> u16 {
        self.msix().vectors()
    }

    /// `vector` if the table has it, else NO_VECTOR (what the register then reads back).
    pub(crate) fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// Re-derives the fast-path flags (and route messages) after the guest touched the table
    /// or the capability's control bits.
    pub(crate) fn refresh_vectors(&self) {
        let table = self.msix();
        let mut routed = self.routed.lock().unwrap_or_else(PoisonError::into_inner);
        let open = table.is_enabled() && !table.is_function_masked();
        for (vector, flag) in self.deliverable.iter().enumerate() {
            // The table has at most 2048 vectors.
            let v = vector as u16;
            let mut deliverable = open && !vector_masked(&table, v);
            if deliverable {
                deliverable = self.point_route(vector, table.message(v), &mut routed);
            }
            flag.store(deliverable, Ordering::Release);
        }
    }

    /// Points vector `vector`'s route at `message` if it changed; false if the route cannot be
    /// used (the slow path through the table then delivers).
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
                tracing::warn!("virtio-pci: MSI route update for vector {vector} failed: {e}");
                *last = None;
                false
            }
        }
    }

    /// Signals `vector`; false if no MSI-X message went out or was recorded pending.
    fn signal_vector(&self, vector: u16) -> bool {
        if vector == VIRTIO_MSI_NO_VECTOR {
            return false;
        }
        let v = usize::from(vector);
        let fast = self
            .deliverable
            .get(v)
            .is_some_and(|flag| flag.load(Ordering::Acquire));
        if let (true, Some(route)) = (fast, self.routes.get(v)) {
            if let Err(e) = route.trigger() {
                tracing::warn!("virtio-pci: MSI route for vector {vector} failed: {e}");
            }
            return true;
        }
        match self.msix().trigger(vector) {
            Ok(MsixDelivery::Sent | MsixDelivery::Pending) => true,
            Ok(MsixDelivery::Disabled) => false,
            Err(MsixError::Sink(e)) => {
                tracing::warn!("virtio-pci: MSI-X vector {vector} delivery failed: {e}");
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn signal_queue(&self, queue: u16) {
        let Some(vector) = self.queue_vectors.get(usize::from(queue)) else {
            return;
        };
        if !self.signal_vector(vector.load(Ordering::Acquire)) {
            self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        }
    }

    pub(crate) fn signal_config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        self.signal_vector(self.config_vector.load(Ordering::Acquire));
    }

    /// DEVICE_NEEDS_RESET plus a configuration interrupt.
    pub(crate) fn set_needs_reset(&self) {
        let previous = self.status.fetch_or(STATUS_NEEDS_RESET, Ordering::AcqRel);
        if previous & STATUS_NEEDS_RESET == 0 {
            self.signal_config();
        }
    }

    /// Vector assignments back to NO_VECTOR, ISR clear (device reset; the MSI-X table itself is
    /// PCI function state and survives a virtio reset).
    pub(crate) fn reset(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.status.store(0, Ordering::Release);
        self.isr.store(0, Ordering::Release);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for vector in &self.queue_vectors {
            vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
    }
}

fn vector_masked(table: &MsixTable, vector: u16) -> bool {
    let mut control = [0u8; 4];
    let at = u64::from(vector) * MSIX_TABLE_ENTRY_SIZE + VECTOR_CONTROL;
    table.read_table(at, &mut control);
    u32::from_le_bytes(control) & VECTOR_MASKED != 0
}

/// The [`VirtioInterrupt`] of one activation.
pub(crate) struct PciInterrupt {
    state: Arc<InterruptState>,
    epoch: u64,
}

impl PciInterrupt {
    pub(crate) fn new(state: Arc<InterruptState>) -> Self {
        let epoch = state.epoch.load(Ordering::Acquire);
        Self { state, epoch }
    }

    fn current(&self) -> bool {
        self.state.epoch.load(Ordering::Acquire) == self.epoch
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn notify_queue(&self, queue: u16) -> io::Result<()> {
        if self.current() {
            self.state.signal_queue(queue);
        }
        Ok(())
    }

    fn notify_config(&self) -> io::Result<()> {
        if self.current() {
            self.state.config_generation.fetch_add(1, Ordering::AcqRel);
            self.state.signal_config();
        }
        Ok(())
    }

    fn needs_reset(&self) {
        if self.current() {
            self.state.set_needs_reset();
        }
    }
}
