//! Interrupt state shared between the transport (guest register accesses, under the device
//! lock) and the queue workers (which signal from their own threads), and the
//! [`VirtioInterrupt`] handed to the device at activation.
//!
//! Delivery is sluice-pci's generic plumbing: a queue's or the config's MSI-X vector goes out
//! through [`MsixVectors`] (an irqfd route per vector, or the table's slow path that holds it
//! pending while masked). When the driver did not enable MSI-X, or assigned no vector, the
//! cause goes into the ISR through the function's [`PciIntx`] pin, which asserts INTA (level)
//! until the driver reads the ISR (virtio 1.2 §4.1.4.5). The configuration-change ISR bit is
//! set with MSI-X too (drivers may read it); INTx is held while MSI-X is enabled.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use sluice_pci::{MsixSignal, MsixVectors, PciIntx};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

use crate::device::VirtioInterrupt;

/// "No vector" in config_msix_vector / queue_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// ISR bit 0: a queue has used buffers.
pub(crate) const ISR_QUEUE: u8 = 1;
/// ISR bit 1: the configuration changed (or the device needs a reset).
pub(crate) const ISR_CONFIG: u8 = 2;
const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;

/// What both sides of the transport see.
pub(crate) struct InterruptState {
    pub status: AtomicU8,
    pub config_generation: AtomicU8,
    pub config_vector: AtomicU16,
    pub queue_vectors: Vec<AtomicU16>,
    /// Bumped on every reset and activation so a late signal from a previous activation's
    /// worker is dropped.
    pub epoch: AtomicU64,
    pub msix: MsixVectors,
    /// INTA, whose causes are the ISR bits.
    pub intx: Arc<PciIntx>,
}

impl InterruptState {
    pub(crate) fn new(queues: usize, msix: MsixVectors, intx: Arc<PciIntx>) -> Self {
        Self {
            status: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            epoch: AtomicU64::new(0),
            msix,
            intx,
        }
    }

    /// `vector` if the table has it, else NO_VECTOR (what the register then reads back).
    pub(crate) fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// After the guest changed MSI-X enable: INTx is held while MSI-X is on.
    pub(crate) fn msix_control_changed(&self) {
        self.intx.set_msi_active(self.msix.is_enabled());
    }

    /// Signals `vector`; false if no MSI-X message went out or was recorded pending.
    fn signal_vector(&self, vector: u16) -> bool {
        vector != VIRTIO_MSI_NO_VECTOR && self.msix.signal(vector) == MsixSignal::Delivered
    }

    pub(crate) fn signal_queue(&self, queue: u16) {
        let Some(vector) = self.queue_vectors.get(usize::from(queue)) else {
            return;
        };
        if !self.signal_vector(vector.load(Ordering::Acquire)) {
            self.intx.raise(ISR_QUEUE.into());
        }
    }

    pub(crate) fn signal_config(&self) {
        self.intx.raise(ISR_CONFIG.into());
        self.signal_vector(self.config_vector.load(Ordering::Acquire));
    }

    /// The ISR register's read-to-clear: returns the causes and deasserts INTx.
    pub(crate) fn take_isr(&self) -> u8 {
        // Only the two ISR bits are ever raised.
        self.intx.take() as u8
    }

    /// DEVICE_NEEDS_RESET plus a configuration interrupt.
    pub(crate) fn set_needs_reset(&self) {
        let previous = self.status.fetch_or(STATUS_NEEDS_RESET, Ordering::AcqRel);
        if previous & STATUS_NEEDS_RESET == 0 {
            self.signal_config();
        }
    }

    /// Vector assignments back to NO_VECTOR, ISR clear and INTx deasserted (device reset; the
    /// MSI-X table and the command register are PCI function state and survive a virtio reset).
    pub(crate) fn reset(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.status.store(0, Ordering::Release);
        self.intx.take();
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for vector in &self.queue_vectors {
            vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
    }
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
