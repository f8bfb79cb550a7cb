//! A virtio-blk queue behind a shared scheduler (sluice-qos): requests wait in the scheduler
//! between parsing and submission.
//!
//! The queue pops at most as many chains as it may still hand over ([`QueuePort::room`]);
//! the rest stay in the guest's ring, so a flooding guest delays its own requests and never
//! grows the server's memory. Parsed operations are held here by tag until the scheduler
//! grants them; grants made by another queue's worker arrive through the port's eventfd,
//! which the worker waits on together with the I/O ring's eventfd (one epoll fd given as the
//! handler's completion fd, so the worker needs no change). While requests wait, the queue
//! reports them in flight: a polling worker then sleeps on that fd instead of spinning on a
//! guest that is throttled.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use sluice_dma::DmaSpace;
use sluice_qos::{Access, Class, QueuePort, Request as QosRequest};
use sluice_storage::IoOp;
use sluice_virtio::{Chain, QueueContext, QueueError, VirtQueue};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::handler::{finish_io, Answer, BlockQueueHandler};

/// The scheduler's side of one queue.
pub(super) struct Scheduled {
    port: QueuePort,
    /// Operations waiting for their grant, by tag.
    held: HashMap<u64, (Answer, IoOp)>,
    next_tag: u64,
    /// Readable when the I/O ring completed something or this queue got grants.
    wait: Epoll,
}

impl Scheduled {
    pub(super) fn new(port: QueuePort, ring_fd: Option<RawFd>) -> io::Result<Self> {
        let wait = Epoll::new()?;
        for fd in ring_fd.into_iter().chain([port.wake_fd()]) {
            wait.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )?;
        }
        Ok(Scheduled {
            port,
            held: HashMap::new(),
            next_tag: 0,
            wait,
        })
    }

    pub(super) fn wait_fd(&self) -> RawFd {
        self.wait.as_raw_fd()
    }

    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    pub(super) fn has_grants(&self) -> bool {
        self.port.has_grants()
    }

    /// The scheduler's polling choice for this guest (`notify=sched`).
    pub(super) fn polled(&self) -> bool {
        self.port.polled()
    }

    pub(super) fn clear_wake(&self) {
        self.port.clear_wake();
    }

    /// Requests this queue may still hand to the scheduler.
    pub(super) fn room(&self) -> usize {
        self.port.room()
    }

    /// Pops as many chains as this queue may still hand over; also returns that bound.
    pub(super) fn pop_within_bound<'m>(
        &self,
        queue: &mut VirtQueue,
        mem: &'m DmaSpace,
    ) -> Result<(Vec<Chain<'m>>, Option<usize>), QueueError> {
        let room = self.port.room();
        let mut chains = Vec::new();
        while chains.len() < room {
            match queue.pop(mem)? {
                Some(chain) => chains.push(chain),
                None => break,
            }
        }
        Ok((chains, Some(room)))
    }

    /// Hands `op` to the scheduler; gives it back if the scheduler refused it.
    pub(super) fn hold(
        &mut self,
        mut answer: Answer,
        op: IoOp,
        ioprio: u32,
    ) -> Option<(Answer, IoOp)> {
        let tag = self.next_tag;
        let request = QosRequest {
            tag,
            class: Class::from_ioprio(ioprio),
            access: access_of(&op),
            offset: offset_of(&op),
            len: len_of(&op),
        };
        if self.port.enqueue(request).is_err() {
            return Some((answer, op));
        }
        self.next_tag = self.next_tag.wrapping_add(1);
        answer.qos_tag = Some(tag);
        self.held.insert(tag, (answer, op));
        None
    }
}

fn access_of(op: &IoOp) -> Access {
    match op {
        IoOp::Read { .. } => Access::Read,
        IoOp::Write { .. } | IoOp::Discard(_) | IoOp::WriteZeroes(_) => Access::Write,
        IoOp::Flush => Access::Flush,
    }
}

/// The byte range an operation touches (discard / write zeroes: from the first extent's
/// start to the last one's end — wider than needed, never narrower).
fn offset_of(op: &IoOp) -> u64 {
    match op {
        IoOp::Read { offset, .. } | IoOp::Write { offset, .. } => *offset,
        IoOp::Discard(extents) | IoOp::WriteZeroes(extents) => {
            extents.iter().map(|e| e.offset).min().unwrap_or(0)
        }
        IoOp::Flush => 0,
    }
}

fn len_of(op: &IoOp) -> u64 {
    match op {
        IoOp::Read { .. } | IoOp::Write { .. } => op.data_len() as u64,
        IoOp::Discard(extents) | IoOp::WriteZeroes(extents) => {
            let end = extents
                .iter()
                .map(|e| e.offset.saturating_add(e.len))
                .max()
                .unwrap_or(0);
            end.saturating_sub(offset_of(op))
        }
        IoOp::Flush => 0,
    }
}

impl BlockQueueHandler {
    /// Reports `finished` tags to the scheduler and submits what it grants this queue, until
    /// nothing more is granted (operations that complete at once free their slots at once).
    pub(super) fn submit_granted(
        &mut self,
        ctx: &mut QueueContext<'_>,
        finished: &[u64],
    ) -> Result<bool, QueueError> {
        let Some(scheduled) = self.scheduled.as_mut() else {
            return Ok(false);
        };
        let mut used = false;
        let mut grants = scheduled.port.complete_and_dispatch(finished);
        while !grants.is_empty() {
            let mut done_now = Vec::new();
            for tag in grants {
                let Some((answer, op)) = scheduled.held.remove(&tag) else {
                    continue;
                };
                if let Some(done) = self.io.submit(answer, op) {
                    done_now.push(tag);
                    let answered = finish_io(ctx, done)?;
                    if let Some(trace) = self.trace.as_mut() {
                        trace.answered(
                            ctx.mem,
                            answered.head,
                            answered.used_len,
                            answered.status_addr,
                        );
                    }
                    used = true;
                }
            }
            self.io.commit();
            if done_now.is_empty() {
                break;
            }
            grants = scheduled.port.complete_and_dispatch(&done_now);
        }
        Ok(used)
    }
}
