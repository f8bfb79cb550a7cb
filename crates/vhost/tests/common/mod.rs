//! Test harness: a vhost-user frontend (the `vhost` crate's `Frontend`) with guest memory in a
//! memfd, one split ring built by hand, and a `Server` on a temporary socket serving a
//! virtio-blk model over a temporary image.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sluice_devices::block::{Block, BlockConfig, IoEngine};
use sluice_dma::DmaSpace;
use sluice_vhost::Server;
use sluice_virtio::{
    ActivateError, DeviceMetrics, QueueContext, QueueError, QueueHandler, VirtioDevice,
};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const GUEST_SIZE: usize = 1 << 20;
pub const QUEUE_SIZE: u16 = 16;
pub const DESC_GPA: u64 = 0x0;
pub const AVAIL_GPA: u64 = 0x1000;
pub const USED_GPA: u64 = 0x2000;
/// Request headers and status bytes: one 0x100 slot per head.
pub const HEADER_GPA: u64 = 0x8000;
/// Data buffers: one 0x1000 slot per head.
pub const DATA_GPA: u64 = 0x10000;
pub const IMAGE_SIZE: u64 = 1 << 20;
pub const SECTOR: usize = 512;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// A unique path in the temp directory.
pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sluice-vhost-{}-{name}", std::process::id()))
}

/// A zeroed image of `IMAGE_SIZE` bytes.
pub fn make_image(name: &str) -> PathBuf {
    let path = temp_path(&format!("{name}.img"));
    let file = File::create(&path).expect("create image");
    file.set_len(IMAGE_SIZE).expect("size image");
    path
}

pub fn read_image(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = File::open(path).expect("open image");
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, offset).expect("read image");
    data
}

/// A virtio-blk model whose queue handlers can be made to swallow requests (pop them and
/// never complete them), to leave requests in flight on purpose.
pub struct TestBlock {
    pub block: Block,
    pub stall: Arc<AtomicBool>,
}

impl VirtioDevice for TestBlock {
    fn device_type(&self) -> u32 {
        self.block.device_type()
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        self.block.queue_max_sizes()
    }
    fn device_features(&self) -> u64 {
        self.block.device_features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.block.read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.block.write_config(offset, data)
    }
    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.block.metrics()
    }
    fn queue_count_range(&self) -> std::ops::RangeInclusive<usize> {
        self.block.queue_count_range()
    }
    fn ack_features(&mut self, features: u64) -> Result<(), ActivateError> {
        self.block.ack_features(features)
    }
    fn queue_handler(
        &mut self,
        index: u16,
        size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError> {
        if self.stall.load(Ordering::SeqCst) {
            Ok(Box::new(Swallow))
        } else {
            VirtioDevice::queue_handler(&mut self.block, index, size)
        }
    }
    fn reset(&mut self) {
        self.block.reset()
    }
}

/// Pops every chain and never completes any.
struct Swallow;

impl QueueHandler for Swallow {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let mem: &DmaSpace = ctx.mem;
        let _popped = ctx.queue.pop_all(mem)?.len();
        Ok(false)
    }
}

/// A running server on a temporary socket; the thread lives until the test process exits.
pub struct TestServer {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub stall: Arc<AtomicBool>,
}

/// A server whose model runs requests synchronously (deterministic completion order).
pub fn start_server(name: &str) -> TestServer {
    start_server_with(name, IoEngine::Sync)
}

pub fn start_server_with(name: &str, engine: IoEngine) -> TestServer {
    let image = make_image(name);
    let socket = temp_path(&format!("{name}.sock"));
    let mut config = BlockConfig::new(&image);
    config.io_engine = engine;
    let block = Block::new(config).expect("open block device");
    let stall = Arc::new(AtomicBool::new(false));
    let device = TestBlock {
        block,
        stall: stall.clone(),
    };
    let server = Server::bind(&socket, device).expect("bind");
    thread::spawn(move || server.run());
    TestServer {
        socket,
        image,
        stall,
    }
}

/// Guest RAM in a memfd, mapped here too.
pub struct Guest {
    pub file: File,
    pub mem: GuestMemoryMmap,
    /// Where the frontend (this process) maps guest address 0.
    pub host_base: u64,
    avail_idx: u16,
}

impl Guest {
    pub fn new() -> Guest {
        let file = memfd("guest", GUEST_SIZE as u64);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            GUEST_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .expect("map guest memory");
        let host_base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        Guest {
            file,
            mem,
            host_base,
            avail_idx: 0,
        }
    }

    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: GUEST_SIZE as u64,
            userspace_addr: self.host_base,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    pub fn ring_config(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: self.host_base + DESC_GPA,
            used_ring_addr: self.host_base + USED_GPA,
            avail_ring_addr: self.host_base + AVAIL_GPA,
            log_addr: None,
        }
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC_GPA + 16 * u64::from(index);
        self.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        self.mem
            .write_obj(len.to_le(), GuestAddress(at + 8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), GuestAddress(at + 14))
            .unwrap();
    }

    /// Builds a 3-descriptor request at `head..head+3` (header, one data sector, status).
    pub fn build_request(&self, head: u16, kind: u32, sector: u64, data: Option<&[u8]>) {
        let header = HEADER_GPA + 0x100 * u64::from(head);
        let status = header + 0x80;
        let buffer = DATA_GPA + 0x1000 * u64::from(head);
        self.mem
            .write_obj(kind.to_le(), GuestAddress(header))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(header + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        if let Some(data) = data {
            self.mem.write_slice(data, GuestAddress(buffer)).unwrap();
        }
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE
        } else {
            0
        };
        self.write_desc(head, header, 16, VRING_DESC_F_NEXT, head + 1);
        self.write_desc(
            head + 1,
            buffer,
            SECTOR as u32,
            data_flags | VRING_DESC_F_NEXT,
            head + 2,
        );
        self.write_desc(head + 2, status, 1, VRING_DESC_F_WRITE, 0);
    }

    /// Puts `head` in the avail ring without publishing the index.
    pub fn stage(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(AVAIL_GPA + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes the staged entries.
    pub fn publish(&self) {
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL_GPA + 2))
            .unwrap();
    }

    pub fn status(&self, head: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(HEADER_GPA + 0x100 * u64::from(head) + 0x80))
            .unwrap()
    }

    pub fn data(&self, head: u16) -> Vec<u8> {
        let mut data = vec![0u8; SECTOR];
        self.mem
            .read_slice(&mut data, GuestAddress(DATA_GPA + 0x1000 * u64::from(head)))
            .unwrap();
        data
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED_GPA + 2)).unwrap())
    }

    pub fn used_id(&self, position: u16) -> u32 {
        let slot = u64::from(position % QUEUE_SIZE);
        u32::from_le(
            self.mem
                .read_obj(GuestAddress(USED_GPA + 4 + 8 * slot))
                .unwrap(),
        )
    }

    /// Waits until the used index reaches `target`.
    pub fn wait_used(&self, target: u16) -> bool {
        wait_until(|| self.used_idx() == target)
    }
}

/// Runs `test` on its own thread and fails if it takes longer than `limit`: a backend that
/// hangs fails the test instead of hanging the suite (the `vhost` crate's frontend retries
/// timed-out socket reads for ever, so socket timeouts alone do not do it).
pub fn within(limit: Duration, test: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let runner = thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(limit) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = runner.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("the test did not finish within {limit:?}: the backend hangs")
        }
    }
}

pub fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(2));
    }
    condition()
}

/// VIRTIO_F_RING_PACKED: the test guest's rings are split unless a test says otherwise.
pub const RING_PACKED: u64 = 1 << 34;
/// VIRTIO_F_ACCESS_PLATFORM: left out of [`Session::features`] (no vIOMMU) unless a test adds it.
pub const ACCESS_PLATFORM: u64 = 1 << 33;
/// VHOST_F_LOG_ALL: off unless a test (tests/dirty_log.rs) turns logging on.
pub const LOG_ALL: u64 = 1 << 26;

/// A connected frontend after the handshake (features, protocol features, owner).
pub struct Session {
    pub frontend: Frontend,
    /// The backend's features less VIRTIO_F_ACCESS_PLATFORM.
    pub features: u64,
    pub kick: EventFd,
    pub call: EventFd,
}

/// How long a test frontend waits for any one answer: a backend that hangs fails the test
/// instead of hanging it.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A `vhost` crate frontend on a fresh connection whose reads and writes time out.
pub fn frontend(socket: &Path) -> Frontend {
    let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    Frontend::from_stream(stream, 1)
}

pub fn connect(socket: &Path) -> Session {
    let mut frontend = frontend(socket);
    // A guest without a vIOMMU: addresses are guest physical (tests/iotlb.rs acks the bit).
    let features = frontend.get_features().expect("GET_FEATURES") & !ACCESS_PLATFORM;
    let protocol = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    frontend
        .set_protocol_features(protocol)
        .expect("SET_PROTOCOL_FEATURES");
    // Every request asks for an ack, so a refusal shows up at the call that caused it.
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend.set_owner().expect("SET_OWNER");
    Session {
        frontend,
        features,
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        call: EventFd::new(EFD_NONBLOCK).unwrap(),
    }
}

/// A memfd of `size` bytes (not sealed: the frontend can shrink it).
pub fn memfd(name: &str, size: u64) -> File {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated name; result checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fresh fd owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("size memfd");
    file
}

impl Session {
    pub fn protocol_features(&mut self) -> VhostUserProtocolFeatures {
        self.frontend.get_protocol_features().unwrap()
    }

    /// Split-ring features (without EVENT_IDX, so every completion signals), memory, ring 0
    /// from `base`, enabled.
    pub fn start_ring(&mut self, guest: &Guest, base: u16) {
        let event_idx = 1u64 << 29;
        let fe = &mut self.frontend;
        fe.set_features(self.features & !event_idx & !RING_PACKED & !LOG_ALL)
            .expect("SET_FEATURES");
        fe.set_mem_table(&[guest.region()]).expect("SET_MEM_TABLE");
        fe.set_vring_num(0, QUEUE_SIZE).expect("SET_VRING_NUM");
        fe.set_vring_base(0, base).expect("SET_VRING_BASE");
        fe.set_vring_addr(0, &guest.ring_config())
            .expect("SET_VRING_ADDR");
        fe.set_vring_call(0, &self.call).expect("SET_VRING_CALL");
        fe.set_vring_kick(0, &self.kick).expect("SET_VRING_KICK");
        fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Whether the backend has closed this connection.
    pub fn is_dropped(&mut self) -> bool {
        self.frontend.get_features().is_err()
    }
}

/// Opens a file read-write (for mapping an inflight fd from this side).
pub fn reopen(file: &File) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .unwrap()
}
