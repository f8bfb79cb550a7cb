//! virtio-blk served by an external vhost-user backend: sluice is the vhost-user *frontend*.
//!
//! [`VhostUserBlk`] is a [`VirtioDevice`] like the in-process `block::Block`, so the virtio-pci
//! transport puts it on the bus unchanged; but no sluice thread touches a request. The backend
//! (qemu-storage-daemon's vhost-user-blk export, `sluice serve blk`, ...) maps guest RAM from
//! the memfd and runs the rings itself.
//!
//! The wire protocol (framing, fd passing, each message's layout) is the `vhost` crate's
//! `Frontend`; this module only decides *what* to send and when, following the order QEMU 7.2's
//! vhost-user-blk frontend uses (backends are tested against it):
//!
//! * connect ([`VhostUserBlk::new`]): GET_FEATURES, GET/SET_PROTOCOL_FEATURES (CONFIG is
//!   required; MQ, REPLY_ACK, CONFIGURE_MEM_SLOTS, INFLIGHT_SHMFD, RESET_DEVICE and LOG_SHMFD
//!   are used when offered), GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_OWNER, GET_CONFIG
//!   (the 60-byte `virtio_blk_config`, cached for the guest's config reads).
//! * DRIVER_OK ([`ExternalQueues::start`], sent from the pump thread): GET_INFLIGHT_FD (first
//!   start only) and SET_INFLIGHT_FD, SET_FEATURES (negotiated |
//!   `VHOST_USER_F_PROTOCOL_FEATURES`), the memory table once per connection (ADD_MEM_REG per
//!   region with CONFIGURE_MEM_SLOTS, else SET_MEM_TABLE), then per queue SET_VRING_NUM,
//!   SET_VRING_BASE, SET_VRING_ADDR (frontend virtual addresses), SET_VRING_CALL,
//!   SET_VRING_KICK, and SET_VRING_ENABLE(1).
//! * reset ([`ExternalQueues::stop`], [`VirtioDevice::reset`]): GET_VRING_BASE per queue
//!   (stops the rings), RESET_DEVICE if negotiated, and the inflight area is dropped (a reset
//!   guest has no requests to replay).
//!   RESET_OWNER is never sent: it is deprecated and QEMU does not send it either.
//!
//! No backend can hold a sluice thread: every request is bounded by
//! [`VhostUserBlkConfig::timeout`] ([`deadline`]: a watchdog shuts the socket down when a
//! request outlives it), and the vCPU thread sends none on the common path. The handshake runs
//! in [`VhostUserBlk::new`] (a timeout there fails the VM's start, naming the socket and the
//! request); the DRIVER_OK sequence runs on the pump thread ([`pump`]), so the guest's status
//! write returns at once, kicks made meanwhile wait in the kick eventfd's counter, and a setup
//! that fails or times out marks the device DEVICE_NEEDS_RESET with a log line. A reset
//! cancels the requests not yet sent, waits for the one in flight (bounded) and then stops
//! the rings with GET_VRING_BASE, bounded too: a stalled backend holds a resetting vCPU for
//! about one timeout at most. Config reads come from a cache and the guest's `wce` writes are
//! forwarded from a helper thread ([`config_space`]).
//!
//! Doorbells: the kick eventfd the transport registered as an ioeventfd is handed to the backend
//! as the ring's kick fd, so a guest kick wakes the backend straight from KVM with no sluice
//! thread in between. Interrupts take one userspace hop: the backend signals a call eventfd per
//! queue, and a small pump thread ([`pump`]) relays it through [`VirtioInterrupt::notify_queue`]
//! (which honours the MSI-X vector the driver programmed). Handing the backend the transport's
//! irqfd directly would remove that hop, but needs the transport to expose per-vector eventfds
//! and to re-send SET_VRING_CALL when the driver re-programs or masks a vector — future work.
//!
//! Metrics: sluice sees neither kicks nor requests. Per queue, `interrupts` counts relayed calls
//! and `requests` the used-index advance seen at each call, a lower bound when the driver
//! suppresses interrupts for its last completions.
//!
//! Reconnect (best effort): the pump watches the control socket for a hang-up (or a connection
//! sluice dropped after a timeout or an unparseable reply). When the backend goes away it logs it
//! and retries the connection every second, each attempt bounded like any request; on success it
//! replays the whole setup above, with SET_INFLIGHT_FD carrying the area obtained at first start
//! (so a backend offering INFLIGHT_SHMFD resubmits the requests it had in flight) and
//! SET_VRING_BASE set to the used index read from the guest's used ring (what was completed), then
//! nudges every kick fd so requests queued meanwhile are seen. Without INFLIGHT_SHMFD that is
//! exact only if the backend completed in order: a request left in flight below a later one's
//! completion is not resubmitted (the frontend cannot see which; QEMU restarts the same way). A backend that comes back without a
//! feature the driver negotiated makes the device DEVICE_NEEDS_RESET. While the device is not
//! active, a lost connection is noticed at the next activation, which reconnects once.
//! Behind sluice's VT-d ([`VhostUserBlkConfig::iommu`]) the backend runs the rings on IOVAs:
//! VIRTIO_F_ACCESS_PLATFORM, a backend request channel for its IOTLB misses, and the VT-d's
//! invalidations forwarded ([`iotlb`] says how, and why the locking is what it is).
//! Snapshot and live migration ([`migration`]): the rings quiesce through
//! [`ExternalQueues::quiesce`] (GET_VRING_BASE on each; the next start resumes at those
//! positions with the inflight area kept, and the pump raises one interrupt per resumed ring, as
//! completions signalled during the quiesce may not have been relayed); while a migration runs
//! the backend logs its guest writes into a shared bitmap (VHOST_USER_PROTOCOL_F_LOG_SHMFD,
//! VHOST_F_LOG_ALL, VHOST_VRING_F_LOG; SET_LOG_BASE is written and its reply read here, since
//! libvhost-user answers it with a u64 where the `vhost` crate expects 16 bytes), and at the
//! stop-and-copy it is handed over (rings stopped, connection closed, no reconnect until a
//! failed migration takes it back).
//! Not done: the rest of the backend request channel (config-change notifications are read and
//! ignored), packed rings.
//!
//! [`fuzz`] plays a scripted hostile backend against all of this (the body of the
//! `vhost_user_backend_replies` fuzz target, also replayed by `cargo test`).

mod config_space;
mod deadline;
pub mod fuzz;
pub mod iotlb;
pub mod migration;
mod pump;
mod session;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sluice_dma::DmaSpace;
use sluice_virtio::{
    ActivateError, DeviceMetrics, ExternalQueues, QueueBinding, QueueHandler, QueuePosition,
    VirtioDevice, VirtioInterrupt, DEVICE_TYPE_BLOCK,
};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use config_space::{ConfigForwarder, ConfigSpace};
use iotlb::{IotlbInvalidator, IotlbLink, FEATURE_ACCESS_PLATFORM};
use pump::CallPump;
use session::{Active, Endpoint, Session};

/// Bytes of `struct virtio_blk_config` as QEMU 7.2 and Linux 6.1 know it.
pub const VIRTIO_BLK_CONFIG_SIZE: usize = 60;
/// Offset of the writable `wce` (writeback cache enable) byte in the config space.
const CONFIG_WCE_OFFSET: u64 = 32;
/// Offset of the `num_queues` field in the config space.
const CONFIG_NUM_QUEUES_OFFSET: usize = 34;
/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit, never offered to the guest.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Virtio feature bits the guest may see: every device-specific bit (0..=23) plus the
/// transport features sluice's virtio-pci transport implements. Packed rings, notification
/// data and the like are withheld even if the backend offers them; ACCESS_PLATFORM too, unless
/// the disk sits behind the VT-d.
const GUEST_VISIBLE_FEATURES: u64 = ((1 << 24) - 1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1);

/// What to connect to and how many queues to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserBlkConfig {
    /// The backend's listening unix socket.
    pub socket: PathBuf,
    /// Queues wanted; fewer are used if the backend offers fewer.
    pub queues: u16,
    /// Maximum size of each queue.
    pub queue_size: u16,
    /// Bound on every request to the backend (connect, send, reply).
    pub timeout: Duration,
    /// The function sits behind sluice's VT-d: the backend translates IOVAs through a device
    /// IOTLB sluice fills ([`iotlb`]); a backend that cannot is refused.
    pub iommu: bool,
}

/// What `timeout` is unless the user says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Shorter timeouts are raised to this (a zero socket timeout would mean none at all).
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

impl VhostUserBlkConfig {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            queues: 1,
            queue_size: 256,
            timeout: DEFAULT_TIMEOUT,
            iommu: false,
        }
    }
}

/// One region of guest RAM as the backend must map it: a shared file mapping that sluice also
/// has mapped at `user_addr`.
#[derive(Debug, Clone)]
pub struct SharedMemoryRegion {
    pub guest_addr: u64,
    pub size: u64,
    /// Where sluice mapped the region (vhost-user ring addresses are in this address space).
    pub user_addr: u64,
    /// The file backing the region (a memfd for sluice's guest RAM).
    pub fd: Arc<File>,
    /// Offset of the region in `fd`.
    pub offset: u64,
}

impl SharedMemoryRegion {
    /// The regions of `memory`; each one must be backed by a file (sluice's `GuestRam` is).
    pub fn from_guest_memory(memory: &GuestMemoryMmap) -> Result<Vec<Self>, VhostUserBlkError> {
        memory
            .iter()
            .map(|region| {
                let file = region
                    .file_offset()
                    .ok_or(VhostUserBlkError::AnonymousMemory(region.start_addr().0))?;
                Ok(Self {
                    guest_addr: region.start_addr().0,
                    size: region.len(),
                    user_addr: region.as_ptr() as u64,
                    fd: file.arc().clone(),
                    offset: file.start(),
                })
            })
            .collect()
    }

    /// The frontend virtual address of `[gpa, gpa + len)` if the region holds all of it.
    fn translate(&self, gpa: u64, len: u64) -> Option<u64> {
        let start = gpa.checked_sub(self.guest_addr)?;
        let end = start.checked_add(len)?;
        (end <= self.size).then(|| self.user_addr + start)
    }
}

/// Translates a guest range to a frontend virtual address through `regions`.
fn translate(regions: &[SharedMemoryRegion], gpa: u64, len: u64) -> Option<u64> {
    regions.iter().find_map(|r| r.translate(gpa, len))
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    #[error("cannot connect to the vhost-user backend at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vhost-user backend at {socket}: {source}")]
    Handshake {
        socket: PathBuf,
        source: Box<VhostUserBlkError>,
    },
    #[error("vhost-user {step} got no answer within {timeout:?}: the backend is stalled")]
    Timeout {
        step: &'static str,
        timeout: Duration,
    },
    #[error("stopped by a device reset")]
    Cancelled,
    #[error("queue {0} is a packed ring; the vhost-user-blk frontend passes on split rings only")]
    PackedRing(u16),
    #[error("cannot start a vhost-user-blk thread: {0}")]
    Thread(std::io::Error),
    #[error("vhost-user {step} failed: {source}")]
    Protocol {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("the backend does not offer VHOST_USER_F_PROTOCOL_FEATURES")]
    NoProtocolFeatures,
    #[error("the backend does not offer VHOST_USER_PROTOCOL_F_CONFIG (needed for the disk's config space)")]
    NoConfig,
    #[error("the backend does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    #[error(
        "the disk sits behind the vIOMMU, but the backend cannot translate IOVAs: it needs \
         VIRTIO_F_ACCESS_PLATFORM (offered: {access_platform}) and the BACKEND_REQ and \
         REPLY_ACK protocol features (offered protocol features {protocol:#x})"
    )]
    NoIotlb {
        access_platform: bool,
        protocol: u64,
    },
    #[error("the backend config space is {0} bytes, expected {VIRTIO_BLK_CONFIG_SIZE}")]
    ConfigSize(usize),
    #[error("guest memory at {0:#x} is not file-backed; a vhost-user backend cannot map it")]
    AnonymousMemory(u64),
    #[error("{regions} memory regions, but the backend takes at most {max}")]
    TooManyRegions { regions: usize, max: u64 },
    #[error("queue {queue}: its {part} at {gpa:#x} is outside guest RAM")]
    RingOutsideRam {
        queue: u16,
        part: &'static str,
        gpa: u64,
    },
    #[error("queue {0} is beyond the {1} queues the backend serves")]
    QueueOutOfRange(u16, u16),
    #[error("the reconnected backend lacks negotiated features {0:#x}")]
    FeaturesLost(u64),
    #[error("not connected to the backend")]
    Disconnected,
    #[error(
        "the backend does not offer VHOST_USER_PROTOCOL_F_LOG_SHMFD and VHOST_F_LOG_ALL: its \
         writes to guest memory cannot be tracked"
    )]
    NoDirtyLog,
    #[error("the backend answered GET_VRING_BASE with {0:#x}, not a split ring index")]
    BadRingBase(u32),
    #[error("handed over to a migration's destination")]
    HandedOver,
    #[error("SET_LOG_BASE got reply {request} (flags {flags:#x}, {len} bytes), not its own")]
    BadLogReply {
        request: u32,
        flags: u32,
        len: usize,
    },
}

impl VhostUserBlkError {
    /// Whether the error means the control connection is gone (worth a reconnect).
    fn connection_lost(&self) -> bool {
        use vhost::vhost_user::Error as E;
        match self {
            Self::Disconnected => true,
            Self::Protocol {
                source: vhost::Error::VhostUserProtocol(e),
                ..
            } => matches!(
                e,
                E::Disconnected
                    | E::PartialMessage
                    | E::SocketBroken(_)
                    | E::SocketError(_)
                    | E::SocketRetry(_)
            ),
            _ => false,
        }
    }

    /// Whether the backend is away (hung up, or its socket not there): a restarting backend
    /// comes back, so the device waits for it instead of needing a reset.
    fn backend_away(&self) -> bool {
        self.connection_lost() || matches!(self, Self::Connect { .. } | Self::HandedOver)
    }

    /// Whether a reconnect attempt that failed this way may succeed later (the backend may be
    /// restarting, or stalled for a while).
    fn worth_retrying(&self) -> bool {
        self.backend_away() || matches!(self, Self::Timeout { .. })
    }

    /// The error as `new` reports it: naming the socket.
    fn at(self, socket: &Path) -> Self {
        match self {
            Self::Connect { .. } | Self::Handshake { .. } => self,
            other => Self::Handshake {
                socket: socket.to_path_buf(),
                source: Box::new(other),
            },
        }
    }
}

/// A virtio-blk device whose queues are served by a vhost-user backend.
pub struct VhostUserBlk {
    session: Arc<Mutex<Session>>,
    config: Arc<ConfigSpace>,
    config_writes: Arc<ConfigForwarder>,
    regions: Vec<SharedMemoryRegion>,
    queue_sizes: Vec<u16>,
    features: u64,
    pump: Option<CallPump>,
    /// Set while a reset stops the pump: its setup sends no further request.
    cancel: Arc<AtomicBool>,
    metrics: Arc<DeviceMetrics>,
    /// Behind a vIOMMU: the device IOTLB ([`iotlb`]).
    iotlb: Option<Arc<IotlbLink>>,
}

impl VhostUserBlk {
    /// Connects to the backend and reads its features and config space. `regions` is guest RAM
    /// (see [`SharedMemoryRegion::from_guest_memory`]); it is sent at the first activation.
    /// Each request is bounded by `config.timeout`; errors name the socket.
    pub fn new(
        config: VhostUserBlkConfig,
        regions: Vec<SharedMemoryRegion>,
    ) -> Result<Self, VhostUserBlkError> {
        let socket = config.socket.clone();
        Self::open(config, regions).map_err(|e| e.at(&socket))
    }

    fn open(
        config: VhostUserBlkConfig,
        regions: Vec<SharedMemoryRegion>,
    ) -> Result<Self, VhostUserBlkError> {
        let space = Arc::new(ConfigSpace::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let timeout = config.timeout.max(MIN_TIMEOUT);
        let counters: &[&'static str] = if config.iommu { &iotlb::COUNTERS } else { &[] };
        let link = config.iommu.then(|| Arc::new(IotlbLink::new(timeout)));
        let endpoint = Endpoint {
            socket: config.socket.clone(),
            timeout,
            requested_queues: config.queues.max(1),
            cancel: cancel.clone(),
            iotlb: link.clone(),
        };
        let mut session = Session::new(endpoint, regions.clone(), space.clone())?;
        session.connect()?;
        let visible = if config.iommu {
            GUEST_VISIBLE_FEATURES | FEATURE_ACCESS_PLATFORM
        } else {
            GUEST_VISIBLE_FEATURES
        };
        let features = session.backend_features() & visible;
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserBlkError::NotModern);
        }
        let queues = queue_count(&config, &session, &space, features);
        session.set_config_num_queues(queues);
        let queue_size = config.queue_size.max(1);
        tracing::info!(
            "vhost-user-blk {}: {queues} queue(s) of {queue_size}, features {features:#x}",
            config.socket.display()
        );
        let session = Arc::new(Mutex::new(session));
        migration::register(&session);
        Ok(Self {
            session,
            config: space,
            config_writes: Arc::new(ConfigForwarder::new(CONFIG_WCE_OFFSET as u32)),
            regions,
            queue_sizes: vec![queue_size; usize::from(queues)],
            features,
            pump: None,
            cancel,
            metrics: Arc::new(DeviceMetrics::with_counters(
                "vhost-user-blk",
                usize::from(queues),
                counters,
            )),
            iotlb: link,
        }
        .counting_iotlb())
    }

    /// The link counts in the device's metrics (made once the queue count is known).
    fn counting_iotlb(self) -> Self {
        if let Some(link) = &self.iotlb {
            link.set_metrics(self.metrics.clone());
        }
        self
    }

    /// Behind a vIOMMU: the observer to register with the VT-d for this function's requester
    /// id (`Vtd::watch`), which forwards the guest's invalidations to the backend.
    pub fn iotlb_observer(&self) -> Option<Arc<IotlbInvalidator>> {
        self.iotlb
            .as_ref()
            .map(|link| Arc::new(IotlbInvalidator(link.clone())))
    }

    fn session(&self) -> MutexGuard<'_, Session> {
        // A panic while holding the lock is a bug; the state is still usable for teardown.
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// DRIVER_OK: checks the driver's queues here and hands the setup to the pump thread, so
    /// this returns without waiting for the backend. A setup that fails later marks the device
    /// NEEDS_RESET through `interrupt`.
    fn start_rings(
        &mut self,
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.stop_pump();
        let served = u16::try_from(self.queue_sizes.len()).unwrap_or(u16::MAX);
        let regions = self.iotlb.is_none().then_some(&self.regions[..]);
        let (active, calls) =
            Active::prepare(features & self.features, mem, queues, served, regions)
                .map_err(|e| ActivateError::Backend(e.to_string()))?;
        let pump = CallPump::start(
            self.session.clone(),
            active,
            calls,
            interrupt,
            self.metrics.clone(),
            self.cancel.clone(),
            self.iotlb.clone().map(|link| pump::MissAnswers {
                link,
                regions: self.regions.clone(),
            }),
        )
        .map_err(ActivateError::Worker)?;
        self.pump = Some(pump);
        Ok(())
    }

    /// Device reset: stops the pump (cancelling a setup still running, after its request in
    /// flight) and the backend's rings, each step bounded by the timeout.
    fn stop_rings(&mut self) {
        self.stop_pump();
        self.session().deactivate();
    }

    fn stop_pump(&mut self) {
        if let Some(pump) = self.pump.take() {
            self.cancel.store(true, Ordering::Release);
            pump.stop();
            self.cancel.store(false, Ordering::Release);
        }
    }
}

/// Queues the device exposes: what was asked for, capped by the backend's GET_QUEUE_NUM and,
/// with VIRTIO_BLK_F_MQ, by its config's `num_queues`; one without VIRTIO_BLK_F_MQ.
fn queue_count(
    config: &VhostUserBlkConfig,
    session: &Session,
    space: &ConfigSpace,
    features: u64,
) -> u16 {
    let wanted = config.queues.max(1);
    let mut queues = wanted.min(session.max_queues().max(1));
    if features & (1 << VIRTIO_BLK_F_MQ) == 0 {
        queues = 1;
    } else if let Some(advertised) = space.num_queues().filter(|&n| n > 0) {
        queues = queues.min(advertised);
    }
    if queues < wanted {
        tracing::warn!("vhost-user-blk: {wanted} queues asked for, the backend serves {queues}");
    }
    queues
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `wce` is writable (and only with VIRTIO_BLK_F_CONFIG_WCE, which the backend
        // checks); anything else the guest writes is dropped here.
        if offset != CONFIG_WCE_OFFSET || data.len() != 1 {
            tracing::debug!("vhost-user-blk: ignored config write at {offset:#x}");
            return;
        }
        // The guest reads `wce` back at once (Linux does): the cache has it before the backend.
        self.config.write(offset, data);
        self.config_writes.forward(&self.session, data[0]);
    }

    /// With MQ the driver may use fewer queues than offered.
    fn queue_count_range(&self) -> RangeInclusive<usize> {
        1..=self.queue_sizes.len()
    }

    /// Never called: [`external_queues`](Self::external_queues) runs every queue.
    fn queue_handler(
        &mut self,
        index: u16,
        _size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError> {
        Err(ActivateError::Backend(format!(
            "queue {index} is served by the vhost-user backend"
        )))
    }

    fn external_queues(&mut self) -> Option<&mut dyn ExternalQueues> {
        Some(self)
    }

    /// After [`ExternalQueues::stop`], or after an activation that failed: nothing left to stop
    /// then, but calling it again is harmless.
    fn reset(&mut self) {
        self.stop_rings();
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}

impl ExternalQueues for VhostUserBlk {
    fn start(
        &mut self,
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.start_rings(features, mem, queues, interrupt)
    }

    fn stop(&mut self) {
        self.stop_rings();
    }

    /// GET_VRING_BASE on every ring (the backend completes what it took first), then the pump
    /// stops; the session keeps the inflight area, so the next `start` resumes.
    fn quiesce(&mut self) -> Result<Vec<(u16, QueuePosition)>, String> {
        let positions = self.session().quiesce().map_err(|e| e.to_string())?;
        self.stop_pump();
        let session = self.session();
        Ok(positions
            .into_iter()
            .map(|(index, next_avail, used_ring)| {
                let next_used = session
                    .last_mem()
                    .map_or(next_avail, |mem| session::used_index(mem, used_ring));
                (
                    index,
                    QueuePosition::Split {
                        next_avail,
                        next_used,
                    },
                )
            })
            .collect())
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        self.stop_pump();
    }
}
