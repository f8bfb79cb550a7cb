//! The contract between device models and the virtio framework.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use sluice_dma::DmaSpace;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::{DeviceMetrics, QueueMetrics};

/// Device type ids (virtio 1.2 §5); the PCI device id is 0x1040 + type.
pub const DEVICE_TYPE_NET: u32 = 1;
pub const DEVICE_TYPE_BLOCK: u32 = 2;
pub const DEVICE_TYPE_RNG: u32 = 4;

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (`DEVICE_TYPE_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Every feature bit the device offers, including transport bits it supports
    /// (VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_F_ACCESS_PLATFORM, ...).
    fn device_features(&self) -> u64;
    /// Reads the device-specific config space (bytes past its end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space (read-only fields ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device at DRIVER_OK. `features` is what was negotiated (offered ∩ accepted);
    /// `queues` holds only the queues the driver enabled, in index order.
    fn activate(
        &mut self,
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops all processing (workers joined) and returns to the pre-activate state.
    fn reset(&mut self);
    /// The device's counters.
    fn metrics(&self) -> Arc<DeviceMetrics>;
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled {got} queues, the device needs {need}")]
    QueueCount { got: usize, need: usize },
    #[error("backend failed: {0}")]
    Backend(String),
    #[error("cannot start a queue worker: {0}")]
    Worker(io::Error),
}

/// One enabled queue handed to the device at activation.
pub struct QueueBinding {
    pub index: u16,
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub kick: EventFd,
    pub policy: NotifyPolicy,
}

/// How a queue tells the driver about used buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyPolicy {
    /// Sleep on the kick, interrupt after each batch of completions (EVENT_IDX aware).
    Interrupt,
    /// Busy-poll the avail ring for `budget` after the last request before sleeping on the kick;
    /// driver notifications are suppressed while polling.
    Poll { budget: Duration },
    /// Coalesce interrupts: at most one per `max_requests` completions or per `max_delay`.
    Batch {
        max_requests: u32,
        max_delay: Duration,
    },
}

/// Interrupts toward the driver (MSI-X vectors in virtio-pci, the call fd in vhost-user).
pub trait VirtioInterrupt: Send + Sync {
    fn notify_queue(&self, queue: u16) -> io::Result<()>;
    fn notify_config(&self) -> io::Result<()>;
    /// Marks the device DEVICE_NEEDS_RESET (a fatal driver error) and tells the driver.
    fn needs_reset(&self);
}

/// What a handler works on for one pass over its queue.
pub struct QueueContext<'a> {
    pub queue: &'a mut Queue,
    pub mem: &'a DmaSpace,
    pub metrics: &'a QueueMetrics,
}

/// A fatal queue error: the framework sets DEVICE_NEEDS_RESET and stops the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("backend: {0}")]
    Backend(String),
}

/// Per-queue request processing, driven by a queue worker thread.
///
/// Malformed requests from the guest must complete with an error status (or a zero-length used
/// entry) and be counted in `metrics.errors`; only a broken ring justifies `Err` (NEEDS_RESET).
pub trait QueueHandler: Send + 'static {
    /// Pops available chains and handles them; returns true if used entries were added.
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError>;
    /// A file descriptor that becomes readable when asynchronous work finished (an io_uring
    /// eventfd, a tap fd with frames to receive). None for synchronous handlers.
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    /// Called when `completion_fd` is readable: moves finished work to the used ring; returns
    /// true if used entries were added.
    fn complete(&mut self, _ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        Ok(false)
    }
}
