//! virtio-blk (§5.2): multiqueue, each queue a [`BlkQueue`] for the shared block workload
//! (workloads/blk.rs: plan, pattern, qd, histogram, RESULT line). Requests are three
//! descriptors: header (device reads), data, status byte (device writes).

use super::pci::{self as vpci, VirtioError, VirtioPci};
use super::queue::{Queue, Segment, MAX_QUEUE_SIZE};
use super::report_error;
use crate::cmdline::{BlkOp, BlkParams, Mode};
use crate::mem;
use crate::workloads::blk::{self as workload, BlkQueue, Completion, QueueState, Summary};
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

/// One virtqueue with a header page per slot (the 16-byte header, the status byte at 16).
struct VirtioBlkQueue<'a> {
    device: &'a VirtioPci,
    queue: Queue,
    headers: Vec<u64>,
    /// Per slot: the ioprio its requests carry in the header.
    ioprio: Vec<u32>,
    /// head descriptor id -> slot
    by_head: Vec<Option<usize>>,
}

fn write_header(header: u64, kind: u32, ioprio: u32, sector: u64) {
    // SAFETY: the header page belongs to one slot and is not in flight while we write.
    unsafe {
        core::ptr::write_volatile(header as *mut u32, kind);
        core::ptr::write_volatile((header + 4) as *mut u32, ioprio);
        core::ptr::write_volatile((header + 8) as *mut u64, sector);
        core::ptr::write_volatile((header + 16) as *mut u8, STATUS_UNSET);
    }
}

fn read_status(header: u64) -> u8 {
    // SAFETY: the status byte lives in this slot's header page.
    unsafe { core::ptr::read_volatile((header + 16) as *const u8) }
}

impl VirtioBlkQueue<'_> {
    fn add(&mut self, slot: usize, segments: &[Segment]) -> Result<(), VirtioError> {
        let head = self.queue.add(segments).ok_or(VirtioError::NoMemory)?;
        self.by_head[usize::from(head)] = Some(slot);
        Ok(())
    }
}

impl BlkQueue for VirtioBlkQueue<'_> {
    type Error = VirtioError;

    fn submit(
        &mut self,
        slot: usize,
        data: u64,
        offset: u64,
        len: u32,
        write: bool,
    ) -> Result<(), VirtioError> {
        let header = self.headers[slot];
        let kind = if write { T_OUT } else { T_IN };
        write_header(header, kind, self.ioprio[slot], offset / SECTOR);
        let segments = [
            Segment {
                addr: header,
                len: 16,
                device_writes: false,
            },
            Segment {
                addr: data,
                len,
                device_writes: !write,
            },
            Segment {
                addr: header + 16,
                len: 1,
                device_writes: true,
            },
        ];
        self.add(slot, &segments)
    }

    fn submit_flush(&mut self, slot: usize) -> Result<(), VirtioError> {
        let header = self.headers[slot];
        write_header(header, T_FLUSH, self.ioprio[slot], 0);
        let segments = [
            Segment {
                addr: header,
                len: 16,
                device_writes: false,
            },
            Segment {
                addr: header + 16,
                len: 1,
                device_writes: true,
            },
        ];
        self.add(slot, &segments)
    }

    fn set_ioprio(&mut self, slot: usize, ioprio: u32) {
        if let Some(entry) = self.ioprio.get_mut(slot) {
            *entry = ioprio;
        }
    }

    fn publish(&mut self) {
        self.queue.kick();
    }

    fn pop_completion(&mut self) -> Result<Option<Completion>, VirtioError> {
        let popped = self
            .queue
            .pop_used()
            .map_err(|bad| VirtioError::BadUsed(bad.id))?;
        let Some((head, _len)) = popped else {
            return Ok(None);
        };
        let slot = self
            .by_head
            .get_mut(usize::from(head))
            .and_then(Option::take)
            .ok_or(VirtioError::BadUsed(u32::from(head)))?;
        let ok = read_status(self.headers[slot]) == 0;
        Ok(Some(Completion { slot, ok }))
    }

    fn has_completion(&self) -> bool {
        self.queue.has_used()
    }

    fn notifies(&self) -> u64 {
        self.queue.notifies
    }

    fn stalled(&self, what: &'static str) -> VirtioError {
        if self.device.needs_reset() {
            VirtioError::NeedsReset
        } else {
            VirtioError::Timeout(what)
        }
    }

    fn bad_completion(&self, slot: usize) -> VirtioError {
        VirtioError::BadUsed(slot as u32)
    }
}

/// Sets up `count` virtqueues; queue i's interrupts go to the CPU with APIC id `driver_of(i)`.
fn setup_queues(
    device: &mut VirtioPci,
    p: &BlkParams,
    count: u16,
    driver_of: impl Fn(u16) -> u32,
) -> Result<Vec<(Queue, Vec<u64>, usize)>, VirtioError> {
    let interrupts = p.mode != Mode::Poll;
    if workload::slot_memory(p, u64::from(count), mem::PAGE_SIZE) > mem::free_bytes() / 2 {
        return Err(VirtioError::NoMemory);
    }
    (0..count)
        .map(|index| {
            let queue =
                device.setup_queue_for_cpu(index, ring_for(p.qd), interrupts, driver_of(index))?;
            let depth = (p.qd as usize).min(usize::from(queue.size()) / 3).max(1);
            let headers = (0..depth)
                .map(|_| mem::alloc_dma(mem::PAGE_SIZE))
                .collect::<Option<Vec<u64>>>()
                .ok_or(VirtioError::NoMemory)?;
            Ok((queue, headers, depth))
        })
        .collect()
}

/// The ring size asked for: room for `qd` requests of 3 descriptors (header, data, status),
/// at least 256 entries (what smaller depths always used), at most the kit's largest ring; a device
/// offering less (QEMU's and Firecracker's 256) caps the depth at size / 3.
fn ring_for(qd: u32) -> u16 {
    let needed = (qd.saturating_mul(3)).next_power_of_two();
    needed.clamp(256, u32::from(MAX_QUEUE_SIZE)) as u16
}

/// The virtqueues wrapped for the workload engine (after DRIVER_OK: they borrow the device).
fn wrap_queues<'a>(
    device: &'a VirtioPci,
    p: &BlkParams,
    raw: Vec<(Queue, Vec<u64>, usize)>,
) -> Result<Vec<QueueState<VirtioBlkQueue<'a>>>, VirtioError> {
    raw.into_iter()
        .map(|(queue, headers, depth)| {
            let by_head = alloc::vec![None; usize::from(queue.size())];
            let wrapped = VirtioBlkQueue {
                device,
                queue,
                ioprio: alloc::vec![0; headers.len()],
                headers,
                by_head,
            };
            QueueState::new(wrapped, depth, p).ok_or(VirtioError::NoMemory)
        })
        .collect()
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

fn run(p: &BlkParams, timeout_ms: u64) -> Result<Outcome, VirtioError> {
    let Some(cpus) = workload::start_cpus("blk", p, timeout_ms) else {
        return Ok(Outcome::Fail);
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
        .unwrap_or(workload::DEFAULT_SPAN)
        .min(capacity);
    let blocks = span / u64::from(p.bs);
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
    let raw = setup_queues(&mut device, p, count, |index| match p.cpus {
        Some(_) => crate::smp::apic_id_of(usize::from(index) % cpus),
        None => this_cpu,
    })?;
    device.driver_ok()?;
    let queues = wrap_queues(&device, p, raw)?;
    let depth = queues[0].depth();
    let interrupts_before = device.interrupt_count();
    let finished = workload::execute(p, queues, cpus, blocks, device.has(F_FLUSH), timeout_ms)?;
    let transport_fields = alloc::format!(
        "\"vq\":\"{}\",\"event_idx\":{}",
        device.layout().name(),
        device.has(vpci::F_EVENT_IDX)
    );
    workload::print_result(
        &finished,
        &Summary {
            workload: "blk",
            queues: usize::from(count),
            depth,
            interrupts: device.interrupt_count() - interrupts_before,
            transport_fields: &transport_fields,
            trailing_fields: "",
        },
    );
    Ok(if finished.passed() {
        Outcome::Pass
    } else {
        Outcome::Fail
    })
}

/// The `blk` workload.
pub fn run_workload(p: &BlkParams, timeout_ms: u64) -> Outcome {
    run(p, timeout_ms).unwrap_or_else(|error| report_error("blk", &error))
}
