//! [`Qos`]: one [`Scheduler`] shared by the queue workers of every guest on a backend, and
//! the [`QueuePort`] each worker holds.
//!
//! Each queue worker enqueues its requests and submits the ones granted to it; a dispatch
//! run by one worker (on an enqueue or a completion) may grant another worker's requests,
//! which is then woken through its port's eventfd (the worker waits on
//! [`QueuePort::wake_fd`] with its other fds). A ticker thread runs the dispatch when a
//! bucket refills, since then no worker has a reason to wake.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::scheduler::{
    DeviceConfig, GuestConfig, GuestId, GuestStats, QueueFull, QueueId, Request, Scheduler,
};
use crate::Nanos;

/// How long the ticker sleeps at most (it also notices its scheduler going away).
const TICKER_MAX_SLEEP: Duration = Duration::from_millis(100);

struct Inner {
    scheduler: Scheduler,
    /// Per queue: its worker's waker and its count of grants not yet taken.
    ports: Vec<Option<PortShared>>,
    /// Per guest: whether its queues are to be polled (`Scheduler::refresh_modes`), read by
    /// its workers without the lock.
    polled: Vec<Arc<AtomicBool>>,
}

#[derive(Clone)]
struct PortShared {
    waker: Arc<EventFd>,
    granted: Arc<AtomicUsize>,
}

/// A scheduler shared between threads (see the module doc).
pub struct Qos {
    inner: Mutex<Inner>,
    ticker: Condvar,
    epoch: Instant,
}

impl std::fmt::Debug for Qos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qos").finish_non_exhaustive()
    }
}

impl Qos {
    /// A scheduler for one backend device; call [`Qos::start_ticker`] once guests have limits.
    pub fn new(device: DeviceConfig) -> Arc<Self> {
        Arc::new(Qos {
            inner: Mutex::new(Inner {
                scheduler: Scheduler::new(device, 0),
                ports: Vec::new(),
                polled: Vec::new(),
            }),
            ticker: Condvar::new(),
            epoch: Instant::now(),
        })
    }

    fn now(&self) -> Nanos {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add_guest(&self, config: GuestConfig) -> GuestId {
        let now = self.now();
        let mut inner = self.lock();
        let guest = inner.scheduler.add_guest(config, now);
        inner.polled.push(Arc::new(AtomicBool::new(false)));
        guest
    }

    /// Changes a guest's weight and limits while it runs.
    pub fn reconfigure(&self, guest: GuestId, config: GuestConfig) -> bool {
        let now = self.now();
        let changed = self.lock().scheduler.reconfigure(guest, config, now);
        self.ticker.notify_one();
        changed
    }

    /// Takes a guest out of the scheduler (its disk was unplugged): its requests are
    /// forgotten, its stats leave the metrics and the others' shares. False if unknown.
    pub fn remove_guest(&self, guest: GuestId) -> bool {
        let mut inner = self.lock();
        let removed = inner.scheduler.remove_guest(guest);
        if removed {
            // Its in-flight slots are free now: others may go.
            self.dispatch_locked(&mut inner, None);
        }
        removed
    }

    /// One guest's entry of [`Qos::stats_json`] (None once removed).
    pub fn guest_json(&self, guest: GuestId) -> Option<serde_json::Value> {
        let now = self.now();
        let inner = self.lock();
        let (config, stats) = inner.scheduler.guest_stats(guest, now)?;
        let total = inner.scheduler.stats(now).iter().map(|(_, s)| s.cost).sum();
        Some(guest_entry(&config, &stats, total))
    }

    /// The device-wide settings (depth, buckets).
    pub fn device_config(&self) -> DeviceConfig {
        self.lock().scheduler.device().clone()
    }

    /// Changes the device-wide depth and buckets while guests run (the buckets restart
    /// full); the ticker dispatches what the new settings let go.
    pub fn reconfigure_device(&self, device: DeviceConfig) {
        let now = self.now();
        self.lock().scheduler.reconfigure_device(device, now);
        self.ticker.notify_one();
    }

    pub fn guest_config(&self, guest: GuestId) -> Option<GuestConfig> {
        self.lock().scheduler.guest_config(guest).cloned()
    }

    /// Starts the thread that dispatches when buckets refill (a queue-worker thread for
    /// seccomp: it only waits, reads the clock and writes eventfds). It ends once every
    /// other holder of the scheduler let go.
    pub fn start_ticker(self: &Arc<Self>) -> io::Result<()> {
        let weak = Arc::downgrade(self);
        sluice_sandbox::spawn(
            sluice_sandbox::ThreadKind::QueueWorker,
            "qos-ticker".into(),
            move || ticker(&weak),
        )?;
        Ok(())
    }

    /// A port for a new queue of `guest`.
    pub fn port(self: &Arc<Self>, guest: GuestId) -> io::Result<QueuePort> {
        let waker = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let granted = Arc::new(AtomicUsize::new(0));
        let mut inner = self.lock();
        let queue = inner.scheduler.add_queue(guest);
        let shared = PortShared {
            waker: Arc::clone(&waker),
            granted: Arc::clone(&granted),
        };
        if inner.ports.len() <= queue.0 {
            inner.ports.resize(queue.0 + 1, None);
        }
        inner.ports[queue.0] = Some(shared);
        let polled = inner
            .polled
            .get(guest.0)
            .cloned()
            .unwrap_or_else(|| Arc::new(AtomicBool::new(false)));
        Ok(QueuePort {
            qos: Arc::clone(self),
            queue,
            waker,
            granted,
            polled,
        })
    }

    /// Runs a dispatch pass and wakes the queues that got grants, except `own` (whose caller
    /// takes them itself).
    fn dispatch_locked(&self, inner: &mut Inner, own: Option<QueueId>) {
        let now = self.now();
        for queue in inner.scheduler.dispatch(now) {
            if let Some(Some(port)) = inner.ports.get(queue.0) {
                port.granted.fetch_add(1, Ordering::Release);
                if Some(queue) != own {
                    let _ = port.waker.write(1);
                }
            }
        }
        if inner.scheduler.next_wakeup(now).is_some() {
            self.ticker.notify_one();
        }
        let modes = inner.scheduler.refresh_modes(now);
        for (flag, polled) in inner.polled.iter().zip(modes) {
            flag.store(polled, Ordering::Relaxed);
        }
    }

    /// Every guest's configuration and stats, with its share of the served cost.
    pub fn stats(&self) -> Vec<(GuestConfig, GuestStats)> {
        let now = self.now();
        self.lock().scheduler.stats(now)
    }

    /// The stats as JSON (the `qos` section of `sluice serve --metrics`).
    pub fn stats_json(&self) -> serde_json::Value {
        let device = self.lock().scheduler.device().clone();
        stats_json(&device, &self.stats())
    }
}

/// JSON for a scheduler's stats: per guest its counters and `share` (of the served cost).
pub fn stats_json(device: &DeviceConfig, stats: &[(GuestConfig, GuestStats)]) -> serde_json::Value {
    let total: u64 = stats.iter().map(|(_, s)| s.cost).sum();
    let guests: Vec<_> = stats
        .iter()
        .map(|(config, s)| guest_entry(config, s, total))
        .collect();
    serde_json::json!({
        "depth": device.depth,
        "idle_depth": device.idle_depth,
        "iops_limit": device.iops.map(|r| r.per_sec),
        "bps_limit": device.bps.map(|r| r.per_sec),
        "poll_guests": device.poll_guests,
        "guests": guests,
    })
}

/// One guest's JSON entry, its share over `total` (the served cost of every guest).
fn guest_entry(config: &GuestConfig, s: &GuestStats, total: u64) -> serde_json::Value {
    let share = if total == 0 {
        0.0
    } else {
        s.cost as f64 / total as f64
    };
    let mean_delay_us = if s.dispatched == 0 {
        0.0
    } else {
        s.queue_delay_ns as f64 / s.dispatched as f64 / 1000.0
    };
    serde_json::json!({
        "name": config.name,
        "weight": config.weight,
        "iops_limit": config.iops.map(|r| r.per_sec),
        "bps_limit": config.bps.map(|r| r.per_sec),
        "dispatched": s.dispatched,
        "completed": s.completed,
        "bytes": s.bytes,
        "cost": s.cost,
        "share": share,
        "queue_delay_mean_us": mean_delay_us,
        "queue_delay_max_us": s.max_queue_delay_ns / 1000,
        "queue_delay_p99_us": s.delay_percentile_ns(99) / 1000,
        "throttled_ms": s.throttled_ns / 1_000_000,
        "notify": if s.polled { "poll" } else { "interrupt" },
        "poll_switches": s.poll_switches,
        "polled_ms": s.polled_ns / 1_000_000,
        "refused_enqueues": s.refused,
        "class_dispatched": {
            "high": s.class_dispatched[0],
            "normal": s.class_dispatched[1],
            "idle": s.class_dispatched[2],
        },
        "class_queue_delay_us": {
            "high": s.class_queue_delay_ns[0] / 1000,
            "normal": s.class_queue_delay_ns[1] / 1000,
            "idle": s.class_queue_delay_ns[2] / 1000,
        },
    })
}

fn ticker(qos: &Weak<Qos>) {
    loop {
        let Some(qos) = qos.upgrade() else {
            return;
        };
        let mut inner = qos.lock();
        let now = qos.now();
        let sleep = match inner.scheduler.next_wakeup(now) {
            Some(at) => Duration::from_nanos(at.saturating_sub(now)).min(TICKER_MAX_SLEEP),
            None => TICKER_MAX_SLEEP,
        };
        if !sleep.is_zero() {
            inner = qos
                .ticker
                .wait_timeout(inner, sleep)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        qos.dispatch_locked(&mut inner, None);
    }
}

/// One queue worker's handle on the shared scheduler; the queue leaves the scheduler (with
/// whatever it had queued or in flight) when the port is dropped.
pub struct QueuePort {
    qos: Arc<Qos>,
    queue: QueueId,
    waker: Arc<EventFd>,
    granted: Arc<AtomicUsize>,
    /// Its guest's polling choice (shared by the guest's queues).
    polled: Arc<AtomicBool>,
}

impl std::fmt::Debug for QueuePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePort")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl QueuePort {
    /// Requests this queue's guest may still hand over.
    pub fn room(&self) -> usize {
        self.qos.lock().scheduler.room(self.queue)
    }

    /// Queues requests (dispatched by the next [`QueuePort::dispatch`]).
    pub fn enqueue(&self, request: Request) -> Result<(), QueueFull> {
        let now = self.qos.now();
        self.qos.lock().scheduler.enqueue(self.queue, request, now)
    }

    /// Marks `tags` complete, runs a dispatch pass (waking other queues with grants) and
    /// returns the tags granted to this queue.
    pub fn complete_and_dispatch(&self, tags: &[u64]) -> Vec<u64> {
        let mut inner = self.qos.lock();
        for &tag in tags {
            inner.scheduler.complete(self.queue, tag);
        }
        self.qos.dispatch_locked(&mut inner, Some(self.queue));
        self.granted.store(0, Ordering::Release);
        inner.scheduler.take_grants(self.queue)
    }

    /// [`QueuePort::complete_and_dispatch`] with nothing completed.
    pub fn dispatch(&self) -> Vec<u64> {
        self.complete_and_dispatch(&[])
    }

    /// Readable when another thread granted this queue requests.
    pub fn wake_fd(&self) -> RawFd {
        self.waker.as_raw_fd()
    }

    /// Consumes a wakeup (the grants themselves come with the next dispatch).
    pub fn clear_wake(&self) {
        let _ = self.waker.read();
    }

    /// Grants are waiting to be taken (no lock, no system call: for a polling worker).
    pub fn has_grants(&self) -> bool {
        self.granted.load(Ordering::Acquire) > 0
    }

    /// Whether the scheduler has this queue's guest polled now (no lock, no system call:
    /// `QueueHandler::wants_polling` under `notify=sched`).
    pub fn polled(&self) -> bool {
        self.polled.load(Ordering::Relaxed)
    }
}

impl Drop for QueuePort {
    fn drop(&mut self) {
        let mut inner = self.qos.lock();
        inner.scheduler.remove_queue(self.queue);
        if let Some(slot) = inner.ports.get_mut(self.queue.0) {
            *slot = None;
        }
        // Its in-flight slots are free now: others may go.
        self.qos.dispatch_locked(&mut inner, None);
    }
}
