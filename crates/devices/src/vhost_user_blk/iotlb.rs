//! The device IOTLB of a vhost-user disk behind sluice's VT-d (`--iommu vtd`): the backend runs
//! the rings on IOVAs (VIRTIO_F_ACCESS_PLATFORM), asks for translations with IOTLB MISS
//! messages on the backend request channel, and sluice answers from the function's own
//! translated `DmaSpace`, and forwards the guest's invalidations.
//!
//! Protocol (vhost-user spec, "IOMMU support", and QEMU's `hw/virtio/vhost.c`): there is no
//! protocol feature of its own; QEMU requires BACKEND_REQ and REPLY_ACK next to
//! ACCESS_PLATFORM, sends VHOST_USER_IOTLB_MSG (request 22, `struct vhost_iotlb_msg`) with
//! NEED_REPLY on the main socket, and reads MISS messages (backend request 1) on the channel
//! it handed over with SET_BACKEND_REQ_FD. sluice does the same:
//!
//! * MISS (iova, perm): the function's `DmaSpace` asks its translation source (the VT-d walks
//!   the guest's tables for the function's requester id) for the mapping covering `iova`. A
//!   refusal is the unit's fault as for any device access (fault recording registers, fault
//!   event) and nothing is sent — QEMU's `vhost_device_iotlb_miss` sends nothing either; the
//!   backend's access then fails when its wait runs out. Otherwise one UPDATE: the mapping's
//!   whole page (or run) clipped to the guest RAM region it lands in, `uaddr` = sluice's own
//!   virtual address of that RAM (what the memory table gave the backend), perm = every
//!   permission the mapping grants (as QEMU: a page the backend reads now and writes later
//!   needs one UPDATE).
//! * Invalidations: [`IotlbInvalidator`] is a `MappingObserver` of the function's requester
//!   id; for every invalidation that covers it, it sends INVALIDATE for the range and waits for
//!   the backend's ack, all before the invalidation completes for the guest.
//!
//! Why the invalidation is sent from the invalidating thread, bounded, and not queued to the
//! pump: the observer runs with the unit locked, and the pump thread may itself be waiting for
//! that lock (translating a MISS, or reading the used ring through the translated space); a
//! queue the pump drains would wait for the pump while the pump waits for the unit — a
//! deadlock broken only by a timeout. So the main socket gets a second, small lock (the
//! *wire*): every request the session sends holds it for that one bounded exchange, the
//! observer holds it for its INVALIDATE, and no one ever takes the unit's lock while holding
//! it (translations are made before it is taken). The wait is bounded by the device timeout;
//! a backend that does not ack in time, or refuses, has its connection shut down: whatever it
//! cached goes with the connection (the pump reconnects and the new IOTLB starts empty).
//!
//! A MISS answer races invalidations: a translation obtained just before an invalidation may
//! already be stale when the UPDATE goes out. Every invalidation bumps a generation before it
//! takes the wire; an UPDATE is sent only if the generation, read under the wire lock, is still
//! the one seen before the translation — otherwise the translation is made again. So an UPDATE
//! either precedes the INVALIDATE that covers it on the socket, or carries the new tables.
//!
//! Written by hand: the `vhost` crate (0.18) has neither IOTLB_MSG on its frontend nor a
//! backend-channel reader that passes MISS messages on (see `sluice_vhost::iotlb` for the
//! backend side of the same gap).

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use sluice_dma::{DmaSpace, Mapping};
use sluice_iommu::{IovaRange, MappingObserver, MappingView};
use sluice_virtio::DeviceMetrics;
use vm_memory::Permissions;

use super::SharedMemoryRegion;

/// VIRTIO_F_ACCESS_PLATFORM as a feature mask.
pub const FEATURE_ACCESS_PLATFORM: u64 = 1 << 33;
/// VHOST_USER_IOTLB_MSG on the main socket.
const FRONTEND_IOTLB_MSG: u32 = 22;
/// VHOST_USER_BACKEND_IOTLB_MSG on the backend request channel.
const BACKEND_IOTLB_MSG: u32 = 1;
/// `vhost_iotlb_msg.type` values.
pub const IOTLB_MISS: u8 = 1;
pub const IOTLB_UPDATE: u8 = 2;
pub const IOTLB_INVALIDATE: u8 = 3;
/// `vhost_iotlb_msg.perm` values.
pub const ACCESS_RO: u8 = 1;
pub const ACCESS_WO: u8 = 2;
pub const ACCESS_RW: u8 = 3;
/// Header flags: protocol version 1, a reply, a reply wanted.
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_VERSION_MASK: u32 = 0x3;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Bytes of a message header and of `struct vhost_iotlb_msg`.
pub const HEADER_BYTES: usize = 12;
pub const IOTLB_MSG_BYTES: usize = 32;
/// The largest body sluice accepts on the backend channel (the biggest backend request, a
/// shared-memory map, is far smaller): a larger size means the stream is out of step.
pub const MAX_BACKEND_BODY: usize = 4096;
/// Most bytes buffered from the channel before its reader gives up.
const MAX_BUFFERED: usize = 64 * 1024;
/// How often a MISS is translated again when invalidations keep overtaking it.
const MAX_MISS_ATTEMPTS: usize = 8;

/// The device's IOTLB counters (in its metrics, with `--iommu vtd` only).
pub const COUNTERS: [&str; 4] = [
    "iotlb_misses",
    "iotlb_updates",
    "iotlb_invalidations",
    "iotlb_faults",
];
const MISSES: usize = 0;
const UPDATES: usize = 1;
const INVALIDATIONS: usize = 2;
const FAULTS: usize = 3;

/// `struct vhost_iotlb_msg`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IotlbMsg {
    pub iova: u64,
    pub size: u64,
    pub uaddr: u64,
    pub perm: u8,
    pub kind: u8,
}

impl IotlbMsg {
    pub fn to_bytes(self) -> [u8; IOTLB_MSG_BYTES] {
        let mut out = [0u8; IOTLB_MSG_BYTES];
        out[..8].copy_from_slice(&self.iova.to_le_bytes());
        out[8..16].copy_from_slice(&self.size.to_le_bytes());
        out[16..24].copy_from_slice(&self.uaddr.to_le_bytes());
        out[24] = self.perm;
        out[25] = self.kind;
        out
    }

    pub fn from_bytes(bytes: &[u8; IOTLB_MSG_BYTES]) -> Self {
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Self {
            iova: word(0),
            size: word(8),
            uaddr: word(16),
            perm: bytes[24],
            kind: bytes[25],
        }
    }
}

/// A request header followed by `body`.
fn message(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    for word in [request, flags, body.len() as u32] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(body);
    out
}

/// One message the backend sent on its request channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendMessage {
    /// IOTLB MISS: the backend wants a translation for `iova` with `perm`.
    Miss {
        iova: u64,
        perm: u8,
        need_reply: bool,
    },
    /// Anything else (config change, other IOTLB types, ...): not acted on; answered with a
    /// failure if a reply is wanted.
    Other { request: u32, need_reply: bool },
}

impl BackendMessage {
    fn request(&self) -> u32 {
        match *self {
            Self::Miss { .. } => BACKEND_IOTLB_MSG,
            Self::Other { request, .. } => request,
        }
    }

    fn need_reply(&self) -> bool {
        match *self {
            Self::Miss { need_reply, .. } | Self::Other { need_reply, .. } => need_reply,
        }
    }
}

/// Why the backend channel was given up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("backend message with header flags {0:#x} (not protocol version 1)")]
    Version(u32),
    #[error("backend message of {0} bytes (more than {MAX_BACKEND_BODY})")]
    Oversized(u32),
    #[error("backend IOTLB message of {0} bytes (expected {IOTLB_MSG_BYTES})")]
    IotlbSize(u32),
    #[error("more than {MAX_BUFFERED} bytes of backend messages unread")]
    Backlog,
}

/// Splits what arrives on the backend channel (a byte stream) into messages.
#[derive(Debug, Default)]
pub struct ChannelReader {
    buffer: Vec<u8>,
}

impl ChannelReader {
    /// Appends bytes read from the channel.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ChannelError> {
        if self.buffer.len() + bytes.len() > MAX_BUFFERED {
            return Err(ChannelError::Backlog);
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete message, `None` while it is incomplete. After an error the stream is
    /// out of step: the caller gives the channel up.
    pub fn next_message(&mut self) -> Result<Option<BackendMessage>, ChannelError> {
        let Some(header) = self.buffer.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let word = |at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&header[at..at + 4]);
            u32::from_le_bytes(w)
        };
        let (request, flags, size) = (word(0), word(4), word(8));
        if flags & FLAG_VERSION_MASK != FLAG_VERSION_1 {
            return Err(ChannelError::Version(flags));
        }
        let body_len = size as usize;
        if body_len > MAX_BACKEND_BODY {
            return Err(ChannelError::Oversized(size));
        }
        if request == BACKEND_IOTLB_MSG && body_len != IOTLB_MSG_BYTES {
            return Err(ChannelError::IotlbSize(size));
        }
        let Some(body) = self.buffer.get(HEADER_BYTES..HEADER_BYTES + body_len) else {
            return Ok(None);
        };
        let need_reply = flags & FLAG_NEED_REPLY != 0;
        let parsed = match <&[u8; IOTLB_MSG_BYTES]>::try_from(body) {
            Ok(bytes) if request == BACKEND_IOTLB_MSG => {
                let msg = IotlbMsg::from_bytes(bytes);
                if msg.kind == IOTLB_MISS {
                    BackendMessage::Miss {
                        iova: msg.iova,
                        perm: msg.perm,
                        need_reply,
                    }
                } else {
                    BackendMessage::Other {
                        request,
                        need_reply,
                    }
                }
            }
            _ => BackendMessage::Other {
                request,
                need_reply,
            },
        };
        self.buffer.drain(..HEADER_BYTES + body_len);
        Ok(Some(parsed))
    }
}

/// The reply to a backend request that wanted one: `u64` 0 for success.
pub fn backend_reply(request: &BackendMessage, ok: bool) -> Option<Vec<u8>> {
    request.need_reply().then(|| {
        let value: u64 = if ok { 0 } else { 1 };
        message(
            request.request(),
            FLAG_VERSION_1 | FLAG_REPLY,
            &value.to_le_bytes(),
        )
    })
}

/// Access a MISS asks for.
pub fn access_of(perm: u8) -> Option<Permissions> {
    match perm {
        ACCESS_RO => Some(Permissions::Read),
        ACCESS_WO => Some(Permissions::Write),
        ACCESS_RW => Some(Permissions::ReadWrite),
        _ => None,
    }
}

fn perm_of(permissions: Permissions) -> Option<u8> {
    match permissions {
        Permissions::Read => Some(ACCESS_RO),
        Permissions::Write => Some(ACCESS_WO),
        Permissions::ReadWrite => Some(ACCESS_RW),
        Permissions::No => None,
    }
}

/// The UPDATE answering a MISS at `iova` that `mapping` covers: the part of the mapping inside
/// the guest RAM region its target at `iova` lies in, as sluice's virtual addresses. `None` if
/// that target is not guest RAM (the guest mapped an MMIO address: nothing the backend can
/// reach) or the mapping grants nothing.
pub fn update_for(
    mapping: &Mapping,
    iova: u64,
    regions: &[SharedMemoryRegion],
) -> Option<IotlbMsg> {
    let perm = perm_of(mapping.permissions)?;
    let offset = iova.checked_sub(mapping.iova)?;
    if offset >= mapping.length {
        return None;
    }
    let gpa = mapping.target.checked_add(offset)?;
    let region = regions
        .iter()
        .find(|r| gpa >= r.guest_addr && gpa - r.guest_addr < r.size)?;
    let before = (gpa - region.guest_addr).min(offset);
    let after = (region.size - (gpa - region.guest_addr)).min(mapping.length - offset);
    let start = iova - before;
    let size = before + after;
    let uaddr = region.user_addr + (gpa - before - region.guest_addr);
    Some(IotlbMsg {
        iova: start,
        size,
        uaddr,
        perm,
        kind: IOTLB_UPDATE,
    })
}

/// The main socket as the IOTLB messages reach it (see the module doc for the locking).
#[derive(Default)]
pub(super) struct Wire {
    /// The current connection's socket, once the backend has ACCESS_PLATFORM negotiated (an
    /// IOTLB message before that is refused, and there is nothing to invalidate yet).
    socket: Option<Arc<UnixStream>>,
}

/// What the session, the pump and the VT-d's observer share for one device.
pub struct IotlbLink {
    wire: Mutex<Wire>,
    /// Bumped by every invalidation, before it takes the wire.
    generation: AtomicU64,
    timeout: Duration,
    /// The device's metrics, with [`COUNTERS`] (set once they exist).
    metrics: OnceLock<Arc<DeviceMetrics>>,
}

impl IotlbLink {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            wire: Mutex::default(),
            generation: AtomicU64::new(0),
            timeout,
            metrics: OnceLock::new(),
        }
    }

    pub(super) fn set_metrics(&self, metrics: Arc<DeviceMetrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// The wire lock: held by the session for each request it sends on the main socket.
    pub(super) fn lock(&self) -> MutexGuard<'_, Wire> {
        self.wire.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// IOTLB messages may go to `socket` from now on (the backend acked ACCESS_PLATFORM).
    pub(super) fn arm(&self, socket: Arc<UnixStream>) {
        self.lock().socket = Some(socket);
    }

    /// The connection is gone, and the backend's IOTLB with it.
    pub(super) fn disarm(&self) {
        self.lock().socket = None;
    }

    fn count(&self, counter: usize) {
        if let Some(metrics) = self.metrics.get() {
            metrics.count(counter, 1);
        }
    }

    /// Answers one MISS from the function's `space` (see the module doc); returns whether an
    /// UPDATE was sent and acked.
    pub(super) fn answer_miss(
        &self,
        space: &DmaSpace,
        regions: &[SharedMemoryRegion],
        iova: u64,
        perm: u8,
    ) -> bool {
        self.count(MISSES);
        let Some(access) = access_of(perm) else {
            tracing::warn!("vhost-user-blk: IOTLB MISS at {iova:#x} with permission {perm}");
            self.count(FAULTS);
            return false;
        };
        for _ in 0..MAX_MISS_ATTEMPTS {
            let generation = self.generation.load(Ordering::Acquire);
            let Some(mapping) = space.iommu().source_mapping(iova, access) else {
                tracing::debug!("vhost-user-blk: IOTLB MISS at {iova:#x} ({access:?}) faults");
                self.count(FAULTS);
                return false;
            };
            let Some(update) = update_for(&mapping, iova, regions) else {
                tracing::warn!(
                    "vhost-user-blk: IOTLB MISS at {iova:#x}: the guest maps it to {:#x}, \
                     outside guest RAM",
                    mapping.target
                );
                self.count(FAULTS);
                return false;
            };
            let wire = self.lock();
            if self.generation.load(Ordering::Acquire) != generation {
                // An invalidation ran since the translation: it may be stale.
                continue;
            }
            return match self.exchange(&wire, update) {
                Ok(()) => {
                    self.count(UPDATES);
                    true
                }
                Err(e) => {
                    tracing::warn!("vhost-user-blk: IOTLB UPDATE {update:x?}: {e}");
                    false
                }
            };
        }
        tracing::warn!("vhost-user-blk: IOTLB MISS at {iova:#x}: invalidations kept overtaking it");
        false
    }

    /// The guest invalidated `[start, end)`: the backend drops what it cached there before
    /// this returns (or loses its connection).
    pub fn invalidate(&self, start: u64, end: u64) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if end <= start {
            return;
        }
        let wire = self.lock();
        let msg = IotlbMsg {
            iova: start,
            size: end - start,
            kind: IOTLB_INVALIDATE,
            ..IotlbMsg::default()
        };
        match self.exchange(&wire, msg) {
            Ok(()) => self.count(INVALIDATIONS),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
            Err(e) => {
                // The backend may still hold the translation: it must not keep using it.
                tracing::warn!(
                    "vhost-user-blk: IOTLB INVALIDATE {start:#x}..{end:#x}: {e}; dropping the \
                     connection"
                );
                if let Some(socket) = &wire.socket {
                    let _ = socket.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// Sends `msg` with NEED_REPLY and waits (bounded) for a successful ack. The caller holds
    /// the wire. A torn or late exchange shuts the socket down: its framing is lost.
    fn exchange(&self, wire: &Wire, msg: IotlbMsg) -> io::Result<()> {
        let Some(socket) = &wire.socket else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        let deadline = Instant::now() + self.timeout;
        let request = message(
            FRONTEND_IOTLB_MSG,
            FLAG_VERSION_1 | FLAG_NEED_REPLY,
            &msg.to_bytes(),
        );
        let mut reply = [0u8; HEADER_BYTES + 8];
        let result = write_all(socket, &request, deadline)
            .and_then(|()| read_exact(socket, &mut reply, deadline));
        if let Err(e) = result {
            let _ = socket.shutdown(Shutdown::Both);
            return Err(e);
        }
        let word = |at: usize| {
            u32::from_le_bytes([reply[at], reply[at + 1], reply[at + 2], reply[at + 3]])
        };
        if word(0) != FRONTEND_IOTLB_MSG || word(4) & FLAG_REPLY == 0 || word(8) != 8 {
            let _ = socket.shutdown(Shutdown::Both);
            return Err(io::Error::other(format!("unexpected reply {reply:02x?}")));
        }
        let mut value = [0u8; 8];
        value.copy_from_slice(&reply[HEADER_BYTES..]);
        match u64::from_le_bytes(value) {
            0 => Ok(()),
            status => Err(io::Error::other(format!(
                "refused by the backend ({status})"
            ))),
        }
    }
}

/// One read(2) (not recv(2), which is recvfrom: see [`write_all`]).
pub(super) fn read_some(socket: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; the fd is owned by `socket`.
    let n = unsafe { libc::read(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// One sendmsg(2) with MSG_NOSIGNAL: a peer that hung up is EPIPE, never a SIGPIPE (sluice's
/// runtime ignores the signal, but a host process that embeds the frontend — the fuzz
/// target — may not). Not send(2): that is sendto, outside the pump's and vCPUs' filters.
pub(super) fn write_some(socket: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: `msg` points at one iovec over `bytes`, valid for reads of its length (sendmsg
    // does not write through it); the fd is owned by `socket`.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Waits until `socket` has `events` or the deadline passes.
fn wait(socket: &UnixStream, events: i16, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        let mut fd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events,
            revents: 0,
        };
        let millis = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, its count 1.
        let ready = unsafe { libc::poll(&raw mut fd, 1, millis) };
        if ready > 0 {
            return Ok(());
        }
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Writes all of `bytes`, each sendmsg after poll says there is room (the socket stays in
/// blocking mode: the `vhost` crate's frontend shares it). sendmsg and read, not send/recv
/// (sendto/recvfrom): those are outside the filters of the threads that get here (vCPU, pump).
pub(super) fn write_all(
    socket: &UnixStream,
    mut bytes: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    while !bytes.is_empty() {
        wait(socket, libc::POLLOUT, deadline)?;
        match write_some(socket, bytes) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(super) fn read_exact(
    socket: &UnixStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
    while !buf.is_empty() {
        wait(socket, libc::POLLIN, deadline)?;
        match read_some(socket, buf) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The VT-d's observer for the function's requester id (`Vtd::watch`): forwards every
/// invalidation covering it to the backend (see the module doc).
pub struct IotlbInvalidator(pub(super) Arc<IotlbLink>);

impl MappingObserver for IotlbInvalidator {
    fn invalidated(&self, _view: &MappingView<'_>, range: IovaRange) {
        self.0.invalidate(range.start, range.end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<SharedMemoryRegion> {
        let fd = Arc::new(std::fs::File::open("/dev/null").unwrap());
        vec![
            SharedMemoryRegion {
                guest_addr: 0,
                size: 0x10_0000,
                user_addr: 0x7f00_0000_0000,
                fd: fd.clone(),
                offset: 0,
            },
            SharedMemoryRegion {
                guest_addr: 0x1_0000_0000,
                size: 0x10_0000,
                user_addr: 0x7f10_0000_0000,
                fd,
                offset: 0x10_0000,
            },
        ]
    }

    fn mapping(iova: u64, target: u64, length: u64, permissions: Permissions) -> Mapping {
        Mapping {
            iova,
            target,
            length,
            permissions,
        }
    }

    #[test]
    fn an_update_covers_the_page_in_sluices_address_space_with_its_permissions() {
        let page = mapping(0x4000_0000, 0x3000, 0x1000, Permissions::Read);

        let update = update_for(&page, 0x4000_0800, &regions()).unwrap();

        assert_eq!(
            update,
            IotlbMsg {
                iova: 0x4000_0000,
                size: 0x1000,
                uaddr: 0x7f00_0000_3000,
                perm: ACCESS_RO,
                kind: IOTLB_UPDATE,
            }
        );
    }

    #[test]
    fn a_large_mapping_is_clipped_to_the_ram_region_it_lands_in() {
        // Translation off: everything at its own address, far larger than RAM.
        let identity = mapping(0, 0, 1 << 40, Permissions::ReadWrite);

        let low = update_for(&identity, 0x5000, &regions()).unwrap();
        let high = update_for(&identity, 0x1_0000_2000, &regions()).unwrap();

        assert_eq!(
            (low.iova, low.size, low.uaddr),
            (0, 0x10_0000, 0x7f00_0000_0000)
        );
        assert_eq!(
            (high.iova, high.size, high.uaddr),
            (0x1_0000_0000, 0x10_0000, 0x7f10_0000_0000)
        );
        assert_eq!(high.perm, ACCESS_RW);
        assert!(
            update_for(&identity, 0x20_0000, &regions()).is_none(),
            "a hole"
        );
    }

    #[test]
    fn a_mapping_that_does_not_cover_the_miss_gives_nothing() {
        let page = mapping(0x1000, 0x3000, 0x1000, Permissions::ReadWrite);
        let none = mapping(0x1000, 0x3000, 0x1000, Permissions::No);

        assert!(update_for(&page, 0x2000, &regions()).is_none());
        assert!(update_for(&page, 0x0, &regions()).is_none());
        assert!(update_for(&none, 0x1000, &regions()).is_none());
    }

    /// A backend on the other end of `theirs`: reads `messages` IOTLB messages, answers each
    /// with `status` (none if `None`), and returns what it read.
    fn backend(
        theirs: UnixStream,
        messages: usize,
        status: Option<u64>,
    ) -> std::thread::JoinHandle<Vec<IotlbMsg>> {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..messages {
                let mut raw = [0u8; HEADER_BYTES + IOTLB_MSG_BYTES];
                if read_exact(&theirs, &mut raw, Instant::now() + Duration::from_secs(5)).is_err() {
                    break;
                }
                let header: Vec<u32> = raw[..HEADER_BYTES]
                    .chunks(4)
                    .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
                    .collect();
                assert_eq!(
                    header,
                    vec![
                        FRONTEND_IOTLB_MSG,
                        FLAG_VERSION_1 | FLAG_NEED_REPLY,
                        IOTLB_MSG_BYTES as u32
                    ]
                );
                seen.push(IotlbMsg::from_bytes(
                    raw[HEADER_BYTES..].try_into().unwrap(),
                ));
                if let Some(status) = status {
                    let reply = message(
                        FRONTEND_IOTLB_MSG,
                        FLAG_VERSION_1 | FLAG_REPLY,
                        &status.to_le_bytes(),
                    );
                    write_all(&theirs, &reply, Instant::now() + Duration::from_secs(5)).unwrap();
                }
            }
            seen
        })
    }

    fn armed_link(timeout: Duration) -> (Arc<IotlbLink>, UnixStream, Arc<DeviceMetrics>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let link = Arc::new(IotlbLink::new(timeout));
        let metrics = Arc::new(DeviceMetrics::with_counters("test", 1, &COUNTERS));
        link.set_metrics(metrics.clone());
        link.arm(Arc::new(ours));
        (link, theirs, metrics)
    }

    #[test]
    fn an_invalidation_is_acked_before_it_returns() {
        let (link, theirs, metrics) = armed_link(Duration::from_secs(5));
        let backend = backend(theirs, 1, Some(0));

        link.invalidate(0x1000, 0x3000);

        assert_eq!(metrics.counter("iotlb_invalidations"), Some(1));
        let seen = backend.join().unwrap();
        assert_eq!(
            seen,
            vec![IotlbMsg {
                iova: 0x1000,
                size: 0x2000,
                kind: IOTLB_INVALIDATE,
                ..IotlbMsg::default()
            }]
        );
    }

    #[test]
    fn a_refused_or_late_invalidation_drops_the_connection_within_the_timeout() {
        for status in [Some(1), None] {
            let (link, theirs, metrics) = armed_link(Duration::from_millis(100));
            let peer = theirs.try_clone().unwrap();
            let backend = backend(theirs, 1, status);
            let started = Instant::now();

            link.invalidate(0, 1 << 48);

            assert!(started.elapsed() < Duration::from_secs(2), "{status:?}");
            assert_eq!(metrics.counter("iotlb_invalidations"), Some(0));
            assert_eq!(backend.join().unwrap().len(), 1);
            let mut rest = [0u8; 1];
            assert_eq!(
                read_some(&peer, &mut rest).unwrap(),
                0,
                "shut down: {status:?}"
            );
        }
    }

    #[test]
    fn without_a_connection_an_invalidation_sends_nothing() {
        let link = IotlbLink::new(Duration::from_secs(5));

        link.invalidate(0, 0x1000);

        assert!(link.lock().socket.is_none());
    }

    /// IOVA `0x10_0000 + gpa` → `gpa` for the first four pages, read-write.
    #[derive(Debug)]
    struct Shifted;

    impl sluice_dma::TranslationSource for Shifted {
        fn lookup(&self, iova: u64, _access: Permissions) -> Option<Mapping> {
            let page = iova.checked_sub(0x10_0000)? & !0xfff;
            (page < 0x4000).then_some(Mapping {
                iova: 0x10_0000 + page,
                target: page,
                length: 0x1000,
                permissions: Permissions::ReadWrite,
            })
        }
    }

    #[test]
    fn a_miss_is_answered_from_the_space_and_a_refused_one_is_a_fault_with_no_update() {
        use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let host = ram.get_host_address(GuestAddress(0)).unwrap() as u64;
        let regions = vec![SharedMemoryRegion {
            guest_addr: 0,
            size: 0x10_0000,
            user_addr: host,
            fd: Arc::new(std::fs::File::open("/dev/null").unwrap()),
            offset: 0,
        }];
        let space = sluice_dma::translated(ram, Box::new(Shifted));
        let (link, theirs, metrics) = armed_link(Duration::from_secs(5));
        let backend = backend(theirs, 1, Some(0));

        let answered = link.answer_miss(&space, &regions, 0x10_1800, ACCESS_WO);
        let refused = link.answer_miss(&space, &regions, 0x20_0000, ACCESS_RO);
        link.disarm();

        assert!(answered && !refused);
        let seen = backend.join().unwrap();
        assert_eq!(
            seen,
            vec![IotlbMsg {
                iova: 0x10_1000,
                size: 0x1000,
                uaddr: host + 0x1000,
                perm: ACCESS_RW,
                kind: IOTLB_UPDATE,
            }]
        );
        assert_eq!(space.iommu().faults().len(), 1, "the refusal is logged");
        let count = |name| metrics.counter(name).unwrap_or(0);
        assert_eq!(
            (
                count("iotlb_misses"),
                count("iotlb_updates"),
                count("iotlb_faults")
            ),
            (2, 1, 1)
        );
    }

    fn miss_bytes(iova: u64, perm: u8, flags: u32) -> Vec<u8> {
        let body = IotlbMsg {
            iova,
            perm,
            kind: IOTLB_MISS,
            ..IotlbMsg::default()
        };
        message(BACKEND_IOTLB_MSG, flags, &body.to_bytes())
    }

    #[test]
    fn the_channel_reader_reassembles_messages_split_anywhere() {
        let mut bytes = miss_bytes(0x1234_5000, ACCESS_WO, FLAG_VERSION_1);
        bytes.extend(message(2, FLAG_VERSION_1 | FLAG_NEED_REPLY, &[]));
        let mut reader = ChannelReader::default();
        let mut seen = Vec::new();

        for chunk in bytes.chunks(5) {
            reader.push(chunk).unwrap();
            while let Some(message) = reader.next_message().unwrap() {
                seen.push(message);
            }
        }

        assert_eq!(
            seen,
            vec![
                BackendMessage::Miss {
                    iova: 0x1234_5000,
                    perm: ACCESS_WO,
                    need_reply: false
                },
                BackendMessage::Other {
                    request: 2,
                    need_reply: true
                }
            ]
        );
        let reply = backend_reply(&seen[1], false).unwrap();
        assert_eq!(&reply[..4], &2u32.to_le_bytes());
        assert_eq!(reply.len(), HEADER_BYTES + 8);
        assert!(backend_reply(&seen[0], true).is_none());
    }

    #[test]
    fn a_channel_out_of_step_is_an_error() {
        let cases = [
            message(BACKEND_IOTLB_MSG, 0, &[0; 32]),
            message(BACKEND_IOTLB_MSG, FLAG_VERSION_1, &[0; 16]),
            message(7, FLAG_VERSION_1, &vec![0; MAX_BACKEND_BODY + 1]),
        ];
        for bytes in cases {
            let mut reader = ChannelReader::default();
            reader.push(&bytes).unwrap();
            assert!(reader.next_message().is_err(), "{bytes:02x?}");
        }
        let mut reader = ChannelReader::default();
        assert_eq!(
            reader.push(&vec![0; MAX_BUFFERED + 1]),
            Err(ChannelError::Backlog)
        );
    }
}
