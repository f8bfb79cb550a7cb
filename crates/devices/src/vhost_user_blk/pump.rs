//! The interrupt pump: one thread per active device that first sends the DRIVER_OK setup (so
//! the vCPU never waits for the backend), then relays the backend's call eventfds to the driver
//! and watches the control socket, reconnecting when the backend goes away. Every request it
//! sends, reconnects included, is bounded by the device's timeout, and a reset cancels the
//! ones not yet sent, so stopping the thread waits for one request at most.
//!
//! Behind a vIOMMU it also reads the backend request channel and answers IOTLB MISS messages
//! (see [`super::iotlb`]): each answer is one translation and one bounded UPDATE.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sluice_dma::DmaSpace;
use sluice_virtio::{DeviceMetrics, QueueMetrics, VirtioInterrupt};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::iotlb::{
    backend_reply, read_some, write_some, BackendMessage, ChannelReader, IotlbLink,
};
use super::session::{used_index, Active, CallQueue, Session};
use super::{SharedMemoryRegion, VhostUserBlkError};

const STOP_TOKEN: u64 = u64::MAX;
const SOCKET_TOKEN: u64 = u64::MAX - 1;
const CHANNEL_TOKEN: u64 = u64::MAX - 2;
/// Bytes read from the backend channel at a time.
const CHANNEL_READ: usize = 4096;
/// Reads of the backend channel per wakeup (see `Pump::read_channel`).
const CHANNEL_READS_PER_WAKEUP: usize = 16;
/// Time between reconnection attempts while the backend is away.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Handle of a running pump thread.
pub(super) struct CallPump {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl CallPump {
    /// Starts the thread, which first sends the DRIVER_OK setup for `active` (off the vCPU
    /// thread: a slow or stalled backend delays the device, not the guest's status write),
    /// then relays interrupts. A setup that fails or times out marks the device NEEDS_RESET,
    /// unless a reset cancelled it.
    pub fn start(
        session: Arc<Mutex<Session>>,
        active: Active,
        queues: Vec<CallQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        metrics: Arc<DeviceMetrics>,
        cancel: Arc<AtomicBool>,
        iotlb: Option<MissAnswers>,
    ) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        add(&epoll, stop.as_raw_fd(), EventSet::IN, STOP_TOKEN)?;
        for (slot, queue) in queues.iter().enumerate() {
            add(&epoll, queue.call.as_raw_fd(), EventSet::IN, slot as u64)?;
        }
        let mem = active.mem();
        // Recorded now, so that a quiesce before the setup below sees the rings.
        session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prepare(active);
        let last_used = queues
            .iter()
            .map(|q| used_index(&mem, q.used_ring))
            .collect();
        let pump = Pump {
            session,
            epoll,
            queues,
            last_used,
            mem,
            interrupt,
            metrics,
            cancel,
            watched: None,
            lost_at: None,
            channel: None,
            iotlb,
        };
        let kind = sluice_sandbox::ThreadKind::VhostFrontend;
        let thread = sluice_sandbox::spawn(kind, "vhost-user-blk".into(), move || pump.run())?;
        Ok(Self { stop, thread })
    }

    /// Stops the thread and waits for it.
    pub fn stop(self) {
        if let Err(e) = self.stop.write(1) {
            tracing::error!("vhost-user-blk: cannot stop the interrupt pump: {e}");
            return;
        }
        if self.thread.join().is_err() {
            tracing::error!("vhost-user-blk: the interrupt pump panicked");
        }
    }
}

fn add(epoll: &Epoll, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
}

struct Pump {
    session: Arc<Mutex<Session>>,
    epoll: Epoll,
    queues: Vec<CallQueue>,
    /// Used index at the last call, per queue (completions are counted from its advance).
    last_used: Vec<u16>,
    mem: DmaSpace,
    interrupt: Arc<dyn VirtioInterrupt>,
    metrics: Arc<DeviceMetrics>,
    /// Set while a reset stops the device.
    cancel: Arc<AtomicBool>,
    /// The control socket being watched for a hang-up (a duplicate), with its generation.
    watched: Option<(u64, UnixStream)>,
    /// When the backend went away (None while connected).
    lost_at: Option<Instant>,
    /// The backend request channel being read (behind a vIOMMU), with what came of it so far.
    channel: Option<(UnixStream, ChannelReader)>,
    /// Behind a vIOMMU: what answers the backend's IOTLB misses.
    iotlb: Option<MissAnswers>,
}

/// The device IOTLB's link and guest RAM as the backend maps it (UPDATEs carry sluice's
/// addresses).
pub(super) struct MissAnswers {
    pub link: Arc<IotlbLink>,
    pub regions: Vec<SharedMemoryRegion>,
}

impl Pump {
    fn session(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(mut self) {
        if !self.set_up() {
            return;
        }
        self.notify_resumed();
        self.watch_socket();
        let mut events = vec![EpollEvent::default(); self.queues.len() + 3];
        loop {
            let timeout = match self.lost_at {
                Some(_) => RECONNECT_INTERVAL.as_millis() as i32,
                None => -1,
            };
            let ready = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vhost-user-blk: interrupt pump: {e}");
                    return;
                }
            };
            for event in events.iter().take(ready) {
                match event.data() {
                    STOP_TOKEN => return,
                    SOCKET_TOKEN => self.connection_lost(),
                    CHANNEL_TOKEN => self.read_channel(),
                    slot => self.relay(slot),
                }
            }
            if self
                .lost_at
                .is_some_and(|at| at.elapsed() >= RECONNECT_INTERVAL)
            {
                self.try_reconnect();
            }
        }
    }

    /// The DRIVER_OK setup; false if the device cannot run. A backend found away is waited for.
    fn set_up(&mut self) -> bool {
        let result = self.session().activate_prepared();
        let Err(e) = result else {
            return true;
        };
        if self.cancel.load(Ordering::Acquire) {
            tracing::debug!("vhost-user-blk: setup stopped by a device reset: {e}");
        } else if e.backend_away() {
            // The backend went away during the setup (a restart): wait for it like for a
            // hang-up later on; the reconnect replays the whole setup.
            tracing::warn!(
                "vhost-user-blk: the backend went away during the setup: {e}; reconnecting"
            );
            self.session().disconnect();
            return true;
        } else {
            let socket = self.session().socket_path().display().to_string();
            tracing::error!(
                "vhost-user-blk {socket}: cannot start the device: {e}; it needs a reset"
            );
            self.interrupt.needs_reset();
        }
        false
    }

    /// Rings that resume where a quiesce (snapshot, migration) stopped them get one interrupt
    /// each: the backend's last completions before the quiesce may have signalled a call fd
    /// nobody relayed any more. A spurious interrupt is harmless; a lost one stalls the driver.
    fn notify_resumed(&self) {
        for (queue, &used) in self.queues.iter().zip(&self.last_used) {
            if used != 0 {
                let _ = self.interrupt.notify_queue(queue.index);
            }
        }
    }

    /// The backend used buffers on one queue: tell the driver.
    fn relay(&mut self, slot: u64) {
        let Some(queue) = usize::try_from(slot).ok().and_then(|s| self.queues.get(s)) else {
            return;
        };
        // Non-blocking read; a spurious wakeup still gets an interrupt, which is harmless.
        let _ = queue.call.read();
        let index = queue.index;
        let used = used_index(&self.mem, queue.used_ring);
        if let (Some(metrics), Some(last)) = (
            self.metrics.queues.get(usize::from(index)),
            usize::try_from(slot)
                .ok()
                .and_then(|s| self.last_used.get_mut(s)),
        ) {
            QueueMetrics::add(&metrics.requests, u64::from(used.wrapping_sub(*last)));
            QueueMetrics::add(&metrics.interrupts, 1);
            *last = used;
        }
        if let Err(e) = self.interrupt.notify_queue(index) {
            tracing::warn!("vhost-user-blk: interrupt for queue {index}: {e}");
        }
    }

    fn watch_socket(&mut self) {
        let Some((generation, socket, channel)) = self.session().watch() else {
            self.lost_at = Some(Instant::now());
            return;
        };
        self.unwatch_channel();
        if let Some(channel) = channel {
            match add(
                &self.epoll,
                channel.as_raw_fd(),
                EventSet::IN,
                CHANNEL_TOKEN,
            ) {
                Ok(()) => self.channel = Some((channel, ChannelReader::default())),
                Err(e) => tracing::warn!("vhost-user-blk: cannot watch the backend channel: {e}"),
            }
        }
        // Only the hang-up matters: replies are read synchronously by whoever sent a request.
        match add(
            &self.epoll,
            socket.as_raw_fd(),
            EventSet::READ_HANG_UP,
            SOCKET_TOKEN,
        ) {
            Ok(()) => self.watched = Some((generation, socket)),
            Err(e) => tracing::warn!("vhost-user-blk: cannot watch the backend socket: {e}"),
        }
    }

    /// Stops watching; returns the generation of the connection that was watched.
    fn unwatch_socket(&mut self) -> Option<u64> {
        let (generation, socket) = self.watched.take()?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            socket.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(generation)
    }

    fn unwatch_channel(&mut self) {
        if let Some((channel, _)) = self.channel.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                channel.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Reads what the backend channel holds and answers each complete message as it comes. A
    /// channel the backend closed, or one out of step, is no longer read (its misses then go
    /// unanswered and the backend's accesses fail; the control socket decides about the
    /// connection). At most [`CHANNEL_READS_PER_WAKEUP`] reads per wakeup: a backend that
    /// writes without pause cannot keep the pump from its stop event (epoll is level-triggered,
    /// so the rest is read at the next wakeup).
    fn read_channel(&mut self) {
        let mut buf = [0u8; CHANNEL_READ];
        for _ in 0..CHANNEL_READS_PER_WAKEUP {
            let Some((channel, reader)) = self.channel.as_mut() else {
                return;
            };
            let read = match read_some(channel, &mut buf) {
                Ok(0) => Err("closed by the backend".to_string()),
                Ok(n) => reader.push(&buf[..n]).map_err(|e| e.to_string()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e.to_string()),
            };
            let mut messages = Vec::new();
            let parsed = loop {
                match reader.next_message() {
                    Ok(Some(message)) => messages.push(message),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e.to_string()),
                }
            };
            for message in messages {
                self.answer(message);
            }
            if let Err(why) = read.and(parsed) {
                tracing::warn!("vhost-user-blk: backend request channel: {why}; no longer read");
                self.unwatch_channel();
                return;
            }
        }
    }

    /// Acts on one backend request and replies if it wants a reply.
    fn answer(&mut self, message: BackendMessage) {
        let ok = match message {
            BackendMessage::Miss { iova, perm, .. } => self
                .iotlb
                .as_ref()
                .is_some_and(|i| i.link.answer_miss(&self.mem, &i.regions, iova, perm)),
            BackendMessage::Other { request, .. } => {
                tracing::debug!("vhost-user-blk: backend request {request} not handled");
                false
            }
        };
        let Some(reply) = backend_reply(&message, ok) else {
            return;
        };
        if let Some((channel, _)) = &self.channel {
            // Non-blocking: a backend that does not read its replies loses them, not the pump.
            match write_some(channel, &reply) {
                Ok(n) if n == reply.len() => {}
                result => {
                    tracing::warn!("vhost-user-blk: reply on the backend channel: {result:?}")
                }
            }
        }
    }

    fn connection_lost(&mut self) {
        if let Some(generation) = self.unwatch_socket() {
            self.session().disconnect_generation(generation);
        }
        tracing::warn!("vhost-user-blk: the backend closed the connection; reconnecting");
        // The first attempt comes after one interval: a restarting backend needs a moment.
        self.lost_at = Some(Instant::now());
    }

    fn try_reconnect(&mut self) {
        let result = self.session().reconnect();
        match result {
            Ok(config_changed) => {
                tracing::info!("vhost-user-blk: reconnected to the backend, rings restored");
                self.lost_at = None;
                self.watch_socket();
                if config_changed {
                    let _ = self.interrupt.notify_config();
                }
            }
            Err(VhostUserBlkError::Cancelled) => {
                // A reset is stopping the pump; the stop event follows.
                self.lost_at = None;
            }
            Err(e) if e.worth_retrying() => {
                tracing::debug!("vhost-user-blk: reconnect failed: {e}");
                self.lost_at = Some(Instant::now());
            }
            Err(e) => {
                // Connected, but the backend cannot take the device back (features lost, a
                // refused request): the driver has to reset it.
                tracing::error!("vhost-user-blk: cannot restore the device after reconnect: {e}");
                self.lost_at = None;
                self.watch_socket();
                self.interrupt.needs_reset();
            }
        }
    }
}
