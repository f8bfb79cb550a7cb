//! The asynchronous I/O engine: one [`IoQueue`] per device queue (a virtio-blk virtqueue, an
//! NVMe I/O submission queue), each with its own io_uring ring.
//!
//! A device submits tagged operations pointing at guest memory ([`GuestIovecs`]) and later
//! reaps [`IoCompletion`]s carrying its tag and the outcome (an `io::Error` with the errno on
//! failure). Everything a ring cannot take whole — no ring (the synchronous engine, or io_uring
//! blocked here), a full ring, buffers O_DIRECT refuses — runs synchronously and completes
//! from `submit` itself, as does an operation with nothing to do: **every submitted operation
//! completes exactly once**, from `submit` or from `reap`.
//!
//! Hand-written on the `io-uring` crate: the maintained async runtimes (tokio-uring, glommio,
//! monoio) own the thread and the buffers, while a device worker has its own event loop (a
//! `QueueWorker` waiting on kicks and this ring's eventfd) and its buffers are guest memory
//! the kernel must read and write in place.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use sluice_dma::GuestIovecs;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::image::DiskImage;
use crate::sync_io::{self, Direction, DISCARD_MODE, MAX_IOVECS};

/// Which I/O path queues use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring if it can be set up, else synchronous.
    Auto,
    IoUring,
    Sync,
}

impl IoEngine {
    /// The engine queues will really get here (`IoUring` or `Sync`, never `Auto`).
    pub fn resolve(self) -> IoEngine {
        match self {
            IoEngine::Sync => IoEngine::Sync,
            IoEngine::Auto | IoEngine::IoUring if io_uring_available() => IoEngine::IoUring,
            IoEngine::IoUring => {
                tracing::warn!("io_uring requested but unavailable: using synchronous I/O");
                IoEngine::Sync
            }
            IoEngine::Auto => IoEngine::Sync,
        }
    }
}

/// Whether io_uring can be set up here (not blocked by seccomp, an old kernel, or a sysctl).
pub fn io_uring_available() -> bool {
    Uring::new(2).is_ok()
}

/// A byte range of the image for discard / write zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    /// Write zeroes may deallocate the range (ignored by discard, which always may).
    pub may_unmap: bool,
}

/// One operation on the image.
#[derive(Debug)]
pub enum IoOp {
    /// Image → guest memory.
    Read { offset: u64, buffers: GuestIovecs },
    /// Guest memory → image.
    Write { offset: u64, buffers: GuestIovecs },
    /// Make completed writes durable (fdatasync).
    Flush,
    /// Deallocate; a file system that cannot is not an error (discard is a hint).
    Discard(Vec<Extent>),
    /// Zero (fallocate, or plain writes of zeroes where that is unsupported).
    WriteZeroes(Vec<Extent>),
}

impl IoOp {
    /// Data bytes moved (0 for the others).
    pub fn data_len(&self) -> usize {
        match self {
            IoOp::Read { buffers, .. } | IoOp::Write { buffers, .. } => buffers.len(),
            _ => 0,
        }
    }

    /// The extents that have any bytes (a zero-length one needs no host call).
    fn live_extents(&self) -> impl Iterator<Item = (usize, &Extent)> {
        let extents = match self {
            IoOp::Discard(extents) | IoOp::WriteZeroes(extents) => extents.as_slice(),
            _ => &[],
        };
        extents.iter().enumerate().filter(|(_, e)| e.len > 0)
    }

    /// SQEs this operation needs on a ring.
    fn sqe_count(&self) -> usize {
        match self {
            IoOp::Read { .. } | IoOp::Write { .. } | IoOp::Flush => 1,
            IoOp::Discard(_) | IoOp::WriteZeroes(_) => self.live_extents().count(),
        }
    }

    fn writes(&self) -> bool {
        !matches!(self, IoOp::Read { .. } | IoOp::Flush)
    }

    /// Every byte range the operation touches lies inside an image of `size` bytes.
    fn within(&self, size: u64) -> bool {
        let inside = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= size);
        match self {
            IoOp::Read { offset, buffers } | IoOp::Write { offset, buffers } => {
                inside(*offset, buffers.len() as u64)
            }
            IoOp::Flush => true,
            IoOp::Discard(extents) | IoOp::WriteZeroes(extents) => {
                extents.iter().all(|e| inside(e.offset, e.len))
            }
        }
    }
}

/// A finished operation: the caller's tag and how it went.
#[derive(Debug)]
pub struct IoCompletion<T> {
    pub tag: T,
    pub result: io::Result<()>,
}

/// An operation on the ring whose CQEs have not all arrived.
struct InFlight<T> {
    tag: T,
    /// Owns the iovecs the SQEs point at until the last CQE.
    op: IoOp,
    pending: usize,
    error: Option<io::Error>,
}

/// The I/O engine of one device queue.
pub struct IoQueue<T> {
    image: Arc<DiskImage>,
    uring: Option<Uring>,
    slots: Vec<Option<InFlight<T>>>,
    free_slots: Vec<usize>,
    sqes_in_flight: usize,
}

impl<T> IoQueue<T> {
    /// A queue over `image`; with `Auto`/`IoUring` it sets up a ring for `depth` operations,
    /// and falls back to synchronous I/O (with a warning) if that fails.
    pub fn new(image: Arc<DiskImage>, engine: IoEngine, depth: u16) -> Self {
        let uring = match engine {
            IoEngine::Sync => None,
            IoEngine::Auto | IoEngine::IoUring => match Uring::new(u32::from(depth)) {
                Ok(uring) => Some(uring),
                Err(e) => {
                    tracing::warn!(
                        "{}: io_uring setup failed ({e}), using synchronous I/O",
                        image.path().display()
                    );
                    None
                }
            },
        };
        IoQueue {
            image,
            uring,
            slots: Vec::new(),
            free_slots: Vec::new(),
            sqes_in_flight: 0,
        }
    }

    pub fn image(&self) -> &DiskImage {
        &self.image
    }

    /// Whether this queue runs on io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.uring.is_some()
    }

    /// Operations on the ring not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Readable when completions are waiting to be reaped (`None` without a ring: then every
    /// operation completes from `submit`).
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.uring.as_ref().map(Uring::eventfd)
    }

    /// Starts `op`. `Some` if it already finished (synchronously, refused, or nothing to do);
    /// `None` if it is queued on the ring: call [`IoQueue::commit`] after a batch of submits,
    /// and [`IoQueue::reap`] when the completion fd is readable.
    pub fn submit(&mut self, tag: T, op: IoOp) -> Option<IoCompletion<T>> {
        if let Err(e) = self.check(&op) {
            return Some(IoCompletion {
                tag,
                result: Err(e),
            });
        }
        let needed = op.sqe_count();
        if needed == 0 {
            return Some(IoCompletion {
                tag,
                result: Ok(()),
            });
        }
        if !self.can_queue(&op, needed) {
            let result = run_sync(&self.image, &op);
            return Some(IoCompletion { tag, result });
        }
        self.queue(tag, op);
        None
    }

    /// Refuses what must never reach the image: writes to a read-only image, ranges beyond its
    /// end (a write there would grow the file).
    fn check(&self, op: &IoOp) -> io::Result<()> {
        if op.writes() && self.image.is_read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "write to a read-only image",
            ));
        }
        if !op.within(self.image.size()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range beyond the end of the image",
            ));
        }
        Ok(())
    }

    /// Whether `op` can go to the ring as is: iovecs the kernel takes directly, room for its
    /// CQEs and (after submitting what is queued) for its SQEs.
    fn can_queue(&mut self, op: &IoOp, needed: usize) -> bool {
        let ring_friendly = match op {
            IoOp::Read { offset, buffers } | IoOp::Write { offset, buffers } => {
                buffers.as_slice().len() <= MAX_IOVECS
                    && (!self.image.is_direct()
                        || sync_io::kernel_ready(&self.image, buffers, *offset))
            }
            _ => true,
        };
        let Some(uring) = self.uring.as_mut() else {
            return false;
        };
        if !ring_friendly || self.sqes_in_flight + needed > uring.max_in_flight() {
            return false;
        }
        if uring.sq_room() < needed {
            uring.submit();
        }
        uring.sq_room() >= needed
    }

    fn queue(&mut self, tag: T, op: IoOp) {
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let entries = entries_for(self.image.fd(), slot, &op);
        self.sqes_in_flight += entries.len();
        self.slots[slot] = Some(InFlight {
            tag,
            pending: entries.len(),
            error: None,
            op,
        });
        let Some(uring) = self.uring.as_mut() else {
            return;
        };
        for entry in entries {
            // SAFETY: the entry's iovecs (if any) live in `self.slots[slot]` until its CQE is
            // reaped, and the guest memory they point into is kept mapped by the GuestIovecs.
            let pushed = unsafe { uring.ring.submission().push(&entry) };
            debug_assert!(pushed.is_ok(), "can_queue reserved submission queue room");
        }
    }

    /// Hands the queued SQEs to the kernel (one syscall for a batch of submits).
    pub fn commit(&mut self) {
        if let Some(uring) = self.uring.as_mut() {
            if !uring.ring.submission().is_empty() {
                uring.submit();
            }
        }
    }

    /// Whether the completion queue holds entries [`IoQueue::reap`] would collect. Reads the
    /// ring's shared tail only (no system call), so a polling worker can check it in its spin
    /// loop instead of waiting for the eventfd.
    pub fn has_completions(&mut self) -> bool {
        self.uring
            .as_mut()
            .is_some_and(|uring| !uring.ring.completion().is_empty())
    }

    /// The operations that finished since the last call, in completion order.
    pub fn reap(&mut self) -> Vec<IoCompletion<T>> {
        let Some(uring) = self.uring.as_mut() else {
            return Vec::new();
        };
        // Cleared before reading the CQ, so a completion posted meanwhile signals again.
        uring.clear_eventfd();
        let cqes: Vec<(u64, i32)> = uring
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        let mut done = Vec::new();
        for (data, result) in cqes {
            if let Some(completion) = self.on_cqe(data, result) {
                done.push(completion);
            }
        }
        // SQEs left queued by a failed submit get another chance.
        self.commit();
        done
    }

    /// Applies one CQE; the operation's completion once its last CQE is in.
    fn on_cqe(&mut self, data: u64, result: i32) -> Option<IoCompletion<T>> {
        let (slot, extent) = split_user_data(data);
        self.sqes_in_flight = self.sqes_in_flight.saturating_sub(1);
        let in_flight = self.slots.get_mut(slot)?.as_mut()?;
        if let Err(e) = cqe_outcome(&self.image, &in_flight.op, extent, result) {
            in_flight.error.get_or_insert(e);
        }
        in_flight.pending = in_flight.pending.saturating_sub(1);
        if in_flight.pending > 0 {
            return None;
        }
        let finished = self.slots[slot].take()?;
        self.free_slots.push(slot);
        Some(IoCompletion {
            tag: finished.tag,
            result: finished.error.map_or(Ok(()), Err),
        })
    }

    /// Waits for every SQE in flight: the kernel may still be using guest memory and iovecs.
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

impl<T> Drop for IoQueue<T> {
    fn drop(&mut self) {
        // Before the slots (and the iovecs the kernel may be using) are freed.
        self.drain();
    }
}

/// `user_data` of an SQE: the slot in the low 32 bits, the extent index above.
fn user_data(slot: usize, extent: usize) -> u64 {
    (slot as u64 & 0xffff_ffff) | ((extent as u64) << 32)
}

fn split_user_data(data: u64) -> (usize, usize) {
    ((data & 0xffff_ffff) as usize, (data >> 32) as usize)
}

fn entries_for(fd: RawFd, slot: usize, op: &IoOp) -> Vec<squeue::Entry> {
    let fd = types::Fd(fd);
    let data = user_data(slot, 0);
    match op {
        IoOp::Read { offset, buffers } => {
            let iovecs = buffers.as_slice();
            // At most MAX_IOVECS, checked by can_queue.
            let entry =
                opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32).offset(*offset);
            vec![entry.build().user_data(data)]
        }
        IoOp::Write { offset, buffers } => {
            let iovecs = buffers.as_slice();
            let entry =
                opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32).offset(*offset);
            vec![entry.build().user_data(data)]
        }
        IoOp::Flush => vec![opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(data)],
        IoOp::Discard(_) | IoOp::WriteZeroes(_) => op
            .live_extents()
            .map(|(i, extent)| {
                let mode = match op {
                    IoOp::Discard(_) => DISCARD_MODE,
                    _ => sync_io::write_zeroes_mode(extent),
                };
                opcode::Fallocate::new(fd, extent.len)
                    .offset(extent.offset)
                    .mode(mode)
                    .build()
                    .user_data(user_data(slot, i))
            })
            .collect(),
    }
}

/// The synchronous engine.
fn run_sync(image: &DiskImage, op: &IoOp) -> io::Result<()> {
    match op {
        IoOp::Read { offset, buffers } => {
            sync_io::transfer(image, Direction::Read, buffers, *offset, 0)
        }
        IoOp::Write { offset, buffers } => {
            sync_io::transfer(image, Direction::Write, buffers, *offset, 0)
        }
        IoOp::Flush => sync_io::flush(image),
        IoOp::Discard(extents) => extents.iter().try_for_each(|e| sync_io::discard(image, e)),
        IoOp::WriteZeroes(extents) => extents
            .iter()
            .try_for_each(|e| sync_io::write_zeroes(image, e)),
    }
}

/// Interprets one CQE, finishing short transfers and unsupported fallocate modes synchronously.
fn cqe_outcome(image: &DiskImage, op: &IoOp, extent: usize, result: i32) -> io::Result<()> {
    let error = (result < 0).then(|| io::Error::from_raw_os_error(-result));
    let transfer = match op {
        IoOp::Read { offset, buffers } => Some((Direction::Read, *offset, buffers)),
        IoOp::Write { offset, buffers } => Some((Direction::Write, *offset, buffers)),
        _ => None,
    };
    match (transfer, error) {
        (Some((direction, offset, buffers)), None) => {
            let done = result as usize;
            if done >= buffers.len() {
                Ok(())
            } else {
                sync_io::transfer(image, direction, buffers, offset, done)
            }
        }
        // The host wants a stricter alignment than the guest buffers have.
        (Some((direction, offset, buffers)), Some(e))
            if image.is_direct() && e.raw_os_error() == Some(libc::EINVAL) =>
        {
            sync_io::transfer(image, direction, buffers, offset, 0)
        }
        (None, Some(e)) if matches!(op, IoOp::Discard(_)) => sync_io::discard_result(Err(e)),
        (None, Some(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => match op {
            IoOp::WriteZeroes(extents) => match extents.get(extent) {
                Some(e) => sync_io::write_zero_blocks(image, e),
                None => Err(e),
            },
            _ => Err(e),
        },
        (_, Some(e)) => Err(e),
        (None, None) => Ok(()),
    }
}

/// One io_uring ring with an eventfd that is signalled on every completion.
struct Uring {
    ring: IoUring,
    eventfd: EventFd,
}

impl Uring {
    /// A ring of `entries` submission slots (rounded up to a power of two) with a completion
    /// queue twice that size, and the eventfd registered.
    fn new(entries: u32) -> io::Result<Self> {
        let entries = entries.clamp(1, 4096).next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Uring { ring, eventfd })
    }

    fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn clear_eventfd(&self) {
        // EAGAIN just means nothing was signalled.
        let _ = self.eventfd.read();
    }

    /// Completion queue capacity: the most SQEs that may be in flight.
    fn max_in_flight(&mut self) -> usize {
        self.ring.completion().capacity()
    }

    fn sq_room(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::warn!("io_uring submit failed: {e}");
        }
    }
}
