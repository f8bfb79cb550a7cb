//! Time bounds on the control socket, so that no backend can hold a sluice thread forever.
//!
//! The `vhost` crate's `Frontend` blocks in sendmsg/recvmsg and retries EAGAIN itself, so
//! SO_RCVTIMEO/SO_SNDTIMEO alone would only make it loop. Instead a watchdog thread (one per
//! device) shuts the socket down when a request outlives its deadline: the blocked call returns
//! at once (EOF or EPIPE) and the request is reported as timed out. The connection is useless
//! afterwards anyway (a late reply would be taken for the answer to the next request).
//! `connect` is bounded by SO_SNDTIMEO, which unix sockets apply to a full listen queue.

use std::io;
use std::mem;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Connection attempts refused before giving up: a backend may still be starting (the `vhost`
/// crate's `Frontend::connect` retries the same way).
const CONNECT_ATTEMPTS: u32 = 5;
const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Shuts down the socket of a request that outlives its deadline.
pub(super) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    armed: Option<Armed>,
    /// The armed request's socket was shut down.
    fired: bool,
    quit: bool,
}

struct Armed {
    deadline: Instant,
    socket: Arc<UnixStream>,
}

impl Watchdog {
    pub fn new() -> io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            let kind = sluice_sandbox::ThreadKind::VhostFrontend;
            sluice_sandbox::spawn(kind, "vhost-user-timer".into(), move || shared.watch())?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `request`, shutting `socket` down if it has not returned within `timeout`.
    /// Returns its result and whether the deadline passed (then the result is an error, or
    /// a success that came too late to keep the connection).
    pub fn bound<T>(
        &self,
        socket: &Arc<UnixStream>,
        timeout: Duration,
        request: impl FnOnce() -> T,
    ) -> (T, bool) {
        {
            let mut state = self.shared.lock();
            state.armed = Some(Armed {
                deadline: Instant::now() + timeout,
                socket: socket.clone(),
            });
            state.fired = false;
        }
        self.shared.changed.notify_one();
        let result = request();
        let mut state = self.shared.lock();
        state.armed = None;
        (result, mem::take(&mut state.fired))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data, consistent at every unlock: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watch(&self) {
        let mut state = self.lock();
        while !state.quit {
            let Some(armed) = &state.armed else {
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let now = Instant::now();
            if now >= armed.deadline {
                // Wakes the blocked send/recv; the fd itself stays open until its owner drops it.
                let _ = armed.socket.shutdown(Shutdown::Both);
                state.fired = true;
                state.armed = None;
                continue;
            }
            let left = armed.deadline - now;
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.changed.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects to the unix socket at `path`, waiting at most `timeout` for a listener whose
/// queue is full (one that listens but does not accept). Refused attempts are retried briefly.
pub(super) fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let (address, length) = socket_address(path)?;
    let mut attempt = 1;
    loop {
        match connect_once(&address, length, timeout) {
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused && attempt < CONNECT_ATTEMPTS =>
            {
                attempt += 1;
                std::thread::sleep(CONNECT_RETRY_INTERVAL);
            }
            other => return other,
        }
    }
}

fn socket_address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut address: libc::sockaddr_un = unsafe { mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays zero: the path must be NUL-terminated.
    if bytes.is_empty() || bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a unix socket path is 1 to {} bytes without NUL",
                address.sun_path.len() - 1
            ),
        ));
    }
    for (to, &from) in address.sun_path.iter_mut().zip(bytes) {
        *to = from as libc::c_char;
    }
    let length = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((address, length as libc::socklen_t))
}

fn connect_once(
    address: &libc::sockaddr_un,
    length: libc::socklen_t,
    timeout: Duration,
) -> io::Result<UnixStream> {
    // SAFETY: socket(2) with constant arguments; the result is checked and owned just below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    set_send_timeout(&socket, timeout)?;
    // SAFETY: `address` is a valid sockaddr_un and `length` does not exceed its size.
    let connected = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::from_ref::<libc::sockaddr_un>(address).cast::<libc::sockaddr>(),
            length,
        )
    };
    if connected < 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EAGAIN) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the backend accepted no connection within {timeout:?}"),
            ));
        }
        return Err(error);
    }
    // From here on the watchdog bounds every request; a send timeout would only make the
    // `vhost` crate retry.
    set_send_timeout(&socket, Duration::ZERO)?;
    Ok(UnixStream::from(socket))
}

fn set_send_timeout(socket: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let value = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: SO_SNDTIMEO takes a timeval; `value` lives across the call and its size is given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const value).cast::<libc::c_void>(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
