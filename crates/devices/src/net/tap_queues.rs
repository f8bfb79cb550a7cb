//! [`TapQueues`]: which tap queues are attached, kept in step with the running rings.
//!
//! The kernel steers received frames to every attached tap queue, so a queue must be attached
//! only while someone reads it: tap queues `0..n` are attached where `n` is the highest pair
//! whose RX handler exists ([`Counted::rx`]) plus one — at least the first — and, while the
//! device runs a control queue, at most the pairs the driver chose with `MQ_VQ_PAIRS_SET` (the
//! first pair only until then, virtio 1.2 §5.1.6.5.5).
//!
//! That one rule serves both ways the model runs: in-process every enabled ring gets its
//! handler at DRIVER_OK and the control queue picks the pairs; behind vhost-user the frontend
//! (QEMU) handles the control queue itself and tells the backend which pairs are in use by
//! starting and stopping their rings.
//!
//! It also holds what a snapshot or a migration carries across a stop of the rings: the
//! frames an RX handler took from the tap but had no buffers for (handed over when it is
//! dropped, taken by the next RX handler of its pair, in order, before the tap), and the pairs
//! the control queue chose, which the next control handler starts with instead of one.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use sluice_virtio::{QueueContext, QueueError, QueueHandler};

use super::handlers::NetBackend;

/// Running RX handlers per pair and the control queue's choice.
#[derive(Debug)]
struct Attachment {
    /// RX handlers alive per pair (a ring restart may briefly overlap the old handler's drop).
    running_rx: Vec<u32>,
    /// Control queue handlers alive.
    ctrl_handlers: u32,
    /// Pairs the control queue selected (meaningful while `ctrl_handlers > 0`).
    ctrl_pairs: u16,
    /// What the next control handler starts with (a resumed or restored device).
    resume_ctrl_pairs: Option<u16>,
}

impl Attachment {
    /// Tap queues that should be attached now.
    fn wanted(&self) -> u16 {
        let by_rings = self
            .running_rx
            .iter()
            .rposition(|&count| count > 0)
            .map_or(1, |pair| pair + 1);
        let by_rings = u16::try_from(by_rings).unwrap_or(u16::MAX);
        let wanted = if self.ctrl_handlers > 0 {
            by_rings.min(self.ctrl_pairs)
        } else {
            by_rings
        };
        wanted.max(1)
    }
}

/// The device's link to its backend: the backend the handlers use, with the tap-queue
/// attachment rule applied to `set_active_pairs`.
pub struct TapQueues {
    backend: Arc<dyn NetBackend>,
    attachment: Mutex<Attachment>,
    /// Per pair: frames (vnet header + frame) read from the tap, not delivered yet.
    carried: Mutex<Vec<VecDeque<Vec<u8>>>>,
}

/// Frames carried per pair at most (a snapshot also drains the tap into them).
pub const MAX_CARRIED_FRAMES: usize = 256;

impl TapQueues {
    pub fn new(backend: Arc<dyn NetBackend>, pairs: u16) -> Self {
        Self {
            backend,
            attachment: Mutex::new(Attachment {
                running_rx: vec![0; usize::from(pairs.max(1))],
                ctrl_handlers: 0,
                ctrl_pairs: 1,
                resume_ctrl_pairs: None,
            }),
            carried: Mutex::new(vec![VecDeque::new(); usize::from(pairs.max(1))]),
        }
    }

    fn carried(&self) -> MutexGuard<'_, Vec<VecDeque<Vec<u8>>>> {
        // Every update is one push or take.
        self.carried
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pairs the control queue chose last (1 until it chose), or those the next control
    /// handler will start with (a restored device not yet running).
    pub fn ctrl_pairs(&self) -> u16 {
        let attachment = self.attachment();
        attachment
            .resume_ctrl_pairs
            .unwrap_or(attachment.ctrl_pairs)
    }

    /// The next control handler starts with `pairs` (`None`: with one, as after a reset).
    pub fn resume_ctrl_pairs(&self, pairs: Option<u16>) {
        self.attachment().resume_ctrl_pairs = pairs;
    }

    /// Every carried frame, by pair (they stay carried).
    pub fn carried_frames(&self) -> Vec<(u16, Vec<u8>)> {
        let carried = self.carried();
        let mut frames = Vec::new();
        for (pair, queue) in carried.iter().enumerate() {
            let pair = u16::try_from(pair).unwrap_or(u16::MAX);
            frames.extend(queue.iter().map(|frame| (pair, frame.clone())));
        }
        frames
    }

    /// Replaces the carried frames (a restore); frames for pairs the device lacks are refused.
    pub fn set_carried_frames(&self, frames: Vec<(u16, Vec<u8>)>) -> Result<(), String> {
        let mut carried = self.carried();
        let mut fresh = vec![VecDeque::new(); carried.len()];
        for (pair, frame) in frames {
            let queue = fresh
                .get_mut(usize::from(pair))
                .ok_or_else(|| format!("a carried frame for pair {pair}, which does not exist"))?;
            if queue.len() >= MAX_CARRIED_FRAMES {
                return Err(format!("more than {MAX_CARRIED_FRAMES} carried frames"));
            }
            queue.push_back(frame);
        }
        *carried = fresh;
        Ok(())
    }

    /// Reads what waits in the tap queue of every pair into the carried frames, up to
    /// [`MAX_CARRIED_FRAMES`] per pair (no RX handler runs: a snapshot). `buf` is scratch.
    pub fn drain_tap(&self, buf: &mut [u8]) {
        let mut carried = self.carried();
        for (pair, queue) in carried.iter_mut().enumerate() {
            while queue.len() < MAX_CARRIED_FRAMES {
                match self.backend.read_packet(pair, buf) {
                    Ok(Some(len)) => queue.push_back(buf.get(..len).unwrap_or_default().to_vec()),
                    // Empty, or a detached queue: nothing waits for this pair.
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    /// Drops every carried frame and the control queue's choice (device reset).
    pub fn forget(&self) {
        self.carried().iter_mut().for_each(VecDeque::clear);
        let mut attachment = self.attachment();
        attachment.ctrl_pairs = 1;
        attachment.resume_ctrl_pairs = None;
    }

    fn attachment(&self) -> MutexGuard<'_, Attachment> {
        // The counters stay consistent under a panic elsewhere: every update is one store.
        self.attachment
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Attaches the tap queues the rule above asks for.
    pub fn update(&self) -> io::Result<()> {
        let wanted = self.attachment().wanted();
        self.backend.set_active_pairs(wanted)
    }

    fn count_rx(&self, pair: u16, started: bool) {
        let mut attachment = self.attachment();
        if let Some(count) = attachment.running_rx.get_mut(usize::from(pair)) {
            *count = if started {
                count.saturating_add(1)
            } else {
                count.saturating_sub(1)
            };
        }
    }

    fn count_ctrl(&self, started: bool) {
        let mut attachment = self.attachment();
        if started {
            attachment.ctrl_handlers = attachment.ctrl_handlers.saturating_add(1);
            // A fresh control queue: the driver has not chosen yet — unless it did before a
            // snapshot this device resumes from.
            attachment.ctrl_pairs = attachment.resume_ctrl_pairs.take().unwrap_or(1);
        } else {
            attachment.ctrl_handlers = attachment.ctrl_handlers.saturating_sub(1);
        }
    }
}

impl NetBackend for TapQueues {
    fn read_packet(&self, pair: usize, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.backend.read_packet(pair, buf)
    }
    fn write_packet(&self, pair: usize, packet: &[u8]) -> io::Result<()> {
        self.backend.write_packet(pair, packet)
    }
    fn queue_fd(&self, pair: usize) -> Option<RawFd> {
        self.backend.queue_fd(pair)
    }
    fn resume_fd(&self, pair: usize) -> Option<RawFd> {
        self.backend.resume_fd(pair)
    }
    /// The control queue's `MQ_VQ_PAIRS_SET`.
    fn set_active_pairs(&self, pairs: u16) -> io::Result<()> {
        self.attachment().ctrl_pairs = pairs;
        self.update()
    }
    fn set_offload(&self, tun_flags: u32) -> io::Result<()> {
        self.backend.set_offload(tun_flags)
    }
    fn carry_rx(&self, pair: usize, frames: VecDeque<Vec<u8>>) {
        if let Some(queue) = self.carried().get_mut(pair) {
            // Frames handed back go before any still carried (they were read first).
            let mut frames = frames;
            frames.append(queue);
            frames.truncate(MAX_CARRIED_FRAMES);
            *queue = frames;
        }
    }
    fn take_carried_rx(&self, pair: usize) -> VecDeque<Vec<u8>> {
        self.carried()
            .get_mut(pair)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// Counts a handler in [`TapQueues`] while it exists: the RX handler of a pair, or the
/// control queue's.
pub struct Counted<H> {
    inner: H,
    role: CountedRole,
    queues: Arc<TapQueues>,
}

#[derive(Debug, Clone, Copy)]
enum CountedRole {
    Rx(u16),
    Ctrl,
}

impl<H> Counted<H> {
    /// Counts `inner` as pair `pair`'s RX handler and attaches the tap queues it needs.
    pub fn rx(inner: H, pair: u16, queues: Arc<TapQueues>) -> io::Result<Self> {
        queues.count_rx(pair, true);
        Self::start(inner, CountedRole::Rx(pair), queues)
    }

    /// Counts `inner` as the control queue's handler (the first pair only until the driver
    /// chooses).
    pub fn ctrl(inner: H, queues: Arc<TapQueues>) -> io::Result<Self> {
        queues.count_ctrl(true);
        Self::start(inner, CountedRole::Ctrl, queues)
    }

    fn start(inner: H, role: CountedRole, queues: Arc<TapQueues>) -> io::Result<Self> {
        // Counted first, so a failed update is undone by the drop.
        let counted = Counted {
            inner,
            role,
            queues,
        };
        counted.queues.update()?;
        Ok(counted)
    }
}

impl<H> Drop for Counted<H> {
    fn drop(&mut self) {
        match self.role {
            CountedRole::Rx(pair) => self.queues.count_rx(pair, false),
            CountedRole::Ctrl => self.queues.count_ctrl(false),
        }
        if let Err(e) = self.queues.update() {
            tracing::warn!(
                "virtio-net: detaching tap queues after {:?}: {e}",
                self.role
            );
        }
    }
}

impl<H: QueueHandler> QueueHandler for Counted<H> {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.inner.process(ctx)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.inner.complete(ctx)
    }
}
