//! Queue worker tests: a driver-side mock ring (virtio-queue's `MockSplitQueue`) in shared guest
//! memory, a kick eventfd, and a tiny echo handler.

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Mutex;
use std::thread;

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::device::NotifyPolicy;

const RAM_SIZE: u64 = 0x10_0000;
const RING_BASE: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
/// Every mock descriptor covers 0x1000 bytes.
const CHAIN_BYTES: u32 = 0x1000;
const WAIT: Duration = Duration::from_secs(5);
const VRING_USED_F_NO_NOTIFY: u16 = 1;

fn memory() -> DmaSpace {
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).unwrap();
    sluice_dma::identity(ram)
}

/// Completes every chain with its total length (what a device that "wrote" it all would say).
pub(crate) struct EchoHandler;

impl QueueHandler for EchoHandler {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let chains = ctx.queue.pop_all(ctx.mem)?;
        for chain in &chains {
            let len = chain
                .descriptors()
                .fold(0u32, |n, d| n.saturating_add(d.len()));
            ctx.queue.add_used(ctx.mem, chain.head_index(), len)?;
            QueueMetrics::add(&ctx.metrics.requests, 1);
        }
        Ok(!chains.is_empty())
    }
}

/// Fails every pass, counting how often it was asked.
struct FailingHandler {
    calls: Arc<AtomicU32>,
}

impl QueueHandler for FailingHandler {
    fn process(&mut self, _ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(QueueError::Backend("disk on fire".into()))
    }
}

/// Pops chains in `process`, completes them only when its completion eventfd fires.
struct AsyncHandler {
    done: EventFd,
    in_flight: Vec<u16>,
}

impl QueueHandler for AsyncHandler {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let heads: Vec<u16> = ctx
            .queue
            .pop_all(ctx.mem)?
            .iter()
            .map(|c| c.head_index())
            .collect();
        self.in_flight.extend(heads);
        Ok(false)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.done.as_raw_fd())
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let _ = self.done.read();
        let added = !self.in_flight.is_empty();
        for head in self.in_flight.drain(..) {
            ctx.queue.add_used(ctx.mem, head, 7)?;
        }
        Ok(added)
    }

    fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// Leaves every chain in the ring, as an RX queue does while the tap has no frames; counts
/// how often it was asked.
struct DecliningHandler {
    calls: Arc<AtomicU32>,
}

impl QueueHandler for DecliningHandler {
    fn process(&mut self, _ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(false)
    }
}

#[derive(Default)]
struct RecordingInterrupt {
    queues: Mutex<Vec<u16>>,
    resets: AtomicU32,
    configs: AtomicU32,
}

impl VirtioInterrupt for RecordingInterrupt {
    fn notify_queue(&self, queue: u16) -> io::Result<()> {
        self.queues.lock().unwrap().push(queue);
        Ok(())
    }

    fn notify_config(&self) -> io::Result<()> {
        self.configs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn needs_reset(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

impl RecordingInterrupt {
    fn queue_interrupts(&self) -> Vec<u16> {
        self.queues.lock().unwrap().clone()
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::SeqCst)
}

/// The driver side and the handles a test inspects.
struct Harness<'a> {
    driver: MockSplitQueue<'a, DmaSpace>,
    kick: EventFd,
    interrupt: Arc<RecordingInterrupt>,
    metrics: Arc<DeviceMetrics>,
    mem: &'a DmaSpace,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a DmaSpace) -> Self {
        Self {
            driver: MockSplitQueue::create(mem, GuestAddress(RING_BASE), QUEUE_SIZE),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            interrupt: Arc::new(RecordingInterrupt::default()),
            metrics: Arc::new(DeviceMetrics::new("test", 2)),
            mem,
        }
    }

    fn spawn_with(
        &self,
        queue: impl Into<VirtQueue>,
        policy: NotifyPolicy,
        handler: Box<dyn QueueHandler>,
        event_idx: bool,
    ) -> QueueWorker {
        let binding = QueueBinding {
            index: 1,
            queue: queue.into(),
            kick: self.kick.try_clone().unwrap(),
            policy,
        };
        QueueWorker::spawn(
            "test-q1".into(),
            binding,
            self.mem.clone(),
            handler,
            self.interrupt.clone(),
            self.metrics.clone(),
            event_idx,
        )
        .unwrap()
    }

    fn spawn(&self, policy: NotifyPolicy, event_idx: bool) -> QueueWorker {
        let queue = self.driver.create_queue::<Queue>().unwrap();
        self.spawn_with(queue, policy, Box::new(EchoHandler), event_idx)
    }

    fn submit(&mut self, kick: bool) {
        self.driver.add_chain(1).unwrap();
        if kick {
            self.kick.write(1).unwrap();
        }
    }

    fn used_idx(&self) -> u16 {
        self.driver.used().idx().load()
    }

    fn used_flags(&self) -> u16 {
        let addr = self.driver.used_addr();
        self.mem.read_obj::<u16>(addr).unwrap()
    }

    /// The driver's `used_event` (after the avail ring entries).
    fn set_used_event(&self, value: u16) {
        let offset = 4 + 2 * u64::from(QUEUE_SIZE);
        let addr = GuestAddress(self.driver.avail_addr().0 + offset);
        self.mem.write_obj(value, addr).unwrap();
    }

    fn queue_metrics(&self) -> &QueueMetrics {
        &self.metrics.queues[1]
    }

    fn signals(&self) -> u64 {
        load(&self.queue_metrics().interrupts)
            + load(&self.queue_metrics().notifications_suppressed)
    }
}

#[test]
fn kick_processes_chains_and_interrupts() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let worker = h.spawn(NotifyPolicy::Interrupt, false);

    for _ in 0..3 {
        h.submit(false);
    }
    h.kick.write(1).unwrap();
    wait_until("three used entries", || h.used_idx() == 3);
    wait_until("an interrupt", || load(&h.queue_metrics().interrupts) >= 1);
    let queue = worker.stop().into_split().unwrap();

    for i in 0..3 {
        let elem = h.driver.used().ring().ref_at(i).unwrap().load();
        assert_eq!(elem.len(), CHAIN_BYTES);
    }
    assert!(h.interrupt.queue_interrupts().iter().all(|&q| q == 1));
    assert_eq!(load(&h.queue_metrics().kicks), 1);
    assert_eq!(load(&h.queue_metrics().requests), 3);
    assert_eq!(queue.next_used(), 3);
    assert_eq!(queue.next_avail(), 3);
    assert_eq!(
        h.used_flags(),
        0,
        "notifications re-enabled before sleeping"
    );
    assert_eq!(h.interrupt.resets.load(Ordering::SeqCst), 0);
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    h.set_used_event(0);
    let worker = h.spawn(NotifyPolicy::Interrupt, true);

    for expected in 1..=3 {
        h.submit(true);
        wait_until("the completion", || h.used_idx() == expected);
        wait_until("the signal decision", || h.signals() == u64::from(expected));
    }
    worker.stop();

    // used_event = 0 asks for an interrupt only when entry 0 is used.
    assert_eq!(load(&h.queue_metrics().interrupts), 1);
    assert_eq!(load(&h.queue_metrics().notifications_suppressed), 2);
    assert_eq!(h.interrupt.queue_interrupts(), vec![1]);
}

#[test]
fn without_event_idx_every_pass_interrupts() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    h.set_used_event(0);
    let worker = h.spawn(NotifyPolicy::Interrupt, false);

    for expected in 1..=3 {
        h.submit(true);
        wait_until("the completion", || h.used_idx() == expected);
        wait_until("the signal decision", || h.signals() == u64::from(expected));
    }
    worker.stop();

    assert_eq!(load(&h.queue_metrics().interrupts), 3);
    assert_eq!(load(&h.queue_metrics().notifications_suppressed), 0);
}

/// Runs a worker whose handler declines chains; returns its process calls after one kicked
/// chain, and after a second one.
fn declined_chain_calls(policy: NotifyPolicy) -> (u32, u32) {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let calls = Arc::new(AtomicU32::new(0));
    let queue = h.driver.create_queue::<Queue>().unwrap();
    let handler = Box::new(DecliningHandler {
        calls: calls.clone(),
    });
    let worker = h.spawn_with(queue, policy, handler, true);

    h.submit(true);
    wait_until("the kick", || load(&h.queue_metrics().kicks) == 1);
    // Time a spinning worker would use for thousands of passes.
    thread::sleep(Duration::from_millis(100));
    let after_first = calls.load(Ordering::SeqCst);
    h.submit(true);
    wait_until("the second kick", || load(&h.queue_metrics().kicks) == 2);
    thread::sleep(Duration::from_millis(100));
    let after_second = calls.load(Ordering::SeqCst);
    worker.stop();
    (after_first, after_second)
}

#[test]
fn chains_the_handler_leaves_are_not_retried_until_the_driver_publishes_more() {
    let (after_first, after_second) = declined_chain_calls(NotifyPolicy::Interrupt);

    // One pass at start (empty ring) and one per kick; a loop on the left chains would be
    // millions.
    assert!(after_first <= 2, "{after_first} passes after one kick");
    assert!(after_second > after_first, "the new chain was offered");
    assert!(after_second <= 3, "{after_second} passes after two kicks");
}

/// The split ring's `avail_event` once a declining worker settled, and the avail index.
fn avail_event_after_declining(policy: NotifyPolicy) -> (u16, u16) {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let queue = h.driver.create_queue::<Queue>().unwrap();
    let handler = Box::new(DecliningHandler {
        calls: Arc::new(AtomicU32::new(0)),
    });
    let worker = h.spawn_with(queue, policy, handler, true);

    h.submit(true);
    h.submit(false);
    wait_until("the kick", || load(&h.queue_metrics().kicks) == 1);
    // Past the poll budget, back on notifications.
    thread::sleep(Duration::from_millis(100));
    let offset = 4 + 8 * u64::from(QUEUE_SIZE);
    let event_addr = GuestAddress(h.driver.used_addr().0 + offset);
    let avail_event = mem.read_obj::<u16>(event_addr).unwrap();
    let avail_idx = h.driver.avail().idx().load();
    worker.stop();
    (avail_event, avail_idx)
}

/// With EVENT_IDX the driver kicks only when it publishes across `avail_event`: a worker that
/// left chains must set it to the avail index, not to the first chain left, which the driver
/// has passed already (Linux virtio-net stalled on a 4 MiB download that way).
#[test]
fn after_leaving_chains_the_worker_asks_for_a_kick_at_the_next_publish() {
    for policy in [
        NotifyPolicy::Interrupt,
        NotifyPolicy::Poll {
            budget: Duration::from_millis(20),
        },
    ] {
        let (avail_event, avail_idx) = avail_event_after_declining(policy);

        assert_eq!(avail_event, avail_idx, "{policy:?}");
    }
}

#[test]
fn poll_mode_does_not_retry_chains_the_handler_left() {
    let budget = Duration::from_millis(20);

    let (after_first, after_second) = declined_chain_calls(NotifyPolicy::Poll { budget });

    assert!(after_first <= 2, "{after_first} passes after one kick");
    assert!(after_second > after_first, "the new chain was offered");
    assert!(after_second <= 4, "{after_second} passes after two kicks");
}

#[test]
fn poll_mode_processes_without_kicks_and_suppresses_notifications() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let budget = Duration::from_secs(30);
    let worker = h.spawn(NotifyPolicy::Poll { budget }, false);

    h.submit(true);
    wait_until("the kicked request", || h.used_idx() == 1);
    let flags_while_polling = h.used_flags();
    h.submit(false);
    h.submit(false);
    wait_until("the unkicked requests", || h.used_idx() == 3);
    let started = Instant::now();
    worker.stop();

    assert_eq!(flags_while_polling, VRING_USED_F_NO_NOTIFY);
    assert_eq!(load(&h.queue_metrics().kicks), 1);
    assert_eq!(load(&h.queue_metrics().requests), 3);
    assert!(started.elapsed() < budget, "stop interrupts polling");
}

#[test]
fn poll_mode_reenables_notifications_after_the_budget() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let worker = h.spawn(
        NotifyPolicy::Poll {
            budget: Duration::from_millis(20),
        },
        false,
    );

    h.submit(true);
    wait_until("the request", || h.used_idx() == 1);
    wait_until("notifications back on", || h.used_flags() == 0);
    h.submit(true);
    wait_until("the next kicked request", || h.used_idx() == 2);
    worker.stop();

    assert_eq!(load(&h.queue_metrics().kicks), 2);
}

/// CPU time the worker's thread has used so far (its POSIX thread CPU clock, ns resolution).
fn thread_cpu_time(worker: &QueueWorker) -> Duration {
    use std::os::unix::thread::JoinHandleExt;
    let thread = worker
        .thread
        .as_ref()
        .expect("worker running")
        .as_pthread_t();
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` is a live thread (its JoinHandle is held); `clock` is a valid out pointer.
    let rc = unsafe { libc::pthread_getcpuclockid(thread, &raw mut clock) };
    assert_eq!(rc, 0, "pthread_getcpuclockid");
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; `clock` came from pthread_getcpuclockid.
    let rc = unsafe { libc::clock_gettime(clock, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU the worker thread uses over `interval` of wall time.
fn cpu_used_during(worker: &QueueWorker, interval: Duration) -> Duration {
    let before = thread_cpu_time(worker);
    thread::sleep(interval);
    thread_cpu_time(worker).saturating_sub(before)
}

#[test]
fn poll_mode_worker_sleeps_while_the_driver_is_idle() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let worker = h.spawn(
        NotifyPolicy::Poll {
            budget: Duration::from_millis(2),
        },
        false,
    );

    h.submit(true);
    wait_until("the request", || h.used_idx() == 1);
    wait_until("notifications back on", || h.used_flags() == 0);
    let idle_cpu = cpu_used_during(&worker, Duration::from_millis(300));
    h.submit(true);
    wait_until("the next kicked request", || h.used_idx() == 2);
    worker.stop();

    // A worker still spinning would have used most of the 300 ms.
    assert!(
        idle_cpu < Duration::from_millis(10),
        "idle worker used {idle_cpu:?}"
    );
}

#[test]
fn poll_mode_worker_spins_while_polling() {
    // The control for the test above: the same clock sees a polling worker's CPU.
    let mem = memory();
    let mut h = Harness::new(&mem);
    let worker = h.spawn(
        NotifyPolicy::Poll {
            budget: Duration::from_secs(30),
        },
        false,
    );

    h.submit(true);
    wait_until("the request", || h.used_idx() == 1);
    let polling_cpu = cpu_used_during(&worker, Duration::from_millis(300));
    worker.stop();

    assert!(
        polling_cpu > Duration::from_millis(30),
        "polling worker used {polling_cpu:?}"
    );
}

#[test]
fn poll_mode_leaves_kicks_off_while_requests_are_in_flight() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let done = EventFd::new(EFD_NONBLOCK).unwrap();
    let handler = AsyncHandler {
        done: done.try_clone().unwrap(),
        in_flight: Vec::new(),
    };
    let queue = h.driver.create_queue::<Queue>().unwrap();
    let policy = NotifyPolicy::Poll {
        budget: Duration::from_millis(1),
    };
    let worker = h.spawn_with(queue, policy, Box::new(handler), false);

    h.submit(true);
    wait_until("the kick", || load(&h.queue_metrics().kicks) == 1);
    // Well past the poll window, with the request in flight.
    thread::sleep(Duration::from_millis(50));
    let flags_while_in_flight = h.used_flags();
    h.submit(false);
    done.write(1).unwrap();
    wait_until("the first completion", || h.used_idx() == 1);
    thread::sleep(Duration::from_millis(50));
    done.write(1).unwrap();
    wait_until("the unkicked request's completion", || h.used_idx() == 2);
    wait_until("notifications back on once idle", || h.used_flags() == 0);
    worker.stop();

    assert_eq!(flags_while_in_flight, VRING_USED_F_NO_NOTIFY);
    assert_eq!(load(&h.queue_metrics().kicks), 1);
}

#[test]
fn poll_window_grows_on_quick_kicks_and_shrinks_on_long_sleeps() {
    let max = Duration::from_micros(200);
    let mut window = PollWindow::new(max);

    window.adapt(Duration::from_millis(5));
    let after_one_long_sleep = window.current();
    for _ in 0..20 {
        window.adapt(Duration::from_secs(1));
    }
    let after_many_long_sleeps = window.current();
    window.adapt(Duration::from_micros(30));
    let after_one_quick_kick = window.current();
    for _ in 0..20 {
        window.adapt(Duration::from_micros(30));
    }

    assert_eq!(after_one_long_sleep, max / 2);
    assert_eq!(after_many_long_sleeps, MIN_POLL_WINDOW);
    assert_eq!(after_one_quick_kick, MIN_POLL_WINDOW * 2);
    assert_eq!(window.current(), max);
}

#[test]
fn batch_mode_coalesces_completions_into_one_interrupt() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let policy = NotifyPolicy::Batch {
        max_requests: 4,
        max_delay: Duration::from_secs(30),
    };
    let worker = h.spawn(policy, false);

    for expected in 1..=3 {
        h.submit(true);
        wait_until("the completion", || h.used_idx() == expected);
        wait_until("the deferral", || h.signals() == u64::from(expected));
    }
    let interrupts_before_limit = load(&h.queue_metrics().interrupts);
    h.submit(true);
    wait_until("the batch interrupt", || {
        load(&h.queue_metrics().interrupts) == 1
    });
    worker.stop();

    assert_eq!(interrupts_before_limit, 0);
    assert_eq!(load(&h.queue_metrics().notifications_suppressed), 3);
    assert_eq!(h.interrupt.queue_interrupts(), vec![1]);
}

#[test]
fn batch_mode_signals_after_max_delay() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let max_delay = Duration::from_millis(300);
    let policy = NotifyPolicy::Batch {
        max_requests: 100,
        max_delay,
    };
    let worker = h.spawn(policy, false);

    let submitted = Instant::now();
    h.submit(true);
    wait_until("the completion", || h.used_idx() == 1);
    wait_until("the delayed interrupt", || {
        load(&h.queue_metrics().interrupts) == 1
    });
    let waited = submitted.elapsed();
    worker.stop();

    assert!(waited >= max_delay, "interrupt came after {waited:?}");
    assert_eq!(load(&h.queue_metrics().notifications_suppressed), 1);
}

#[test]
fn completion_fd_drives_asynchronous_completions() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let done = EventFd::new(EFD_NONBLOCK).unwrap();
    let handler = AsyncHandler {
        done: done.try_clone().unwrap(),
        in_flight: Vec::new(),
    };
    let queue = h.driver.create_queue::<Queue>().unwrap();
    let worker = h.spawn_with(queue, NotifyPolicy::Interrupt, Box::new(handler), false);

    h.submit(true);
    wait_until("the kick", || load(&h.queue_metrics().kicks) == 1);
    thread::sleep(Duration::from_millis(20));
    let used_before_completion = h.used_idx();
    done.write(1).unwrap();
    wait_until("the completion", || h.used_idx() == 1);
    wait_until("the interrupt", || load(&h.queue_metrics().interrupts) == 1);
    worker.stop();

    assert_eq!(used_before_completion, 0);
    assert_eq!(h.driver.used().ring().ref_at(0).unwrap().load().len(), 7);
}

#[test]
fn ring_outside_memory_needs_reset_without_touching_it() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let mut queue = h.driver.create_queue::<Queue>().unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(RAM_SIZE * 16))
        .unwrap();
    let worker = h.spawn_with(queue, NotifyPolicy::Interrupt, Box::new(EchoHandler), false);

    wait_until("needs_reset", || {
        h.interrupt.resets.load(Ordering::SeqCst) == 1
    });
    h.submit(true);
    wait_until("the first kick", || load(&h.queue_metrics().kicks) == 1);
    h.submit(true);
    wait_until("the second kick", || load(&h.queue_metrics().kicks) == 2);
    let queue = worker.stop().into_split().unwrap();

    assert_eq!(
        h.interrupt.resets.load(Ordering::SeqCst),
        1,
        "reported once"
    );
    assert_eq!(h.used_idx(), 0);
    assert_eq!(queue.next_avail(), 0);
    assert_eq!(queue.desc_table(), RAM_SIZE * 16);
}

#[test]
fn handler_error_needs_reset_once_and_stops_processing() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let calls = Arc::new(AtomicU32::new(0));
    let handler = FailingHandler {
        calls: calls.clone(),
    };
    let queue = h.driver.create_queue::<Queue>().unwrap();
    let worker = h.spawn_with(queue, NotifyPolicy::Interrupt, Box::new(handler), false);

    h.submit(true);
    wait_until("needs_reset", || {
        h.interrupt.resets.load(Ordering::SeqCst) == 1
    });
    // The worker's first look at the ring may fail before it read the first kick.
    wait_until("the first kick", || load(&h.queue_metrics().kicks) == 1);
    h.submit(true);
    wait_until("the second kick", || load(&h.queue_metrics().kicks) == 2);
    worker.stop();

    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(h.interrupt.resets.load(Ordering::SeqCst), 1);
    assert!(h.interrupt.queue_interrupts().is_empty());
}

#[test]
fn stop_hands_back_the_queue_for_a_restart() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let worker = h.spawn(NotifyPolicy::Interrupt, false);
    h.submit(true);
    wait_until("the first request", || h.used_idx() == 1);
    let queue = worker.stop().into_split().unwrap();

    let restarted = h.spawn_with(queue, NotifyPolicy::Interrupt, Box::new(EchoHandler), false);
    h.submit(true);
    wait_until("the request after restart", || h.used_idx() == 2);
    let queue = restarted.stop().into_split().unwrap();

    assert_eq!(queue.next_used(), 2);
    assert_eq!(load(&h.queue_metrics().requests), 2);
}

#[test]
fn dropping_a_worker_joins_its_thread() {
    let mem = memory();
    let h = Harness::new(&mem);
    let worker = h.spawn(
        NotifyPolicy::Poll {
            budget: Duration::from_secs(30),
        },
        false,
    );
    h.kick.write(1).unwrap();
    wait_until("the kick", || load(&h.queue_metrics().kicks) == 1);

    let started = Instant::now();
    drop(worker);

    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A pipe (read end, write end), both blocking like a peer's would be.
fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes; the result is checked.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

/// A kick "eventfd" that is really `file`, as a vhost-user frontend may hand over anything.
fn kick_from(file: std::fs::File) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the descriptor is owned by `file` and handed over whole.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

impl Harness<'_> {
    fn spawn_with_kick(&self, kick: EventFd) -> QueueWorker {
        let binding = QueueBinding {
            index: 1,
            queue: self.driver.create_queue::<Queue>().unwrap().into(),
            kick,
            policy: NotifyPolicy::Interrupt,
        };
        QueueWorker::spawn(
            "test-q1".into(),
            binding,
            self.mem.clone(),
            Box::new(EchoHandler),
            self.interrupt.clone(),
            self.metrics.clone(),
            false,
        )
        .unwrap()
    }
}

/// Waits for `cond`; on a timeout leaks `worker` (whose thread may be stuck, so joining it
/// would hang the test instead of failing it) and panics.
fn wait_or_leak(worker: QueueWorker, what: &str, mut cond: impl FnMut() -> bool) -> QueueWorker {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        if Instant::now() >= deadline {
            #[allow(clippy::mem_forget, reason = "joining a stuck worker hangs")]
            std::mem::forget(worker);
            panic!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(1));
    }
    worker
}

#[test]
fn a_kick_pipe_whose_writer_closed_stops_the_ring_once_without_spinning() {
    let mem = memory();
    let h = Harness::new(&mem);
    let (read_end, write_end) = pipe();
    drop(write_end);

    let worker = h.spawn_with_kick(kick_from(read_end));
    let worker = wait_or_leak(worker, "the dead kick fd to need a reset", || {
        h.interrupt.resets.load(Ordering::SeqCst) >= 1
    });
    let wakeups_then = load(&h.queue_metrics().kicks);
    thread::sleep(Duration::from_millis(50));
    let wakeups_later = load(&h.queue_metrics().kicks);
    let stopped = Instant::now();
    worker.stop();

    assert_eq!(h.interrupt.resets.load(Ordering::SeqCst), 1, "once");
    assert_eq!(wakeups_then, 0, "end of file is not a kick");
    assert_eq!(
        wakeups_later, 0,
        "the worker parked instead of spinning on the hang-up"
    );
    assert!(stopped.elapsed() < WAIT, "a parked worker still stops");
}

#[test]
fn a_kick_fd_with_less_than_a_counter_to_read_does_not_block_the_worker() {
    use std::io::Write;
    let mem = memory();
    let mut h = Harness::new(&mem);
    let (read_end, mut write_end) = pipe();
    let worker = h.spawn_with_kick(kick_from(read_end));
    h.driver.add_chain(1).unwrap();

    write_end.write_all(&[1]).unwrap();
    let worker = wait_or_leak(worker, "the request kicked by one byte", || {
        h.used_idx() == 1
    });
    worker.stop();

    assert_eq!(load(&h.queue_metrics().kicks), 1);
    assert_eq!(h.interrupt.resets.load(Ordering::SeqCst), 0);
    drop(write_end);
}

// Packed rings: the same worker, the layout behind `VirtQueue`.

mod packed {
    use super::*;
    use crate::ring::mock::{PackedDriver, F_NEXT};

    const PACKED_RING: u64 = 0x4_0000;
    const PACKED_DATA: u64 = 0x8_0000;

    fn spawn_packed(h: &Harness<'_>, driver: &PackedDriver<'_>, event_idx: bool) -> QueueWorker {
        h.spawn_with(
            driver.queue(),
            NotifyPolicy::Interrupt,
            Box::new(EchoHandler),
            event_idx,
        )
    }

    #[test]
    fn kick_processes_packed_chains_and_interrupts() {
        let mem = memory();
        let h = Harness::new(&mem);
        let mut driver = PackedDriver::new(&mem, PACKED_RING, 8);
        let worker = spawn_packed(&h, &driver, true);

        for id in 0..3u16 {
            let addr = PACKED_DATA + u64::from(id) * 0x1000;
            driver.add_chain(id, &[(addr, 16, false), (addr + 0x100, 48, true)]);
        }
        h.kick.write(1).unwrap();
        let mut used = Vec::new();
        wait_until("three used buffers", || {
            used.extend(driver.used());
            used.len() == 3
        });
        wait_until("an interrupt", || load(&h.queue_metrics().interrupts) >= 1);
        let queue = worker.stop();

        assert_eq!(used, [(0, 64), (1, 64), (2, 64)]);
        assert!(queue.is_packed());
        assert_eq!(queue.used_progress(), 3);
        assert_eq!(load(&h.queue_metrics().requests), 3);
        assert!(h.interrupt.queue_interrupts().iter().all(|&q| q == 1));
        // Kicks re-enabled before sleeping, at the next avail position (6, first lap).
        assert_eq!(driver.device_event(), (6 | 1 << 15, 2));
    }

    #[test]
    fn driver_disabled_interrupts_are_counted_as_suppressed() {
        let mem = memory();
        let h = Harness::new(&mem);
        let mut driver = PackedDriver::new(&mem, PACKED_RING, 8);
        driver.set_driver_event(0, 1);
        let worker = spawn_packed(&h, &driver, false);

        driver.add_chain(0, &[(PACKED_DATA, 8, true)]);
        h.kick.write(1).unwrap();
        wait_until("the used buffer", || driver.used().is_some());
        wait_until("the suppressed signal", || h.signals() == 1);
        worker.stop();

        assert_eq!(load(&h.queue_metrics().interrupts), 0);
        assert_eq!(load(&h.queue_metrics().notifications_suppressed), 1);
    }

    #[test]
    fn hostile_packed_ring_needs_reset_once() {
        let mem = memory();
        let h = Harness::new(&mem);
        let driver = PackedDriver::new(&mem, PACKED_RING, 4);
        for index in 0..4 {
            driver.write_descriptor(index, PACKED_DATA, 8, 0, driver.available(F_NEXT));
        }
        let worker = spawn_packed(&h, &driver, true);

        wait_until("needs_reset", || {
            h.interrupt.resets.load(Ordering::SeqCst) == 1
        });
        h.kick.write(1).unwrap();
        wait_until("the kick", || load(&h.queue_metrics().kicks) == 1);
        worker.stop();

        assert_eq!(h.interrupt.resets.load(Ordering::SeqCst), 1);
        assert_eq!(load(&h.queue_metrics().requests), 0);
    }
}

#[test]
fn a_stopped_worker_reports_unread_buffers_and_requests_in_flight() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let queue = h.driver.create_queue::<Queue>().unwrap();
    let handler = Box::new(AsyncHandler {
        done: EventFd::new(EFD_NONBLOCK).unwrap(),
        in_flight: Vec::new(),
    });
    let worker = h.spawn_with(queue, NotifyPolicy::Interrupt, handler, true);
    // Two requests taken and never completed, then two published without a kick.
    h.submit(false);
    h.submit(true);
    wait_until("the kick", || load(&h.queue_metrics().kicks) == 1);
    // The pass that follows the kick takes both chains.
    thread::sleep(Duration::from_millis(100));
    h.submit(false);
    h.submit(false);

    worker.stop();

    assert_eq!(load(&h.queue_metrics().in_flight_at_stop), 2);
    assert_eq!(load(&h.queue_metrics().unread_at_stop), 2);
}

#[test]
fn a_worker_stopped_after_a_clean_run_reports_nothing_left() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let worker = h.spawn(NotifyPolicy::Interrupt, true);
    h.submit(true);
    wait_until("the answer", || h.used_idx() == 1);

    worker.stop();

    assert_eq!(load(&h.queue_metrics().in_flight_at_stop), 0);
    assert_eq!(load(&h.queue_metrics().unread_at_stop), 0);
}

#[test]
fn a_drained_stop_answers_requests_in_flight_before_handing_the_queue_back() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let queue = h.driver.create_queue::<Queue>().unwrap();
    let done = EventFd::new(EFD_NONBLOCK).unwrap();
    let completer = done.try_clone().unwrap();
    let handler = Box::new(AsyncHandler {
        done,
        in_flight: Vec::new(),
    });
    let worker = h.spawn_with(queue, NotifyPolicy::Interrupt, handler, true);
    h.submit(false);
    h.submit(true);
    wait_until("the kick", || load(&h.queue_metrics().kicks) == 1);
    thread::sleep(Duration::from_millis(50));
    let late_completion = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        completer.write(1).unwrap();
    });

    let queue = worker.stop_drained();
    late_completion.join().unwrap();

    assert_eq!(h.used_idx(), 2, "both requests answered before the stop");
    assert_eq!(
        queue.position(),
        crate::ring::QueuePosition::Split {
            next_avail: 2,
            next_used: 2
        }
    );
    assert_eq!(load(&h.queue_metrics().in_flight_at_stop), 0);
}

/// [`EchoHandler`] whose `wants_polling` is what the test (standing in for a scheduler) says.
struct SteeredHandler {
    polled: Arc<AtomicBool>,
}

impl QueueHandler for SteeredHandler {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        EchoHandler.process(ctx)
    }

    fn wants_polling(&self) -> bool {
        self.polled.load(Ordering::SeqCst)
    }
}

/// `notify=sched`: interrupts while the handler says not to poll (no poll loop entered,
/// notifications on), polling (unkicked requests served, notifications off) once it says
/// so, and back to notifications — long before the 30 s budget — when it stops saying so.
#[test]
fn scheduled_mode_polls_only_while_the_handler_asks_for_it() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let polled = Arc::new(AtomicBool::new(false));
    let queue = h.driver.create_queue::<Queue>().unwrap();
    let handler = Box::new(SteeredHandler {
        polled: polled.clone(),
    });
    let budget = Duration::from_secs(30);
    let worker = h.spawn_with(queue, NotifyPolicy::Scheduled { budget }, handler, false);

    h.submit(true);
    wait_until("the first request", || h.used_idx() == 1);
    let entries_off = load(&h.queue_metrics().poll_entries);
    let flags_off = h.used_flags();

    polled.store(true, Ordering::SeqCst);
    h.submit(true);
    wait_until("the kicked request", || h.used_idx() == 2);
    h.submit(false);
    wait_until("the unkicked request", || h.used_idx() == 3);
    let flags_polling = h.used_flags();
    let entries_on = load(&h.queue_metrics().poll_entries);

    let stopped_polling = Instant::now();
    polled.store(false, Ordering::SeqCst);
    wait_until("notifications back on", || h.used_flags() == 0);
    let back_after = stopped_polling.elapsed();
    h.submit(true);
    wait_until("a kicked request after polling", || h.used_idx() == 4);
    worker.stop();

    assert_eq!((entries_off, flags_off), (0, 0), "interrupt mode at first");
    assert_eq!(flags_polling, VRING_USED_F_NO_NOTIFY);
    assert_eq!(entries_on, 1, "one poll loop served both requests");
    assert!(
        back_after < budget,
        "the hint, not the budget, ended polling"
    );
    assert_eq!(load(&h.queue_metrics().kicks), 3);
    assert_eq!(load(&h.queue_metrics().requests), 4);
}

/// [`AsyncHandler`] steered like [`SteeredHandler`].
struct SteeredAsyncHandler {
    inner: AsyncHandler,
    polled: Arc<AtomicBool>,
}

impl QueueHandler for SteeredAsyncHandler {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.inner.process(ctx)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.inner.complete(ctx)
    }

    fn has_in_flight(&self) -> bool {
        self.inner.has_in_flight()
    }

    fn wants_polling(&self) -> bool {
        self.polled.load(Ordering::SeqCst)
    }
}

/// The hang `notify=sched` once had: a poll loop sleeps with notifications off while a
/// request is in flight, the scheduler then stops polling the guest, and the completion must
/// turn notifications back on — else the driver never kicks again and the next request is
/// never seen.
#[test]
fn scheduled_mode_turns_notifications_back_on_when_polling_ends_with_requests_in_flight() {
    let mem = memory();
    let mut h = Harness::new(&mem);
    let done = EventFd::new(EFD_NONBLOCK).unwrap();
    let polled = Arc::new(AtomicBool::new(true));
    let handler = SteeredAsyncHandler {
        inner: AsyncHandler {
            done: done.try_clone().unwrap(),
            in_flight: Vec::new(),
        },
        polled: polled.clone(),
    };
    let queue = h.driver.create_queue::<Queue>().unwrap();
    let policy = NotifyPolicy::Scheduled {
        budget: Duration::from_millis(1),
    };
    let worker = h.spawn_with(queue, policy, Box::new(handler), false);

    h.submit(true);
    wait_until("the kick", || load(&h.queue_metrics().kicks) == 1);
    // Past the poll window with the request in flight: asleep, notifications off.
    thread::sleep(Duration::from_millis(50));
    let flags_in_flight = h.used_flags();
    polled.store(false, Ordering::SeqCst);
    done.write(1).unwrap();
    wait_until("the completion", || h.used_idx() == 1);
    wait_until("notifications back on", || h.used_flags() == 0);
    h.submit(true);
    wait_until("the next request taken", || {
        load(&h.queue_metrics().kicks) == 2
    });
    done.write(1).unwrap();
    wait_until("its completion", || h.used_idx() == 2);
    worker.stop();

    assert_eq!(flags_in_flight, VRING_USED_F_NO_NOTIFY);
}
