//! Tests: the handler driven directly over a mock split queue.

use std::sync::atomic::Ordering;

use sluice_virtio::VirtQueue;
use sluice_virtio::{QueueContext, QueueHandler, QueueMetrics};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use sluice_virtio::VirtioDevice;

use super::*;
use crate::mock_queue::{add_chain, used};

const MEM_SIZE: usize = 0x20_0000;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn run(handler: &mut RngHandler, queue: &mut VirtQueue, mem: &GuestMemoryMmap) -> QueueMetrics {
    let dma = sluice_dma::identity(mem.clone());
    let metrics = QueueMetrics::default();
    let mut ctx = QueueContext {
        queue,
        mem: &dma,
        metrics: &metrics,
    };
    handler.process(&mut ctx).unwrap();
    metrics
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

#[test]
fn single_buffer_is_filled_with_varied_bytes() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 512, true)]);

    let metrics = run(&mut RngHandler::new(), &mut queue, &mem);

    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 512));
    let bytes = read(&mem, 0x10_0000, 512);
    assert!(bytes.iter().any(|&b| b != bytes[0]), "512 equal bytes");
    assert_eq!(metrics.bytes.load(Ordering::Relaxed), 512);
    assert_eq!(metrics.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn multi_buffer_chain_fills_every_buffer() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(
        &vq,
        0,
        &[
            (0x10_0000, 64, true),
            (0x11_0000, 64, true),
            (0x12_0000, 64, true),
        ],
    );

    run(&mut RngHandler::new(), &mut queue, &mem);

    assert_eq!(used(&vq, 0), (0, 192));
    for addr in [0x10_0000, 0x11_0000, 0x12_0000] {
        let bytes = read(&mem, addr, 64);
        assert!(
            bytes.iter().any(|&b| b != 0),
            "buffer at {addr:#x} untouched"
        );
    }
}

#[test]
fn readable_only_chain_gets_zero_length_and_counts_error() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 64, false)]);
    add_chain(&vq, 1, &[(0x11_0000, 32, true)]);

    let metrics = run(&mut RngHandler::new(), &mut queue, &mem);

    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(used(&vq, 1), (1, 32));
    assert_eq!(read(&mem, 0x10_0000, 64), vec![0; 64]);
    assert_eq!(metrics.errors.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.requests.load(Ordering::Relaxed), 2);
}

#[test]
fn buffer_outside_guest_memory_gets_zero_length() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(MEM_SIZE as u64 - 16, 64, true)]);

    let metrics = run(&mut RngHandler::new(), &mut queue, &mem);

    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(metrics.errors.load(Ordering::Relaxed), 1);
}

#[test]
fn huge_request_is_capped() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 0x10_0000, true)]);

    run(&mut RngHandler::new(), &mut queue, &mem);

    assert_eq!(used(&vq, 0), (0, MAX_REQUEST_BYTES as u32));
}

#[test]
fn fill_random_fills_large_buffers() {
    let mut buf = vec![0u8; 1 << 20];

    fill_random(&mut buf).unwrap();

    let zeros = buf.iter().filter(|&&b| b == 0).count();
    // Expected ~4096 zero bytes in 1 MiB of random data; a short read would leave a zero tail.
    assert!(zeros < 8192, "{zeros} zero bytes");
    assert!(buf[buf.len() - 64..].iter().any(|&b| b != 0));
}

#[test]
fn device_identity_and_features() {
    let rng = Rng::new();

    assert_eq!(rng.device_type(), 4);
    assert_eq!(rng.queue_max_sizes(), vec![RNG_QUEUE_SIZE]);
    assert_eq!(rng.device_features(), (1 << 32) | (1 << 29));
}

struct NoInterrupt;

impl sluice_virtio::VirtioInterrupt for NoInterrupt {
    fn notify_queue(&self, _queue: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn needs_reset(&self) {}
}

#[test]
fn activated_device_serves_requests_on_kick() {
    use sluice_virtio::{NotifyPolicy, QueueBinding};
    use vmm_sys_util::eventfd::EventFd;
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    add_chain(&vq, 0, &[(0x10_0000, 256, true)]);
    let kick = EventFd::new(0).unwrap();
    let binding = QueueBinding {
        index: 0,
        queue: vq.create_queue::<Queue>().unwrap().into(),
        kick: kick.try_clone().unwrap(),
        policy: NotifyPolicy::Interrupt,
    };
    let mut rng = Rng::new();

    let active = sluice_virtio::ActiveQueues::start(
        &mut rng,
        "rng",
        Rng::new().device_features(),
        sluice_dma::identity(mem.clone()),
        vec![binding],
        std::sync::Arc::new(NoInterrupt),
    )
    .unwrap();
    kick.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while vq.used().idx().load() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    active.reset(&mut rng);

    assert_eq!(used(&vq, 0), (0, 256));
    assert_eq!(rng.metrics().queues[0].bytes.load(Ordering::Relaxed), 256);
}

#[test]
fn activation_needs_exactly_one_queue() {
    let mem = guest_memory();
    let mut rng = Rng::new();

    let result = sluice_virtio::ActiveQueues::start(
        &mut rng,
        "rng",
        0,
        sluice_dma::identity(mem),
        Vec::new(),
        std::sync::Arc::new(NoInterrupt),
    );

    assert!(matches!(
        result,
        Err(sluice_virtio::ActivateError::QueueCount {
            got: 0,
            min: 1,
            max: 1
        })
    ));
}

// The same handler over a packed ring.

#[test]
fn packed_ring_requests_are_filled_like_split_ones() {
    use sluice_virtio::ring::mock::PackedDriver;
    let mem = guest_memory();
    let dma = sluice_dma::identity(mem.clone());
    let mut driver = PackedDriver::new(&dma, 0x1000, 4);
    let mut queue = VirtQueue::from(driver.queue());
    driver.add_chain(3, &[(0x10_0000, 100, true), (0x11_0000, 28, true)]);
    driver.add_chain(1, &[(0x12_0000, 64, false)]);

    let metrics = run(&mut RngHandler::new(), &mut queue, &mem);

    assert_eq!(driver.used(), Some((3, 128)));
    assert_eq!(driver.used(), Some((1, 0)), "readable-only chain");
    let bytes = read(&mem, 0x10_0000, 100);
    assert!(bytes.iter().any(|&b| b != bytes[0]), "100 equal bytes");
    assert_eq!(metrics.bytes.load(Ordering::Relaxed), 128);
    assert_eq!(metrics.errors.load(Ordering::Relaxed), 1);
}
