//! vhost-user-blk frontend tests without a VMM: memfd-backed guest memory, a driver-side mock
//! split queue, and a real backend (qemu-storage-daemon's vhost-user-blk export; those tests
//! print SKIP when it is not installed). Requests go guest memory → backend → image file with
//! no sluice thread touching them; interrupts come back through the pump.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sluice_virtio::{ExternalQueues, QueueBinding, VirtioDevice, VirtioInterrupt};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::*;

mod hostile;

const RAM_SIZE: u64 = 4 << 20;
const QUEUE_SIZE: u16 = 64;
const RING_BASE: u64 = 0x1000;
const BUFFER_BASE: u64 = 0x10_0000;
const IMAGE_SIZE: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

fn memfd_ram(size: u64) -> GuestMemoryMmap {
    let name = CString::new("vhost-user-blk-test").unwrap();
    // SAFETY: `name` is NUL-terminated; the flags are valid memfd flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

fn region(guest_addr: u64, size: u64, user_addr: u64) -> SharedMemoryRegion {
    SharedMemoryRegion {
        guest_addr,
        size,
        user_addr,
        fd: Arc::new(tempfile()),
        offset: 0,
    }
}

fn tempfile() -> File {
    TempFile::new_with_prefix("/tmp/sluice-vub-")
        .unwrap()
        .into_file()
}

#[test]
fn translation_needs_the_whole_range_inside_one_region() {
    let regions = [
        region(0, 0x1000, 0x7000_0000),
        region(0x10_0000, 0x2000, 0x9000_0000),
    ];

    assert_eq!(translate(&regions, 0x10, 0x10), Some(0x7000_0010));
    assert_eq!(translate(&regions, 0x10_1ff0, 0x10), Some(0x9000_1ff0));
    assert_eq!(translate(&regions, 0xff0, 0x20), None, "crosses the end");
    assert_eq!(translate(&regions, 0x8000, 1), None, "in the hole");
    assert_eq!(translate(&regions, u64::MAX - 4, 16), None, "wraps");
}

#[test]
fn regions_come_from_file_backed_memory_only() {
    let shared = memfd_ram(RAM_SIZE);
    let anonymous = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();

    let regions = SharedMemoryRegion::from_guest_memory(&shared).unwrap();

    assert_eq!(regions.len(), 1);
    assert_eq!((regions[0].guest_addr, regions[0].size), (0, RAM_SIZE));
    assert_ne!(regions[0].user_addr, 0);
    assert!(matches!(
        SharedMemoryRegion::from_guest_memory(&anonymous),
        Err(VhostUserBlkError::AnonymousMemory(0))
    ));
}

#[test]
fn connecting_to_a_missing_socket_fails_cleanly() {
    let config = VhostUserBlkConfig::new("/nonexistent/sluice-vhost-user.sock");

    let result = VhostUserBlk::new(config, Vec::new());

    assert!(matches!(result, Err(VhostUserBlkError::Connect { .. })));
}

/// A qemu-storage-daemon exporting an image over vhost-user-blk (killed on drop).
struct Qsd {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
    queues: u16,
}

impl Qsd {
    /// None (and a SKIP line) when qemu-storage-daemon is not installed.
    fn start(test: &str, image: &Path, queues: u16) -> Option<Self> {
        let socket =
            std::env::temp_dir().join(format!("sluice-vub-{}-{test}.sock", std::process::id()));
        match Self::spawn(&socket, image, queues) {
            Ok(qsd) => Some(qsd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("SKIP {test}: qemu-storage-daemon is not installed");
                None
            }
            Err(e) => panic!("qemu-storage-daemon: {e}"),
        }
    }

    fn spawn(socket: &Path, image: &Path, queues: u16) -> std::io::Result<Self> {
        let mut qsd = Self {
            child: Self::spawn_child(socket, image, queues)?,
            socket: socket.to_path_buf(),
            image: image.to_path_buf(),
            queues,
        };
        qsd.wait_for_socket();
        Ok(qsd)
    }

    fn spawn_child(socket: &Path, image: &Path, queues: u16) -> std::io::Result<Child> {
        let _ = std::fs::remove_file(socket);
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,addr.type=unix,addr.path={},node-name=f,writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "no socket from qemu-storage-daemon"
            );
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "qemu-storage-daemon exited"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn_child(&self.socket, &self.image, self.queues).unwrap();
        self.wait_for_socket();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Records interrupts so a test can wait for them.
#[derive(Default)]
struct Interrupts {
    queues: Mutex<Vec<u16>>,
    raised: Condvar,
    needs_reset: AtomicBool,
}

impl VirtioInterrupt for Interrupts {
    fn notify_queue(&self, queue: u16) -> std::io::Result<()> {
        self.queues.lock().unwrap().push(queue);
        self.raised.notify_all();
        Ok(())
    }

    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

impl Interrupts {
    fn count(&self, queue: u16) -> usize {
        let raised = self.queues.lock().unwrap();
        raised.iter().filter(|&&q| q == queue).count()
    }
}

/// The driver side of one queue.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    index: u16,
    kick: EventFd,
    next_desc: u16,
    next_buffer: u64,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, index: u16) -> Self {
        let base = RING_BASE + u64::from(index) * 0x4000;
        // A fresh ring: zeroed indices, as a driver sets it up after reset.
        mem.write_slice(&[0; 0x4000], GuestAddress(base)).unwrap();
        Driver {
            mem,
            mock: MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE),
            index,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            next_desc: 0,
            next_buffer: BUFFER_BASE + u64::from(index) * 0x10_0000,
        }
    }

    fn binding(&self) -> QueueBinding {
        let mut queue: Queue = self.mock.create_queue().unwrap();
        queue.set_event_idx(false);
        QueueBinding {
            index: self.index,
            queue: queue.into(),
            kick: self.kick.try_clone().unwrap(),
            policy: sluice_virtio::NotifyPolicy::Interrupt,
        }
    }

    fn alloc(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += (bytes.len() as u64).div_ceil(512).max(1) * 512;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// Publishes a request (header, data, status) and kicks; returns the status address.
    fn submit(&mut self, request_type: u32, sector: u64, data: &[u8]) -> (u64, u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let header = self.alloc(&header);
        let buffer = self.alloc(data);
        let status = self.alloc(&[0xff]);
        let data_flags = if request_type == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE
        } else {
            0
        };
        let first = self.next_desc;
        let descs = [
            (header, 16, 0),
            (buffer, data.len() as u32, data_flags),
            (status, 1, VRING_DESC_F_WRITE),
        ];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = flags | if last { 0 } else { VRING_DESC_F_NEXT };
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, first).unwrap();
        self.next_desc = (first + 3) % (QUEUE_SIZE - QUEUE_SIZE % 3);
        self.kick.write(1).unwrap();
        (buffer, status)
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.mock.used_addr().unchecked_add(2))
            .unwrap()
    }

    fn wait_used(&self, count: u16) {
        let deadline = Instant::now() + WAIT;
        while self.used_idx() < count {
            assert!(
                Instant::now() < deadline,
                "queue {}: used idx {} never reached {count}",
                self.index,
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

fn image() -> TempFile {
    let file = TempFile::new_with_prefix("/tmp/sluice-vub-img-").unwrap();
    file.as_file().set_len(IMAGE_SIZE).unwrap();
    file
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// DRIVER_OK with every offered feature and `driver`'s one queue; returns what records the
/// interrupts.
fn start_on_one_queue(
    device: &mut VhostUserBlk,
    mem: &GuestMemoryMmap,
    driver: &Driver<'_>,
) -> Arc<Interrupts> {
    let interrupts = Arc::new(Interrupts::default());
    let features = device.device_features();
    device
        .start(
            features,
            sluice_dma::identity(mem.clone()),
            vec![driver.binding()],
            interrupts.clone(),
        )
        .unwrap();
    interrupts
}

fn open(qsd: &Qsd, mem: &GuestMemoryMmap, queues: u16) -> VhostUserBlk {
    let mut config = VhostUserBlkConfig::new(&qsd.socket);
    config.queues = queues;
    config.queue_size = QUEUE_SIZE;
    VhostUserBlk::new(config, SharedMemoryRegion::from_guest_memory(mem).unwrap()).unwrap()
}

fn image_bytes(image: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    image.as_file().read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn offers_the_backend_disk_without_vhost_user_bits() {
    let img = image();
    let Some(qsd) = Qsd::start("offers", img.as_path(), 1) else {
        return;
    };
    let mem = memfd_ram(RAM_SIZE);

    let device = open(&qsd, &mem, 1);

    let features = device.device_features();
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    assert_eq!(features & VHOST_USER_F_PROTOCOL_FEATURES, 0);
    assert_eq!(features & !GUEST_VISIBLE_FEATURES, 0);
    assert_eq!(device.queue_max_sizes(), vec![QUEUE_SIZE]);
    let mut capacity = [0u8; 8];
    device.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), IMAGE_SIZE / 512);
    let mut past_end = [0xaa; 4];
    device.read_config(VIRTIO_BLK_CONFIG_SIZE as u64 - 2, &mut past_end);
    assert_eq!(
        &past_end[2..],
        &[0, 0],
        "bytes past the config read as zero"
    );
}

#[test]
fn guest_writes_and_reads_go_through_the_backend() {
    let img = image();
    let Some(qsd) = Qsd::start("rw", img.as_path(), 1) else {
        return;
    };
    let mem = memfd_ram(RAM_SIZE);
    let mut device = open(&qsd, &mem, 1);
    let mut driver = Driver::new(&mem, 0);
    let interrupts = Arc::new(Interrupts::default());
    // Without EVENT_IDX every completion raises an interrupt, so the pump sees each one.
    let features = device.device_features() & !(1 << VIRTIO_RING_F_EVENT_IDX);
    device
        .start(
            features,
            sluice_dma::identity(mem.clone()),
            vec![driver.binding()],
            interrupts.clone(),
        )
        .unwrap();
    let data = pattern(3, 4096);

    let (_, write_status) = driver.submit(VIRTIO_BLK_T_OUT, 8, &data);
    driver.wait_used(1);
    let (read_buffer, read_status) = driver.submit(VIRTIO_BLK_T_IN, 8, &[0; 4096]);
    driver.wait_used(2);

    assert_eq!(driver.byte(write_status), 0, "write status");
    assert_eq!(driver.byte(read_status), 0, "read status");
    assert_eq!(
        image_bytes(&img, 8 * 512, 4096),
        data,
        "image holds the write"
    );
    assert_eq!(driver.bytes(read_buffer, 4096), data, "read returns it");
    let deadline = Instant::now() + WAIT;
    while device.metrics().queues[0].requests.load(Ordering::Relaxed) < 2 {
        assert!(
            Instant::now() < deadline,
            "pump never counted 2 completions"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(interrupts.count(0) >= 1);
    device.reset();
}

/// Dirty logging and quiesce against a third-party backend (qemu-storage-daemon, whose
/// libvhost-user offers LOG_SHMFD and LOG_ALL): the log holds the pages it wrote while logging
/// ran, and a quiesced device resumes where it stopped.
#[test]
fn qemu_storage_daemon_logs_its_writes_and_resumes_after_a_quiesce() {
    let img = image();
    let Some(qsd) = Qsd::start("dirty-log", img.as_path(), 1) else {
        return;
    };
    let mem = memfd_ram(RAM_SIZE);
    let mut device = open(&qsd, &mem, 1);
    let mut driver = Driver::new(&mem, 0);
    let interrupts = start_on_one_queue(&mut device, &mem, &driver);
    let data = pattern(5, 4096);
    driver.submit(VIRTIO_BLK_T_OUT, 16, &data);
    driver.wait_used(1);

    device.session().start_logging().expect("logging starts");
    let (read_buffer, read_status) = driver.submit(VIRTIO_BLK_T_IN, 16, &[0; 4096]);
    driver.wait_used(2);
    let logged = device.session().take_logged();
    let positions = ExternalQueues::quiesce(&mut device).expect("quiesce");
    device.session().stop_logging();
    let mut binding = driver.binding();
    if let Some((_, position)) = positions.first() {
        binding.queue.set_position(*position).unwrap();
    }
    let features = device.device_features();
    device
        .start(
            features,
            sluice_dma::identity(mem.clone()),
            vec![binding],
            interrupts,
        )
        .unwrap();
    let (_, status) = driver.submit(VIRTIO_BLK_T_IN, 16, &[0; 4096]);
    driver.wait_used(3);

    let page = |addr: u64| addr >> 12;
    assert!(logged.contains(&page(read_buffer)), "{logged:?}");
    assert!(logged.contains(&page(read_status)), "{logged:?}");
    assert!(
        logged.contains(&page(driver.mock.used_addr().0)),
        "{logged:?}"
    );
    assert_eq!(
        positions
            .iter()
            .map(|(i, p)| (*i, format!("{p:?}")))
            .collect::<Vec<_>>(),
        vec![(
            0,
            format!(
                "{:?}",
                QueuePosition::Split {
                    next_avail: 2,
                    next_used: 2
                }
            )
        )]
    );
    assert_eq!(driver.bytes(read_buffer, 4096), data);
    assert_eq!(driver.byte(status), 0, "the resumed ring serves");
    device.reset();
}

#[test]
fn reset_stops_the_rings_and_a_second_activation_works() {
    let img = image();
    let Some(qsd) = Qsd::start("reset", img.as_path(), 1) else {
        return;
    };
    let mem = memfd_ram(RAM_SIZE);
    let mut device = open(&qsd, &mem, 1);
    let interrupts = Arc::new(Interrupts::default());
    let features = device.device_features();
    let mut first = Driver::new(&mem, 0);
    device
        .start(
            features,
            sluice_dma::identity(mem.clone()),
            vec![first.binding()],
            interrupts.clone(),
        )
        .unwrap();
    first.submit(VIRTIO_BLK_T_OUT, 0, &pattern(1, 512));
    first.wait_used(1);

    device.reset();
    // A request published after reset must not be served by the stopped ring.
    first.submit(VIRTIO_BLK_T_OUT, 16, &pattern(9, 512));
    std::thread::sleep(Duration::from_millis(200));
    let after_reset = first.used_idx();
    let mut second = Driver::new(&mem, 0);
    device
        .start(
            features,
            sluice_dma::identity(mem.clone()),
            vec![second.binding()],
            interrupts.clone(),
        )
        .unwrap();
    let (_, status) = second.submit(VIRTIO_BLK_T_OUT, 4, &pattern(2, 512));
    second.wait_used(1);

    assert_eq!(after_reset, 1, "a stopped ring completed a request");
    assert_eq!(second.byte(status), 0);
    assert_eq!(image_bytes(&img, 4 * 512, 512), pattern(2, 512));
    assert_eq!(image_bytes(&img, 16 * 512, 512), vec![0; 512]);
    device.reset();
}

#[test]
fn queue_count_is_capped_by_the_backend_and_advertised_in_config() {
    let img = image();
    let Some(qsd) = Qsd::start("mq", img.as_path(), 2) else {
        return;
    };
    let mem = memfd_ram(RAM_SIZE);
    let mut device = open(&qsd, &mem, 4);
    let interrupts = Arc::new(Interrupts::default());
    let mut drivers = [Driver::new(&mem, 0), Driver::new(&mem, 1)];

    let mut num_queues = [0u8; 2];
    device.read_config(CONFIG_NUM_QUEUES_OFFSET as u64, &mut num_queues);
    let features = device.device_features();
    device
        .start(
            features,
            sluice_dma::identity(mem.clone()),
            drivers.iter().map(Driver::binding).collect(),
            interrupts.clone(),
        )
        .unwrap();
    for (i, driver) in drivers.iter_mut().enumerate() {
        driver.submit(VIRTIO_BLK_T_OUT, 32 * i as u64, &pattern(i as u8, 512));
    }
    for driver in &drivers {
        driver.wait_used(1);
    }

    assert_eq!(device.queue_max_sizes().len(), 2);
    assert_eq!(u16::from_le_bytes(num_queues), 2);
    assert_eq!(image_bytes(&img, 32 * 512, 512), pattern(1, 512));
    device.reset();
}

#[test]
fn guest_config_writes_outside_wce_are_ignored() {
    let img = image();
    let Some(qsd) = Qsd::start("cfgwrite", img.as_path(), 1) else {
        return;
    };
    let mem = memfd_ram(RAM_SIZE);
    let mut device = open(&qsd, &mem, 1);
    let mut before = [0u8; VIRTIO_BLK_CONFIG_SIZE];
    device.read_config(0, &mut before);

    device.write_config(0, &[0xff; 8]);
    device.write_config(CONFIG_WCE_OFFSET, &[1, 1]);
    device.write_config(u64::MAX, &[1]);

    let mut after = [0u8; VIRTIO_BLK_CONFIG_SIZE];
    device.read_config(0, &mut after);
    assert_eq!(before, after);
}

#[test]
fn a_restarted_backend_gets_the_rings_back() {
    let img = image();
    let Some(mut qsd) = Qsd::start("reconnect", img.as_path(), 1) else {
        return;
    };
    let mem = memfd_ram(RAM_SIZE);
    let mut device = open(&qsd, &mem, 1);
    let mut driver = Driver::new(&mem, 0);
    let interrupts = start_on_one_queue(&mut device, &mem, &driver);
    driver.submit(VIRTIO_BLK_T_OUT, 0, &pattern(5, 512));
    driver.wait_used(1);

    qsd.kill();
    // Published while the backend is down: served once it is back.
    let (_, status) = driver.submit(VIRTIO_BLK_T_OUT, 64, &pattern(6, 512));
    std::thread::sleep(Duration::from_millis(300));
    qsd.restart();
    driver.wait_used(2);

    assert_eq!(driver.byte(status), 0);
    assert_eq!(image_bytes(&img, 64 * 512, 512), pattern(6, 512));
    assert!(!interrupts.needs_reset.load(Ordering::SeqCst));
    let (_, status) = driver.submit(VIRTIO_BLK_T_OUT, 65, &pattern(7, 512));
    driver.wait_used(3);
    assert_eq!(driver.byte(status), 0);
    device.reset();
}

#[test]
fn a_backend_gone_at_driver_ok_is_waited_for_not_a_reset() {
    let img = image();
    let Some(mut qsd) = Qsd::start("gone-at-driver-ok", img.as_path(), 1) else {
        return;
    };
    let mem = memfd_ram(RAM_SIZE);
    let mut device = open(&qsd, &mem, 1);
    let mut driver = Driver::new(&mem, 0);
    qsd.kill();

    // DRIVER_OK while the backend is away: the setup fails, the device waits for it.
    let interrupts = start_on_one_queue(&mut device, &mem, &driver);
    let (_, status) = driver.submit(VIRTIO_BLK_T_OUT, 8, &pattern(9, 512));
    std::thread::sleep(Duration::from_millis(300));
    qsd.restart();
    driver.wait_used(1);

    assert_eq!(driver.byte(status), 0);
    assert_eq!(image_bytes(&img, 8 * 512, 512), pattern(9, 512));
    assert!(!interrupts.needs_reset.load(Ordering::SeqCst));
    device.reset();
}
