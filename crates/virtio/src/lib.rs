//! Transport-independent virtio device framework (virtio-queue's split rings and sluice's own
//! packed rings, behind one [`ring::VirtQueue`]) and the virtio-pci modern transport.
//!
//! * A device model implements [`VirtioDevice`] (identity, features, config space, reset) and
//!   builds, per queue, a [`QueueHandler`] that turns available chains into used entries.
//! * [`activation::ActiveQueues`] owns activation for every transport: queue-count check,
//!   feature ack, one worker per queue (or the device's [`ExternalQueues`]), stop on reset.
//! * [`worker::QueueWorker`] runs one queue on its own thread: it sleeps on the kick eventfd
//!   (an ioeventfd in the VMM, the kick fd in vhost-user), calls the handler, and applies the
//!   queue's [`NotifyPolicy`] (interrupt / busy-poll / batching, EVENT_IDX aware) before
//!   interrupting the guest through [`VirtioInterrupt`].
//! * [`metrics`] counts kicks, interrupts, suppressed notifications, requests, bytes and latency
//!   per queue; exported as JSON and Prometheus text.
//! * [`pci`] is the virtio-pci modern transport ([`VirtioPciDevice`], a `sluice_pci::PciDevice`).
//!
//! Device models only reach guest memory through the [`sluice_dma::DmaSpace`] they are given,
//! so the same model runs inside the VMM or behind vhost-user.

pub mod activation;
pub mod device;
pub mod metrics;
pub mod pci;
pub mod ring;
pub mod worker;

pub use activation::ActiveQueues;
pub use device::{
    ActivateError, ExternalQueues, NotifyPolicy, QueueBinding, QueueContext, QueueError,
    QueueHandler, VirtioDevice, VirtioInterrupt, DEVICE_TYPE_BLOCK, DEVICE_TYPE_NET,
    DEVICE_TYPE_RNG,
};
pub use metrics::{DeviceMetrics, LatencyHistogram, NamedCounter, QueueMetrics};
pub use pci::{VirtioPciDevice, VirtioPciError, VirtioPciOptions};
pub use ring::{Chain, ChainReader, ChainWriter, PackedQueue, QueuePosition, VirtQueue};
pub use worker::QueueWorker;
