//! The scheduler on a simulated backend: time is a number, every run is the same.

use crate::scheduler::*;
use crate::{Nanos, Rate};

const US: Nanos = 1_000;
const MS: Nanos = 1_000_000;
const SEC: Nanos = 1_000_000_000;

fn read(tag: u64, offset: u64, len: u64) -> Request {
    Request {
        tag,
        class: Class::Normal,
        access: Access::Read,
        offset,
        len,
    }
}

fn write(tag: u64, offset: u64, len: u64) -> Request {
    Request {
        access: Access::Write,
        ..read(tag, offset, len)
    }
}

fn flush(tag: u64) -> Request {
    Request {
        access: Access::Flush,
        ..read(tag, 0, 0)
    }
}

fn guest(name: &str, weight: u32) -> GuestConfig {
    GuestConfig {
        weight,
        ..GuestConfig::new(name)
    }
}

/// A backend that serves one request per `service` nanoseconds, `depth` at a time, with
/// every queue kept full of `make(tag)` requests. Returns requests dispatched per queue.
struct Sim {
    scheduler: Scheduler,
    queues: Vec<QueueId>,
    now: Nanos,
    next_tag: u64,
    /// (finish time, queue, tag)
    running: Vec<(Nanos, QueueId, u64)>,
    done: Vec<u64>,
}

impl Sim {
    fn new(device: DeviceConfig, guests: Vec<GuestConfig>) -> Sim {
        let mut scheduler = Scheduler::new(device, 0);
        let queues = guests
            .into_iter()
            .map(|g| {
                let id = scheduler.add_guest(g, 0);
                scheduler.add_queue(id)
            })
            .collect::<Vec<_>>();
        let done = vec![0; queues.len()];
        Sim {
            scheduler,
            queues,
            now: 0,
            next_tag: 0,
            running: Vec::new(),
            done,
        }
    }

    fn fill(&mut self, which: usize, make: &dyn Fn(u64) -> Request) {
        let queue = self.queues[which];
        while self.scheduler.room(queue) > 0 {
            let tag = self.next_tag;
            self.next_tag += 1;
            self.scheduler.enqueue(queue, make(tag), self.now).unwrap();
        }
    }

    /// Runs until `end`: each step dispatches, then advances to the next completion or
    /// bucket refill.
    fn run(&mut self, end: Nanos, service: Nanos, refill: &mut dyn FnMut(&mut Sim)) {
        while self.now < end {
            refill(self);
            for queue in self.scheduler.dispatch(self.now) {
                for tag in self.scheduler.take_grants(queue) {
                    self.running.push((self.now + service, queue, tag));
                }
            }
            let next_done = self.running.iter().map(|r| r.0).min();
            let next_tick = self.scheduler.next_wakeup(self.now);
            let Some(next) = [next_done, next_tick].into_iter().flatten().min() else {
                break;
            };
            self.now = next.max(self.now + 1);
            let now = self.now;
            let (finished, running): (Vec<_>, Vec<_>) =
                self.running.drain(..).partition(|r| r.0 <= now);
            self.running = running;
            for (_, queue, tag) in finished {
                assert!(self.scheduler.complete(queue, tag));
                let which = self.queues.iter().position(|&q| q == queue).unwrap();
                self.done[which] += 1;
            }
        }
    }
}

#[test]
fn weights_three_to_one_share_a_saturated_device_three_to_one() {
    let mut sim = Sim::new(
        DeviceConfig {
            depth: 4,
            ..DeviceConfig::default()
        },
        vec![guest("a", 3), guest("b", 1)],
    );
    sim.run(10 * SEC, 100 * US, &mut |sim| {
        sim.fill(0, &|t| write(t, t * 131072, 131072));
        sim.fill(1, &|t| write(t, t * 131072, 131072));
    });
    let (a, b) = (sim.done[0] as f64, sim.done[1] as f64);
    let ratio = a / b;
    assert!((2.9..=3.1).contains(&ratio), "a {a} b {b} ratio {ratio}");
    let stats = sim.scheduler.stats(sim.now);
    let share = stats[0].1.cost as f64 / (stats[0].1.cost + stats[1].1.cost) as f64;
    assert!((0.74..=0.76).contains(&share), "share {share}");
}

#[test]
fn fairness_is_by_cost_so_small_requests_get_more_of_them() {
    // Equal weights: a 4K reader and a 128K writer get equal cost, so the reader gets
    // (16K + 128K) / (16K + 4K) = 7.2 requests per writer request.
    let mut sim = Sim::new(DeviceConfig::default(), vec![guest("r", 1), guest("w", 1)]);
    sim.run(2 * SEC, 100 * US, &mut |sim| {
        sim.fill(0, &|t| read(t, t * 4096, 4096));
        sim.fill(1, &|t| write(t, t * 131072, 131072));
    });
    let ratio = sim.done[0] as f64 / sim.done[1] as f64;
    assert!((7.0..=7.4).contains(&ratio), "ratio {ratio}");
}

#[test]
fn an_iops_bucket_holds_a_guest_at_its_limit_and_the_other_takes_the_rest() {
    let limited = GuestConfig {
        iops: Some(Rate {
            per_sec: 500,
            burst: 10,
        }),
        ..guest("limited", 1)
    };
    let mut sim = Sim::new(DeviceConfig::default(), vec![limited, guest("free", 1)]);
    sim.run(10 * SEC, 100 * US, &mut |sim| {
        sim.fill(0, &|t| read(t, 0, 4096));
        sim.fill(1, &|t| read(t, 0, 4096));
    });
    // 500/s over 10 s plus the burst.
    let limited = sim.done[0];
    assert!((5000..=5011).contains(&limited), "limited {limited}");
    // depth 4 at 100 µs = 40000/s in all: the free guest gets everything else.
    assert!(sim.done[1] > 390_000 - 5011, "free {}", sim.done[1]);
    let stats = sim.scheduler.stats(sim.now);
    assert!(stats[0].1.throttled_ns > 9 * SEC, "{:?}", stats[0].1);
    assert_eq!(stats[1].1.throttled_ns, 0);
}

#[test]
fn a_bandwidth_bucket_holds_a_guest_at_its_bytes_per_second() {
    let limited = GuestConfig {
        bps: Some(Rate {
            per_sec: 10 << 20,
            burst: 1 << 20,
        }),
        ..guest("bulk", 1)
    };
    let mut sim = Sim::new(DeviceConfig::default(), vec![limited]);
    sim.run(10 * SEC, 50 * US, &mut |sim| {
        sim.fill(0, &|t| write(t, t * 131072, 131072));
    });
    let bytes = sim.done[0] * 131072;
    let expected = 100u64 << 20; // 10 MiB/s × 10 s
    let error = (bytes as f64 - expected as f64).abs() / expected as f64;
    assert!(error < 0.02, "{bytes} bytes, expected {expected}");
}

#[test]
fn a_device_bucket_limits_every_guest_together() {
    let device = DeviceConfig {
        iops: Some(Rate {
            per_sec: 1000,
            burst: 1,
        }),
        ..DeviceConfig::default()
    };
    let mut sim = Sim::new(device, vec![guest("a", 1), guest("b", 1)]);
    sim.run(5 * SEC, 10 * US, &mut |sim| {
        sim.fill(0, &|t| read(t, 0, 512));
        sim.fill(1, &|t| read(t, 0, 512));
    });
    let total = sim.done[0] + sim.done[1];
    assert!((4999..=5002).contains(&total), "total {total}");
    assert!(sim.done[0].abs_diff(sim.done[1]) <= 1, "{:?}", sim.done);
}

/// `serve net`: a tap write completes at once, so the backend's depth never fills and the
/// device's frame bucket (`--qos-device pps=`) is the saturation point. Equal frames, weights
/// 3:1: the granted frames split 3:1 to within one frame, and together they are the bucket's.
#[test]
fn a_device_frame_bucket_is_the_saturation_point_and_weights_split_it() {
    let device = DeviceConfig {
        iops: Some(Rate {
            per_sec: 600,
            burst: 60,
        }),
        ..DeviceConfig::default()
    };
    let mut sim = Sim::new(device, vec![guest("w3", 3), guest("w1", 1)]);
    sim.run(10 * SEC, 1, &mut |sim| {
        sim.fill(0, &|t| read(t, 0, 64));
        sim.fill(1, &|t| read(t, 0, 64));
    });
    let (w3, w1) = (sim.done[0], sim.done[1]);
    assert!((6058..=6062).contains(&(w3 + w1)), "{w3} + {w1}");
    assert!(w3.abs_diff(3 * w1) <= 3, "{w3} : {w1}");
    let stats = sim.scheduler.stats(sim.now);
    assert_eq!((stats[0].1.throttled_ns, stats[1].1.throttled_ns), (0, 0));
}

/// `vm.qos` id `device`: a new device bucket applies from the next dispatch (restarting
/// full), a larger depth lets more requests start, and requests already in flight stay.
#[test]
fn a_device_reconfigured_live_gets_its_new_bucket_and_depth() {
    let device = DeviceConfig {
        depth: 2,
        iops: Some(Rate {
            per_sec: 1,
            burst: 1,
        }),
        ..DeviceConfig::default()
    };
    let mut s = Scheduler::new(device.clone(), 0);
    let g = s.add_guest(guest("g", 1), 0);
    let q = s.add_queue(g);
    for tag in 0..8 {
        s.enqueue(q, read(tag, tag * 4096, 4096), 0).unwrap();
    }
    s.dispatch(0);
    assert_eq!(s.take_grants(q), vec![0], "the bucket's one request");
    s.reconfigure_device(
        DeviceConfig {
            iops: Some(Rate {
                per_sec: 1,
                burst: 5,
            }),
            ..device.clone()
        },
        MS,
    );
    s.dispatch(MS);
    assert_eq!(s.take_grants(q), vec![1], "depth 2: one more in flight");
    s.reconfigure_device(
        DeviceConfig {
            depth: 8,
            iops: None,
            ..device
        },
        2 * MS,
    );
    s.dispatch(2 * MS);
    assert_eq!(s.take_grants(q), (2..8).collect::<Vec<_>>());
    assert_eq!(s.in_flight(), 8);
    assert_eq!(s.device().depth, 8);
}

#[test]
fn a_flush_waits_for_the_writes_before_it_but_not_for_later_ones() {
    let mut s = Scheduler::new(DeviceConfig::default(), 0);
    let g = s.add_guest(guest("g", 1), 0);
    let q = s.add_queue(g);
    s.enqueue(q, write(1, 0, 4096), 0).unwrap();
    s.enqueue(q, write(2, 8192, 4096), 0).unwrap();
    s.enqueue(q, flush(3), 0).unwrap();
    s.enqueue(q, write(4, 65536, 4096), 0).unwrap();
    s.dispatch(0);
    // The later write overtakes the flush; the flush waits for 1 and 2.
    assert_eq!(s.take_grants(q), vec![1, 2, 4]);
    assert!(s.complete(q, 1));
    s.dispatch(1);
    assert_eq!(s.take_grants(q), Vec::<u64>::new());
    assert!(s.complete(q, 2));
    s.dispatch(2);
    assert_eq!(s.take_grants(q), vec![3]);
}

#[test]
fn overlapping_writes_stay_in_order_and_reads_go_around_them() {
    let mut s = Scheduler::new(DeviceConfig::default(), 0);
    let g = s.add_guest(guest("g", 1), 0);
    let q = s.add_queue(g);
    s.enqueue(q, write(1, 0, 8192), 0).unwrap();
    s.enqueue(q, write(2, 4096, 4096), 0).unwrap(); // overlaps 1
    s.enqueue(q, read(3, 4096, 512), 0).unwrap(); // reads what 1 and 2 write
    s.enqueue(q, read(4, 1 << 20, 4096), 0).unwrap(); // elsewhere
    s.dispatch(0);
    assert_eq!(s.take_grants(q), vec![1, 4]);
    s.complete(q, 1);
    s.dispatch(1);
    assert_eq!(s.take_grants(q), vec![2]);
    s.complete(q, 2);
    s.dispatch(2);
    assert_eq!(s.take_grants(q), vec![3]);
}

#[test]
fn a_write_after_an_overlapping_read_waits_for_the_read() {
    let mut s = Scheduler::new(DeviceConfig::default(), 0);
    let g = s.add_guest(guest("g", 1), 0);
    let q = s.add_queue(g);
    s.enqueue(q, read(1, 0, 4096), 0).unwrap();
    s.enqueue(q, write(2, 0, 4096), 0).unwrap();
    s.enqueue(q, read(3, 0, 4096), 0).unwrap();
    s.dispatch(0);
    assert_eq!(s.take_grants(q), vec![1]);
    s.complete(q, 1);
    s.dispatch(1);
    assert_eq!(s.take_grants(q), vec![2]);
}

#[test]
fn high_priority_takes_the_next_free_slot_before_earlier_normal_requests() {
    let device = DeviceConfig {
        depth: 2,
        ..DeviceConfig::default()
    };
    let mut s = Scheduler::new(device, 0);
    let g = s.add_guest(guest("g", 1), 0);
    let q = s.add_queue(g);
    for tag in 0..4 {
        s.enqueue(q, write(tag, tag * 4096, 4096), 0).unwrap();
    }
    s.dispatch(0);
    assert_eq!(s.take_grants(q), vec![0, 1]);
    let high = Request {
        class: Class::High,
        ..read(10, 1 << 30, 4096)
    };
    s.enqueue(q, high, 1).unwrap();
    s.dispatch(1);
    assert_eq!(s.take_grants(q), Vec::<u64>::new(), "the device is full");
    assert_eq!(s.next_wakeup(1), None, "a completion comes first");
    s.complete(q, 0);
    s.dispatch(2);
    assert_eq!(s.take_grants(q), vec![10]);
    s.complete(q, 10);
    s.dispatch(3);
    assert_eq!(s.take_grants(q), vec![2]);
    let stats = s.stats(3);
    assert_eq!(stats[0].1.class_dispatched, [1, 3, 0]);
}

#[test]
fn idle_requests_get_one_slot_per_guest() {
    let mut s = Scheduler::new(DeviceConfig::default(), 0);
    let g = s.add_guest(guest("g", 1), 0);
    let q = s.add_queue(g);
    for tag in 0..3 {
        let idle = Request {
            class: Class::Idle,
            ..read(tag, 0, 4096)
        };
        s.enqueue(q, idle, 0).unwrap();
    }
    s.dispatch(0);
    assert_eq!(s.take_grants(q), vec![0]);
    s.complete(q, 0);
    s.dispatch(1);
    assert_eq!(s.take_grants(q), vec![1]);
}

#[test]
fn ioprio_classes_come_from_bits_13_to_15() {
    assert_eq!(Class::from_ioprio(0), Class::Normal);
    assert_eq!(Class::from_ioprio(1 << 13), Class::High);
    assert_eq!(Class::from_ioprio((2 << 13) | 4), Class::Normal);
    assert_eq!(Class::from_ioprio(3 << 13), Class::Idle);
    assert_eq!(Class::from_ioprio(u32::MAX), Class::Normal);
}

#[test]
fn a_throttled_guest_holds_back_nobody() {
    let slow = GuestConfig {
        iops: Some(Rate {
            per_sec: 1,
            burst: 1,
        }),
        ..guest("slow", 1)
    };
    let mut s = Scheduler::new(DeviceConfig::default(), 0);
    let a = s.add_guest(slow, 0);
    let b = s.add_guest(guest("b", 1), 0);
    let (qa, qb) = (s.add_queue(a), s.add_queue(b));
    for tag in 0..3 {
        s.enqueue(qa, read(tag, 0, 4096), 0).unwrap();
    }
    s.enqueue(qb, read(100, 0, 4096), 0).unwrap();
    s.dispatch(0);
    assert_eq!(s.take_grants(qa), vec![0]);
    assert_eq!(s.take_grants(qb), vec![100]);
    assert_eq!(s.next_wakeup(0), Some(SEC));
    s.enqueue(qb, read(101, 0, 4096), MS).unwrap();
    s.dispatch(MS);
    assert_eq!(s.take_grants(qb), vec![101]);
    assert_eq!(s.take_grants(qa), Vec::<u64>::new());
    s.dispatch(SEC);
    assert_eq!(s.take_grants(qa), vec![1]);
}

#[test]
fn a_flooding_guest_is_bounded_and_the_other_still_gets_its_share() {
    let hostile = GuestConfig {
        queue_limit: 32,
        ..guest("hostile", 1)
    };
    let mut s = Scheduler::new(DeviceConfig::default(), 0);
    let h = s.add_guest(hostile, 0);
    let n = s.add_guest(guest("nice", 1), 0);
    let (qh, qn) = (s.add_queue(h), s.add_queue(n));
    let mut refused = 0;
    for tag in 0..100_000 {
        if s.enqueue(qh, write(tag, 0, 1 << 20), 0).is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 100_000 - 32);
    assert_eq!(s.queued(h), 32);
    assert_eq!(s.room(qh), 0);
    // Same-range writes serialize: one in flight; the nice guest's read goes at once.
    s.enqueue(qn, read(7, 0, 4096), 0).unwrap();
    s.dispatch(0);
    assert_eq!(s.take_grants(qh), vec![0]);
    assert_eq!(s.take_grants(qn), vec![7]);
    let stats = s.stats(0);
    assert_eq!(stats[0].1.refused, 100_000 - 32);
}

#[test]
fn an_idle_guest_banks_no_credit() {
    let mut sim = Sim::new(DeviceConfig::default(), vec![guest("a", 1), guest("b", 1)]);
    // a runs alone for a second, then b joins: from then on they alternate evenly.
    sim.run(SEC, 100 * US, &mut |sim| {
        sim.fill(0, &|t| read(t, 0, 4096));
    });
    let a_alone = sim.done[0];
    sim.run(2 * SEC, 100 * US, &mut |sim| {
        sim.fill(0, &|t| read(t, 0, 4096));
        sim.fill(1, &|t| read(t, 0, 4096));
    });
    let a_shared = sim.done[0] - a_alone;
    let b_shared = sim.done[1];
    assert!(
        a_shared.abs_diff(b_shared) <= 8,
        "a {a_shared} b {b_shared}"
    );
}

#[test]
fn a_removed_queue_frees_its_slots_and_unknown_tags_are_refused() {
    let mut s = Scheduler::new(
        DeviceConfig {
            depth: 1,
            ..DeviceConfig::default()
        },
        0,
    );
    let a = s.add_guest(guest("a", 1), 0);
    let b = s.add_guest(guest("b", 1), 0);
    let (qa, qb) = (s.add_queue(a), s.add_queue(b));
    s.enqueue(qa, read(1, 0, 4096), 0).unwrap();
    s.enqueue(qa, read(2, 0, 4096), 0).unwrap();
    s.dispatch(0);
    assert_eq!(s.take_grants(qa), vec![1]);
    assert!(!s.complete(qa, 2), "not granted yet");
    s.enqueue(qb, read(3, 0, 4096), 0).unwrap();
    s.enqueue(qb, read(4, 0, 4096), 0).unwrap();
    s.dispatch(1);
    // The device is full, but b had nothing in flight: one request of its own may start.
    assert_eq!(s.take_grants(qb), vec![3]);
    s.remove_queue(qa);
    assert_eq!(s.in_flight(), 1);
    assert!(s.enqueue(qa, read(5, 0, 4096), 0).is_err());
    s.complete(qb, 3);
    s.dispatch(2);
    assert_eq!(s.take_grants(qb), vec![4]);
    assert!(!s.complete(qa, 1));
}

#[test]
fn a_qd1_reader_never_waits_for_a_bulk_writers_slot() {
    // The writer keeps the device full; the reader has one request at a time.
    let mut sim = Sim::new(DeviceConfig::default(), vec![guest("r", 1), guest("w", 1)]);
    sim.run(SEC, 500 * US, &mut |sim| {
        if sim.scheduler.queued(GuestId(0)) == 0 && sim.running.iter().all(|r| r.1 != sim.queues[0])
        {
            let tag = sim.next_tag;
            sim.next_tag += 1;
            let queue = sim.queues[0];
            sim.scheduler
                .enqueue(queue, read(tag, tag * 4096, 4096), sim.now)
                .unwrap();
        }
        sim.fill(1, &|t| write(t, t * 131072, 131072));
    });
    let stats = sim.scheduler.stats(sim.now);
    let (reader, writer) = (&stats[0].1, &stats[1].1);
    assert!(reader.dispatched > 1900, "{reader:?}");
    assert_eq!(reader.max_queue_delay_ns, 0, "{reader:?}");
    // The writer kept at least depth - 1 slots busy.
    assert!(writer.dispatched >= 3 * 1990, "{writer:?}");
}

#[test]
fn a_guest_reconfigured_live_gets_its_new_limit() {
    let mut s = Scheduler::new(DeviceConfig::default(), 0);
    let g = s.add_guest(guest("g", 1), 0);
    let q = s.add_queue(g);
    let limited = GuestConfig {
        iops: Some(Rate {
            per_sec: 10,
            burst: 1,
        }),
        ..guest("g", 2)
    };
    assert!(s.reconfigure(g, limited, 0));
    for tag in 0..3 {
        s.enqueue(q, read(tag, 0, 4096), 0).unwrap();
    }
    s.dispatch(0);
    assert_eq!(s.take_grants(q), vec![0]);
    assert_eq!(s.next_wakeup(0), Some(100 * MS));
    assert_eq!(s.guest_config(g).map(|c| c.weight), Some(2));
    assert!(!s.reconfigure(GuestId(7), guest("x", 1), 0));
}

#[test]
fn the_delay_p99_is_the_bucket_edge_above_ninety_nine_percent_of_the_delays() {
    let mut s = Scheduler::new(
        DeviceConfig {
            depth: 1,
            ..DeviceConfig::default()
        },
        0,
    );
    let g = s.add_guest(guest("g", 1), 0);
    let q = s.add_queue(g);
    // 99 requests dispatched at once, then one after 1 ms in the queue.
    let mut now = 0;
    for tag in 0..100 {
        s.enqueue(q, read(tag, 0, 4096), now).unwrap();
        if tag == 99 {
            now += MS;
        }
        s.dispatch(now);
        for granted in s.take_grants(q) {
            assert!(s.complete(q, granted));
        }
    }
    let stats = &s.stats(now)[0].1;
    assert_eq!(stats.dispatched, 100);
    assert_eq!(
        stats.delay_percentile_ns(99),
        1,
        "99 waited 0 ns: under 1 ns"
    );
    assert_eq!(
        stats.delay_percentile_ns(100),
        MS,
        "the bucket's edge, capped at the max"
    );
    assert_eq!(GuestStats::default().delay_percentile_ns(99), 0);
}

/// `notify=sched`: a guest busy for [`POLL_AFTER`] is polled, one guest at a time by
/// default (the one busy longest); a throttled guest and one idle past [`IDLE_AFTER`] go back
/// to interrupts; the switches and the time polled are counted.
#[test]
fn the_scheduler_polls_a_guest_with_sustained_backlog_and_not_an_idle_or_throttled_one() {
    let mut s = Scheduler::new(DeviceConfig::default(), 0);
    let busy = s.add_guest(guest("busy", 1), 0);
    let limited = GuestConfig {
        iops: Some(Rate {
            per_sec: 1,
            burst: 1,
        }),
        ..guest("limited", 1)
    };
    let limited = s.add_guest(limited, 0);
    let late = s.add_guest(guest("late", 1), 0);
    let (qb, ql, qlate) = (s.add_queue(busy), s.add_queue(limited), s.add_queue(late));
    let step = 100 * US;
    let mut now = 0;
    let mut tag = 0;
    // `busy` always has a request in flight; `limited` has queued ones its bucket holds.
    for _ in 0..2 {
        s.enqueue(ql, read(tag, 0, 4096), now).unwrap();
        tag += 1;
    }
    while now <= POLL_AFTER + step {
        s.enqueue(qb, read(tag, 0, 4096), now).unwrap();
        tag += 1;
        s.dispatch(now);
        for t in s.take_grants(qb) {
            s.complete(qb, t);
        }
        for t in s.take_grants(ql) {
            s.complete(ql, t);
        }
        now += step;
    }
    let modes = s.refresh_modes(now);
    assert_eq!(
        modes,
        vec![true, false, false],
        "busy only: limited is throttled"
    );

    // `late` gets busy too, but one guest is polled at a time: the one busy longest.
    let busy_until = now + POLL_AFTER + step;
    while now <= busy_until {
        for (queue, _) in [(qb, busy), (qlate, late)] {
            s.enqueue(queue, read(tag, 0, 4096), now).unwrap();
            tag += 1;
        }
        s.dispatch(now);
        for queue in [qb, qlate] {
            for t in s.take_grants(queue) {
                s.complete(queue, t);
            }
        }
        now += step;
    }
    assert_eq!(s.refresh_modes(now), vec![true, false, false]);
    s.reconfigure_device(
        DeviceConfig {
            poll_guests: 2,
            ..DeviceConfig::default()
        },
        now,
    );
    assert_eq!(s.refresh_modes(now), vec![true, false, true]);

    // Idle past IDLE_AFTER: back to interrupts.
    now += IDLE_AFTER + step;
    // The throttled guest's requests are still queued: it stays active but not polled.
    assert_eq!(s.refresh_modes(now), vec![false, false, false]);
    let stats = s.stats(now);
    assert_eq!(stats[0].1.poll_switches, 2, "on, then off");
    assert!(!stats[0].1.polled);
    assert!(stats[0].1.polled_ns >= POLL_AFTER, "{:?}", stats[0].1);
    assert_eq!(stats[1].1.poll_switches, 0);
    assert_eq!(stats[2].1.poll_switches, 2);
    // No guest is polled with poll_guests=0.
    s.reconfigure_device(
        DeviceConfig {
            poll_guests: 0,
            ..DeviceConfig::default()
        },
        now,
    );
    s.enqueue(qb, read(tag, 0, 4096), now).unwrap();
    assert_eq!(
        s.refresh_modes(now + POLL_AFTER * 4),
        vec![false, false, false]
    );
}

/// An unplugged disk's guest leaves: its queued and in-flight requests are forgotten (their
/// slots on a full device free at once), its stats leave `stats`, its queues take nothing.
#[test]
fn a_removed_guest_frees_its_slots_and_leaves_the_stats() {
    let device = DeviceConfig {
        depth: 2,
        ..DeviceConfig::default()
    };
    let mut s = Scheduler::new(device, 0);
    let gone = s.add_guest(guest("gone", 1), 0);
    let stays = s.add_guest(guest("stays", 1), 0);
    let (qg, qs) = (s.add_queue(gone), s.add_queue(stays));
    for tag in 0..3 {
        s.enqueue(qg, read(tag, 0, 4096), 0).unwrap();
    }
    s.dispatch(0);
    assert_eq!(s.take_grants(qg), vec![0, 1], "the device is full");
    s.enqueue(qs, read(10, 0, 4096), 0).unwrap();
    s.enqueue(qs, read(11, 0, 4096), 0).unwrap();
    s.dispatch(0);
    assert_eq!(
        s.take_grants(qs),
        vec![10],
        "one floor request on a full device"
    );

    assert!(s.remove_guest(gone));
    assert_eq!(s.in_flight(), 1, "only the staying guest's request");
    s.dispatch(0);
    assert_eq!(s.take_grants(qs), vec![11]);
    let stats = s.stats(0);
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].0.name, "stays");
    assert_eq!(s.guest_stats(gone, 0), None);
    assert_eq!(s.guest_config(gone), None);
    assert_eq!(s.enqueue(qg, read(5, 0, 4096), 0), Err(QueueFull));
    assert!(!s.complete(qg, 0), "its in-flight requests are forgotten");
    assert!(!s.reconfigure(gone, guest("gone", 5), 0));
    assert!(!s.remove_guest(gone));
    // Its queue's port going away later changes nothing.
    s.remove_queue(qg);
    assert_eq!(s.in_flight(), 2);
}
