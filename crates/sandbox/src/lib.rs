//! How sluice's threads are started and what happens when one of them fails.
//!
//! Every sluice thread (vCPUs, queue workers, the vhost-user-blk frontend's threads, INTx
//! resamplers, vhost-user connections) is started by [`spawn`] with its [`ThreadKind`], which
//! * confines it with that kind's seccomp filter (see [`seccomp`]) when [`install`] turned
//!   filtering on, and
//! * hands it its parent's containment scope (see [`panic`]): a panic ends the process, or —
//!   under [`contain_connection`] — only the one vhost-user connection.
//!
//! `sluice` calls [`install`] once at start; without it (library tests) threads start plain and
//! panics behave as Rust's default.

pub mod panic;
pub mod seccomp;

#[cfg(feature = "fault-injection")]
mod fault;

use std::io;
use std::thread::{self, JoinHandle};

pub use panic::{contain_connection, ConnectionPanicked};
pub use seccomp::SeccompMode;

/// Exit status when a sluice thread panicked (a bug in sluice).
pub const EXIT_PANIC: u8 = 122;
/// Exit status when a thread made a system call its seccomp filter forbids.
pub const EXIT_SECCOMP: u8 = 123;

/// What a thread does, which decides its seccomp filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Runs one vCPU (KVM_RUN) and the device code reached by its exits, including device
    /// activation, which starts queue workers and the vhost-user-blk frontend's threads.
    Vcpu,
    /// Serves one virtqueue (in `run` and in `serve`).
    QueueWorker,
    /// The vhost-user-blk frontend's threads: the interrupt pump (sends the DRIVER_OK setup,
    /// forwards the backend's call fds to MSI-X, reconnects), the config-write sender and the
    /// request watchdog.
    VhostFrontend,
    /// A level-triggered INTx line: re-raises the pin after each EOI (eventfd reads and writes).
    IrqResampler,
    /// `serve`: accepts and serves vhost-user connections (memory tables, ring setup), starts
    /// queue workers.
    Connection,
}

impl ThreadKind {
    /// The name used in messages and in `SLUICE_TEST_FAULT`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::QueueWorker => "queue-worker",
            ThreadKind::VhostFrontend => "vhost-frontend",
            ThreadKind::IrqResampler => "irq-resampler",
            ThreadKind::Connection => "connection",
        }
    }
}

/// Which command this process runs, for the messages of the failure policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `sluice run`: any failure stops the VM.
    Vm,
    /// `sluice serve`: a failure inside a connection drops that connection.
    Server,
}

/// Process-wide settings, given once to [`install`].
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub role: Role,
    pub seccomp: SeccompMode,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter for {kind} threads: {source}")]
    Filter {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Signal(io::Error),
    #[error("cannot apply the seccomp filter for {kind} threads: {source}")]
    Apply {
        kind: &'static str,
        source: seccompiler::Error,
    },
}

/// Installs the panic policy and builds the seccomp filters; call once, first thing in `main`.
pub fn install(config: Config) -> Result<(), Error> {
    seccomp::install(config.seccomp)?;
    panic::install(config.role);
    Ok(())
}

/// Starts a thread named `name` of `kind` running `body`, confined by the kind's seccomp
/// filter and contained like the calling thread (see the module doc).
pub fn spawn<F, T>(kind: ThreadKind, name: String, body: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_on(kind, name, None, body)
}

/// [`spawn`] on the host CPUs `cpus` (a vCPU's `--cpus ...,affinity=`); with `None`, a thread
/// other than a vCPU goes to the CPUs given to [`pin_workers`], if any, and otherwise inherits
/// its parent's. The affinity is set by the thread itself before its filter is applied, so no
/// thread kind needs sched_setaffinity in its seccomp list.
pub fn spawn_on<F, T>(
    kind: ThreadKind,
    name: String,
    cpus: Option<Vec<u32>>,
    body: F,
) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let scope = panic::current_scope();
    let cpus = cpus.or_else(|| match kind {
        ThreadKind::Vcpu => None,
        _ => worker_cpus(),
    });
    thread::Builder::new().name(name.clone()).spawn(move || {
        panic::enter_scope(scope);
        seccomp::note_thread_name(&name);
        if let Some(cpus) = &cpus {
            if let Err(e) = pin_current_thread(cpus) {
                // The CPUs were checked when the VM was configured; running elsewhere than the
                // operator placed it would silently break the placement, so stop.
                panic::fatal(&format!(
                    "thread `{name}`: cannot pin to CPUs {cpus:?}: {e}"
                ));
            }
        }
        if let Err(e) = confine_current_thread(kind) {
            // Cannot happen once `install` applied the same filter to a probe thread; if it
            // does, running unconfined would be silently weaker, so stop.
            panic::fatal(&format!("thread `{name}`: {e}"));
        }
        // A connection's fault fires inside its scope (`contain_connection`), not before it.
        #[cfg(feature = "fault-injection")]
        if kind != ThreadKind::Connection {
            fault::at_start(kind);
        }
        body()
    })
}

static WORKER_CPUS: std::sync::Mutex<Option<Vec<u32>>> = std::sync::Mutex::new(None);

/// Every thread other than a vCPU that [`spawn`] starts from now on runs on `cpus`
/// (`--cpus ...,workers=`, or the CPUs the process had before its vCPUs were pinned).
pub fn pin_workers(cpus: Vec<u32>) {
    *WORKER_CPUS.lock().unwrap_or_else(|e| e.into_inner()) = Some(cpus);
}

fn worker_cpus() -> Option<Vec<u32>> {
    WORKER_CPUS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Sets the calling thread's CPU affinity to `cpus` (threads it starts later inherit it).
pub fn pin_current_thread(cpus: &[u32]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET bounds-checks `cpu` against the set's size and ignores larger ones.
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size given; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's CPU affinity.
pub fn current_thread_cpus() -> io::Result<Vec<u32>> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size given; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let count = 8 * size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET bounds-checks the index against the set's size.
    Ok((0..count)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .map(|cpu| cpu as u32)
        .collect())
}

/// A place in sluice's code where tests may inject a fault (`SLUICE_TEST_FAULT=POINT:...`, see
/// `fault.rs`); nothing at all unless the test-only `fault-injection` feature is on.
#[inline(always)]
pub fn fault_point(point: &'static str) {
    #[cfg(feature = "fault-injection")]
    fault::at_point(point);
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
}

/// Confines the calling thread with `kind`'s seccomp filter (nothing when filtering is off).
/// For threads sluice did not start itself, such as `serve`'s main thread.
pub fn confine_current_thread(kind: ThreadKind) -> Result<(), Error> {
    seccomp::confine_current_thread(kind)
}
