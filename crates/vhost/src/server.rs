//! [`Server`]: the listening socket; serves every frontend connection on its own thread.
//!
//! Where it listens: [`Server::bind`] never deletes what it did not create. An existing
//! regular file, directory or other non-socket at the path is refused (the image given as
//! `--socket` stays an image); a socket someone answers on (a connect probe) belongs to a
//! live server and is refused; only a stale socket (connection refused) is replaced. When
//! the server goes away it removes its socket — if the path still names the socket it bound.
//!
//! Connections: each accepted connection is served on its own thread, so a frontend that
//! connects and stalls delays nobody else. Per connection ([`Limits`]): it must claim the
//! device (SET_OWNER) within `handshake_timeout`, each message must arrive whole within
//! `message_timeout` once it started, its memory table may map at most `max_mapped_bytes`
//! (and [`crate::memory::MAX_MEM_SLOTS`] regions), and a frontend that stops reading the
//! replies is dropped before a reply could block. At most `max_connections` connections are
//! served at once; more are closed as soon as they are accepted. The `vhost` crate reads and
//! writes with blocking calls that retry on timeouts, so these bounds are enforced here,
//! before the crate is handed a message: the server waits (poll) until the whole message is
//! on the socket (peeked, fds left in place), with the deadline, then lets the crate read it.
//!
//! Sharing the device: one device model (and its open, locked image) serves every connection
//! and outlives them, so a frontend that reconnects — QEMU's `reconnect=N` — finds the same
//! disk. Any connection gets its queries answered (GET_FEATURES, GET_PROTOCOL_FEATURES, ...),
//! but only one at a time drives the device: SET_OWNER claims it and a second connection's
//! SET_OWNER is refused (that connection is dropped with a log line) until the owner leaves.
//! Two live frontends writing one disk would each cache and overwrite the other's
//! filesystem — silent corruption — and two on one tap or entropy queue would steal each
//! other's buffers; a per-connection device instance over a shared image would not prevent
//! the first. A frontend that owns the device is never timed out for being idle (its guest
//! may just be idle); its connection ends when it closes, misbehaves or its shared memory
//! faults ([`crate::sigbus`]).
//!
//! A connection ends when the frontend closes it or sends anything the backend refuses (one
//! log line says why); its rings are stopped.
//!
//! One message is answered here rather than by the `vhost` crate: SET_VRING_ENABLE before the
//! first SET_FEATURES. QEMU 7.2's vhost-user-net sends it as soon as the guest acks its
//! features (taking VHOST_USER_F_PROTOCOL_FEATURES as negotiated once GET_FEATURES offered it),
//! and only later starts the device with SET_FEATURES; the crate refuses the message until
//! SET_FEATURES carried that bit. The server peeks at each header and, in that window only,
//! reads the 8-byte body itself and hands it to the backend.
//!
//! Two more are read here because the `vhost` crate (0.18) lacks them (see [`crate::iotlb`]):
//! VHOST_USER_IOTLB_MSG (its 32-byte body goes to the connection's IOTLB; a refused update
//! is answered with a failure and logged, the connection stays) and SET_BACKEND_REQ_FD once
//! BACKEND_REQ is negotiated (the crate would wrap the socket in a type that cannot send
//! IOTLB misses). A message of either kind with an unexpected size is left to the crate,
//! which refuses it.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserU64, VhostUserVringState, MAX_MSG_SIZE,
};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError, VhostUserBackendReqHandlerMut};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use sluice_virtio::{NotifyPolicy, VirtioDevice};

use crate::backend::{Backend, ConnectionResources, DeviceClaim};
use crate::iotlb::{IotlbMsg, IOTLB_MSG_BYTES};
use crate::sigbus::Tripwire;

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed the socket.
    Closed,
    /// The backend refused a message (or the socket failed) and dropped the connection.
    Dropped(VhostError),
    /// The server dropped the connection for breaking a rule of its own (see the module doc).
    Refused(String),
}

/// Per-connection bounds (see the module doc).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time from accept to SET_OWNER.
    pub handshake_timeout: Duration,
    /// Time for a started message to arrive whole.
    pub message_timeout: Duration,
    /// Guest memory one connection may map.
    pub max_mapped_bytes: u64,
    /// Offer packed virtqueues (VIRTIO_F_RING_PACKED); off serves split rings only.
    pub offer_packed: bool,
    /// How long a queue worker waits for the IOTLB update answering its miss
    /// ([`crate::iotlb`]).
    pub iotlb_miss_wait: Duration,
    /// How the rings' queue workers wait for requests and signal completions (`serve blk
    /// --disk ...,notify=`: a latency-sensitive guest's disk may poll, a bulk one interrupt).
    pub notify: NotifyPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
            message_timeout: Duration::from_secs(10),
            // Guest RAM, which QEMU shares whole: room for very large guests, not for a
            // frontend reserving the address space.
            max_mapped_bytes: 4 << 40,
            offer_packed: true,
            iotlb_miss_wait: crate::iotlb::MISS_WAIT,
            notify: NotifyPolicy::Interrupt,
        }
    }
}

/// Unread reply bytes past which a frontend counts as not reading its replies.
const MAX_UNREAD_REPLIES: usize = 64 << 10;
/// Bytes in a message header: request, flags, payload size (native-endian u32s).
const HEADER_BYTES: usize = 12;
/// How often a torn message is looked at again.
const TORN_MESSAGE_RECHECK: Duration = Duration::from_millis(2);

/// A vhost-user socket serving one device.
pub struct Server<D: VirtioDevice> {
    listener: UnixListener,
    socket: BoundSocket,
    shared: Arc<Shared<D>>,
}

/// What the connections of one server share.
struct Shared<D: VirtioDevice> {
    device: Arc<Mutex<D>>,
    claim: Arc<DeviceClaim>,
    limits: Limits,
    connections: AtomicUsize,
}

/// The socket file this server created; removed when the server goes away.
#[derive(Debug, Clone)]
struct BoundSocket {
    path: PathBuf,
    /// (device, inode) of the socket file, to leave alone a file someone put there later.
    identity: (u64, u64),
}

impl BoundSocket {
    fn remove(&self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.identity);
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A handle that removes the server's socket file (for signal handlers: see `sluice serve`).
#[derive(Debug, Clone)]
pub struct SocketRemover(BoundSocket);

impl SocketRemover {
    /// Removes the socket file if it is still the one the server bound.
    pub fn remove(&self) {
        self.0.remove();
    }
}

impl<D: VirtioDevice + 'static> Server<D> {
    /// Listens on `path` with the default [`Limits`] (see the module doc for what may be at
    /// `path` already).
    pub fn bind(path: &Path, device: D) -> io::Result<Self> {
        Self::bind_with(path, device, Limits::default())
    }

    /// Listens on `path`, serving connections within `limits`.
    pub fn bind_with(path: &Path, device: D, limits: Limits) -> io::Result<Self> {
        clear_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => io::Error::new(
                e.kind(),
                "something appeared at the path while binding (address in use)",
            ),
            _ => e,
        })?;
        let meta = fs::symlink_metadata(path)?;
        Ok(Server {
            listener,
            socket: BoundSocket {
                path: path.to_owned(),
                identity: (meta.dev(), meta.ino()),
            },
            shared: Arc::new(Shared {
                device: Arc::new(Mutex::new(device)),
                claim: Arc::default(),
                limits,
                connections: AtomicUsize::new(0),
            }),
        })
    }

    /// The device, shared with the connections.
    pub fn device(&self) -> Arc<Mutex<D>> {
        Arc::clone(&self.shared.device)
    }

    /// Something that removes this server's socket file, usable after the server is moved.
    pub fn socket_remover(&self) -> SocketRemover {
        SocketRemover(self.socket.clone())
    }

    /// Accepts connections and serves each on its own thread; returns only if accepting
    /// fails for good.
    pub fn run(&self) -> io::Result<()> {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if transient_accept_error(&e) => {
                    tracing::warn!("vhost-user: accept failed: {e}; retrying");
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.spawn_connection(stream);
        }
    }

    fn spawn_connection(&self, stream: UnixStream) {
        let Some(slot) = ConnectionSlot::take(&self.shared) else {
            tracing::warn!(
                "vhost-user: refusing a connection: {} are being served already",
                self.shared.limits.max_connections
            );
            return;
        };
        let shared = Arc::clone(&self.shared);
        let kind = sluice_sandbox::ThreadKind::Connection;
        let spawned = sluice_sandbox::spawn(kind, "vhost-user-conn".into(), move || {
            let _slot = slot;
            match sluice_sandbox::contain_connection(stream, |s| shared.serve(s)) {
                Ok(end) => log_end(&end),
                Err(panicked) => tracing::error!("vhost-user: {panicked}"),
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("vhost-user: cannot start a connection thread: {e}");
        }
    }

    /// Serves one connected frontend on this thread until it goes away or is dropped.
    pub fn serve_connection(&self, stream: UnixStream) -> ConnectionEnd {
        self.shared.serve(stream)
    }
}

impl<D: VirtioDevice> Drop for Server<D> {
    fn drop(&mut self) {
        self.socket.remove();
    }
}

fn log_end(end: &ConnectionEnd) {
    match end {
        ConnectionEnd::Closed => tracing::info!("vhost-user: frontend disconnected"),
        ConnectionEnd::Dropped(e) => tracing::warn!("vhost-user: dropping the connection: {e}"),
        ConnectionEnd::Refused(why) => {
            tracing::warn!("vhost-user: dropping the connection: {why}")
        }
    }
}

/// accept(2) failures that say nothing about the listener (a peer gone, fds exhausted).
fn transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

/// Makes `path` free to bind: nothing there, or a stale socket (removed). See the module doc.
fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let refuse = |what: &str| {
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            what.to_owned(),
        ))
    };
    if meta.is_dir() {
        return refuse("it is a directory (give the path of a socket file to create)");
    }
    if !meta.file_type().is_socket() {
        return refuse("it exists and is not a socket (refusing to replace it)");
    }
    match UnixStream::connect(path) {
        Ok(_) => refuse("a server is already listening on it"),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => fs::remove_file(path),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("it is a socket that cannot be probed ({e}); not replacing it"),
        )),
    }
}

/// One of the `max_connections` places; given back when dropped.
struct ConnectionSlot<D: VirtioDevice> {
    shared: Arc<Shared<D>>,
}

impl<D: VirtioDevice> ConnectionSlot<D> {
    fn take(shared: &Arc<Shared<D>>) -> Option<Self> {
        let max = shared.limits.max_connections;
        shared
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnectionSlot {
            shared: Arc::clone(shared),
        })
    }
}

impl<D: VirtioDevice> Drop for ConnectionSlot<D> {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What waiting for the next message found.
enum NextMessage {
    /// A whole message (or one the crate will refuse by its header) is on the socket.
    Ready,
    Closed,
    Refused(String),
}

impl<D: VirtioDevice> Shared<D> {
    fn serve(&self, stream: UnixStream) -> ConnectionEnd {
        let tripwire = match Tripwire::new() {
            Ok(tripwire) => Arc::new(tripwire),
            Err(e) => return ConnectionEnd::Dropped(VhostError::SocketError(e)),
        };
        let resources = ConnectionResources {
            claim: Arc::clone(&self.claim),
            tripwire: Arc::clone(&tripwire),
            max_mapped_bytes: self.limits.max_mapped_bytes,
            offer_packed: self.limits.offer_packed,
            iotlb_miss_wait: self.limits.iotlb_miss_wait,
            notify: self.limits.notify,
        };
        let backend = Arc::new(Mutex::new(Backend::new(
            Arc::clone(&self.device),
            resources,
        )));
        let mut early = match stream.try_clone() {
            Ok(stream) => stream,
            Err(e) => return ConnectionEnd::Dropped(VhostError::SocketError(e)),
        };
        let handshake_deadline = Instant::now() + self.limits.handshake_timeout;
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&backend));
        let end = loop {
            let idle_deadline = (!lock(&backend).owns_device()).then_some(handshake_deadline);
            match self.wait_for_message(&early, &tripwire, idle_deadline) {
                NextMessage::Ready => {}
                NextMessage::Closed => break ConnectionEnd::Closed,
                NextMessage::Refused(why) => break ConnectionEnd::Refused(why),
            }
            match answer_early_vring_enable(&mut early, &backend) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => break ConnectionEnd::Dropped(VhostError::SocketError(e)),
            }
            match answer_iommu_message(&mut early, &backend) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => break ConnectionEnd::Dropped(VhostError::SocketError(e)),
            }
            match handler.handle_request() {
                Ok(()) => {}
                Err(VhostError::Disconnected) => break ConnectionEnd::Closed,
                Err(e) => break ConnectionEnd::Dropped(e),
            }
        };
        drop(handler);
        lock(&backend).disconnect();
        lock(&backend).log_iotlb_stats();
        end
    }

    /// Waits until a whole message is on the socket, within the deadlines (see the module
    /// doc); `idle_deadline` bounds the wait for its first byte too.
    fn wait_for_message(
        &self,
        stream: &UnixStream,
        tripwire: &Tripwire,
        idle_deadline: Option<Instant>,
    ) -> NextMessage {
        let mut message_deadline = None;
        loop {
            if tripwire.tripped() {
                return NextMessage::Refused(
                    "the frontend shrank memory it shared (SIGBUS caught)".into(),
                );
            }
            let deadline = match (idle_deadline, message_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return NextMessage::Refused(match message_deadline {
                    Some(_) => format!(
                        "a message did not arrive whole within {:?}",
                        self.limits.message_timeout
                    ),
                    None => format!(
                        "no SET_OWNER within {:?} of connecting",
                        self.limits.handshake_timeout
                    ),
                });
            }
            if message_deadline.is_some() {
                if peer_stopped_writing(stream.as_raw_fd()) {
                    break; // The rest will never come; the crate reports the torn message.
                }
            } else if !wait_readable(stream.as_raw_fd(), tripwire.fd(), deadline) {
                continue;
            }
            match next_message(stream) {
                Ok(Peeked::Whole) => break,
                Ok(Peeked::Partial) => {
                    message_deadline.get_or_insert(Instant::now() + self.limits.message_timeout);
                }
                Ok(Peeked::Nothing) => {}
                Ok(Peeked::End) => return NextMessage::Closed,
                Err(e) => return NextMessage::Refused(format!("socket error: {e}")),
            }
        }
        match unread_reply_bytes(stream.as_raw_fd()) {
            Ok(unread) if unread > MAX_UNREAD_REPLIES => NextMessage::Refused(format!(
                "the frontend left {unread} bytes of replies unread"
            )),
            _ => NextMessage::Ready,
        }
    }
}

/// Waits up to [`TORN_MESSAGE_RECHECK`] for the frontend to shut down its side; the rest
/// of a torn message may still arrive otherwise.
fn peer_stopped_writing(socket: RawFd) -> bool {
    let mut pollfd = libc::pollfd {
        fd: socket,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    let millis = TORN_MESSAGE_RECHECK.as_millis() as i32;
    // SAFETY: one valid pollfd for the duration of the call; the result is checked.
    let ready = unsafe { libc::poll(&raw mut pollfd, 1, millis) };
    ready > 0 && pollfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Polls the socket and the tripwire until either is readable or `deadline`; false on
/// timeout or interruption.
fn wait_readable(socket: RawFd, tripwire: RawFd, deadline: Option<Instant>) -> bool {
    let timeout = match deadline {
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)
        }
        None => -1,
    };
    let mut fds = [socket, tripwire].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: two valid pollfds for the duration of the call; the result is checked.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) > 0 }
}

/// How much of the next message is on the socket.
enum Peeked {
    Nothing,
    Partial,
    /// All of it, or a header whose size the crate will refuse (the crate reports it).
    Whole,
    /// End of stream.
    End,
}

fn next_message(stream: &UnixStream) -> io::Result<Peeked> {
    let mut buf = vec![0u8; HEADER_BYTES + MAX_MSG_SIZE];
    let n = match peek(stream, &mut buf, libc::MSG_DONTWAIT) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Peeked::Nothing),
        Err(e) => return Err(e),
    };
    if n == 0 {
        return Ok(Peeked::End);
    }
    if n < HEADER_BYTES {
        return Ok(Peeked::Partial);
    }
    let size = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if size > MAX_MSG_SIZE || n >= HEADER_BYTES + size {
        Ok(Peeked::Whole)
    } else {
        Ok(Peeked::Partial)
    }
}

/// Bytes this side sent that the frontend has not read yet.
fn unread_reply_bytes(fd: RawFd) -> io::Result<usize> {
    let mut unread: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the valid pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unread) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(unread).unwrap_or(0))
}

/// Answers the next message if it is a SET_VRING_ENABLE sent before SET_FEATURES (see the
/// module doc); returns whether it did. Anything else is left on the socket for the crate.
fn answer_early_vring_enable<D: VirtioDevice>(
    stream: &mut UnixStream,
    backend: &Mutex<Backend<D>>,
) -> io::Result<bool> {
    if !lock(backend).awaits_features() {
        return Ok(false);
    }
    let mut header = [0u8; HEADER_BYTES];
    let peeked = match peek(stream, &mut header, libc::MSG_DONTWAIT) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if peeked < HEADER_BYTES {
        return Ok(false); // Closed, or a torn header: the crate reports it.
    }
    let word =
        |i: usize| u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    let body_bytes = size_of::<VhostUserVringState>();
    if request != FrontendReq::SET_VRING_ENABLE as u32 || size as usize != body_bytes {
        return Ok(false);
    }
    let mut message = [0u8; HEADER_BYTES + 8];
    stream.read_exact(&mut message)?;
    let mut state = VhostUserVringState::default();
    state
        .as_mut_slice()
        .copy_from_slice(&message[HEADER_BYTES..]);
    let (index, num) = (state.index, state.num);
    let result = match num {
        0 | 1 => lock(backend).set_vring_enable(index, num == 1),
        _ => Err(VhostError::InvalidParam),
    };
    if flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0 && lock(backend).reply_ack() {
        reply_ack(stream, request, result.is_ok())?;
    }
    result.map_err(io::Error::other)?;
    Ok(true)
}

/// Bits of a header's flags word: the version (1) and the reply bit.
const VERSION_MASK: u32 = 0x3;

/// Answers the next message if it is an IOTLB_MSG or a SET_BACKEND_REQ_FD (see the module
/// doc); returns whether it did.
fn answer_iommu_message<D: VirtioDevice>(
    stream: &mut UnixStream,
    backend: &Mutex<Backend<D>>,
) -> io::Result<bool> {
    let mut header = [0u8; HEADER_BYTES];
    let peeked = match peek(stream, &mut header, libc::MSG_DONTWAIT) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if peeked < HEADER_BYTES {
        return Ok(false);
    }
    let word =
        |i: usize| u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    let well_formed = flags & VERSION_MASK == 1 && flags & VhostUserHeaderFlag::REPLY.bits() == 0;
    let need_reply = flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0;
    if !well_formed {
        return Ok(false);
    }
    if request == FrontendReq::IOTLB_MSG as u32 && size == IOTLB_MSG_BYTES {
        let mut message = [0u8; HEADER_BYTES + IOTLB_MSG_BYTES];
        stream.read_exact(&mut message)?;
        let mut msg = IotlbMsg::default();
        msg.as_mut_slice().copy_from_slice(&message[HEADER_BYTES..]);
        let result = lock(backend).iotlb_message(&msg);
        if let Err(e) = &result {
            tracing::warn!("vhost-user: IOTLB_MSG {msg:x?} refused: {e}");
        }
        // QEMU sets NEED_REPLY on every IOTLB message and waits for the answer (it requires
        // REPLY_ACK for a vIOMMU anyway).
        if need_reply {
            reply_ack(stream, request, result.is_ok())?;
        }
        return Ok(true);
    }
    if request == FrontendReq::SET_BACKEND_REQ_FD as u32 && size == 0 && lock(backend).backend_req()
    {
        let mut message = [0u8; HEADER_BYTES];
        let (read, file) = stream
            .recv_with_fd(&mut message)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if read != HEADER_BYTES {
            return Err(io::Error::other("SET_BACKEND_REQ_FD: torn message"));
        }
        let file = file.ok_or_else(|| io::Error::other("SET_BACKEND_REQ_FD without a socket"))?;
        if !is_unix_stream_socket(file.as_raw_fd()) {
            return Err(io::Error::other(
                "SET_BACKEND_REQ_FD: the fd is not a unix stream socket",
            ));
        }
        lock(backend).set_backend_channel(UnixStream::from(std::os::fd::OwnedFd::from(file)));
        if need_reply && lock(backend).reply_ack() {
            reply_ack(stream, request, true)?;
        }
        return Ok(true);
    }
    Ok(false)
}

/// Whether `fd` is an AF_UNIX SOCK_STREAM socket.
fn is_unix_stream_socket(fd: RawFd) -> bool {
    let option = |name: libc::c_int| {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`; the result is checked.
        let ok = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&raw mut value).cast(),
                &raw mut len,
            )
        } == 0;
        ok.then_some(value)
    };
    option(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && option(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

fn lock<D: VirtioDevice>(backend: &Mutex<Backend<D>>) -> std::sync::MutexGuard<'_, Backend<D>> {
    backend
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copies the next bytes on the socket without consuming them (nor any attached fds).
fn peek(stream: &UnixStream, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call;
        // MSG_PEEK leaves the data, and without a control buffer any fds, on the socket.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | flags,
            )
        };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// The REPLY_ACK answer: 0 for success, 1 for failure.
fn reply_ack(stream: &mut UnixStream, request: u32, ok: bool) -> io::Result<()> {
    let body = VhostUserU64::new(u64::from(!ok));
    let flags = 1 | VhostUserHeaderFlag::REPLY.bits(); // Version 1.
    let mut reply = Vec::with_capacity(HEADER_BYTES + 8);
    for word in [request, flags, body.as_slice().len() as u32] {
        reply.extend_from_slice(&word.to_ne_bytes());
    }
    reply.extend_from_slice(body.as_slice());
    stream.write_all(&reply)
}
