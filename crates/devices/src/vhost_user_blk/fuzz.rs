//! The body of the `vhost_user_backend_replies` fuzz target (fuzz/fuzz_targets/ holds a thin
//! wrapper), here so that `cargo test` replays its committed corpus (tests/fuzz_corpus.rs).
//!
//! Here sluice is the frontend and the fuzzer plays the backend. [`hostile_backend`] binds a
//! unix listener in the temp dir, and a thread serves it as a backend whose answer to each
//! request the frontend sends is taken from the input. The frontend is driven the way the VMM
//! drives it: [`VhostUserBlk::new`] (the handshake) with a 50 ms timeout, then, if that works,
//! an activation of one queue over a small memfd-backed guest memory
//! ([`ExternalQueues::start`], whose DRIVER_OK setup runs on the pump thread), a reset
//! ([`ExternalQueues::stop`], [`VirtioDevice::reset`]) and the drop.
//!
//! Checked beyond "never panics":
//! * each step returns within a bound (a stalled script costs one timeout, never a hang), and
//!   the DRIVER_OK setup finishes or marks the device NEEDS_RESET within [`SETUP_BOUND`];
//! * the device is consistent: guest-visible features only, VERSION_1 among them, 1 to the
//!   requested number of queues, a 60-byte config space whose `num_queues` is that count, and
//!   config reads at any offset that see the config space's bytes and zeroes past its end;
//! * a backend that has answered every request like a healthy one gets a working device: the
//!   handshake succeeds and the setup needs no reset (unless a timeout passed first: on a
//!   loaded machine even a healthy answer may come late);
//! * once the device is dropped, no connection to the backend is left open;
//! * every IOTLB message the frontend sends (answering a MISS, forwarding nothing else here)
//!   is a well-formed UPDATE of a range inside guest RAM as sluice maps it.
//!
//! Input: one setup byte (bit 0: ask for two queues; bit 1: activate queue 1 instead of 0;
//! bit 2: the disk sits behind a vIOMMU — the frontend then needs ACCESS_PLATFORM and
//! BACKEND_REQ, hands over a backend request channel, and runs on a translated DMA space
//! mapping guest RAM page by page, odd pages read-only; bit 3: after the setup, what a
//! migration's source does — dirty logging on (SET_LOG_BASE, whose reply sluice reads itself,
//! SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log flag), the log read (every page in
//! guest RAM), the rings quiesced (GET_VRING_BASE), logging off), then one action per request the
//! backend receives, over all connections in order. A
//! parameter past the end reads as 0. When the actions run out the backend hangs up and stops
//! listening, which ends the run without waiting for a timeout. Action `a`, kind `a & 7`:
//! * 0 the healthy answer (none to a SET without NEED_REPLY; GET_INFLIGHT_FD comes with a memfd);
//! * 1 a u64 body, the next 8 bytes (features, queue and slot counts, acks and NACKs);
//! * 2 a body of `n` (next byte) bytes from the input (a short or long GET_CONFIG, ...);
//! * 3 a raw 12-byte header from the input, then a body as in 2;
//! * 4 `n` (next byte) raw bytes from the input, no header; in a vIOMMU run whose backend has
//!   its request channel, the bytes go to the channel instead (IOTLB MISS messages, or
//!   garbage) and the next action answers the request;
//! * 5 no answer (a stall when one is expected);
//! * 6 hang up (if the frontend reconnects, its next connection takes the next actions);
//! * 7 the healthy answer twice (the second one is stale for the next request).
//!
//! Modifiers, read before the kind's own parameters, for kinds that answer (not 5 or 6):
//! bit 3 attaches a memfd of `256 * (next byte)` bytes; for kinds 0, 1, 2 and 7, bit 4 sets the
//! header's flags to the next byte, bit 5 its request code to the next byte and bit 6 its size
//! to the next 2 bytes (little endian; then it may disagree with the body). Bit 7 hangs up
//! after answering. Only action 0 counts as healthy.
//!
//! An answer shorter than the healthy one (the frontend reads a reply's full length whatever
//! its header says) is always followed by a hang-up: the frontend would otherwise wait for the
//! rest until its timeout, and most mutated inputs would cost one. Stalls come from kind 5
//! (and from answers that leave the stream out of step, such as kind 7 before a SET).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sluice_dma::{Mapping, TranslationSource};
use sluice_virtio::{ExternalQueues, NotifyPolicy, QueueBinding, VirtioDevice, VirtioInterrupt};
use vhost::vhost_user::message::{FrontendReq, VhostUserInflight, VhostUserVringState};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    ByteValued, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, Permissions,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::iotlb::{self, FEATURE_ACCESS_PLATFORM};
use super::session::{Session, VHOST_F_LOG_ALL};
use super::{
    SharedMemoryRegion, VhostUserBlk, VhostUserBlkConfig, CONFIG_NUM_QUEUES_OFFSET,
    GUEST_VISIBLE_FEATURES, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_BLK_CONFIG_SIZE,
};

/// The frontend's bound on each request: short, so that a stalled script ends fast.
pub const TIMEOUT: Duration = Duration::from_millis(50);
/// What "returns within a bound" means for one step (many timeouts, on a loaded machine).
const STEP_BOUND: Duration = Duration::from_secs(3);
/// Longest wait for the pump's DRIVER_OK setup to finish or fail (a few of the pump's
/// reconnection intervals, in the worst case).
pub const SETUP_BOUND: Duration = Duration::from_secs(6);
/// How long the setup must look finished when only the lock says so (see `wait_for_setup`).
const SETTLE: Duration = Duration::from_millis(5);
/// Connections the backend accepts in one run (the frontend reconnects at most once per step).
const MAX_CONNECTIONS: usize = 3;
const QUEUE_SIZE: u16 = 16;
const RAM_BYTES: u64 = 64 << 10;
/// Queue `n`'s descriptor table, avail and used rings start here plus `n * RING_STRIDE`.
const RING_BASE: u64 = 0x1000;
const RING_STRIDE: u64 = 0x4000;
const HEADER_BYTES: usize = 12;
/// VHOST_USER_IOTLB_MSG and SET_BACKEND_REQ_FD.
const IOTLB_MSG: u32 = 22;
const SET_BACKEND_REQ_FD: u32 = 21;
/// How long a vIOMMU run waits for the pump to read what the script put on the channel.
const CHANNEL_DRAIN: Duration = Duration::from_millis(200);
/// Largest request body the backend reads (the frontend's are far smaller).
const MAX_BODY: usize = 4096;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const KIND_MASK: u8 = 0x7;
const ATTACH_FD: u8 = 0x08;
const SET_FLAGS: u8 = 0x10;
const SET_CODE: u8 = 0x20;
const SET_SIZE: u8 = 0x40;
const HANG_UP_AFTER: u8 = 0x80;

/// What the healthy backend offers: VERSION_1, PROTOCOL_FEATURES, the ring features, MQ and
/// the usual virtio-blk bits.
const HEALTHY_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | VHOST_USER_F_PROTOCOL_FEATURES
    | VHOST_F_LOG_ALL
    | FEATURE_ACCESS_PLATFORM
    | (1 << 29) // RING_EVENT_IDX
    | (1 << 28) // RING_INDIRECT_DESC
    | (1 << 12) // BLK_F_MQ
    | (1 << 9) // BLK_F_FLUSH
    | (1 << 6) // BLK_F_BLK_SIZE
    | (1 << 2); // BLK_F_SEG_MAX
/// Every protocol feature sluice uses (MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ, CONFIG,
/// INFLIGHT_SHMFD, RESET_DEVICE, CONFIGURE_MEM_SLOTS), so healthy answers reach every request
/// (BACKEND_REQ is taken behind a vIOMMU only).
const HEALTHY_PROTOCOL_FEATURES: u64 = 0x1 | 0x2 | 0x8 | 0x20 | 0x200 | 0x1000 | 0x2000 | 0x8000;
/// VHOST_USER_SET_LOG_BASE (its reply is read by sluice, not the `vhost` crate).
const SET_LOG_BASE: u32 = 6;
const HEALTHY_QUEUES: u64 = 2;
const HEALTHY_MEM_SLOTS: u64 = 32;
const HEALTHY_INFLIGHT_BYTES: u64 = 4096;

/// What one run did, for tests of the seeds.
#[derive(Debug, Default)]
pub struct BackendOutcome {
    /// `VhostUserBlk::new`'s error, if the handshake failed.
    pub handshake_error: Option<String>,
    /// `ExternalQueues::start`'s error, if the activation was refused at once.
    pub start_error: Option<String>,
    /// `ExternalQueues::start` succeeded (the setup then ran on the pump thread).
    pub activated: bool,
    /// The device asked for a reset (its DRIVER_OK setup failed).
    pub needs_reset: bool,
    /// The request codes the backend received, in order, over every connection.
    pub requests: Vec<u32>,
    /// Connections the backend accepted.
    pub connections: usize,
    /// IOTLB UPDATEs the frontend sent (each checked to be well-formed).
    pub iotlb_updates: usize,
    /// In a migration run: dirty logging started, and the rings were quiesced.
    pub logging: bool,
    pub quiesced: bool,
}

/// Runs one input (see the module doc) and panics if a check fails.
pub fn hostile_backend(data: &[u8]) {
    run_hostile_backend(data);
}

/// Runs one input (see the module doc), panicking if a check fails; returns what happened.
pub fn run_hostile_backend(data: &[u8]) -> BackendOutcome {
    let (setup, script) = data
        .split_first()
        .map_or((0, &[][..]), |(&b, rest)| (b, rest));
    let queues = 1 + u16::from(setup & 1);
    let queue_index = u16::from((setup >> 1) & 1);
    let iommu = setup & 4 != 0;
    let migrate = setup & 8 != 0;
    let progress = Arc::new(Progress::default());
    let backend =
        Backend::start(script, progress.clone(), iommu).expect("start the scripted backend");
    let config = VhostUserBlkConfig {
        socket: backend.socket.clone(),
        queues,
        queue_size: QUEUE_SIZE,
        timeout: TIMEOUT,
        iommu,
    };
    let regions = SharedMemoryRegion::from_guest_memory(guest_memory()).expect("memfd RAM");

    let mut outcome = BackendOutcome::default();
    let (device, took) = timed("VhostUserBlk::new", STEP_BOUND, || {
        VhostUserBlk::new(config, regions)
    });
    match device {
        Err(e) => {
            let healthy = progress.lock().first_unhealthy.is_none();
            assert!(
                !healthy || took >= TIMEOUT,
                "the handshake with a healthy backend failed after {took:?}: {e}"
            );
            outcome.handshake_error = Some(e.to_string());
        }
        Ok(mut device) => {
            check_device(&device, queues, iommu);
            drive(
                &mut device,
                queue_index,
                iommu,
                migrate,
                &progress,
                &mut outcome,
            );
        }
    }

    let record = backend.finish();
    assert!(
        !record.left_open,
        "a connection stayed open after the device was dropped"
    );
    assert_eq!(record.bad_iotlb, None, "a malformed IOTLB message");
    outcome.iotlb_updates = record.iotlb_updates;
    outcome.needs_reset = record.needs_reset_at.is_some();
    outcome.requests = record.requests;
    outcome.connections = record.connections;
    outcome
}

/// DRIVER_OK of one queue, the wait for the pump's setup, then the reset.
fn drive(
    device: &mut VhostUserBlk,
    queue_index: u16,
    iommu: bool,
    migrate: bool,
    progress: &Arc<Progress>,
    outcome: &mut BackendOutcome,
) {
    let binding = queue_binding(queue_index);
    let features = device.device_features();
    let mem = if iommu {
        sluice_dma::translated(guest_memory().clone(), Box::new(RamPages))
    } else {
        sluice_dma::identity(guest_memory().clone())
    };
    let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(Interrupt(progress.clone()));
    let session = device.session.clone();
    let since = progress.lock().requests.len();
    let started = Instant::now();
    let (result, _) = timed("ExternalQueues::start", STEP_BOUND, || {
        device.start(features, mem, vec![binding], interrupt)
    });
    match result {
        Err(e) => outcome.start_error = Some(e.to_string()),
        Ok(()) => {
            outcome.activated = true;
            assert!(
                progress.wait_for_setup(&session, since, started + SETUP_BOUND),
                "the DRIVER_OK setup neither finished nor failed within {SETUP_BOUND:?}"
            );
            // The pump answers what it read before it sees the stop: let it read the MISSes.
            progress.wait_for_channel_drained(Instant::now() + CHANNEL_DRAIN);
            if migrate {
                migrate_steps(device, &session, outcome);
            }
        }
    }
    timed("ExternalQueues::stop", STEP_BOUND, || {
        ExternalQueues::stop(device)
    });
    timed("VirtioDevice::reset", STEP_BOUND, || device.reset());

    let record = progress.lock();
    if let Some(at) = record.needs_reset_at {
        let enable = record
            .requests
            .iter()
            .position(|&code| code == FrontendReq::SET_VRING_ENABLE as u32);
        // Healthy up to the setup's last request: what came after (the reset) cannot count.
        let setup_healthy = record
            .first_unhealthy
            .is_none_or(|first| enable.is_some_and(|enable| first > enable));
        let took = at.duration_since(started);
        assert!(
            !setup_healthy || took >= TIMEOUT,
            "a healthy backend's setup needed a reset after {took:?}"
        );
    }
}

/// What a migration's source does with the device: dirty logging on, its log read, the
/// rings quiesced, logging off; each step bounded.
fn migrate_steps(
    device: &mut VhostUserBlk,
    session: &Mutex<Session>,
    outcome: &mut BackendOutcome,
) {
    let locked = || session.lock().unwrap_or_else(PoisonError::into_inner);
    let (logging, _) = timed("start_logging", STEP_BOUND, || locked().start_logging());
    outcome.logging = logging.is_ok();
    let (pages, _) = timed("take_logged", STEP_BOUND, || locked().take_logged());
    assert!(
        pages.iter().all(|&page| page < RAM_BYTES >> 12),
        "logged pages outside guest RAM: {pages:?}"
    );
    let (quiesced, _) = timed("quiesce", STEP_BOUND, || ExternalQueues::quiesce(device));
    outcome.quiesced = quiesced.is_ok();
    timed("stop_logging", STEP_BOUND, || locked().stop_logging());
}

/// The vIOMMU of a vIOMMU run: guest RAM at its own address, page by page, odd pages
/// read-only; nothing beyond RAM.
#[derive(Debug)]
struct RamPages;

impl TranslationSource for RamPages {
    fn lookup(&self, iova: u64, _access: Permissions) -> Option<Mapping> {
        let page = iova & !0xfff;
        (page < RAM_BYTES).then_some(Mapping {
            iova: page,
            target: page,
            length: 0x1000,
            permissions: if page & 0x1000 != 0 {
                Permissions::Read
            } else {
                Permissions::ReadWrite
            },
        })
    }
}

/// Checks one IOTLB message the frontend sent: a 32-byte UPDATE with a valid permission whose
/// user range lies inside guest RAM as sluice maps it. Returns what is wrong, if anything.
fn check_iotlb_message(body: &[u8]) -> Option<String> {
    let Ok(bytes) = <&[u8; 32]>::try_from(body) else {
        return Some(format!("{} bytes", body.len()));
    };
    let msg = iotlb::IotlbMsg::from_bytes(bytes);
    let ram = guest_memory().iter().next()?;
    let start = ram.as_ptr() as u64;
    let inside = msg
        .uaddr
        .checked_add(msg.size)
        .is_some_and(|end| msg.uaddr >= start && end <= start + RAM_BYTES);
    let perm_ok = (iotlb::ACCESS_RO..=iotlb::ACCESS_RW).contains(&msg.perm);
    let iova_ok = msg
        .iova
        .checked_add(msg.size)
        .is_some_and(|end| end <= RAM_BYTES);
    (msg.kind != iotlb::IOTLB_UPDATE || msg.size == 0 || !inside || !perm_ok || !iova_ok)
        .then(|| format!("{msg:x?}"))
}

/// What the guest sees of a device that completed its handshake.
fn check_device(device: &VhostUserBlk, requested_queues: u16, iommu: bool) {
    let features = device.device_features();
    let visible = if iommu {
        GUEST_VISIBLE_FEATURES | FEATURE_ACCESS_PLATFORM
    } else {
        GUEST_VISIBLE_FEATURES
    };
    assert_eq!(features & !visible, 0, "{features:#x}");
    assert_eq!(
        features & FEATURE_ACCESS_PLATFORM != 0,
        iommu,
        "{features:#x}"
    );
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0, "{features:#x}");
    let sizes = device.queue_max_sizes();
    assert!(
        (1..=usize::from(requested_queues)).contains(&sizes.len()),
        "{} queues, {requested_queues} asked for",
        sizes.len()
    );
    assert!(sizes.iter().all(|&size| size == QUEUE_SIZE), "{sizes:?}");
    assert_eq!(device.queue_count_range(), 1..=sizes.len());
    assert_eq!(device.metrics().queues.len(), sizes.len());

    let space = device.config.snapshot();
    assert_eq!(space.len(), VIRTIO_BLK_CONFIG_SIZE);
    let num_queues = &space[CONFIG_NUM_QUEUES_OFFSET..CONFIG_NUM_QUEUES_OFFSET + 2];
    assert_eq!(
        usize::from(u16::from_le_bytes([num_queues[0], num_queues[1]])),
        sizes.len(),
        "num_queues in the config space"
    );
    for offset in 0..VIRTIO_BLK_CONFIG_SIZE + 8 {
        for width in [1, 2, 4, 8] {
            let mut data = [0xa5u8; 8];
            device.read_config(offset as u64, &mut data[..width]);
            let expected: Vec<u8> = (offset..offset + width)
                .map(|at| space.get(at).copied().unwrap_or(0))
                .collect();
            assert_eq!(data[..width], expected[..], "config read at {offset}");
        }
    }
    let mut far = [0xa5u8; 8];
    device.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 8], "config read at u64::MAX");
}

/// Runs `step`, failing if it took `bound` or longer; returns its value and duration.
fn timed<T>(what: &str, bound: Duration, step: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let value = step();
    let took = start.elapsed();
    assert!(took < bound, "{what} took {took:?}, the bound is {bound:?}");
    (value, took)
}

/// A memfd of `size` bytes.
fn memfd(size: u64) -> Option<File> {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"sluice-fuzz-backend".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).ok()?;
    Some(file)
}

/// Guest RAM, shared by every run: the scripted backend never maps it and the frontend only
/// reads it (the used index), so runs cannot affect each other through it.
fn guest_memory() -> &'static GuestMemoryMmap {
    static MEMORY: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEMORY.get_or_init(|| {
        let file = memfd(RAM_BYTES).expect("a memfd for the fuzz guest RAM");
        GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            RAM_BYTES as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("map the fuzz guest RAM")
    })
}

/// Queue `index` as the transport hands it over at DRIVER_OK: fresh rings inside guest RAM.
fn queue_binding(index: u16) -> QueueBinding {
    let base = RING_BASE + u64::from(index) * RING_STRIDE;
    let mut queue = Queue::new(QUEUE_SIZE).expect("a valid queue size");
    queue.set_size(QUEUE_SIZE);
    let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
    let (low, high) = split(base);
    queue.set_desc_table_address(low, high);
    let (low, high) = split(base + 0x1000);
    queue.set_avail_ring_address(low, high);
    let (low, high) = split(base + 0x2000);
    queue.set_used_ring_address(low, high);
    queue.set_ready(true);
    QueueBinding {
        index,
        queue: queue.into(),
        kick: EventFd::new(EFD_NONBLOCK).expect("a kick eventfd"),
        policy: NotifyPolicy::Interrupt,
    }
}

/// What the backend and the device's interrupts saw, shared with the run.
#[derive(Default)]
struct Progress {
    record: Mutex<Record>,
    changed: Condvar,
}

#[derive(Default)]
struct Record {
    requests: Vec<u32>,
    /// Index in `requests` of the first one answered other than healthily (or not at all).
    first_unhealthy: Option<usize>,
    connections: usize,
    /// The backend is in a connection (it reads every request sent on it).
    in_connection: bool,
    /// The backend accepts no more connections.
    done: bool,
    needs_reset_at: Option<Instant>,
    /// The run ended while a connection was still open on the frontend's side.
    left_open: bool,
    /// The backend request channel of the current connection (a duplicate), in vIOMMU runs.
    channel: Option<UnixStream>,
    /// The backend has read a request and not finished answering it.
    answering: bool,
    iotlb_updates: usize,
    /// The first malformed IOTLB message the frontend sent.
    bad_iotlb: Option<String>,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, Record> {
        // Plain data, consistent at every unlock; a failed check elsewhere must not hide here.
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Record)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }

    /// Records a request; returns its index.
    fn request(&self, code: u32) -> usize {
        let mut index = 0;
        self.update(|record| {
            index = record.requests.len();
            record.requests.push(code);
            record.answering = true;
        });
        index
    }

    /// Waits (bounded) until the backend has answered the request it read last and the
    /// frontend has read everything the script put on the channel.
    fn wait_for_channel_drained(&self, deadline: Instant) {
        loop {
            let record = self.lock();
            let answering = record.answering;
            let unread = record.channel.as_ref().map_or(0, |channel| {
                let mut bytes: libc::c_int = 0;
                // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int; unix sockets report the bytes
                // the peer has not read yet.
                let ok =
                    unsafe { libc::ioctl(channel.as_raw_fd(), libc::TIOCOUTQ, &raw mut bytes) };
                if ok == 0 {
                    bytes
                } else {
                    0
                }
            });
            drop(record);
            if (!answering && unread == 0) || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn unhealthy(&self, index: usize) {
        self.update(|record| {
            record.first_unhealthy.get_or_insert(index);
        });
    }

    /// Waits until the pump's setup is over (false if it still runs at `deadline`): the device
    /// needs a reset, or the backend read SET_VRING_ENABLE. Without REPLY_ACK a setup may also
    /// succeed with its last requests unread, when the backend hangs up under them; then the
    /// setup is taken as over once the backend is out of a connection (after reading a setup
    /// request, or for good) and the session lock, which the pump holds throughout its setup
    /// (reconnect included), has been free for [`SETTLE`].
    fn wait_for_setup(&self, session: &Mutex<Session>, since: usize, deadline: Instant) -> bool {
        let enable = FrontendReq::SET_VRING_ENABLE as u32;
        let mut settled_since: Option<(Instant, usize)> = None;
        let mut record = self.lock();
        loop {
            if record.needs_reset_at.is_some() || record.requests[since..].contains(&enable) {
                return true;
            }
            let seen = record.requests.len();
            let backend_away = record.done || (!record.in_connection && seen > since);
            drop(record);
            let pump_idle =
                backend_away && !matches!(session.try_lock(), Err(TryLockError::WouldBlock));
            settled_since = match settled_since {
                Some((at, requests)) if pump_idle && requests == seen => {
                    if at.elapsed() >= SETTLE {
                        return true;
                    }
                    Some((at, requests))
                }
                _ if pump_idle => Some((Instant::now(), seen)),
                _ => None,
            };
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Woken by the backend and the interrupts; the lock is polled.
            let poll = Duration::from_millis(1).min(deadline - now);
            record = self
                .changed
                .wait_timeout(self.lock(), poll)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The device's interrupts: only NEEDS_RESET matters here.
struct Interrupt(Arc<Progress>);

impl VirtioInterrupt for Interrupt {
    fn notify_queue(&self, _queue: u16) -> io::Result<()> {
        Ok(())
    }

    fn notify_config(&self) -> io::Result<()> {
        Ok(())
    }

    fn needs_reset(&self) {
        self.0.update(|record| {
            record.needs_reset_at.get_or_insert_with(Instant::now);
        });
    }
}

/// The scripted backend: a listener on a fresh socket path and the thread serving it.
struct Backend {
    socket: PathBuf,
    stop: EventFd,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(script: &[u8], progress: Arc<Progress>, iommu: bool) -> io::Result<Self> {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let socket = std::env::temp_dir().join(format!(
            "sluice-fuzz-backend-{}-{run}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let thread = {
            let (script, progress) = (script.to_vec(), progress.clone());
            let (socket, stop) = (socket.clone(), stop.try_clone()?);
            std::thread::Builder::new()
                .name("fuzz-backend".into())
                .spawn(move || serve(listener, &socket, &script, &progress, &stop, iommu))?
        };
        Ok(Self {
            socket,
            stop,
            progress,
            thread: Some(thread),
        })
    }

    /// Stops the backend (after the device is gone) and returns what it saw.
    fn finish(mut self) -> Record {
        self.stop_thread();
        std::mem::take(&mut *self.progress.lock())
    }

    fn stop_thread(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop_thread();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// How a connection ended.
enum End {
    /// The frontend closed it, or the backend hung up as told: the next one may follow.
    Over,
    /// The actions ran out.
    ScriptEnded,
    /// The run is over.
    Stopped,
}

fn serve(
    listener: UnixListener,
    socket: &Path,
    script: &[u8],
    progress: &Progress,
    stop: &EventFd,
    iommu: bool,
) {
    let mut script = Script { bytes: script };
    let mut connections = 0;
    // Accepted even with no actions left: the request that finds none ends the script (and
    // counts as not answered healthily).
    while connections < MAX_CONNECTIONS {
        if !wait_readable(listener.as_raw_fd(), stop) {
            break;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        connections += 1;
        progress.update(|record| {
            record.connections = connections;
            record.in_connection = true;
        });
        let end = converse(&stream, &mut script, progress, stop, iommu);
        drop(stream);
        progress.update(|record| {
            record.in_connection = false;
            record.answering = false;
            record.channel = None;
        });
        match end {
            End::Over => {}
            End::ScriptEnded | End::Stopped => break,
        }
    }
    // Unlinked before the listener closes: a later connect fails at once (ENOENT) instead of
    // being refused, which the frontend would retry for a while.
    let _ = std::fs::remove_file(socket);
    drop(listener);
    progress.update(|record| record.done = true);
}

/// Waits until `fd` is readable or hung up; false if `stop` fired first.
fn wait_readable(fd: RawFd, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is an array of two initialised pollfds that outlives the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        // The socket first: a frontend that closed before the stop still counts as closed.
        if fds[0].revents != 0 {
            return true;
        }
        if fds[1].revents != 0 {
            return false;
        }
    }
}

/// One connection: each request gets the next action's answer.
fn converse(
    stream: &UnixStream,
    script: &mut Script<'_>,
    progress: &Progress,
    stop: &EventFd,
    iommu: bool,
) -> End {
    let mut channel: Option<UnixStream> = None;
    loop {
        if !wait_readable(stream.as_raw_fd(), stop) {
            progress.update(|record| record.left_open = true);
            return End::Stopped;
        }
        let Some(mut request) = receive(stream) else {
            return End::Over;
        };
        let index = progress.request(request.code);
        if request.code == SET_BACKEND_REQ_FD {
            channel = request
                .fd
                .take()
                .map(|fd| UnixStream::from(OwnedFd::from(fd)));
            let copy = channel.as_ref().and_then(|c| c.try_clone().ok());
            progress.update(|record| record.channel = copy);
        }
        if request.code == IOTLB_MSG {
            let bad = check_iotlb_message(&request.body);
            progress.update(|record| match bad {
                Some(bad) => {
                    record.bad_iotlb.get_or_insert(bad);
                }
                None => record.iotlb_updates += 1,
            });
        }
        let mut action = script.action();
        // Behind a vIOMMU, kind 4 writes to the backend channel and the next action answers.
        while let Some(channel) = channel.as_ref().filter(|_| iommu) {
            if action.is_none_or(|a| a & KIND_MASK != 4) {
                break;
            }
            progress.unhealthy(index);
            let n = script.byte();
            let bytes = script.take(usize::from(n)).to_vec();
            let _ = send(
                channel,
                &Reply {
                    bytes,
                    fds: Vec::new(),
                },
            );
            action = script.action();
        }
        let Some(action) = action else {
            progress.unhealthy(index);
            return End::ScriptEnded;
        };
        if action != 0 {
            progress.unhealthy(index);
        }
        let keep = answer(stream, &request, action, script);
        progress.update(|record| record.answering = false);
        if !keep {
            return End::Over;
        }
    }
}

/// One request from the frontend (with the fd it carried, if any).
struct Request {
    code: u32,
    flags: u32,
    body: Vec<u8>,
    fd: Option<File>,
}

/// The next request; None when the frontend hung up (or sent half a message).
fn receive(stream: &UnixStream) -> Option<Request> {
    let mut head = [0u8; HEADER_BYTES];
    let (got, fd) = stream.recv_with_fd(&mut head).ok()?;
    if got == 0 {
        return None;
    }
    let mut reader = stream;
    reader.read_exact(&mut head[got..]).ok()?;
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let size = usize::try_from(word(8)).unwrap_or(usize::MAX).min(MAX_BODY);
    let mut body = vec![0u8; size];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        code: word(0),
        flags: word(4),
        body,
        fd,
    })
}

/// The script's bytes not yet used; past the end, parameters read as 0.
struct Script<'a> {
    bytes: &'a [u8],
}

impl<'a> Script<'a> {
    fn action(&mut self) -> Option<u8> {
        let (&first, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(first)
    }

    fn byte(&mut self) -> u8 {
        self.action().unwrap_or(0)
    }

    /// `n` bytes, fewer at the end of the script.
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    /// `n` bytes, zero-padded at the end of the script.
    fn padded(&mut self, n: usize) -> Vec<u8> {
        let mut bytes = self.take(n).to_vec();
        bytes.resize(n, 0);
        bytes
    }
}

/// One message to the frontend.
struct Reply {
    bytes: Vec<u8>,
    fds: Vec<File>,
}

/// Answers `request` as `action` says (see the module doc); false to hang up.
fn answer(stream: &UnixStream, request: &Request, action: u8, script: &mut Script<'_>) -> bool {
    let kind = action & KIND_MASK;
    if kind == 5 {
        return true;
    }
    if kind == 6 {
        return false;
    }
    let extra_fd = (action & ATTACH_FD != 0).then(|| u64::from(script.byte()) * 256);
    let replies = match kind {
        3 => {
            let mut bytes = script.padded(HEADER_BYTES);
            let n = script.byte();
            bytes.extend_from_slice(script.take(usize::from(n)));
            vec![Reply {
                bytes,
                fds: Vec::new(),
            }]
        }
        4 => {
            let n = script.byte();
            vec![Reply {
                bytes: script.take(usize::from(n)).to_vec(),
                fds: Vec::new(),
            }]
        }
        _ => framed_replies(request, action, script),
    };
    let sent: usize = replies.iter().map(|reply| reply.bytes.len()).sum();
    for mut reply in replies {
        if let Some(file) = extra_fd.and_then(memfd) {
            reply.fds.push(file);
        }
        if !send(stream, &reply) {
            return false;
        }
    }
    action & HANG_UP_AFTER == 0 && sent >= awaited_bytes(request)
}

/// How many bytes the frontend reads in answer to `request`: the healthy answer's length.
fn awaited_bytes(request: &Request) -> usize {
    let code = request.code;
    let body = if code == FrontendReq::GET_CONFIG as u32 {
        12 + VIRTIO_BLK_CONFIG_SIZE
    } else if code == FrontendReq::GET_INFLIGHT_FD as u32 {
        size_of::<VhostUserInflight>()
    } else if code == SET_LOG_BASE {
        // libvhost-user's answer (a u64); sluice-vhost's is a 16-byte `VhostUserLog`.
        8
    } else if [
        FrontendReq::GET_FEATURES,
        FrontendReq::GET_PROTOCOL_FEATURES,
        FrontendReq::GET_QUEUE_NUM,
        FrontendReq::GET_MAX_MEM_SLOTS,
        FrontendReq::GET_VRING_BASE,
    ]
    .iter()
    .any(|&get| code == get as u32)
        || request.flags & FLAG_NEED_REPLY != 0
    {
        8
    } else {
        return 0;
    };
    HEADER_BYTES + body
}

/// Kinds 0, 1, 2 and 7: a header (possibly altered) and a body.
fn framed_replies(request: &Request, action: u8, script: &mut Script<'_>) -> Vec<Reply> {
    let mut code = request.code;
    let mut flags = FLAG_VERSION | FLAG_REPLY;
    let mut size = None;
    if action & SET_FLAGS != 0 {
        flags = u32::from(script.byte());
    }
    if action & SET_CODE != 0 {
        code = u32::from(script.byte());
    }
    if action & SET_SIZE != 0 {
        size = Some(u32::from(u16::from_le_bytes([
            script.byte(),
            script.byte(),
        ])));
    }
    let altered = action & (ATTACH_FD | SET_FLAGS | SET_CODE | SET_SIZE) != 0;
    let copies = if action & KIND_MASK == 7 { 2 } else { 1 };
    let mut replies = Vec::new();
    for _ in 0..copies {
        let (body, fds) = match action & KIND_MASK {
            1 => (script.padded(8), Vec::new()),
            2 => {
                let n = script.byte();
                (script.take(usize::from(n)).to_vec(), Vec::new())
            }
            _ => match healthy(request) {
                Some(healthy) => healthy,
                // Nothing to answer, but an altered header is still sent, with no body.
                None if altered => (Vec::new(), Vec::new()),
                None => continue,
            },
        };
        let size = size.unwrap_or(body.len() as u32);
        let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len());
        for word in [code, flags, size] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes.extend_from_slice(&body);
        replies.push(Reply { bytes, fds });
    }
    replies
}

/// What a healthy backend answers: a body and the fds it carries; None for no answer.
fn healthy(request: &Request) -> Option<(Vec<u8>, Vec<File>)> {
    let value = |v: u64| Some((v.to_le_bytes().to_vec(), Vec::new()));
    let code = request.code;
    if code == FrontendReq::GET_FEATURES as u32 {
        value(HEALTHY_FEATURES)
    } else if code == FrontendReq::GET_PROTOCOL_FEATURES as u32 {
        value(HEALTHY_PROTOCOL_FEATURES)
    } else if code == FrontendReq::GET_QUEUE_NUM as u32 {
        value(HEALTHY_QUEUES)
    } else if code == FrontendReq::GET_MAX_MEM_SLOTS as u32 {
        value(HEALTHY_MEM_SLOTS)
    } else if code == FrontendReq::GET_CONFIG as u32 {
        // The request's offset, size and flags, then the config space.
        let mut body = request.body.get(..12).unwrap_or(&[0; 12]).to_vec();
        body.extend_from_slice(&healthy_config());
        Some((body, Vec::new()))
    } else if code == FrontendReq::GET_VRING_BASE as u32 {
        let asked = VhostUserVringState::from_slice(&request.body).copied();
        let state = VhostUserVringState::new(asked.map_or(0, |s| s.index), 0);
        Some((state.as_slice().to_vec(), Vec::new()))
    } else if code == SET_LOG_BASE {
        // As libvhost-user: a u64 body (the log size).
        value(
            request
                .body
                .get(..8)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))),
        )
    } else if code == FrontendReq::GET_INFLIGHT_FD as u32 {
        let asked = VhostUserInflight::from_slice(&request.body).copied()?;
        let area = memfd(HEALTHY_INFLIGHT_BYTES)?;
        let info = VhostUserInflight::new(
            HEALTHY_INFLIGHT_BYTES,
            0,
            asked.num_queues,
            asked.queue_size,
        );
        Some((info.as_slice().to_vec(), vec![area]))
    } else if request.flags & FLAG_NEED_REPLY != 0 {
        value(0)
    } else {
        None
    }
}

/// A 1 MiB disk with 512-byte blocks, a write-back cache and [`HEALTHY_QUEUES`] queues.
fn healthy_config() -> [u8; VIRTIO_BLK_CONFIG_SIZE] {
    let mut space = [0u8; VIRTIO_BLK_CONFIG_SIZE];
    space[..8].copy_from_slice(&2048u64.to_le_bytes()); // capacity in sectors
    space[12..16].copy_from_slice(&126u32.to_le_bytes()); // seg_max
    space[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
    space[32] = 1; // wce
    space[CONFIG_NUM_QUEUES_OFFSET..CONFIG_NUM_QUEUES_OFFSET + 2]
        .copy_from_slice(&(HEALTHY_QUEUES as u16).to_le_bytes());
    space
}

/// Sends `reply` whole (its fds with the first bytes); false if the frontend is gone.
fn send(stream: &UnixStream, reply: &Reply) -> bool {
    if reply.bytes.is_empty() {
        // A stream socket cannot carry fds without data.
        return true;
    }
    let fds: Vec<RawFd> = reply.fds.iter().map(AsRawFd::as_raw_fd).collect();
    // sendmsg with MSG_NOSIGNAL: a frontend that hung up is an error here, not a SIGPIPE.
    let mut sent = match stream.send_with_fds(&[&reply.bytes[..]], &fds) {
        Ok(n) => n,
        Err(_) => return false,
    };
    while sent < reply.bytes.len() {
        match stream.send_with_fds(&[&reply.bytes[sent..]], &[]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => sent += n,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_awaited_length_is_the_healthy_answers() {
        for code in 0..64 {
            for flags in [FLAG_VERSION, FLAG_VERSION | FLAG_NEED_REPLY] {
                let body_len = match code {
                    c if c == FrontendReq::GET_INFLIGHT_FD as u32 => 24,
                    c if c == FrontendReq::GET_CONFIG as u32 => 12 + VIRTIO_BLK_CONFIG_SIZE,
                    _ => 8,
                };
                let request = Request {
                    code,
                    flags,
                    body: vec![1; body_len],
                    fd: None,
                };

                let healthy = healthy(&request).map_or(0, |(body, _)| HEADER_BYTES + body.len());

                assert_eq!(
                    awaited_bytes(&request),
                    healthy,
                    "request {code}, flags {flags}"
                );
            }
        }
    }
}
