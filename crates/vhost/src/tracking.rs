//! [`Tracked`]: a device model's `QueueHandler` wrapped with inflight bookkeeping (split rings;
//! packed rings journal through `PackedQueue`'s hooks, see [`crate::inflight_packed`]).
//!
//! The device model pops chains and writes used entries itself (through virtio-queue, inside
//! `process` / `complete`), so the wrapper cannot hook the individual pops. It works from the
//! ring indices around each call instead:
//! * before `process`: every avail entry between `next_avail` and the avail index is marked in
//!   flight (in avail order, with an increasing counter) — *before* the model can pop it, so a
//!   crash inside `process` never leaves a popped head unmarked;
//! * after `process`: entries the model popped beyond that snapshot are marked, and
//!   pre-marked entries it did not pop are unmarked again (at rest, marked = popped − used);
//! * after `process` and `complete`: the heads of the used entries added since the last call
//!   are cleared, then the area's `used_idx` is advanced.
//!
//! If the backend dies between a used entry being published and its head being cleared, the
//! next backend clears it from the used ring (see [`crate::inflight`]).
//!
//! The wrapper is shared (`Arc<Mutex<_>>`) between the queue worker thread and the vhost-user
//! thread, which takes it back after stopping the worker to drain requests still in flight
//! (GET_VRING_BASE) and to resubmit recovered requests at start — or, behind a vIOMMU, hands
//! the resubmission to the worker's first pass ([`PendingResubmission`]).

use std::num::Wrapping;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sluice_dma::DmaSpace;
use sluice_virtio::{QueueContext, QueueError, QueueHandler, VirtQueue};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::inflight::QueueInflight;

/// Bytes before `ring[]` in the avail and used rings.
const RING_HEADER_BYTES: u64 = 4;
const AVAIL_ELEM_BYTES: u64 = 2;
const USED_ELEM_BYTES: u64 = 8;

/// A device model's handler plus the inflight bookkeeping of its queue.
pub struct Tracked {
    inner: Box<dyn QueueHandler>,
    inflight: Option<QueueInflight>,
    counter: u64,
    seen_used: Wrapping<u16>,
    pending: Option<PendingResubmission>,
}

/// Recovered requests resubmitted on the queue worker's first pass instead of at ring start:
/// behind a vIOMMU the first accesses miss a fresh IOTLB, and only a queue worker may wait for
/// the frontend's updates (see [`crate::iotlb`]). `queue` is the shadow ring (an avail ring
/// holding just the recovered heads, the guest's descriptors and used ring) and `mem` the
/// space that reaches both.
pub struct PendingResubmission {
    pub queue: VirtQueue,
    pub mem: DmaSpace,
}

impl Tracked {
    /// Wraps `inner`; `counter` continues the pop order, `seen_used` is the used index the
    /// area already accounts for.
    pub fn new(
        inner: Box<dyn QueueHandler>,
        inflight: Option<QueueInflight>,
        counter: u64,
        seen_used: u16,
    ) -> Self {
        Tracked {
            inner,
            inflight,
            counter,
            seen_used: Wrapping(seen_used),
            pending: None,
        }
    }

    /// Resubmits `pending` on the first [`QueueHandler::process`] (on the queue worker).
    pub fn defer_resubmission(&mut self, pending: PendingResubmission) {
        self.pending = Some(pending);
    }

    /// Runs a deferred resubmission; the real queue's used index follows the shadow's.
    fn run_pending(
        &mut self,
        mut pending: PendingResubmission,
        ctx: &mut QueueContext<'_>,
    ) -> Result<bool, QueueError> {
        let mut shadow = QueueContext {
            queue: &mut pending.queue,
            mem: &pending.mem,
            metrics: ctx.metrics,
        };
        let result = self.resubmit(&mut shadow);
        if let (Some(shadow), Some(real)) = (pending.queue.as_split(), ctx.queue.as_split_mut()) {
            real.set_next_used(shadow.next_used());
        }
        if let Err(e) = &result {
            tracing::warn!("vhost-user: resubmitting in-flight requests failed: {e}");
        }
        result
    }

    /// Runs the model over an avail ring that holds only recovered heads (already marked);
    /// clears those that complete.
    pub fn resubmit(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let result = self.inner.process(ctx);
        self.clear_used(ctx);
        result
    }

    /// After the worker stopped: waits up to `timeout` for the model to finish what it popped,
    /// moving completions to the used ring. Returns true if used entries were added.
    pub fn drain(&mut self, ctx: &mut QueueContext<'_>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut added = false;
        while outstanding(ctx) > 0 {
            let Some(fd) = self.inner.completion_fd() else {
                break;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    "vhost-user: {} requests still in flight after {timeout:?}; left for resubmission",
                    outstanding(ctx)
                );
                break;
            }
            if !wait_readable(fd, left) {
                continue;
            }
            match self.complete(ctx) {
                Ok(more) => added |= more,
                Err(e) => {
                    tracing::warn!("vhost-user: completing in-flight requests failed: {e}");
                    break;
                }
            }
        }
        added
    }

    fn premark(&mut self, area: &QueueInflight, ctx: &QueueContext<'_>) -> u16 {
        let Some(queue) = ctx.queue.as_split() else {
            return 0;
        };
        let Ok(avail) = queue.avail_idx(ctx.mem, Ordering::Acquire) else {
            return 0;
        };
        let next = Wrapping(queue.next_avail());
        let pending = (avail - next).0;
        if pending > queue.size() {
            // A broken avail index: the model will refuse the ring; nothing to mark.
            return 0;
        }
        for step in 0..pending {
            self.mark_position(area, ctx, (next + Wrapping(step)).0);
        }
        pending
    }

    fn mark_position(&mut self, area: &QueueInflight, ctx: &QueueContext<'_>, position: u16) {
        if let Some(head) = avail_head(ctx, position) {
            if area.mark(head, self.counter) {
                self.counter = self.counter.wrapping_add(1);
            }
        }
    }

    /// Fixes the marks after `process` popped `popped` entries of which `premarked` were
    /// marked beforehand.
    fn settle_pops(
        &mut self,
        area: &QueueInflight,
        ctx: &QueueContext<'_>,
        first: u16,
        premarked: u16,
        popped: u16,
    ) {
        let first = Wrapping(first);
        if popped > premarked {
            for step in premarked..popped {
                self.mark_position(area, ctx, (first + Wrapping(step)).0);
            }
        } else {
            for step in popped..premarked {
                if let Some(head) = avail_head(ctx, (first + Wrapping(step)).0) {
                    area.clear(head);
                }
            }
        }
    }

    /// Clears the heads of used entries added since the last call.
    fn clear_used(&mut self, ctx: &QueueContext<'_>) {
        let Some(next_used) = ctx.queue.as_split().map(|q| Wrapping(q.next_used())) else {
            return;
        };
        if let Some(area) = &self.inflight {
            let added = (next_used - self.seen_used).0;
            for step in 0..added.min(ctx.queue.size()) {
                let position = (self.seen_used + Wrapping(step)).0;
                if let Some(head) = used_head(ctx, position) {
                    area.set_last_batch_head(head);
                    area.clear(head);
                }
            }
            area.set_used_idx(next_used.0);
        }
        self.seen_used = next_used;
    }
}

impl QueueHandler for Tracked {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let resubmitted = match self.pending.take() {
            Some(pending) => self.run_pending(pending, ctx)?,
            None => false,
        };
        self.process_tracked(ctx).map(|used| used || resubmitted)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let result = self.inner.complete(ctx);
        self.clear_used(ctx);
        result
    }

    fn has_in_flight(&self) -> bool {
        self.inner.has_in_flight()
    }

    fn completion_ready(&mut self) -> bool {
        self.inner.completion_ready()
    }

    fn wants_polling(&self) -> bool {
        self.inner.wants_polling()
    }
}

impl Tracked {
    /// One pass of the model with the inflight bookkeeping around it (see the module doc).
    fn process_tracked(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        // Split rings only: a packed ring journals its pops and used entries itself.
        let area = self
            .inflight
            .clone()
            .filter(|_| ctx.queue.as_split().is_some());
        let Some(area) = area else {
            return self.inner.process(ctx);
        };
        let next_avail =
            |ctx: &QueueContext<'_>| ctx.queue.as_split().map_or(0, |q| q.next_avail());
        let first = next_avail(ctx);
        let premarked = self.premark(&area, ctx);
        let result = self.inner.process(ctx);
        let popped = next_avail(ctx).wrapping_sub(first);
        self.settle_pops(&area, ctx, first, premarked, popped);
        self.clear_used(ctx);
        result
    }
}

/// The handler as the queue worker holds it; the vhost-user thread keeps another reference.
#[derive(Clone)]
pub struct SharedTracked(pub Arc<Mutex<Tracked>>);

impl SharedTracked {
    pub fn new(tracked: Tracked) -> Self {
        SharedTracked(Arc::new(Mutex::new(tracked)))
    }

    pub fn lock(&self) -> MutexGuard<'_, Tracked> {
        // A panic in the model poisons the lock; the bookkeeping is still consistent enough
        // to stop the queue, which is all that happens next.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl QueueHandler for SharedTracked {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.lock().process(ctx)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.lock().completion_fd()
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.lock().complete(ctx)
    }

    fn has_in_flight(&self) -> bool {
        self.lock().has_in_flight()
    }

    fn completion_ready(&mut self) -> bool {
        self.lock().completion_ready()
    }

    fn wants_polling(&self) -> bool {
        self.lock().wants_polling()
    }
}

/// Chains popped and not yet used.
fn outstanding(ctx: &QueueContext<'_>) -> u16 {
    let queue = match &*ctx.queue {
        VirtQueue::Split(queue) => queue,
        VirtQueue::Packed(queue) => {
            return u16::try_from(queue.in_flight_count()).unwrap_or(u16::MAX)
        }
    };
    let gap = queue.next_avail().wrapping_sub(queue.next_used());
    if gap > queue.size() {
        0 // The indices do not describe popped requests (a frontend's odd base).
    } else {
        gap
    }
}

/// The head in avail ring entry `position` (free-running).
fn avail_head(ctx: &QueueContext<'_>, position: u16) -> Option<u16> {
    let queue = ctx.queue.as_split()?;
    let slot = u64::from(position % queue.size().max(1));
    let addr = queue
        .avail_ring()
        .checked_add(RING_HEADER_BYTES + slot * AVAIL_ELEM_BYTES)?;
    read_le_u16(ctx.mem, addr)
}

/// The head in used ring entry `position` (free-running).
fn used_head(ctx: &QueueContext<'_>, position: u16) -> Option<u16> {
    let queue = ctx.queue.as_split()?;
    used_id(ctx.mem, queue.used_ring(), queue.size(), position)
        .and_then(|id| u16::try_from(id).ok())
}

/// The id of used ring entry `position` of a ring of `size` entries at `used_ring`.
pub fn used_id(mem: &DmaSpace, used_ring: u64, size: u16, position: u16) -> Option<u32> {
    let slot = u64::from(position % size.max(1));
    let addr = used_ring.checked_add(RING_HEADER_BYTES + slot * USED_ELEM_BYTES)?;
    mem.read_obj::<u32>(GuestAddress(addr))
        .ok()
        .map(u32::from_le)
}

/// `used->idx` of the ring at `used_ring`.
pub fn used_index(mem: &DmaSpace, used_ring: u64) -> Option<u16> {
    read_le_u16(mem, used_ring.checked_add(2)?)
}

fn read_le_u16(mem: &DmaSpace, addr: u64) -> Option<u16> {
    mem.read_obj::<u16>(GuestAddress(addr))
        .ok()
        .map(u16::from_le)
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    // SAFETY: one valid pollfd for the duration of the call; the result is checked.
    let ready = unsafe { libc::poll(&raw mut pollfd, 1, millis) };
    ready > 0 && pollfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A model whose polling wish is what the test says.
    struct Steered(Arc<AtomicBool>);

    impl QueueHandler for Steered {
        fn process(&mut self, _ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
            Ok(false)
        }

        fn wants_polling(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// `notify=sched` on a served disk: the queue worker holds the model inside these
    /// wrappers, so they must pass its polling wish through (they once did not, and no
    /// served queue was ever polled).
    #[test]
    fn the_wrappers_pass_the_models_polling_wish_through() {
        let wish = Arc::new(AtomicBool::new(false));
        let handler = SharedTracked::new(Tracked::new(Box::new(Steered(wish.clone())), None, 0, 0));
        assert!(!handler.wants_polling());
        wish.store(true, Ordering::SeqCst);
        assert!(handler.wants_polling());
        assert!(handler.lock().wants_polling());
    }
}
