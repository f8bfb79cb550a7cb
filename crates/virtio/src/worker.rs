//! [`QueueWorker`]: one virtqueue served by one thread.
//!
//! The thread sleeps in epoll on three (or four) file descriptors: the queue's kick eventfd (an
//! ioeventfd in the VMM, the kick fd in vhost-user), the handler's optional completion fd (an
//! io_uring eventfd, a tap fd), a stop eventfd, and — for [`NotifyPolicy::Batch`] — a timerfd
//! for the coalescing deadline (a timerfd rather than an epoll timeout because epoll timeouts
//! have millisecond granularity and useful batching delays are tens of microseconds).
//!
//! Per policy:
//! * `Interrupt`: driver notifications are suppressed while the worker drains the ring and
//!   re-enabled before it sleeps; `enable_notification` re-reads the avail index after
//!   re-enabling, so a request published in between is processed rather than lost. After each
//!   pass that added used entries, `needs_notification` (EVENT_IDX aware) decides whether the
//!   guest gets an interrupt or the notification is counted as suppressed.
//! * `Poll { budget }`: after a kick or a completion the worker keeps notifications off and
//!   spins on the avail index and the handler's completions until a poll window passes with
//!   neither; then it sleeps, with notifications back on unless requests are still in flight
//!   (their completion wakes it and it polls again: kicks coalesced). The window adapts
//!   between 5 µs and `budget` ([`PollWindow`]), so an idle queue costs no CPU.
//! * `Batch { max_requests, max_delay }`: completions accumulate until `max_requests` of them
//!   are unsignalled or `max_delay` passed since the first one; then one interrupt goes out.
//!   Each deferred signal counts as a suppressed notification.
//! * `Scheduled { budget }`: `Poll { budget }` while the handler's `wants_polling` says so,
//!   `Interrupt` otherwise — asked on each wakeup and on every spin, so a poll loop ends (its
//!   window closes at once) as soon as the answer turns false. Entries into the poll loop are
//!   counted (`QueueMetrics::poll_entries`).
//!
//! The worker looks at the ring once when it starts (requests published while nobody served
//! it), then only after kicks. The kick fd may be any fd a vhost-user frontend sent: it is made
//! non-blocking and read with one `read(2)` of at most 8 bytes; one that hangs up, reaches end
//! of file or fails is dropped from epoll and stops the queue as below (one log line).
//!
//! A handler error, an error from the ring itself, a dead kick fd, or a ring that does not fit
//! the DMA space marks the device DEVICE_NEEDS_RESET through [`VirtioInterrupt::needs_reset`]
//! (once); the thread then ignores the queue until [`QueueWorker::stop`], which hands the
//! [`VirtQueue`] back so its indices can be reported (reset, vhost-user GET_VRING_BASE).
//!
//! Written here rather than taken from `vhost-user-backend`'s epoll handler because that one is
//! tied to the vhost-user frontend protocol and has no notion of notification policies.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sluice_dma::DmaSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{
    NotifyPolicy, QueueBinding, QueueContext, QueueError, QueueHandler, VirtioInterrupt,
};
use crate::metrics::{DeviceMetrics, QueueMetrics};
use crate::ring::{InitialQueue, VirtQueue};

/// epoll tokens.
const TOKEN_STOP: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_COMPLETION: u64 = 2;
const TOKEN_TIMER: u64 = 3;
/// Events handled per epoll wakeup.
const EVENTS_PER_WAIT: usize = 8;
/// Time between two non-blocking epoll checks (kicks, completions of handlers that cannot be
/// polled) while polling; a check is a system call, the spin loop's other reads are not.
const POLL_EPOLL_INTERVAL: Duration = Duration::from_micros(20);
/// How long a drained stop waits for requests in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two looks at the completions while draining.
const DRAIN_POLL: Duration = Duration::from_micros(200);
/// The shortest poll window [`PollWindow`] shrinks to.
const MIN_POLL_WINDOW: Duration = Duration::from_micros(5);

/// A running queue; dropping it stops the thread too.
pub struct QueueWorker {
    /// Set for an inline queue ([`QueueWorker::inline`]): no thread, the caller runs each kick.
    inline: Option<Box<Worker>>,
    stop_event: EventFd,
    stop_flag: Arc<AtomicBool>,
    /// Set before a stop that must first let requests in flight complete (a snapshot).
    drain_on_stop: Arc<AtomicBool>,
    index: u16,
    thread: Option<JoinHandle<VirtQueue>>,
    /// Where the queue started, to hand back something sane if the thread panicked.
    initial: InitialQueue,
    name: String,
}

impl std::fmt::Debug for QueueWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueWorker")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl QueueWorker {
    /// Starts a thread named `name` serving `binding.queue` with `handler`.
    ///
    /// `event_idx` says whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn spawn(
        name: String,
        binding: QueueBinding,
        mem: DmaSpace,
        handler: Box<dyn QueueHandler>,
        interrupt: Arc<dyn VirtioInterrupt>,
        metrics: Arc<DeviceMetrics>,
        event_idx: bool,
    ) -> io::Result<QueueWorker> {
        let stop_event = EventFd::new(EFD_NONBLOCK)?;
        let stop_flag = Arc::new(AtomicBool::new(false));
        let initial = InitialQueue::of(&binding.queue);
        let index = binding.index;
        let drain_on_stop = Arc::new(AtomicBool::new(false));
        let mut worker = Worker::new(
            name.clone(),
            binding,
            mem,
            handler,
            interrupt,
            metrics,
            event_idx,
            stop_event.try_clone()?,
            stop_flag.clone(),
        )?;
        worker.drain_on_stop = drain_on_stop.clone();
        let kind = sluice_sandbox::ThreadKind::QueueWorker;
        let thread = sluice_sandbox::spawn(kind, name.clone(), move || worker.run())?;
        Ok(QueueWorker {
            inline: None,
            stop_event,
            stop_flag,
            drain_on_stop,
            index,
            thread: Some(thread),
            initial,
            name,
        })
    }

    /// A queue served by no thread: the caller runs every kick with [`QueueWorker::kick_inline`],
    /// which returns only once everything the kick started is answered in the used ring (and
    /// its interrupt, if any, sent from the calling thread). This is the deterministic device
    /// mode of record and replay (docs/replay.md): device writes into guest memory and
    /// interrupts then happen only while the vCPU that rang the doorbell is out of the guest.
    /// The notify policy is always `Interrupt` (polling and batching depend on host time).
    pub fn inline(
        name: String,
        mut binding: QueueBinding,
        mem: DmaSpace,
        handler: Box<dyn QueueHandler>,
        interrupt: Arc<dyn VirtioInterrupt>,
        metrics: Arc<DeviceMetrics>,
        event_idx: bool,
    ) -> io::Result<QueueWorker> {
        binding.policy = NotifyPolicy::Interrupt;
        let stop_event = EventFd::new(EFD_NONBLOCK)?;
        let stop_flag = Arc::new(AtomicBool::new(false));
        let initial = InitialQueue::of(&binding.queue);
        let index = binding.index;
        let mut worker = Worker::new(
            name.clone(),
            binding,
            mem,
            handler,
            interrupt,
            metrics,
            event_idx,
            stop_event.try_clone()?,
            stop_flag.clone(),
        )?;
        if worker.queue.is_valid(&worker.mem) {
            worker.drain_synchronously();
        } else {
            worker.fail("the ring does not fit guest memory");
        }
        Ok(QueueWorker {
            inline: Some(Box::new(worker)),
            stop_event,
            stop_flag,
            drain_on_stop: Arc::new(AtomicBool::new(false)),
            index,
            thread: None,
            initial,
            name,
        })
    }

    /// Runs a doorbell of an inline queue to the end on the calling thread; false (nothing
    /// done) for a queue served by its own thread.
    pub fn kick_inline(&mut self) -> bool {
        let Some(worker) = self.inline.as_mut() else {
            return false;
        };
        QueueMetrics::add(&worker.queue_metrics().kicks, 1);
        if !worker.broken {
            worker.drain_synchronously();
        }
        true
    }

    /// The queue index it serves.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Like [`QueueWorker::stop`], but requests already taken complete first (bounded by
    /// [`DRAIN_TIMEOUT`]) and are answered in the used ring: the queue is then quiescent, its
    /// indices say everything (a snapshot). Chains not taken yet stay in the ring.
    pub fn stop_drained(self) -> VirtQueue {
        self.drain_on_stop.store(true, Ordering::Release);
        self.stop()
    }

    /// Stops the thread, waits for it and returns the queue with its current indices.
    pub fn stop(mut self) -> VirtQueue {
        self.stop_and_join()
            .unwrap_or_else(|| self.initial.clone().into_queue())
    }

    fn stop_and_join(&mut self) -> Option<VirtQueue> {
        if let Some(worker) = self.inline.take() {
            // Inline queues have nothing in flight between two kicks.
            if !worker.broken {
                worker.record_stop_state();
            }
            return Some(worker.queue);
        }
        let thread = self.thread.take()?;
        self.stop_flag.store(true, Ordering::Release);
        if let Err(e) = self.stop_event.write(1) {
            // The flag alone still stops a polling thread; a sleeping one needs the event.
            tracing::error!("{}: cannot signal the queue worker to stop: {e}", self.name);
        }
        match thread.join() {
            Ok(queue) => Some(queue),
            Err(_) => {
                tracing::error!("{}: queue worker panicked", self.name);
                None
            }
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What the event loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// Completions not yet signalled under [`NotifyPolicy::Batch`].
#[derive(Debug, Default)]
struct Batch {
    unsignalled: u32,
    first: Option<Instant>,
}

/// How long [`NotifyPolicy::Poll`] keeps spinning after the last request or completion,
/// adapted the way KVM adapts halt polling: between [`MIN_POLL_WINDOW`] and the configured
/// budget, doubled when a kick arrives soon after the worker went to sleep (polling that much
/// longer would have caught the request without the kick and the wakeup), halved when the
/// driver stayed away longer than the budget (polling would have burnt CPU for nothing).
#[derive(Debug)]
struct PollWindow {
    current: Duration,
    max: Duration,
    slept_at: Option<Instant>,
}

impl PollWindow {
    fn new(max: Duration) -> Self {
        PollWindow {
            current: max,
            max,
            slept_at: None,
        }
    }

    fn current(&self) -> Duration {
        self.current
    }

    /// The worker stopped polling and sleeps with driver notifications on.
    fn sleeping(&mut self) {
        self.slept_at = Some(Instant::now());
    }

    /// A kick woke the worker (after [`PollWindow::sleeping`]).
    fn woken_by_kick(&mut self) {
        if let Some(slept_at) = self.slept_at.take() {
            self.adapt(slept_at.elapsed());
        }
    }

    /// Applies the rule above to a sleep of `slept`.
    fn adapt(&mut self, slept: Duration) {
        let floor = MIN_POLL_WINDOW.min(self.max);
        self.current = if slept <= self.max {
            (self.current * 2).clamp(floor, self.max)
        } else {
            (self.current / 2).max(floor)
        };
    }
}

/// The state owned by the worker thread.
struct Worker {
    name: String,
    index: u16,
    queue: VirtQueue,
    mem: DmaSpace,
    handler: Box<dyn QueueHandler>,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
    /// Counters used when `metrics` has no entry for this queue (a device model bug).
    fallback_metrics: QueueMetrics,
    policy: NotifyPolicy,
    epoll: Epoll,
    kick: EventFd,
    completion_fd: Option<RawFd>,
    _stop_event: EventFd,
    stop_flag: Arc<AtomicBool>,
    drain_on_stop: Arc<AtomicBool>,
    timer: Option<TimerFd>,
    batch: Batch,
    /// The poll window under [`NotifyPolicy::Poll`] (unused by the other policies).
    window: PollWindow,
    broken: bool,
}

impl Worker {
    #[allow(clippy::too_many_arguments, reason = "one per worker field")]
    fn new(
        name: String,
        binding: QueueBinding,
        mem: DmaSpace,
        handler: Box<dyn QueueHandler>,
        interrupt: Arc<dyn VirtioInterrupt>,
        metrics: Arc<DeviceMetrics>,
        event_idx: bool,
        stop_event: EventFd,
        stop_flag: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        let QueueBinding {
            index,
            mut queue,
            kick,
            policy,
        } = binding;
        queue.set_event_idx(event_idx);
        set_nonblocking(kick.as_raw_fd())?;
        let epoll = Epoll::new()?;
        add_to_epoll(&epoll, stop_event.as_raw_fd(), TOKEN_STOP)?;
        add_to_epoll(&epoll, kick.as_raw_fd(), TOKEN_KICK)?;
        let completion_fd = handler.completion_fd();
        if let Some(fd) = completion_fd {
            add_to_epoll(&epoll, fd, TOKEN_COMPLETION)?;
        }
        let timer = match policy {
            NotifyPolicy::Batch { .. } => {
                let timer = TimerFd::new()?;
                add_to_epoll(&epoll, timer.as_raw_fd(), TOKEN_TIMER)?;
                Some(timer)
            }
            _ => None,
        };
        Ok(Self {
            name,
            index,
            queue,
            mem,
            handler,
            interrupt,
            metrics,
            fallback_metrics: QueueMetrics::default(),
            policy,
            epoll,
            kick,
            completion_fd,
            _stop_event: stop_event,
            stop_flag,
            drain_on_stop: Arc::new(AtomicBool::new(false)),
            timer,
            batch: Batch::default(),
            window: PollWindow::new(match policy {
                NotifyPolicy::Poll { budget } | NotifyPolicy::Scheduled { budget } => budget,
                NotifyPolicy::Interrupt | NotifyPolicy::Batch { .. } => Duration::ZERO,
            }),
            broken: false,
        })
    }

    fn run(mut self) -> VirtQueue {
        let mut flow = Flow::Continue;
        if !self.queue.is_valid(&self.mem) {
            self.fail("the ring does not fit guest memory");
        } else {
            flow = self.first_pass();
        }
        let mut events = [EpollEvent::default(); EVENTS_PER_WAIT];
        while flow == Flow::Continue && !self.stop_flag.load(Ordering::Acquire) {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: epoll failed: {e}; worker exits", self.name);
                    break;
                }
            };
            if self.dispatch(&events[..ready], false) == Flow::Stop {
                break;
            }
        }
        if !self.broken && self.drain_on_stop.load(Ordering::Acquire) {
            self.drain_in_flight();
        }
        if !self.broken {
            // Completions must not be left unsignalled when the queue changes hands.
            self.flush_batch();
            self.record_stop_state();
        }
        self.queue
    }

    /// The inline queue's kick: processes the ring, then waits for the handler's asynchronous
    /// work (io_uring, bounded by [`DRAIN_TIMEOUT`]) and processes again until the ring holds
    /// nothing new and nothing is in flight.
    fn drain_synchronously(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        self.drain_ring();
        while !self.broken && self.handler.has_in_flight() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return self.fail("requests did not complete in time (inline queue)");
            }
            self.wait_for_completion(left.min(DRAIN_POLL * 50));
            self.reap_completions();
            self.drain_ring();
        }
    }

    /// Sleeps until the handler's completion fd is readable or `limit` passed (a handler
    /// without one completes synchronously and is never waited for).
    fn wait_for_completion(&self, limit: Duration) {
        let Some(fd) = self.completion_fd else {
            std::thread::sleep(DRAIN_POLL);
            return;
        };
        let mut poll_fd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(limit.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&raw mut poll_fd, 1, millis) };
    }

    /// Reaps completions until nothing is in flight or [`DRAIN_TIMEOUT`] passed.
    fn drain_in_flight(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.broken && self.handler.has_in_flight() && Instant::now() < deadline {
            self.reap_completions();
            if self.handler.has_in_flight() {
                std::thread::sleep(DRAIN_POLL);
            }
        }
    }

    /// Notes what the ring held when the worker stopped (see `QueueMetrics::unread_at_stop`):
    /// after a hang this tells a lost kick from a lost completion or interrupt.
    fn record_stop_state(&self) {
        let unread = self.queue.unread(&self.mem).unwrap_or(0);
        let in_flight = self.handler.in_flight();
        if let Some(metrics) = self.metrics.queues.get(usize::from(self.index)) {
            metrics
                .unread_at_stop
                .store(u64::from(unread), Ordering::Relaxed);
            metrics
                .in_flight_at_stop
                .store(in_flight as u64, Ordering::Relaxed);
        }
        if unread > 0 || in_flight > 0 {
            tracing::info!(
                "{}: stopped with {unread} buffers unread and {in_flight} requests in flight",
                self.name
            );
        }
    }

    /// Requests made available while nobody served the ring (a ring restarted after
    /// GET_VRING_BASE or a memory-table change) have had their kick already: look once.
    fn first_pass(&mut self) -> Flow {
        if self.polling() {
            return self.poll();
        }
        self.drain_ring();
        Flow::Continue
    }

    /// Whether the queue is served by polling now (see [`NotifyPolicy::Scheduled`]).
    fn polling(&self) -> bool {
        match self.policy {
            NotifyPolicy::Poll { .. } => true,
            NotifyPolicy::Scheduled { .. } => self.handler.wants_polling(),
            NotifyPolicy::Interrupt | NotifyPolicy::Batch { .. } => false,
        }
    }

    /// Handles ready events. While `polling`, kicks are only counted (the spin loop is already
    /// watching the ring).
    fn dispatch(&mut self, events: &[EpollEvent], polling: bool) -> Flow {
        for event in events {
            let flow = match event.data() {
                TOKEN_STOP => Flow::Stop,
                TOKEN_KICK => self.on_kick(event.events(), polling),
                TOKEN_COMPLETION => self.on_completion(polling),
                TOKEN_TIMER => {
                    self.flush_batch();
                    Flow::Continue
                }
                _ => Flow::Continue,
            };
            if flow == Flow::Stop || self.stop_flag.load(Ordering::Acquire) {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn queue_metrics(&self) -> &QueueMetrics {
        self.metrics
            .queues
            .get(usize::from(self.index))
            .unwrap_or(&self.fallback_metrics)
    }

    fn on_kick(&mut self, events: u32, polling: bool) -> Flow {
        match read_kick(self.kick.as_raw_fd(), events) {
            KickRead::Kicked => {}
            KickRead::Spurious => return Flow::Continue,
            KickRead::Dead(why) => {
                self.forget_kick();
                self.fail(&format!("the kick fd {why}"));
                return Flow::Continue;
            }
        }
        QueueMetrics::add(&self.queue_metrics().kicks, 1);
        if self.broken || polling {
            return Flow::Continue;
        }
        if self.polling() {
            self.window.woken_by_kick();
            return self.poll();
        }
        self.drain_ring();
        Flow::Continue
    }

    /// The completion fd is readable. A polling worker that slept (possibly with requests in
    /// flight and notifications off, see [`Worker::poll`]) polls again afterwards: the driver
    /// refills as completions arrive, without kicking, and `poll` leaves the notifications
    /// in the right state when it sleeps again.
    fn on_completion(&mut self, polling: bool) -> Flow {
        if self.broken {
            self.forget_completion_fd();
            return Flow::Continue;
        }
        self.reap_completions();
        if polling || self.broken {
            return Flow::Continue;
        }
        if self.polling() {
            return self.poll();
        }
        if matches!(self.policy, NotifyPolicy::Scheduled { .. }) {
            // The last poll loop may have slept with driver notifications off (requests were
            // in flight) and the guest is no longer to be polled: serve the ring as the
            // interrupt policy does, which turns them back on (else nothing would ever wake
            // the worker for what the driver published meanwhile).
            self.drain_ring();
        }
        Flow::Continue
    }

    /// Runs the handler's `complete` and the policy's signalling.
    fn reap_completions(&mut self) {
        let before = self.queue.used_progress();
        match self.call_handler(true) {
            Ok(added) => self.after_pass(before, added),
            Err(e) => self.fail(&format!("completion failed: {e}")),
        }
    }

    /// Runs `process` (or `complete`) with the context borrowed from disjoint fields.
    fn call_handler(&mut self, completion: bool) -> Result<bool, QueueError> {
        let metrics = self
            .metrics
            .queues
            .get(usize::from(self.index))
            .unwrap_or(&self.fallback_metrics);
        let mut ctx = QueueContext {
            queue: &mut self.queue,
            mem: &self.mem,
            metrics,
        };
        if completion {
            self.handler.complete(&mut ctx)
        } else {
            self.handler.process(&mut ctx)
        }
    }

    /// One `process` pass followed by the policy's signalling. False if the queue broke.
    fn process_pass(&mut self) -> bool {
        let before = self.queue.used_progress();
        match self.call_handler(false) {
            Ok(added) => {
                self.after_pass(before, added);
                !self.broken
            }
            Err(e) => {
                self.fail(&format!("request processing failed: {e}"));
                false
            }
        }
    }

    /// Interrupt / Batch: drain with driver notifications off, re-enable, recheck.
    ///
    /// `enable_notification` reports chains still available, which includes chains the handler
    /// chose to leave (an RX queue keeps posted buffers until the tap has frames). Only chains
    /// published after the pass began are new work; looping on the others would spin the
    /// thread at 100% until a frame arrives.
    fn drain_ring(&mut self) {
        // A driver that keeps the ring full must not keep the worker from stopping.
        while !self.stop_flag.load(Ordering::Acquire) {
            if let Err(e) = self.queue.disable_notification(&self.mem) {
                return self.fail(&format!("cannot suppress notifications: {e}"));
            }
            let offered = match self.avail_marker() {
                Ok(marker) => marker,
                Err(e) => return self.fail(&format!("cannot read the avail ring: {e}")),
            };
            if !self.process_pass() {
                return;
            }
            match self.queue.enable_notification(&self.mem) {
                Ok(true) if self.published_since(offered) => continue,
                Ok(true) => match self.queue.enable_notification_past_available(&self.mem) {
                    // The handler left chains: wait for the driver to publish more.
                    Ok(armed) if self.published_since(armed) => continue,
                    Ok(_) => return,
                    Err(e) => return self.fail(&format!("cannot re-enable notifications: {e}")),
                },
                Ok(false) => return,
                Err(e) => return self.fail(&format!("cannot re-enable notifications: {e}")),
            }
        }
    }

    /// A value that changes whenever the driver publishes buffers (`VirtQueue::avail_marker`).
    fn avail_marker(&self) -> Result<u16, QueueError> {
        self.queue.avail_marker(&self.mem)
    }

    /// True when the driver published chains after the marker read `offered` (or the ring
    /// cannot be read: the next pass reports that).
    fn published_since(&self, offered: u16) -> bool {
        !self.avail_marker().is_ok_and(|now| now == offered)
    }

    /// Poll: spin on the avail index (and, through the handler, on its completions) until the
    /// poll window passes with neither a new request nor a completion, then sleep.
    ///
    /// Requests still in flight when the window closes keep driver notifications off: their
    /// completion wakes the worker, which then polls again and finds whatever the driver
    /// published meanwhile, so a driver that refills its queue as completions arrive never
    /// needs to kick (kick coalescing; a kick costs a ring-3 guest ~22 µs on kvm_pvm).
    /// Only when nothing is in flight are notifications re-enabled before sleeping, so an
    /// idle queue costs no CPU.
    fn poll(&mut self) -> Flow {
        if let Err(e) = self.queue.disable_notification(&self.mem) {
            self.fail(&format!("cannot suppress notifications: {e}"));
            return Flow::Continue;
        }
        QueueMetrics::add(&self.queue_metrics().poll_entries, 1);
        let mut idle_since = Instant::now();
        let mut last_epoll = idle_since;
        // The avail marker at which the handler last left every chain in the ring.
        let mut declined: Option<u16> = None;
        let mut events = [EpollEvent::default(); EVENTS_PER_WAIT];
        loop {
            if self.stop_flag.load(Ordering::Acquire) {
                return Flow::Stop;
            }
            // Completions first: they free the driver's slots, which it then refills.
            if self.handler.completion_ready() {
                self.reap_completions();
                if self.broken {
                    return Flow::Continue;
                }
                idle_since = Instant::now();
            }
            match self.has_new_work(declined) {
                Ok(Some(offered)) => {
                    let taken_before = self.queue.avail_position();
                    if !self.process_pass() {
                        return Flow::Continue;
                    }
                    if self.queue.avail_position() == taken_before {
                        // The handler left the chains (RX waiting for frames): not new work
                        // until the driver publishes more.
                        declined = Some(offered);
                    } else {
                        declined = None;
                        idle_since = Instant::now();
                        continue;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.fail(&format!("cannot read the avail index: {e}"));
                    return Flow::Continue;
                }
            }
            let now = Instant::now();
            // A scheduled queue whose guest is no longer to be polled closes its window now.
            let window = if self.polling() {
                self.window.current()
            } else {
                Duration::ZERO
            };
            if now.duration_since(idle_since) >= window {
                if self.handler.has_in_flight() {
                    // Sleep until the completion, notifications still off (see above).
                    return Flow::Continue;
                }
                match self.queue.enable_notification(&self.mem) {
                    Ok(true) if matches!(self.has_new_work(declined), Ok(Some(_))) => {
                        // A request slipped in while re-enabling: keep polling.
                        if let Err(e) = self.queue.disable_notification(&self.mem) {
                            self.fail(&format!("cannot suppress notifications: {e}"));
                            return Flow::Continue;
                        }
                        idle_since = Instant::now();
                    }
                    Ok(true) => {
                        // The handler left chains: wait for the driver to publish more.
                        match self.queue.enable_notification_past_available(&self.mem) {
                            Ok(armed) if self.published_since(armed) => {
                                if let Err(e) = self.queue.disable_notification(&self.mem) {
                                    self.fail(&format!("cannot suppress notifications: {e}"));
                                    return Flow::Continue;
                                }
                                idle_since = Instant::now();
                            }
                            Ok(_) => {
                                self.window.sleeping();
                                return Flow::Continue;
                            }
                            Err(e) => {
                                self.fail(&format!("cannot re-enable notifications: {e}"));
                                return Flow::Continue;
                            }
                        }
                    }
                    Ok(_) => {
                        self.window.sleeping();
                        return Flow::Continue;
                    }
                    Err(e) => {
                        self.fail(&format!("cannot re-enable notifications: {e}"));
                        return Flow::Continue;
                    }
                }
            }
            // Kicks (only counted now), stop, and completions of handlers that cannot be
            // polled arrive through epoll: look at it now and then, not on every spin.
            if now.duration_since(last_epoll) >= POLL_EPOLL_INTERVAL {
                last_epoll = now;
                let ready = self.epoll.wait(0, &mut events).unwrap_or(0);
                if self.dispatch(&events[..ready], true) == Flow::Stop {
                    return Flow::Stop;
                }
                if self.broken {
                    return Flow::Continue;
                }
            }
            std::hint::spin_loop();
        }
    }

    /// The avail marker when the ring holds chains not yet taken, unless the handler already
    /// declined them at that same marker.
    fn has_new_work(&self, declined: Option<u16>) -> Result<Option<u16>, QueueError> {
        if !self.queue.has_available(&self.mem)? {
            return Ok(None);
        }
        let marker = self.avail_marker()?;
        Ok((declined != Some(marker)).then_some(marker))
    }

    /// Applies the notify policy after a pass that may have added used entries.
    fn after_pass(&mut self, used_before: u16, handler_added: bool) {
        let delta = self.queue.used_progress().wrapping_sub(used_before);
        let added = if delta == 0 && handler_added {
            1
        } else {
            u32::from(delta)
        };
        if added == 0 {
            return;
        }
        match self.policy {
            NotifyPolicy::Batch {
                max_requests,
                max_delay,
            } => self.batch_completions(added, max_requests, max_delay),
            _ => self.signal_used(),
        }
    }

    fn batch_completions(&mut self, added: u32, max_requests: u32, max_delay: Duration) {
        self.batch.unsignalled = self.batch.unsignalled.saturating_add(added);
        if self.batch.unsignalled >= max_requests || max_delay.is_zero() {
            self.flush_batch();
            return;
        }
        if self.batch.first.is_none() {
            self.batch.first = Some(Instant::now());
            self.arm_timer(max_delay);
        }
        QueueMetrics::add(&self.queue_metrics().notifications_suppressed, 1);
    }

    fn arm_timer(&mut self, delay: Duration) {
        let Some(timer) = self.timer.as_mut() else {
            return;
        };
        if let Err(e) = timer.reset(delay, None) {
            tracing::warn!("{}: cannot arm the batching timer: {e}", self.name);
        }
    }

    /// Sends the interrupt for the batched completions, if any.
    fn flush_batch(&mut self) {
        if let Some(timer) = self.timer.as_mut() {
            // Disarming also resets the expiry count, so the timerfd stops being readable.
            if let Err(e) = timer.clear() {
                tracing::warn!("{}: cannot disarm the batching timer: {e}", self.name);
            }
        }
        if self.batch.unsignalled == 0 {
            return;
        }
        self.batch = Batch::default();
        self.signal_used();
    }

    /// Interrupts the driver unless EVENT_IDX / flags say it does not want it now.
    fn signal_used(&mut self) {
        match self.queue.needs_notification(&self.mem) {
            Ok(true) => {
                if let Err(e) = self.interrupt.notify_queue(self.index) {
                    tracing::warn!("{}: queue interrupt failed: {e}", self.name);
                }
                QueueMetrics::add(&self.queue_metrics().interrupts, 1);
            }
            Ok(false) => QueueMetrics::add(&self.queue_metrics().notifications_suppressed, 1),
            Err(e) => self.fail(&format!("cannot read used_event: {e}")),
        }
    }

    /// Marks the device broken (once) and stops serving the queue.
    fn fail(&mut self, reason: &str) {
        if self.broken {
            return;
        }
        self.broken = true;
        tracing::error!(
            "{}: queue {}: {reason}; device needs reset",
            self.name,
            self.index
        );
        self.interrupt.needs_reset();
        self.forget_completion_fd();
        if let Some(timer) = self.timer.as_mut() {
            let _ = timer.clear();
        }
        self.batch = Batch::default();
    }

    /// A kick fd that hung up stays readable (level-triggered) for ever: stop watching it.
    fn forget_kick(&mut self) {
        let fd = self.kick.as_raw_fd();
        let removed = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        if let Err(e) = removed {
            tracing::warn!("{}: cannot stop watching the kick fd: {e}", self.name);
        }
    }

    /// A level-triggered completion fd nobody services would wake epoll forever.
    fn forget_completion_fd(&mut self) {
        if let Some(fd) = self.completion_fd.take() {
            let removed = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            if let Err(e) = removed {
                tracing::warn!("{}: cannot stop watching the completion fd: {e}", self.name);
            }
        }
    }
}

/// What one look at the kick fd found.
#[derive(Debug, PartialEq, Eq)]
enum KickRead {
    /// The driver notified the queue.
    Kicked,
    /// Nothing to read after all.
    Spurious,
    /// The fd will never kick again (hung up, failed, or not readable at all).
    Dead(String),
}

/// Consumes one notification from the kick fd that epoll reported with `events`.
///
/// The fd is whatever the other side handed over — sluice's own eventfds in the VMM, but in
/// vhost-user any descriptor the frontend sent (made non-blocking at spawn): so one `read(2)`
/// of at most 8 bytes (never `read_exact`, which fails or blocks on a pipe holding fewer), only
/// when epoll said readable; end of file, a hang-up or error without data, and any read error
/// but EAGAIN / EINTR mean the kick is dead.
fn read_kick(fd: RawFd, events: u32) -> KickRead {
    let readable = events & libc::EPOLLIN as u32 != 0;
    let hung_up = events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
    if !readable {
        return if hung_up {
            KickRead::Dead("hung up".into())
        } else {
            KickRead::Spurious
        };
    }
    let mut counter = [0u8; 8];
    // SAFETY: `counter` is valid for writes of its length for the duration of the call; the
    // fd belongs to the worker's binding and stays open while the worker runs.
    let read = unsafe { libc::read(fd, counter.as_mut_ptr().cast(), counter.len()) };
    match read {
        0 => KickRead::Dead("reached end of file (its writer closed it)".into()),
        n if n > 0 => KickRead::Kicked,
        _ => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => KickRead::Spurious,
                io::ErrorKind::WouldBlock if !hung_up => KickRead::Spurious,
                _ => KickRead::Dead(format!("failed: {e}")),
            }
        }
    }
}

/// Makes reads of `fd` fail with EAGAIN instead of blocking: a vhost-user frontend shares the
/// kick fd and could drain it between epoll's report and the worker's read.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set the status flags of a descriptor the binding
    // owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn add_to_epoll(epoll: &Epoll, fd: RawFd, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

#[cfg(test)]
pub(crate) mod tests;
