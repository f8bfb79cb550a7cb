//! The virtio-net device model: features, config space, and one handler per queue role (the
//! tap queues follow the running RX rings and the control queue, see [`super::tap_queues`]).

use std::ops::RangeInclusive;
use std::sync::Arc;

use sluice_virtio::{ActivateError, DeviceMetrics, QueueHandler, VirtioDevice, DEVICE_TYPE_NET};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::backend::Tap;
use super::handlers::{CtrlHandler, NetBackend, RxHandler, TxHandler};
use super::header::TxOffloads;
use super::tap_queues::{Counted, TapQueues};

/// Size of every queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Length of the config fields the device implements (mac, status, max pairs, mtu).
pub const CONFIG_LEN: usize = 12;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// What the VMM chooses for a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    /// Advertised with `VIRTIO_NET_F_MTU` when set.
    pub mtu: Option<u16>,
}

/// A queue's job, from its index (`rx0, tx0, rx1, tx1, ..., ctrl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    Rx(u16),
    Tx(u16),
    Ctrl,
}

impl QueueRole {
    /// The role of queue `index` on a device with `pairs` queue pairs (`None` if out of range).
    pub fn of(index: u16, pairs: u16, has_ctrl: bool) -> Option<Self> {
        let data_queues = pairs.checked_mul(2)?;
        if index < data_queues {
            let pair = index / 2;
            Some(if index.is_multiple_of(2) {
                Self::Rx(pair)
            } else {
                Self::Tx(pair)
            })
        } else if index == data_queues && has_ctrl {
            Some(Self::Ctrl)
        } else {
            None
        }
    }
}

impl std::fmt::Display for QueueRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rx(pair) => write!(f, "rx{pair}"),
            Self::Tx(pair) => write!(f, "tx{pair}"),
            Self::Ctrl => write!(f, "ctrl"),
        }
    }
}

/// virtio-net over a tap (or any [`NetBackend`]).
pub struct Net {
    /// The backend as the handlers see it: the tap with its queue attachment kept in step.
    queues: Arc<TapQueues>,
    pairs: u16,
    config: NetConfig,
    metrics: Arc<DeviceMetrics>,
    /// The acknowledged features, sanitised (what the handlers serve).
    features: u64,
}

impl Net {
    /// A NIC with one queue pair per tap queue.
    pub fn new(tap: Tap, config: NetConfig) -> Self {
        let pairs = u16::try_from(tap.queue_count()).unwrap_or(1).max(1);
        Self::with_backend(Arc::new(tap), pairs, config)
    }

    /// A NIC over any backend with `pairs` queue pairs (at least one).
    pub fn with_backend(backend: Arc<dyn NetBackend>, pairs: u16, config: NetConfig) -> Self {
        let pairs = pairs.max(1);
        let queues = usize::from(pairs) * 2 + usize::from(pairs > 1);
        Self {
            queues: Arc::new(TapQueues::new(backend, pairs)),
            pairs,
            config,
            metrics: Arc::new(DeviceMetrics::new("net", queues)),
            features: 0,
        }
    }

    fn multiqueue(&self) -> bool {
        self.pairs > 1
    }

    /// The config space bytes: mac, status (link up), max_virtqueue_pairs, mtu.
    pub fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[..6].copy_from_slice(&self.config.mac);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg[8..10].copy_from_slice(&self.pairs.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.config.mtu.unwrap_or(0).to_le_bytes());
        cfg
    }

    fn has(&self, feature: u32) -> bool {
        self.features & bit(feature) != 0
    }

    fn handler(&self, role: QueueRole) -> Result<Box<dyn QueueHandler>, ActivateError> {
        let backend: Arc<dyn NetBackend> = self.queues.clone();
        let attach_error = |e| ActivateError::Backend(format!("{role}: attaching tap queues: {e}"));
        Ok(match role {
            QueueRole::Rx(pair) => {
                let rx = RxHandler::new(backend, usize::from(pair), self.features)
                    .map_err(|e| ActivateError::Backend(format!("{role}: {e}")))?;
                Box::new(Counted::rx(rx, pair, self.queues.clone()).map_err(attach_error)?)
            }
            QueueRole::Tx(pair) => Box::new(TxHandler::new(
                backend,
                usize::from(pair),
                TxOffloads::from_features(self.features),
            )),
            QueueRole::Ctrl => {
                // Without MQ the driver may still use the control queue, but only one pair.
                let max_pairs = if self.has(VIRTIO_NET_F_MQ) {
                    self.pairs
                } else {
                    1
                };
                let ctrl = CtrlHandler::new(backend, max_pairs);
                Box::new(Counted::ctrl(ctrl, self.queues.clone()).map_err(attach_error)?)
            }
        })
    }
}

/// Drops segmentation offloads negotiated without the checksum offload they depend on.
pub fn sanitize_features(features: u64) -> u64 {
    let mut features = features;
    if features & bit(VIRTIO_NET_F_CSUM) == 0 {
        features &= !(bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6));
    }
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        features &= !(bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6));
    }
    features
}

/// `TUN_F_*` flags for what the guest accepts on receive.
pub fn tun_offload_flags(features: u64) -> u32 {
    let features = sanitize_features(features);
    let mut flags = 0;
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        flags |= libc::TUN_F_CSUM;
    }
    if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![NET_QUEUE_SIZE; self.metrics.queues.len()]
    }

    fn device_features(&self) -> u64 {
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6);
        if self.multiqueue() {
            features |= bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
        }
        if self.config.mtu.is_some() {
            features |= bit(VIRTIO_NET_F_MTU);
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Every implemented field is read-only for a VERSION_1 driver.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The first pair is required; the others and the control queue are optional.
    fn queue_count_range(&self) -> RangeInclusive<usize> {
        2..=self.metrics.queues.len()
    }

    fn ack_features(&mut self, features: u64) -> Result<(), ActivateError> {
        let features = sanitize_features(features);
        self.queues
            .set_offload(tun_offload_flags(features))
            .map_err(|e| ActivateError::Backend(format!("TUNSETOFFLOAD: {e}")))?;
        self.queues
            .update()
            .map_err(|e| ActivateError::Backend(format!("tap queues: {e}")))?;
        self.features = features;
        Ok(())
    }

    fn queue_handler(
        &mut self,
        index: u16,
        _size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError> {
        let role = QueueRole::of(index, self.pairs, self.has(VIRTIO_NET_F_CTRL_VQ))
            .ok_or(ActivateError::NoSuchQueue(index))?;
        self.handler(role)
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}
