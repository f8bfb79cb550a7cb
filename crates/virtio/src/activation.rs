//! [`ActiveQueues`]: what a device activation owns, and the one place activation happens.
//!
//! Every transport starts a device the same way: check how many queues the driver enabled
//! against [`VirtioDevice::queue_count_range`], tell the device the negotiated features
//! ([`VirtioDevice::ack_features`]), then either hand the queues to the device's
//! [`ExternalQueues`](crate::ExternalQueues) (their rings run in another process) or build one handler per queue with
//! [`VirtioDevice::queue_handler`] and run it on a [`QueueWorker`] (EVENT_IDX as negotiated).
//! A failure part-way stops whatever already started, so a device is either fully running or
//! not at all. Reset is the reverse: every worker is stopped (joined) before
//! [`VirtioDevice::reset`], so the device never resets under a running handler.

use std::sync::Arc;

use sluice_dma::DmaSpace;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::device::{ActivateError, QueueBinding, VirtioDevice, VirtioInterrupt};
use crate::ring::VirtQueue;
use crate::worker::QueueWorker;

/// The running side of an activated device: its queue workers, or its external queues.
#[derive(Debug, Default)]
pub struct ActiveQueues {
    workers: Vec<QueueWorker>,
    external: bool,
}

impl ActiveQueues {
    /// Activates `device` with the queues the driver enabled (in index order). Worker threads
    /// are named `{name}-q{index}`.
    pub fn start<D: VirtioDevice + ?Sized>(
        device: &mut D,
        name: &str,
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<ActiveQueues, ActivateError> {
        Self::start_with(device, name, features, mem, queues, interrupt, false)
    }

    /// [`ActiveQueues::start`] with `inline` queues ([`QueueWorker::inline`]): no threads, each
    /// doorbell runs to the end in [`ActiveQueues::kick_inline`] on the caller's thread. Devices
    /// whose rings another process runs cannot be inline and are refused.
    pub fn start_with<D: VirtioDevice + ?Sized>(
        device: &mut D,
        name: &str,
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        interrupt: Arc<dyn VirtioInterrupt>,
        inline: bool,
    ) -> Result<ActiveQueues, ActivateError> {
        let range = device.queue_count_range();
        if !range.contains(&queues.len()) {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                min: *range.start(),
                max: *range.end(),
            });
        }
        device.ack_features(features)?;
        if inline && device.external_queues().is_some() {
            return Err(ActivateError::Worker(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "queues run by another process cannot be inline (deterministic mode)",
            )));
        }
        if let Some(external) = device.external_queues() {
            external.start(features, mem, queues, interrupt)?;
            return Ok(ActiveQueues {
                workers: Vec::new(),
                external: true,
            });
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let metrics = device.metrics();
        let mut active = ActiveQueues::default();
        for binding in queues {
            let index = binding.index;
            let handler = device.queue_handler(index, binding.queue.size());
            let worker = handler.and_then(|handler| {
                let build = if inline {
                    QueueWorker::inline
                } else {
                    QueueWorker::spawn
                };
                build(
                    format!("{name}-q{index}"),
                    binding,
                    mem.clone(),
                    handler,
                    Arc::clone(&interrupt),
                    Arc::clone(&metrics),
                    event_idx,
                )
                .map_err(ActivateError::Worker)
            });
            match worker {
                Ok(worker) => active.workers.push(worker),
                Err(e) => {
                    active.stop(device);
                    return Err(e);
                }
            }
        }
        Ok(active)
    }

    /// Number of queues running on sluice's workers.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Runs a doorbell of queue `index` to the end if its queue is inline; false if it is
    /// served by a thread (the caller then signals its kick eventfd) or does not run.
    pub fn kick_inline(&mut self, index: u16) -> bool {
        self.workers
            .iter_mut()
            .find(|w| w.index() == index)
            .is_some_and(QueueWorker::kick_inline)
    }

    /// Whether the device's own [`crate::ExternalQueues`] run the rings.
    pub fn is_external(&self) -> bool {
        self.external
    }

    /// Stops every worker after its requests in flight completed (see
    /// [`QueueWorker::stop_drained`]) and returns each queue by index, with its positions: the
    /// device is quiescent and [`ActiveQueues::start`] can take the queues up again. External
    /// queues cannot be quiesced this way: they are handed back untouched.
    pub fn quiesce(self) -> Result<Vec<(u16, VirtQueue)>, ActiveQueues> {
        if self.external {
            return Err(self);
        }
        Ok(self
            .workers
            .into_iter()
            .map(|worker| (worker.index(), worker.stop_drained()))
            .collect())
    }

    /// [`ActiveQueues::quiesce`] for queues the device's [`crate::ExternalQueues`] run: they
    /// are quiesced there and their positions returned; on a refusal the queues are handed
    /// back with the reason.
    pub fn quiesce_external<D: VirtioDevice + ?Sized>(
        self,
        device: &mut D,
    ) -> Result<Vec<(u16, crate::QueuePosition)>, (ActiveQueues, String)> {
        let Some(external) = device.external_queues().filter(|_| self.external) else {
            return Err((self, "its queues are not external".into()));
        };
        external.quiesce().map_err(|why| (self, why))
    }

    /// Stops every worker (joined) or the external queues, then resets `device`.
    pub fn reset<D: VirtioDevice + ?Sized>(self, device: &mut D) {
        self.stop(device);
        device.reset();
    }

    fn stop<D: VirtioDevice + ?Sized>(self, device: &mut D) {
        for worker in self.workers {
            // The ring indices are not needed: a reset starts every ring afresh.
            let _queue = worker.stop();
        }
        if self.external {
            if let Some(external) = device.external_queues() {
                external.stop();
            }
        }
    }
}

#[cfg(test)]
mod tests;
