//! The bodies of the vhost-user fuzz targets (fuzz/fuzz_targets/ holds thin wrappers), here so
//! that `cargo test` replays their committed corpora (tests/fuzz_corpus.rs):
//! [`vhost_user_messages`] feeds a raw byte stream, [`vhost_user_fds`] plays a script with file
//! descriptors, [`vhost_iotlb`] plays IOTLB messages and lookups against one IOTLB.
//!
//! A scripted hostile frontend for fuzz targets and corpus replay: the vhost-user server with
//! file descriptors — memfds of chosen sizes as guest RAM (SET_MEM_TABLE, ADD_MEM_REG) and
//! inflight areas (SET_INFLIGHT_FD), eventfds as kick / call / err fds (a call fd may be
//! saturated), memfds shrunk or written after the backend mapped them, and kicks.
//!
//! [`run_frontend_script`] serves one connection of a process-wide [`Server`] on a thread and
//! plays the script against it over a socketpair. After each operation the script waits for
//! the answer to a GET_FEATURES, so every message is handled before the next operation
//! (a shrink then really comes after the mapping); queue workers still run on their own.
//! The served device ([`FuzzDevice`], two queues) reads every readable buffer and fills every
//! writable one, so rings that point into shrunk memory are touched.
//!
//! Script: a sequence of operations `[op, params...]`; a parameter past the end reads as 0,
//! and the script ends at its end or when the server drops the connection. `op % 16`:
//! * 0 handshake: SET_OWNER, SET_FEATURES (p0 bit 0: PROTOCOL_FEATURES, bit 1: EVENT_IDX,
//!   bit 3: RING_PACKED, bit 4: ACCESS_PLATFORM — ring and buffer addresses become IOVAs, which
//!   IOTLB_MSG updates sent with op 15 map; bit 6: VHOST_F_LOG_ALL — the rings' writes go to
//!   the log op 14 sets), and if p0 bit 2, SET_PROTOCOL_FEATURES with every
//!   offered one, then if p0 bit 5 SET_BACKEND_REQ_FD with a socket the script never reads
//!   (IOTLB misses go there; the server waits 5 ms for an answer that never comes);
//! * 1 SET_MEM_TABLE of `1 + p0 % 3` new memfds (`1 + p % 16` pages each, p1..); p0 bit 7 makes
//!   the last region one page longer than its file;
//! * 2 ADD_MEM_REG slot `p0 % 4` (region at slot × 1 MiB) backed by a new memfd of
//!   `1 + p1 % 16` pages, or by memfd `p1 % n` if p0 bit 7;
//! * 3 REM_MEM_REG slot `p0 % 4` of `1 + p1 % 16` pages;
//! * 4 SET_INFLIGHT_FD: a new memfd of `p0 * 64` bytes, `1 + p1 % 2` queues of `1 << p2 % 9`;
//! * 5 GET_INFLIGHT_FD for `1 + p0 % 2` queues of `1 << p1 % 9`;
//! * 6 ring setup of queue `p0 % 2`: SET_VRING_NUM `1 << p1 % 9`, SET_VRING_BASE p2 (if p0
//!   bit 6, the packed form: avail and used index p2, both wrap counters set),
//!   SET_VRING_ADDR at slot 0 offsets 0, 0x1000, 0x2000 (plus `p3 * 8` if p0 bit 7);
//! * 7 / 8 / 9 SET_VRING_KICK / _CALL / _ERR of queue `p0 % 2` with a new eventfd (a
//!   blocking call fd at its maximum count if p0 bit 7; no fd if p0 bit 6);
//! * 10 SET_VRING_ENABLE queue `p0 % 2`, `p1 & 1`;
//! * 11 kick queue `p0 % 2` and wait up to 100 ms for its call fd (5 ms without one) or the
//!   connection's end;
//! * 12 write `p2 % 64` script bytes into memfd `p0 % n` at `p1 * 64`;
//! * 13 shrink memfd `p0 % n` to `p1 * 256` bytes;
//! * 14 GET_VRING_BASE queue `p0 % 2`, or if p0 bit 7 SET_LOG_BASE with a new memfd
//!   (`(p0 & 0x3f) * 8` bytes of log in a file of whole pages, at offset 0, or one page in —
//!   past the file's end — if p0 bit 6);
//! * 15 any request `p0` with flags `p1` and `p2 % 64` payload bytes from the script,
//!   carrying `p3 % 3` of the memfds.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use sluice_dma::DmaSpace;
use sluice_virtio::{
    ActivateError, Chain, DeviceMetrics, QueueContext, QueueError, QueueHandler, VirtioDevice,
};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserInflight, VhostUserMemoryRegion, VhostUserSingleMemoryRegion,
    VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::backend::{offered_protocol_features, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::server::{ConnectionEnd, Limits, Server};

const QUEUES: usize = 2;
const MAX_QUEUE_SIZE: u16 = 256;
const PAGE: u64 = 4096;
/// Frontend user address of memory slot 0; slot n is n MiB above.
const USER_BASE: u64 = 0x7f00_0000_0000;
const SLOT_BYTES: u64 = 1 << 20;
/// Most memfds one script creates.
const MAX_MEMFDS: usize = 16;
const MAX_CHAIN_BYTES: usize = 1 << 16;
const EVENT_IDX: u64 = 1 << 29;
const RING_PACKED: u64 = 1 << 34;
const ACCESS_PLATFORM: u64 = crate::iotlb::FEATURE_ACCESS_PLATFORM;
const LOG_ALL: u64 = crate::backend::VHOST_F_LOG_ALL;
/// A packed ring position's wrap counter bit.
const PACKED_WRAP: u32 = 1 << 15;
const HEADER_BYTES: usize = 12;
const VERSION: u32 = 1;
const NO_FD: u64 = 1 << 8;
/// How long the script waits for an answer before it gives up on the connection.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a queue worker after a kick: for its call fd, or without one.
const KICK_WAIT: Duration = Duration::from_millis(100);
const KICK_WAIT_WITHOUT_CALL: Duration = Duration::from_millis(5);

/// A device with two queues that reads every readable and fills every writable buffer.
pub struct FuzzDevice {
    metrics: Arc<DeviceMetrics>,
}

impl FuzzDevice {
    pub fn new() -> Self {
        FuzzDevice {
            metrics: Arc::new(DeviceMetrics::new("vhost-user-fuzz", QUEUES)),
        }
    }
}

impl Default for FuzzDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for FuzzDevice {
    fn device_type(&self) -> u32 {
        0x3f // Not a real device type: nothing may mistake it for one.
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![MAX_QUEUE_SIZE; QUEUES]
    }

    fn device_features(&self) -> u64 {
        (1 << 32) | EVENT_IDX // VERSION_1, RING_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }

    fn queue_count_range(&self) -> RangeInclusive<usize> {
        1..=QUEUES
    }

    fn queue_handler(
        &mut self,
        _index: u16,
        _size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError> {
        Ok(Box::new(TouchEverything))
    }
}

/// The handler of [`FuzzDevice`].
struct TouchEverything;

/// Chains [`FuzzDevice`] served, process-wide (for tests of the seeds).
static CHAINS_SERVED: AtomicU64 = AtomicU64::new(0);

/// How many chains the fuzz device has served so far in this process.
pub fn chains_served() -> u64 {
    CHAINS_SERVED.load(Ordering::Relaxed)
}

impl QueueHandler for TouchEverything {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let Some(chain) = ctx.queue.pop(ctx.mem)? else {
                return Ok(used);
            };
            let head = chain.head_index();
            let written = touch_chain(ctx.mem, &chain);
            ctx.queue.add_used(ctx.mem, head, written)?;
            CHAINS_SERVED.fetch_add(1, Ordering::Relaxed);
            used = true;
        }
    }
}

/// Reads the chain's readable bytes and fills its writable ones; returns the bytes written.
fn touch_chain(mem: &DmaSpace, chain: &Chain<'_>) -> u32 {
    let mut scratch = vec![0u8; MAX_CHAIN_BYTES];
    if let Ok(mut reader) = chain.reader(mem) {
        let _ = reader.read(&mut scratch);
    }
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    let len = writer.available_bytes().min(MAX_CHAIN_BYTES);
    scratch[..len].fill(0xa5);
    writer.write(&scratch[..len]).map_or(0, |n| n as u32)
}

fn server() -> &'static Server<FuzzDevice> {
    static SERVER: OnceLock<Server<FuzzDevice>> = OnceLock::new();
    SERVER.get_or_init(|| {
        let socket =
            std::env::temp_dir().join(format!("sluice-vhost-fuzz-{}.sock", std::process::id()));
        let limits = Limits {
            handshake_timeout: Duration::from_secs(5),
            message_timeout: Duration::from_millis(200),
            // Misses are never answered here: a long wait would only slow the fuzzer down.
            iotlb_miss_wait: Duration::from_millis(5),
            ..Limits::default()
        };
        Server::bind_with(&socket, FuzzDevice::new(), limits).expect("bind the fuzz server")
    })
}

/// What one script did.
#[derive(Debug)]
pub struct ScriptOutcome {
    /// Operations sent and answered (all of them unless the server dropped the connection).
    pub played: usize,
    /// Operations in the script.
    pub operations: usize,
    /// How the server saw the connection end (`None` if its thread panicked).
    pub end: Option<ConnectionEnd>,
}

/// Plays `script` (see the module doc) against a fresh connection of the fuzz server.
pub fn run_frontend_script(script: &[u8]) -> ScriptOutcome {
    let mut outcome = ScriptOutcome {
        played: 0,
        operations: 0,
        end: None,
    };
    let Ok((frontend, backend)) = UnixStream::pair() else {
        return outcome;
    };
    let served = thread::spawn(move || server().serve_connection(backend));
    if let Ok(mut player) = Player::new(frontend) {
        (outcome.played, outcome.operations) = player.play(script);
        let _ = player.socket.shutdown(Shutdown::Write);
        // Replies still coming are read and dropped, so the server never blocks on them.
        player.drain();
    }
    outcome.end = served.join().ok();
    outcome
}

/// The frontend's side of one scripted connection.
struct Player {
    socket: UnixStream,
    memfds: Vec<File>,
    kicks: [Option<EventFd>; QUEUES],
    calls: [Option<RawFd>; QUEUES],
    /// Other fds handed to the backend, kept open for the connection's lifetime.
    keep: Vec<EventFd>,
    /// Our end of the backend request channel, never read.
    channel: Option<UnixStream>,
}

/// Reads script parameters; past the end they read as 0.
struct Params<'a> {
    bytes: &'a [u8],
}

impl Params<'_> {
    fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&b, rest)) => {
                self.bytes = rest;
                b
            }
            None => 0,
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let (taken, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        taken.to_vec()
    }
}

impl Player {
    fn new(socket: UnixStream) -> io::Result<Self> {
        socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        socket.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(Player {
            socket,
            memfds: Vec::new(),
            kicks: [None, None],
            calls: [None, None],
            keep: Vec::new(),
            channel: None,
        })
    }

    /// Returns (operations played, operations in the script).
    fn play(&mut self, script: &[u8]) -> (usize, usize) {
        let mut params = Params { bytes: script };
        let (mut played, mut operations) = (0, 0);
        while !params.bytes.is_empty() {
            let op = params.byte();
            operations += 1;
            if played == operations - 1
                && self.apply(op % 16, &mut params).is_ok()
                && self.sync().is_ok()
            {
                played += 1;
            } else {
                // The server dropped the connection (or stopped answering); count the rest.
                self.apply_nothing(op % 16, &mut params);
            }
        }
        (played, operations)
    }

    /// Consumes an operation's parameters without doing anything.
    fn apply_nothing(&mut self, op: u8, p: &mut Params<'_>) {
        let count = match op {
            0 | 7..=9 | 11 | 14 => 1,
            1 => 1 + usize::from(p.bytes.first().map_or(0, |b| b % 3)),
            2 | 3 | 5 | 10 | 13 => 2,
            4 => 3,
            6 => 3 + usize::from(p.bytes.first().is_some_and(|b| b & 0x80 != 0)),
            12 => {
                let len = p.bytes.get(2).map_or(0, |b| b % 64);
                3 + usize::from(len)
            }
            _ => 4 + usize::from(p.bytes.get(2).map_or(0, |b| b % 64)),
        };
        p.take(count);
    }

    fn apply(&mut self, op: u8, p: &mut Params<'_>) -> io::Result<()> {
        match op {
            0 => self.handshake(p.byte()),
            1 => self.set_mem_table(p),
            2 => self.add_region(p),
            3 => {
                let (slot, pages) = (p.byte() % 4, 1 + u64::from(p.byte() % 16));
                let body = single_region(slot, pages * PAGE);
                self.send(FrontendReq::REM_MEM_REG, &body, &[])
            }
            4 => self.set_inflight(p),
            5 => {
                let (queues, size) = (1 + u16::from(p.byte() % 2), 1u16 << (p.byte() % 9));
                let body = VhostUserInflight::new(0, 0, queues, size);
                self.send(FrontendReq::GET_INFLIGHT_FD, body.as_slice(), &[])
            }
            6 => self.set_up_ring(p),
            7..=9 => self.set_vring_fd(op, p.byte()),
            10 => {
                let (queue, enable) = (u32::from(p.byte() % 2), u32::from(p.byte() & 1));
                let body = VhostUserVringState::new(queue, enable);
                self.send(FrontendReq::SET_VRING_ENABLE, body.as_slice(), &[])
            }
            11 => {
                let queue = usize::from(p.byte() % 2);
                if let Some(kick) = &self.kicks[queue] {
                    let _ = kick.write(1);
                    self.await_worker(queue);
                }
                Ok(())
            }
            12 => self.write_memfd(p),
            13 => {
                let (index, size) = (p.byte(), u64::from(p.byte()) * 256);
                if let Some(file) = self.memfd(index) {
                    let _ = file.set_len(size);
                }
                Ok(())
            }
            14 => {
                let choice = p.byte();
                if choice & 0x80 != 0 {
                    return self.set_log_base(choice);
                }
                let body = VhostUserVringState::new(u32::from(choice % 2), 0);
                self.send(FrontendReq::GET_VRING_BASE, body.as_slice(), &[])
            }
            _ => self.any_request(p),
        }
    }

    fn handshake(&mut self, choice: u8) -> io::Result<()> {
        self.send(FrontendReq::SET_OWNER, &[], &[])?;
        let mut features = (1u64 << 32) | EVENT_IDX;
        if choice & 1 != 0 {
            features |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        if choice & 2 == 0 {
            features &= !EVENT_IDX;
        }
        if choice & 8 != 0 {
            features |= RING_PACKED;
        }
        if choice & 0x10 != 0 {
            features |= ACCESS_PLATFORM;
        }
        if choice & 0x40 != 0 {
            features |= LOG_ALL;
        }
        self.send(FrontendReq::SET_FEATURES, &features.to_le_bytes(), &[])?;
        if choice & 4 == 0 {
            return Ok(());
        }
        let protocol = offered_protocol_features().bits();
        self.send(
            FrontendReq::SET_PROTOCOL_FEATURES,
            &protocol.to_le_bytes(),
            &[],
        )?;
        if choice & 0x20 == 0 {
            return Ok(());
        }
        let (ours, theirs) = UnixStream::pair()?;
        self.channel = Some(ours);
        self.send(FrontendReq::SET_BACKEND_REQ_FD, &[], &[theirs.as_raw_fd()])
    }

    /// SET_LOG_BASE (see the module doc for what `choice` means).
    fn set_log_base(&mut self, choice: u8) -> io::Result<()> {
        let size = u64::from(choice & 0x3f) * 8;
        let offset = if choice & 0x40 != 0 { PAGE } else { 0 };
        let Some(index) = self.new_memfd(size.next_multiple_of(PAGE)) else {
            return Ok(());
        };
        let fd = self.memfds[index].as_raw_fd();
        let mut body = size.to_le_bytes().to_vec();
        body.extend_from_slice(&offset.to_le_bytes());
        self.send(FrontendReq::SET_LOG_BASE, &body, &[fd])
    }

    fn set_mem_table(&mut self, p: &mut Params<'_>) -> io::Result<()> {
        let choice = p.byte();
        let count = 1 + usize::from(choice % 3);
        let mut body = Vec::new();
        body.extend_from_slice(&(count as u32).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        let mut fds = Vec::new();
        for slot in 0..count {
            let pages = 1 + u64::from(p.byte() % 16);
            let Some(index) = self.new_memfd(pages * PAGE) else {
                return Ok(());
            };
            let longer = choice & 0x80 != 0 && slot == count - 1;
            let size = (pages + u64::from(longer)) * PAGE;
            let region = region(slot as u8, size);
            body.extend_from_slice(region.as_slice());
            fds.push(self.memfds[index].as_raw_fd());
        }
        self.send(FrontendReq::SET_MEM_TABLE, &body, &fds)
    }

    fn add_region(&mut self, p: &mut Params<'_>) -> io::Result<()> {
        let (choice, size_or_index) = (p.byte(), p.byte());
        let slot = choice % 4;
        let index = if choice & 0x80 != 0 && !self.memfds.is_empty() {
            usize::from(size_or_index) % self.memfds.len()
        } else {
            match self.new_memfd((1 + u64::from(size_or_index % 16)) * PAGE) {
                Some(index) => index,
                None => return Ok(()),
            }
        };
        let size = self.memfds[index]
            .metadata()
            .map_or(PAGE, |m| m.len().max(PAGE));
        let body = single_region(slot, size);
        let fd = self.memfds[index].as_raw_fd();
        self.send(FrontendReq::ADD_MEM_REG, &body, &[fd])
    }

    fn set_inflight(&mut self, p: &mut Params<'_>) -> io::Result<()> {
        let size = u64::from(p.byte()) * 64;
        let (queues, queue_size) = (1 + u16::from(p.byte() % 2), 1u16 << (p.byte() % 9));
        let Some(index) = self.new_memfd(size) else {
            return Ok(());
        };
        let body = VhostUserInflight::new(size, 0, queues, queue_size);
        let fd = self.memfds[index].as_raw_fd();
        self.send(FrontendReq::SET_INFLIGHT_FD, body.as_slice(), &[fd])
    }

    fn set_up_ring(&mut self, p: &mut Params<'_>) -> io::Result<()> {
        let choice = p.byte();
        let queue = u32::from(choice % 2);
        let size = 1u32 << (p.byte() % 9);
        let base = u32::from(p.byte());
        let base = if choice & 0x40 != 0 {
            let position = base | PACKED_WRAP;
            position | position << 16
        } else {
            base
        };
        let skew = if choice & 0x80 != 0 {
            u64::from(p.byte()) * 8
        } else {
            0
        };
        let num = VhostUserVringState::new(queue, size);
        self.send(FrontendReq::SET_VRING_NUM, num.as_slice(), &[])?;
        let base = VhostUserVringState::new(queue, base);
        self.send(FrontendReq::SET_VRING_BASE, base.as_slice(), &[])?;
        let addr = VhostUserVringAddr {
            index: queue,
            flags: 0,
            descriptor: USER_BASE + skew,
            used: USER_BASE + 0x2000 + skew,
            available: USER_BASE + 0x1000 + skew,
            log: 0,
        };
        self.send(FrontendReq::SET_VRING_ADDR, addr.as_slice(), &[])
    }

    fn set_vring_fd(&mut self, op: u8, choice: u8) -> io::Result<()> {
        let queue = usize::from(choice % 2);
        let request = match op {
            7 => FrontendReq::SET_VRING_KICK,
            8 => FrontendReq::SET_VRING_CALL,
            _ => FrontendReq::SET_VRING_ERR,
        };
        if choice & 0x40 != 0 {
            let body = (queue as u64 | NO_FD).to_le_bytes();
            return self.send(request, &body, &[]);
        }
        let saturated = op == 8 && choice & 0x80 != 0;
        let event = EventFd::new(if saturated { 0 } else { EFD_NONBLOCK })?;
        if saturated {
            event.write(0xffff_ffff_ffff_fffe)?;
        }
        let fd = event.as_raw_fd();
        let sent = self.send(request, &(queue as u64).to_le_bytes(), &[fd]);
        match op {
            7 => self.kicks[queue] = Some(event),
            8 => {
                // A saturated call fd is always readable: no use waiting on it.
                self.calls[queue] = (!saturated).then_some(fd);
                self.keep.push(event);
            }
            _ => self.keep.push(event),
        }
        sent
    }

    fn write_memfd(&mut self, p: &mut Params<'_>) -> io::Result<()> {
        let (index, offset, len) = (p.byte(), u64::from(p.byte()) * 64, p.byte() % 64);
        let data = p.take(usize::from(len));
        if let Some(file) = self.memfd(index) {
            // Only inside the file: writing past its end would grow it back.
            let size = file.metadata().map_or(0, |m| m.len());
            if offset + data.len() as u64 <= size {
                let _ = file.write_all_at(&data, offset);
            }
        }
        Ok(())
    }

    fn any_request(&mut self, p: &mut Params<'_>) -> io::Result<()> {
        let (request, flags) = (u32::from(p.byte()), u32::from(p.byte()));
        let len = p.byte() % 64;
        let fd_count = usize::from(p.byte() % 3).min(self.memfds.len());
        let payload = p.take(usize::from(len));
        let fds: Vec<RawFd> = self.memfds[..fd_count]
            .iter()
            .map(AsRawFd::as_raw_fd)
            .collect();
        self.send_raw(request, flags, &payload, &fds)
    }

    /// Gives the queue worker a moment with the kick: until the call fd fires, the server
    /// drops the connection, or [`KICK_WAIT`] passes ([`KICK_WAIT_WITHOUT_CALL`] if the
    /// queue has no call fd).
    fn await_worker(&self, queue: usize) {
        let mut fds = vec![libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        }];
        let mut wait = KICK_WAIT_WITHOUT_CALL;
        if let Some(call) = self.calls[queue] {
            fds.push(libc::pollfd {
                fd: call,
                events: libc::POLLIN,
                revents: 0,
            });
            wait = KICK_WAIT;
        }
        let millis = wait.as_millis() as i32;
        // SAFETY: valid pollfds for the duration of the call; the result is only a hint.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    }

    fn new_memfd(&mut self, size: u64) -> Option<usize> {
        if self.memfds.len() >= MAX_MEMFDS {
            return None;
        }
        // SAFETY: NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).ok()?;
        self.memfds.push(file);
        Some(self.memfds.len() - 1)
    }

    fn memfd(&self, index: u8) -> Option<&File> {
        match self.memfds.len() {
            0 => None,
            n => self.memfds.get(usize::from(index) % n),
        }
    }

    fn send(&mut self, request: FrontendReq, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        self.send_raw(request as u32, VERSION, body, fds)
    }

    fn send_raw(&mut self, request: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut message = Vec::with_capacity(HEADER_BYTES + body.len());
        for word in [request, flags, body.len() as u32] {
            message.extend_from_slice(&word.to_le_bytes());
        }
        message.extend_from_slice(body);
        if fds.is_empty() {
            return self.socket.write_all(&message);
        }
        let sent = self
            .socket
            .send_with_fds(&[&message[..]], fds)
            .map_err(io::Error::other)?;
        if sent != message.len() {
            self.socket.write_all(&message[sent..])?;
        }
        Ok(())
    }

    /// Sends GET_FEATURES and reads replies until its own: everything sent before is handled.
    fn sync(&mut self) -> io::Result<()> {
        self.send(FrontendReq::GET_FEATURES, &[], &[])?;
        loop {
            let mut header = [0u8; HEADER_BYTES];
            self.socket.read_exact(&mut header)?;
            let word = |i: usize| {
                u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]])
            };
            let size = word(8) as usize;
            if size > 4096 {
                return Err(io::Error::other("reply too large"));
            }
            let mut body = vec![0u8; size];
            self.socket.read_exact(&mut body)?;
            if word(0) == FrontendReq::GET_FEATURES as u32 {
                return Ok(());
            }
        }
    }

    fn drain(&mut self) {
        let mut sink = [0u8; 4096];
        while matches!(self.socket.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// Region at memory slot `slot` of `size` bytes (its own memfd, offset 0).
fn region(slot: u8, size: u64) -> VhostUserMemoryRegion {
    let offset = u64::from(slot) * SLOT_BYTES;
    VhostUserMemoryRegion::new(offset, size, USER_BASE + offset, 0)
}

/// ADD_MEM_REG / REM_MEM_REG body for slot `slot`.
fn single_region(slot: u8, size: u64) -> Vec<u8> {
    let region = region(slot, size);
    let mut body = 0u64.to_le_bytes().to_vec(); // padding
    body.extend_from_slice(region.as_slice());
    debug_assert_eq!(body.len(), size_of::<VhostUserSingleMemoryRegion>());
    body
}

/// Longest script [`vhost_user_fds`] plays: past a few hundred operations scripts only repeat
/// themselves, slower.
pub const MAX_SCRIPT_BYTES: usize = 1024;

/// The `vhost_user_fds` target: plays (the first [`MAX_SCRIPT_BYTES`] of) `data` as a script.
/// The server must survive it (a SIGBUS from a shrunk file ends only that connection), never
/// hang, and keep serving.
pub fn vhost_user_fds(data: &[u8]) {
    let _ = run_frontend_script(&data[..data.len().min(MAX_SCRIPT_BYTES)]);
}

/// The `vhost_user_messages` target: a raw byte stream as if from a frontend — malformed,
/// truncated and out-of-order messages, and messages whose file descriptors are missing (a
/// byte stream cannot carry SCM_RIGHTS). Writes `data` into one end of a socketpair, closes it
/// for writing, and hands the other end to `serve` (e.g. `|stream| { server.serve_connection(
/// stream); }`: the caller picks the device), which must end the connection cleanly — never
/// panic, never hang.
pub fn vhost_user_messages(data: &[u8], serve: impl FnOnce(UnixStream)) {
    let (mut frontend, backend) = UnixStream::pair().expect("socketpair");
    // The socket buffer holds far more than libFuzzer's default input size, so this never blocks.
    if frontend.write_all(data).is_err() {
        return;
    }
    // EOF after the input; replies stay unread in our receive buffer (no SIGPIPE).
    frontend
        .shutdown(Shutdown::Write)
        .expect("shutdown of a socketpair end");
    serve(backend);
}

/// The memory table [`vhost_iotlb`] runs against: two 1 MiB regions.
const IOTLB_MEMORY: [crate::iotlb::UserRange; 2] = [
    crate::iotlb::UserRange {
        user_addr: 0x7f00_0000_0000,
        size: 1 << 20,
        gpa: 0,
    },
    crate::iotlb::UserRange {
        user_addr: 0x7f00_0010_0000,
        size: 1 << 20,
        gpa: 0x4000_0000,
    },
];

/// Bytes per [`vhost_iotlb`] operation: op, access, a `vhost_iotlb_msg`.
const IOTLB_OP_BYTES: usize = 2 + crate::iotlb::IOTLB_MSG_BYTES;

fn access_of(byte: u8) -> vm_memory::Permissions {
    match byte % 3 {
        0 => vm_memory::Permissions::Read,
        1 => vm_memory::Permissions::Write,
        _ => vm_memory::Permissions::ReadWrite,
    }
}

/// Whether `[gpa, gpa + len)` lies inside one region of `IOTLB_MEMORY`.
fn inside_iotlb_memory(gpa: u64, len: u64) -> bool {
    IOTLB_MEMORY.iter().any(|r| {
        gpa >= r.gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= r.gpa + r.size)
    })
}

/// The `vhost_iotlb` target: one connection's IOTLB (no backend channel: misses fail at once)
/// over `IOTLB_MEMORY`, driven by 34-byte operations `[op, access, vhost_iotlb_msg]`
/// (`access % 3`: read, write, read-write). `op % 4`:
/// * 0 the message as given (any type, permission, range);
/// * 1 the message as an UPDATE whose user address is folded into the memory table
///   (`uaddr % 2 MiB` from the first region's start), so that updates mostly succeed;
/// * 2 a queue's lookup of `iova` for the access;
/// * 3 a ring's lookup of `[iova, iova + size % 64 KiB)` for the access.
///
/// Checks beyond "never panics": the entries stay bounded, non-empty and non-overlapping; a
/// lookup's mapping covers the IOVA, allows the access and lies inside one memory region; a
/// ring lookup's guest range lies inside one region; after an accepted INVALIDATE its first
/// byte no longer translates; an accepted UPDATE translates its first byte to the user
/// address's guest address with its permission.
pub fn vhost_iotlb(data: &[u8]) {
    use crate::iotlb::{Iotlb, IotlbMsg, IotlbSource, IOTLB_INVALIDATE, IOTLB_UPDATE};
    use sluice_dma::TranslationSource;

    let iotlb = Arc::new(Iotlb::with_miss_wait(Duration::ZERO));
    iotlb.set_memory(IOTLB_MEMORY.to_vec());
    let source = IotlbSource(iotlb.clone());
    for op in data.chunks_exact(IOTLB_OP_BYTES) {
        let access = access_of(op[1]);
        let mut msg = IotlbMsg::default();
        msg.as_mut_slice().copy_from_slice(&op[2..]);
        match op[0] % 4 {
            0 | 1 => {
                if op[0] % 4 == 1 {
                    msg.kind = IOTLB_UPDATE;
                    msg.uaddr = IOTLB_MEMORY[0].user_addr + msg.uaddr % (2 << 20);
                }
                let accepted = iotlb.handle(&msg).is_ok();
                if accepted && msg.kind == IOTLB_INVALIDATE {
                    assert!(
                        source
                            .lookup(msg.iova, vm_memory::Permissions::Read)
                            .is_none(),
                        "{msg:x?}: still translates after the invalidation"
                    );
                }
                if accepted && msg.kind == IOTLB_UPDATE {
                    let m = source
                        .lookup(msg.iova, vm_memory::Permissions::No)
                        .unwrap_or_else(|| panic!("{msg:x?}: accepted but not translated"));
                    let region = IOTLB_MEMORY
                        .iter()
                        .find(|r| (r.user_addr..r.user_addr + r.size).contains(&msg.uaddr))
                        .expect("an accepted update names the memory table");
                    assert_eq!(m.target, region.gpa + (msg.uaddr - region.user_addr));
                    assert_eq!((m.iova, m.length), (msg.iova, msg.size));
                }
            }
            2 => {
                if let Some(m) = source.lookup(msg.iova, access) {
                    assert!(m.iova <= msg.iova && msg.iova - m.iova < m.length, "{m:x?}");
                    assert!(m.permissions.allow(access), "{m:x?} for {access:?}");
                    assert!(inside_iotlb_memory(m.target, m.length), "{m:x?}");
                }
            }
            _ => {
                let len = msg.size % (64 << 10);
                if let Ok(Some(gpa)) = iotlb.resolve_contiguous(msg.iova, len, access) {
                    assert!(inside_iotlb_memory(gpa, len.max(1)), "{gpa:#x} + {len:#x}");
                }
            }
        }
        iotlb.check_entries().unwrap_or_else(|e| panic!("{e}"));
    }
}
