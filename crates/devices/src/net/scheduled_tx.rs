//! A virtio-net transmit queue behind a shared scheduler (sluice-qos, issue 16): the frames
//! of every guest on one `sluice serve net` go to their taps in weighted fair order, within
//! each guest's frames/s (`pps`, the scheduler's request bucket) and bytes/s buckets.
//!
//! A frame's cost is the scheduler's: its bytes plus a fixed per-request part, so a flood of
//! small frames pays for the per-frame work it causes. The queue pops at most as many chains
//! as it may still hand over ([`QueuePort::room`]); each is copied and validated at once
//! (so a bad frame is answered at once), held here until granted, then written and only then
//! returned to the guest. The rest stay in the guest's ring: a throttled guest fills its own
//! ring and stops, the server holds at most `queue` frames per queue, and nothing the
//! scheduler delays is dropped. A tap write completes at once, so each grant is completed
//! straight after its write and the scheduler's in-flight depth never holds a guest back.

use std::collections::HashMap;
use std::time::Instant;

use sluice_qos::{Access, Class, QueuePort, Request as QosRequest};
use sluice_virtio::{QueueContext, QueueError};

/// A validated frame waiting for its grant.
struct HeldFrame {
    head: u16,
    popped: Instant,
    packet: Vec<u8>,
}

/// The scheduler's side of one transmit queue.
pub(super) struct ScheduledTx {
    port: QueuePort,
    /// The priority of this queue pair's frames inside their guest (`queue_prio=`).
    class: Class,
    held: HashMap<u64, HeldFrame>,
    next_tag: u64,
}

impl ScheduledTx {
    pub(super) fn new(port: QueuePort, class: Class) -> Self {
        ScheduledTx {
            port,
            class,
            held: HashMap::new(),
            next_tag: 0,
        }
    }

    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    pub(super) fn room(&self) -> usize {
        self.port.room()
    }

    pub(super) fn wake_fd(&self) -> std::os::fd::RawFd {
        self.port.wake_fd()
    }

    pub(super) fn clear_wake(&self) {
        self.port.clear_wake();
    }

    pub(super) fn has_grants(&self) -> bool {
        self.port.has_grants()
    }

    /// The scheduler's polling choice for this guest (`notify=sched`).
    pub(super) fn polled(&self) -> bool {
        self.port.polled()
    }

    /// Hands a validated packet (header + frame) to the scheduler; gives it back if refused.
    pub(super) fn hold(
        &mut self,
        head: u16,
        popped: Instant,
        packet: Vec<u8>,
        frame_len: usize,
    ) -> Option<(u16, Vec<u8>)> {
        let tag = self.next_tag;
        let request = QosRequest {
            tag,
            class: self.class,
            // A read: counted in cost and bytes, and reads never wait for each other, so
            // the scheduler's disk ordering rules leave frames alone.
            access: Access::Read,
            offset: 0,
            len: frame_len as u64,
        };
        if self.port.enqueue(request).is_err() {
            return Some((head, packet));
        }
        self.next_tag = self.next_tag.wrapping_add(1);
        self.held.insert(
            tag,
            HeldFrame {
                head,
                popped,
                packet,
            },
        );
        None
    }

    /// Writes every frame the scheduler grants this queue with `send`, returning each chain
    /// to the guest after its write, until nothing more is granted. Returns whether used
    /// entries were added.
    pub(super) fn send_granted(
        &mut self,
        ctx: &mut QueueContext<'_>,
        mut send: impl FnMut(&[u8]) -> Result<usize, String>,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        let mut grants = self.port.dispatch();
        while !grants.is_empty() {
            let mut done = Vec::with_capacity(grants.len());
            for tag in grants {
                done.push(tag);
                let Some(frame) = self.held.remove(&tag) else {
                    continue;
                };
                let outcome = send(&frame.packet).map_err(|e| {
                    tracing::debug!("virtio-net tx: dropped after its grant: {e}");
                });
                ctx.queue.add_used(ctx.mem, frame.head, 0)?;
                ctx.metrics
                    .record_request(frame.popped, outcome.map(|bytes| bytes as u64));
                used = true;
            }
            grants = self.port.complete_and_dispatch(&done);
        }
        Ok(used)
    }
}
