//! The virtio-rng device model and its queue handler.

use std::sync::Arc;
use std::time::Instant;

use sluice_dma::DmaSpace;
use sluice_virtio::worker::QueueWorker;
use sluice_virtio::{
    ActivateError, DeviceMetrics, QueueBinding, QueueContext, QueueError, QueueHandler,
    QueueMetrics, VirtioDevice, VirtioInterrupt, DEVICE_TYPE_RNG,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};

use super::backend::fill_random;

/// Size of the single request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;

/// Most bytes served per request: bounds the time one chain can hold the worker (the guest asks
/// again for more).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// virtio-rng: no config space, one queue.
pub struct Rng {
    metrics: Arc<DeviceMetrics>,
    worker: Option<QueueWorker>,
}

impl Rng {
    pub fn new() -> Self {
        Self {
            metrics: Arc::new(DeviceMetrics::new("rng", 1)),
            worker: None,
        }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![RNG_QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Some(binding) = queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { got, need: 1 });
        };
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let worker = QueueWorker::spawn(
            "virtio-rng".to_string(),
            binding,
            mem,
            Box::new(RngHandler::new()),
            interrupt,
            self.metrics.clone(),
            event_idx,
        )
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}

/// Fills each chain's device-writable buffers with random bytes.
pub struct RngHandler {
    scratch: Vec<u8>,
}

impl RngHandler {
    pub fn new() -> Self {
        Self {
            scratch: vec![0; MAX_REQUEST_BYTES],
        }
    }

    /// Serves one chain; returns the number of bytes written (0 for a malformed chain).
    fn serve(&mut self, mem: &DmaSpace, chain: DescriptorChain<&DmaSpace>) -> Option<u32> {
        let mut writer = chain.writer(mem).ok()?;
        let len = writer.available_bytes().min(MAX_REQUEST_BYTES);
        if len == 0 {
            // Only device-readable buffers: nothing to fill.
            return None;
        }
        let bytes = self.scratch.get_mut(..len)?;
        fill_random(bytes).ok()?;
        std::io::Write::write_all(&mut writer, bytes).ok()?;
        u32::try_from(len).ok()
    }
}

impl Default for RngHandler {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueHandler for RngHandler {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let next = ctx.queue.iter(ctx.mem)?.next();
            let Some(chain) = next else {
                break;
            };
            let popped = Instant::now();
            let head = chain.head_index();
            let written = self.serve(ctx.mem, chain);
            ctx.queue.add_used(ctx.mem, head, written.unwrap_or(0))?;
            record_completion(ctx.metrics, written, popped);
            used = true;
        }
        Ok(used)
    }
}

fn record_completion(metrics: &QueueMetrics, written: Option<u32>, popped: Instant) {
    QueueMetrics::add(&metrics.requests, 1);
    match written {
        Some(bytes) => QueueMetrics::add(&metrics.bytes, u64::from(bytes)),
        None => QueueMetrics::add(&metrics.errors, 1),
    }
    let nanos = u64::try_from(popped.elapsed().as_nanos()).unwrap_or(u64::MAX);
    metrics.latency.record(nanos);
}
