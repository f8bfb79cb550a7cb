//! The panic policy: a panic is a bug in sluice, reported in one clear line on stderr, and it
//! ends what it belongs to — never a hang.
//!
//! * In the process scope (every thread of `run`; `serve`'s accept loop) the panic hook ends
//!   the process with [`EXIT_PANIC`] before unwinding starts, so no other thread waits on a
//!   dead one or sees a lock it poisoned.
//! * In a connection scope ([`contain_connection`], inherited by the threads it starts) the
//!   hook shuts the connection's socket down and the panic unwinds: the panicking thread ends,
//!   the connection's request loop sees the socket closed, drops the connection and stops its
//!   workers; the server accepts the next frontend. Locks shared across connections may be
//!   poisoned then, which is why every sluice lock is taken with
//!   `lock().unwrap_or_else(PoisonError::into_inner)`: the state behind each lock must be
//!   consistent at every point where its holder can panic.
//!
//! Writes to stderr ignore errors: a full disk or a closed pipe must not turn a message about
//! one failure into a second one.

use std::backtrace::BacktraceStatus;
use std::cell::RefCell;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{self as std_panic, AssertUnwindSafe, PanicHookInfo};
use std::sync::{Arc, OnceLock};

use crate::{Role, EXIT_PANIC};

/// What a panic on this thread ends.
#[derive(Clone, Default)]
pub(crate) enum Scope {
    /// The whole process (the VM).
    #[default]
    Process,
    /// One vhost-user connection: its socket (a duplicate, so that shutting it down can never
    /// hit an unrelated file that reused the number).
    Connection(Arc<OwnedFd>),
}

thread_local! {
    static SCOPE: RefCell<Scope> = const { RefCell::new(Scope::Process) };
}

static ROLE: OnceLock<Role> = OnceLock::new();

pub(crate) fn current_scope() -> Scope {
    SCOPE.with(|s| s.borrow().clone())
}

pub(crate) fn enter_scope(scope: Scope) -> Scope {
    SCOPE.with(|s| s.replace(scope))
}

/// A panic ended the connection (already reported on stderr by the hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionPanicked;

impl std::fmt::Display for ConnectionPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a panic ended the connection")
    }
}

/// Runs `serve_connection(socket)` on the calling thread with panics contained to the
/// connection on `socket`: a panic there, or in a thread it starts through [`crate::spawn`],
/// shuts the socket down and this returns `Err` once `serve_connection` unwound (see the
/// module doc).
pub fn contain_connection<S: AsFd, T>(
    socket: S,
    serve_connection: impl FnOnce(S) -> T,
) -> Result<T, ConnectionPanicked> {
    let scope = match socket.as_fd().try_clone_to_owned() {
        Ok(fd) => Scope::Connection(Arc::new(fd)),
        // No descriptor to spare: a panic then ends the process, which still never hangs.
        Err(_) => Scope::Process,
    };
    let outer = enter_scope(scope);
    #[cfg(feature = "fault-injection")]
    let result = std_panic::catch_unwind(AssertUnwindSafe(|| {
        crate::fault::at_start(crate::ThreadKind::Connection);
        serve_connection(socket)
    }));
    #[cfg(not(feature = "fault-injection"))]
    let result = std_panic::catch_unwind(AssertUnwindSafe(|| serve_connection(socket)));
    enter_scope(outer);
    result.map_err(|_| ConnectionPanicked)
}

/// Replaces the panic hook with the policy's (see the module doc).
pub(crate) fn install(role: Role) {
    let _ = ROLE.set(role);
    std_panic::set_hook(Box::new(on_panic));
}

fn on_panic(info: &PanicHookInfo<'_>) {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let location = info
        .location()
        .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    // Symbolising a backtrace opens files, which filtered threads may not do.
    let backtrace = (!crate::seccomp::filtering()).then(std::backtrace::Backtrace::capture);
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(
        stderr,
        "sluice: internal error: thread `{name}` panicked{location}: {message}"
    );
    if let Some(trace) = backtrace.filter(|t| t.status() == BacktraceStatus::Captured) {
        let _ = writeln!(stderr, "{trace}");
    }
    match current_scope() {
        Scope::Connection(socket) => {
            let _ = writeln!(stderr, "sluice: dropping this vhost-user connection");
            // SAFETY: shutdown(2) on a descriptor this scope owns; it touches no memory.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
        Scope::Process => {
            drop(stderr);
            fatal("a panic is a bug in sluice");
        }
    }
}

/// Reports `why` on stderr and ends the process with [`EXIT_PANIC`]; for failures that leave
/// the process without a consistent way on.
pub(crate) fn fatal(why: &str) -> ! {
    let what = match ROLE.get() {
        Some(Role::Server) => "stopping the vhost-user server",
        _ => "stopping the VM",
    };
    let _ = writeln!(std::io::stderr(), "sluice: {what}: {why}");
    std::process::exit(i32::from(EXIT_PANIC))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn in_connection_scope() -> bool {
        matches!(current_scope(), Scope::Connection(_))
    }

    #[test]
    fn a_panic_inside_a_connection_is_returned_and_the_scope_restored() {
        let (socket, _peer) = UnixStream::pair().unwrap();

        let result = contain_connection(socket, |_socket| -> () { panic!("injected") });

        assert_eq!(result, Err(ConnectionPanicked));
        assert!(!in_connection_scope());
    }

    #[test]
    fn threads_started_inside_a_connection_belong_to_it() {
        let (socket, _peer) = UnixStream::pair().unwrap();

        let (inside, worker) = contain_connection(socket, |_socket| {
            let worker = crate::spawn(
                crate::ThreadKind::QueueWorker,
                "w".into(),
                in_connection_scope,
            )
            .unwrap()
            .join()
            .unwrap();
            (in_connection_scope(), worker)
        })
        .unwrap();

        assert!(inside && worker);
        let outside = crate::spawn(
            crate::ThreadKind::QueueWorker,
            "w".into(),
            in_connection_scope,
        )
        .unwrap()
        .join()
        .unwrap();
        assert!(!outside);
    }
}
