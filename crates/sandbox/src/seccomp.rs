//! seccomp filters, one per [`ThreadKind`], applied by each thread to itself when it starts.
//!
//! A thread inherits its parent's filter and can only add to it, so a kind that starts threads
//! allows what its children need: queue workers and the interrupt pump are started at device
//! activation, from a vCPU thread (`run`) or a connection (`serve`), so [`ThreadKind::Vcpu`]
//! and [`ThreadKind::Connection`] include their lists. The lists come from `strace -f` of the
//! test suite's runs (`run` with --disk, --net, --rng and a vhost-user disk; `serve blk` driven
//! by sluice and by the hostile-frontend tests), plus the error paths that log, panic or exit.
//! The main thread of `run` (VM setup, then waiting) is not filtered.
//!
//! A forbidden call, with filtering `on`, raises SIGSYS; the handler names the thread and the
//! call on stderr and ends the process with [`EXIT_SECCOMP`]: a thread that makes a call it
//! never makes may be under a hostile guest's or peer's control, and it shares the address
//! space with every other thread, so the whole process goes (in `serve` too). `log` lets the
//! call through and has the kernel log it (audit); `off` installs nothing.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::{Error, ThreadKind, EXIT_SECCOMP};

/// What filtering does with a call outside a thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// No filters.
    Off,
    /// Allowed, and logged by the kernel.
    Log,
    /// The process ends with [`EXIT_SECCOMP`] and a message naming the thread and the call.
    #[default]
    On,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            "on" => Ok(SeccompMode::On),
            _ => Err(format!("expected on, log or off, got `{text}`")),
        }
    }
}

const KINDS: [ThreadKind; 4] = [
    ThreadKind::Vcpu,
    ThreadKind::QueueWorker,
    ThreadKind::InterruptPump,
    ThreadKind::Connection,
];

static FILTERS: OnceLock<HashMap<ThreadKind, BpfProgram>> = OnceLock::new();

/// Longest thread name Linux keeps (15 bytes and a NUL).
const NAME_BYTES: usize = 16;

thread_local! {
    /// The thread's name, readable from the SIGSYS handler (no allocation, no lock).
    static THREAD_NAME: Cell<[u8; NAME_BYTES]> = const { Cell::new([0; NAME_BYTES]) };
}

pub(crate) fn note_thread_name(name: &str) {
    let mut bytes = [0u8; NAME_BYTES];
    let len = name.len().min(NAME_BYTES - 1);
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|n| n.set(bytes));
}

/// Whether threads are being filtered (backtraces, which read files, are skipped then).
pub(crate) fn filtering() -> bool {
    FILTERS.get().is_some()
}

pub(crate) fn install(mode: SeccompMode) -> Result<(), Error> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On => SeccompAction::Trap,
    };
    let mut filters = HashMap::new();
    for kind in KINDS {
        filters.insert(kind, compile(kind, mismatch.clone())?);
    }
    if mode == SeccompMode::On {
        install_sigsys_handler()?;
    }
    probe(&filters[&ThreadKind::QueueWorker])?;
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Applies the narrowest filter on a throwaway thread, so that a kernel without seccomp is a
/// clear error at start rather than a failure in some thread later.
fn probe(filter: &BpfProgram) -> Result<(), Error> {
    let filter = filter.clone();
    std::thread::spawn(move || seccompiler::apply_filter(&filter))
        .join()
        .unwrap_or(Ok(()))
        .map_err(|source| Error::Apply {
            kind: "probe",
            source,
        })
}

pub(crate) fn confine_current_thread(kind: ThreadKind) -> Result<(), Error> {
    let Some(filter) = FILTERS.get().map(|f| &f[&kind]) else {
        return Ok(());
    };
    seccompiler::apply_filter(filter).map_err(|source| Error::Apply {
        kind: kind.name(),
        source,
    })
}

fn compile(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, Error> {
    let err = |source| Error::Filter {
        kind: kind.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(kind).iter().map(|&nr| (nr, Vec::new())).collect();
    if let Some(requests) = allowed_ioctls(kind) {
        let mut ioctl = Vec::new();
        for &request in requests {
            let condition =
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                    .map_err(err)?;
            ioctl.push(SeccompRule::new(vec![condition]).map_err(err)?);
        }
        rules.insert(libc::SYS_ioctl, ioctl);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// Every filtered thread: memory, locks, its own fds and epoll, time, logging, panicking and
/// exiting.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    // abort() after a double panic.
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Starting threads (std's thread start runs in the child before its own filter, and so does
/// installing that filter: prctl(PR_SET_NO_NEW_PRIVS), seccomp(2)).
const SPAWN: &[i64] = &[
    libc::SYS_seccomp,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
];

/// A queue: io_uring or synchronous disk I/O, tap reads and writes, the batch timer.
const QUEUE_WORKER: &[i64] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_timerfd_settime,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
];

/// The vhost-user-blk frontend's pump: call fds, and reconnecting to the backend.
const INTERRUPT_PUMP: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// Device activation (queue rings, io_uring, tap queues, vhost-user sessions) beyond what its
/// workers do.
const ACTIVATION: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
];

/// `serve`'s connections: accepting, the protocol's messages with fds.
const CONNECTION: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

fn allowed(kind: ThreadKind) -> Vec<i64> {
    let lists: &[&[i64]] = match kind {
        ThreadKind::QueueWorker => &[BASE, QUEUE_WORKER],
        ThreadKind::InterruptPump => &[BASE, INTERRUPT_PUMP],
        ThreadKind::Vcpu => &[BASE, SPAWN, QUEUE_WORKER, INTERRUPT_PUMP, ACTIVATION],
        ThreadKind::Connection => &[BASE, SPAWN, QUEUE_WORKER, ACTIVATION, CONNECTION],
    };
    let mut all: Vec<i64> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    if kind == ThreadKind::Vcpu {
        // KVM_RUN, ioeventfd/irqfd/MSI routes at activation, register dumps on a crash, tap
        // offloads: the vCPU's ioctls are not narrowed by request (yet).
        all.push(libc::SYS_ioctl);
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// ioctl requests a kind may make, when it may make some but not all.
fn allowed_ioctls(kind: ThreadKind) -> Option<&'static [u64]> {
    match kind {
        // Tap queues and offloads at activation (vhost-user-net); non-blocking and cloexec.
        ThreadKind::Connection => Some(&[
            libc::TUNSETOFFLOAD,
            libc::TUNSETQUEUE,
            libc::TUNSETVNETHDRSZ,
            libc::FIONBIO,
            libc::FIOCLEX,
        ]),
        _ => None,
    }
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value that is then filled in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: SigsysHandler = on_sigsys;
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialised and the handler only calls async-signal-safe functions.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Signal(std::io::Error::last_os_error()));
    }
    Ok(())
}

type SigsysHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Offset of `si_syscall` in a SIGSYS siginfo on x86-64 (after signo, errno, code, padding
/// and the call address).
const SI_SYSCALL_OFFSET: usize = 24;

/// Names the thread and the call on stderr and ends the process; async-signal-safe (writes
/// into a stack buffer, write(2), _exit(2)).
extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS the call
    // number sits at this offset (include/uapi/asm-generic/siginfo.h, `_sigsys`).
    let call = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let name = THREAD_NAME.with(Cell::get);
    let mut message = Message::default();
    message.push(b"sluice: seccomp: thread `");
    message.push(&name[..name.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES)]);
    message.push(b"` made a forbidden system call (number ");
    message.push_number(call);
    message.push(b"); stopping sluice\n");
    // SAFETY: write(2) from a valid buffer and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, message.bytes.as_ptr().cast(), message.len);
        libc::_exit(i32::from(EXIT_SECCOMP));
    }
}

/// A fixed buffer for the signal handler's message.
struct Message {
    bytes: [u8; 128],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            bytes: [0; 128],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, text: &[u8]) {
        let n = text.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i32) {
        let mut digits = [0u8; 12];
        let mut at = digits.len();
        let mut rest = value.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if value < 0 {
            self.push(b"-");
        }
        self.push(&digits[at..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in KINDS {
            assert!(compile(kind, SeccompAction::Trap).is_ok(), "{kind:?}");
        }
    }

    #[test]
    fn kinds_that_start_workers_allow_what_workers_need() {
        let worker = allowed(ThreadKind::QueueWorker);
        for parent in [ThreadKind::Vcpu, ThreadKind::Connection] {
            let allowed = allowed(parent);
            let missing: Vec<_> = worker.iter().filter(|nr| !allowed.contains(nr)).collect();
            assert!(missing.is_empty(), "{parent:?} lacks {missing:?}");
        }
        let pump = allowed(ThreadKind::InterruptPump);
        let vcpu = allowed(ThreadKind::Vcpu);
        assert!(pump.iter().all(|nr| vcpu.contains(nr)));
    }

    #[test]
    fn a_confined_thread_is_refused_what_its_list_lacks() {
        let filter = compile(
            ThreadKind::QueueWorker,
            SeccompAction::Errno(libc::EPERM as u32),
        )
        .unwrap();

        let (allowed, refused) = std::thread::spawn(move || {
            seccompiler::apply_filter(&filter).unwrap();
            // SAFETY: getpid and sysinfo (into a valid buffer) have no side effects.
            unsafe {
                let mut info: libc::sysinfo = std::mem::zeroed();
                (libc::getpid() > 0, libc::sysinfo(&mut info) == -1)
            }
        })
        .join()
        .unwrap();

        assert!(allowed);
        assert!(refused);
    }

    #[test]
    fn message_numbers_are_decimal() {
        let mut message = Message::default();
        message.push_number(-7);
        message.push(b" ");
        message.push_number(1234);

        assert_eq!(&message.bytes[..message.len], b"-7 1234");
    }
}
