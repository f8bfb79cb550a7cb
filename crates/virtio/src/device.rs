//! The contract between device models and the virtio framework.

use std::io;
use std::ops::RangeInclusive;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use sluice_dma::DmaSpace;
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::{DeviceMetrics, QueueMetrics};
use crate::ring::{PackedError, VirtQueue};

/// Device type ids (virtio 1.2 §5); the PCI device id is 0x1040 + type.
pub const DEVICE_TYPE_NET: u32 = 1;
pub const DEVICE_TYPE_BLOCK: u32 = 2;
pub const DEVICE_TYPE_RNG: u32 = 4;

/// A virtio device model, independent of the transport.
///
/// The device supplies what is particular to it (identity, features, config space, one
/// [`QueueHandler`] per queue); the framework ([`crate::ActiveQueues`]) owns activation: it
/// checks the enabled queues against [`queue_count_range`](Self::queue_count_range), calls
/// [`ack_features`](Self::ack_features), builds each handler with
/// [`queue_handler`](Self::queue_handler), runs one [`crate::QueueWorker`] per queue, and
/// stops them before [`reset`](Self::reset). The vhost-user backend uses the same three calls
/// per ring, so a model runs in-process or behind vhost-user unchanged.
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
    /// The device's counters.
    fn metrics(&self) -> Arc<DeviceMetrics>;
    /// Enabled-queue counts the device can run with (default: exactly all its queues).
    fn queue_count_range(&self) -> RangeInclusive<usize> {
        let queues = self.queue_max_sizes().len();
        queues..=queues
    }
    /// The negotiated features (offered ∩ accepted), once per activation, before any handler
    /// is built (default: nothing to do).
    fn ack_features(&mut self, _features: u64) -> Result<(), ActivateError> {
        Ok(())
    }
    /// The handler that serves queue `index` of `size` entries (used by the virtio-pci
    /// transport for each enabled queue and by the vhost-user backend per ring).
    fn queue_handler(
        &mut self,
        index: u16,
        size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError>;
    /// Devices whose rings are run by someone else (a vhost-user frontend) return Some; the
    /// framework then hands them the queues instead of starting workers.
    fn external_queues(&mut self) -> Option<&mut dyn ExternalQueues> {
        None
    }
    /// Returns to the pre-activation state, after the framework stopped every worker (device
    /// reset). Default: nothing.
    fn reset(&mut self) {}
    /// The model's own state for a snapshot or a migration, beyond the negotiated features
    /// (which activation hands back through [`ack_features`](Self::ack_features)): called with
    /// every queue quiesced (its handlers dropped). Default: nothing to carry.
    fn save_state(&mut self) -> Result<Option<serde_json::Value>, String> {
        Ok(None)
    }
    /// Puts back what [`save_state`](Self::save_state) returned, on a model built the same
    /// way, before the restored device is activated. The state comes from a file or a peer:
    /// validate it. Default: a model with no state refuses one.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Err("this device carries no saved state".into())
    }
    /// The restored device runs (in a new process, maybe on another host); returns whether its
    /// config space changed, so the transport raises a configuration interrupt (virtio-net's
    /// announce request). Default: nothing changed.
    fn restored(&mut self) -> bool {
        false
    }
}

/// A boxed model is a model (so `sluice-vhost` can serve `Box<dyn VirtioDevice>`).
impl<T: VirtioDevice + ?Sized> VirtioDevice for Box<T> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        (**self).queue_max_sizes()
    }
    fn device_features(&self) -> u64 {
        (**self).device_features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn metrics(&self) -> Arc<DeviceMetrics> {
        (**self).metrics()
    }
    fn queue_count_range(&self) -> RangeInclusive<usize> {
        (**self).queue_count_range()
    }
    fn ack_features(&mut self, features: u64) -> Result<(), ActivateError> {
        (**self).ack_features(features)
    }
    fn queue_handler(
        &mut self,
        index: u16,
        size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError> {
        (**self).queue_handler(index, size)
    }
    fn external_queues(&mut self) -> Option<&mut dyn ExternalQueues> {
        (**self).external_queues()
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn save_state(&mut self) -> Result<Option<serde_json::Value>, String> {
        (**self).save_state()
    }
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        (**self).restore_state(state)
    }
    fn restored(&mut self) -> bool {
        (**self).restored()
    }
}

/// Queues run outside sluice's queue workers (by a vhost-user backend process).
pub trait ExternalQueues: Send {
    /// Starts the rings at DRIVER_OK. `features` is what was negotiated; `queues` holds only
    /// the queues the driver enabled, in index order.
    fn start(
        &mut self,
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops the rings (device reset).
    fn stop(&mut self);
    /// Stops the rings once every request taken has completed and returns where each stands
    /// (by queue index), for a snapshot or a migration; [`ExternalQueues::start`] with queues
    /// at those positions takes them up again. Devices that cannot say so refuse.
    fn quiesce(&mut self) -> Result<Vec<(u16, crate::QueuePosition)>, String> {
        Err("its rings run in another process and cannot be quiesced".into())
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled {got} queues, the device runs with {min}..={max}")]
    QueueCount { got: usize, min: usize, max: usize },
    #[error("queue {0} does not exist or has no role with the negotiated features")]
    NoSuchQueue(u16),
    #[error("backend failed: {0}")]
    Backend(String),
    #[error("cannot start a queue worker: {0}")]
    Worker(io::Error),
}

/// One enabled queue handed to the device at activation.
pub struct QueueBinding {
    pub index: u16,
    /// Split or packed, as the driver negotiated (VIRTIO_F_RING_PACKED).
    pub queue: VirtQueue,
    /// Readable when the driver notifies this queue: an eventfd in the VMM, in vhost-user the
    /// frontend's kick fd unchanged (which may be any kind of fd; the worker only polls it and
    /// reads at most 8 bytes, and a kick fd that hangs up or fails stops the queue with
    /// DEVICE_NEEDS_RESET).
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
    /// `Poll { budget }` while the handler's [`QueueHandler::wants_polling`] says so (a
    /// scheduler's choice for the guest: sustained backlog), `Interrupt` otherwise; checked on
    /// every wakeup and while polling, so a guest that goes idle or is throttled stops being
    /// polled at once.
    Scheduled { budget: Duration },
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
    pub queue: &'a mut VirtQueue,
    pub mem: &'a DmaSpace,
    pub metrics: &'a QueueMetrics,
}

/// A fatal queue error: the framework sets DEVICE_NEEDS_RESET and stops the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("packed virtqueue: {0}")]
    Packed(#[from] PackedError),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("backend: {0}")]
    Backend(String),
    #[error("a saved position of the other ring layout (split vs packed)")]
    Layout,
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
    /// Whether work handed to `completion_fd`'s source is still pending: its completion is
    /// sure to wake the worker, so a polling worker may sleep with driver notifications off
    /// (no kicks) until then and look at the ring when it comes.
    fn has_in_flight(&self) -> bool {
        false
    }
    /// How many requests are in flight (for the stop report); at least 1 when
    /// [`QueueHandler::has_in_flight`] says so.
    fn in_flight(&self) -> usize {
        usize::from(self.has_in_flight())
    }
    /// A cheap check (no system call) that `complete` has something to collect, so a polling
    /// worker reaps completions in its spin loop rather than after an epoll wakeup.
    fn completion_ready(&mut self) -> bool {
        false
    }
    /// Under [`NotifyPolicy::Scheduled`]: whether the queue should be polled now (a cheap
    /// read, no lock or system call: the worker asks on every wakeup and in its spin loop).
    /// A handler behind a scheduler answers what the scheduler chose for its guest; false
    /// (interrupts) by default.
    fn wants_polling(&self) -> bool {
        false
    }
}
