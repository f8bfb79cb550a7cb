//! NVM command set I/O: the command parser (Read, Write, Flush, Write Zeroes, Dataset
//! Management) and the worker thread that serves one I/O submission queue.
//!
//! The parser is a pure function of the command, the namespace and the guest memory, so the
//! fuzz target and the tests call it directly; the worker fetches commands, hands the parsed
//! operations to its queue's `IoQueue` (sluice-storage, io_uring) and posts the completions.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use sluice_dma::{DmaSpace, GuestIovecs};
use sluice_storage::{Extent, IoCompletion, IoOp, IoQueue};
use sluice_virtio::QueueMetrics;
use vm_memory::{Bytes, GuestAddress, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::command::{Command, Completion, Status, SQE_SIZE};
use super::prp::{data_segments, WalkLimits};
use super::queues::{CompletionQueue, PostError};
use super::trace::PendingCommand;
use super::Shared;

pub const OPC_FLUSH: u8 = 0x00;
pub const OPC_WRITE: u8 = 0x01;
pub const OPC_READ: u8 = 0x02;
pub const OPC_WRITE_ZEROES: u8 = 0x08;
pub const OPC_DATASET_MANAGEMENT: u8 = 0x09;

/// NSID that addresses every namespace (Flush may use it: VWC bits 2:1 say so).
pub const NSID_BROADCAST: u32 = 0xffff_ffff;
/// The one namespace.
pub const NSID: u32 = 1;
/// Ranges one Dataset Management command may carry (NR is 0-based, 8 bits).
const DSM_RANGE_SIZE: usize = 16;
const DSM_ATTRIBUTE_DEALLOCATE: u32 = 1 << 2;
const RW_FUA: u32 = 1 << 30;
const WRITE_ZEROES_DEAC: u32 = 1 << 25;

/// The namespace's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    /// Blocks (NSZE).
    pub blocks: u64,
    /// log2 of the block size (LBADS).
    pub block_shift: u32,
}

impl Namespace {
    pub fn block_size(&self) -> u64 {
        1 << self.block_shift
    }

    /// Byte range of `count` blocks from `slba`, if inside the namespace.
    fn range(&self, slba: u64, count: u64) -> Result<(u64, u64), Status> {
        let end = slba.checked_add(count).ok_or(Status::LBA_OUT_OF_RANGE)?;
        if end > self.blocks {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        Ok((slba << self.block_shift, count << self.block_shift))
    }
}

/// What a parsed I/O command counts as in the metrics and the SMART log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Other,
}

/// A parsed NVM command, ready for the `IoQueue`.
#[derive(Debug)]
pub struct IoRequest {
    pub op: IoOp,
    pub kind: IoKind,
    /// Flush after the operation before completing (FUA, or the write cache is off).
    pub flush_after: bool,
}

/// Parses one NVM command. `write_cache` is the Volatile Write Cache feature: off, every
/// write is made durable before it completes.
pub fn parse_io_command(
    mem: &DmaSpace,
    cmd: &Command,
    ns: &Namespace,
    limits: &WalkLimits,
    write_cache: bool,
) -> Result<IoRequest, Status> {
    if cmd.fuse() != 0 {
        return Err(Status::INVALID_FIELD);
    }
    let opcode = cmd.opcode();
    let nsid_ok = cmd.nsid() == NSID || (opcode == OPC_FLUSH && cmd.nsid() == NSID_BROADCAST);
    if !nsid_ok
        && matches!(
            opcode,
            OPC_FLUSH | OPC_WRITE | OPC_READ | OPC_WRITE_ZEROES | OPC_DATASET_MANAGEMENT
        )
    {
        return Err(Status::INVALID_NAMESPACE);
    }
    match opcode {
        OPC_FLUSH => Ok(IoRequest {
            op: IoOp::Flush,
            kind: IoKind::Other,
            flush_after: false,
        }),
        OPC_READ | OPC_WRITE => parse_read_write(mem, cmd, ns, limits, write_cache),
        OPC_WRITE_ZEROES => {
            let (offset, len) = ns.range(cmd.cdw10_11(), u64::from(cmd.cdw(12) & 0xffff) + 1)?;
            let extent = Extent {
                offset,
                len,
                may_unmap: cmd.cdw(12) & WRITE_ZEROES_DEAC != 0,
            };
            Ok(IoRequest {
                op: IoOp::WriteZeroes(vec![extent]),
                kind: IoKind::Other,
                flush_after: cmd.cdw(12) & RW_FUA != 0 || !write_cache,
            })
        }
        OPC_DATASET_MANAGEMENT => parse_dataset_management(mem, cmd, ns, limits),
        _ => Err(Status::INVALID_OPCODE),
    }
}

fn parse_read_write(
    mem: &DmaSpace,
    cmd: &Command,
    ns: &Namespace,
    limits: &WalkLimits,
    write_cache: bool,
) -> Result<IoRequest, Status> {
    let blocks = u64::from(cmd.cdw(12) & 0xffff) + 1;
    let (offset, len) = ns.range(cmd.cdw10_11(), blocks)?;
    let len = usize::try_from(len).map_err(|_| Status::INVALID_FIELD)?;
    let segments = data_segments(mem, cmd, len, limits)?;
    let write = cmd.opcode() == OPC_WRITE;
    // A disk read writes guest memory.
    let access = if write {
        Permissions::Read
    } else {
        Permissions::Write
    };
    let buffers =
        GuestIovecs::resolve(mem, segments, access).map_err(|_| Status::DATA_TRANSFER_ERROR)?;
    if write {
        Ok(IoRequest {
            op: IoOp::Write { offset, buffers },
            kind: IoKind::Write,
            flush_after: cmd.cdw(12) & RW_FUA != 0 || !write_cache,
        })
    } else {
        Ok(IoRequest {
            op: IoOp::Read { offset, buffers },
            kind: IoKind::Read,
            flush_after: false,
        })
    }
}

fn parse_dataset_management(
    mem: &DmaSpace,
    cmd: &Command,
    ns: &Namespace,
    limits: &WalkLimits,
) -> Result<IoRequest, Status> {
    let ranges = (cmd.cdw(10) & 0xff) as usize + 1;
    let segments = data_segments(mem, cmd, ranges * DSM_RANGE_SIZE, limits)?;
    if cmd.cdw(11) & DSM_ATTRIBUTE_DEALLOCATE == 0 {
        // Only hints (integral read / write): nothing to do.
        return Ok(IoRequest {
            op: IoOp::Discard(Vec::new()),
            kind: IoKind::Other,
            flush_after: false,
        });
    }
    let mut bytes = Vec::with_capacity(ranges * DSM_RANGE_SIZE);
    for (addr, len) in segments {
        let mut chunk = vec![0u8; len];
        mem.read_slice(&mut chunk, addr)
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        bytes.extend_from_slice(&chunk);
    }
    let mut extents = Vec::with_capacity(ranges);
    for range in bytes.chunks_exact(DSM_RANGE_SIZE) {
        let blocks = u32::from_le_bytes([range[4], range[5], range[6], range[7]]);
        let mut slba = [0u8; 8];
        slba.copy_from_slice(&range[8..16]);
        let (offset, len) = ns.range(u64::from_le_bytes(slba), u64::from(blocks))?;
        extents.push(Extent {
            offset,
            len,
            may_unmap: true,
        });
    }
    Ok(IoRequest {
        op: IoOp::Discard(extents),
        kind: IoKind::Other,
        flush_after: false,
    })
}

/// How a worker is asked to stop.
pub const RUN: u8 = 0;
/// Stop taking commands, let the in-flight ones finish and post their completions (Delete
/// I/O SQ, shutdown).
pub const DRAIN: u8 = 1;
/// Stop now: in-flight operations finish on the host but post nothing (controller reset).
pub const CANCEL: u8 = 2;

/// The controller's side of a running I/O submission queue.
#[derive(Debug)]
pub struct SqHandle {
    pub qid: u16,
    pub cqid: u16,
    pub base: u64,
    pub size: u16,
    /// The last tail the doorbell register was written with (trapped writes).
    pub tail: Arc<AtomicU32>,
    /// Signalled once per doorbell write: by the vCPU for a trapped write, by KVM for an
    /// ioeventfd one; the worker's read of its count is the doorbell metric.
    pub doorbell: Arc<EventFd>,
    /// Where `doorbell` is registered as an ioeventfd, if it is.
    pub ioevent: Option<u64>,
    /// Other wake-ups: CQ room, shadow doorbells switched on, stop.
    pub kick: Arc<EventFd>,
    pub stop: Arc<AtomicU8>,
    /// Whether the worker reads the shadow doorbell (set by Doorbell Buffer Config).
    pub shadow: Arc<AtomicBool>,
    /// Where the worker takes the next command: where a new worker starts, and where a
    /// stopped one left off (a snapshot's quiesce).
    pub head: Arc<AtomicU32>,
    /// Completions a stopped worker could not post (its CQ was full), for the next worker.
    pub leftover: Arc<Mutex<Vec<Completion>>>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl SqHandle {
    /// Stops the worker (`DRAIN` or `CANCEL`) and waits for it: its `IoQueue` is dropped on
    /// the worker, which waits for every operation the host still runs.
    pub fn stop(&mut self, how: u8) {
        self.stop.store(how, Ordering::Release);
        let _ = self.kick.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What an operation in the `IoQueue` carries.
#[derive(Debug)]
pub struct Tag {
    cid: u16,
    kind: IoKind,
    bytes: u64,
    flush_after: bool,
    started: Instant,
    /// The command as the request log will record it, when there is one.
    trace: Option<Box<PendingCommand>>,
}

/// Commands one queue keeps in flight (submitted, not yet posted).
const MAX_OUTSTANDING: usize = 256;
const KICK: u64 = 0;
const COMPLETIONS: u64 = 1;
const DOORBELL: u64 = 2;

/// The worker of one I/O submission queue.
pub struct SqWorker {
    /// Where `head` and the unposted backlog go when the worker stops.
    head_out: Arc<AtomicU32>,
    leftover: Arc<Mutex<Vec<Completion>>>,
    qid: u16,
    base: u64,
    size: u16,
    cq: Arc<CompletionQueue>,
    shared: Arc<Shared>,
    tail: Arc<AtomicU32>,
    doorbell: Arc<EventFd>,
    kick: Arc<EventFd>,
    stop: Arc<AtomicU8>,
    shadow: Arc<AtomicBool>,
    limits: WalkLimits,
    io: IoQueue<Tag>,
    epoll: Epoll,
    head: u16,
    backlog: VecDeque<Completion>,
    outstanding: usize,
    drain_fetched: bool,
    /// When the CQ's coalesced interrupt is due, if one is held.
    deadline: Option<Instant>,
}

/// Builds the worker's event loop (on the calling thread: epoll and io_uring setup are not
/// in the worker's seccomp list).
pub fn new_worker(
    qid: u16,
    base: u64,
    size: u16,
    cq: Arc<CompletionQueue>,
    shared: Arc<Shared>,
    limits: WalkLimits,
    handle: &SqHandle,
) -> io::Result<SqWorker> {
    let depth = size.min(128);
    let io = IoQueue::new(shared.image.clone(), shared.engine, depth);
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        handle.kick.as_raw_fd(),
        EpollEvent::new(EventSet::IN, KICK),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        handle.doorbell.as_raw_fd(),
        EpollEvent::new(EventSet::IN, DOORBELL),
    )?;
    if let Some(fd) = io.completion_fd() {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, COMPLETIONS),
        )?;
    }
    let backlog: VecDeque<Completion> = handle
        .leftover
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain(..)
        .collect();
    let head = u16::try_from(handle.head.load(Ordering::Acquire))
        .ok()
        .filter(|h| *h < size)
        .unwrap_or(0);
    Ok(SqWorker {
        head_out: handle.head.clone(),
        leftover: handle.leftover.clone(),
        qid,
        base,
        size,
        cq,
        shared,
        tail: handle.tail.clone(),
        doorbell: handle.doorbell.clone(),
        kick: handle.kick.clone(),
        stop: handle.stop.clone(),
        shadow: handle.shadow.clone(),
        limits,
        io,
        epoll,
        head,
        outstanding: backlog.len(),
        backlog,
        drain_fetched: false,
        deadline: None,
    })
}

impl SqWorker {
    fn metrics(&self) -> &QueueMetrics {
        self.shared.queue_metrics(self.qid)
    }

    /// The worker's loop; returns when stopped, leaving where it stands in its handle.
    pub fn run(mut self) {
        self.serve();
        self.head_out.store(u32::from(self.head), Ordering::Release);
        let mut leftover = self.leftover.lock().unwrap_or_else(PoisonError::into_inner);
        leftover.extend(self.backlog.drain(..));
    }

    fn serve(&mut self) {
        let mut events = vec![EpollEvent::default(); 4];
        loop {
            let _ = self.kick.read();
            match self.stop.load(Ordering::Acquire) {
                CANCEL => return,
                DRAIN => {
                    if !self.drain_fetched {
                        // Commands the driver submitted before the drain still run.
                        self.drain_fetched = true;
                        self.fetch();
                        self.io.commit();
                    } else {
                        // Later doorbells are not served; keep epoll from reporting them.
                        self.doorbell_writes();
                    }
                    self.complete_ready();
                    if self.outstanding == 0 || self.backlog_stuck() {
                        // Entries posted under a held (coalesced) interrupt are signalled now.
                        if self.cq.take_held() {
                            self.shared.interrupt(&self.cq, self.qid);
                        }
                        return;
                    }
                }
                _ => {
                    self.complete_ready();
                    self.fetch();
                    self.io.commit();
                    self.complete_ready();
                }
            }
            if self.deadline.is_some() {
                self.deadline = self.shared.interrupt_if_due(&self.cq, self.qid);
            }
            if let Err(e) = self.epoll.wait(self.timeout_ms(), &mut events) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("nvme: I/O queue {} stops: {e}", self.qid);
                    return;
                }
            }
        }
    }

    /// Milliseconds until the held interrupt is due (rounded up), or -1 (none held).
    fn timeout_ms(&self) -> i32 {
        let Some(deadline) = self.deadline else {
            return -1;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    }

    /// While draining, completions that cannot be posted (a full CQ the driver abandoned)
    /// must not keep the worker alive forever.
    fn backlog_stuck(&self) -> bool {
        self.io.in_flight() == 0 && !self.backlog.is_empty()
    }

    fn current_tail(&self) -> Option<u16> {
        let tail = if self.shadow.load(Ordering::Acquire) {
            let dbbuf = self.shared.dbbuf()?;
            dbbuf.sq_tail(&self.shared.dma, self.qid)?
        } else {
            self.tail.load(Ordering::Acquire)
        };
        u16::try_from(tail).ok().filter(|t| *t < self.size)
    }

    /// Doorbell writes since the last call (trapped or ioeventfd), counted as kicks.
    fn doorbell_writes(&self) -> u64 {
        let rung = self.doorbell.read().unwrap_or(0);
        QueueMetrics::add(&self.metrics().kicks, rung);
        rung
    }

    /// Takes new commands up to the tail (with shadow doorbells: re-reading the tail after
    /// publishing the EventIdx, so a submission racing the update is never missed).
    fn fetch(&mut self) {
        let rung = self.doorbell_writes();
        let mut consumed: u64 = 0;
        while let Some(tail) = self.current_tail() {
            while self.head != tail && self.has_room() {
                self.take_command();
                consumed += 1;
            }
            if !self.shadow.load(Ordering::Acquire) {
                break;
            }
            let Some(dbbuf) = self.shared.dbbuf() else {
                break;
            };
            dbbuf.set_sq_event(&self.shared.dma, self.qid, tail);
            if self.current_tail() == Some(tail) || !self.has_room() {
                break;
            }
        }
        if self.shadow.load(Ordering::Relaxed) {
            let suppressed = consumed.saturating_sub(rung);
            QueueMetrics::add(&self.metrics().notifications_suppressed, suppressed);
        }
    }

    fn has_room(&self) -> bool {
        self.backlog.is_empty() && self.outstanding < MAX_OUTSTANDING
    }

    fn take_command(&mut self) {
        let addr = self.base + u64::from(self.head) * SQE_SIZE;
        self.head = (self.head + 1) % self.size;
        let mut raw = [0u8; 64];
        if self
            .shared
            .dma
            .read_slice(&mut raw, GuestAddress(addr))
            .is_err()
        {
            // The queue's memory went away: nothing to answer to (no CID).
            tracing::debug!("nvme: SQ {} entry at {addr:#x} unreadable", self.qid);
            return;
        }
        let cmd = Command(raw);
        let started = Instant::now();
        self.outstanding += 1;
        let write_cache = self.shared.write_cache.load(Ordering::Relaxed);
        let ns = self.shared.namespace;
        let logging = self.shared.request_log.get().is_some();
        match parse_io_command(&self.shared.dma, &cmd, &ns, &self.limits, write_cache) {
            Ok(request) => {
                let trace = logging.then(|| {
                    let dma = &self.shared.dma;
                    Box::new(PendingCommand::accepted(
                        dma,
                        self.qid,
                        &cmd,
                        &ns,
                        &self.limits,
                    ))
                });
                let tag = Tag {
                    cid: cmd.cid(),
                    kind: request.kind,
                    bytes: request.op.data_len() as u64,
                    flush_after: request.flush_after,
                    started,
                    trace,
                };
                if let Some(done) = self.io.submit(tag, request.op) {
                    self.on_done(done);
                }
            }
            Err(status) => {
                self.metrics().record_request(started, Err(()));
                if let Some(log) = self.shared.request_log.get() {
                    log.answered(
                        &self.shared.dma,
                        PendingCommand::refused(self.qid, &cmd),
                        status,
                    );
                }
                self.finish(Completion::new(cmd.cid(), status, 0));
            }
        }
    }

    fn complete_ready(&mut self) {
        for done in self.io.reap() {
            self.on_done(done);
        }
        self.post_backlog();
    }

    fn on_done(&mut self, done: IoCompletion<Tag>) {
        let IoCompletion { mut tag, result } = done;
        if result.is_ok() && tag.flush_after {
            tag.flush_after = false;
            if let Some(flushed) = self.io.submit(tag, IoOp::Flush) {
                self.on_done(flushed);
            }
            return;
        }
        let status = match &result {
            Ok(()) => Status::SUCCESS,
            Err(e) => io_error_status(tag.kind, e),
        };
        let outcome = if status.is_success() {
            Ok(tag.bytes)
        } else {
            Err(())
        };
        self.metrics().record_request(tag.started, outcome);
        if status.is_success() {
            self.shared.count_io(tag.kind, tag.bytes);
        }
        if let (Some(log), Some(pending)) = (self.shared.request_log.get(), tag.trace) {
            log.answered(&self.shared.dma, *pending, status);
        }
        self.finish(Completion::new(tag.cid, status, 0));
    }

    fn finish(&mut self, mut entry: Completion) {
        entry.sq_id = self.qid;
        self.backlog.push_back(entry);
    }

    fn post_backlog(&mut self) {
        let mut posted: u32 = 0;
        while let Some(mut entry) = self.backlog.pop_front() {
            entry.sq_head = self.head;
            if self.cq.post(&self.shared.dma, entry) == Err(PostError::Full) {
                self.backlog.push_front(entry);
                break;
            }
            self.outstanding = self.outstanding.saturating_sub(1);
            posted += 1;
        }
        if posted > 0 {
            self.deadline = self.shared.completions_posted(&self.cq, self.qid, posted);
        }
    }
}

pub(super) fn io_error_status(kind: IoKind, e: &io::Error) -> Status {
    match (e.raw_os_error(), kind) {
        (Some(libc::ENOSPC), _) => Status::CAPACITY_EXCEEDED,
        (_, IoKind::Write) => Status::WRITE_FAULT,
        (_, IoKind::Read) => Status::UNRECOVERED_READ_ERROR,
        _ => Status::INTERNAL_ERROR,
    }
}
