//! Activation tests: a device model that counts what the framework asks of it, with queue
//! handlers that count how many of them are alive (a worker drops its handler when it stops).

use std::io;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::Mutex;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::device::{
    ExternalQueues, NotifyPolicy, QueueContext, QueueError, QueueHandler, DEVICE_TYPE_RNG,
};
use crate::metrics::DeviceMetrics;

const FEATURES: u64 = (1 << VIRTIO_RING_F_EVENT_IDX) | 1;

/// Alive while a worker holds it.
struct CountedHandler {
    alive: Arc<AtomicI32>,
    /// The thread of every `process` call.
    processed_on: Arc<Mutex<Vec<std::thread::ThreadId>>>,
}

impl CountedHandler {
    fn new(alive: &Arc<AtomicI32>, processed_on: &Arc<Mutex<Vec<std::thread::ThreadId>>>) -> Self {
        alive.fetch_add(1, Ordering::SeqCst);
        Self {
            alive: alive.clone(),
            processed_on: processed_on.clone(),
        }
    }
}

impl Drop for CountedHandler {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

impl QueueHandler for CountedHandler {
    fn process(&mut self, _ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let me = std::thread::current().id();
        self.processed_on.lock().unwrap().push(me);
        Ok(false)
    }
}

#[derive(Default)]
struct Seen {
    acked: Vec<u64>,
    handlers_built: Vec<u16>,
    /// Live handlers at each reset (the framework must have stopped them all).
    alive_at_reset: Vec<i32>,
    external_starts: Vec<Vec<u16>>,
    external_stops: u32,
}

struct TestDevice {
    queues: usize,
    range: RangeInclusive<usize>,
    /// `queue_handler` fails for this queue.
    failing_queue: Option<u16>,
    external: bool,
    alive: Arc<AtomicI32>,
    seen: Arc<Mutex<Seen>>,
    processed_on: Arc<Mutex<Vec<std::thread::ThreadId>>>,
}

impl TestDevice {
    fn new(queues: usize) -> Self {
        Self {
            queues,
            range: 1..=queues,
            failing_queue: None,
            external: false,
            alive: Arc::new(AtomicI32::new(0)),
            seen: Arc::default(),
            processed_on: Arc::default(),
        }
    }
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![8; self.queues]
    }
    fn device_features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn metrics(&self) -> Arc<DeviceMetrics> {
        Arc::new(DeviceMetrics::new("test", self.queues))
    }
    fn queue_count_range(&self) -> RangeInclusive<usize> {
        self.range.clone()
    }
    fn ack_features(&mut self, features: u64) -> Result<(), ActivateError> {
        self.seen.lock().unwrap().acked.push(features);
        Ok(())
    }
    fn queue_handler(
        &mut self,
        index: u16,
        _size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError> {
        if self.failing_queue == Some(index) {
            return Err(ActivateError::Backend(format!("queue {index} refused")));
        }
        self.seen.lock().unwrap().handlers_built.push(index);
        Ok(Box::new(CountedHandler::new(
            &self.alive,
            &self.processed_on,
        )))
    }
    fn external_queues(&mut self) -> Option<&mut dyn ExternalQueues> {
        if self.external {
            Some(self)
        } else {
            None
        }
    }
    fn reset(&mut self) {
        let alive = self.alive.load(Ordering::SeqCst);
        self.seen.lock().unwrap().alive_at_reset.push(alive);
    }
}

impl ExternalQueues for TestDevice {
    fn start(
        &mut self,
        _features: u64,
        _mem: DmaSpace,
        queues: Vec<QueueBinding>,
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let indices = queues.iter().map(|q| q.index).collect();
        self.seen.lock().unwrap().external_starts.push(indices);
        Ok(())
    }
    fn stop(&mut self) {
        self.seen.lock().unwrap().external_stops += 1;
    }
}

#[derive(Default)]
struct CountingInterrupt {
    needs_reset: AtomicU32,
}

impl VirtioInterrupt for CountingInterrupt {
    fn notify_queue(&self, _queue: u16) -> io::Result<()> {
        Ok(())
    }
    fn notify_config(&self) -> io::Result<()> {
        Ok(())
    }
    fn needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

fn memory() -> DmaSpace {
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    sluice_dma::identity(ram)
}

fn bindings(indices: &[u16]) -> Vec<QueueBinding> {
    indices
        .iter()
        .map(|&index| QueueBinding {
            index,
            queue: Queue::new(8).unwrap().into(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            policy: NotifyPolicy::Interrupt,
        })
        .collect()
}

fn start(device: &mut TestDevice, indices: &[u16]) -> Result<ActiveQueues, ActivateError> {
    let interrupt = Arc::new(CountingInterrupt::default());
    ActiveQueues::start(
        device,
        "test",
        FEATURES,
        memory(),
        bindings(indices),
        interrupt,
    )
}

#[test]
fn runs_one_worker_per_enabled_queue_after_acking_the_features() {
    let mut device = TestDevice::new(3);

    let active = start(&mut device, &[0, 2]).unwrap();

    assert_eq!(active.worker_count(), 2);
    assert!(!active.is_external());
    let seen = device.seen.lock().unwrap();
    assert_eq!(seen.acked, vec![FEATURES]);
    assert_eq!(seen.handlers_built, vec![0, 2]);
    assert_eq!(device.alive.load(Ordering::SeqCst), 2);
}

#[test]
fn refuses_a_queue_count_outside_the_range_before_touching_the_device() {
    let mut device = TestDevice::new(2);
    device.range = 2..=2;

    let result = start(&mut device, &[0]);

    assert!(matches!(
        result,
        Err(ActivateError::QueueCount {
            got: 1,
            min: 2,
            max: 2
        })
    ));
    let seen = device.seen.lock().unwrap();
    assert!(seen.acked.is_empty());
    assert!(seen.handlers_built.is_empty());
}

#[test]
fn a_failing_queue_stops_the_workers_already_started() {
    let mut device = TestDevice::new(3);
    device.failing_queue = Some(2);

    let result = start(&mut device, &[0, 1, 2]);

    assert!(matches!(result, Err(ActivateError::Backend(_))));
    assert_eq!(device.seen.lock().unwrap().handlers_built, vec![0, 1]);
    assert_eq!(
        device.alive.load(Ordering::SeqCst),
        0,
        "the workers of queues 0 and 1 were stopped and dropped their handlers"
    );
}

#[test]
fn reset_stops_every_worker_before_the_device_resets() {
    let mut device = TestDevice::new(2);
    let active = start(&mut device, &[0, 1]).unwrap();

    active.reset(&mut device);

    assert_eq!(device.seen.lock().unwrap().alive_at_reset, vec![0]);
}

#[test]
fn external_queues_get_the_bindings_and_are_stopped_on_reset() {
    let mut device = TestDevice::new(2);
    device.external = true;

    let active = start(&mut device, &[0, 1]).unwrap();
    let external = active.is_external();
    active.reset(&mut device);

    assert!(external);
    let seen = device.seen.lock().unwrap();
    assert_eq!(seen.external_starts, vec![vec![0, 1]]);
    assert!(seen.handlers_built.is_empty(), "no worker was started");
    assert_eq!(seen.external_stops, 1);
    assert_eq!(seen.alive_at_reset, vec![0]);
}

fn start_inline(device: &mut TestDevice, indices: &[u16]) -> Result<ActiveQueues, ActivateError> {
    let bindings = bindings(indices)
        .into_iter()
        .map(|mut binding| {
            binding.queue = {
                let mut queue = Queue::new(8).unwrap();
                queue.set_ready(true);
                queue.into()
            };
            binding
        })
        .collect();
    let interrupt = Arc::new(CountingInterrupt::default());
    ActiveQueues::start_with(
        device,
        "test",
        FEATURES,
        memory(),
        bindings,
        interrupt,
        true,
    )
}

#[test]
fn inline_queues_run_every_kick_on_the_calling_thread_before_returning() {
    let mut device = TestDevice::new(2);
    let me = std::thread::current().id();

    let mut active = start_inline(&mut device, &[0, 1]).unwrap();
    let at_start = device.processed_on.lock().unwrap().len();
    let kicked = active.kick_inline(1);
    let unknown = active.kick_inline(7);

    assert_eq!(at_start, 2, "each ring is looked at once when it starts");
    assert!(kicked);
    assert!(!unknown, "no such queue");
    let processed = device.processed_on.lock().unwrap().clone();
    assert_eq!(
        processed.len(),
        3,
        "the kick was processed before kick_inline returned"
    );
    assert!(processed.iter().all(|&t| t == me), "{processed:?}");
    active.reset(&mut device);
    assert_eq!(device.seen.lock().unwrap().alive_at_reset, vec![0]);
}

#[test]
fn threaded_queues_are_not_kicked_inline() {
    let mut device = TestDevice::new(1);
    let mut active = start(&mut device, &[0]).unwrap();

    assert!(!active.kick_inline(0));
    active.reset(&mut device);
}

#[test]
fn queues_run_by_another_process_cannot_be_inline() {
    let mut device = TestDevice::new(1);
    device.external = true;

    let result = start_inline(&mut device, &[0]);

    assert!(matches!(result, Err(ActivateError::Worker(_))));
    assert!(device.seen.lock().unwrap().external_starts.is_empty());
}
