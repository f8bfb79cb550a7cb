//! [`Server`]: the listening socket; serves one frontend connection at a time, for ever.
//!
//! A connection ends when the frontend closes it or sends anything the backend refuses (one
//! log line says why); its rings are stopped and the next connection is accepted. The device
//! model (and its open, locked image) outlives connections, so a frontend that reconnects —
//! QEMU's `reconnect=N` — finds the same disk.
//!
//! One connection at a time because a vhost-user device has one frontend; a second frontend
//! waits in the listen backlog until the first one goes away.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error as VhostError, Listener};

use crate::backend::{Backend, ServedDevice};

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed the socket.
    Closed,
    /// The backend refused a message (or the socket failed) and dropped the connection.
    Dropped(VhostError),
}

/// A vhost-user socket serving one device.
pub struct Server<D: ServedDevice> {
    listener: Listener,
    device: Arc<Mutex<D>>,
}

impl<D: ServedDevice> Server<D> {
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
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&backend));
        let end = loop {
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
