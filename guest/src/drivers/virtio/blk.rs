//! virtio-blk (§5.2): multiqueue, `qd` requests in flight per queue, sequential/random
//! read/write and a write-then-verify pass whose data is derived from (byte offset, seed).
//! Requests are three descriptors: header (device reads), data, status byte (device writes).

use super::pci::{self as vpci, VirtioError, VirtioPci};
use super::queue::{Queue, Segment};
use super::{idle, report_error, splitmix64};
use crate::arch::ring3;
use crate::cmdline::{BlkOp, BlkParams, Mode};
use crate::global::SpinLock;
use crate::mem;
use crate::time::{now_ns, Deadline};
use crate::workloads::stats::Histogram;
use crate::workloads::Outcome;
use alloc::vec::Vec;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const SECTOR: u64 = 512;
const STATUS_UNSET: u8 = 0xff;
/// Largest span a run touches when `span_mb` is not given.
const DEFAULT_SPAN: u64 = 64 << 20;

/// One request's buffers; `header` page holds the 16-byte header and the status byte at 16.
struct Slot {
    header: u64,
    data: u64,
    offset: u64,
    is_write: bool,
    submitted_ns: u64,
}

struct BlkQueue {
    queue: Queue,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    /// head descriptor id -> slot
    by_head: Vec<Option<usize>>,
    unpublished: u32,
}

/// Counters for the RESULT line.
#[derive(Default)]
struct Totals {
    completed: u64,
    bytes: u64,
    errors: u64,
    mismatches: u64,
}

/// Decides which block each request touches, and when to stop. With several CPUs each has its
/// own plan over its share: sequential blocks `first, first + stride, ...` (so verify's write
/// and read-back phases of one CPU cover the same blocks), its share of `ops`, its own random
/// stream.
struct Plan {
    op: BlkOp,
    blocks: u64,
    bs: u64,
    issued: u64,
    limit: u64,
    end_ns: Option<u64>,
    rng: u64,
    seed: u64,
    first: u64,
    stride: u64,
}

/// What every CPU's plan has in common.
struct PlanTemplate {
    op: BlkOp,
    blocks: u64,
    bs: u64,
    limit: u64,
    end_ns: Option<u64>,
    seed: u64,
}

/// `total` split over `parts`: part `index` gets this many (the first ones one more).
fn share_of(total: u64, index: u64, parts: u64) -> u64 {
    total / parts + u64::from(index < total % parts)
}

impl PlanTemplate {
    /// The plan of CPU `cpu` of `cpus`; CPU 0 of 1 gets exactly the single-CPU plan.
    fn for_cpu(&self, cpu: usize, cpus: usize) -> Plan {
        let (cpu, cpus) = (cpu as u64, cpus as u64);
        let limit = if self.op.compares() {
            share_of(self.blocks, cpu, cpus)
        } else {
            share_of(self.limit, cpu, cpus)
        };
        Plan {
            op: self.op,
            blocks: self.blocks,
            bs: self.bs,
            issued: 0,
            limit,
            end_ns: self.end_ns,
            rng: if cpu == 0 {
                self.seed
            } else {
                splitmix64(self.seed ^ cpu)
            },
            seed: self.seed,
            first: cpu,
            stride: cpus,
        }
    }
}

impl Plan {
    fn more(&self) -> bool {
        match self.end_ns {
            Some(end) => now_ns() < end,
            None => self.issued < self.limit,
        }
    }

    fn next_offset(&mut self) -> u64 {
        let block = if self.op.random() {
            self.rng = splitmix64(self.rng);
            self.rng % self.blocks
        } else {
            (self.first + self.issued * self.stride) % self.blocks
        };
        self.issued += 1;
        block * self.bs
    }
}

/// Pattern word `i` of the block at byte `offset`.
fn pattern_word(seed: u64, offset: u64, i: u64) -> u64 {
    splitmix64(seed ^ (offset / 8 + i).wrapping_mul(0x2545_f491_4f6c_dd1d))
}

fn fill_pattern(addr: u64, len: u64, seed: u64, offset: u64) {
    for i in 0..len / 8 {
        // SAFETY: `addr..addr+len` is a DMA buffer we own, identity mapped and 8-byte aligned.
        unsafe {
            core::ptr::write_volatile((addr + 8 * i) as *mut u64, pattern_word(seed, offset, i))
        };
    }
}

fn check_pattern(addr: u64, len: u64, seed: u64, offset: u64) -> bool {
    (0..len / 8).all(|i| {
        // SAFETY: as in `fill_pattern`; the device has finished writing (used ring seen).
        let word = unsafe { core::ptr::read_volatile((addr + 8 * i) as *const u64) };
        word == pattern_word(seed, offset, i)
    })
}

fn write_header(slot: &Slot, kind: u32, sector: u64) {
    // SAFETY: the header page belongs to this slot and is not in flight while we write.
    unsafe {
        core::ptr::write_volatile(slot.header as *mut u32, kind);
        core::ptr::write_volatile((slot.header + 4) as *mut u32, 0);
        core::ptr::write_volatile((slot.header + 8) as *mut u64, sector);
        core::ptr::write_volatile((slot.header + 16) as *mut u8, STATUS_UNSET);
    }
}

fn read_status(slot: &Slot) -> u8 {
    // SAFETY: the status byte lives in this slot's header page.
    unsafe { core::ptr::read_volatile((slot.header + 16) as *const u8) }
}

struct Engine<'a> {
    device: &'a VirtioPci,
    queues: Vec<BlkQueue>,
    params: &'a BlkParams,
    hist: Histogram,
    totals: Totals,
    timeout_ms: u64,
    /// The privilege level `drive` ran at (CS's RPL, read there).
    ring: u8,
}

impl Engine<'_> {
    fn submit(
        &mut self,
        q: usize,
        plan: &mut Plan,
        verify_writes: Option<bool>,
    ) -> Result<bool, VirtioError> {
        let bs = plan.bs;
        let seed = plan.seed;
        let batch = self.params.batch;
        let mode = self.params.mode;
        let bq = &mut self.queues[q];
        let Some(slot_index) = bq.free_slots.pop() else {
            return Ok(false);
        };
        let offset = plan.next_offset();
        let is_write = verify_writes.unwrap_or(plan.op.writes());
        let slot = &mut bq.slots[slot_index];
        slot.offset = offset;
        slot.is_write = is_write;
        if verify_writes == Some(true) {
            fill_pattern(slot.data, bs, seed, offset);
        }
        write_header(slot, if is_write { T_OUT } else { T_IN }, offset / SECTOR);
        let segments = [
            Segment {
                addr: slot.header,
                len: 16,
                device_writes: false,
            },
            Segment {
                addr: slot.data,
                len: bs as u32,
                device_writes: !is_write,
            },
            Segment {
                addr: slot.header + 16,
                len: 1,
                device_writes: true,
            },
        ];
        let head = bq.queue.add(&segments).ok_or(VirtioError::NoMemory)?;
        bq.by_head[usize::from(head)] = Some(slot_index);
        slot.submitted_ns = now_ns();
        bq.unpublished += 1;
        // Irq mode notifies per request; poll and batch modes publish `batch` requests (default
        // qd) per notify: each notify costs a kick (~22 µs from ring 3 on kvm_pvm).
        let flush_now = mode == Mode::Irq
            || bq.unpublished >= batch
            || bq.free_slots.is_empty()
            || !plan.more();
        if flush_now {
            bq.queue.kick();
            bq.unpublished = 0;
        }
        Ok(true)
    }

    fn fill(&mut self, plan: &mut Plan, verify_writes: Option<bool>) -> Result<(), VirtioError> {
        for q in 0..self.queues.len() {
            while plan.more() && self.submit(q, plan, verify_writes)? {}
            if self.queues[q].unpublished > 0 {
                self.queues[q].queue.kick();
                self.queues[q].unpublished = 0;
            }
        }
        Ok(())
    }

    fn complete_one(&mut self, q: usize, head: u16, check: Option<u64>) -> Result<(), VirtioError> {
        let now = now_ns();
        let bs = u64::from(self.params.bs);
        let bq = &mut self.queues[q];
        let slot_index = bq
            .by_head
            .get_mut(usize::from(head))
            .and_then(Option::take)
            .ok_or(VirtioError::BadUsed(u32::from(head)))?;
        let slot = &bq.slots[slot_index];
        self.hist.record(now.saturating_sub(slot.submitted_ns));
        if read_status(slot) != 0 {
            self.totals.errors += 1;
        } else {
            self.totals.bytes += bs;
            if let Some(seed) = check {
                if !check_pattern(slot.data, bs, seed, slot.offset) {
                    self.totals.mismatches += 1;
                }
            }
        }
        self.totals.completed += 1;
        bq.free_slots.push(slot_index);
        Ok(())
    }

    /// Reaps completions from every queue; returns how many were found.
    fn reap(&mut self, check: Option<u64>) -> Result<u64, VirtioError> {
        let mut found = 0;
        for q in 0..self.queues.len() {
            loop {
                let popped = self.queues[q]
                    .queue
                    .pop_used()
                    .map_err(|bad| VirtioError::BadUsed(bad.id))?;
                let Some((head, _len)) = popped else { break };
                self.complete_one(q, head, check)?;
                found += 1;
            }
        }
        Ok(found)
    }

    fn in_flight(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.slots.len() - q.free_slots.len())
            .sum()
    }

    /// Runs one phase to completion: keeps every queue full until the plan is exhausted.
    fn run_phase(
        &mut self,
        plan: &mut Plan,
        verify_writes: Option<bool>,
        check: Option<u64>,
    ) -> Result<(), VirtioError> {
        let mut deadline = Deadline::after_ms(self.timeout_ms);
        loop {
            self.fill(plan, verify_writes)?;
            if self.in_flight() == 0 && !plan.more() {
                return Ok(());
            }
            if self.reap(check)? > 0 {
                deadline = Deadline::after_ms(self.timeout_ms);
                continue;
            }
            if deadline.expired() {
                return Err(if self.device.needs_reset() {
                    VirtioError::NeedsReset
                } else {
                    VirtioError::Timeout("blk request")
                });
            }
            let queues = &self.queues;
            idle(self.params.mode, || {
                queues.iter().any(|q| q.queue.has_used())
            });
        }
    }

    /// The whole workload on this engine's queues: one phase, or verify's write and read-back.
    fn drive(
        &mut self,
        template: &PlanTemplate,
        cpu: usize,
        cpus: usize,
    ) -> Result<(), VirtioError> {
        self.ring = ring3::current_ring();
        let op = self.params.op;
        if !op.compares() {
            return self.run_phase(&mut template.for_cpu(cpu, cpus), None, None);
        }
        if op == BlkOp::Verify {
            self.run_phase(&mut template.for_cpu(cpu, cpus), Some(true), None)?;
        }
        self.run_phase(
            &mut template.for_cpu(cpu, cpus),
            Some(false),
            Some(template.seed),
        )
    }

    /// Takes in another CPU's counts and latencies.
    fn merge(&mut self, other: &Engine<'_>) {
        self.hist.merge(&other.hist);
        self.ring = self.ring.min(other.ring);
        self.totals.completed += other.totals.completed;
        self.totals.bytes += other.totals.bytes;
        self.totals.errors += other.totals.errors;
        self.totals.mismatches += other.totals.mismatches;
    }

    fn notifies(&self) -> u64 {
        self.queues.iter().map(|q| q.queue.notifies).sum()
    }

    fn flush(&mut self) -> Result<(), VirtioError> {
        let bq = &mut self.queues[0];
        let Some(slot_index) = bq.free_slots.pop() else {
            return Ok(());
        };
        let slot = &bq.slots[slot_index];
        write_header(slot, T_FLUSH, 0);
        let segments = [
            Segment {
                addr: slot.header,
                len: 16,
                device_writes: false,
            },
            Segment {
                addr: slot.header + 16,
                len: 1,
                device_writes: true,
            },
        ];
        let head = bq.queue.add(&segments).ok_or(VirtioError::NoMemory)?;
        bq.queue.kick();
        let deadline = Deadline::after_ms(self.timeout_ms);
        loop {
            let popped = bq
                .queue
                .pop_used()
                .map_err(|bad| VirtioError::BadUsed(bad.id))?;
            if let Some((done, _)) = popped {
                if done == head {
                    if read_status(&bq.slots[slot_index]) != 0 {
                        self.totals.errors += 1;
                    }
                    bq.free_slots.push(slot_index);
                    return Ok(());
                }
            } else if deadline.expired() {
                return Err(VirtioError::Timeout("blk flush"));
            } else {
                let queue = &bq.queue;
                idle(self.params.mode, || queue.has_used());
            }
        }
    }
}

fn alloc_slots(count: usize, bs: u64) -> Option<Vec<Slot>> {
    (0..count)
        .map(|_| {
            Some(Slot {
                header: mem::alloc_dma(mem::PAGE_SIZE)?,
                data: mem::alloc_dma(bs)?,
                offset: 0,
                is_write: false,
                submitted_ns: 0,
            })
        })
        .collect()
}

/// Sets up `count` queues; queue i's interrupts go to the CPU with APIC id `driver_of(i)`.
fn setup_queues(
    device: &mut VirtioPci,
    p: &BlkParams,
    count: u16,
    driver_of: impl Fn(u16) -> u32,
) -> Result<Vec<BlkQueue>, VirtioError> {
    let interrupts = p.mode != Mode::Poll;
    let bs = u64::from(p.bs);
    let needed =
        u64::from(count) * u64::from(p.qd) * (bs.next_multiple_of(mem::PAGE_SIZE) + mem::PAGE_SIZE);
    if needed > mem::free_bytes() / 2 {
        return Err(VirtioError::NoMemory);
    }
    (0..count)
        .map(|index| {
            let queue = device.setup_queue_for_cpu(index, 256, interrupts, driver_of(index))?;
            let depth = (p.qd as usize).min(usize::from(queue.size()) / 3).max(1);
            let slots = alloc_slots(depth, bs).ok_or(VirtioError::NoMemory)?;
            let by_head = alloc::vec![None; usize::from(queue.size())];
            let free_slots = (0..depth).rev().collect();
            if p.op.writes() {
                // Plain writes send the pattern filled here once; verify refills per request.
                slots
                    .iter()
                    .for_each(|s| fill_pattern(s.data, bs, p.seed, 0));
            }
            Ok(BlkQueue {
                queue,
                slots,
                free_slots,
                by_head,
                unpublished: 0,
            })
        })
        .collect()
}

struct Summary<'a> {
    p: &'a BlkParams,
    queues: usize,
    depth: usize,
    cpu_ops: &'a [u64],
    elapsed_ns: u64,
    notifies: u64,
    interrupts: u64,
    verify: &'a str,
    pass: bool,
}

fn print_result(engine: &Engine<'_>, s: &Summary<'_>) {
    let p = s.p;
    let mut cpu_ops = alloc::string::String::new();
    for (cpu, ops) in s.cpu_ops.iter().enumerate() {
        let separator = if cpu == 0 { "" } else { "," };
        let _ = core::fmt::Write::write_fmt(&mut cpu_ops, format_args!("{separator}{ops}"));
    }
    crate::println!(
        "RESULT {{\"workload\":\"blk\",\"ring\":{},\"op\":\"{}\",\"bs\":{},\"qd\":{},\"queues\":{},\"cpus\":{},\"cpu_ops\":[{}],\"mode\":\"{}\",\"vq\":\"{}\",\"event_idx\":{},\"ops\":{},\"bytes\":{},\"elapsed_ns\":{},\"lat_ns\":{},\"notifies\":{},\"interrupts\":{},\"errors\":{},\"verify\":\"{}\",\"pass\":{}}}",
        engine.ring, p.op.name(), p.bs, s.depth, s.queues, s.cpu_ops.len(), cpu_ops, p.mode.name(),
        engine.device.layout().name(), engine.device.has(vpci::F_EVENT_IDX), engine.totals.completed, engine.totals.bytes,
        s.elapsed_ns, engine.hist.json(), s.notifies, s.interrupts, engine.totals.errors, s.verify,
        s.pass
    );
}

fn open_device(p: &BlkParams, timeout_ms: u64) -> Result<VirtioPci, VirtioError> {
    let pci = vpci::find(vpci::TYPE_BLOCK, p.dev).ok_or(VirtioError::NotFound)?;
    let mut wanted = F_FLUSH | F_BLK_SIZE | F_SEG_MAX | F_RO;
    if p.event_idx {
        wanted |= vpci::F_EVENT_IDX;
    }
    if p.queues > 1 {
        wanted |= F_MQ;
    }
    VirtioPci::open(pci, wanted, timeout_ms)
}

/// The CPUs `cpus=N` asks for, started; `None` (after saying why) if fewer came online.
fn start_cpus(wanted: usize, timeout_ms: u64) -> Option<usize> {
    let online = crate::smp::start_application_processors(timeout_ms);
    if online < wanted {
        crate::say!("blk: cpus={} but only {} CPU(s) online", wanted, online);
        return None;
    }
    Some(wanted)
}

/// Splits the queues over `cpus` engines: queue i goes to engine i % cpus.
fn engines_for<'a>(
    device: &'a VirtioPci,
    p: &'a BlkParams,
    queues: Vec<BlkQueue>,
    cpus: usize,
    timeout_ms: u64,
) -> Vec<Engine<'a>> {
    let mut engines: Vec<Engine<'a>> = (0..cpus)
        .map(|_| Engine {
            device,
            queues: Vec::new(),
            params: p,
            hist: Histogram::new(),
            totals: Totals::default(),
            timeout_ms,
            ring: 0,
        })
        .collect();
    for (index, queue) in queues.into_iter().enumerate() {
        engines[index % cpus].queues.push(queue);
    }
    engines
}

/// Runs each engine on its own CPU (engine 0 on this one) and returns them merged into
/// engine 0, with each CPU's completed requests.
fn drive_on_cpus<'a>(
    engines: Vec<Engine<'a>>,
    template: &PlanTemplate,
    timeout_ms: u64,
) -> Result<(Engine<'a>, Vec<u64>), VirtioError> {
    let cpus = engines.len();
    let slots: Vec<SpinLock<(Engine<'a>, Result<(), VirtioError>)>> = engines
        .into_iter()
        .map(|engine| SpinLock::new((engine, Ok(()))))
        .collect();
    crate::smp::run_on_cpus(cpus, timeout_ms, &|cpu| {
        let mut slot = slots[cpu].lock();
        let (engine, result) = &mut *slot;
        *result = engine.drive(template, cpu, cpus);
    });
    let mut finished = slots.into_iter().map(SpinLock::into_inner);
    let (mut merged, first_result) = finished.next().ok_or(VirtioError::NoQueue(0))?;
    first_result?;
    let mut cpu_ops = alloc::vec![merged.totals.completed];
    for (engine, result) in finished {
        result?;
        cpu_ops.push(engine.totals.completed);
        merged.merge(&engine);
        merged.queues.extend(engine.queues);
    }
    Ok((merged, cpu_ops))
}

fn run(p: &BlkParams, timeout_ms: u64) -> Result<Outcome, VirtioError> {
    let cpus = match p.cpus {
        Some(wanted) => match start_cpus(wanted as usize, timeout_ms) {
            Some(cpus) => cpus,
            None => return Ok(Outcome::Fail),
        },
        None => 1,
    };
    let mut device = open_device(p, timeout_ms)?;
    let offered_queues = if device.has(F_MQ) {
        device.config_read16(34).max(1)
    } else {
        1
    };
    let count = (p.queues as u16)
        .min(offered_queues)
        .min(device.num_queues())
        .max(1);
    let capacity = device.config_read64(0).saturating_mul(SECTOR);
    let span = p
        .span_mb
        .map(|mb| mb << 20)
        .unwrap_or(DEFAULT_SPAN)
        .min(capacity);
    let bs = u64::from(p.bs);
    let blocks = span / bs;
    crate::chatter!(
        "virtio-blk {}: capacity {} bytes, {} queue(s), features {:#x}",
        device.pci.bdf,
        capacity,
        count,
        device.features
    );
    if blocks == 0 || (device.has(F_RO) && (p.op.writes() || p.op == BlkOp::Verify)) {
        crate::say!("blk: disk too small or read-only for op {}", p.op.name());
        return Ok(Outcome::Fail);
    }
    if usize::from(count) < cpus {
        crate::say!("blk: {} queue(s) for cpus={}", count, cpus);
        return Ok(Outcome::Fail);
    }
    // Each queue interrupts the CPU that drives it (smp's table is filled only once APs start).
    let this_cpu = crate::interrupts::apic_id();
    let queues = setup_queues(&mut device, p, count, |index| match p.cpus {
        Some(_) => crate::smp::apic_id_of(usize::from(index) % cpus),
        None => this_cpu,
    })?;
    device.driver_ok()?;
    let depth = queues[0].slots.len();
    // Check walks the span exactly like verify's read-back phase.
    let template = PlanTemplate {
        op: if p.op == BlkOp::Check {
            BlkOp::Verify
        } else {
            p.op
        },
        blocks,
        bs,
        limit: if p.op.compares() { blocks } else { p.ops },
        end_ns: if p.op.compares() {
            None
        } else {
            p.dur_ms.map(|ms| now_ns() + ms * 1_000_000)
        },
        seed: p.seed,
    };
    let interrupts_before = device.interrupt_count();
    let start = now_ns();
    let mut engines = engines_for(&device, p, queues, cpus, timeout_ms);
    let (mut engine, cpu_ops) = if p.cpus.is_none() {
        let mut engine = engines.remove(0);
        ring3::run_workload_code(|| engine.drive(&template, 0, 1))?;
        let ops = engine.totals.completed;
        (engine, alloc::vec![ops])
    } else {
        drive_on_cpus(engines, &template, timeout_ms)?
    };
    let verify = match (p.op.compares(), engine.totals.mismatches) {
        (false, _) => "n/a",
        (true, 0) => "ok",
        (true, _) => "fail",
    };
    if (p.op.writes() || p.op == BlkOp::Verify) && device.has(F_FLUSH) {
        ring3::run_workload_code(|| engine.flush())?;
    }
    let elapsed_ns = now_ns() - start;
    let interrupts = device.interrupt_count() - interrupts_before;
    let pass =
        engine.totals.errors == 0 && engine.totals.mismatches == 0 && engine.totals.completed > 0;
    let summary = Summary {
        p,
        queues: usize::from(count),
        depth,
        cpu_ops: &cpu_ops,
        elapsed_ns,
        notifies: engine.notifies(),
        interrupts,
        verify,
        pass,
    };
    print_result(&engine, &summary);
    Ok(if pass { Outcome::Pass } else { Outcome::Fail })
}

/// The `blk` workload.
pub fn run_workload(p: &BlkParams, timeout_ms: u64) -> Outcome {
    run(p, timeout_ms).unwrap_or_else(|error| report_error("blk", &error))
}
