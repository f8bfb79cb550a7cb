//! The virtio-net device model: features, config space, and one handler per queue role (the
//! tap queues follow the running RX rings and the control queue, see [`super::tap_queues`]).
//!
//! Snapshots and migration ([`SavedNet`]): the model carries the pairs the control queue chose,
//! the RX mode, its MAC and the frames it read from its tap but had not delivered (the RX
//! handlers hand them back when a quiesce drops them, and what waits in the tap is read too);
//! the rings themselves are the transport's. No RX buffer is lost on the way: a handler never
//! keeps a popped chain across passes (a frame that does not fit rolls its pops back with
//! `undo_pop`), so a quiesced ring's next available index is the first buffer not yet filled
//! and the restored device finds every posted buffer again. A restored device whose driver negotiated
//! `VIRTIO_NET_F_GUEST_ANNOUNCE` sets `VIRTIO_NET_S_ANNOUNCE` and the transport raises a
//! configuration interrupt, so the guest announces its MAC from its new place (Linux sends
//! gratuitous ARPs / unsolicited NAs and acks with `VIRTIO_NET_CTRL_ANNOUNCE_ACK`).
//!
//! `VIRTIO_NET_F_STANDBY` (`standby: true`) marks the device as the standby of a passthrough
//! NIC with the same MAC, for Linux's net_failover.

use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use sluice_virtio::{ActivateError, DeviceMetrics, QueueHandler, VirtioDevice, DEVICE_TYPE_NET};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STANDBY, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::backend::Tap;
use super::handlers::{
    CtrlHandler, CtrlState, NetBackend, RxHandler, TxHandler, ANNOUNCE_COUNTERS,
};
use sluice_qos::{Class, GuestId, Qos};

use super::header::{TxOffloads, MAX_PACKET_LEN, NET_HDR_LEN};
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
    /// Offers `VIRTIO_NET_F_STANDBY` (the standby of a passthrough NIC with this MAC).
    pub standby: bool,
    /// Offers a control queue even with one pair, and `VIRTIO_NET_F_GUEST_ANNOUNCE` on it (the
    /// VMM's NICs, which may be restored or migrated; a vhost-user backend leaves both to its
    /// frontend).
    pub announce: bool,
}

impl NetConfig {
    /// A NIC with `mac`, no MTU, not a standby, no announce.
    pub fn new(mac: [u8; 6]) -> Self {
        Self {
            mac,
            mtu: None,
            standby: false,
            announce: false,
        }
    }
}

impl SavedNet {
    /// Reads a saved state (not yet checked against a device: `Net::restore_state` does).
    pub fn deserialize_from(value: &serde_json::Value) -> Result<Self, String> {
        Self::deserialize(value).map_err(|e| format!("virtio-net state: {e}"))
    }
}

/// What a snapshot keeps of the model (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNet {
    /// Queue pairs the device has (a restore target must have as many).
    pub pairs: u16,
    /// Pairs the control queue chose (`MQ_VQ_PAIRS_SET`; 1 until it did).
    pub ctrl_pairs: u16,
    pub mac: [u8; 6],
    pub promisc: bool,
    pub allmulti: bool,
    /// The announce request was still pending.
    pub announce: bool,
    /// Frames (vnet header + frame) read from the tap and not delivered, by pair, oldest first.
    pub rx_frames: Vec<(u16, Vec<u8>)>,
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
    ctrl: Arc<CtrlState>,
    /// The shared scheduler the transmit queues join, as which guest, and each queue
    /// pair's priority class (pairs past the list are `Normal`).
    scheduler: Option<(Arc<Qos>, GuestId, Vec<Class>)>,
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
        let queues = usize::from(pairs) * 2 + usize::from(pairs > 1 || config.announce);
        let metrics = if config.announce {
            DeviceMetrics::with_counters("net", queues, &ANNOUNCE_COUNTERS)
        } else {
            DeviceMetrics::new("net", queues)
        };
        let metrics = Arc::new(metrics);
        Self {
            queues: Arc::new(TapQueues::new(backend, pairs)),
            pairs,
            config,
            ctrl: Arc::new(CtrlState {
                metrics: Some(metrics.clone()),
                ..CtrlState::default()
            }),
            metrics,
            features: 0,
            scheduler: None,
        }
    }

    /// Puts every transmit queue started from now on behind `qos`, as its guest `guest`
    /// (weights and frame / byte rate limits against the other NICs on the scheduler);
    /// `classes[pair]` is queue pair `pair`'s priority inside the guest.
    pub fn join_scheduler(&mut self, qos: Arc<Qos>, guest: GuestId, classes: Vec<Class>) {
        self.scheduler = Some((qos, guest, classes));
    }

    fn multiqueue(&self) -> bool {
        self.pairs > 1
    }

    fn has_ctrl_queue(&self) -> bool {
        self.multiqueue() || self.config.announce
    }

    /// The config space bytes: mac, status (link up, announce), max_virtqueue_pairs, mtu.
    pub fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[..6].copy_from_slice(&self.config.mac);
        let mut status = VIRTIO_NET_S_LINK_UP as u16;
        if self.ctrl.announce.load(Ordering::Acquire) {
            status |= VIRTIO_NET_S_ANNOUNCE as u16;
        }
        cfg[6..8].copy_from_slice(&status.to_le_bytes());
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
            QueueRole::Tx(pair) => {
                let tx = TxHandler::new(
                    backend,
                    usize::from(pair),
                    TxOffloads::from_features(self.features),
                );
                match &self.scheduler {
                    Some((qos, guest, classes)) => {
                        let port = qos.port(*guest).map_err(ActivateError::Worker)?;
                        let class = classes
                            .get(usize::from(pair))
                            .copied()
                            .unwrap_or(Class::Normal);
                        Box::new(tx.with_scheduler(port, class))
                    }
                    None => Box::new(tx),
                }
            }
            QueueRole::Ctrl => {
                // Without MQ the driver may still use the control queue, but only one pair.
                let max_pairs = if self.has(VIRTIO_NET_F_MQ) {
                    self.pairs
                } else {
                    1
                };
                let ctrl = CtrlHandler::with_state(backend, max_pairs, self.ctrl.clone());
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
            features |= bit(VIRTIO_NET_F_MQ);
        }
        if self.has_ctrl_queue() {
            features |= bit(VIRTIO_NET_F_CTRL_VQ);
        }
        if self.config.announce {
            // Linux takes it only with the control queue, where it acknowledges.
            features |= bit(VIRTIO_NET_F_GUEST_ANNOUNCE);
        }
        if self.config.mtu.is_some() {
            features |= bit(VIRTIO_NET_F_MTU);
        }
        if self.config.standby {
            features |= bit(VIRTIO_NET_F_STANDBY);
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

    fn reset(&mut self) {
        self.queues.forget();
        self.ctrl.reset();
        self.features = 0;
    }

    /// The queues are quiesced: their RX handlers handed back what they had read; what waits
    /// in the tap is read too, so the saved VM gets every frame that reached this device.
    fn save_state(&mut self) -> Result<Option<serde_json::Value>, String> {
        let mut scratch = vec![0u8; MAX_PACKET_LEN];
        self.queues.drain_tap(&mut scratch);
        let ctrl_pairs = self.queues.ctrl_pairs();
        // If the VM runs on here, the control queue keeps the driver's choice.
        self.queues.resume_ctrl_pairs(Some(ctrl_pairs));
        let saved = SavedNet {
            pairs: self.pairs,
            ctrl_pairs,
            mac: self.config.mac,
            promisc: self.ctrl.promisc.load(Ordering::Acquire),
            allmulti: self.ctrl.allmulti.load(Ordering::Acquire),
            announce: self.ctrl.announce.load(Ordering::Acquire),
            rx_frames: self.queues.carried_frames(),
        };
        serde_json::to_value(saved)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let saved = SavedNet::deserialize_from(state)?;
        if saved.pairs != self.pairs {
            return Err(format!(
                "virtio-net: saved with {} queue pairs, this device has {} (give the tap as \
                 many queues)",
                saved.pairs, self.pairs
            ));
        }
        if !(1..=self.pairs).contains(&saved.ctrl_pairs) {
            return Err(format!(
                "virtio-net: {} pairs chosen of {}",
                saved.ctrl_pairs, self.pairs
            ));
        }
        if let Some((pair, frame)) = saved
            .rx_frames
            .iter()
            .find(|(_, frame)| !(NET_HDR_LEN..=MAX_PACKET_LEN).contains(&frame.len()))
        {
            return Err(format!(
                "virtio-net: a carried frame of {} bytes for pair {pair}",
                frame.len()
            ));
        }
        self.queues.set_carried_frames(saved.rx_frames)?;
        self.queues.resume_ctrl_pairs(Some(saved.ctrl_pairs));
        // The guest already knows this MAC: it stays, whatever the command line says.
        self.config.mac = saved.mac;
        self.ctrl.promisc.store(saved.promisc, Ordering::Release);
        self.ctrl.allmulti.store(saved.allmulti, Ordering::Release);
        self.ctrl.announce.store(saved.announce, Ordering::Release);
        Ok(())
    }

    /// Asks the driver to announce the MAC from here, if it negotiated GUEST_ANNOUNCE.
    fn restored(&mut self) -> bool {
        if !self.has(VIRTIO_NET_F_GUEST_ANNOUNCE) {
            return false;
        }
        self.ctrl.announce.store(true, Ordering::Release);
        self.metrics.count_named(ANNOUNCE_COUNTERS[0], 1);
        true
    }
}
