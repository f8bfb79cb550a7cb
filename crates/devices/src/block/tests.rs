//! virtio-blk tests without a VMM: a driver-side mock queue (virtio-queue's `MockSplitQueue`)
//! over real guest memory, a temporary image file, and the queue handler called directly.

use std::os::fd::RawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice_dma::DmaSpace;
use sluice_virtio::VirtQueue;
use sluice_virtio::{QueueContext, QueueHandler, QueueMetrics, VirtioDevice};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use sluice_storage::io_uring_available;

const QUEUE_SIZE: u16 = 64;
const RAM_SIZE: usize = 4 << 20;
/// Request buffers are allocated from here up (the rings sit below 0x1000).
const BUFFER_BASE: u64 = 0x1_0000;
const IMAGE_SIZE: u64 = 1 << 20;
const SECTORS: u64 = IMAGE_SIZE / 512;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

fn ram() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap()
}

fn image(size: u64) -> TempFile {
    let file = TempFile::new_with_prefix("/tmp/sluice-blk-test-").unwrap();
    file.as_file().set_len(size).unwrap();
    file
}

fn open(path: &Path, engine: IoEngine, read_only: bool) -> Block {
    let mut config = BlockConfig::new(path);
    config.io_engine = engine;
    config.read_only = read_only;
    config.queue_size = QUEUE_SIZE;
    config.serial = "sluice-disk-0001".to_string();
    Block::new(config).unwrap()
}

/// The engines to run data-path tests on (io_uring only where the host allows it).
fn engines() -> Vec<IoEngine> {
    if io_uring_available() {
        vec![IoEngine::IoUring, IoEngine::Sync]
    } else {
        eprintln!("io_uring unavailable here: testing the synchronous path only");
        vec![IoEngine::Sync]
    }
}

/// One descriptor as the driver writes it.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    writable: bool,
}

fn readable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: false,
    }
}

fn writable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: true,
    }
}

/// The driver side: a mock split queue, a buffer allocator, and the device's queue.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    space: DmaSpace,
    queue: VirtQueue,
    metrics: QueueMetrics,
    next_desc: u16,
    chains: u16,
    next_buffer: u64,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(0), QUEUE_SIZE);
        let queue = VirtQueue::from(mock.create_queue::<Queue>().unwrap());
        Driver {
            mem,
            mock,
            space: sluice_dma::identity(mem.clone()),
            queue,
            metrics: QueueMetrics::default(),
            next_desc: 0,
            chains: 0,
            next_buffer: BUFFER_BASE,
        }
    }

    /// A fresh buffer of `len` bytes, 512-aligned, filled with 0xee.
    fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer = (addr + u64::from(len.max(1)) + 511) & !511;
        assert!(self.next_buffer < RAM_SIZE as u64, "test RAM exhausted");
        self.mem
            .write_slice(&vec![0xee; len as usize], GuestAddress(addr))
            .unwrap();
        addr
    }

    fn header(&mut self, request_type: u32, sector: u64) -> u64 {
        let addr = self.alloc(16);
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// A one-byte status buffer preset to 0xff.
    fn status(&mut self) -> u64 {
        let addr = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(addr)).unwrap();
        addr
    }

    /// Publishes a chain; returns its head index.
    fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let count = descs.len() as u16;
        if self.next_desc + count > QUEUE_SIZE {
            self.next_desc = 0; // earlier chains are all completed by then
        }
        let first = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(d.addr, d.len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, first).unwrap();
        self.next_desc += count;
        self.chains += 1;
        first
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.mock.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// (head, len) of used entry `i`.
    fn used(&self, i: u16) -> (u32, u32) {
        let at = self
            .mock
            .used_addr()
            .unchecked_add(4 + 8 * u64::from(i % QUEUE_SIZE));
        let id = self.mem.read_obj::<u32>(at).unwrap();
        let len = self.mem.read_obj::<u32>(at.unchecked_add(4)).unwrap();
        (id, len)
    }

    /// Runs the handler (process, then complete until done) until every published chain is
    /// in the used ring.
    fn run(&mut self, handler: &mut BlockQueueHandler) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ctx = QueueContext {
            queue: &mut self.queue,
            mem: &self.space,
            metrics: &self.metrics,
        };
        handler.process(&mut ctx).unwrap();
        loop {
            let used = self
                .mem
                .read_obj::<u16>(self.mock.used_addr().unchecked_add(2))
                .unwrap();
            if used == self.chains {
                break;
            }
            assert!(Instant::now() < deadline, "requests did not complete");
            let fd = handler
                .completion_fd()
                .expect("requests pending on a synchronous handler");
            wait_readable(fd);
            handler.complete(&mut ctx).unwrap();
        }
        assert_eq!(handler.in_flight(), 0);
    }

    fn read_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    fn status_at(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn errors(&self) -> u64 {
        self.metrics.errors.load(Ordering::Relaxed)
    }

    /// Writes `data` at `sector` spread over `pieces` descriptors; returns the status.
    fn write(
        &mut self,
        handler: &mut BlockQueueHandler,
        sector: u64,
        data: &[u8],
        pieces: usize,
    ) -> u8 {
        let mut descs = vec![readable(self.header(VIRTIO_BLK_T_OUT, sector), 16)];
        for chunk in data.chunks(data.len().div_ceil(pieces)) {
            let addr = self.alloc(chunk.len() as u32);
            self.mem.write_slice(chunk, GuestAddress(addr)).unwrap();
            descs.push(readable(addr, chunk.len() as u32));
        }
        let status = self.status();
        descs.push(writable(status, 1));
        self.add_chain(&descs);
        self.run(handler);
        self.status_at(status)
    }

    /// Reads `len` bytes at `sector` into `pieces` descriptors; returns (status, data, used len).
    fn read(
        &mut self,
        handler: &mut BlockQueueHandler,
        sector: u64,
        len: usize,
        pieces: usize,
    ) -> (u8, Vec<u8>, u32) {
        let mut descs = vec![readable(self.header(VIRTIO_BLK_T_IN, sector), 16)];
        let mut buffers = Vec::new();
        let piece = len.div_ceil(pieces);
        let mut left = len;
        while left > 0 {
            let n = left.min(piece);
            let addr = self.alloc(n as u32);
            buffers.push((addr, n));
            descs.push(writable(addr, n as u32));
            left -= n;
        }
        let status = self.status();
        descs.push(writable(status, 1));
        self.add_chain(&descs);
        self.run(handler);
        let data = buffers
            .iter()
            .flat_map(|&(addr, n)| self.read_bytes(addr, n))
            .collect();
        let (_, used_len) = self.used(self.used_idx() - 1);
        (self.status_at(status), data, used_len)
    }

    /// Publishes `descs` (already laid out by the test) and runs them; returns the used entry.
    fn submit(&mut self, handler: &mut BlockQueueHandler, descs: &[Desc]) -> (u32, u32) {
        let head = self.add_chain(descs);
        self.run(handler);
        let entry = self.used(self.used_idx() - 1);
        assert_eq!(entry.0, u32::from(head));
        entry
    }

    fn segments(&mut self, segments: &[(u64, u32, u32)]) -> Desc {
        let mut bytes = Vec::new();
        for &(sector, num, flags) in segments {
            bytes.extend_from_slice(&sector.to_le_bytes());
            bytes.extend_from_slice(&num.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
        }
        let addr = self.alloc(bytes.len() as u32);
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        readable(addr, bytes.len() as u32)
    }
}

/// Whether a test descriptor lies wholly inside the test RAM.
fn in_ram(d: &Desc) -> bool {
    d.addr
        .checked_add(u64::from(d.len))
        .is_some_and(|end| end <= RAM_SIZE as u64)
}

fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack.
    unsafe { libc::poll(&raw mut pfd, 1, 1000) };
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap();
    let mut out = vec![0u8; len];
    file.read_exact_at(&mut out, offset).unwrap();
    out
}

#[test]
fn write_then_read_back_on_every_engine() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let block = open(img.as_path(), engine, false);
        let mut handler = block.queue_handler(QUEUE_SIZE);
        assert_eq!(handler.uses_io_uring(), engine == IoEngine::IoUring);
        let mem = ram();
        let mut driver = Driver::new(&mem);

        for (i, &(sector, len, pieces)) in [(0u64, 512usize, 1usize), (8, 4096, 3), (100, 65536, 7)]
            .iter()
            .enumerate()
        {
            let data = pattern(len, i as u8);
            assert_eq!(driver.write(&mut handler, sector, &data, pieces), S_OK);
            let (status, back, used_len) = driver.read(&mut handler, sector, len, pieces + 1);

            assert_eq!(status, S_OK, "{engine:?}");
            assert_eq!(back, data, "{engine:?} sector {sector}");
            assert_eq!(used_len, len as u32 + 1);
            assert_eq!(file_bytes(img.as_path(), sector * 512, len), data);
        }
        assert_eq!(driver.errors(), 0);
        assert_eq!(driver.metrics.requests.load(Ordering::Relaxed), 6);
        assert_eq!(
            driver.metrics.bytes.load(Ordering::Relaxed),
            2 * (512 + 4096 + 65536)
        );
        assert!(driver.metrics.latency.quantile(1.0) > 0);
    }
}

#[test]
fn batched_requests_complete_together() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let block = open(img.as_path(), engine, false);
        let mut handler = block.queue_handler(QUEUE_SIZE);
        let mem = ram();
        let mut driver = Driver::new(&mem);
        let mut statuses = Vec::new();
        for i in 0..8u64 {
            let data = pattern(1024, i as u8);
            let header = driver.header(VIRTIO_BLK_T_OUT, i * 2);
            let buf = driver.alloc(1024);
            mem.write_slice(&data, GuestAddress(buf)).unwrap();
            let status = driver.status();
            driver.add_chain(&[
                readable(header, 16),
                readable(buf, 1024),
                writable(status, 1),
            ]);
            statuses.push(status);
        }

        driver.run(&mut handler);

        assert!(statuses.iter().all(|&s| driver.status_at(s) == S_OK));
        for i in 0..8u64 {
            assert_eq!(
                file_bytes(img.as_path(), i * 1024, 1024),
                pattern(1024, i as u8)
            );
        }
    }
}

#[test]
fn direct_io_handles_aligned_and_unaligned_guest_buffers() {
    let img = image(IMAGE_SIZE);
    let mut config = BlockConfig::new(img.as_path());
    config.direct = true;
    config.queue_size = QUEUE_SIZE;
    let Ok(block) = Block::new(config) else {
        eprintln!("O_DIRECT unsupported on /tmp here: skipped");
        return;
    };
    let mut handler = block.queue_handler(QUEUE_SIZE);
    let mem = ram();
    let mut driver = Driver::new(&mem);
    let data = pattern(4096, 7);
    assert_eq!(driver.write(&mut handler, 16, &data, 1), S_OK);

    // A buffer starting 8 bytes into a sector forces the bounce path.
    let header = driver.header(VIRTIO_BLK_T_IN, 16);
    let buf = driver.alloc(4096 + 8) + 8;
    let status = driver.status();
    let (_, used_len) = driver.submit(
        &mut handler,
        &[
            readable(header, 16),
            writable(buf, 4096),
            writable(status, 1),
        ],
    );

    assert_eq!(driver.status_at(status), S_OK);
    assert_eq!(used_len, 4097);
    assert_eq!(driver.read_bytes(buf, 4096), data);
}

#[test]
fn indirect_chain_is_served() {
    let img = image(IMAGE_SIZE);
    let block = open(img.as_path(), IoEngine::Sync, false);
    let mut handler = block.queue_handler(QUEUE_SIZE);
    let mem = ram();
    let mut driver = Driver::new(&mem);
    let data = pattern(1024, 3);
    img.as_file().write_all_at(&data, 4 * 512).unwrap();
    // Indirect table: header, 2 data buffers, status.
    let header = driver.header(VIRTIO_BLK_T_IN, 4);
    let a = driver.alloc(512);
    let b = driver.alloc(512);
    let status = driver.status();
    let table = driver.alloc(64);
    let entries = [
        Descriptor::new(header, 16, VRING_DESC_F_NEXT as u16, 1),
        Descriptor::new(a, 512, (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16, 2),
        Descriptor::new(b, 512, (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16, 3),
        Descriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        mem.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let head = RawDescriptor::from(Descriptor::new(
        table,
        64,
        virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    driver.mock.add_desc_chains(&[head], 0).unwrap();
    driver.chains += 1;

    driver.run(&mut handler);

    assert_eq!(driver.status_at(status), S_OK);
    assert_eq!(driver.used(0), (0, 1025));
    assert_eq!(
        [driver.read_bytes(a, 512), driver.read_bytes(b, 512)].concat(),
        data
    );
}

#[test]
fn flush_and_get_id() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let block = open(img.as_path(), engine, false);
        let mut handler = block.queue_handler(QUEUE_SIZE);
        let mem = ram();
        let mut driver = Driver::new(&mem);

        let header = driver.header(VIRTIO_BLK_T_FLUSH, 0);
        let status = driver.status();
        let (_, flush_len) =
            driver.submit(&mut handler, &[readable(header, 16), writable(status, 1)]);
        assert_eq!(driver.status_at(status), S_OK);
        assert_eq!(flush_len, 1);

        let header = driver.header(VIRTIO_BLK_T_GET_ID, 0);
        let id = driver.alloc(20);
        let status = driver.status();
        let (_, id_len) = driver.submit(
            &mut handler,
            &[readable(header, 16), writable(id, 20), writable(status, 1)],
        );
        assert_eq!(driver.status_at(status), S_OK);
        assert_eq!(id_len, 21);
        let mut expected = b"sluice-disk-0001".to_vec();
        expected.resize(20, 0);
        assert_eq!(driver.read_bytes(id, 20), expected);
    }
}

#[test]
fn write_zeroes_and_discard_reach_the_file() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let block = open(img.as_path(), engine, false);
        let mut handler = block.queue_handler(QUEUE_SIZE);
        let mem = ram();
        let mut driver = Driver::new(&mem);
        let data = vec![0x5a; 256 * 1024];
        img.as_file().write_all_at(&data, 0).unwrap();
        img.as_file().sync_all().unwrap();
        let blocks_before = img.as_file().metadata().unwrap().blocks();

        // Write zeroes on sectors 8..16 (no unmap) and 16..24 (unmap allowed).
        let header = driver.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let segs = driver.segments(&[(8, 8, 0), (16, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
        let status = driver.status();
        driver.submit(
            &mut handler,
            &[readable(header, 16), segs, writable(status, 1)],
        );
        assert_eq!(driver.status_at(status), S_OK, "{engine:?}");
        assert_eq!(file_bytes(img.as_path(), 8 * 512, 8192), vec![0; 8192]);
        assert_eq!(file_bytes(img.as_path(), 0, 4096), vec![0x5a; 4096]);
        assert_eq!(file_bytes(img.as_path(), 24 * 512, 512), vec![0x5a; 512]);

        // Discard the last 128 KiB: the blocks go away and the range reads zero.
        let header = driver.header(VIRTIO_BLK_T_DISCARD, 0);
        let segs = driver.segments(&[(256, 256, 0)]);
        let status = driver.status();
        driver.submit(
            &mut handler,
            &[readable(header, 16), segs, writable(status, 1)],
        );
        assert_eq!(driver.status_at(status), S_OK);
        let blocks_after = img.as_file().metadata().unwrap().blocks();
        assert!(
            blocks_after < blocks_before,
            "{engine:?}: st_blocks {blocks_before} -> {blocks_after}"
        );
        assert_eq!(file_bytes(img.as_path(), 256 * 512, 4096), vec![0; 4096]);
        assert_eq!(img.as_file().metadata().unwrap().len(), IMAGE_SIZE);
    }
}

#[test]
fn read_only_device_refuses_writes_and_leaves_the_file_alone() {
    let img = image(IMAGE_SIZE);
    img.as_file().write_all_at(&[0x11; 512], 0).unwrap();
    let block = open(img.as_path(), IoEngine::Auto, true);
    assert_ne!(block.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    let mut handler = block.queue_handler(QUEUE_SIZE);
    let mem = ram();
    let mut driver = Driver::new(&mem);

    let status = driver.write(&mut handler, 0, &[0x22; 512], 1);

    assert_eq!(status, S_IOERR);
    assert_eq!(file_bytes(img.as_path(), 0, 512), vec![0x11; 512]);
    assert_eq!(driver.errors(), 1);
    let (status, data, _) = driver.read(&mut handler, 0, 512, 1);
    assert_eq!((status, data), (S_OK, vec![0x11; 512]));
}

#[test]
fn second_open_of_a_locked_image_fails_cleanly() {
    let img = image(IMAGE_SIZE);
    let _first = open(img.as_path(), IoEngine::Sync, false);

    let second = Block::new(BlockConfig::new(img.as_path()));

    let err = second.unwrap_err();
    assert!(
        matches!(err, BlockError::Image(ImageError::Locked { .. })),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains(&img.as_path().display().to_string()));
}

#[test]
fn bad_configs_are_refused() {
    let img = image(IMAGE_SIZE);
    let mut serial = BlockConfig::new(img.as_path());
    serial.serial = "x".repeat(21);
    let mut block_size = BlockConfig::new(img.as_path());
    block_size.logical_block_size = Some(1000);
    let odd = image(1000);

    assert!(matches!(
        Block::new(serial),
        Err(BlockError::SerialTooLong(21))
    ));
    assert!(matches!(
        Block::new(block_size),
        Err(BlockError::BlockSize(1000))
    ));
    assert!(matches!(
        Block::new(BlockConfig::new(odd.as_path())),
        Err(BlockError::Image(ImageError::UnalignedSize {
            size: 1000,
            ..
        }))
    ));
    assert!(matches!(
        Block::new(BlockConfig::new("/nonexistent/disk.img")),
        Err(BlockError::Image(ImageError::Open { .. }))
    ));
}

#[test]
fn config_space_and_features() {
    let img = image(IMAGE_SIZE);
    let mut config = BlockConfig::new(img.as_path());
    config.queues = 4;
    config.logical_block_size = Some(4096);
    let block = Block::new(config).unwrap();
    let mut space = [0u8; 64];

    block.read_config(0, &mut space);

    assert_eq!(u64::from_le_bytes(space[0..8].try_into().unwrap()), SECTORS);
    assert_eq!(u32::from_le_bytes(space[20..24].try_into().unwrap()), 4096);
    assert_eq!(u16::from_le_bytes(space[34..36].try_into().unwrap()), 4);
    assert_eq!(u32::from_le_bytes(space[40..44].try_into().unwrap()), 16);
    assert_eq!(space[56], 1);
    assert_eq!(&space[60..], &[0; 4]);
    let mut tail = [0xffu8; 4];
    block.read_config(u64::MAX - 1, &mut tail);
    assert_eq!(tail, [0; 4]);
    let features = block.device_features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(features & (1 << 32), 0, "VERSION_1");
    assert_eq!(block.queue_max_sizes(), vec![256; 4]);
}

/// A hostile chain and what the device must answer.
struct Hostile {
    name: &'static str,
    build: fn(&mut Driver<'_>) -> (Vec<Desc>, Option<u64>),
    /// Expected status byte, or None for a zero-length used entry.
    expect: Option<u8>,
}

fn header_plus(
    d: &mut Driver<'_>,
    request_type: u32,
    sector: u64,
    data: Desc,
) -> (Vec<Desc>, Option<u64>) {
    let header = d.header(request_type, sector);
    let status = d.status();
    (
        vec![readable(header, 16), data, writable(status, 1)],
        Some(status),
    )
}

fn hostile_chains() -> Vec<Hostile> {
    vec![
        Hostile {
            name: "header too short",
            build: |d| {
                let header = d.header(VIRTIO_BLK_T_IN, 0);
                let data = d.alloc(512);
                let status = d.status();
                (
                    vec![
                        readable(header, 8),
                        writable(data, 512),
                        writable(status, 1),
                    ],
                    Some(status),
                )
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "missing status",
            build: |d| {
                let header = d.header(VIRTIO_BLK_T_FLUSH, 0);
                (vec![readable(header, 16)], None)
            },
            expect: None,
        },
        Hostile {
            name: "status not writable",
            build: |d| {
                let header = d.header(VIRTIO_BLK_T_FLUSH, 0);
                let status = d.status();
                (vec![readable(header, 16), readable(status, 1)], None)
            },
            expect: None,
        },
        Hostile {
            name: "status outside RAM",
            build: |d| {
                let header = d.header(VIRTIO_BLK_T_FLUSH, 0);
                (
                    vec![readable(header, 16), writable(0xdead_0000_0000, 1)],
                    None,
                )
            },
            expect: None,
        },
        Hostile {
            name: "readable after writable",
            build: |d| {
                let header = d.header(VIRTIO_BLK_T_IN, 0);
                let data = d.alloc(512);
                let extra = d.alloc(512);
                let status = d.status();
                (
                    vec![
                        readable(header, 16),
                        writable(data, 512),
                        readable(extra, 512),
                        writable(status, 1),
                    ],
                    Some(status),
                )
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "data not a multiple of 512",
            build: |d| {
                let data = d.alloc(100);
                header_plus(d, VIRTIO_BLK_T_IN, 0, writable(data, 100))
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "sector past capacity",
            build: |d| {
                let data = d.alloc(512);
                header_plus(d, VIRTIO_BLK_T_IN, SECTORS, writable(data, 512))
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "last sector straddles the end",
            build: |d| {
                let data = d.alloc(1024);
                header_plus(d, VIRTIO_BLK_T_OUT, SECTORS - 1, readable(data, 1024))
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "sector + len overflows u64",
            build: |d| {
                let data = d.alloc(512);
                header_plus(d, VIRTIO_BLK_T_IN, u64::MAX / 512, writable(data, 512))
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "sector * 512 overflows u64",
            build: |d| {
                let data = d.alloc(512);
                header_plus(d, VIRTIO_BLK_T_OUT, u64::MAX, readable(data, 512))
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "data buffer outside RAM",
            build: |d| header_plus(d, VIRTIO_BLK_T_IN, 0, writable(0xdead_0000_0000, 512)),
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "data buffer wraps the address space",
            build: |d| header_plus(d, VIRTIO_BLK_T_OUT, 0, readable(u64::MAX - 255, 512)),
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "data buffer runs off the end of RAM",
            build: |d| header_plus(d, VIRTIO_BLK_T_IN, 0, writable(RAM_SIZE as u64 - 512, 1024)),
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "zero-length data buffer",
            build: |d| {
                let data = d.alloc(512);
                header_plus(d, VIRTIO_BLK_T_IN, 0, writable(data, 0))
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "read into a device-readable buffer",
            build: |d| {
                let data = d.alloc(512);
                header_plus(d, VIRTIO_BLK_T_IN, 0, readable(data, 512))
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "write data in a device-writable buffer",
            build: |d| {
                let data = d.alloc(512);
                header_plus(d, VIRTIO_BLK_T_OUT, 0, writable(data, 512))
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "unknown request type",
            build: |d| {
                let header = d.header(0x7777, 0);
                let status = d.status();
                (
                    vec![readable(header, 16), writable(status, 1)],
                    Some(status),
                )
            },
            expect: Some(S_UNSUPP),
        },
        Hostile {
            name: "discard with reserved flags",
            build: |d| {
                let segs = d.segments(&[(0, 8, 1)]);
                header_plus(d, VIRTIO_BLK_T_DISCARD, 0, segs)
            },
            expect: Some(S_UNSUPP),
        },
        Hostile {
            name: "write zeroes past capacity",
            build: |d| {
                let segs = d.segments(&[(SECTORS - 4, 8, 0)]);
                header_plus(d, VIRTIO_BLK_T_WRITE_ZEROES, 0, segs)
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "truncated discard segment",
            build: |d| {
                let segs = d.segments(&[(0, 8, 0)]);
                let short = Desc { len: 10, ..segs };
                header_plus(d, VIRTIO_BLK_T_DISCARD, 0, short)
            },
            expect: Some(S_IOERR),
        },
        Hostile {
            name: "too many discard segments",
            build: |d| {
                let segs = d.segments(&[(0, 1, 0); 17]);
                header_plus(d, VIRTIO_BLK_T_DISCARD, 0, segs)
            },
            expect: Some(S_IOERR),
        },
    ]
}

#[test]
fn hostile_chains_complete_with_errors() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        img.as_file().write_all_at(&[0x33; 4096], 0).unwrap();
        let block = open(img.as_path(), engine, false);
        let mut handler = block.queue_handler(QUEUE_SIZE);
        let mem = ram();
        let mut driver = Driver::new(&mem);

        for (i, case) in hostile_chains().iter().enumerate() {
            let (descs, status) = (case.build)(&mut driver);
            let buffers_before: Vec<Vec<u8>> = descs
                .iter()
                .filter(|d| in_ram(d))
                .map(|d| driver.read_bytes(d.addr, d.len as usize))
                .collect();

            let (_, used_len) = driver.submit(&mut handler, &descs);

            match (case.expect, status) {
                (Some(code), Some(addr)) => {
                    assert_eq!(driver.status_at(addr), code, "{engine:?}: {}", case.name);
                    assert_eq!(used_len, 1, "{}", case.name);
                }
                _ => assert_eq!(used_len, 0, "{}", case.name),
            }
            assert_eq!(driver.errors(), i as u64 + 1, "{}", case.name);
            // No data buffer was written: only status bytes may change.
            let buffers_after: Vec<Vec<u8>> = descs
                .iter()
                .filter(|d| in_ram(d))
                .map(|d| driver.read_bytes(d.addr, d.len as usize))
                .collect();
            for (before, after) in buffers_before.iter().zip(&buffers_after) {
                if before.len() > 1 {
                    assert_eq!(before, after, "{}: guest buffer modified", case.name);
                }
            }
        }
        assert_eq!(file_bytes(img.as_path(), 0, 4096), vec![0x33; 4096]);
        assert_eq!(
            file_bytes(img.as_path(), IMAGE_SIZE - 4096, 4096),
            vec![0; 4096]
        );
    }
}

#[test]
fn fuzz_entry_survives_random_inputs() {
    let mut state = 0x1234_5678_9abc_def0_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut parsed = 0;
    for round in 0..3000 {
        let len = (next() % 4096) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Bias half the inputs toward plausible chains: a real header first, then random
        // buffers at small addresses, the avail ring pointing at descriptor 0.
        if round % 2 == 0 && bytes.len() >= 0x410 {
            for d in 0..4usize {
                let at = d * 16;
                let (addr, len) = if d == 0 {
                    (0x400, 16)
                } else {
                    (0x800 + (next() % 0x800), (next() % 1100) as u32)
                };
                bytes[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                bytes[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
                bytes[at + 12] = if d == 0 { 1 } else { bytes[at + 12] & 0x3 };
                bytes[at + 13] = 0;
                bytes[at + 14..at + 16].copy_from_slice(&(d as u16 + 1).to_le_bytes());
            }
            let types = [0u32, 1, 4, 8, 11, 13];
            let request_type = types[(next() % types.len() as u64) as usize];
            bytes[0x400..0x404].copy_from_slice(&request_type.to_le_bytes());
            bytes[0x408..0x410].copy_from_slice(&(next() % 4096).to_le_bytes());
            bytes[0x104] = 0;
            bytes[0x105] = 0;
        }

        if let FuzzOutcome::Parsed(_) = parse_request_for_fuzz(&bytes, round % 3 == 0) {
            parsed += 1;
        }
    }
    assert!(parsed > 0, "the fuzz harness never reached a valid request");
}

#[test]
fn fuzz_entry_parses_a_well_formed_read() {
    let mut bytes = vec![0u8; 0x1000];
    let descs = [
        Descriptor::new(0x400, 16, VRING_DESC_F_NEXT as u16, 1),
        Descriptor::new(
            0x800,
            512,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        ),
        Descriptor::new(0xa00, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        let raw = RawDescriptor::from(*d);
        bytes[i * 16..i * 16 + 16].copy_from_slice(vm_memory::ByteValued::as_slice(&raw));
    }
    bytes[0x400..0x404].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    bytes[0x408..0x410].copy_from_slice(&3u64.to_le_bytes());

    let outcome = parse_request_for_fuzz(&bytes, true);

    let FuzzOutcome::Parsed(request) = outcome else {
        panic!("not parsed: {outcome:?}");
    };
    assert_eq!(request.status_addr, GuestAddress(0xa00));
    assert!(matches!(
        request.kind,
        RequestKind::Read {
            sector: 3,
            len: 512,
            ..
        }
    ));
}

#[test]
fn dropping_a_handler_waits_for_in_flight_io() {
    if !io_uring_available() {
        return;
    }
    let img = image(IMAGE_SIZE);
    let block = open(img.as_path(), IoEngine::IoUring, false);
    let mut handler = block.queue_handler(QUEUE_SIZE);
    let mem = ram();
    let mut driver = Driver::new(&mem);
    let header = driver.header(VIRTIO_BLK_T_OUT, 0);
    let buf = driver.alloc(65536);
    let status = driver.status();
    driver.add_chain(&[
        readable(header, 16),
        readable(buf, 65536),
        writable(status, 1),
    ]);
    let mut ctx = QueueContext {
        queue: &mut driver.queue,
        mem: &driver.space,
        metrics: &driver.metrics,
    };
    handler.process(&mut ctx).unwrap();
    let submitted = handler.in_flight();

    drop(handler);

    assert_eq!(submitted, 1);
    assert_eq!(file_bytes(img.as_path(), 0, 65536), vec![0xee; 65536]);
}

#[test]
fn short_reads_from_a_shrunken_image_are_errors_not_success() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        img.as_file()
            .write_all_at(&[0x44; 4096], IMAGE_SIZE / 2 - 2048)
            .unwrap();
        let block = open(img.as_path(), engine, false);
        let mut handler = block.queue_handler(QUEUE_SIZE);
        let mem = ram();
        let mut driver = Driver::new(&mem);
        // Someone truncates the image behind the device's back.
        img.as_file().set_len(IMAGE_SIZE / 2).unwrap();

        let straddling = driver.read(&mut handler, IMAGE_SIZE / 2 / 512 - 4, 4096, 2);
        let beyond = driver.read(&mut handler, IMAGE_SIZE / 2 / 512 + 8, 512, 1);

        assert_eq!(straddling.0, S_IOERR, "{engine:?}");
        assert_eq!(straddling.2, 1, "no data claimed on error");
        assert_eq!(beyond.0, S_IOERR, "{engine:?}");
        assert_eq!(driver.errors(), 2);
    }
}

#[derive(Default)]
struct RecordingInterrupt {
    queues: std::sync::Mutex<Vec<u16>>,
    resets: std::sync::atomic::AtomicU32,
}

impl sluice_virtio::VirtioInterrupt for RecordingInterrupt {
    fn notify_queue(&self, queue: u16) -> std::io::Result<()> {
        self.queues.lock().unwrap().push(queue);
        Ok(())
    }

    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn needs_reset(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn activated_device_serves_kicks_through_a_queue_worker_until_reset() {
    let img = image(IMAGE_SIZE);
    let mut block = open(img.as_path(), IoEngine::Auto, false);
    let mem = ram();
    let mut driver = Driver::new(&mem);
    let data = pattern(2048, 9);
    let header = driver.header(VIRTIO_BLK_T_OUT, 10);
    let buf = driver.alloc(2048);
    mem.write_slice(&data, GuestAddress(buf)).unwrap();
    let status = driver.status();
    driver.add_chain(&[
        readable(header, 16),
        readable(buf, 2048),
        writable(status, 1),
    ]);
    let kick = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let interrupt = std::sync::Arc::new(RecordingInterrupt::default());
    let binding = sluice_virtio::QueueBinding {
        index: 0,
        queue: driver.mock.create_queue::<Queue>().unwrap().into(),
        kick: kick.try_clone().unwrap(),
        policy: sluice_virtio::NotifyPolicy::Interrupt,
    };
    let features = block.device_features();

    let active = sluice_virtio::ActiveQueues::start(
        &mut block,
        "blk",
        features,
        driver.space.clone(),
        vec![binding],
        interrupt.clone(),
    )
    .unwrap();
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while driver.used_idx() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    while interrupt.queues.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    active.reset(&mut block);

    assert_eq!(driver.used_idx(), 1);
    assert_eq!(driver.status_at(status), S_OK);
    assert_eq!(file_bytes(img.as_path(), 10 * 512, 2048), data);
    assert_eq!(*interrupt.queues.lock().unwrap(), vec![0]);
    assert_eq!(interrupt.resets.load(Ordering::SeqCst), 0);
    let metrics = block.metrics();
    assert_eq!(metrics.queues[0].requests.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.queues[0].bytes.load(Ordering::Relaxed), 2048);
}

#[test]
fn activate_refuses_more_queues_than_offered() {
    let img = image(IMAGE_SIZE);
    let mut block = open(img.as_path(), IoEngine::Sync, false);
    let mem = ram();
    let driver = Driver::new(&mem);
    let binding = |index| sluice_virtio::QueueBinding {
        index,
        queue: driver.mock.create_queue::<Queue>().unwrap().into(),
        kick: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        policy: sluice_virtio::NotifyPolicy::Interrupt,
    };

    let features = block.device_features();

    let result = sluice_virtio::ActiveQueues::start(
        &mut block,
        "blk",
        features,
        driver.space.clone(),
        vec![binding(0), binding(1)],
        std::sync::Arc::new(RecordingInterrupt::default()),
    );

    assert!(matches!(
        result,
        Err(sluice_virtio::ActivateError::QueueCount {
            got: 2,
            min: 1,
            max: 1
        })
    ));
}

/// Defect 5: DISCARD / WRITE_ZEROES whose segments all have 0 sectors queued no SQE on the
/// io_uring path, so the request never completed and its slot leaked.
#[test]
fn zero_sector_discard_and_write_zeroes_complete_without_leaking() {
    // The mock avail ring does not wrap: a fresh driver (same handler) every BATCH chains.
    const BATCHES: u16 = 40;
    const BATCH: u16 = 50;
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let block = open(img.as_path(), engine, false);
        let mut handler = block.queue_handler(QUEUE_SIZE);
        let mem = ram();
        let mut peak_in_flight = 0;
        let mut requests = 0;

        for batch in 0..BATCHES {
            let mut driver = Driver::new(&mem);
            let header_discard = driver.header(VIRTIO_BLK_T_DISCARD, 0);
            let header_zeroes = driver.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
            let segs = driver.segments(&[(8, 0, 0), (16, 0, 0)]);
            let status = driver.status();
            for round in 0..BATCH {
                let header = if round % 2 == 0 {
                    header_discard
                } else {
                    header_zeroes
                };
                mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
                let head = driver.add_chain(&[readable(header, 16), segs, writable(status, 1)]);
                let mut ctx = QueueContext {
                    queue: &mut driver.queue,
                    mem: &driver.space,
                    metrics: &driver.metrics,
                };
                handler.process(&mut ctx).unwrap();
                if let (true, Some(fd)) = (handler.in_flight() > 0, handler.completion_fd()) {
                    // Give the ring a chance: a request really in flight completes.
                    wait_readable(fd);
                    handler.complete(&mut ctx).unwrap();
                }
                peak_in_flight = peak_in_flight.max(handler.in_flight());

                let at = format!("{engine:?}: batch {batch} round {round}");
                assert_eq!(driver.used_idx(), round + 1, "{at}: never completed");
                assert_eq!(driver.used(round), (u32::from(head), 1), "{at}");
                assert_eq!(driver.status_at(status), S_OK, "{at}");
            }
            requests += driver.metrics.requests.load(Ordering::Relaxed);
            assert_eq!(driver.errors(), 0);
        }

        assert_eq!(handler.in_flight(), 0, "{engine:?}");
        assert_eq!(
            peak_in_flight, 0,
            "{engine:?}: slots held by no-op requests"
        );
        assert_eq!(requests, u64::from(BATCHES * BATCH));
    }
}

/// qemu-storage-daemon exporting `image` writable over NBD, daemonized: `Ok(pid)` once it has
/// opened the image, `Err(stderr)` if it refused to. `None` when the tool is not installed.
fn qemu_storage_daemon(image: &Path, dir: &Path) -> Option<Result<i32, String>> {
    let pidfile = dir.join("qsd.pid");
    let output = std::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--nbd-server")
        .arg(format!(
            "addr.type=unix,addr.path={}",
            dir.join("nbd.sock").display()
        ))
        .args([
            "--export",
            "type=nbd,id=e0,node-name=f0,writable=on",
            "--daemonize",
        ])
        .arg("--pidfile")
        .arg(&pidfile)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) => {
            eprintln!("SKIP: qemu-storage-daemon not runnable ({e})");
            return None;
        }
    };
    if !output.status.success() {
        return Some(Err(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    Some(Ok(pid.trim().parse().unwrap()))
}

fn stop_daemon(pid: i32) {
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Defect 10: sluice's image lock must keep QEMU's writers out (QEMU uses OFD byte locks).
#[test]
fn qemu_refuses_an_image_sluice_holds() {
    let dir = temp_dir("qemu-lock-a");
    let img = image(IMAGE_SIZE);
    let _block = open(img.as_path(), IoEngine::Sync, false);

    let Some(qemu) = qemu_storage_daemon(img.as_path(), &dir) else {
        return;
    };

    if let Ok(pid) = qemu {
        stop_daemon(pid);
        panic!("qemu-storage-daemon opened an image sluice holds for writing");
    }
    let stderr = qemu.unwrap_err();
    assert!(stderr.contains("lock"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Defect 10, the other way: an image QEMU writes is refused with a clear message.
#[test]
fn sluice_refuses_an_image_qemu_holds() {
    let dir = temp_dir("qemu-lock-b");
    let img = image(IMAGE_SIZE);
    let Some(qemu) = qemu_storage_daemon(img.as_path(), &dir) else {
        return;
    };
    let pid = qemu.expect("qemu-storage-daemon could not open a fresh image");

    let mut read_only = BlockConfig::new(img.as_path());
    read_only.read_only = true;
    let results = [
        Block::new(BlockConfig::new(img.as_path())),
        Block::new(read_only),
    ];
    stop_daemon(pid);
    let after = Block::new(BlockConfig::new(img.as_path()));

    for result in results {
        let err = result.expect_err("sluice opened an image QEMU holds for writing");
        assert!(
            matches!(err, BlockError::Image(ImageError::Locked { .. })),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&img.as_path().display().to_string()),
            "{text}"
        );
        assert!(text.contains("QEMU"), "{text}");
    }
    assert!(
        after.is_ok(),
        "lock not released with the daemon: {:?}",
        after.err()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loop device over a fresh file with 4096-byte logical sectors, detached on drop.
struct LoopDevice {
    path: std::path::PathBuf,
    _backing: TempFile,
}

impl LoopDevice {
    fn with_4k_sectors(size: u64) -> Option<LoopDevice> {
        let backing = image(size);
        let output = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size", "4096"])
            .arg(backing.as_path())
            .output();
        match output {
            Ok(out) if out.status.success() => {
                let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Some(LoopDevice {
                    path: path.into(),
                    _backing: backing,
                })
            }
            Ok(out) => {
                eprintln!(
                    "SKIP: no loop device ({})",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: losetup not runnable ({e})");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status();
    }
}

fn blk_size_of(block: &Block) -> u32 {
    let mut bytes = [0u8; 4];
    block.read_config(20, &mut bytes);
    u32::from_le_bytes(bytes)
}

/// Defect 11: with direct=on a 4K-sector host disk must be advertised with 4K blocks (the guest
/// then issues 4K-aligned I/O, which O_DIRECT accepts); a smaller explicit size is refused.
#[test]
fn direct_io_on_a_4k_sector_disk_advertises_4k_blocks() {
    let Some(disk) = LoopDevice::with_4k_sectors(IMAGE_SIZE) else {
        return;
    };
    let mut config = BlockConfig::new(&disk.path);
    config.direct = true;
    config.queue_size = QUEUE_SIZE;

    for engine in engines() {
        config.io_engine = engine;
        let block = Block::new(config.clone()).expect("open the loop device with O_DIRECT");
        let mut handler = block.queue_handler(QUEUE_SIZE);
        let mem = ram();
        let mut driver = Driver::new(&mem);
        let data = pattern(8192, 5);

        assert_eq!(blk_size_of(&block), 4096, "{engine:?}");
        assert_eq!(driver.write(&mut handler, 8, &data, 2), S_OK, "{engine:?}");
        let (status, back, _) = driver.read(&mut handler, 8, 8192, 1);
        assert_eq!((status, back), (S_OK, data), "{engine:?}");
        assert_eq!(driver.errors(), 0);
        // A driver ignoring blk_size gets an error, not a crash or a partial write.
        let (status, _, _) = driver.read(&mut handler, 1, 512, 1);
        assert_eq!(status, S_IOERR, "{engine:?}");
    }
    let mut small = config.clone();
    small.logical_block_size = Some(512);
    let refused = Block::new(small).expect_err("512-byte blocks on a 4K disk with O_DIRECT");
    assert!(refused.to_string().contains("4096"), "{refused}");
    let mut cached = config.clone();
    cached.direct = false;
    let cached = Block::new(cached).expect("page-cache open of the loop device");
    assert_eq!(
        blk_size_of(&cached),
        4096,
        "a block device's own sector size"
    );
}

/// Defect 13: a 0-byte image is a disk with no sectors; refuse it at open.
#[test]
fn empty_image_is_refused() {
    let empty = image(0);

    let err = Block::new(BlockConfig::new(empty.as_path())).expect_err("0-byte image accepted");

    assert!(err.to_string().contains("empty"), "{err}");
    assert!(
        err.to_string()
            .contains(&empty.as_path().display().to_string()),
        "{err}"
    );
}

/// Runs a QEMU tool; `None` (with a printed reason) when it is not installed.
fn qemu_tool(tool: &str, args: &[&str]) -> Option<std::process::Output> {
    match std::process::Command::new(tool).args(args).output() {
        Ok(output) => Some(output),
        Err(e) => {
            eprintln!("SKIP: {tool} not runnable ({e})");
            None
        }
    }
}

/// Defect 10 with qemu-io and qemu-img: while sluice has the image, QEMU can neither write nor
/// resize it (read-only sluice included); once sluice lets go, both work.
#[test]
fn qemu_io_and_qemu_img_respect_sluice_locks() {
    let img = image(IMAGE_SIZE);
    let path = img.as_path().to_str().unwrap();
    let write = ["-f", "raw", "-c", "write -P 0x33 0 512", path];
    let grow = (IMAGE_SIZE * 2).to_string();
    let resize = ["resize", "-f", "raw", path, grow.as_str()];
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    for read_only in [false, true] {
        let _sluice = open(img.as_path(), IoEngine::Sync, read_only);
        let Some(written) = qemu_tool("qemu-io", &write) else {
            return;
        };
        let Some(resized) = qemu_tool("qemu-img", &resize) else {
            return;
        };

        assert!(
            !written.status.success(),
            "qemu-io wrote (read_only={read_only})"
        );
        assert!(stderr(&written).contains("lock"), "{}", stderr(&written));
        assert!(
            !resized.status.success(),
            "qemu-img resized (read_only={read_only})"
        );
        assert!(stderr(&resized).contains("lock"), "{}", stderr(&resized));
    }
    let written = qemu_tool("qemu-io", &write).unwrap();
    let resized = qemu_tool("qemu-img", &resize).unwrap();

    assert!(written.status.success(), "{}", stderr(&written));
    assert!(resized.status.success(), "{}", stderr(&resized));
    assert_eq!(file_bytes(img.as_path(), 0, 512), vec![0x33; 512]);
    assert_eq!(img.as_file().metadata().unwrap().len(), IMAGE_SIZE * 2);
}

// The same handler over a packed ring.

#[test]
fn packed_ring_write_then_read_back_on_every_engine() {
    use sluice_virtio::ring::mock::PackedDriver;
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let block = open(img.as_path(), engine, false);
        let mut handler = block.queue_handler(QUEUE_SIZE);
        let mem = ram();
        let dma = sluice_dma::identity(mem.clone());
        let mut helper = Driver::new(&mem);
        let mut driver = PackedDriver::new(&dma, 0x8000, 6);
        let mut queue = VirtQueue::from(driver.queue());
        let metrics = QueueMetrics::default();
        let data = pattern(8192, 9);
        let header = helper.header(VIRTIO_BLK_T_OUT, 16);
        let pieces = [helper.alloc(4096), helper.alloc(4096)];
        mem.write_slice(&data, GuestAddress(pieces[0])).unwrap();
        let write_status = helper.status();
        let read_header = helper.header(VIRTIO_BLK_T_IN, 16);
        let back = helper.alloc(8192);
        let read_status = helper.status();
        // The write as a chain of ring descriptors, the read through an indirect table.
        driver.add_chain(
            4,
            &[
                (header, 16, false),
                (pieces[0], 4096, false),
                (pieces[1], 4096, false),
                (write_status, 1, true),
            ],
        );

        let mut used = Vec::new();
        let serve = |handler: &mut BlockQueueHandler,
                     queue: &mut VirtQueue,
                     driver: &mut PackedDriver<'_>,
                     used: &mut Vec<(u16, u32)>,
                     want: usize| {
            let mut ctx = QueueContext {
                queue,
                mem: &dma,
                metrics: &metrics,
            };
            handler.process(&mut ctx).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                used.extend(driver.used());
                if used.len() == want {
                    break;
                }
                assert!(Instant::now() < deadline, "requests did not complete");
                if let Some(fd) = handler.completion_fd() {
                    wait_readable(fd);
                    handler.complete(&mut ctx).unwrap();
                }
            }
        };
        serve(&mut handler, &mut queue, &mut driver, &mut used, 1);
        driver.add_indirect(
            0,
            0x9000,
            &[
                (read_header, 16, false),
                (back, 8192, true),
                (read_status, 1, true),
            ],
        );
        serve(&mut handler, &mut queue, &mut driver, &mut used, 2);

        assert_eq!(used, [(4, 1), (0, 8193)], "{engine:?}");
        assert_eq!(helper.status_at(write_status), S_OK);
        assert_eq!(helper.status_at(read_status), S_OK);
        assert_eq!(helper.read_bytes(back, 8192), data, "{engine:?}");
        assert_eq!(file_bytes(img.as_path(), 16 * 512, 8192), data);
    }
}

/// A queue behind a shared scheduler (sluice-qos) with room for 4 requests and one in flight
/// on the device: 8 writes to the same sector and a flush all complete (the 4 left in the ring
/// are popped as room frees, with no new kick), in order — the image holds the last write.
#[test]
fn a_scheduled_queue_keeps_overlapping_writes_in_order_within_its_bound() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let block = open(img.as_path(), engine, false);
        let qos = sluice_qos::Qos::new(sluice_qos::DeviceConfig {
            depth: 1,
            ..sluice_qos::DeviceConfig::default()
        });
        let guest = qos.add_guest(sluice_qos::GuestConfig {
            queue_limit: 4,
            ..sluice_qos::GuestConfig::new("g")
        });
        let mut handler = block
            .queue_handler(QUEUE_SIZE)
            .with_scheduler(qos.port(guest).unwrap())
            .unwrap();
        let mem = ram();
        let mut driver = Driver::new(&mem);
        let mut statuses = Vec::new();
        for i in 0..8u8 {
            let header = driver.header(VIRTIO_BLK_T_OUT, 0);
            let buf = driver.alloc(4096);
            mem.write_slice(&pattern(4096, i), GuestAddress(buf))
                .unwrap();
            let status = driver.status();
            driver.add_chain(&[
                readable(header, 16),
                readable(buf, 4096),
                writable(status, 1),
            ]);
            statuses.push(status);
        }
        let header = driver.header(VIRTIO_BLK_T_FLUSH, 0);
        let status = driver.status();
        driver.add_chain(&[readable(header, 16), writable(status, 1)]);
        statuses.push(status);

        driver.run(&mut handler);

        assert!(
            statuses.iter().all(|&s| driver.status_at(s) == S_OK),
            "{engine:?}"
        );
        assert_eq!(
            file_bytes(img.as_path(), 0, 4096),
            pattern(4096, 7),
            "{engine:?}"
        );
        let stats = qos.stats();
        assert_eq!(stats[0].1.dispatched, 9, "{engine:?}");
        assert_eq!(stats[0].1.completed, 9, "{engine:?}");
        assert_eq!(stats[0].1.refused, 0, "{engine:?}");
    }
}
