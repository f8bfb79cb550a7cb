//! The per-queue request engine of virtio-blk: pops chains, validates them with
//! [`parse_request`], turns each into an [`IoOp`] on the queue's [`IoQueue`] (sluice-storage:
//! io_uring with one submit per pass, or synchronous), and answers each chain when its
//! operation completes — from `process` if it finished at once, from `complete` when the
//! ring's eventfd fires. What is left here is virtio: chains, the status byte, the used entry.
//!
//! On a shared backend (`sluice serve blk` with several disks, or a disk given `--qos`) the
//! queue also holds a sluice-qos [`QueuePort`]: each parsed operation is enqueued with the
//! scheduler and submitted only when granted (see [`super::scheduled`]).

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use sluice_dma::{DmaSpace, GuestIovecs};
use sluice_storage::{DiskImage, Extent, IoCompletion, IoEngine, IoOp, IoQueue};
use sluice_virtio::{Chain, QueueContext, QueueError, QueueHandler, QueueMetrics};
use vm_memory::{Bytes, GuestAddress, Permissions};

use super::request::{
    parse_request, DiskLimits, GuestBuffer, Rejection, Request, RequestKind, Segment, Status,
    ID_BYTES, SECTOR_SIZE,
};
use super::scheduled::Scheduled;
use super::trace::{QueueTrace, RequestLog};

/// The block device's [`QueueHandler`] for one queue.
pub struct BlockQueueHandler {
    pub(super) io: IoQueue<Answer>,
    limits: DiskLimits,
    serial: [u8; ID_BYTES],
    /// The shared scheduler's side of this queue, when the disk has one.
    pub(super) scheduled: Option<Scheduled>,
    /// The disk's request log, when it keeps one (`requests=`, [`super::trace`]).
    pub(super) trace: Option<QueueTrace>,
}

/// What the chain's answer needs once its operation is done (the I/O engine's tag).
pub(super) struct Answer {
    /// The scheduler's tag while the request goes through a shared scheduler.
    pub(super) qos_tag: Option<u64>,
    head: u16,
    status_addr: Option<GuestAddress>,
    started: Instant,
    /// Bytes the device writes into guest buffers on success (counted in the used length).
    guest_written: u32,
    /// Payload bytes on success (for metrics).
    payload_bytes: u64,
}

impl Answer {
    fn into_completion(self, status: Status) -> Completion {
        let ok = status == Status::Ok;
        Completion {
            head: self.head,
            status_addr: self.status_addr,
            status,
            guest_written: if ok { self.guest_written } else { 0 },
            payload_bytes: if ok { self.payload_bytes } else { 0 },
            started: self.started,
        }
    }
}

impl BlockQueueHandler {
    /// A handler over `image`; with `IoEngine::Auto`/`IoUring` its queue gets a ring sized for
    /// `queue_size` requests, or falls back to synchronous I/O if that fails.
    pub fn new(
        image: Arc<DiskImage>,
        limits: DiskLimits,
        serial: [u8; ID_BYTES],
        engine: IoEngine,
        queue_size: u16,
    ) -> Self {
        BlockQueueHandler {
            io: IoQueue::new(image, engine, queue_size),
            limits,
            serial,
            scheduled: None,
            trace: None,
        }
    }

    /// Logs every chain this queue (index `queue`) answers into `log`.
    pub fn with_request_log(mut self, log: Arc<RequestLog>, queue: u16) -> Self {
        self.trace = Some(QueueTrace::new(log, queue));
        self
    }

    /// Notes an answer in the request log, if there is one.
    pub(super) fn traced(&mut self, mem: &DmaSpace, answered: Answered) {
        if let Some(trace) = self.trace.as_mut() {
            trace.answered(mem, answered.head, answered.used_len, answered.status_addr);
        }
    }

    /// Puts this queue behind a shared scheduler (sluice-qos) through `port`.
    pub fn with_scheduler(mut self, port: sluice_qos::QueuePort) -> io::Result<Self> {
        self.scheduled = Some(Scheduled::new(port, self.io.completion_fd())?);
        Ok(self)
    }

    /// Whether this queue runs on io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.io.uses_io_uring()
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.io.in_flight()
    }

    /// Answers one chain now, or leaves it to its operation's completion (`false`).
    fn handle_chain(
        &mut self,
        ctx: &mut QueueContext<'_>,
        chain: Chain<'_>,
    ) -> Result<bool, QueueError> {
        let started = Instant::now();
        let head = chain.head_index();
        if let Some(trace) = self.trace.as_mut() {
            trace.taken(ctx.mem, &chain);
        }
        match parse_request(ctx.mem, &chain, &self.limits) {
            Err(rejection) => {
                let answered = reject(ctx, head, rejection, started)?;
                self.traced(ctx.mem, answered);
                Ok(true)
            }
            Ok(request) => self.start(ctx, head, request, started),
        }
    }

    fn start(
        &mut self,
        ctx: &mut QueueContext<'_>,
        head: u16,
        request: Request,
        started: Instant,
    ) -> Result<bool, QueueError> {
        let ioprio = request.ioprio;
        let mut answer = Answer {
            qos_tag: None,
            head,
            status_addr: Some(request.status_addr),
            started,
            guest_written: 0,
            payload_bytes: 0,
        };
        let op = match request.kind {
            RequestKind::GetId { buffers, .. } => {
                answer.guest_written = write_serial(ctx.mem, &buffers, &self.serial);
                let answered = answer.into_completion(Status::Ok).finish(ctx)?;
                self.traced(ctx.mem, answered);
                return Ok(true);
            }
            RequestKind::Read {
                sector, buffers, ..
            } => transfer_op(ctx.mem, false, sector, &buffers),
            RequestKind::Write {
                sector, buffers, ..
            } => transfer_op(ctx.mem, true, sector, &buffers),
            RequestKind::Flush => Some(IoOp::Flush),
            RequestKind::Discard(segments) => Some(IoOp::Discard(extents(&segments))),
            RequestKind::WriteZeroes(segments) => Some(IoOp::WriteZeroes(extents(&segments))),
        };
        let Some(op) = op else {
            // A data buffer stopped resolving between parsing and mapping (IOMMU change).
            let answered = answer.into_completion(Status::IoErr).finish(ctx)?;
            self.traced(ctx.mem, answered);
            return Ok(true);
        };
        answer.payload_bytes = op.data_len() as u64;
        if matches!(op, IoOp::Read { .. }) {
            answer.guest_written = u32::try_from(op.data_len()).unwrap_or(u32::MAX);
        }
        let (answer, op) = match &mut self.scheduled {
            Some(scheduled) => match scheduled.hold(answer, op, ioprio) {
                None => return Ok(false),
                // Refused (another queue of this guest filled its bound first): it goes
                // unscheduled rather than being dropped.
                Some(refused) => refused,
            },
            None => (answer, op),
        };
        match self.io.submit(answer, op) {
            Some(done) => {
                let answered = finish_io(ctx, done)?;
                self.traced(ctx.mem, answered);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

fn reject(
    ctx: &mut QueueContext<'_>,
    head: u16,
    rejection: Rejection,
    started: Instant,
) -> Result<Answered, QueueError> {
    tracing::debug!("virtio-blk: refused request: {}", rejection.error);
    let completion = Completion {
        head,
        status_addr: rejection.status_addr,
        status: rejection.error.status(),
        guest_written: 0,
        payload_bytes: 0,
        started,
    };
    completion.finish(ctx)
}

/// Answers the chain of a completed operation.
pub(super) fn finish_io(
    ctx: &mut QueueContext<'_>,
    done: IoCompletion<Answer>,
) -> Result<Answered, QueueError> {
    done.tag
        .into_completion(status_of(&done.result))
        .finish(ctx)
}

impl QueueHandler for BlockQueueHandler {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let mem: &DmaSpace = ctx.mem;
            let (chains, bound) = match &self.scheduled {
                None => (ctx.queue.pop_all(mem)?, None),
                Some(scheduled) => scheduled.pop_within_bound(ctx.queue, mem)?,
            };
            let popped = chains.len();
            for chain in chains {
                match self.handle_chain(ctx, chain) {
                    Ok(answered) => used |= answered,
                    Err(e) => {
                        self.io.commit();
                        return Err(e);
                    }
                }
            }
            self.io.commit();
            let Some(bound) = bound else {
                return Ok(used);
            };
            used |= self.submit_granted(ctx, &[])?;
            // Stopped at the bound with room again (requests finished within the pass): the
            // chains left in the ring get no new kick, so look again. Without room, a request
            // of this queue is held, and its grant or completion calls `complete`, which
            // comes back here.
            let room_again = self.scheduled.as_ref().is_some_and(|s| s.room() > 0);
            if popped < bound || !room_again {
                return Ok(used);
            }
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        match &self.scheduled {
            Some(scheduled) => Some(scheduled.wait_fd()),
            None => self.io.completion_fd(),
        }
    }

    fn has_in_flight(&self) -> bool {
        self.in_flight() > 0
    }

    fn in_flight(&self) -> usize {
        self.io.in_flight() + self.scheduled.as_ref().map_or(0, Scheduled::held)
    }

    fn completion_ready(&mut self) -> bool {
        self.io.has_completions() || self.scheduled.as_ref().is_some_and(Scheduled::has_grants)
    }

    fn wants_polling(&self) -> bool {
        self.scheduled.as_ref().is_some_and(Scheduled::polled)
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let mut used = false;
        let mut finished = Vec::new();
        for done in self.io.reap() {
            finished.extend(done.tag.qos_tag);
            let answered = finish_io(ctx, done)?;
            self.traced(ctx.mem, answered);
            used = true;
        }
        if let Some(scheduled) = &self.scheduled {
            scheduled.clear_wake();
            used |= self.submit_granted(ctx, &finished)?;
            // Chains left in the ring while the guest's bound was reached get no new kick.
            used |= self.process(ctx)?;
        }
        Ok(used)
    }
}

/// The final answer for one chain.
struct Completion {
    head: u16,
    status_addr: Option<GuestAddress>,
    status: Status,
    guest_written: u32,
    payload_bytes: u64,
    started: Instant,
}

/// What a chain was answered with (for the request log).
#[derive(Debug, Clone, Copy)]
pub(super) struct Answered {
    pub(super) head: u16,
    pub(super) used_len: u32,
    pub(super) status_addr: Option<GuestAddress>,
}

impl Completion {
    /// Writes the status byte, adds the used entry, updates the metrics.
    fn finish(self, ctx: &mut QueueContext<'_>) -> Result<Answered, QueueError> {
        let status_written = self
            .status_addr
            .is_some_and(|addr| ctx.mem.write_slice(&[self.status.as_byte()], addr).is_ok());
        let used_len = if status_written {
            self.guest_written.saturating_add(1)
        } else {
            0
        };
        ctx.queue.add_used(ctx.mem, self.head, used_len)?;
        record(ctx.metrics, &self, status_written);
        Ok(Answered {
            head: self.head,
            used_len,
            status_addr: self.status_addr,
        })
    }
}

fn record(metrics: &QueueMetrics, completion: &Completion, status_written: bool) {
    let ok = completion.status == Status::Ok && status_written;
    metrics.record_request(
        completion.started,
        ok.then_some(completion.payload_bytes).ok_or(()),
    );
}

fn transfer_op(mem: &DmaSpace, write: bool, sector: u64, buffers: &[GuestBuffer]) -> Option<IoOp> {
    // The device writes guest memory on a read from the disk, and reads it on a write.
    let access = if write {
        Permissions::Read
    } else {
        Permissions::Write
    };
    let pieces = buffers.iter().map(|b| (b.addr, b.len as usize));
    let buffers = GuestIovecs::resolve(mem, pieces, access).ok()?;
    // The parser checked sector * 512 + len against the capacity.
    let offset = sector * SECTOR_SIZE;
    Some(if write {
        IoOp::Write { offset, buffers }
    } else {
        IoOp::Read { offset, buffers }
    })
}

fn extents(segments: &[Segment]) -> Vec<Extent> {
    segments
        .iter()
        .map(|s| Extent {
            offset: s.offset(),
            len: s.len(),
            may_unmap: s.unmap,
        })
        .collect()
}

/// Writes the serial (NUL padded, at most 20 bytes) into the GET_ID buffers; returns the bytes
/// written.
fn write_serial(mem: &DmaSpace, buffers: &[GuestBuffer], serial: &[u8; ID_BYTES]) -> u32 {
    let mut written = 0usize;
    for buffer in buffers {
        let Some(rest) = serial.get(written..).filter(|r| !r.is_empty()) else {
            break;
        };
        let chunk = &rest[..rest.len().min(buffer.len as usize)];
        if mem.write_slice(chunk, buffer.addr).is_err() {
            break;
        }
        written += chunk.len();
    }
    written as u32
}

fn status_of(result: &io::Result<()>) -> Status {
    match result {
        Ok(()) => Status::Ok,
        Err(e) => {
            tracing::warn!("virtio-blk: I/O error: {e}");
            Status::IoErr
        }
    }
}
