//! The queue handlers: TX (guest → tap), RX (tap → guest) and the control queue.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sluice_dma::DmaSpace;
use sluice_virtio::{
    Chain, ChainWriter, DeviceMetrics, QueueContext, QueueError, QueueHandler, QueueMetrics,
    VirtQueue,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_ERR, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_OK,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::header::{parse_tx_packet, HeaderError, TxOffloads, MAX_PACKET_LEN, NET_HDR_LEN};
use super::scheduled_tx::ScheduledTx;

/// Frames moved per `process`/`complete` call, so the worker gets to interrupt the guest.
const RX_BUDGET: usize = 256;
/// Largest control command accepted (a MAC table with a few hundred entries).
const MAX_CTRL_LEN: usize = 8 * 1024;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// What the handlers need from the host side of the link (a [`super::Tap`], or a fake in tests).
pub trait NetBackend: Send + Sync {
    /// Reads one packet (header + frame) from queue pair `pair`; `None` if none is waiting.
    fn read_packet(&self, pair: usize, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Writes one packet (header + frame) to queue pair `pair`.
    fn write_packet(&self, pair: usize, packet: &[u8]) -> io::Result<()>;
    /// Readable when `pair` has packets waiting.
    fn queue_fd(&self, pair: usize) -> Option<RawFd>;
    /// An eventfd signalled when `pair` starts receiving again after `set_active_pairs`.
    fn resume_fd(&self, _pair: usize) -> Option<RawFd> {
        None
    }
    /// The guest now serves queue pairs `0..pairs`.
    fn set_active_pairs(&self, pairs: u16) -> io::Result<()>;
    /// Offloads the guest accepts on receive (`TUN_F_*`).
    fn set_offload(&self, tun_flags: u32) -> io::Result<()>;
    /// An RX handler stops with `frames` read from pair `pair` but not delivered: keep them
    /// for the next one (a snapshot's quiesce). Default: they are dropped.
    fn carry_rx(&self, _pair: usize, _frames: VecDeque<Vec<u8>>) {}
    /// The frames a previous RX handler of `pair` handed back, oldest first.
    fn take_carried_rx(&self, _pair: usize) -> VecDeque<Vec<u8>> {
        VecDeque::new()
    }
}

impl NetBackend for super::Tap {
    fn read_packet(&self, pair: usize, buf: &mut [u8]) -> io::Result<Option<usize>> {
        super::Tap::read_packet(self, pair, buf)
    }
    fn write_packet(&self, pair: usize, packet: &[u8]) -> io::Result<()> {
        super::Tap::write_packet(self, pair, packet)
    }
    fn queue_fd(&self, pair: usize) -> Option<RawFd> {
        super::Tap::queue_fd(self, pair)
    }
    fn resume_fd(&self, pair: usize) -> Option<RawFd> {
        self.attach_event_fd(pair)
    }
    fn set_active_pairs(&self, pairs: u16) -> io::Result<()> {
        self.set_active_queues(usize::from(pairs))
    }
    fn set_offload(&self, tun_flags: u32) -> io::Result<()> {
        super::Tap::set_offload(self, tun_flags)
    }
}

/// Why one chain or packet was dropped (counted in `metrics.errors`).
#[derive(Debug, thiserror::Error)]
enum DropReason {
    #[error("malformed chain: {0}")]
    Chain(#[from] virtio_queue::Error),
    #[error("chain too long: {0} bytes")]
    TooLong(usize),
    #[error("bad header: {0}")]
    Header(#[from] HeaderError),
    #[error("guest memory: {0}")]
    Io(#[from] io::Error),
}

/// Pops the next available chain; `Err` only for a broken ring.
fn next_chain<'m>(
    queue: &mut VirtQueue,
    mem: &'m DmaSpace,
) -> Result<Option<Chain<'m>>, QueueError> {
    queue.pop(mem)
}

/// Transmit queue of one pair: each chain is header + frame, written to the tap as is; behind
/// a shared scheduler (see [`super::scheduled_tx`]) when the device joined one.
pub struct TxHandler {
    backend: Arc<dyn NetBackend>,
    pair: usize,
    offloads: TxOffloads,
    packet: Vec<u8>,
    scheduled: Option<ScheduledTx>,
}

impl TxHandler {
    pub fn new(backend: Arc<dyn NetBackend>, pair: usize, offloads: TxOffloads) -> Self {
        Self {
            backend,
            pair,
            offloads,
            packet: vec![0; MAX_PACKET_LEN],
            scheduled: None,
        }
    }

    /// Puts this queue behind a shared scheduler through `port`, its frames in `class`.
    pub fn with_scheduler(mut self, port: sluice_qos::QueuePort, class: sluice_qos::Class) -> Self {
        self.scheduled = Some(ScheduledTx::new(port, class));
        self
    }

    /// Sends one chain's packet; returns the frame length.
    fn transmit(&mut self, mem: &DmaSpace, chain: Chain<'_>) -> Result<usize, DropReason> {
        let mut reader = chain.reader(mem)?;
        let len = reader.available_bytes();
        let packet = self.packet.get_mut(..len).ok_or(DropReason::TooLong(len))?;
        reader.read_exact(packet)?;
        // Validate the copy, so what was checked is what the kernel sees.
        let header = parse_tx_packet(packet, self.offloads)?;
        packet[..NET_HDR_LEN].copy_from_slice(&header.to_bytes());
        self.backend.write_packet(self.pair, packet)?;
        Ok(len - NET_HDR_LEN)
    }

    /// Copies and validates one chain's packet for the scheduler (header rewritten as
    /// checked, like [`TxHandler::transmit`]).
    fn copy_packet(&self, mem: &DmaSpace, chain: Chain<'_>) -> Result<Vec<u8>, DropReason> {
        let mut reader = chain.reader(mem)?;
        let len = reader.available_bytes();
        if len > MAX_PACKET_LEN {
            return Err(DropReason::TooLong(len));
        }
        let mut packet = vec![0; len];
        reader.read_exact(&mut packet)?;
        let header = parse_tx_packet(&packet, self.offloads)?;
        packet[..NET_HDR_LEN].copy_from_slice(&header.to_bytes());
        Ok(packet)
    }

    /// The scheduled path: hands the ring's frames to the scheduler within the queue's room
    /// and sends what it grants, until neither moves (see [`super::scheduled_tx`]).
    fn process_scheduled(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let Some(mut scheduled) = self.scheduled.take() else {
            return Ok(false);
        };
        let result = self.pump_scheduled(&mut scheduled, ctx);
        self.scheduled = Some(scheduled);
        result
    }

    fn pump_scheduled(
        &mut self,
        scheduled: &mut ScheduledTx,
        ctx: &mut QueueContext<'_>,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let mut handed = 0;
            let room = scheduled.room();
            while handed < room {
                let Some(chain) = next_chain(ctx.queue, ctx.mem)? else {
                    break;
                };
                let popped = Instant::now();
                let head = chain.head_index();
                let refused = match self.copy_packet(ctx.mem, chain) {
                    Ok(packet) => {
                        let frame_len = packet.len() - NET_HDR_LEN;
                        scheduled.hold(head, popped, packet, frame_len).is_some()
                    }
                    Err(e) => {
                        tracing::debug!("virtio-net tx{}: dropped: {e}", self.pair);
                        true
                    }
                };
                if refused {
                    ctx.queue.add_used(ctx.mem, head, 0)?;
                    ctx.metrics.record_request(popped, Err(()));
                    used = true;
                }
                handed += 1;
            }
            let (backend, pair) = (&self.backend, self.pair);
            let sent = scheduled.send_granted(ctx, |packet| {
                backend
                    .write_packet(pair, packet)
                    .map(|()| packet.len() - NET_HDR_LEN)
                    .map_err(|e| e.to_string())
            })?;
            used |= sent;
            if !sent && handed == 0 {
                return Ok(used);
            }
        }
    }
}

impl QueueHandler for TxHandler {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        if self.scheduled.is_some() {
            return self.process_scheduled(ctx);
        }
        let mut used = false;
        while let Some(chain) = next_chain(ctx.queue, ctx.mem)? {
            let popped = Instant::now();
            let head = chain.head_index();
            let outcome = self.transmit(ctx.mem, chain).map_err(|e| {
                tracing::debug!("virtio-net tx{}: dropped: {e}", self.pair);
            });
            // The device writes nothing into TX buffers.
            ctx.queue.add_used(ctx.mem, head, 0)?;
            ctx.metrics
                .record_request(popped, outcome.map(|bytes| bytes as u64));
            used = true;
        }
        Ok(used)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.scheduled.as_ref().map(ScheduledTx::wake_fd)
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        match &self.scheduled {
            Some(scheduled) => {
                scheduled.clear_wake();
                self.process_scheduled(ctx)
            }
            None => Ok(false),
        }
    }

    fn has_in_flight(&self) -> bool {
        self.in_flight() > 0
    }

    fn in_flight(&self) -> usize {
        self.scheduled.as_ref().map_or(0, ScheduledTx::held)
    }

    fn completion_ready(&mut self) -> bool {
        self.scheduled.as_ref().is_some_and(ScheduledTx::has_grants)
    }

    fn wants_polling(&self) -> bool {
        self.scheduled.as_ref().is_some_and(ScheduledTx::polled)
    }
}

/// What became of one received packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written into `buffers` chains.
    Delivered { buffers: u16 },
    /// Not enough buffers posted; nothing consumed, try again after the next kick.
    NoBuffers,
    /// The buffers were unusable (too small, outside memory): the chains were returned with
    /// length 0 and the packet dropped.
    Dropped,
}

/// Copies `packet` (header + frame) into the next available chains and sets `num_buffers`.
///
/// Without `mergeable` the packet must fit in one chain. Used entries are only added once the
/// whole packet is placed, so a shortage of buffers rolls back cleanly.
pub fn deliver_packet(
    queue: &mut VirtQueue,
    mem: &DmaSpace,
    metrics: &QueueMetrics,
    packet: &[u8],
    mergeable: bool,
) -> Result<Delivery, QueueError> {
    let max_chains = if mergeable {
        usize::from(queue.size())
    } else {
        1
    };
    let mut heads: Vec<(u16, u32)> = Vec::new();
    let mut header_writer: Option<ChainWriter<'_>> = None;
    let mut offset = 0;
    let mut broken = false;
    while offset < packet.len() && !broken {
        if heads.len() >= max_chains {
            broken = true;
            break;
        }
        let Some(chain) = next_chain(queue, mem)? else {
            for _ in 0..heads.len() {
                queue.undo_pop();
            }
            return Ok(Delivery::NoBuffers);
        };
        let head = chain.head_index();
        let placed = chain.writer(mem).ok().and_then(|mut writer| {
            if heads.is_empty() {
                if writer.available_bytes() < NET_HDR_LEN {
                    return None;
                }
                header_writer = Some(writer.clone());
            }
            let rest = packet.get(offset..)?;
            let n = writer.available_bytes().min(rest.len());
            writer.write_all(rest.get(..n)?).ok()?;
            (n > 0).then_some(n)
        });
        match placed {
            Some(n) => {
                heads.push((head, n as u32));
                offset += n;
            }
            None => {
                heads.push((head, 0));
                broken = true;
            }
        }
    }
    let count = u16::try_from(heads.len()).unwrap_or(u16::MAX);
    if !broken {
        broken = header_writer
            .and_then(|mut w| w.split_at(NUM_BUFFERS_OFFSET).ok())
            .and_then(|mut tail| tail.write_all(&count.to_le_bytes()).ok())
            .is_none();
    }
    for &(head, len) in &heads {
        queue.add_used(mem, head, if broken { 0 } else { len })?;
        QueueMetrics::add(&metrics.requests, 1);
    }
    if broken {
        QueueMetrics::add(&metrics.errors, 1);
        return Ok(Delivery::Dropped);
    }
    let frame_bytes = packet.len().saturating_sub(NET_HDR_LEN) as u64;
    QueueMetrics::add(&metrics.bytes, frame_bytes);
    Ok(Delivery::Delivered { buffers: count })
}

/// Why an RX pass stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxStop {
    /// The tap has no more packets.
    Drained,
    /// The budget ran out with packets left.
    Budget,
    /// No (or not enough) buffers posted, or the tap failed: wait for the next kick.
    Stalled,
}

/// Makes the tap's readability visible to the worker only while the handler wants packets.
///
/// The worker watches completion fds level-triggered; handing it the tap fd itself would spin
/// the worker while packets wait and the guest has posted no buffers (or while the tap queue is
/// detached, which polls as an error). Instead the tap fd sits in a private epoll instance with
/// `EPOLLONESHOT`, and that epoll fd is the completion fd: it turns readable once per arming,
/// and the handler re-arms only when it can take more packets. The backend's resume eventfd
/// (queue attached again) is in the same epoll instance, level-triggered.
struct RxWaker {
    epoll: Epoll,
    tap_fd: RawFd,
    resume_fd: Option<RawFd>,
}

impl RxWaker {
    fn new(tap_fd: RawFd, resume_fd: Option<RawFd>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, tap_fd, Self::event())?;
        if let Some(fd) = resume_fd {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 1))?;
        }
        Ok(Self {
            epoll,
            tap_fd,
            resume_fd,
        })
    }

    fn event() -> EpollEvent {
        EpollEvent::new(EventSet::IN | EventSet::ONE_SHOT, 0)
    }

    /// Takes the pending wakeups (the one-shot registration is now disarmed).
    fn consume(&self) {
        let mut events = [EpollEvent::default(); 2];
        if let Err(e) = self.epoll.wait(0, &mut events) {
            tracing::warn!("virtio-net rx: epoll_wait: {e}");
        }
        if let Some(fd) = self.resume_fd {
            let mut counter = [0u8; 8];
            // SAFETY: reads at most 8 bytes into `counter`, valid for the call; the eventfd is
            // non-blocking, so an unsignalled one just returns EAGAIN.
            unsafe { libc::read(fd, counter.as_mut_ptr().cast(), counter.len()) };
        }
    }

    /// Wakes the worker (again) when the tap is, or becomes, readable.
    fn arm(&self) {
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Modify, self.tap_fd, Self::event())
        {
            tracing::warn!("virtio-net rx: re-arming the tap wakeup: {e}");
        }
    }
}

/// Receive queue of one pair: moves packets from the tap into posted buffers.
pub struct RxHandler {
    backend: Arc<dyn NetBackend>,
    pair: usize,
    mergeable: bool,
    /// Without GUEST_CSUM the header flags must be zero (virtio 1.2 §5.1.6.4.1); the kernel
    /// still marks packets DATA_VALID, so the flags are cleared here.
    guest_csum: bool,
    packet: Vec<u8>,
    /// Length of a packet read from the tap but not yet delivered (no buffers were posted).
    pending: Option<usize>,
    /// Packets a previous handler of this pair read and handed back, delivered before the tap.
    backlog: VecDeque<Vec<u8>>,
    waker: Option<RxWaker>,
}

impl RxHandler {
    /// Fails only if the wakeup epoll instance cannot be created.
    /// `features` are the negotiated ones (`MRG_RXBUF`, `GUEST_CSUM` matter here).
    pub fn new(backend: Arc<dyn NetBackend>, pair: usize, features: u64) -> io::Result<Self> {
        let waker = backend
            .queue_fd(pair)
            .map(|fd| RxWaker::new(fd, backend.resume_fd(pair)))
            .transpose()?;
        let has = |bit: u32| features & (1u64 << bit) != 0;
        let mut backlog = backend.take_carried_rx(pair);
        // Carried packets come from a snapshot file: only sane lengths are delivered.
        backlog.retain(|p| (NET_HDR_LEN..=MAX_PACKET_LEN).contains(&p.len()));
        Ok(Self {
            backend,
            pair,
            mergeable: has(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            packet: vec![0; MAX_PACKET_LEN],
            pending: None,
            backlog,
            waker,
        })
    }

    /// Delivers packets until the tap is empty, buffers run out, or the budget is spent; then
    /// re-arms the tap wakeup unless it has to wait for buffers.
    fn pump(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let (used, stop) = self.deliver_pending(ctx)?;
        if stop != RxStop::Stalled {
            if let Some(waker) = &self.waker {
                waker.arm();
            }
        }
        Ok(used)
    }

    fn deliver_pending(
        &mut self,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(bool, RxStop), QueueError> {
        let mut used = false;
        for _ in 0..RX_BUDGET {
            // Without a posted buffer, packets stay queued in the tap rather than here.
            if self.pending.is_none() && !has_available(ctx.queue, ctx.mem)? {
                return Ok((used, RxStop::Stalled));
            }
            let len = match self.next_packet(ctx.metrics) {
                Ok(Some(len)) => len,
                Ok(None) => return Ok((used, RxStop::Drained)),
                Err(()) => return Ok((used, RxStop::Stalled)),
            };
            let Some(packet) = self
                .packet
                .get_mut(..len)
                .filter(|p| p.len() >= NET_HDR_LEN)
            else {
                self.pending = None;
                QueueMetrics::add(&ctx.metrics.errors, 1);
                continue;
            };
            if !self.guest_csum {
                packet[0] = 0;
            }
            match deliver_packet(ctx.queue, ctx.mem, ctx.metrics, packet, self.mergeable)? {
                Delivery::NoBuffers => return Ok((used, RxStop::Stalled)),
                Delivery::Delivered { .. } | Delivery::Dropped => {
                    self.pending = None;
                    used = true;
                }
            }
        }
        Ok((used, RxStop::Budget))
    }

    /// The pending packet, or a carried one, or a fresh one from the tap; `Err` if the tap
    /// failed.
    fn next_packet(&mut self, metrics: &QueueMetrics) -> Result<Option<usize>, ()> {
        if self.pending.is_none() {
            if let Some(carried) = self.backlog.pop_front() {
                let len = carried.len();
                if let Some(slot) = self.packet.get_mut(..len) {
                    slot.copy_from_slice(&carried);
                    self.pending = Some(len);
                    return Ok(self.pending);
                }
            }
        }
        if self.pending.is_none() {
            self.pending = self
                .backend
                .read_packet(self.pair, &mut self.packet)
                .map_err(|e| {
                    tracing::warn!("virtio-net rx{}: tap read: {e}", self.pair);
                    QueueMetrics::add(&metrics.errors, 1);
                })?;
        }
        Ok(self.pending)
    }
}

impl Drop for RxHandler {
    /// Hands what was read but not delivered to the next handler of this pair.
    fn drop(&mut self) {
        let mut frames = std::mem::take(&mut self.backlog);
        if let Some(packet) = self.pending.and_then(|len| self.packet.get(..len)) {
            frames.push_front(packet.to_vec());
        }
        if !frames.is_empty() {
            self.backend.carry_rx(self.pair, frames);
        }
    }
}

/// Whether the driver has published chains not yet taken.
fn has_available(queue: &VirtQueue, mem: &DmaSpace) -> Result<bool, QueueError> {
    queue.has_available(mem)
}

impl QueueHandler for RxHandler {
    /// A kick means new buffers: deliver what waits.
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        self.pump(ctx)
    }

    /// Readable when the tap has packets and the handler is waiting for them.
    fn completion_fd(&self) -> Option<RawFd> {
        self.waker.as_ref().map(|w| w.epoll.as_raw_fd())
    }

    fn complete(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        if let Some(waker) = &self.waker {
            waker.consume();
        }
        self.pump(ctx)
    }
}

/// What the control queue changes besides the queue pairs, shared with the device (its config
/// space shows the announce request; a snapshot carries the rest).
#[derive(Default)]
pub struct CtrlState {
    /// `VIRTIO_NET_S_ANNOUNCE` is set: the driver is asked to announce itself (after a
    /// restore or migration) until it acknowledges with `ANNOUNCE_ACK`.
    pub announce: AtomicBool,
    /// `VIRTIO_NET_CTRL_RX_PROMISC` / `_ALLMULTI` as the driver set them (the tap hands every
    /// frame to the guest anyway; kept so a restored device reports what was chosen).
    pub promisc: AtomicBool,
    pub allmulti: AtomicBool,
    /// Where `announce_acks` is counted (the device's metrics).
    pub metrics: Option<Arc<DeviceMetrics>>,
}

/// Named device counters of a NIC that announces: requests raised after a restore, and the
/// driver's acknowledgements.
pub const ANNOUNCE_COUNTERS: [&str; 2] = ["announce_requests", "announce_acks"];

impl CtrlState {
    /// Back to the state at reset.
    pub fn reset(&self) {
        self.announce.store(false, Ordering::Release);
        self.promisc.store(false, Ordering::Release);
        self.allmulti.store(false, Ordering::Release);
    }
}

/// The control queue (present with `VIRTIO_NET_F_CTRL_VQ`).
pub struct CtrlHandler {
    backend: Arc<dyn NetBackend>,
    max_pairs: u16,
    state: Arc<CtrlState>,
}

impl CtrlHandler {
    pub fn new(backend: Arc<dyn NetBackend>, max_pairs: u16) -> Self {
        Self::with_state(backend, max_pairs, Arc::default())
    }

    /// A handler that records the driver's choices in `state`.
    pub fn with_state(backend: Arc<dyn NetBackend>, max_pairs: u16, state: Arc<CtrlState>) -> Self {
        Self {
            backend,
            max_pairs,
            state,
        }
    }

    /// Runs one command chain; returns the ack (`VIRTIO_NET_OK`/`ERR`) and the writer for it.
    fn handle<'m>(
        &self,
        mem: &'m DmaSpace,
        chain: Chain<'m>,
    ) -> Result<(u8, ChainWriter<'m>), DropReason> {
        let mut reader = chain.reader(mem)?;
        let writer = chain.writer(mem)?;
        let len = reader.available_bytes();
        if len > MAX_CTRL_LEN {
            return Err(DropReason::TooLong(len));
        }
        if writer.available_bytes() == 0 {
            return Err(DropReason::Io(io::ErrorKind::WriteZero.into()));
        }
        let mut command = vec![0; len];
        reader.read_exact(&mut command)?;
        let ack = match command.as_slice() {
            [class, cmd, data @ ..] => self.execute(*class, *cmd, data),
            _ => VIRTIO_NET_ERR as u8,
        };
        Ok((ack, writer))
    }

    fn execute(&self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let ok = match (u32::from(class), u32::from(cmd)) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => self.set_pairs(data),
            (
                VIRTIO_NET_CTRL_RX,
                mode @ (VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI),
            ) => {
                // The tap already hands every frame to the guest: the modes need no action
                // beyond being remembered.
                let [on] = data else {
                    return VIRTIO_NET_ERR as u8;
                };
                let flag = if mode == VIRTIO_NET_CTRL_RX_PROMISC {
                    &self.state.promisc
                } else {
                    &self.state.allmulti
                };
                flag.store(*on != 0, Ordering::Release);
                true
            }
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => {
                self.state.announce.store(false, Ordering::Release);
                if let Some(metrics) = &self.state.metrics {
                    metrics.count_named(ANNOUNCE_COUNTERS[1], 1);
                }
                data.is_empty()
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => valid_mac_tables(data),
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => data.len() == 6,
            _ => false,
        };
        if ok {
            VIRTIO_NET_OK as u8
        } else {
            VIRTIO_NET_ERR as u8
        }
    }

    fn set_pairs(&self, data: &[u8]) -> bool {
        let Ok(bytes) = <[u8; 2]>::try_from(data) else {
            return false;
        };
        let pairs = u16::from_le_bytes(bytes);
        if pairs == 0 || pairs > self.max_pairs {
            return false;
        }
        match self.backend.set_active_pairs(pairs) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("virtio-net: activating {pairs} queue pairs: {e}");
                false
            }
        }
    }
}

/// Two `virtio_net_ctrl_mac` tables (unicast, multicast): `entries: le32`, `entries * 6` bytes
/// each, filling the command exactly.
fn valid_mac_tables(data: &[u8]) -> bool {
    let mut rest = data;
    for _ in 0..2 {
        let Some((count, tail)) = rest.split_first_chunk::<4>() else {
            return false;
        };
        let Some(table_len) = usize::try_from(u32::from_le_bytes(*count))
            .ok()
            .and_then(|n| n.checked_mul(6))
        else {
            return false;
        };
        let Some(after) = tail.get(table_len..) else {
            return false;
        };
        rest = after;
    }
    rest.is_empty()
}

impl QueueHandler for CtrlHandler {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = next_chain(ctx.queue, ctx.mem)? {
            let popped = Instant::now();
            let head = chain.head_index();
            let outcome = self
                .handle(ctx.mem, chain)
                .and_then(|(ack, mut writer)| {
                    writer.write_all(&[ack])?;
                    Ok(ack)
                })
                .map_err(|e| tracing::debug!("virtio-net ctrl: dropped: {e}"));
            let written = u32::from(outcome.is_ok());
            ctx.queue.add_used(ctx.mem, head, written)?;
            let outcome = match outcome {
                Ok(ack) if ack == VIRTIO_NET_OK as u8 => Ok(0),
                _ => Err(()),
            };
            ctx.metrics
                .record_request(popped, outcome.map(|bytes| bytes as u64));
            used = true;
        }
        Ok(used)
    }
}
