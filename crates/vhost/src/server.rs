//! [`Server`]: the listening socket; serves one frontend connection at a time, for ever.
//!
//! A connection ends when the frontend closes it or sends anything the backend refuses (one
//! log line says why); its rings are stopped and the next connection is accepted. The device
//! model (and its open, locked image) outlives connections, so a frontend that reconnects —
//! QEMU's `reconnect=N` — finds the same disk.
//!
//! One connection at a time because a vhost-user device has one frontend; a second frontend
//! waits in the listen backlog until the first one goes away.
//!
//! One message is answered here rather than by the `vhost` crate: SET_VRING_ENABLE before the
//! first SET_FEATURES. QEMU 7.2's vhost-user-net sends it as soon as the guest acks its
//! features (taking VHOST_USER_F_PROTOCOL_FEATURES as negotiated once GET_FEATURES offered it),
//! and only later starts the device with SET_FEATURES; the crate refuses the message until
//! SET_FEATURES carried that bit. The server peeks at each header and, in that window only,
//! reads the 8-byte body itself and hands it to the backend.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserU64, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VhostError, Listener, VhostUserBackendReqHandlerMut,
};
use vm_memory::ByteValued;

use sluice_virtio::VirtioDevice;

use crate::backend::Backend;

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed the socket.
    Closed,
    /// The backend refused a message (or the socket failed) and dropped the connection.
    Dropped(VhostError),
}

/// A vhost-user socket serving one device.
pub struct Server<D: VirtioDevice> {
    listener: Listener,
    device: Arc<Mutex<D>>,
}

impl<D: VirtioDevice> Server<D> {
    /// Listens on `path` (an existing socket file there is replaced).
    pub fn bind(path: &Path, device: D) -> io::Result<Self> {
        let listener = Listener::new(path, true).map_err(io::Error::other)?;
        Ok(Server {
            listener,
            device: Arc::new(Mutex::new(device)),
        })
    }

    /// The device, shared with the connections.
    pub fn device(&self) -> Arc<Mutex<D>> {
        Arc::clone(&self.device)
    }

    /// Accepts connections and serves them one after the other; returns only if accepting
    /// fails.
    pub fn run(&self) -> io::Result<()> {
        loop {
            let stream = match self.listener.accept() {
                Ok(Some(stream)) => stream,
                Ok(None) => continue,
                Err(e) => return Err(io::Error::other(e)),
            };
            match self.serve_connection(stream) {
                ConnectionEnd::Closed => tracing::info!("vhost-user: frontend disconnected"),
                ConnectionEnd::Dropped(e) => {
                    tracing::warn!("vhost-user: dropping the connection: {e}")
                }
            }
        }
    }

    /// Serves one connected frontend until it goes away or is dropped.
    pub fn serve_connection(&self, stream: UnixStream) -> ConnectionEnd {
        let backend = Arc::new(Mutex::new(Backend::new(Arc::clone(&self.device))));
        let mut early = match stream.try_clone() {
            Ok(stream) => stream,
            Err(e) => return ConnectionEnd::Dropped(VhostError::SocketError(e)),
        };
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&backend));
        let end = loop {
            match answer_early_vring_enable(&mut early, &backend) {
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
        backend
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .disconnect();
        end
    }
}

/// Bytes in a message header: request, flags, payload size (native-endian u32s).
const HEADER_BYTES: usize = 12;

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
    if peek(stream, &mut header)? < HEADER_BYTES {
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

fn lock<D: VirtioDevice>(backend: &Mutex<Backend<D>>) -> std::sync::MutexGuard<'_, Backend<D>> {
    backend
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copies the next bytes on the socket without consuming them (nor any attached fds).
fn peek(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call;
        // MSG_PEEK leaves the data, and without a control buffer any fds, on the socket.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_WAITALL,
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
