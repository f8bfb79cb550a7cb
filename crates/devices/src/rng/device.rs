//! The virtio-rng device model and its queue handler.

use std::sync::Arc;
use std::time::Instant;

use sluice_dma::DmaSpace;
use sluice_virtio::{
    ActivateError, Chain, DeviceMetrics, QueueContext, QueueError, QueueHandler, VirtioDevice,
    DEVICE_TYPE_RNG,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

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
}

impl Rng {
    pub fn new() -> Self {
        Self {
            metrics: Arc::new(DeviceMetrics::new("rng", 1)),
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

    fn queue_handler(
        &mut self,
        index: u16,
        _size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError> {
        match index {
            0 => Ok(Box::new(RngHandler::new())),
            _ => Err(ActivateError::NoSuchQueue(index)),
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
    fn serve(&mut self, mem: &DmaSpace, chain: &Chain<'_>) -> Option<u32> {
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
        while let Some(chain) = ctx.queue.pop(ctx.mem)? {
            let popped = Instant::now();
            let head = chain.head_index();
            let written = self.serve(ctx.mem, &chain);
            ctx.queue.add_used(ctx.mem, head, written.unwrap_or(0))?;
            ctx.metrics
                .record_request(popped, written.map(u64::from).ok_or(()));
            used = true;
        }
        Ok(used)
    }
}
