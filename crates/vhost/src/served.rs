//! [`ServedDevice`] for sluice's virtio-rng and virtio-net models.
//!
//! * `Rng`: one queue, the model's own `RngHandler`.
//! * [`ServedNet`]: virtio-net over a tap. The `Net` model builds its handlers inside
//!   `activate`, which a vhost-user backend never calls (the rings arrive one by one), so this
//!   wrapper keeps the `Net` for identity, features and config space and builds the model's
//!   public `RxHandler` / `TxHandler` / `CtrlHandler` per ring from the features the frontend
//!   acknowledged. Queue roles, offload sanitising and `TUN_F_*` flags are the model's
//!   (`QueueRole::of`, `sanitize_features`, `tun_offload_flags`), so both paths agree.
//!
//! QEMU's vhost-user-net handles the control queue itself and tells the backend which pairs
//! are in use by enabling and disabling their rings. The tap follows the running RX rings
//! ([`RxPairs`]): tap queues `0..=n` are attached while the RX ring of pair `n` runs, and only
//! the first one otherwise (as `Net::activate` does before `VQ_PAIRS_SET`), so the kernel
//! never steers frames to a queue nobody reads.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use sluice_devices::net::{
    sanitize_features, tun_offload_flags, CtrlHandler, Net, NetBackend, NetConfig, QueueRole,
    RxHandler, Tap, TxHandler, TxOffloads,
};
use sluice_devices::rng::{Rng, RngHandler};
use sluice_dma::DmaSpace;
use sluice_virtio::{
    ActivateError, DeviceMetrics, QueueBinding, QueueContext, QueueError, QueueHandler,
    VirtioDevice, VirtioInterrupt,
};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};

use crate::backend::ServedDevice;

impl ServedDevice for Rng {
    fn queue_handler(&self, _index: u16, _size: u16) -> Box<dyn QueueHandler> {
        Box::new(RngHandler::new())
    }
}

/// virtio-net served over vhost-user: the `Net` model plus the backend its handlers share.
pub struct ServedNet {
    net: Net,
    backend: Arc<dyn NetBackend>,
    pairs: u16,
    /// The acknowledged features, sanitised (what the handlers serve).
    features: u64,
    rx_pairs: Arc<RxPairs>,
}

impl ServedNet {
    /// A NIC with one queue pair per tap queue.
    pub fn new(tap: Tap, config: NetConfig) -> Self {
        let pairs = u16::try_from(tap.queue_count()).unwrap_or(1).max(1);
        Self::with_backend(Arc::new(tap), pairs, config)
    }

    /// A NIC over any backend with `pairs` queue pairs (at least one).
    pub fn with_backend(backend: Arc<dyn NetBackend>, pairs: u16, config: NetConfig) -> Self {
        let pairs = pairs.max(1);
        ServedNet {
            net: Net::with_backend(backend.clone(), pairs, config),
            rx_pairs: Arc::new(RxPairs {
                backend: backend.clone(),
                running: Mutex::new(vec![0; usize::from(pairs)]),
            }),
            backend,
            pairs,
            features: 0,
        }
    }

    fn has(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    fn handler(&self, index: u16) -> Result<Box<dyn QueueHandler>, String> {
        let has_ctrl = self.has(VIRTIO_NET_F_CTRL_VQ);
        let role = QueueRole::of(index, self.pairs, has_ctrl)
            .ok_or_else(|| format!("queue {index} has no role with the acknowledged features"))?;
        Ok(match role {
            QueueRole::Rx(pair) => {
                let rx = RxHandler::new(self.backend.clone(), usize::from(pair), self.features)
                    .map_err(|e| format!("rx{pair}: {e}"))?;
                Box::new(
                    RunningRx::start(rx, pair, self.rx_pairs.clone())
                        .map_err(|e| format!("attaching tap queue {pair}: {e}"))?,
                )
            }
            QueueRole::Tx(pair) => Box::new(TxHandler::new(
                self.backend.clone(),
                usize::from(pair),
                TxOffloads::from_features(self.features),
            )),
            QueueRole::Ctrl => {
                let max_pairs = if self.has(VIRTIO_NET_F_MQ) {
                    self.pairs
                } else {
                    1
                };
                Box::new(CtrlHandler::new(self.backend.clone(), max_pairs))
            }
        })
    }
}

impl VirtioDevice for ServedNet {
    fn device_type(&self) -> u32 {
        self.net.device_type()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.net.queue_max_sizes()
    }

    fn device_features(&self) -> u64 {
        self.net.device_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.net.read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.net.write_config(offset, data)
    }

    fn activate(
        &mut self,
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.net.activate(features, mem, queues, interrupt)
    }

    fn reset(&mut self) {
        self.net.reset()
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.net.metrics()
    }
}

impl ServedDevice for ServedNet {
    fn set_acked_features(&mut self, features: u64) -> io::Result<()> {
        let features = sanitize_features(features);
        self.backend.set_offload(tun_offload_flags(features))?;
        self.rx_pairs.update()?;
        self.features = features;
        Ok(())
    }

    fn queue_handler(&self, index: u16, _size: u16) -> Box<dyn QueueHandler> {
        self.handler(index).unwrap_or_else(|reason| {
            tracing::warn!("vhost-user-net: {reason}");
            Box::new(Unserved { reason })
        })
    }
}

/// The handler of a ring that cannot be served: its first pass fails the queue (the frontend
/// is told through the error fd) instead of silently ignoring the guest's buffers.
struct Unserved {
    reason: String,
}

impl QueueHandler for Unserved {
    fn process(&mut self, _ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        Err(QueueError::Backend(self.reason.clone()))
    }
}

/// Which pairs have a running RX ring; keeps the tap's attached queues in step.
struct RxPairs {
    backend: Arc<dyn NetBackend>,
    /// Running RX handlers per pair (a restart may briefly overlap the old handler's drop).
    running: Mutex<Vec<u32>>,
}

impl RxPairs {
    fn count(&self, pair: u16, started: bool) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = running.get_mut(usize::from(pair)) {
            *count = if started {
                count.saturating_add(1)
            } else {
                count.saturating_sub(1)
            };
        }
    }

    /// Attaches tap queues up to the highest running pair (at least the first).
    fn update(&self) -> io::Result<()> {
        let pairs = {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running
                .iter()
                .rposition(|&count| count > 0)
                .map_or(1, |p| p + 1)
        };
        self.backend
            .set_active_pairs(u16::try_from(pairs).unwrap_or(u16::MAX))
    }
}

/// The model's RX handler, counted in [`RxPairs`] while it exists.
struct RunningRx {
    inner: RxHandler,
    pair: u16,
    pairs: Arc<RxPairs>,
}

impl RunningRx {
    fn start(inner: RxHandler, pair: u16, pairs: Arc<RxPairs>) -> io::Result<Self> {
        pairs.count(pair, true);
        // Counted first, so a failed update is undone by the drop.
        let running = RunningRx { inner, pair, pairs };
        running.pairs.update()?;
        Ok(running)
    }
}

impl Drop for RunningRx {
    fn drop(&mut self) {
        self.pairs.count(self.pair, false);
        if let Err(e) = self.pairs.update() {
            tracing::warn!(
                "vhost-user-net: detaching tap queues after rx{}: {e}",
                self.pair
            );
        }
    }
}

impl QueueHandler for RunningRx {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.inner.process(ctx)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.inner.complete(ctx)
    }
}
