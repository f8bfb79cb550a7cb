//! [`Backend`]: the device side of one vhost-user connection, as a
//! `VhostUserBackendReqHandlerMut` (the `vhost` crate parses and answers the messages).
//!
//! State per connection: ownership, negotiated features, the memory table, one [`Vring`] per
//! queue, the call/err fds, and the inflight area. Any [`VirtioDevice`] can be served: its
//! `ack_features` sees SET_FEATURES, and a ring runs — one `sluice_virtio::QueueWorker` with the
//! model's `queue_handler` wrapped in [`Tracked`] — once it has
//! a size, addresses, a kick fd, memory, and is enabled (rings start disabled when
//! VHOST_USER_F_PROTOCOL_FEATURES is negotiated). GET_VRING_BASE stops the worker, lets the
//! model finish what it popped (bounded wait), and answers with the ring's position(s).
//!
//! Rings are split or packed. VIRTIO_F_RING_PACKED is offered on top of the model's features
//! unless [`ConnectionResources::offer_packed`] is off (the models never see the bit: the
//! layout is the ring's business, as with sluice's virtio-pci transport). Once it is
//! negotiated, SET_VRING_ADDR's descriptor / avail / used addresses are the descriptor ring and
//! the driver and device event suppression areas, and SET/GET_VRING_BASE carry both positions
//! (vhost-user spec, "vring descriptor indices for packed virtqueues"): bits 0–14 the next
//! avail index, bit 15 the avail wrap counter, bits 16–30 the next used index, bit 31 the used
//! wrap counter — QEMU's `virtio_queue_get_last_avail_idx` and the kernel's vhost use the same
//! word. An index outside the ring is refused. The rings run on `sluice_virtio::PackedQueue`.
//! Their inflight tracking is not [`Tracked`] (which works from split-ring indices) but the
//! queue's own journal hooks writing the packed region (`crate::inflight_packed`); a ring
//! whose inflight area was set up for the other layout (GET/SET_INFLIGHT_FD before
//! SET_FEATURES) does not start — its requests could not be recovered.
//!
//! VIRTIO_F_ACCESS_PLATFORM is offered too (the models never see it either). Once it is
//! negotiated, ring and buffer addresses are IOVAs of the frontend's vIOMMU: the queues run on
//! a `DmaSpace` translated through the connection's [`Iotlb`] (see [`crate::iotlb`]), and a
//! ring starts only when each of its parts maps onto one contiguous range of guest memory. A
//! change of the bit drops the ring addresses set before (their meaning changed).
//!
//! VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD are offered too (the models never see
//! the bit): SET_LOG_BASE maps the frontend's dirty log ([`crate::dirty_log`] validates it),
//! and while LOG_ALL is negotiated the log is the queues' `DmaSpace` write log, so every guest
//! page a ring writes is marked (sluice_dma::dirty's marking points). QEMU turns LOG_ALL on and
//! off with the rings running; SET_FEATURES applies it at once. A VHOST_VRING_F_LOG address
//! outside guest memory is refused.
//!
//! Any message that is malformed, out of range or out of order (ring messages before
//! SET_OWNER, bad sizes or addresses, regions that overlap or are not backed by their file)
//! fails with an error; the server then drops the connection.
//!
//! A ring is (re)started whenever the last thing it lacked arrives, whatever the order:
//! SET_VRING_ADDR, _KICK, _ENABLE, or memory (SET_MEM_TABLE, ADD_MEM_REG). A memory change
//! stops every running ring; a ring its new memory does not hold stays stopped until memory
//! that holds it arrives (QEMU removes and re-adds regions around hotplug). Changing a
//! running ring's size, base or addresses stops it first.
//!
//! The call and error fds are the frontend's and it may stop reading them: they are made
//! non-blocking (O_NONBLOCK on the shared file description; QEMU, Cloud Hypervisor and sluice
//! create them with EFD_NONBLOCK anyway), and a signal that finds the counter at its maximum
//! is dropped — the frontend has a notification pending already. Kick fds are made
//! non-blocking too, so a frontend draining its own kick fd cannot park a worker in read(2).
//!
//! SET_OWNER claims the device for this connection ([`DeviceClaim`]): one frontend drives a
//! device at a time; another connection's SET_OWNER waits up to two seconds for the owner to
//! leave (a reconnecting frontend can beat the server to noticing the old connection closed)
//! and is refused after that.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use sluice_dma::shared_log::SharedLog;
use sluice_dma::{DmaSpace, Mapping, TranslationSource};
use sluice_virtio::{
    DeviceMetrics, NotifyPolicy, PackedQueue, QueueBinding, QueueContext, QueueError, QueueHandler,
    QueueMetrics, QueueWorker, VirtQueue, VirtioDevice, VirtioInterrupt,
};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::{
    Error as VhostError, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    Permissions,
};
use vmm_sys_util::eventfd::EventFd;

use crate::inflight::{InflightArea, QueueInflight, RingLayout};
use crate::iotlb::{Iotlb, IotlbError, IotlbMsg, IotlbSource, FEATURE_ACCESS_PLATFORM};
use crate::memory::{MemoryTable, MAX_MEM_SLOTS};
use crate::sigbus::Tripwire;
use crate::tracking::{used_id, used_index, PendingResubmission, SharedTracked, Tracked};

/// VHOST_USER_F_PROTOCOL_FEATURES (virtio feature bit 30).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VIRTIO_F_RING_PACKED as a feature mask.
pub const FEATURE_RING_PACKED: u64 = 1 << VIRTIO_F_RING_PACKED;
/// VHOST_F_LOG_ALL (bit 26): log every guest page the device writes (see [`crate::dirty_log`]).
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// Largest ring (split or packed).
const MAX_QUEUE_SIZE: u32 = 32768;
/// Largest GET_CONFIG / SET_CONFIG access.
const MAX_CONFIG_BYTES: u32 = 256;
/// How long SET_OWNER waits for another connection to give the device up.
const CLAIM_PATIENCE: Duration = Duration::from_secs(2);
/// How long GET_VRING_BASE waits for requests the model already popped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const DESC_BYTES: u64 = 16;
const AVAIL_HEADER_BYTES: u64 = 6;
const USED_HEADER_BYTES: u64 = 6;
/// A packed ring's event suppression structure {off_wrap, flags}.
const EVENT_BYTES: u64 = 4;
/// A packed ring position's wrap counter bit (`off_wrap` form).
const WRAP_BIT: u32 = 1 << 15;
const PAGE_SIZE: u64 = 4096;

/// The handler of a ring the device cannot serve: its first pass fails the queue (the frontend
/// is told through the error fd) instead of silently ignoring the guest's buffers.
struct Unserved {
    reason: String,
}

impl QueueHandler for Unserved {
    fn process(&mut self, _ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        Err(QueueError::Backend(self.reason.clone()))
    }
}

/// The protocol features the backend offers.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD
}

fn refuse<T>(reason: impl Into<String>) -> VhostResult<T> {
    Err(VhostError::ReqHandlerError(io::Error::other(reason.into())))
}

/// Ring addresses as guest physical addresses (packed: `avail` is the driver event area,
/// `used` the device event area).
#[derive(Debug, Clone, Copy)]
struct RingAddresses {
    desc: u64,
    avail: u64,
    used: u64,
}

/// The three parts of a ring of `size` entries: (address, bytes, alignment) of the
/// descriptors, the avail ring (driver area) and the used ring (device area).
fn ring_parts(size: u16, addresses: RingAddresses, packed: bool) -> [(u64, u64, u64); 3] {
    let size = u64::from(size);
    if packed {
        [
            (addresses.desc, DESC_BYTES * size, 16),
            (addresses.avail, EVENT_BYTES, 4),
            (addresses.used, EVENT_BYTES, 4),
        ]
    } else {
        [
            (addresses.desc, DESC_BYTES * size, 16),
            (addresses.avail, AVAIL_HEADER_BYTES + 2 * size, 2),
            (addresses.used, USED_HEADER_BYTES + 8 * size, 4),
        ]
    }
}

/// A packed ring's SET_VRING_BASE / GET_VRING_BASE word split into its avail and used
/// positions (`off_wrap` form), checked against a ring of `size` entries.
fn packed_positions(base: u32, size: u16) -> Result<(u16, u16), String> {
    let avail = (base & 0xffff) as u16;
    let used = (base >> 16) as u16;
    let index = |off_wrap: u16| u32::from(off_wrap) & !WRAP_BIT;
    if index(avail) >= u32::from(size) || index(used) >= u32::from(size) {
        return Err(format!(
            "packed ring base {base:#010x}: avail index {} / used index {} outside a ring of {size}",
            index(avail),
            index(used)
        ));
    }
    Ok((avail, used))
}

/// A running ring.
struct Running {
    worker: QueueWorker,
    handler: SharedTracked,
}

/// One queue's configuration as the frontend set it.
#[derive(Default)]
struct Vring {
    size: u16,
    addresses: Option<RingAddresses>,
    /// Where the ring resumes (SET_VRING_BASE, or where the last run stopped): split, the next
    /// avail index; packed, both positions (see the module doc).
    base: u32,
    kick: Option<EventFd>,
    enabled: bool,
    running: Option<Running>,
}

/// Call and error eventfds; the worker threads signal through this.
struct Signals {
    calls: Vec<Mutex<Option<EventFd>>>,
    errors: Vec<Mutex<Option<EventFd>>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Signals {
    fn new(queues: usize) -> Self {
        Signals {
            calls: (0..queues).map(|_| Mutex::new(None)).collect(),
            errors: (0..queues).map(|_| Mutex::new(None)).collect(),
        }
    }
}

/// Signals `fd` (non-blocking, see the module doc); a counter at its maximum already means
/// "notified", so EAGAIN is success.
fn signal(fd: &EventFd) -> io::Result<()> {
    match fd.write(1) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        result => result,
    }
}

impl VirtioInterrupt for Signals {
    fn notify_queue(&self, queue: u16) -> io::Result<()> {
        match self.calls.get(usize::from(queue)) {
            Some(call) => match locked(call).as_ref() {
                Some(fd) => signal(fd),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    fn notify_config(&self) -> io::Result<()> {
        // Config changes would go over the backend request channel, which is not offered;
        // the served devices never change their config space on their own.
        Ok(())
    }

    fn needs_reset(&self) {
        for error in &self.errors {
            if let Some(fd) = locked(error).as_ref() {
                let _ = signal(fd);
            }
        }
    }
}

/// Which connection drives the device: at most one owner at a time (see the module doc).
#[derive(Debug, Default)]
pub struct DeviceClaim {
    owned: Mutex<bool>,
    released: Condvar,
}

impl DeviceClaim {
    /// Takes the device, waiting up to `patience` for its owner to leave: a frontend that
    /// reconnects may be faster than the server noticing that its old connection closed.
    fn take_within(&self, patience: Duration) -> bool {
        let owned = locked(&self.owned);
        let (mut owned, _) = self
            .released
            .wait_timeout_while(owned, patience, |owned| *owned)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        !std::mem::replace(&mut *owned, true)
    }

    fn release(&self) {
        *locked(&self.owned) = false;
        self.released.notify_one();
    }

    /// Whether some connection owns the device.
    pub fn is_taken(&self) -> bool {
        *locked(&self.owned)
    }
}

/// What one connection may use.
#[derive(Debug, Clone)]
pub struct ConnectionResources {
    /// Shared by the connections of one device.
    pub claim: Arc<DeviceClaim>,
    /// Tripped when this connection's shared memory faults (see [`crate::sigbus`]).
    pub tripwire: Arc<Tripwire>,
    /// Most bytes of guest memory the connection may map.
    pub max_mapped_bytes: u64,
    /// Offer VIRTIO_F_RING_PACKED.
    pub offer_packed: bool,
    /// How long a queue worker waits for the IOTLB update answering its miss.
    pub iotlb_miss_wait: Duration,
    /// The rings' notification policy.
    pub notify: NotifyPolicy,
}

/// The device side of one connection.
pub struct Backend<D: VirtioDevice> {
    device: Arc<Mutex<D>>,
    claim: Arc<DeviceClaim>,
    tripwire: Arc<Tripwire>,
    metrics: Arc<DeviceMetrics>,
    device_features: u64,
    owner: bool,
    acked_features: u64,
    /// Whether SET_FEATURES has been received on this connection.
    features_set: bool,
    acked_protocol: VhostUserProtocolFeatures,
    memory: MemoryTable,
    dma: Option<DmaSpace>,
    vrings: Vec<Vring>,
    signals: Arc<Signals>,
    inflight: Option<InflightArea>,
    /// Translations for the frontend's vIOMMU, used once ACCESS_PLATFORM is negotiated.
    iotlb: Arc<Iotlb>,
    /// The frontend's dirty log (SET_LOG_BASE), fed while VHOST_F_LOG_ALL is negotiated.
    log: Option<Arc<SharedLog>>,
    /// The rings' notification policy ([`ConnectionResources::notify`]).
    notify: NotifyPolicy,
}

impl<D: VirtioDevice> Backend<D> {
    pub fn new(device: Arc<Mutex<D>>, resources: ConnectionResources) -> Self {
        let (queues, metrics, mut device_features) = {
            let device = locked(&device);
            (
                device.queue_max_sizes().len(),
                device.metrics(),
                device.device_features(),
            )
        };
        if resources.offer_packed {
            device_features |= FEATURE_RING_PACKED;
        }
        device_features |= FEATURE_ACCESS_PLATFORM | VHOST_F_LOG_ALL;
        Backend {
            device,
            claim: resources.claim,
            memory: MemoryTable::new(resources.tripwire.clone(), resources.max_mapped_bytes),
            tripwire: resources.tripwire,
            metrics,
            device_features,
            owner: false,
            acked_features: 0,
            features_set: false,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            dma: None,
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            signals: Arc::new(Signals::new(queues)),
            inflight: None,
            iotlb: Arc::new(Iotlb::with_miss_wait(resources.iotlb_miss_wait)),
            log: None,
            notify: resources.notify,
        }
    }

    /// Points the queues' space at the dirty log while VHOST_F_LOG_ALL is negotiated and a log
    /// is set, and at nothing otherwise (running workers share the space's translator, so
    /// this reaches them at once).
    fn apply_log(&self) {
        let Some(dma) = &self.dma else {
            return;
        };
        let log = self
            .log
            .clone()
            .filter(|_| self.acked_features & VHOST_F_LOG_ALL != 0)
            .map(|log| log as Arc<dyn sluice_dma::dirty::DeviceWriteLog>);
        dma.iommu().set_write_log(log);
    }

    /// The connection's IOTLB (its counters show what the frontend's vIOMMU sent).
    pub fn iotlb(&self) -> &Arc<Iotlb> {
        &self.iotlb
    }

    /// Logs the IOTLB's counters if a vIOMMU was used (once per connection, at its end).
    pub(crate) fn log_iotlb_stats(&self) {
        let stats = self.iotlb.stats();
        if stats != Default::default() {
            // One line per connection; tests (crates/linux-tests) read the update count.
            tracing::info!(
                "vhost-user: IOTLB: {} updates, {} invalidations, {} misses sent, {} refused \
                 messages, {} faults",
                stats.updates,
                stats.invalidations,
                stats.misses_sent,
                stats.refused_messages,
                stats.faults
            );
        }
    }

    /// Whether VHOST_USER_PROTOCOL_F_BACKEND_REQ was negotiated (SET_BACKEND_REQ_FD allowed).
    pub(crate) fn backend_req(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
    }

    /// SET_BACKEND_REQ_FD: the channel IOTLB misses are sent on.
    pub(crate) fn set_backend_channel(&mut self, channel: std::os::unix::net::UnixStream) {
        self.iotlb.set_channel(Some(channel));
    }

    /// VHOST_USER_IOTLB_MSG (read by the server; see [`crate::iotlb`]). Rings waiting for a
    /// translation of their addresses are started once an UPDATE brings it.
    pub(crate) fn iotlb_message(&mut self, msg: &IotlbMsg) -> Result<(), String> {
        if !self.access_platform() {
            return Err("IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM negotiated".into());
        }
        self.iotlb
            .handle(msg)
            .map_err(|e: IotlbError| e.to_string())?;
        if msg.kind == crate::iotlb::IOTLB_UPDATE {
            for index in 0..self.vrings.len() {
                self.try_start(index).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Whether VIRTIO_F_ACCESS_PLATFORM was negotiated: addresses are IOVAs.
    fn access_platform(&self) -> bool {
        self.acked_features & FEATURE_ACCESS_PLATFORM != 0
    }

    /// The connection ended: stop every ring without touching the rings again (the frontend
    /// recovers what was in flight through the inflight area).
    pub fn disconnect(&mut self) {
        for index in 0..self.vrings.len() {
            self.stop(index, false);
        }
        self.release_device();
    }

    /// Gives the device back to other connections (if this one owned it).
    fn release_device(&mut self) {
        if self.owner {
            self.owner = false;
            self.claim.release();
        }
    }

    /// Whether this connection owns the device (SET_OWNER succeeded).
    pub fn owns_device(&self) -> bool {
        self.owner
    }

    /// Whether SET_VRING_ENABLE may arrive before SET_FEATURES: QEMU's vhost-user-net sends
    /// it once the guest acks its features, before it starts the device (and sends
    /// SET_FEATURES); VHOST_USER_F_PROTOCOL_FEATURES counts as negotiated from GET_FEATURES.
    pub(crate) fn awaits_features(&self) -> bool {
        !self.features_set
    }

    /// Whether replies to NEED_REPLY messages were negotiated.
    pub(crate) fn reply_ack(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    fn queue_count(&self) -> u16 {
        u16::try_from(self.vrings.len()).unwrap_or(u16::MAX)
    }

    fn require_owner(&self, what: &str) -> VhostResult<()> {
        if self.owner {
            Ok(())
        } else {
            refuse(format!("{what} before SET_OWNER"))
        }
    }

    fn vring_index(&self, index: u32, what: &str) -> VhostResult<usize> {
        self.require_owner(what)?;
        let index = usize::try_from(index).unwrap_or(usize::MAX);
        if index < self.vrings.len() {
            Ok(index)
        } else {
            refuse(format!("{what}: no queue {index}"))
        }
    }

    /// Whether the rings are packed (VIRTIO_F_RING_PACKED negotiated).
    fn packed(&self) -> bool {
        self.acked_features & FEATURE_RING_PACKED != 0
    }

    fn ring_layout(&self) -> RingLayout {
        if self.packed() {
            RingLayout::Packed
        } else {
            RingLayout::Split
        }
    }

    fn inflight_negotiated(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn ring_enabled(&self, vring: &Vring) -> bool {
        vring.enabled || self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES == 0
    }

    /// Starts queue `index` if it has everything it needs; a ring the current memory does
    /// not hold waits for memory that does.
    fn try_start(&mut self, index: usize) -> VhostResult<()> {
        let vring = &self.vrings[index];
        let ready = vring.running.is_none()
            && vring.size != 0
            && vring.kick.is_some()
            && self.ring_enabled(vring);
        let (Some(dma), Some(memory)) = (self.dma.clone(), self.memory.memory().cloned()) else {
            return Ok(());
        };
        let Some(addresses) = vring.addresses.filter(|_| ready) else {
            return Ok(());
        };
        if self.access_platform() {
            match self.ring_translated(vring.size, addresses) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(
                        "vhost-user: queue {index}: waiting for IOTLB updates covering the ring"
                    );
                    return Ok(());
                }
                Err(e) => return refuse(format!("queue {index}: {e}")),
            }
        } else if !ring_fits(&memory, vring.size, addresses, self.packed()) {
            tracing::info!("vhost-user: queue {index}: waiting for memory that holds the ring");
            return Ok(());
        }
        self.start(index, dma, &memory)
            .or_else(|reason| refuse(format!("queue {index}: {reason}")))
    }

    /// Whether every part of a ring at IOVAs `addresses` is mapped, each onto one contiguous
    /// range of guest memory, with the access the device makes. A missing part has had a MISS sent; an UPDATE retries.
    fn ring_translated(&self, size: u16, addresses: RingAddresses) -> Result<bool, String> {
        let packed = self.packed();
        let [desc, avail, used] = ring_parts(size, addresses, packed);
        // Packed descriptors are written back; the used ring's index is read at start.
        let desc_access = if packed {
            Permissions::ReadWrite
        } else {
            Permissions::Read
        };
        let parts = [
            ("descriptor", desc, desc_access),
            ("avail", avail, Permissions::Read),
            ("used", used, Permissions::ReadWrite),
        ];
        for (what, (iova, len, _), access) in parts {
            match self.iotlb.resolve_contiguous(iova, len, access) {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(false),
                Err(e) => return Err(format!("{what} ring: {e}")),
            }
        }
        Ok(true)
    }

    fn start(
        &mut self,
        index: usize,
        dma: DmaSpace,
        memory: &GuestMemoryMmap,
    ) -> Result<(), String> {
        let queue_index = u16::try_from(index).map_err(|e| e.to_string())?;
        let vring = &self.vrings[index];
        let (size, base) = (vring.size, vring.base);
        let addresses = vring.addresses.ok_or("no ring addresses")?;
        let kick = vring
            .kick
            .as_ref()
            .ok_or("no kick fd")?
            .try_clone()
            .map_err(|e| format!("cannot clone the kick fd: {e}"))?;
        let (queue, handler) = if self.packed() {
            self.packed_ring(index, size, addresses, base, &dma)?
        } else {
            self.split_ring(index, size, addresses, base, &dma, memory)?
        };

        let binding = QueueBinding {
            index: queue_index,
            queue,
            kick,
            policy: self.notify,
        };
        let worker = QueueWorker::spawn(
            format!("vhost-user-q{index}"),
            binding,
            dma,
            Box::new(handler.clone()),
            self.signals.clone(),
            self.metrics.clone(),
            self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
        )
        .map_err(|e| format!("cannot start the queue worker: {e}"))?;
        // The worker looks at the ring once as it starts (requests made available while
        // nobody listened); the frontend's kick fd is only ever read, never written: it may
        // be anything, a full pipe's write end included.
        self.vrings[index].running = Some(Running { worker, handler });
        Ok(())
    }

    /// The model's handler for queue `index`, or one that fails the queue with the reason.
    fn model_handler(&self, index: usize, size: u16) -> Box<dyn QueueHandler> {
        let queue_index = index as u16;
        locked(&self.device)
            .queue_handler(queue_index, size)
            .unwrap_or_else(|e| {
                tracing::warn!("vhost-user: queue {index}: {e}");
                Box::new(Unserved {
                    reason: e.to_string(),
                })
            })
    }

    /// The inflight area, if negotiated and set up, checked to describe `layout` rings.
    fn inflight_area(&self, layout: RingLayout) -> Result<Option<&InflightArea>, String> {
        match self
            .inflight
            .as_ref()
            .filter(|_| self.inflight_negotiated())
        {
            Some(area) if area.layout() != layout => Err(format!(
                "the inflight area was set up for {:?} rings but the rings are {layout:?} \
                 (GET/SET_INFLIGHT_FD before SET_FEATURES?): its requests could not be recovered",
                area.layout()
            )),
            area => Ok(area),
        }
    }

    /// A packed ring resuming at the positions of `base`, or, when the inflight area has been
    /// in use, where the area says, with the buffers it holds in flight handed back first.
    fn packed_ring(
        &self,
        index: usize,
        size: u16,
        addresses: RingAddresses,
        base: u32,
        dma: &DmaSpace,
    ) -> Result<(VirtQueue, SharedTracked), String> {
        let (avail, used) = packed_positions(base, size)?;
        let mut queue = PackedQueue::new(
            size,
            GuestAddress(addresses.desc),
            GuestAddress(addresses.avail),
            GuestAddress(addresses.used),
        );
        let journal = self
            .inflight_area(RingLayout::Packed)?
            .and_then(|area| area.packed_queue(index as u16));
        match journal {
            Some(journal) => {
                let recovery = journal.recover(size, (avail, used), |slot| {
                    ring_flags(dma, addresses.desc, slot)
                });
                if (recovery.avail, recovery.used) != (avail, used) {
                    tracing::info!(
                        "vhost-user: queue {index}: the inflight area places the ring at avail \
                         {:#06x} / used {:#06x} (SET_VRING_BASE said {avail:#06x} / {used:#06x})",
                        recovery.avail,
                        recovery.used
                    );
                }
                queue
                    .set_positions(recovery.avail, recovery.used)
                    .map_err(|e| e.to_string())?;
                let mut resumed = 0;
                for chain in &recovery.chains {
                    match queue.resume_in_flight(dma, chain) {
                        Ok(_) => resumed += 1,
                        Err(e) => {
                            let id = chain.last().map_or(u16::MAX, |d| d.id);
                            tracing::warn!(
                                "vhost-user: queue {index}: recovered buffer {id} dropped: {e}"
                            );
                            journal.forget(id);
                        }
                    }
                }
                if resumed > 0 {
                    tracing::info!(
                        "vhost-user: queue {index}: resubmitting {resumed} in-flight requests"
                    );
                }
                queue.set_journal(Arc::new(journal));
            }
            None => {
                queue
                    .set_positions(avail, used)
                    .map_err(|e| e.to_string())?;
                if avail != used {
                    tracing::warn!(
                        "vhost-user: queue {index}: resuming a packed ring with buffers in \
                         flight (avail {avail:#06x}, used {used:#06x}) and no inflight area \
                         to recover them"
                    );
                }
            }
        }
        let inner = self.model_handler(index, size);
        let handler = SharedTracked::new(Tracked::new(inner, None, 0, 0));
        Ok((queue.into(), handler))
    }

    /// A split ring resuming at avail index `base`, with the requests an earlier backend left
    /// in flight resubmitted (inflight area).
    fn split_ring(
        &self,
        index: usize,
        size: u16,
        addresses: RingAddresses,
        base: u32,
        dma: &DmaSpace,
        memory: &GuestMemoryMmap,
    ) -> Result<(VirtQueue, SharedTracked), String> {
        let queue_index = index as u16;
        let base = u16::try_from(base).map_err(|_| format!("split ring base {base:#x}"))?;
        let used_idx = used_index(dma, addresses.used).ok_or("used ring outside guest memory")?;
        let mut queue = build_queue(size, addresses, base, used_idx, false)?;

        let area = self
            .inflight_area(RingLayout::Split)?
            .and_then(|area| area.queue(queue_index));
        let (recovered, counter) = match &area {
            Some(area) => {
                let recovery = area.recover(used_idx, size, base, |position| {
                    used_id(dma, addresses.used, size, position)
                });
                queue.set_next_avail(recovery.next_avail);
                (recovery.resubmit, recovery.next_counter)
            }
            None => (Vec::new(), 0),
        };

        let inner = self.model_handler(index, size);
        let handler = SharedTracked::new(Tracked::new(inner, area.clone(), counter, used_idx));
        if !recovered.is_empty() && self.access_platform() {
            let pending =
                self.translated_resubmission(&queue, &recovered, area.as_ref(), memory)?;
            if let Some(pending) = pending {
                tracing::info!(
                    "vhost-user: queue {index}: resubmitting {} in-flight requests on the \
                     queue worker (behind a vIOMMU)",
                    recovered.len()
                );
                handler.lock().defer_resubmission(pending);
            }
        } else if !recovered.is_empty() {
            let metrics = self.queue_metrics(index);
            let resubmitted = resubmit(
                &mut handler.lock(),
                &mut queue,
                &recovered,
                area.as_ref(),
                memory,
                &metrics,
            )?;
            tracing::info!(
                "vhost-user: queue {index}: resubmitted {resubmitted} in-flight requests"
            );
            let _ = self.signals.notify_queue(queue_index);
        }
        Ok((queue.into(), handler))
    }

    /// The shadow ring and space for resubmitting `heads` on a translated ring: as
    /// [`resubmit`] builds them, but the scratch avail ring sits at [`SCRATCH_IOVA`] in a space
    /// that translates everything else through the IOTLB (the descriptors, buffers and used
    /// ring are the guest's IOVAs). `None` if no head fits the ring.
    fn translated_resubmission(
        &self,
        queue: &Queue,
        heads: &[u16],
        area: Option<&QueueInflight>,
        memory: &GuestMemoryMmap,
    ) -> Result<Option<PendingResubmission>, String> {
        let size = queue.size();
        let valid = valid_heads(size, heads, area);
        if valid.is_empty() {
            return Ok(None);
        }
        let (scratch_memory, avail_gpa) = with_scratch_avail_ring(memory, size, &valid)?;
        let source = ScratchThenIotlb {
            scratch: Mapping {
                iova: SCRATCH_IOVA,
                target: avail_gpa,
                length: (AVAIL_HEADER_BYTES + 2 * u64::from(size)).next_multiple_of(PAGE_SIZE),
                permissions: Permissions::ReadWrite,
            },
            iotlb: IotlbSource(self.iotlb.clone()),
        };
        let shadow_addresses = RingAddresses {
            desc: queue.desc_table(),
            avail: SCRATCH_IOVA,
            used: queue.used_ring(),
        };
        let shadow = build_queue(size, shadow_addresses, 0, queue.next_used(), false)?;
        Ok(Some(PendingResubmission {
            queue: VirtQueue::from(shadow),
            mem: sluice_dma::translated(scratch_memory, Box::new(source)),
        }))
    }

    /// Stops queue `index`; with `drain`, first lets the model finish what it popped.
    fn stop(&mut self, index: usize, drain: bool) {
        let Some(running) = self.vrings.get_mut(index).and_then(|v| v.running.take()) else {
            return;
        };
        let mut queue = running.worker.stop();
        if drain {
            if let Some(dma) = self.dma.clone() {
                let metrics = self.queue_metrics(index);
                let mut ctx = QueueContext {
                    queue: &mut queue,
                    mem: &dma,
                    metrics: &metrics,
                };
                if running.handler.lock().drain(&mut ctx, DRAIN_TIMEOUT) {
                    let _ = self.signals.notify_queue(index as u16);
                }
            }
        }
        self.vrings[index].base = match &queue {
            VirtQueue::Split(q) => u32::from(q.next_avail()),
            VirtQueue::Packed(q) => {
                u32::from(q.avail_off_wrap()) | u32::from(q.used_off_wrap()) << 16
            }
        };
    }

    /// Counters for passes made from this thread (resubmission, draining); the device's
    /// own entry for the queue, or a throwaway one if the device has none.
    fn queue_metrics(&self, index: usize) -> QueueMetricsRef {
        QueueMetricsRef {
            device: self.metrics.clone(),
            index,
            fallback: QueueMetrics::default(),
        }
    }

    /// Restarts the rings on the new memory table (see the module doc): stops the running
    /// ones on the old memory, then starts every ring the new memory holds.
    fn memory_changed(&mut self) -> VhostResult<()> {
        for index in 0..self.vrings.len() {
            self.stop(index, true);
        }
        self.iotlb.set_memory(self.memory.user_ranges());
        let memory = self.memory.memory().cloned();
        self.dma = if self.access_platform() {
            memory.map(|memory| {
                let source = Box::new(IotlbSource(self.iotlb.clone()));
                let space = sluice_dma::translated(memory, source);
                self.iotlb.set_translator(Arc::downgrade(space.iommu()));
                space
            })
        } else {
            memory.map(sluice_dma::identity)
        };
        self.apply_log();
        for index in 0..self.vrings.len() {
            self.try_start(index)?;
        }
        Ok(())
    }

    fn reset_rings(&mut self) {
        for index in 0..self.vrings.len() {
            self.stop(index, false);
        }
        let queues = self.vrings.len();
        self.vrings = (0..queues).map(|_| Vring::default()).collect();
        for call in &self.signals.calls {
            *locked(call) = None;
        }
        for error in &self.signals.errors {
            *locked(error) = None;
        }
        self.acked_features = 0;
        self.inflight = None;
        self.iotlb.clear();
        self.apply_log();
    }
}

/// The flags of packed ring descriptor `slot` of the ring at `desc`.
fn ring_flags(dma: &DmaSpace, desc: u64, slot: u16) -> Option<u16> {
    let addr = desc.checked_add(DESC_BYTES * u64::from(slot) + 14)?;
    dma.read_obj::<u16>(GuestAddress(addr))
        .ok()
        .map(u16::from_le)
}

/// Whether every part of a ring of `size` entries at `addresses` lies in `memory`.
fn ring_fits(memory: &GuestMemoryMmap, size: u16, addresses: RingAddresses, packed: bool) -> bool {
    ring_parts(size, addresses, packed)
        .iter()
        .all(|&(gpa, len, _)| memory.check_range(GuestAddress(gpa), len as usize))
}

impl<D: VirtioDevice> Drop for Backend<D> {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// A `Queue` for the ring at `addresses`, popping from `next_avail`.
fn build_queue(
    size: u16,
    addresses: RingAddresses,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
) -> Result<Queue, String> {
    Queue::try_from(QueueState {
        max_size: MAX_QUEUE_SIZE as u16,
        next_avail,
        next_used,
        event_idx_enabled: event_idx,
        size,
        ready: true,
        desc_table: addresses.desc,
        avail_ring: addresses.avail,
        used_ring: addresses.used,
    })
    .map_err(|e| format!("invalid ring: {e}"))
}

/// Processes `heads` (recovered in-flight requests, in pop order) before anything new: the
/// model sees a private avail ring holding just those heads, placed in a scratch page mapped
/// past the end of guest memory, while descriptors and the used ring are the guest's. Returns
/// how many heads were handed to the model.
fn resubmit(
    handler: &mut Tracked,
    queue: &mut Queue,
    heads: &[u16],
    area: Option<&QueueInflight>,
    memory: &GuestMemoryMmap,
    metrics: &QueueMetrics,
) -> Result<usize, String> {
    let size = queue.size();
    let valid = valid_heads(size, heads, area);
    if valid.is_empty() {
        return Ok(0);
    }
    let (scratch_memory, avail_gpa) = with_scratch_avail_ring(memory, size, &valid)?;
    let dma = sluice_dma::identity(scratch_memory);
    let shadow_addresses = RingAddresses {
        desc: queue.desc_table(),
        avail: avail_gpa,
        used: queue.used_ring(),
    };
    let shadow = build_queue(size, shadow_addresses, 0, queue.next_used(), false)?;
    let mut shadow = VirtQueue::from(shadow);
    let mut ctx = QueueContext {
        queue: &mut shadow,
        mem: &dma,
        metrics,
    };
    handler
        .resubmit(&mut ctx)
        .map_err(|e| format!("resubmitting in-flight requests failed: {e}"))?;
    if let Some(shadow) = shadow.as_split() {
        queue.set_next_used(shadow.next_used());
    }
    Ok(valid.len())
}

/// The recovered heads that fit a ring of `size`; the others are dropped from the area.
fn valid_heads(size: u16, heads: &[u16], area: Option<&QueueInflight>) -> Vec<u16> {
    let (valid, invalid): (Vec<u16>, Vec<u16>) = heads.iter().partition(|&&head| head < size);
    for head in invalid {
        tracing::warn!("vhost-user: recovered head {head} does not fit a ring of {size}; dropped");
        if let Some(area) = area {
            area.clear(head);
        }
    }
    valid
}

/// Where a translated ring's resubmission avail ring sits: above every IOVA a VT-d or AMD-Vi
/// unit can translate (57 bits at most), so no guest mapping is shadowed.
const SCRATCH_IOVA: u64 = 1 << 63;

/// The resubmission space's translations: the scratch avail ring, then the IOTLB.
#[derive(Debug)]
struct ScratchThenIotlb {
    scratch: Mapping,
    iotlb: IotlbSource,
}

impl TranslationSource for ScratchThenIotlb {
    fn lookup(&self, iova: u64, access: Permissions) -> Option<Mapping> {
        let scratch = &self.scratch;
        if (scratch.iova..scratch.iova + scratch.length).contains(&iova) {
            return Some(*scratch);
        }
        self.iotlb.lookup(iova, access)
    }
}

/// `memory` plus a scratch page past its end holding an avail ring with `heads`.
fn with_scratch_avail_ring(
    memory: &GuestMemoryMmap,
    size: u16,
    heads: &[u16],
) -> Result<(GuestMemoryMmap, u64), String> {
    let end = memory
        .iter()
        .map(|region| region.last_addr().0)
        .max()
        .ok_or("no guest memory")?;
    let gpa = end
        .checked_add(1)
        .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
        .ok_or("guest memory reaches the top of the address space")?;
    let bytes = AVAIL_HEADER_BYTES + 2 * u64::from(size);
    let length = bytes.next_multiple_of(PAGE_SIZE);
    let region = MmapRegionBuilder::new(length as usize)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .map_err(|e| format!("scratch ring: {e}"))?;
    let region = GuestRegionMmap::new(region, GuestAddress(gpa)).ok_or("scratch ring overflows")?;
    let with_scratch = memory
        .insert_region(Arc::new(region))
        .map_err(|e| format!("scratch ring: {e}"))?;
    let count = u16::try_from(heads.len()).map_err(|e| e.to_string())?;
    let write = |offset: u64, value: u16| {
        with_scratch
            .write_obj(value.to_le(), GuestAddress(gpa + offset))
            .map_err(|e| format!("scratch ring: {e}"))
    };
    write(0, 0)?;
    for (slot, &head) in heads.iter().enumerate() {
        write(4 + 2 * slot as u64, head)?;
    }
    write(2, count)?;
    Ok((with_scratch, gpa))
}

/// A queue's counters held by value (the device's `DeviceMetrics` keeps them in a `Vec`).
struct QueueMetricsRef {
    device: Arc<DeviceMetrics>,
    index: usize,
    fallback: QueueMetrics,
}

impl std::ops::Deref for QueueMetricsRef {
    type Target = QueueMetrics;

    fn deref(&self) -> &QueueMetrics {
        self.device.queues.get(self.index).unwrap_or(&self.fallback)
    }
}

/// Whether `size` is a valid ring size (split rings: a power of two).
fn valid_ring_size(size: u32, packed: bool) -> bool {
    size != 0 && size <= MAX_QUEUE_SIZE && (packed || size.is_power_of_two())
}

/// A frontend's eventfd, made non-blocking (see the module doc).
fn eventfd_from(file: File) -> VhostResult<EventFd> {
    set_nonblocking(file.as_raw_fd()).or_else(|e| {
        refuse(format!(
            "cannot make the frontend's eventfd non-blocking: {e}"
        ))
    })?;
    // SAFETY: the descriptor is owned by `file` and handed over whole; EventFd only reads and
    // writes 8-byte counters on it (any other kind of fd fails those calls cleanly).
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL / F_SETFL on a descriptor we own; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl<D: VirtioDevice> VhostUserBackendReqHandlerMut for Backend<D> {
    fn set_owner(&mut self) -> VhostResult<()> {
        if self.owner {
            return Ok(());
        }
        if !self.claim.take_within(CLAIM_PATIENCE) {
            return refuse("SET_OWNER: the device is in use by another frontend connection");
        }
        self.owner = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.reset_rings();
        self.release_device();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.require_owner("RESET_DEVICE")?;
        self.reset_rings();
        locked(&self.device).reset();
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.device_features | VHOST_USER_F_PROTOCOL_FEATURES)
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        self.require_owner("SET_FEATURES")?;
        let offered = self.device_features | VHOST_USER_F_PROTOCOL_FEATURES;
        let unknown = features & !offered;
        if unknown != 0 {
            // QEMU's generic vhost-user devices (vhost-user-rng among them) pass on every
            // bit the guest acked, transport bits included; serve the offered subset.
            tracing::warn!(
                "vhost-user: SET_FEATURES {features:#x}: ignoring bits never offered ({unknown:#x})"
            );
        }
        let features = features & offered;
        // The ring layout and logging are the backend's business; the model never sees them.
        let transport = VHOST_USER_F_PROTOCOL_FEATURES
            | FEATURE_RING_PACKED
            | FEATURE_ACCESS_PLATFORM
            | VHOST_F_LOG_ALL;
        let device_features = features & !transport;
        if let Err(e) = locked(&self.device).ack_features(device_features) {
            return refuse(format!("SET_FEATURES {features:#x}: {e}"));
        }
        let translation_changed = (self.acked_features ^ features) & FEATURE_ACCESS_PLATFORM != 0;
        self.acked_features = features;
        self.features_set = true;
        if translation_changed {
            // The queues' DMA space becomes (or stops being) translated, and ring addresses
            // set before change meaning (IOVAs vs. frontend addresses): they must come again.
            for index in 0..self.vrings.len() {
                self.stop(index, true);
                self.vrings[index].addresses = None;
            }
            self.iotlb.clear();
            self.memory_changed()?;
        }
        // QEMU turns LOG_ALL on and off with the rings running (migration start and end).
        self.apply_log();
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.require_owner("SET_MEM_TABLE")?;
        if let Err(e) = self.memory.set(regions, files) {
            return refuse(format!("SET_MEM_TABLE: {e}"));
        }
        self.memory_changed()?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let index = self.vring_index(index, "SET_VRING_NUM")?;
        if !valid_ring_size(num, self.packed()) {
            return refuse(format!(
                "SET_VRING_NUM: queue {index} size {num} is not a valid ring size (1..=32768, \
                 a power of two for split rings)"
            ));
        }
        self.stop(index, true);
        self.vrings[index].size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VhostResult<()> {
        let index = self.vring_index(index, "SET_VRING_ADDR")?;
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            // The used ring's guest physical address for the log. sluice logs the used ring
            // where the ring's own address resolves, which for a consistent frontend is this;
            // one outside guest memory is a frontend bug, refused.
            let inside = self
                .memory
                .memory()
                .is_some_and(|m| m.address_in_range(GuestAddress(log)));
            if !inside {
                return refuse(format!(
                    "SET_VRING_ADDR: queue {index} log address {log:#x} is outside guest memory"
                ));
            }
        }
        let size = u64::from(self.vrings[index].size);
        if size == 0 {
            return refuse(format!("SET_VRING_ADDR: queue {index} has no size yet"));
        }
        let packed = self.packed();
        let iova = self.access_platform();
        let translate = |what: &str, va: u64, len: u64, align: u64| {
            if !va.is_multiple_of(align) {
                return refuse(format!(
                    "SET_VRING_ADDR: {what} ring at {va:#x} is misaligned"
                ));
            }
            if iova {
                // An IOVA: resolved through the IOTLB when the ring starts (try_start).
                return match va.checked_add(len) {
                    Some(_) => Ok(va),
                    None => refuse(format!("SET_VRING_ADDR: {what} ring at {va:#x} wraps")),
                };
            }
            match self.memory.va_to_gpa(va, len) {
                Some(gpa) => Ok(gpa),
                None => refuse(format!(
                    "SET_VRING_ADDR: queue {index} {what} ring at {va:#x} (+{len:#x}) is outside guest memory"
                )),
            }
        };
        let user = RingAddresses {
            desc: descriptor,
            avail: available,
            used,
        };
        let [desc, avail, used] = ring_parts(size as u16, user, packed);
        let addresses = RingAddresses {
            desc: translate("descriptor", desc.0, desc.1, desc.2)?,
            avail: translate("avail", avail.0, avail.1, avail.2)?,
            used: translate("used", used.0, used.1, used.2)?,
        };
        self.stop(index, true);
        self.vrings[index].addresses = Some(addresses);
        self.try_start(index)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let index = self.vring_index(index, "SET_VRING_BASE")?;
        if self.packed() {
            let size = self.vrings[index].size;
            if size != 0 {
                // Checked again at start, against the size the ring has then.
                packed_positions(base, size)
                    .or_else(|e| refuse(format!("SET_VRING_BASE: queue {index}: {e}")))?;
            }
        } else if base > u32::from(u16::MAX) {
            return refuse(format!(
                "SET_VRING_BASE: queue {index} base {base} too large"
            ));
        }
        self.stop(index, true);
        self.vrings[index].base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let queue = self.vring_index(index, "GET_VRING_BASE")?;
        self.stop(queue, true);
        let vring = &mut self.vrings[queue];
        // The ring is stopped until the frontend sends a kick fd again.
        vring.kick = None;
        tracing::info!(
            "vhost-user: queue {queue}: stopped by GET_VRING_BASE at {:#x}",
            vring.base
        );
        Ok(VhostUserVringState::new(index, vring.base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let index = self.vring_index(u32::from(index), "SET_VRING_KICK")?;
        self.stop(index, true);
        if fd.is_none() {
            tracing::warn!("vhost-user: queue {index}: polling mode (no kick fd) is not supported");
        }
        self.vrings[index].kick = fd.map(eventfd_from).transpose()?;
        self.try_start(index)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let index = self.vring_index(u32::from(index), "SET_VRING_CALL")?;
        *locked(&self.signals.calls[index]) = fd.map(eventfd_from).transpose()?;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let index = self.vring_index(u32::from(index), "SET_VRING_ERR")?;
        *locked(&self.signals.errors[index]) = fd.map(eventfd_from).transpose()?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = offered_protocol_features();
        match VhostUserProtocolFeatures::from_bits(features) {
            Some(acked) if offered.contains(acked) => {
                self.acked_protocol = acked;
                Ok(())
            }
            _ => refuse(format!(
                "SET_PROTOCOL_FEATURES {features:#x} has bits never offered ({:#x})",
                offered.bits()
            )),
        }
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.queue_count()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let index = self.vring_index(index, "SET_VRING_ENABLE")?;
        self.vrings[index].enabled = enable;
        if enable {
            self.try_start(index)
        } else {
            self.stop(index, true);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        self.require_owner("GET_CONFIG")?;
        if size > MAX_CONFIG_BYTES || offset.checked_add(size).is_none() {
            return refuse(format!("GET_CONFIG of {size} bytes at {offset}"));
        }
        let mut data = vec![0u8; size as usize];
        locked(&self.device).read_config(u64::from(offset), &mut data);
        Ok(data)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.require_owner("SET_CONFIG")?;
        if buf.len() > MAX_CONFIG_BYTES as usize {
            return refuse(format!("SET_CONFIG of {} bytes", buf.len()));
        }
        locked(&self.device).write_config(u64::from(offset), buf);
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        refuse("GPU_SET_SOCKET is not supported")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        refuse("GET_SHARED_OBJECT is not supported")
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        self.require_owner("GET_INFLIGHT_FD")?;
        let (queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        if queues > self.queue_count() || !valid_ring_size(u32::from(queue_size), self.packed()) {
            return refuse(format!(
                "GET_INFLIGHT_FD for {queues} queues of {queue_size} entries"
            ));
        }
        match InflightArea::allocate_for(queues, queue_size, self.ring_layout()) {
            Ok((area, file, size)) => {
                self.inflight = Some(area);
                Ok((VhostUserInflight::new(size, 0, queues, queue_size), file))
            }
            Err(e) => refuse(format!("GET_INFLIGHT_FD: {e}")),
        }
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        self.require_owner("SET_INFLIGHT_FD")?;
        let (queues, queue_size) = (inflight.num_queues, inflight.queue_size);
        if queues > self.queue_count() || !valid_ring_size(u32::from(queue_size), self.packed()) {
            return refuse(format!(
                "SET_INFLIGHT_FD for {queues} queues of {queue_size} entries"
            ));
        }
        let attached = InflightArea::attach_for(
            &file,
            inflight.mmap_size,
            inflight.mmap_offset,
            (queues, queue_size, self.ring_layout()),
            &self.tripwire,
        );
        match attached {
            Ok(area) => {
                self.inflight = Some(area);
                Ok(())
            }
            Err(e) => refuse(format!("SET_INFLIGHT_FD: {e}")),
        }
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        self.require_owner("ADD_MEM_REG")?;
        match self.memory.add(region, fd) {
            Ok(true) => self.memory_changed()?,
            Ok(false) => {}
            Err(e) => return refuse(format!("ADD_MEM_REG: {e}")),
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.require_owner("REM_MEM_REG")?;
        match self.memory.remove(region) {
            Ok(true) => self.memory_changed(),
            Ok(false) => Ok(()),
            Err(e) => refuse(format!("REM_MEM_REG: {e}")),
        }
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        refuse("SET_DEVICE_STATE_FD is not supported")
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        refuse("CHECK_DEVICE_STATE is not supported")
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        refuse("GET_SHMEM_CONFIG is not supported")
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostResult<()> {
        self.require_owner("SET_LOG_BASE")?;
        let memory_end = self
            .memory
            .memory()
            .map(|m| m.last_addr().0.saturating_add(1));
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        match crate::dirty_log::attach(&file, size, offset, memory_end, &self.tripwire) {
            Ok(mapped) => {
                tracing::info!("vhost-user: dirty log of {size:#x} bytes set");
                self.log = Some(mapped);
                self.apply_log();
                Ok(())
            }
            Err(e) => refuse(format!("SET_LOG_BASE: {e}")),
        }
    }
}
