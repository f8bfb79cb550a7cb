//! The per-queue request engine: pops chains, validates them with [`parse_request`], and runs
//! them either through an io_uring ring (batched: every SQE of a pass goes in with one submit;
//! `complete` reaps CQEs when the ring's eventfd fires) or synchronously (the fallback when
//! io_uring cannot be set up, and the slow path for requests io_uring cannot take whole).
//!
//! In-flight requests hold host pointers into guest RAM. They stay valid because the handler
//! keeps a clone of the guest memory regions (`memory_pin`) while anything is in flight, and
//! dropping the handler waits for the ring to drain first.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, squeue, types};
use sluice_dma::DmaSpace;
use sluice_virtio::{QueueContext, QueueError, QueueHandler, QueueMetrics};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

use super::backend::{
    self, discard_result, write_zeroes_mode, Direction, DiskImage, HostIovecs, Uring, DISCARD_MODE,
    MAX_IOVECS,
};
use super::request::{
    parse_request, DiskLimits, GuestBuffer, Rejection, Request, RequestKind, Segment, Status,
    ID_BYTES, SECTOR_SIZE,
};

/// Which I/O path a queue uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring if it can be set up, else synchronous.
    Auto,
    IoUring,
    Sync,
}

/// The block device's [`QueueHandler`] for one queue.
pub struct BlockQueueHandler {
    image: Arc<DiskImage>,
    limits: DiskLimits,
    serial: [u8; ID_BYTES],
    uring: Option<Uring>,
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    sqes_in_flight: usize,
    memory_pin: Option<GuestMemoryMmap>,
}

/// A request submitted to io_uring and not yet completed.
struct InFlight {
    head: u16,
    status_addr: Option<GuestAddress>,
    started: Instant,
    op: Op,
    /// SQEs whose CQE has not arrived.
    pending: u32,
    failed: bool,
}

/// Host work of one request.
enum Op {
    Transfer {
        direction: Direction,
        iov: HostIovecs,
        offset: u64,
    },
    Flush,
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
}

impl Op {
    fn sqe_count(&self) -> usize {
        match self {
            Op::Transfer { .. } | Op::Flush => 1,
            Op::Discard(segments) | Op::WriteZeroes(segments) => {
                segments.iter().filter(|s| !s.is_empty()).count()
            }
        }
    }

    /// Bytes written into guest buffers (counted in the used length).
    fn guest_written(&self) -> u32 {
        match self {
            Op::Transfer {
                direction: Direction::Read,
                iov,
                ..
            } => u32::try_from(iov.len()).unwrap_or(u32::MAX),
            _ => 0,
        }
    }

    /// Payload bytes moved (for metrics).
    fn payload_bytes(&self) -> u64 {
        match self {
            Op::Transfer { iov, .. } => iov.len() as u64,
            _ => 0,
        }
    }
}

/// How a popped request went.
enum Started {
    /// Finished (synchronously or refused): a used entry was added.
    Completed,
    /// Its SQEs are queued in the ring.
    Submitted,
}

/// Free submission queue slots.
fn sq_room(uring: &mut Uring) -> usize {
    let sq = uring.ring.submission();
    sq.capacity() - sq.len()
}

/// `user_data` of an SQE: the slot in the low 32 bits, the segment index above.
fn user_data(slot: usize, segment: usize) -> u64 {
    (slot as u64 & 0xffff_ffff) | ((segment as u64) << 32)
}

impl BlockQueueHandler {
    /// A handler over `image`; with `IoEngine::Auto`/`IoUring` it sets up a ring sized for
    /// `queue_size` requests, and falls back to synchronous I/O if that fails.
    pub fn new(
        image: Arc<DiskImage>,
        limits: DiskLimits,
        serial: [u8; ID_BYTES],
        engine: IoEngine,
        queue_size: u16,
    ) -> Self {
        let uring = match engine {
            IoEngine::Sync => None,
            IoEngine::Auto | IoEngine::IoUring => match Uring::new(u32::from(queue_size)) {
                Ok(uring) => Some(uring),
                Err(e) => {
                    tracing::warn!(
                        "virtio-blk {}: io_uring setup failed ({e}), using synchronous I/O",
                        image.path().display()
                    );
                    None
                }
            },
        };
        BlockQueueHandler {
            image,
            limits,
            serial,
            uring,
            slots: Vec::new(),
            free_slots: Vec::new(),
            sqes_in_flight: 0,
            memory_pin: None,
        }
    }

    /// Whether this queue runs on io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.uring.is_some()
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    fn handle_chain(
        &mut self,
        ctx: &mut QueueContext<'_>,
        chain: DescriptorChain<&DmaSpace>,
    ) -> Result<Started, QueueError> {
        let started = Instant::now();
        let head = chain.head_index();
        match parse_request(ctx.mem, chain, &self.limits) {
            Err(rejection) => {
                self.reject(ctx, head, rejection, started)?;
                Ok(Started::Completed)
            }
            Ok(request) => self.start(ctx, head, request, started),
        }
    }

    fn reject(
        &mut self,
        ctx: &mut QueueContext<'_>,
        head: u16,
        rejection: Rejection,
        started: Instant,
    ) -> Result<(), QueueError> {
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

    fn start(
        &mut self,
        ctx: &mut QueueContext<'_>,
        head: u16,
        request: Request,
        started: Instant,
    ) -> Result<Started, QueueError> {
        let mut completion = Completion {
            head,
            status_addr: Some(request.status_addr),
            status: Status::IoErr,
            guest_written: 0,
            payload_bytes: 0,
            started,
        };
        let op = match request.kind {
            RequestKind::GetId { buffers, .. } => {
                completion.guest_written = write_serial(ctx.mem, &buffers, &self.serial);
                completion.status = Status::Ok;
                completion.finish(ctx)?;
                return Ok(Started::Completed);
            }
            RequestKind::Read {
                sector, buffers, ..
            } => transfer_op(ctx.mem, Direction::Read, sector, &buffers),
            RequestKind::Write {
                sector, buffers, ..
            } => transfer_op(ctx.mem, Direction::Write, sector, &buffers),
            RequestKind::Flush => Some(Op::Flush),
            RequestKind::Discard(segments) => Some(Op::Discard(segments)),
            RequestKind::WriteZeroes(segments) => Some(Op::WriteZeroes(segments)),
        };
        let Some(op) = op else {
            // A data buffer stopped resolving between parsing and mapping (IOMMU change).
            completion.finish(ctx)?;
            return Ok(Started::Completed);
        };
        if self.can_submit(&op) {
            self.submit(ctx, head, completion, op);
            return Ok(Started::Submitted);
        }
        let result = run_sync(&self.image, &op);
        completion.status = status_of(&result);
        if result.is_ok() {
            completion.guest_written = op.guest_written();
            completion.payload_bytes = op.payload_bytes();
        }
        completion.finish(ctx)?;
        Ok(Started::Completed)
    }

    /// Whether `op` can go to the ring as is: iovec count within the kernel's limit,
    /// O_DIRECT-compatible buffers, room for its CQEs and (after submitting what is queued)
    /// for its SQEs. Anything else runs synchronously.
    fn can_submit(&mut self, op: &Op) -> bool {
        let direct = self.image.is_direct();
        let Some(uring) = self.uring.as_mut() else {
            return false;
        };
        let ring_friendly = match op {
            Op::Transfer { iov, .. } => {
                iov.as_slice().len() <= MAX_IOVECS
                    && (!direct || iov.is_aligned(SECTOR_SIZE as usize))
            }
            _ => true,
        };
        let needed = op.sqe_count();
        if !ring_friendly || self.sqes_in_flight + needed > uring.max_in_flight() {
            return false;
        }
        if sq_room(uring) < needed {
            if let Err(e) = uring.ring.submit() {
                tracing::warn!("virtio-blk: io_uring submit failed: {e}");
            }
        }
        sq_room(uring) >= needed
    }

    fn submit(&mut self, ctx: &QueueContext<'_>, head: u16, completion: Completion, op: Op) {
        if self.memory_pin.is_none() {
            self.memory_pin = Some(ctx.mem.get_backend().clone());
        }
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let entries = self.entries_for(slot, &op);
        let in_flight = InFlight {
            head,
            status_addr: completion.status_addr,
            started: completion.started,
            pending: entries.len() as u32,
            failed: false,
            op,
        };
        self.sqes_in_flight += entries.len();
        // The slot owns the iovecs the SQEs point at; it is only emptied after the last CQE.
        self.slots[slot] = Some(in_flight);
        for entry in entries {
            self.push(entry);
        }
    }

    fn entries_for(&self, slot: usize, op: &Op) -> Vec<squeue::Entry> {
        let fd = types::Fd(self.image.fd());
        match op {
            Op::Transfer {
                direction,
                iov,
                offset,
            } => {
                let iovecs = iov.as_slice();
                // <= MAX_IOVECS, checked by can_submit.
                let count = iovecs.len() as u32;
                let entry = match direction {
                    Direction::Read => opcode::Readv::new(fd, iovecs.as_ptr(), count)
                        .offset(*offset)
                        .build(),
                    Direction::Write => opcode::Writev::new(fd, iovecs.as_ptr(), count)
                        .offset(*offset)
                        .build(),
                };
                vec![entry.user_data(user_data(slot, 0))]
            }
            Op::Flush => vec![opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(user_data(slot, 0))],
            Op::Discard(segments) | Op::WriteZeroes(segments) => segments
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .map(|(i, s)| {
                    let mode = match op {
                        Op::Discard(_) => DISCARD_MODE,
                        _ => write_zeroes_mode(s),
                    };
                    opcode::Fallocate::new(fd, s.len())
                        .offset(s.offset())
                        .mode(mode)
                        .build()
                        .user_data(user_data(slot, i))
                })
                .collect(),
        }
    }

    /// Queues one SQE; `can_submit` made room for all of a request's entries.
    fn push(&mut self, entry: squeue::Entry) {
        let Some(uring) = self.uring.as_mut() else {
            return;
        };
        // SAFETY: the entry's iovecs (if any) live in `self.slots` until its CQE is reaped,
        // and the guest memory they point into is pinned by `memory_pin`.
        let pushed = unsafe { uring.ring.submission().push(&entry) };
        debug_assert!(pushed.is_ok(), "can_submit reserved submission queue room");
    }

    fn submit_queued(&mut self) {
        if let Some(uring) = self.uring.as_mut() {
            if !uring.ring.submission().is_empty() {
                if let Err(e) = uring.ring.submit() {
                    tracing::warn!("virtio-blk: io_uring submit failed: {e}");
                }
            }
        }
    }

    /// Applies one CQE; returns the slot if its request is now complete.
    fn on_cqe(&mut self, data: u64, result: i32) -> Option<usize> {
        let slot = (data & 0xffff_ffff) as usize;
        let segment = (data >> 32) as usize;
        self.sqes_in_flight = self.sqes_in_flight.saturating_sub(1);
        let image = Arc::clone(&self.image);
        let in_flight = self.slots.get_mut(slot)?.as_mut()?;
        let outcome = cqe_outcome(&image, &in_flight.op, segment, result);
        if let Err(e) = outcome {
            tracing::warn!("virtio-blk {}: I/O error: {e}", image.path().display());
            in_flight.failed = true;
        }
        in_flight.pending = in_flight.pending.saturating_sub(1);
        (in_flight.pending == 0).then_some(slot)
    }

    fn retire(&mut self, ctx: &mut QueueContext<'_>, slot: usize) -> Result<(), QueueError> {
        let Some(in_flight) = self.slots.get_mut(slot).and_then(Option::take) else {
            return Ok(());
        };
        self.free_slots.push(slot);
        let ok = !in_flight.failed;
        let completion = Completion {
            head: in_flight.head,
            status_addr: in_flight.status_addr,
            status: if ok { Status::Ok } else { Status::IoErr },
            guest_written: if ok { in_flight.op.guest_written() } else { 0 },
            payload_bytes: if ok { in_flight.op.payload_bytes() } else { 0 },
            started: in_flight.started,
        };
        completion.finish(ctx)
    }

    /// Waits for every in-flight SQE (used when the handler goes away).
    fn drain(&mut self) {
        while self.sqes_in_flight > 0 {
            let Some(uring) = self.uring.as_mut() else {
                return;
            };
            if uring.ring.submit_and_wait(1).is_err() {
                return;
            }
            let reaped = uring.ring.completion().count();
            self.sqes_in_flight = self.sqes_in_flight.saturating_sub(reaped);
        }
    }
}

impl Drop for BlockQueueHandler {
    fn drop(&mut self) {
        // The kernel may still be writing into guest memory; wait before the pin goes away.
        self.drain();
    }
}

impl QueueHandler for BlockQueueHandler {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let mem: &DmaSpace = ctx.mem;
        let chains: Vec<DescriptorChain<&DmaSpace>> = ctx.queue.iter(mem)?.collect();
        let mut used = false;
        for chain in chains {
            match self.handle_chain(ctx, chain) {
                Ok(Started::Completed) => used = true,
                Ok(Started::Submitted) => {}
                Err(e) => {
                    self.submit_queued();
                    return Err(e);
                }
            }
        }
        self.submit_queued();
        Ok(used)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.uring.as_ref().map(Uring::eventfd)
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let Some(uring) = self.uring.as_mut() else {
            return Ok(false);
        };
        uring.clear_eventfd();
        let cqes: Vec<(u64, i32)> = uring
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        let mut used = false;
        for (data, result) in cqes {
            if let Some(slot) = self.on_cqe(data, result) {
                self.retire(ctx, slot)?;
                used = true;
            }
        }
        if self.in_flight() == 0 {
            self.memory_pin = None;
        }
        // SQEs left queued by a failed submit get another chance.
        self.submit_queued();
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

impl Completion {
    /// Writes the status byte, adds the used entry, updates the metrics.
    fn finish(self, ctx: &mut QueueContext<'_>) -> Result<(), QueueError> {
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
        Ok(())
    }
}

fn record(metrics: &QueueMetrics, completion: &Completion, status_written: bool) {
    let ok = completion.status == Status::Ok && status_written;
    metrics.record_request(
        completion.started,
        ok.then_some(completion.payload_bytes).ok_or(()),
    );
}

fn transfer_op(
    mem: &DmaSpace,
    direction: Direction,
    sector: u64,
    buffers: &[GuestBuffer],
) -> Option<Op> {
    // The device writes guest memory on a read from the disk, and reads it on a write.
    let access = match direction {
        Direction::Read => Permissions::Write,
        Direction::Write => Permissions::Read,
    };
    let iov = HostIovecs::resolve(mem, buffers, access)?;
    Some(Op::Transfer {
        direction,
        iov,
        // The parser checked sector * 512 + len against the capacity.
        offset: sector * SECTOR_SIZE,
    })
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

fn run_sync(image: &DiskImage, op: &Op) -> io::Result<()> {
    match op {
        Op::Transfer {
            direction,
            iov,
            offset,
        } => backend::transfer_rest(image, *direction, iov, *offset, 0),
        Op::Flush => backend::flush(image),
        Op::Discard(segments) => segments.iter().try_for_each(|s| backend::discard(image, s)),
        Op::WriteZeroes(segments) => segments
            .iter()
            .try_for_each(|s| backend::write_zeroes(image, s)),
    }
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

/// Interprets one CQE, finishing short transfers and unsupported fallocate modes synchronously.
fn cqe_outcome(image: &DiskImage, op: &Op, segment: usize, result: i32) -> io::Result<()> {
    let error = (result < 0).then(|| io::Error::from_raw_os_error(-result));
    match (op, error) {
        (
            Op::Transfer {
                direction,
                iov,
                offset,
            },
            None,
        ) => {
            let done = result as usize;
            if done >= iov.len() {
                Ok(())
            } else {
                backend::transfer_rest(image, *direction, iov, *offset, done)
            }
        }
        (
            Op::Transfer {
                direction,
                iov,
                offset,
            },
            Some(e),
        ) if image.is_direct() && e.raw_os_error() == Some(libc::EINVAL) => {
            // The host device wants a stricter alignment than the guest buffers have.
            backend::transfer_rest(image, *direction, iov, *offset, 0)
        }
        (Op::Discard(_), Some(e)) => discard_result(Err(e)),
        (Op::WriteZeroes(segments), Some(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            match segments.get(segment) {
                Some(s) => backend::write_zero_blocks(image, s),
                None => Err(e),
            }
        }
        (_, Some(e)) => Err(e),
        (_, None) => Ok(()),
    }
}
