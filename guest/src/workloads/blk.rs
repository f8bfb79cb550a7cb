//! The block workload without its transport: which blocks each request touches (the plan), the
//! data pattern derived from (byte offset, seed), keeping `qd` requests in flight per queue,
//! latency histogram, totals, several CPUs each driving their own queues, and the `RESULT`
//! line. virtio-blk (`w=blk`) and NVMe (`w=nvme`) implement [`BlkQueue`] and run the very same
//! engine, so their numbers compare like for like.

use crate::arch::ring3;
use crate::cmdline::{BlkOp, BlkParams, Mode};
use crate::drivers::virtio::{idle, splitmix64};
use crate::global::SpinLock;
use crate::mem;
use crate::time::{now_ns, Deadline};
use crate::workloads::stats::Histogram;
use alloc::string::String;
use alloc::vec::Vec;

/// Largest span a run touches when `span_mb` is not given.
pub const DEFAULT_SPAN: u64 = 64 << 20;

/// A request the device finished: which slot, and whether it succeeded.
pub struct Completion {
    pub slot: usize,
    pub ok: bool,
}

/// One hardware queue of a block device, as the engine drives it. Requests are named by slot
/// index (`0..depth`); the transport keeps whatever per-slot state it needs (virtio's header
/// page, NVMe's PRP list) and must only report slots that the engine submitted.
pub trait BlkQueue {
    type Error;

    /// Queues a read (`write == false`) or write of `len` bytes at byte `offset` of the disk,
    /// from or into the DMA buffer at `data`; not yet visible to the device before `publish`.
    fn submit(
        &mut self,
        slot: usize,
        data: u64,
        offset: u64,
        len: u32,
        write: bool,
    ) -> Result<(), Self::Error>;

    /// Sets the I/O priority (Linux ioprio encoding) the next requests on `slot` carry; a
    /// transport without such a field ignores it.
    fn set_ioprio(&mut self, _slot: usize, _ioprio: u32) {}

    /// Queues a cache flush (completes like any request, moves no data).
    fn submit_flush(&mut self, slot: usize) -> Result<(), Self::Error>;

    /// Makes the queued requests visible to the device and notifies it where needed.
    fn publish(&mut self);

    /// The next finished request, if any.
    fn pop_completion(&mut self) -> Result<Option<Completion>, Self::Error>;

    /// Whether `pop_completion` would find something (cheap; used to decide whether to sleep).
    fn has_completion(&self) -> bool;

    /// Notifications sent to the device so far.
    fn notifies(&self) -> u64;

    /// The error for "nothing completed within the timeout" (`what` names the wait); the
    /// transport may know better (virtio: the device asked for a reset).
    fn stalled(&self, what: &'static str) -> Self::Error;

    /// The error for a completion naming a slot that is not in flight.
    fn bad_completion(&self, slot: usize) -> Self::Error;
}

/// One request's buffer and bookkeeping.
struct Slot {
    data: u64,
    offset: u64,
    submitted_ns: u64,
    in_flight: bool,
}

/// A transport queue with the engine's slots.
pub struct QueueState<Q> {
    pub queue: Q,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    unpublished: u32,
}

impl<Q: BlkQueue> QueueState<Q> {
    /// `depth` slots with a `bs`-byte data buffer each; `None` when memory runs out. Plain
    /// writes send the pattern filled here once (offset 0); verify refills per request.
    pub fn new(queue: Q, depth: usize, p: &BlkParams) -> Option<QueueState<Q>> {
        let bs = u64::from(p.bs);
        let slots = (0..depth)
            .map(|_| {
                Some(Slot {
                    data: mem::alloc_dma(bs)?,
                    offset: 0,
                    submitted_ns: 0,
                    in_flight: false,
                })
            })
            .collect::<Option<Vec<Slot>>>()?;
        if p.op.writes() {
            slots
                .iter()
                .for_each(|s| fill_pattern(s.data, bs, p.seed, 0));
        }
        Some(QueueState {
            queue,
            slots,
            free_slots: (0..depth).rev().collect(),
            unpublished: 0,
        })
    }

    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    fn publish(&mut self) {
        if self.unpublished > 0 {
            self.queue.publish();
            self.unpublished = 0;
        }
    }

    /// Takes the slot a completion names back, or says it was not in flight.
    fn retire(&mut self, slot: usize) -> Result<&Slot, Q::Error> {
        match self.slots.get_mut(slot) {
            Some(entry) if entry.in_flight => {
                entry.in_flight = false;
                self.free_slots.push(slot);
                Ok(&self.slots[slot])
            }
            _ => Err(self.queue.bad_completion(slot)),
        }
    }
}

/// Memory the slots of `queues` queues of depth `qd` need; the callers refuse a run that would
/// take more than half of what is free.
pub fn slot_memory(p: &BlkParams, queues: u64, per_slot_extra: u64) -> u64 {
    let bs = u64::from(p.bs);
    queues * u64::from(p.qd) * (bs.next_multiple_of(mem::PAGE_SIZE) + per_slot_extra)
}

/// Counters for the RESULT line.
#[derive(Default)]
pub struct Totals {
    pub completed: u64,
    pub bytes: u64,
    pub errors: u64,
    pub mismatches: u64,
}

/// Decides which block each request touches, and when to stop. With several CPUs each has its
/// own plan over its share: sequential blocks `first, first + stride, ...` (so verify's write
/// and read-back phases of one CPU cover the same blocks), its share of `ops`, its own random
/// stream.
pub struct Plan {
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
pub struct PlanTemplate {
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
    /// The plan for `p` over `blocks` blocks of `bs` bytes. Check walks the span exactly like
    /// verify's read-back phase; `dur_ms` starts counting now.
    pub fn new(p: &BlkParams, blocks: u64) -> PlanTemplate {
        PlanTemplate {
            op: if p.op == BlkOp::Check {
                BlkOp::Verify
            } else {
                p.op
            },
            blocks,
            bs: u64::from(p.bs),
            limit: if p.op.compares() { blocks } else { p.ops },
            end_ns: if p.op.compares() {
                None
            } else {
                p.dur_ms.map(|ms| now_ns() + ms * 1_000_000)
            },
            seed: p.seed,
        }
    }

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

/// Pattern word `i` of the block at byte `offset` (crates/guest-kit/src/pattern.rs mirrors it).
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
        // SAFETY: as in `fill_pattern`; the device has finished writing (completion seen).
        let word = unsafe { core::ptr::read_volatile((addr + 8 * i) as *const u64) };
        word == pattern_word(seed, offset, i)
    })
}

/// The queues one CPU drives, with that CPU's counts.
pub struct Engine<'a, Q> {
    pub queues: Vec<QueueState<Q>>,
    params: &'a BlkParams,
    pub hist: Histogram,
    /// With `hi_slots`: the latencies of the high-priority slots and of the others.
    pub hist_hi: Histogram,
    pub hist_lo: Histogram,
    pub totals: Totals,
    timeout_ms: u64,
    /// The privilege level `drive` ran at (CS's RPL, read there).
    pub ring: u8,
}

impl<'a, Q: BlkQueue> Engine<'a, Q> {
    fn new(params: &'a BlkParams, timeout_ms: u64) -> Self {
        Engine {
            queues: Vec::new(),
            params,
            hist: Histogram::new(),
            hist_hi: Histogram::new(),
            hist_lo: Histogram::new(),
            totals: Totals::default(),
            timeout_ms,
            ring: 0,
        }
    }

    fn submit(
        &mut self,
        q: usize,
        plan: &mut Plan,
        verify_writes: Option<bool>,
    ) -> Result<bool, Q::Error> {
        let bs = plan.bs;
        let seed = plan.seed;
        let batch = self.params.batch;
        let mode = self.params.mode;
        let qs = &mut self.queues[q];
        let Some(slot_index) = qs.free_slots.pop() else {
            return Ok(false);
        };
        let offset = plan.next_offset();
        let is_write = verify_writes.unwrap_or(plan.op.writes());
        let slot = &mut qs.slots[slot_index];
        slot.offset = offset;
        if verify_writes == Some(true) {
            fill_pattern(slot.data, bs, seed, offset);
        }
        let data = slot.data;
        if let Some(hi) = self.params.hi_slots {
            qs.queue.set_ioprio(slot_index, slot_ioprio(slot_index, hi));
        }
        if let Err(error) = qs
            .queue
            .submit(slot_index, data, offset, bs as u32, is_write)
        {
            qs.free_slots.push(slot_index);
            return Err(error);
        }
        let slot = &mut qs.slots[slot_index];
        slot.in_flight = true;
        slot.submitted_ns = now_ns();
        qs.unpublished += 1;
        // Irq mode notifies per request; poll and batch modes publish `batch` requests (default
        // qd) per notify: each notify costs a kick or doorbell exit (~22-65 µs from ring 3 on
        // kvm_pvm).
        let flush_now = mode == Mode::Irq
            || qs.unpublished >= batch
            || qs.free_slots.is_empty()
            || !plan.more();
        if flush_now {
            qs.publish();
        }
        Ok(true)
    }

    fn fill(&mut self, plan: &mut Plan, verify_writes: Option<bool>) -> Result<(), Q::Error> {
        for q in 0..self.queues.len() {
            while plan.more() && self.submit(q, plan, verify_writes)? {}
            self.queues[q].publish();
        }
        Ok(())
    }

    fn complete_one(
        &mut self,
        q: usize,
        done: Completion,
        check: Option<u64>,
    ) -> Result<(), Q::Error> {
        let now = now_ns();
        let bs = u64::from(self.params.bs);
        let slot = self.queues[q].retire(done.slot)?;
        let latency = now.saturating_sub(slot.submitted_ns);
        self.hist.record(latency);
        if let Some(hi) = self.params.hi_slots {
            if done.slot < hi as usize {
                self.hist_hi.record(latency);
            } else {
                self.hist_lo.record(latency);
            }
        }
        if !done.ok {
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
        Ok(())
    }

    /// Reaps completions from every queue; returns how many were found.
    fn reap(&mut self, check: Option<u64>) -> Result<u64, Q::Error> {
        let mut found = 0;
        for q in 0..self.queues.len() {
            while let Some(done) = self.queues[q].queue.pop_completion()? {
                self.complete_one(q, done, check)?;
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
    ) -> Result<(), Q::Error> {
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
                return Err(self.queues[0].queue.stalled("blk request"));
            }
            let queues = &self.queues;
            idle(self.params.mode, || {
                queues.iter().any(|q| q.queue.has_completion())
            });
        }
    }

    /// The whole workload on this engine's queues: one phase, or verify's write and read-back.
    fn drive(&mut self, template: &PlanTemplate, cpu: usize, cpus: usize) -> Result<(), Q::Error> {
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
    fn merge(&mut self, other: &Engine<'_, Q>) {
        self.hist.merge(&other.hist);
        self.hist_hi.merge(&other.hist_hi);
        self.hist_lo.merge(&other.hist_lo);
        self.ring = self.ring.min(other.ring);
        self.totals.completed += other.totals.completed;
        self.totals.bytes += other.totals.bytes;
        self.totals.errors += other.totals.errors;
        self.totals.mismatches += other.totals.mismatches;
    }

    pub fn notifies(&self) -> u64 {
        self.queues.iter().map(|q| q.queue.notifies()).sum()
    }

    /// Flushes the device's write cache through queue 0 (after every request finished).
    pub fn flush(&mut self) -> Result<(), Q::Error> {
        let qs = &mut self.queues[0];
        let Some(slot_index) = qs.free_slots.pop() else {
            return Ok(());
        };
        qs.queue.submit_flush(slot_index)?;
        qs.slots[slot_index].in_flight = true;
        qs.queue.publish();
        let deadline = Deadline::after_ms(self.timeout_ms);
        loop {
            if let Some(done) = qs.queue.pop_completion()? {
                let is_flush = done.slot == slot_index;
                qs.retire(done.slot)?;
                if is_flush {
                    if !done.ok {
                        self.totals.errors += 1;
                    }
                    return Ok(());
                }
            } else if deadline.expired() {
                return Err(qs.queue.stalled("blk flush"));
            } else {
                let queue = &qs.queue;
                idle(self.params.mode, || queue.has_completion());
            }
        }
    }
}

/// Splits the queues over `cpus` engines: queue i goes to engine i % cpus.
fn engines_for<'a, Q: BlkQueue>(
    p: &'a BlkParams,
    queues: Vec<QueueState<Q>>,
    cpus: usize,
    timeout_ms: u64,
) -> Vec<Engine<'a, Q>> {
    let mut engines: Vec<Engine<'a, Q>> = (0..cpus).map(|_| Engine::new(p, timeout_ms)).collect();
    for (index, queue) in queues.into_iter().enumerate() {
        engines[index % cpus].queues.push(queue);
    }
    engines
}

/// One CPU's engine and how its drive ended.
type CpuSlot<'a, Q> = SpinLock<(Engine<'a, Q>, Result<(), <Q as BlkQueue>::Error>)>;

/// Runs engine i on CPU i (engine 0 on this one) and returns them merged, with each CPU's
/// completed requests.
fn drive_on_cpus<'a, Q: BlkQueue + Send>(
    engines: Vec<Engine<'a, Q>>,
    p: &'a BlkParams,
    template: &PlanTemplate,
    timeout_ms: u64,
) -> Result<(Engine<'a, Q>, Vec<u64>), Q::Error>
where
    Q::Error: Send,
{
    let cpus = engines.len();
    let slots: Vec<CpuSlot<'a, Q>> = engines
        .into_iter()
        .map(|engine| SpinLock::new((engine, Ok(()))))
        .collect();
    crate::smp::run_on_cpus(cpus, timeout_ms, &|cpu| {
        let mut slot = slots[cpu].lock();
        let (engine, result) = &mut *slot;
        *result = engine.drive(template, cpu, cpus);
    });
    let mut merged = Engine::new(p, timeout_ms);
    merged.ring = 3;
    let mut cpu_ops = Vec::new();
    for (engine, result) in slots.into_iter().map(SpinLock::into_inner) {
        result?;
        cpu_ops.push(engine.totals.completed);
        merged.merge(&engine);
        merged.queues.extend(engine.queues);
    }
    Ok((merged, cpu_ops))
}

/// The CPUs `cpus=N` asks for, started (1 without `cpus`); `None` (after saying why) if fewer
/// came online. `workload` names the workload in the message.
pub fn start_cpus(workload: &str, p: &BlkParams, timeout_ms: u64) -> Option<usize> {
    let Some(wanted) = p.cpus else {
        return Some(1);
    };
    let online = crate::smp::start_application_processors(timeout_ms);
    if online < wanted as usize {
        crate::say!(
            "{}: cpus={} but only {} CPU(s) online",
            workload,
            wanted,
            online
        );
        return None;
    }
    Some(wanted as usize)
}

/// What a finished run measured.
pub struct Finished<'a, Q> {
    pub engine: Engine<'a, Q>,
    pub cpu_ops: Vec<u64>,
    pub elapsed_ns: u64,
}

impl<Q> Finished<'_, Q> {
    /// `ok`, `fail`, or `n/a` for ops that compare nothing.
    pub fn verify(&self) -> &'static str {
        match (
            self.engine.params.op.compares(),
            self.engine.totals.mismatches,
        ) {
            (false, _) => "n/a",
            (true, 0) => "ok",
            (true, _) => "fail",
        }
    }

    /// No errors, no mismatches, and something was done.
    pub fn passed(&self) -> bool {
        let totals = &self.engine.totals;
        totals.errors == 0 && totals.mismatches == 0 && totals.completed > 0
    }
}

/// Runs the workload on `queues` (queue i driven by CPU i % cpus, in the ring the command line
/// chose) over `blocks` blocks, then, with `flush` and if anything was written, flushes.
pub fn execute<'a, Q: BlkQueue + Send>(
    p: &'a BlkParams,
    queues: Vec<QueueState<Q>>,
    cpus: usize,
    blocks: u64,
    flush: bool,
    timeout_ms: u64,
) -> Result<Finished<'a, Q>, Q::Error>
where
    Q::Error: Send,
{
    let template = PlanTemplate::new(p, blocks);
    let start = now_ns();
    let mut engines = engines_for(p, queues, cpus, timeout_ms);
    let (mut engine, cpu_ops) = if p.cpus.is_none() {
        let mut engine = engines.remove(0);
        ring3::run_workload_code(|| engine.drive(&template, 0, 1))?;
        let ops = engine.totals.completed;
        (engine, alloc::vec![ops])
    } else {
        drive_on_cpus(engines, p, &template, timeout_ms)?
    };
    if flush && (p.op.writes() || p.op == BlkOp::Verify) {
        ring3::run_workload_code(|| engine.flush())?;
    }
    Ok(Finished {
        engine,
        cpu_ops,
        elapsed_ns: now_ns() - start,
    })
}

/// Linux ioprio classes (class in bits 13..16): real-time for the first `hi` slots, idle for
/// the others.
fn slot_ioprio(slot: usize, hi: u32) -> u32 {
    const CLASS_RT: u32 = 1 << 13;
    const CLASS_IDLE: u32 = 3 << 13;
    if slot < hi as usize {
        CLASS_RT
    } else {
        CLASS_IDLE
    }
}

/// What the RESULT line says beyond the engine's counts.
pub struct Summary<'a> {
    /// `blk`, `nvme`: the RESULT's `workload`.
    pub workload: &'a str,
    pub queues: usize,
    pub depth: usize,
    pub interrupts: u64,
    /// Transport fields (`"key":value,...`, no leading comma) placed after `mode`.
    pub transport_fields: &'a str,
    /// Transport fields placed at the end, before `pass` (may be empty).
    pub trailing_fields: &'a str,
}

/// Prints the `RESULT {json}` line.
pub fn print_result<Q: BlkQueue>(finished: &Finished<'_, Q>, s: &Summary<'_>) {
    let engine = &finished.engine;
    let p = engine.params;
    let mut cpu_ops = String::new();
    for (cpu, ops) in finished.cpu_ops.iter().enumerate() {
        let separator = if cpu == 0 { "" } else { "," };
        let _ = core::fmt::Write::write_fmt(&mut cpu_ops, format_args!("{separator}{ops}"));
    }
    let trailing_separator = if s.trailing_fields.is_empty() {
        ""
    } else {
        ","
    };
    let mut priorities = String::new();
    if let Some(hi) = p.hi_slots {
        let _ = core::fmt::Write::write_fmt(
            &mut priorities,
            format_args!(
                "\"hi_slots\":{hi},\"lat_hi_ns\":{},\"lat_lo_ns\":{},",
                engine.hist_hi.json(),
                engine.hist_lo.json()
            ),
        );
    }
    crate::println!(
        "RESULT {{\"workload\":\"{}\",\"ring\":{},\"op\":\"{}\",\"bs\":{},\"qd\":{},\"queues\":{},\"cpus\":{},\"cpu_ops\":[{}],\"mode\":\"{}\",{},\"ops\":{},\"bytes\":{},\"elapsed_ns\":{},\"lat_ns\":{},\"notifies\":{},\"interrupts\":{},\"errors\":{},\"verify\":\"{}\",{}{}{}\"pass\":{}}}",
        s.workload, engine.ring, p.op.name(), p.bs, s.depth, s.queues, finished.cpu_ops.len(),
        cpu_ops, p.mode.name(), s.transport_fields, engine.totals.completed, engine.totals.bytes,
        finished.elapsed_ns, engine.hist.json(), engine.notifies(), s.interrupts,
        engine.totals.errors, finished.verify(), s.trailing_fields, trailing_separator,
        priorities, finished.passed()
    );
}
