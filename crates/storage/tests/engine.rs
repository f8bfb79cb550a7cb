//! The I/O engine against real files and real guest memory, on every engine the host has.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_dma::{DmaSpace, GuestIovecs};
use sluice_storage::{
    io_uring_available, DiskImage, Extent, IoCompletion, IoEngine, IoOp, IoQueue,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};
use vmm_sys_util::tempfile::TempFile;

const IMAGE_SIZE: u64 = 1 << 20;

fn engines() -> Vec<IoEngine> {
    if io_uring_available() {
        vec![IoEngine::IoUring, IoEngine::Sync]
    } else {
        eprintln!("io_uring unavailable here: testing the synchronous engine only");
        vec![IoEngine::Sync]
    }
}

fn image(size: u64) -> TempFile {
    let file = TempFile::new_with_prefix("/tmp/sluice-engine-").unwrap();
    file.as_file().set_len(size).unwrap();
    file
}

fn space() -> DmaSpace {
    sluice_dma::identity(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

fn iov(mem: &DmaSpace, addr: u64, len: usize, access: Permissions) -> GuestIovecs {
    GuestIovecs::resolve(mem, [(GuestAddress(addr), len)], access).unwrap()
}

/// Submits `op` and waits for its completion, from `submit` or from the ring.
fn run<T: std::fmt::Debug>(queue: &mut IoQueue<T>, tag: T, op: IoOp) -> IoCompletion<T> {
    if let Some(done) = queue.submit(tag, op) {
        return done;
    }
    queue.commit();
    let mut done = wait_all(queue, 1);
    done.pop().unwrap()
}

fn wait_all<T>(queue: &mut IoQueue<T>, count: usize) -> Vec<IoCompletion<T>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < count {
        assert!(Instant::now() < deadline, "operations did not complete");
        let mut pfd = libc::pollfd {
            fd: queue
                .completion_fd()
                .expect("pending work on a ring-less queue"),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack.
        unsafe { libc::poll(&raw mut pfd, 1, 100) };
        done.extend(queue.reap());
    }
    done
}

#[test]
fn writes_and_reads_move_guest_bytes_through_the_image() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let disk = Arc::new(DiskImage::open(img.as_path(), false, false).unwrap());
        let mut queue = IoQueue::new(disk, engine, 16);
        let mem = space();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x1000)).unwrap();

        let write = IoOp::Write {
            offset: 4096,
            buffers: iov(&mem, 0x1000, 8192, Permissions::Read),
        };
        let wrote = run(&mut queue, 1u32, write);
        let read = IoOp::Read {
            offset: 4096,
            buffers: iov(&mem, 0x8000, 8192, Permissions::Write),
        };
        let got = run(&mut queue, 2u32, read);

        assert_eq!((wrote.tag, got.tag), (1, 2));
        assert!(wrote.result.is_ok() && got.result.is_ok(), "{engine:?}");
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert_eq!(back, data, "{engine:?}");
        let mut file = vec![0u8; 8192];
        img.as_file().read_exact_at(&mut file, 4096).unwrap();
        assert_eq!(file, data);
        assert_eq!(queue.in_flight(), 0);
    }
}

#[test]
fn a_batch_completes_with_every_tag_once() {
    if !io_uring_available() {
        eprintln!("SKIP: io_uring unavailable");
        return;
    }
    let img = image(IMAGE_SIZE);
    let disk = Arc::new(DiskImage::open(img.as_path(), false, false).unwrap());
    let mut queue = IoQueue::new(disk, IoEngine::IoUring, 64);
    let mem = space();
    let mut immediate = Vec::new();

    for tag in 0..40u64 {
        let op = match tag % 4 {
            0 => IoOp::Flush,
            1 => IoOp::Read {
                offset: tag * 512,
                buffers: iov(&mem, tag * 4096, 512, Permissions::Write),
            },
            2 => IoOp::Write {
                offset: tag * 512,
                buffers: iov(&mem, tag * 4096, 512, Permissions::Read),
            },
            _ => IoOp::WriteZeroes(vec![Extent {
                offset: tag * 4096,
                len: 4096,
                may_unmap: false,
            }]),
        };
        immediate.extend(queue.submit(tag, op));
    }
    queue.commit();
    let queued = 40 - immediate.len();
    let done = wait_all(&mut queue, queued);

    let tags: BTreeSet<u64> = done.iter().chain(&immediate).map(|c| c.tag).collect();
    assert_eq!(tags, (0..40).collect());
    assert_eq!(done.len() + immediate.len(), 40);
    assert!(done.iter().chain(&immediate).all(|c| c.result.is_ok()));
    assert_eq!(queue.in_flight(), 0);
}

#[test]
fn operations_with_nothing_to_do_complete_at_once_and_hold_nothing() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let disk = Arc::new(DiskImage::open(img.as_path(), false, false).unwrap());
        let mut queue = IoQueue::new(disk, engine, 16);
        let empty = Extent {
            offset: 4096,
            len: 0,
            may_unmap: true,
        };

        for round in 0..10_000u32 {
            let op = if round % 2 == 0 {
                IoOp::Discard(vec![empty, empty])
            } else {
                IoOp::WriteZeroes(vec![empty])
            };
            let done = queue.submit(round, op);

            let done = done.unwrap_or_else(|| panic!("{engine:?}: round {round} left pending"));
            assert_eq!(done.tag, round);
            assert!(done.result.is_ok());
            assert_eq!(queue.in_flight(), 0);
        }
    }
}

#[test]
fn ranges_beyond_the_image_and_writes_to_read_only_images_are_refused() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        let mem = space();
        let disk = Arc::new(DiskImage::open(img.as_path(), false, false).unwrap());
        let mut queue = IoQueue::new(disk, engine, 16);
        let past_end = IoOp::Write {
            offset: IMAGE_SIZE - 512,
            buffers: iov(&mem, 0, 1024, Permissions::Read),
        };
        let zero_past_end = IoOp::WriteZeroes(vec![Extent {
            offset: u64::MAX - 10,
            len: 4096,
            may_unmap: false,
        }]);

        let refused = [
            queue.submit(0, past_end).expect("refused at submit"),
            queue.submit(1, zero_past_end).expect("refused at submit"),
        ];
        drop(queue);
        let ro_disk = Arc::new(DiskImage::open(img.as_path(), true, false).unwrap());
        let mut ro_queue = IoQueue::new(ro_disk, engine, 16);
        let ro_write = IoOp::Write {
            offset: 0,
            buffers: iov(&mem, 0, 512, Permissions::Read),
        };
        let ro_refused = ro_queue.submit(2, ro_write).expect("refused at submit");

        assert!(refused.iter().all(|c| c.result.is_err()), "{engine:?}");
        assert!(ro_refused.result.is_err());
        assert_eq!(
            img.as_file().metadata().unwrap().len(),
            IMAGE_SIZE,
            "the image grew"
        );
    }
}

#[test]
fn dropping_a_queue_waits_for_the_kernel() {
    if !io_uring_available() {
        eprintln!("SKIP: io_uring unavailable");
        return;
    }
    let img = image(IMAGE_SIZE);
    let disk = Arc::new(DiskImage::open(img.as_path(), false, false).unwrap());
    let mut queue = IoQueue::new(disk, IoEngine::IoUring, 16);
    let mem = space();
    mem.write_slice(&[0xab; 65536], GuestAddress(0)).unwrap();
    let write = IoOp::Write {
        offset: 0,
        buffers: iov(&mem, 0, 65536, Permissions::Read),
    };
    assert!(queue.submit((), write).is_none());
    queue.commit();
    drop(mem);

    drop(queue);

    let mut file = vec![0u8; 65536];
    img.as_file().read_exact_at(&mut file, 0).unwrap();
    assert_eq!(file, vec![0xab; 65536]);
}

#[test]
fn discard_and_write_zeroes_reach_the_file() {
    for engine in engines() {
        let img = image(IMAGE_SIZE);
        img.as_file().write_all_at(&[0x5a; 65536], 0).unwrap();
        let disk = Arc::new(DiskImage::open(img.as_path(), false, false).unwrap());
        let mut queue = IoQueue::new(disk, engine, 16);
        let extent = |offset, len, may_unmap| Extent {
            offset,
            len,
            may_unmap,
        };

        let zeroed = run(
            &mut queue,
            0,
            IoOp::WriteZeroes(vec![extent(4096, 4096, false), extent(16384, 4096, true)]),
        );
        let discarded = run(
            &mut queue,
            1,
            IoOp::Discard(vec![extent(32768, 32768, false)]),
        );

        assert!(
            zeroed.result.is_ok() && discarded.result.is_ok(),
            "{engine:?}"
        );
        let mut file = vec![0u8; 65536];
        img.as_file().read_exact_at(&mut file, 0).unwrap();
        assert!(file[4096..8192].iter().all(|&b| b == 0));
        assert!(file[16384..20480].iter().all(|&b| b == 0));
        assert!(file[32768..].iter().all(|&b| b == 0));
        assert!(file[..4096]
            .iter()
            .chain(&file[8192..16384])
            .all(|&b| b == 0x5a));
        assert_eq!(img.as_file().metadata().unwrap().len(), IMAGE_SIZE);
    }
}
