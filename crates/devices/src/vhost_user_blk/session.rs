//! One vhost-user control connection and everything needed to rebuild it: the handshake, the
//! ring setup at DRIVER_OK, teardown at reset, and the replay after a reconnect.
//!
//! Every request goes through [`Session::request`], which bounds it by the device's timeout
//! (see [`super::deadline`]) and drops the connection when its state is no longer known: after
//! a timeout, a broken socket or a reply that does not parse (only a clean refusal through
//! REPLY_ACK keeps it). A dropped connection is shut down first, so the pump's watch on it
//! sees the hang-up and reconnects.

use std::fs::File;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_dma::shared_log::{log_bytes_for, SharedLog};
use sluice_dma::DmaSpace;
use sluice_virtio::QueueBinding;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::config_space::ConfigSpace;
use super::deadline::{self, Watchdog};
use super::iotlb::{read_exact, write_all, IotlbLink, FEATURE_ACCESS_PLATFORM};
use super::{
    translate, SharedMemoryRegion, VhostUserBlkError, VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_BLK_CONFIG_SIZE,
};

/// Protocol features sluice uses when the backend offers them (CONFIG is mandatory; behind a
/// vIOMMU, BACKEND_REQ and REPLY_ACK are too, see [`super::iotlb`]).
fn wanted_protocol_features(iommu: bool) -> VhostUserProtocolFeatures {
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::LOG_SHMFD;
    if iommu {
        wanted | VhostUserProtocolFeatures::BACKEND_REQ
    } else {
        wanted
    }
}

/// VHOST_USER_SET_LOG_BASE, and the header fields its exchange needs.
const FRONTEND_SET_LOG_BASE: u32 = 6;
const VHOST_USER_VERSION_1: u32 = 0x1;
const VHOST_USER_REPLY: u32 = 0x4;
const VHOST_USER_HEADER_BYTES: usize = 12;
/// VHOST_F_LOG_ALL: the backend logs the guest pages it writes (a migration runs).
pub(super) const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// SET_VRING_ADDR flag: log the used ring's writes at `log_guest_addr`.
const VHOST_VRING_F_LOG: u32 = 1;

/// What a backend must offer to serve a device behind a vIOMMU.
fn iotlb_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::REPLY_ACK
}

/// What the pump needs to relay one queue's interrupts.
pub(super) struct CallQueue {
    pub index: u16,
    pub call: EventFd,
    /// Guest address of the used ring (its `idx` counts completions for the metrics).
    pub used_ring: u64,
}

/// One enabled queue as the backend is told about it.
struct Ring {
    index: u16,
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    /// Where the backend starts reading the avail ring at the first start.
    first_avail: u16,
    kick: EventFd,
    call: EventFd,
}

/// The device between DRIVER_OK and reset.
pub(super) struct Active {
    /// Features the driver negotiated (without the vhost-user bit).
    features: u64,
    mem: DmaSpace,
    rings: Vec<Ring>,
}

impl Active {
    pub fn mem(&self) -> DmaSpace {
        self.mem.clone()
    }

    /// Checks the driver's queues and gives each a call eventfd; no request is sent, so this
    /// runs on the vCPU thread and its errors are the activation's. `regions` is `None` when
    /// the ring addresses are IOVAs the backend translates (behind a vIOMMU).
    pub fn prepare(
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        served: u16,
        regions: Option<&[SharedMemoryRegion]>,
    ) -> Result<(Self, Vec<CallQueue>), VhostUserBlkError> {
        let rings = queues
            .into_iter()
            .map(|binding| ring(binding, served, regions))
            .collect::<Result<Vec<_>, _>>()?;
        let calls = rings
            .iter()
            .map(|ring| {
                Ok(CallQueue {
                    index: ring.index,
                    call: ring.call.try_clone().map_err(io_step("call eventfd"))?,
                    used_ring: ring.used_ring,
                })
            })
            .collect::<Result<Vec<_>, VhostUserBlkError>>()?;
        let active = Self {
            features,
            mem,
            rings,
        };
        Ok((active, calls))
    }
}

/// Checks one queue binding and gives it a call eventfd.
fn ring(
    binding: QueueBinding,
    served: u16,
    regions: Option<&[SharedMemoryRegion]>,
) -> Result<Ring, VhostUserBlkError> {
    if binding.index >= served {
        return Err(VhostUserBlkError::QueueOutOfRange(binding.index, served));
    }
    // The transport never offers VIRTIO_F_RING_PACKED for a device with external queues.
    let queue = binding
        .queue
        .as_split()
        .ok_or(VhostUserBlkError::PackedRing(binding.index))?;
    let ring = Ring {
        index: binding.index,
        size: queue.size(),
        desc_table: queue.desc_table(),
        avail_ring: queue.avail_ring(),
        used_ring: queue.used_ring(),
        first_avail: queue.next_avail(),
        kick: binding.kick,
        call: EventFd::new(EFD_NONBLOCK).map_err(io_step("call eventfd"))?,
    };
    vring_config(regions, &ring, false)?;
    Ok(ring)
}

/// SET_VRING_ADDR's payload: the ring parts as frontend virtual addresses, or as the IOVAs
/// the driver gave when `regions` is `None` (ACCESS_PLATFORM: the backend translates them
/// through its IOTLB, as QEMU's vhost does behind a vIOMMU).
fn vring_config(
    regions: Option<&[SharedMemoryRegion]>,
    ring: &Ring,
    logged: bool,
) -> Result<VringConfigData, VhostUserBlkError> {
    let size = u64::from(ring.size);
    let part = |part: &'static str, gpa: u64, len: u64| match regions {
        None => Ok(gpa),
        Some(regions) => translate(regions, gpa, len).ok_or(VhostUserBlkError::RingOutsideRam {
            queue: ring.index,
            part,
            gpa,
        }),
    };
    // Split ring sizes (virtio 1.2 §2.7), event fields included.
    Ok(VringConfigData {
        queue_max_size: ring.size,
        queue_size: ring.size,
        flags: if logged { VHOST_VRING_F_LOG } else { 0 },
        desc_table_addr: part("descriptor table", ring.desc_table, 16 * size)?,
        avail_ring_addr: part("avail ring", ring.avail_ring, 6 + 2 * size)?,
        used_ring_addr: part("used ring", ring.used_ring, 6 + 8 * size)?,
        // The used ring's guest physical address, where the backend logs its writes.
        log_addr: logged.then_some(ring.used_ring),
    })
}

/// The migration's dirty log while it runs (see [`super::migration`]), kept to be handed to a
/// reconnected backend.
struct DirtyLog {
    log: SharedLog,
    file: File,
}

/// The inflight area from GET_INFLIGHT_FD, kept to be handed to a reconnected backend.
struct Inflight {
    info: VhostUserInflight,
    file: File,
}

/// A live control connection.
struct Connection {
    frontend: Frontend,
    /// The same socket, for the watchdog and the pump to shut down or watch.
    socket: Arc<UnixStream>,
    /// Our end of the backend request channel (behind a vIOMMU only).
    channel: Option<UnixStream>,
}

/// Where the session connects and how long it waits.
pub(super) struct Endpoint {
    pub socket: PathBuf,
    pub timeout: Duration,
    pub requested_queues: u16,
    /// Set while a reset stops the device: requests not yet sent are not sent.
    pub cancel: Arc<AtomicBool>,
    /// Behind a vIOMMU: the device IOTLB's link ([`super::iotlb`]).
    pub iotlb: Option<Arc<IotlbLink>>,
}

pub(super) struct Session {
    endpoint: Endpoint,
    regions: Vec<SharedMemoryRegion>,
    connection: Option<Connection>,
    /// Counts connections, so a hang-up seen late is not taken for the next connection's.
    generation: u64,
    watchdog: Watchdog,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    max_queues: u16,
    max_mem_slots: Option<u64>,
    /// Whether this connection already has the memory table.
    memory_sent: bool,
    config: Arc<ConfigSpace>,
    /// `num_queues` the guest sees (the backend may serve more than sluice uses).
    exposed_queues: Option<u16>,
    inflight: Option<Inflight>,
    active: Option<Active>,
    /// While a migration runs: the log the backend writes into.
    log: Option<DirtyLog>,
    /// The memory of the last activation, kept by a quiesce.
    active_mem: Option<DmaSpace>,
    /// Handed over to a migration's destination: no reconnect.
    held: bool,
    /// Whether the backend runs the activation's rings (its setup completed).
    started: bool,
}

impl Session {
    pub fn new(
        endpoint: Endpoint,
        regions: Vec<SharedMemoryRegion>,
        config: Arc<ConfigSpace>,
    ) -> Result<Self, VhostUserBlkError> {
        Ok(Self {
            endpoint,
            regions,
            connection: None,
            generation: 0,
            watchdog: Watchdog::new().map_err(VhostUserBlkError::Thread)?,
            backend_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            max_queues: 0,
            max_mem_slots: None,
            memory_sent: false,
            config,
            exposed_queues: None,
            inflight: None,
            active: None,
            log: None,
            active_mem: None,
            held: false,
            started: false,
        })
    }

    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    pub fn max_queues(&self) -> u16 {
        self.max_queues
    }

    pub fn socket_path(&self) -> &std::path::Path {
        &self.endpoint.socket
    }

    /// The control socket (a duplicate) and its generation, for hang-up detection, with a
    /// duplicate of the backend request channel if there is one.
    pub fn watch(&self) -> Option<(u64, UnixStream, Option<UnixStream>)> {
        let connection = self.connection.as_ref()?;
        let socket = connection.socket.try_clone().ok()?;
        let channel = connection.channel.as_ref().and_then(|c| c.try_clone().ok());
        Some((self.generation, socket, channel))
    }

    /// Sends one request of the setup (handshake, DRIVER_OK, reconnect), unless a reset
    /// cancelled it.
    fn request<T>(
        &mut self,
        step: &'static str,
        send: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, VhostUserBlkError> {
        if self.endpoint.cancel.load(Ordering::Acquire) {
            return Err(VhostUserBlkError::Cancelled);
        }
        self.send(step, send)
    }

    /// Sends one request through `send`, bounded by the timeout. Drops the connection when its
    /// state is no longer known (anything but a clean refusal).
    fn send<T>(
        &mut self,
        step: &'static str,
        send: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, VhostUserBlkError> {
        let timeout = self.endpoint.timeout;
        let connection = self
            .connection
            .as_mut()
            .ok_or(VhostUserBlkError::Disconnected)?;
        // Behind a vIOMMU, IOTLB messages share the socket: one exchange at a time.
        let link = self.endpoint.iotlb.clone();
        let wire = link.as_ref().map(|link| link.lock());
        let (result, expired) = self.watchdog.bound(&connection.socket, timeout, || {
            send(&mut connection.frontend)
        });
        drop(wire);
        if expired {
            self.disconnect();
            return Err(VhostUserBlkError::Timeout { step, timeout });
        }
        match result {
            Ok(value) => Ok(value),
            Err(source) => {
                let refused = matches!(
                    source,
                    vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::BackendInternalError)
                );
                if !refused {
                    self.disconnect();
                }
                Err(VhostUserBlkError::Protocol { step, source })
            }
        }
    }

    /// Opens the connection and runs the handshake (QEMU 7.2 order, see the module doc).
    pub fn connect(&mut self) -> Result<(), VhostUserBlkError> {
        if self.held {
            return Err(VhostUserBlkError::HandedOver);
        }
        self.disconnect();
        let endpoint = &self.endpoint;
        let stream = deadline::connect(&endpoint.socket, endpoint.timeout).map_err(|source| {
            VhostUserBlkError::Connect {
                path: endpoint.socket.clone(),
                source,
            }
        })?;
        let socket = Arc::new(stream.try_clone().map_err(io_step("socket"))?);
        let max_queues = u64::from(endpoint.requested_queues.max(1));
        self.connection = Some(Connection {
            frontend: Frontend::from_stream(stream, max_queues),
            socket,
            channel: None,
        });
        self.generation += 1;
        let result = self.handshake();
        if result.is_err() {
            self.disconnect();
        }
        result
    }

    fn handshake(&mut self) -> Result<(), VhostUserBlkError> {
        let features = self.request("GET_FEATURES", |f| f.get_features())?;
        if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(VhostUserBlkError::NoProtocolFeatures);
        }
        let offered = self.request("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserBlkError::NoConfig);
        }
        let iommu = self.endpoint.iotlb.is_some();
        if iommu
            && (features & FEATURE_ACCESS_PLATFORM == 0
                || !offered.contains(iotlb_protocol_features()))
        {
            return Err(VhostUserBlkError::NoIotlb {
                access_platform: features & FEATURE_ACCESS_PLATFORM != 0,
                protocol: offered.bits(),
            });
        }
        let protocol = offered & wanted_protocol_features(iommu);
        self.request("SET_PROTOCOL_FEATURES", |f| {
            f.set_protocol_features(protocol)
        })?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request asks for an ack, so backend errors surface where they happen.
            if let Some(connection) = self.connection.as_mut() {
                connection
                    .frontend
                    .set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let backend_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            self.request("GET_QUEUE_NUM", |f| f.get_queue_num())?
        } else {
            1
        };
        self.max_mem_slots = if protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            Some(self.request("GET_MAX_MEM_SLOTS", |f| f.get_max_mem_slots())?)
        } else {
            None
        };
        if iommu {
            self.send_backend_channel()?;
        }
        self.request("SET_OWNER", |f| f.set_owner())?;
        let mut config = self.fetch_config()?;
        if let Some(n) = self.exposed_queues {
            ConfigSpace::patch_num_queues(&mut config, n);
        }
        self.config.replace(config);
        self.backend_features = features;
        self.protocol = protocol;
        self.max_queues = u16::try_from(backend_queues).unwrap_or(u16::MAX);
        tracing::debug!(
            "vhost-user-blk {}: features {features:#x}, protocol {:#x}, {backend_queues} queues",
            self.endpoint.socket.display(),
            protocol.bits()
        );
        Ok(())
    }

    /// SET_BACKEND_REQ_FD with one end of a new socket pair; the pump reads the other (IOTLB
    /// misses). Sent before SET_OWNER, as QEMU does.
    fn send_backend_channel(&mut self) -> Result<(), VhostUserBlkError> {
        let (ours, theirs) = UnixStream::pair().map_err(io_step("backend channel"))?;
        set_nonblocking(&ours).map_err(io_step("backend channel"))?;
        self.request("SET_BACKEND_REQ_FD", |f| f.set_backend_request_fd(&theirs))?;
        if let Some(connection) = self.connection.as_mut() {
            connection.channel = Some(ours);
        }
        Ok(())
    }

    fn fetch_config(&mut self) -> Result<Vec<u8>, VhostUserBlkError> {
        let buf = [0u8; VIRTIO_BLK_CONFIG_SIZE];
        let (_, payload) = self.request("GET_CONFIG", |f| {
            f.get_config(
                0,
                VIRTIO_BLK_CONFIG_SIZE as u32,
                VhostUserConfigFlags::empty(),
                &buf,
            )
        })?;
        if payload.len() != VIRTIO_BLK_CONFIG_SIZE {
            return Err(VhostUserBlkError::ConfigSize(payload.len()));
        }
        Ok(payload)
    }

    /// Forgets the connection, shutting it down first so that whoever watches it (the pump)
    /// sees the hang-up.
    pub fn disconnect(&mut self) {
        if let Some(link) = &self.endpoint.iotlb {
            link.disarm();
        }
        if let Some(connection) = self.connection.take() {
            let _ = connection.socket.shutdown(Shutdown::Both);
        }
        self.memory_sent = false;
    }

    /// Forgets connection `generation` if it is still the current one.
    pub fn disconnect_generation(&mut self, generation: u64) {
        if self.generation == generation {
            self.disconnect();
        }
    }

    /// Makes the config advertise `queues` (sluice may use fewer than the backend has).
    pub fn set_config_num_queues(&mut self, queues: u16) {
        self.exposed_queues = Some(queues);
        self.config.set_num_queues(queues);
    }

    /// Forwards a (validated) guest config write to the backend; a reset does not cancel it.
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), VhostUserBlkError> {
        self.send("SET_CONFIG", |f| {
            f.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        })
    }

    /// Records the driver's queues as the activation (on the vCPU thread, before the pump
    /// sends anything), so that a quiesce or hand-over that comes before the pump's setup
    /// sees them; nothing is sent.
    pub fn prepare(&mut self, active: Active) {
        self.active = Some(active);
        self.started = false;
    }

    /// Starts the backend on the prepared queues (a quiesce may have taken them: then nothing
    /// is sent). A connection found dead is rebuilt once. On failure the rings stay recorded,
    /// so that the reset stops whichever did start.
    pub fn activate_prepared(&mut self) -> Result<(), VhostUserBlkError> {
        match self.start(false) {
            Err(e) if e.connection_lost() => {
                tracing::warn!(
                    "vhost-user-blk {}: {e}; reconnecting",
                    self.endpoint.socket.display()
                );
                self.connect().and_then(|()| self.start(false))
            }
            other => other,
        }
    }

    /// Sends the DRIVER_OK sequence for the active queues. `resume` (after a reconnect) starts
    /// each ring at the guest's used index instead of the transport's avail position, and
    /// nudges the kick fds so requests queued meanwhile are picked up.
    fn start(&mut self, resume: bool) -> Result<(), VhostUserBlkError> {
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        let result = self.send_start(&active, resume);
        self.started = result.is_ok();
        self.active = Some(active);
        result
    }

    fn send_start(&mut self, active: &Active, resume: bool) -> Result<(), VhostUserBlkError> {
        let lost = active.features & !self.backend_features;
        if lost != 0 {
            return Err(VhostUserBlkError::FeaturesLost(lost));
        }
        self.send_inflight(active)?;
        let features = self.wire_features(active);
        if let Some(link) = self.endpoint.iotlb.clone() {
            self.request("SET_FEATURES", |f| f.set_features(features))?;
            if let Some(connection) = &self.connection {
                link.arm(connection.socket.clone());
            }
        } else {
            self.request("SET_FEATURES", |f| f.set_features(features))?;
        }
        self.send_memory()?;
        self.send_log_base()?;
        for ring in &active.rings {
            let base = if resume {
                used_index(&active.mem, ring.used_ring)
            } else {
                ring.first_avail
            };
            self.send_ring(ring, base)?;
        }
        for ring in &active.rings {
            let index = usize::from(ring.index);
            self.request("SET_VRING_ENABLE", |f| f.set_vring_enable(index, true))?;
            if resume {
                // The counter only wakes the backend; a spurious kick is harmless.
                let _ = ring.kick.write(1);
            }
        }
        Ok(())
    }

    fn send_ring(&mut self, ring: &Ring, base: u16) -> Result<(), VhostUserBlkError> {
        let regions = self.endpoint.iotlb.is_none().then_some(&self.regions[..]);
        let addresses = vring_config(regions, ring, self.log.is_some())?;
        let index = usize::from(ring.index);
        self.request("SET_VRING_NUM", |f| f.set_vring_num(index, ring.size))?;
        self.request("SET_VRING_BASE", |f| f.set_vring_base(index, base))?;
        self.request("SET_VRING_ADDR", |f| f.set_vring_addr(index, &addresses))?;
        self.request("SET_VRING_CALL", |f| f.set_vring_call(index, &ring.call))?;
        // Kicks the guest made before this are in the eventfd's counter: the backend sees
        // them as soon as it polls the fd.
        self.request("SET_VRING_KICK", |f| f.set_vring_kick(index, &ring.kick))
    }

    /// GET_INFLIGHT_FD at the first start, SET_INFLIGHT_FD every start (INFLIGHT_SHMFD only).
    fn send_inflight(&mut self, active: &Active) -> Result<(), VhostUserBlkError> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Ok(());
        }
        if self.inflight.is_none() {
            // The area covers every queue the device has, even ones the driver left disabled.
            let queues = self.exposed_queues.unwrap_or(1);
            let size = active.rings.iter().map(|r| r.size).max().unwrap_or(1);
            let ask = VhostUserInflight::new(0, 0, queues, size);
            let (info, file) = self.request("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&ask))?;
            self.inflight = Some(Inflight { info, file });
        }
        let Some(inflight) = self.inflight.take() else {
            return Ok(());
        };
        let sent = self.request("SET_INFLIGHT_FD", |f| {
            f.set_inflight_fd(&inflight.info, inflight.file.as_raw_fd())
        });
        self.inflight = Some(inflight);
        sent
    }

    /// The memory table, once per connection (sluice's guest RAM layout never changes).
    fn send_memory(&mut self) -> Result<(), VhostUserBlkError> {
        if self.memory_sent {
            return Ok(());
        }
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: r.user_addr,
                mmap_offset: r.offset,
                mmap_handle: r.fd.as_raw_fd(),
            })
            .collect();
        match self.max_mem_slots {
            Some(max) => {
                if regions.len() as u64 > max {
                    return Err(VhostUserBlkError::TooManyRegions {
                        regions: regions.len(),
                        max,
                    });
                }
                for region in &regions {
                    self.request("ADD_MEM_REG", |f| f.add_mem_region(region))?;
                }
            }
            None => {
                self.request("SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
            }
        }
        self.memory_sent = true;
        Ok(())
    }

    /// SET_FEATURES' value for `active`: what the driver negotiated, the vhost-user bit,
    /// ACCESS_PLATFORM behind the vIOMMU (the rings are IOVAs whatever the driver negotiated,
    /// as with QEMU's vhost) and LOG_ALL while a migration logs.
    fn wire_features(&self, active: &Active) -> u64 {
        let mut features = active.features | VHOST_USER_F_PROTOCOL_FEATURES;
        if self.endpoint.iotlb.is_some() {
            features |= FEATURE_ACCESS_PLATFORM;
        }
        if self.log.is_some() {
            features |= VHOST_F_LOG_ALL;
        }
        features
    }

    /// SET_LOG_BASE with the migration's log, if one is running.
    fn send_log_base(&mut self) -> Result<(), VhostUserBlkError> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        let (size, fd) = (log.log.len() as u64, log.file.as_raw_fd());
        if self.endpoint.cancel.load(Ordering::Acquire) {
            return Err(VhostUserBlkError::Cancelled);
        }
        let result = self.exchange_log_base(size, fd);
        if result.is_err() {
            // The framing may be lost with the exchange.
            self.disconnect();
        }
        result
    }

    /// SET_LOG_BASE written and its reply read here, not through the `vhost` crate's
    /// frontend: that one wants a 16-byte `VhostUserLog` back, while libvhost-user (QEMU's
    /// storage daemon) answers with a u64 and QEMU's frontend reads whatever size the header
    /// says. So does this: any reply of at most 16 bytes is the acknowledgement (its body
    /// means nothing: libvhost-user echoes the log size); a backend that refuses the log
    /// drops the connection.
    fn exchange_log_base(&mut self, size: u64, fd: RawFd) -> Result<(), VhostUserBlkError> {
        let step = "SET_LOG_BASE";
        let socket = self
            .connection
            .as_ref()
            .ok_or(VhostUserBlkError::Disconnected)?
            .socket
            .clone();
        let link = self.endpoint.iotlb.clone();
        let _wire = link.as_ref().map(|link| link.lock());
        let deadline = Instant::now() + self.endpoint.timeout;
        let failed = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::TimedOut => VhostUserBlkError::Timeout {
                step,
                timeout: self.endpoint.timeout,
            },
            _ => io_step(step)(e),
        };
        let mut message = Vec::with_capacity(VHOST_USER_HEADER_BYTES + 16);
        for word in [FRONTEND_SET_LOG_BASE, VHOST_USER_VERSION_1, 16] {
            message.extend_from_slice(&word.to_le_bytes());
        }
        message.extend_from_slice(&size.to_le_bytes());
        message.extend_from_slice(&0u64.to_le_bytes());
        let sent = socket
            .send_with_fds(&[&message[..]], &[fd])
            .map_err(|e| failed(std::io::Error::from_raw_os_error(e.errno())))?;
        write_all(&socket, &message[sent..], deadline).map_err(failed)?;
        let mut header = [0u8; VHOST_USER_HEADER_BYTES];
        read_exact(&socket, &mut header, deadline).map_err(failed)?;
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let (request, flags, len) = (word(0), word(4), word(8) as usize);
        if request != FRONTEND_SET_LOG_BASE || flags & VHOST_USER_REPLY == 0 || len > 16 {
            return Err(VhostUserBlkError::BadLogReply {
                request,
                flags,
                len,
            });
        }
        let mut body = [0u8; 16];
        read_exact(&socket, &mut body[..len], deadline).map_err(failed)?;
        Ok(())
    }

    /// Whether the backend can log the guest pages it writes (LOG_SHMFD and LOG_ALL).
    pub fn can_log(&self) -> bool {
        self.backend_features & VHOST_F_LOG_ALL != 0
            && self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD)
    }

    /// A migration starts: a log covering guest RAM, and, if the rings run, SET_LOG_BASE,
    /// LOG_ALL and each ring's log flag (QEMU's order). A reconnect replays them.
    pub fn start_logging(&mut self) -> Result<(), VhostUserBlkError> {
        if !self.can_log() {
            return Err(VhostUserBlkError::NoDirtyLog);
        }
        let end = self
            .regions
            .iter()
            .map(|r| r.guest_addr.saturating_add(r.size))
            .max()
            .unwrap_or(0);
        let (log, file) = SharedLog::create(log_bytes_for(end)).map_err(io_step("dirty log"))?;
        self.log = Some(DirtyLog { log, file });
        let result = self.send_logging();
        if result.is_err() {
            self.log = None;
        }
        result
    }

    /// Turns the backend's logging on or off (whichever `self.log` says) for running rings.
    fn send_logging(&mut self) -> Result<(), VhostUserBlkError> {
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        let result = self.send_logging_for(&active);
        self.active = Some(active);
        result
    }

    fn send_logging_for(&mut self, active: &Active) -> Result<(), VhostUserBlkError> {
        if self.connection.is_none() || !self.started {
            // The setup still to come (or the reconnect) sends everything.
            return Ok(());
        }
        self.send_log_base()?;
        let features = self.wire_features(active);
        self.send("SET_FEATURES", |f| f.set_features(features))?;
        let logged = self.log.is_some();
        for ring in &active.rings {
            let regions = self.endpoint.iotlb.is_none().then_some(&self.regions[..]);
            let addresses = vring_config(regions, ring, logged)?;
            let index = usize::from(ring.index);
            self.send("SET_VRING_ADDR", |f| f.set_vring_addr(index, &addresses))?;
        }
        Ok(())
    }

    /// The guest physical pages the backend logged since the last call, clearing them.
    pub fn take_logged(&self) -> Vec<u64> {
        self.log.as_ref().map(|l| l.log.take()).unwrap_or_default()
    }

    /// The migration ended: LOG_ALL and the ring log flags off (errors only logged: the
    /// backend that cannot hear it is gone, and a reconnect sends no log).
    pub fn stop_logging(&mut self) {
        if self.log.take().is_none() {
            return;
        }
        if let Err(e) = self.send_logging() {
            tracing::warn!("vhost-user-blk: turning dirty logging off: {e}");
        }
    }

    /// Stops the backend's rings with everything taken completed (GET_VRING_BASE) and returns
    /// each ring's (index, next avail index, used ring address); the activation is forgotten
    /// but the inflight area kept, so the next start (at these positions) is a resumption,
    /// not a reset.
    pub fn quiesce(&mut self) -> Result<Vec<(u16, u16, u64)>, VhostUserBlkError> {
        let Some(active) = self.active.take() else {
            return Ok(Vec::new());
        };
        match self.ring_bases(&active) {
            Ok(positions) => {
                self.active_mem = Some(active.mem());
                Ok(positions)
            }
            Err(e) => {
                // Still active: the reconnect (or a reset) deals with it.
                self.active = Some(active);
                Err(e)
            }
        }
    }

    /// GET_VRING_BASE for each of `active`'s rings: (index, next avail index, used ring).
    fn ring_bases(&mut self, active: &Active) -> Result<Vec<(u16, u16, u64)>, VhostUserBlkError> {
        if !self.started {
            // The backend never got these rings: they stand where the transport put them.
            return Ok(active
                .rings
                .iter()
                .map(|ring| (ring.index, ring.first_avail, ring.used_ring))
                .collect());
        }
        let mut positions = Vec::new();
        for ring in &active.rings {
            let index = usize::from(ring.index);
            let base = self.send("GET_VRING_BASE", |f| f.get_vring_base(index))?;
            let base = u16::try_from(base).map_err(|_| VhostUserBlkError::BadRingBase(base))?;
            positions.push((ring.index, base, ring.used_ring));
        }
        self.started = false;
        Ok(positions)
    }

    /// A migration's stop-and-copy: the backend's rings stop with everything taken completed
    /// (GET_VRING_BASE) and the connection closes, so that the destination's frontend can own
    /// the backend; no reconnect until [`Session::take_back`]. The activation is kept.
    pub fn hand_over(&mut self) -> Result<(), VhostUserBlkError> {
        self.held = true;
        if let Some(active) = self.active.take() {
            let stopped = self.ring_bases(&active);
            self.active = Some(active);
            stopped?;
        }
        self.disconnect();
        Ok(())
    }

    /// The migration failed after [`Session::hand_over`]: the pump reconnects and restores
    /// the rings at the guest's used indices (nothing was in flight).
    pub fn take_back(&mut self) {
        self.held = false;
    }

    /// Guest memory as the last quiesced activation saw it (its used indices).
    pub fn last_mem(&self) -> Option<&DmaSpace> {
        self.active_mem.as_ref()
    }

    /// Stops the rings (GET_VRING_BASE) and forgets the activation. Errors are logged only:
    /// a reset must always succeed from the guest's point of view. Each request is bounded by
    /// the timeout, and the first one that times out drops the connection, so the rest fail
    /// at once: a stalled backend holds the resetting vCPU for one timeout at most.
    pub fn deactivate(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        // The guest reset: nothing in flight may be replayed into its next life.
        self.inflight = None;
        if self.connection.is_none() {
            return;
        }
        for ring in &active.rings {
            let index = usize::from(ring.index);
            if let Err(e) = self.send("GET_VRING_BASE", |f| f.get_vring_base(index)) {
                tracing::warn!("vhost-user-blk: GET_VRING_BASE({}): {e}", ring.index);
            }
        }
        let reset_device = self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE);
        if reset_device && self.connection.is_some() {
            if let Err(e) = self.send("RESET_DEVICE", |f| f.reset_device()) {
                tracing::warn!("vhost-user-blk: RESET_DEVICE: {e}");
            }
        }
    }

    /// After a hang-up: a new connection, the handshake, and (if active) the whole ring setup.
    /// Returns whether the config space changed.
    pub fn reconnect(&mut self) -> Result<bool, VhostUserBlkError> {
        if self.held {
            return Err(VhostUserBlkError::HandedOver);
        }
        let before = self.config.snapshot();
        self.connect()?;
        self.start(true)?;
        Ok(before != self.config.snapshot())
    }
}

/// The used ring's `idx`: how many requests the device completed (mod 2^16).
pub(super) fn used_index(mem: &DmaSpace, used_ring: u64) -> u16 {
    used_ring
        .checked_add(2)
        .and_then(|at| mem.load::<u16>(GuestAddress(at), Ordering::Acquire).ok())
        .map(u16::from_le)
        .unwrap_or(0)
}

/// O_NONBLOCK through fcntl: std's `set_nonblocking` on a socket is an ioctl (FIONBIO), which
/// the pump's seccomp filter does not allow (it reconnects, and so makes channels, on its own).
fn set_nonblocking(socket: &UnixStream) -> std::io::Result<()> {
    let fd = socket.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor `socket` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn io_step(step: &'static str) -> impl Fn(std::io::Error) -> VhostUserBlkError {
    move |e| VhostUserBlkError::Protocol {
        step,
        source: vhost::Error::IOError(e),
    }
}
