//! One vhost-user control connection and everything needed to rebuild it: the handshake, the
//! ring setup at DRIVER_OK, teardown at reset, and the replay after a reconnect.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use sluice_dma::DmaSpace;
use sluice_virtio::QueueBinding;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    translate, SharedMemoryRegion, VhostUserBlkError, CONFIG_NUM_QUEUES_OFFSET,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_BLK_CONFIG_SIZE,
};

/// Protocol features sluice uses when the backend offers them (CONFIG is mandatory).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// Wraps a `vhost` result with the request it came from.
trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, VhostUserBlkError>;
}

impl<T> Step<T> for vhost::Result<T> {
    fn step(self, step: &'static str) -> Result<T, VhostUserBlkError> {
        self.map_err(|source| VhostUserBlkError::Protocol { step, source })
    }
}

/// What the pump needs to relay one queue's interrupts.
pub(super) struct CallQueue {
    pub index: u16,
    pub call: EventFd,
    /// Guest address of the used ring (its `idx` counts completions for the metrics).
    pub used_ring: u64,
}

/// One enabled queue as the backend was told about it.
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
struct Active {
    /// Features the driver negotiated (without the vhost-user bit).
    features: u64,
    mem: DmaSpace,
    rings: Vec<Ring>,
}

/// The inflight area from GET_INFLIGHT_FD, kept to be handed to a reconnected backend.
struct Inflight {
    info: VhostUserInflight,
    file: File,
}

pub(super) struct Session {
    socket: PathBuf,
    requested_queues: u16,
    regions: Vec<SharedMemoryRegion>,
    frontend: Option<Frontend>,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    max_queues: u16,
    max_mem_slots: Option<u64>,
    /// Whether this connection already has the memory table.
    memory_sent: bool,
    config: Vec<u8>,
    /// `num_queues` the guest sees (the backend may serve more than sluice uses).
    exposed_queues: Option<u16>,
    inflight: Option<Inflight>,
    active: Option<Active>,
}

impl Session {
    pub fn new(socket: PathBuf, requested_queues: u16, regions: Vec<SharedMemoryRegion>) -> Self {
        Self {
            socket,
            requested_queues,
            regions,
            frontend: None,
            backend_features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            max_queues: 0,
            max_mem_slots: None,
            memory_sent: false,
            config: vec![0; VIRTIO_BLK_CONFIG_SIZE],
            exposed_queues: None,
            inflight: None,
            active: None,
        }
    }

    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    pub fn max_queues(&self) -> u16 {
        self.max_queues
    }

    /// The control socket, for hang-up detection.
    pub fn socket_fd(&self) -> Option<RawFd> {
        self.frontend.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Opens the connection and runs the handshake (QEMU 7.2 order, see the module doc).
    pub fn connect(&mut self) -> Result<(), VhostUserBlkError> {
        self.frontend = None;
        self.memory_sent = false;
        let max_queues = u64::from(self.requested_queues.max(1));
        let mut frontend = Frontend::connect(&self.socket, max_queues).map_err(|source| {
            VhostUserBlkError::Connect {
                path: self.socket.clone(),
                source,
            }
        })?;
        let features = frontend.get_features().step("GET_FEATURES")?;
        if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(VhostUserBlkError::NoProtocolFeatures);
        }
        let offered = frontend
            .get_protocol_features()
            .step("GET_PROTOCOL_FEATURES")?;
        if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserBlkError::NoConfig);
        }
        let protocol = offered & wanted_protocol_features();
        frontend
            .set_protocol_features(protocol)
            .step("SET_PROTOCOL_FEATURES")?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request asks for an ack, so backend errors surface where they happen.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num().step("GET_QUEUE_NUM")?
        } else {
            1
        };
        self.max_mem_slots = if protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            Some(frontend.get_max_mem_slots().step("GET_MAX_MEM_SLOTS")?)
        } else {
            None
        };
        frontend.set_owner().step("SET_OWNER")?;
        let config = fetch_config(&mut frontend)?;
        self.backend_features = features;
        self.protocol = protocol;
        self.max_queues = u16::try_from(backend_queues).unwrap_or(u16::MAX);
        self.config = config;
        if let Some(n) = self.exposed_queues {
            self.set_config_num_queues(n);
        }
        self.frontend = Some(frontend);
        tracing::debug!(
            "vhost-user-blk {}: features {features:#x}, protocol {:#x}, {backend_queues} queues",
            self.socket.display(),
            protocol.bits()
        );
        Ok(())
    }

    /// Forgets the connection (the backend went away).
    pub fn disconnect(&mut self) {
        self.frontend = None;
        self.memory_sent = false;
    }

    fn frontend(&mut self) -> Result<&mut Frontend, VhostUserBlkError> {
        self.frontend
            .as_mut()
            .ok_or(VhostUserBlkError::Disconnected)
    }

    pub fn config_num_queues(&self) -> Option<u16> {
        let bytes = self
            .config
            .get(CONFIG_NUM_QUEUES_OFFSET..CONFIG_NUM_QUEUES_OFFSET + 2)?;
        Some(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    /// Makes the cached config advertise `queues` (sluice may use fewer than the backend has).
    pub fn set_config_num_queues(&mut self, queues: u16) {
        self.exposed_queues = Some(queues);
        if let Some(field) = self
            .config
            .get_mut(CONFIG_NUM_QUEUES_OFFSET..CONFIG_NUM_QUEUES_OFFSET + 2)
        {
            field.copy_from_slice(&queues.to_le_bytes());
        }
    }

    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let Some(tail) = self.config.get(start..) else {
            return;
        };
        let n = tail.len().min(data.len());
        data[..n].copy_from_slice(&tail[..n]);
    }

    /// Forwards a (validated) config write to the backend and updates the cache.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), VhostUserBlkError> {
        let start = usize::try_from(offset).map_err(|_| VhostUserBlkError::ConfigSize(0))?;
        let at = u32::try_from(offset).map_err(|_| VhostUserBlkError::ConfigSize(0))?;
        self.frontend()?
            .set_config(at, VhostUserConfigFlags::WRITABLE, data)
            .step("SET_CONFIG")?;
        if let Some(field) = self.config.get_mut(start..start + data.len()) {
            field.copy_from_slice(data);
        }
        Ok(())
    }

    /// Starts the backend on the driver's queues. A connection found dead is rebuilt once.
    pub fn activate(
        &mut self,
        features: u64,
        mem: DmaSpace,
        queues: Vec<QueueBinding>,
        served: u16,
    ) -> Result<Vec<CallQueue>, VhostUserBlkError> {
        self.active = None;
        let rings = queues
            .into_iter()
            .map(|binding| self.ring(binding, served))
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
        self.active = Some(Active {
            features,
            mem,
            rings,
        });
        let started = match self.start(false) {
            Err(e) if e.connection_lost() => {
                tracing::warn!(
                    "vhost-user-blk {}: {e}; reconnecting",
                    self.socket.display()
                );
                self.connect().and_then(|()| self.start(false))
            }
            other => other,
        };
        if let Err(e) = started {
            self.active = None;
            return Err(e);
        }
        Ok(calls)
    }

    /// Checks one queue binding and gives it a call eventfd.
    fn ring(&self, binding: QueueBinding, served: u16) -> Result<Ring, VhostUserBlkError> {
        if binding.index >= served {
            return Err(VhostUserBlkError::QueueOutOfRange(binding.index, served));
        }
        let queue = &binding.queue;
        let size = queue.size();
        let ring = Ring {
            index: binding.index,
            size,
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
            first_avail: queue.next_avail(),
            kick: binding.kick,
            call: EventFd::new(EFD_NONBLOCK).map_err(io_step("call eventfd"))?,
        };
        self.vring_config(&ring)?;
        Ok(ring)
    }

    /// SET_VRING_ADDR's payload: the ring parts as frontend virtual addresses.
    fn vring_config(&self, ring: &Ring) -> Result<VringConfigData, VhostUserBlkError> {
        let size = u64::from(ring.size);
        let part = |part: &'static str, gpa: u64, len: u64| {
            translate(&self.regions, gpa, len).ok_or(VhostUserBlkError::RingOutsideRam {
                queue: ring.index,
                part,
                gpa,
            })
        };
        // Split ring sizes (virtio 1.2 §2.7), event fields included.
        Ok(VringConfigData {
            queue_max_size: ring.size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: part("descriptor table", ring.desc_table, 16 * size)?,
            avail_ring_addr: part("avail ring", ring.avail_ring, 6 + 2 * size)?,
            used_ring_addr: part("used ring", ring.used_ring, 6 + 8 * size)?,
            log_addr: None,
        })
    }

    /// Sends the DRIVER_OK sequence for the active queues. `resume` (after a reconnect) starts
    /// each ring at the guest's used index instead of the transport's avail position, and
    /// nudges the kick fds so requests queued meanwhile are picked up.
    fn start(&mut self, resume: bool) -> Result<(), VhostUserBlkError> {
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        let result = self.send_start(&active, resume);
        self.active = Some(active);
        result
    }

    fn send_start(&mut self, active: &Active, resume: bool) -> Result<(), VhostUserBlkError> {
        let lost = active.features & !self.backend_features;
        if lost != 0 {
            return Err(VhostUserBlkError::FeaturesLost(lost));
        }
        self.send_inflight(active)?;
        let features = active.features | VHOST_USER_F_PROTOCOL_FEATURES;
        self.frontend()?
            .set_features(features)
            .step("SET_FEATURES")?;
        self.send_memory()?;
        for ring in &active.rings {
            let base = if resume {
                used_index(&active.mem, ring.used_ring)
            } else {
                ring.first_avail
            };
            self.send_ring(ring, base)?;
        }
        for ring in &active.rings {
            self.frontend()?
                .set_vring_enable(usize::from(ring.index), true)
                .step("SET_VRING_ENABLE")?;
            if resume {
                // The counter only wakes the backend; a spurious kick is harmless.
                let _ = ring.kick.write(1);
            }
        }
        Ok(())
    }

    fn send_ring(&mut self, ring: &Ring, base: u16) -> Result<(), VhostUserBlkError> {
        let addresses = self.vring_config(ring)?;
        let index = usize::from(ring.index);
        let frontend = self.frontend()?;
        frontend
            .set_vring_num(index, ring.size)
            .step("SET_VRING_NUM")?;
        frontend
            .set_vring_base(index, base)
            .step("SET_VRING_BASE")?;
        frontend
            .set_vring_addr(index, &addresses)
            .step("SET_VRING_ADDR")?;
        frontend
            .set_vring_call(index, &ring.call)
            .step("SET_VRING_CALL")?;
        frontend
            .set_vring_kick(index, &ring.kick)
            .step("SET_VRING_KICK")
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
            let (info, file) = self
                .frontend()?
                .get_inflight_fd(&ask)
                .step("GET_INFLIGHT_FD")?;
            self.inflight = Some(Inflight { info, file });
        }
        let Some(inflight) = self.inflight.take() else {
            return Ok(());
        };
        let sent = self.frontend().and_then(|f| {
            f.set_inflight_fd(&inflight.info, inflight.file.as_raw_fd())
                .step("SET_INFLIGHT_FD")
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
                let frontend = self.frontend()?;
                for region in &regions {
                    frontend.add_mem_region(region).step("ADD_MEM_REG")?;
                }
            }
            None => {
                self.frontend()?
                    .set_mem_table(&regions)
                    .step("SET_MEM_TABLE")?;
            }
        }
        self.memory_sent = true;
        Ok(())
    }

    /// Stops the rings (GET_VRING_BASE) and forgets the activation. Errors are logged only:
    /// a reset must always succeed from the guest's point of view.
    pub fn deactivate(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        // The guest reset: nothing in flight may be replayed into its next life.
        self.inflight = None;
        let reset_device = self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE);
        let Ok(frontend) = self.frontend() else {
            return;
        };
        for ring in &active.rings {
            if let Err(e) = frontend.get_vring_base(usize::from(ring.index)) {
                tracing::warn!("vhost-user-blk: GET_VRING_BASE({}): {e}", ring.index);
            }
        }
        if reset_device {
            if let Err(e) = frontend.reset_device() {
                tracing::warn!("vhost-user-blk: RESET_DEVICE: {e}");
            }
        }
    }

    /// After a hang-up: a new connection, the handshake, and (if active) the whole ring setup.
    /// Returns whether the config space changed.
    pub fn reconnect(&mut self) -> Result<bool, VhostUserBlkError> {
        let before = self.config.clone();
        self.connect()?;
        if let Err(e) = self.start(true) {
            if e.connection_lost() {
                self.disconnect();
            }
            return Err(e);
        }
        Ok(before != self.config)
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

fn fetch_config(frontend: &mut Frontend) -> Result<Vec<u8>, VhostUserBlkError> {
    let buf = [0u8; VIRTIO_BLK_CONFIG_SIZE];
    let (_, payload) = frontend
        .get_config(
            0,
            VIRTIO_BLK_CONFIG_SIZE as u32,
            VhostUserConfigFlags::empty(),
            &buf,
        )
        .step("GET_CONFIG")?;
    if payload.len() != VIRTIO_BLK_CONFIG_SIZE {
        return Err(VhostUserBlkError::ConfigSize(payload.len()));
    }
    Ok(payload)
}

fn io_step(step: &'static str) -> impl Fn(std::io::Error) -> VhostUserBlkError {
    move |e| VhostUserBlkError::Protocol {
        step,
        source: vhost::Error::IOError(e),
    }
}
