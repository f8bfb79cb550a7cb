//! The scheduler itself: no threads, no file descriptors, time passed in by the caller, so every
//! decision is reproducible in a test.
//!
//! * **Guests and queues.** A guest (one vhost-user connection's disk, or an in-process disk)
//!   has a weight, optional IOPS and bandwidth buckets and a bound on its queued requests; its
//!   virtqueues are *queues* here: each request is enqueued by, and granted back to, the queue
//!   whose ring it came from.
//! * **Fairness.** Start-time fair queuing across guests: each guest has a virtual time that
//!   grows by `cost / weight` per dispatched request (cost = [`COST_PER_REQUEST`] + bytes); the
//!   next request comes from the eligible guest with the smallest virtual time. A guest that
//!   was idle restarts at the virtual time of the last dispatch, so idleness banks no credit.
//! * **Limits.** A guest whose bucket is empty is skipped (its time counted as throttled) and
//!   the others go on; the device's buckets and its `depth` (requests in flight on the backend
//!   at once) bound everyone — except that a guest with nothing in flight and not ahead of
//!   its fair share (virtual time not past the last dispatch's) may start one request on a
//!   full device: a QD1 latency-sensitive guest does not wait for a bulk guest's request to
//!   finish, the backend holds at most `depth` + one request per guest, and a saturating
//!   guest that is ahead gets no extra slot (the shares hold). [`Scheduler::next_wakeup`]
//!   says when a bucket refills.
//! * **Priority inside a guest.** The virtio-blk header's `ioprio` class: real-time before
//!   best-effort before idle, whenever a slot on the backend frees; idle requests have at
//!   most [`DeviceConfig::idle_depth`] in flight per guest, so a guest's idle-class bulk never
//!   fills the backend ahead of its own latency-sensitive requests.
//! * **Ordering.** A FLUSH waits until every write of its guest that arrived before it has
//!   completed; a request that overlaps an earlier one of its guest where either writes waits
//!   until that one completed. Everything else may overtake: a blocked, throttled or
//!   low-priority request never holds back one that may go (up to [`SCAN_LIMIT`] requests
//!   per class are looked at past a blocked head).
//! * **Polling or interrupts per guest.** [`Scheduler::refresh_modes`] picks the guests whose
//!   queues are polled (`notify=sched`): a guest with requests queued or in flight for
//!   [`POLL_AFTER`] without a gap longer than [`IDLE_AFTER`] (sustained backlog) and not held
//!   by its own buckets, at most [`DeviceConfig::poll_guests`] of them (those already polled,
//!   then those busy longest).
//!   A guest that goes idle or is throttled goes back to interrupts: polling it would burn a
//!   host CPU for requests that cannot come or cannot go.
//! * **Bounded memory.** Each queue of a guest holds at most `queue_limit` requests here; past
//!   that [`Scheduler::enqueue`] refuses and the caller leaves the guest's further requests in its
//!   own ring, where they cost the server nothing.

use std::collections::VecDeque;

use crate::bucket::{Rate, TokenBucket};
use crate::Nanos;

/// The fixed part of a request's cost, in bytes: what a request costs the backend beyond its
/// data (a syscall, a completion, seek time on a disk).
pub const COST_PER_REQUEST: u64 = 16 << 10;
/// Requests looked at per class past a blocked head.
pub const SCAN_LIMIT: usize = 64;
/// A guest busy (requests queued or in flight) this long is polled (see the module doc).
pub const POLL_AFTER: Nanos = 2_000_000;
/// A gap without requests longer than this ends a guest's busy period.
pub const IDLE_AFTER: Nanos = 1_000_000;
/// Virtual time units per byte of cost at weight 1 (weights divide it).
const VTIME_SCALE: u128 = 1 << 20;

/// A guest's index in its scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestId(pub usize);

/// A queue's index in its scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueId(pub usize);

/// Priority class, from the I/O priority the guest put in the request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    High = 0,
    Normal = 1,
    Idle = 2,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::High, Class::Normal, Class::Idle];

    /// The Linux ioprio encoding virtio-blk carries: class in bits 13..16 (1 real-time,
    /// 2 best-effort, 3 idle; 0 none = best-effort).
    pub fn from_ioprio(ioprio: u32) -> Class {
        match (ioprio >> 13) & 0x7 {
            1 => Class::High,
            3 => Class::Idle,
            _ => Class::Normal,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a request does to the image, for the ordering rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Write, discard, write zeroes.
    Write,
    Flush,
    /// Touches no data (GET_ID): no ordering.
    None,
}

/// A request as the scheduler sees it; `tag` is the caller's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub tag: u64,
    pub class: Class,
    pub access: Access,
    /// Byte range touched (ignored for Flush and None).
    pub offset: u64,
    pub len: u64,
}

/// A guest's share and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    pub name: String,
    /// Relative share under contention, 1..=1000.
    pub weight: u32,
    pub iops: Option<Rate>,
    pub bps: Option<Rate>,
    /// Requests held here at most per queue (the rest wait in the guest's ring; per queue, so
    /// that one queue's backlog never leaves another with requests it cannot hand over and
    /// nothing of its own to wait for).
    pub queue_limit: usize,
}

impl GuestConfig {
    pub fn new(name: impl Into<String>) -> Self {
        GuestConfig {
            name: name.into(),
            weight: 1,
            iops: None,
            bps: None,
            queue_limit: 128,
        }
    }
}

/// The shared backend's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Requests in flight on the backend at once, all guests together.
    pub depth: usize,
    /// Idle-class requests in flight per guest.
    pub idle_depth: usize,
    pub iops: Option<Rate>,
    pub bps: Option<Rate>,
    /// Guests polled at once at most (queues with `notify=sched`); 0: none.
    pub poll_guests: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            depth: 4,
            idle_depth: 1,
            iops: None,
            bps: None,
            poll_guests: 1,
        }
    }
}

/// The enqueue was refused: the guest already holds `queue_limit` requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// What one guest got, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStats {
    pub dispatched: u64,
    pub completed: u64,
    pub bytes: u64,
    /// Sum of the dispatched requests' costs (the share is this over all guests' sum).
    pub cost: u64,
    /// Time from enqueue to dispatch, summed and at most.
    pub queue_delay_ns: u64,
    pub max_queue_delay_ns: u64,
    /// Time the guest had requests waiting while its own buckets were empty.
    pub throttled_ns: u64,
    /// Enqueues refused for the queue bound.
    pub refused: u64,
    /// Per class: dispatched requests and their summed queueing delay.
    pub class_dispatched: [u64; 3],
    pub class_queue_delay_ns: [u64; 3],
    /// Queueing delays by power of two: bucket `i` counts delays below `2^i` ns (and at least
    /// `2^(i-1)`); the last one everything from about a second up.
    pub delay_histogram: [u64; DELAY_BUCKETS],
    /// Whether the guest's queues are polled now ([`Scheduler::refresh_modes`]).
    pub polled: bool,
    /// Changes between polled and interrupts, and the time spent polled.
    pub poll_switches: u64,
    pub polled_ns: u64,
}

/// Buckets of [`GuestStats::delay_histogram`].
pub const DELAY_BUCKETS: usize = 32;

impl GuestStats {
    fn record_delay(&mut self, delay: Nanos) {
        let bucket = (u64::BITS - delay.leading_zeros()) as usize;
        self.delay_histogram[bucket.min(DELAY_BUCKETS - 1)] += 1;
    }

    /// The queueing delay that `percent` of the dispatched requests stayed under, as the
    /// upper edge of its histogram bucket (at most twice the true value, never above the
    /// largest delay seen); 0 with none.
    pub fn delay_percentile_ns(&self, percent: u64) -> Nanos {
        let total: u64 = self.delay_histogram.iter().sum();
        if total == 0 {
            return 0;
        }
        // The rank of the request at `percent`, rounded up, at least the first.
        let rank = (total.saturating_mul(percent.min(100)))
            .div_ceil(100)
            .max(1);
        let mut seen = 0;
        for (bucket, count) in self.delay_histogram.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return (1u64 << bucket).min(self.max_queue_delay_ns);
            }
        }
        self.max_queue_delay_ns
    }
}

#[derive(Debug, Clone)]
struct Entry {
    queue: QueueId,
    seq: u64,
    request: Request,
    arrived: Nanos,
}

impl Entry {
    /// Whether `later` must wait for this (earlier) entry to complete.
    fn orders_before(&self, later: &Request) -> bool {
        let earlier = &self.request;
        match (earlier.access, later.access) {
            (_, Access::None) | (Access::None, _) => false,
            (Access::Write, Access::Flush) => true,
            (Access::Flush, _) | (_, Access::Flush) => false,
            (Access::Read, Access::Read) => false,
            _ => overlaps(earlier, later),
        }
    }
}

fn overlaps(a: &Request, b: &Request) -> bool {
    let a_end = a.offset.saturating_add(a.len);
    let b_end = b.offset.saturating_add(b.len);
    a.offset < b_end && b.offset < a_end
}

fn cost_of(request: &Request) -> u64 {
    let data = match request.access {
        Access::Read | Access::Write => request.len,
        Access::Flush | Access::None => 0,
    };
    COST_PER_REQUEST.saturating_add(data)
}

#[derive(Debug)]
struct Guest {
    config: GuestConfig,
    vtime: u128,
    pending: [VecDeque<Entry>; 3],
    in_flight: Vec<Entry>,
    iops: Option<TokenBucket>,
    bps: Option<TokenBucket>,
    next_seq: u64,
    /// Writes queued or in flight (see [`Guest::ordered_behind`]).
    writes_outstanding: usize,
    throttled_since: Option<Nanos>,
    /// Start of the current busy period, and when the guest was last seen with requests.
    busy_since: Option<Nanos>,
    last_active: Nanos,
    /// Since when it is polled (None: interrupts).
    polled_since: Option<Nanos>,
    /// Taken out of the scheduler ([`Scheduler::remove_guest`]): its slot stays so that
    /// guest ids keep their meaning, holding nothing.
    removed: bool,
    stats: GuestStats,
}

impl Guest {
    fn queued(&self) -> usize {
        self.pending.iter().map(VecDeque::len).sum()
    }

    fn active(&self) -> bool {
        self.queued() > 0 || !self.in_flight.is_empty()
    }

    fn buckets_ready(&mut self, now: Nanos) -> bool {
        let iops = self.iops.as_mut().is_none_or(|b| b.ready(now));
        let bps = self.bps.as_mut().is_none_or(|b| b.ready(now));
        iops && bps
    }

    fn buckets_ready_at(&mut self, now: Nanos) -> Nanos {
        let iops = self.iops.as_mut().map_or(now, |b| b.ready_at(now));
        let bps = self.bps.as_mut().map_or(now, |b| b.ready_at(now));
        iops.max(bps)
    }

    fn in_flight_of(&self, class: Class) -> usize {
        self.in_flight
            .iter()
            .filter(|e| e.request.class == class)
            .count()
    }

    /// Whether an earlier request still queued or in flight keeps `entry` waiting.
    fn ordered_behind(&self, entry: &Entry) -> bool {
        // Only writes hold back anything but a write: a read or flush of a guest with no write
        // outstanding needs no scan.
        if entry.request.access != Access::Write && self.writes_outstanding == 0 {
            return false;
        }
        let earlier = |e: &&Entry| e.seq < entry.seq;
        self.in_flight
            .iter()
            .chain(self.pending.iter().flatten())
            .filter(earlier)
            .any(|e| e.orders_before(&entry.request))
    }

    /// The first request that may go now: highest class first, FIFO inside a class, past
    /// requests that wait for ordering.
    fn candidate(&self, idle_depth: usize) -> Option<(Class, usize)> {
        for class in Class::ALL {
            if class == Class::Idle && self.in_flight_of(Class::Idle) >= idle_depth {
                continue;
            }
            let queue = &self.pending[class.index()];
            let found = queue
                .iter()
                .take(SCAN_LIMIT)
                .position(|entry| !self.ordered_behind(entry));
            if let Some(index) = found {
                return Some((class, index));
            }
        }
        None
    }

    fn set_polled(&mut self, polled: bool, now: Nanos) {
        match (self.polled_since, polled) {
            (None, true) => {
                self.polled_since = Some(now);
                self.stats.poll_switches += 1;
            }
            (Some(since), false) => {
                self.polled_since = None;
                self.stats.poll_switches += 1;
                self.stats.polled_ns = self
                    .stats
                    .polled_ns
                    .saturating_add(now.saturating_sub(since));
            }
            _ => {}
        }
    }

    fn stop_throttle(&mut self, now: Nanos) {
        if let Some(since) = self.throttled_since.take() {
            self.stats.throttled_ns = self
                .stats
                .throttled_ns
                .saturating_add(now.saturating_sub(since));
        }
    }
}

#[derive(Debug)]
struct Queue {
    guest: GuestId,
    live: bool,
    /// Requests of this queue waiting here (not yet dispatched).
    pending: usize,
    grants: Vec<u64>,
}

/// The scheduler (see the module doc).
#[derive(Debug)]
pub struct Scheduler {
    device: DeviceConfig,
    iops: Option<TokenBucket>,
    bps: Option<TokenBucket>,
    guests: Vec<Guest>,
    queues: Vec<Queue>,
    in_flight: usize,
    /// Virtual time of the last dispatch.
    vclock: u128,
}

impl Scheduler {
    pub fn new(device: DeviceConfig, now: Nanos) -> Self {
        let device = DeviceConfig {
            depth: device.depth.max(1),
            idle_depth: device.idle_depth.max(1),
            ..device
        };
        Scheduler {
            iops: device.iops.map(|r| TokenBucket::new(r, now)),
            bps: device.bps.map(|r| TokenBucket::new(r, now)),
            device,
            guests: Vec::new(),
            queues: Vec::new(),
            in_flight: 0,
            vclock: 0,
        }
    }

    pub fn device(&self) -> &DeviceConfig {
        &self.device
    }

    pub fn add_guest(&mut self, config: GuestConfig, now: Nanos) -> GuestId {
        let config = GuestConfig {
            weight: config.weight.clamp(1, 1000),
            queue_limit: config.queue_limit.max(1),
            ..config
        };
        self.guests.push(Guest {
            iops: config.iops.map(|r| TokenBucket::new(r, now)),
            bps: config.bps.map(|r| TokenBucket::new(r, now)),
            config,
            vtime: self.vclock,
            pending: Default::default(),
            in_flight: Vec::new(),
            next_seq: 0,
            writes_outstanding: 0,
            throttled_since: None,
            busy_since: None,
            last_active: now,
            polled_since: None,
            removed: false,
            stats: GuestStats::default(),
        });
        GuestId(self.guests.len() - 1)
    }

    pub fn guest_config(&self, guest: GuestId) -> Option<&GuestConfig> {
        self.guests
            .get(guest.0)
            .filter(|g| !g.removed)
            .map(|g| &g.config)
    }

    /// Takes `guest` out (its disk was unplugged): its queues stop taking requests, what it
    /// had queued or in flight is forgotten, and its stats leave [`Scheduler::stats`] and
    /// everyone's shares. False if there was no such guest.
    pub fn remove_guest(&mut self, guest: GuestId) -> bool {
        if self.guests.get(guest.0).is_none_or(|g| g.removed) {
            return false;
        }
        let queues: Vec<QueueId> = (0..self.queues.len())
            .map(QueueId)
            .filter(|q| self.queues[q.0].guest == guest)
            .collect();
        for queue in queues {
            self.remove_queue(queue);
        }
        let g = &mut self.guests[guest.0];
        self.in_flight -= g.in_flight.len();
        *g = Guest {
            removed: true,
            config: g.config.clone(),
            vtime: 0,
            pending: Default::default(),
            in_flight: Vec::new(),
            iops: None,
            bps: None,
            next_seq: 0,
            writes_outstanding: 0,
            throttled_since: None,
            busy_since: None,
            last_active: 0,
            polled_since: None,
            stats: GuestStats::default(),
        };
        true
    }

    /// Changes a guest's weight and buckets (live reconfiguration); buckets start full.
    pub fn reconfigure(&mut self, guest: GuestId, config: GuestConfig, now: Nanos) -> bool {
        let Some(g) = self.guests.get_mut(guest.0).filter(|g| !g.removed) else {
            return false;
        };
        g.iops = config.iops.map(|r| TokenBucket::new(r, now));
        g.bps = config.bps.map(|r| TokenBucket::new(r, now));
        g.config = GuestConfig {
            weight: config.weight.clamp(1, 1000),
            queue_limit: config.queue_limit.max(1),
            ..config
        };
        true
    }

    /// Changes the device's depth and buckets (live reconfiguration); its buckets start full.
    /// Requests already in flight stay; a smaller depth holds new ones back until enough
    /// completed.
    pub fn reconfigure_device(&mut self, device: DeviceConfig, now: Nanos) {
        let device = DeviceConfig {
            depth: device.depth.max(1),
            idle_depth: device.idle_depth.max(1),
            ..device
        };
        self.iops = device.iops.map(|r| TokenBucket::new(r, now));
        self.bps = device.bps.map(|r| TokenBucket::new(r, now));
        self.device = device;
    }

    /// A new queue (a virtqueue's worker) of `guest`.
    pub fn add_queue(&mut self, guest: GuestId) -> QueueId {
        self.queues.push(Queue {
            guest,
            live: true,
            pending: 0,
            grants: Vec::new(),
        });
        QueueId(self.queues.len() - 1)
    }

    /// The queue went away with its requests: forget what it had queued, granted or in flight.
    pub fn remove_queue(&mut self, queue: QueueId) {
        let Some(q) = self.queues.get_mut(queue.0) else {
            return;
        };
        q.live = false;
        q.pending = 0;
        q.grants.clear();
        let guest = &mut self.guests[q.guest.0];
        for class in &mut guest.pending {
            class.retain(|e| e.queue != queue);
        }
        let before = guest.in_flight.len();
        guest.in_flight.retain(|e| e.queue != queue);
        self.in_flight -= before - guest.in_flight.len();
        guest.writes_outstanding = guest
            .in_flight
            .iter()
            .chain(guest.pending.iter().flatten())
            .filter(|e| e.request.access == Access::Write)
            .count();
    }

    /// Requests the queue may still hand over.
    pub fn room(&self, queue: QueueId) -> usize {
        let Some(q) = self.queues.get(queue.0).filter(|q| q.live) else {
            return 0;
        };
        let guest = &self.guests[q.guest.0];
        guest.config.queue_limit.saturating_sub(q.pending)
    }

    /// Queues `request` from `queue` (see [`Scheduler::dispatch`] for when it goes).
    pub fn enqueue(
        &mut self,
        queue: QueueId,
        request: Request,
        now: Nanos,
    ) -> Result<(), QueueFull> {
        let Some(q) = self.queues.get_mut(queue.0).filter(|q| q.live) else {
            return Err(QueueFull);
        };
        let vclock = self.vclock;
        let guest = &mut self.guests[q.guest.0];
        if q.pending >= guest.config.queue_limit {
            guest.stats.refused += 1;
            return Err(QueueFull);
        }
        q.pending += 1;
        if !guest.active() {
            guest.vtime = guest.vtime.max(vclock);
            if now.saturating_sub(guest.last_active) > IDLE_AFTER {
                guest.busy_since = None;
            }
        }
        guest.busy_since.get_or_insert(now);
        guest.last_active = now;
        let seq = guest.next_seq;
        guest.next_seq += 1;
        if request.access == Access::Write {
            guest.writes_outstanding += 1;
        }
        guest.pending[request.class.index()].push_back(Entry {
            queue,
            seq,
            request,
            arrived: now,
        });
        Ok(())
    }

    /// Dispatches every request that may go at `now`; their tags are added to their queues'
    /// grants ([`Scheduler::take_grants`]). Returns the queues that got new grants.
    pub fn dispatch(&mut self, now: Nanos) -> Vec<QueueId> {
        let mut granted = Vec::new();
        while self.device_ready(now) {
            let device_full = self.in_flight >= self.device.depth;
            let Some((guest, class, index)) = self.pick(now, device_full) else {
                break;
            };
            let queue = self.start(guest, class, index, now);
            if !granted.contains(&queue) {
                granted.push(queue);
            }
        }
        granted
    }

    fn device_ready(&mut self, now: Nanos) -> bool {
        let iops = self.iops.as_mut().is_none_or(|b| b.ready(now));
        let bps = self.bps.as_mut().is_none_or(|b| b.ready(now));
        iops && bps
    }

    /// The eligible guest with the smallest virtual time, and its request to start. With the
    /// device full only guests with nothing in flight that are not ahead are eligible.
    fn pick(&mut self, now: Nanos, device_full: bool) -> Option<(usize, Class, usize)> {
        let idle_depth = self.device.idle_depth;
        let vclock = self.vclock;
        let mut best: Option<(u128, usize, Class, usize)> = None;
        for (index, guest) in self.guests.iter_mut().enumerate() {
            let floor = guest.in_flight.is_empty() && guest.vtime <= vclock;
            if guest.queued() == 0 || (device_full && !floor) {
                continue;
            }
            if !guest.buckets_ready(now) {
                guest.throttled_since.get_or_insert(now);
                continue;
            }
            guest.stop_throttle(now);
            if best.is_some_and(|(vtime, ..)| vtime <= guest.vtime) {
                continue;
            }
            if let Some((class, at)) = guest.candidate(idle_depth) {
                best = Some((guest.vtime, index, class, at));
            }
        }
        best.map(|(_, guest, class, at)| (guest, class, at))
    }

    fn start(&mut self, guest: usize, class: Class, index: usize, now: Nanos) -> QueueId {
        let g = &mut self.guests[guest];
        let entry = g.pending[class.index()]
            .remove(index)
            .expect("pick returned a queued index");
        let request = entry.request;
        let cost = cost_of(&request);
        let data = cost - COST_PER_REQUEST;
        for bucket in [&mut g.iops, &mut self.iops].into_iter().flatten() {
            bucket.charge(1);
        }
        for bucket in [&mut g.bps, &mut self.bps].into_iter().flatten() {
            bucket.charge(data);
        }
        self.vclock = self.vclock.max(g.vtime);
        g.vtime += u128::from(cost) * VTIME_SCALE / u128::from(g.config.weight);
        let delay = now.saturating_sub(entry.arrived);
        let stats = &mut g.stats;
        // Sums saturate: they are metrics, and a clock may be anything in the fuzzer.
        stats.dispatched += 1;
        stats.bytes = stats.bytes.saturating_add(data);
        stats.cost = stats.cost.saturating_add(cost);
        stats.queue_delay_ns = stats.queue_delay_ns.saturating_add(delay);
        stats.max_queue_delay_ns = stats.max_queue_delay_ns.max(delay);
        stats.record_delay(delay);
        stats.class_dispatched[class.index()] += 1;
        let class_delay = &mut stats.class_queue_delay_ns[class.index()];
        *class_delay = class_delay.saturating_add(delay);
        let queue = entry.queue;
        self.queues[queue.0].pending -= 1;
        g.in_flight.push(entry);
        self.in_flight += 1;
        self.queues[queue.0].grants.push(request.tag);
        queue
    }

    /// The queue's granted tags, oldest first: the caller submits them now.
    pub fn take_grants(&mut self, queue: QueueId) -> Vec<u64> {
        self.queues
            .get_mut(queue.0)
            .map(|q| std::mem::take(&mut q.grants))
            .unwrap_or_default()
    }

    /// The request `tag` of `queue` finished on the backend. False if no such request was in
    /// flight (a tag the caller never got granted).
    pub fn complete(&mut self, queue: QueueId, tag: u64) -> bool {
        let Some(q) = self.queues.get(queue.0) else {
            return false;
        };
        let guest = &mut self.guests[q.guest.0];
        let Some(at) = guest
            .in_flight
            .iter()
            .position(|e| e.queue == queue && e.request.tag == tag)
        else {
            return false;
        };
        let done = guest.in_flight.swap_remove(at);
        if done.request.access == Access::Write {
            guest.writes_outstanding -= 1;
        }
        guest.stats.completed += 1;
        self.in_flight -= 1;
        true
    }

    /// Chooses which guests are polled at `now` (see the module doc) and returns, per guest,
    /// whether it is.
    pub fn refresh_modes(&mut self, now: Nanos) -> Vec<bool> {
        // (not polled now, busy since, index): a guest already polled keeps its place while
        // it stays busy, so two busy guests do not take turns (each switch costs a poll loop
        // entry or a missed kick's worth of latency).
        let mut candidates: Vec<(bool, Nanos, usize)> = Vec::new();
        for (index, guest) in self.guests.iter_mut().enumerate() {
            if guest.active() {
                guest.last_active = now;
                guest.busy_since.get_or_insert(now);
            } else if now.saturating_sub(guest.last_active) > IDLE_AFTER {
                guest.busy_since = None;
            }
            let sustained = guest
                .busy_since
                .is_some_and(|since| now.saturating_sub(since) >= POLL_AFTER);
            if sustained && guest.throttled_since.is_none() {
                let since = guest.busy_since.unwrap_or(now);
                candidates.push((guest.polled_since.is_none(), since, index));
            }
        }
        // Polled ones first, then busy longest; ties by index, so the choice is stable.
        candidates.sort_unstable();
        candidates.truncate(self.device.poll_guests);
        self.guests
            .iter_mut()
            .enumerate()
            .map(|(index, guest)| {
                let polled = candidates.iter().any(|&(_, _, i)| i == index);
                guest.set_polled(polled, now);
                polled
            })
            .collect()
    }

    /// When a bucket that holds back a waiting request refills (None: nothing waits on time).
    pub fn next_wakeup(&mut self, now: Nanos) -> Option<Nanos> {
        let waiting = self.guests.iter().any(|g| g.queued() > 0);
        if !waiting {
            return None;
        }
        let device_at = {
            let iops = self.iops.as_mut().map_or(now, |b| b.ready_at(now));
            let bps = self.bps.as_mut().map_or(now, |b| b.ready_at(now));
            iops.max(bps)
        };
        let guest_at = self
            .guests
            .iter_mut()
            .filter(|g| g.queued() > 0)
            .map(|g| g.buckets_ready_at(now))
            .filter(|&at| at > now)
            .min();
        match (device_at > now, guest_at) {
            (true, _) => Some(device_at),
            (false, at) => at,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Requests the guest has queued here.
    pub fn queued(&self, guest: GuestId) -> usize {
        self.guests.get(guest.0).map_or(0, Guest::queued)
    }

    /// Per-guest configuration and stats, in the order the guests were added, removed ones
    /// left out; throttled and polled time count up to `now`.
    pub fn stats(&self, now: Nanos) -> Vec<(GuestConfig, GuestStats)> {
        self.guests
            .iter()
            .filter(|g| !g.removed)
            .map(|g| g.stats_at(now))
            .collect()
    }

    /// One guest's configuration and stats (None once removed).
    pub fn guest_stats(&self, guest: GuestId, now: Nanos) -> Option<(GuestConfig, GuestStats)> {
        self.guests
            .get(guest.0)
            .filter(|g| !g.removed)
            .map(|g| g.stats_at(now))
    }
}

impl Guest {
    fn stats_at(&self, now: Nanos) -> (GuestConfig, GuestStats) {
        let mut stats = self.stats.clone();
        if let Some(since) = self.throttled_since {
            stats.throttled_ns = stats.throttled_ns.saturating_add(now.saturating_sub(since));
        }
        stats.polled = self.polled_since.is_some();
        if let Some(since) = self.polled_since {
            stats.polled_ns = stats.polled_ns.saturating_add(now.saturating_sub(since));
        }
        (self.config.clone(), stats)
    }
}
