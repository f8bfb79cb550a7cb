//! seccomp filters, one per [`ThreadKind`], applied by each thread to itself when it starts.
//!
//! A thread inherits its parent's filter and can only add to it, so a kind that starts threads
//! allows what its children need: queue workers and the vhost-user-blk frontend's threads are started at device
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

const KINDS: [ThreadKind; 5] = [
    ThreadKind::Vcpu,
    ThreadKind::QueueWorker,
    ThreadKind::VhostFrontend,
    ThreadKind::IrqResampler,
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
    fix_malloc_arena_limit();
    warm_heap_shrink_check();
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

/// glibc computes its malloc arena limit lazily: the first time a process holds more than 8
/// arenas (one per thread that allocates while the others hold theirs: a VM with 2 vCPUs, a
/// 2-queue disk, a net device and an rng gets there), the thread that needs one more calls
/// get_nprocs(), which opens /sys/devices/system/cpu/online — in a filtered thread, a forbidden
/// openat that ended sluice. Fixing the limit here, before any thread starts, to glibc's own
/// default (8 per CPU) means that file is never read.
fn fix_malloc_arena_limit() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets an allocator parameter, from the main thread before any
        // filtered thread exists; it takes no pointers.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
}

/// glibc also reads /proc/sys/vm/overcommit_memory lazily: the first time a thread's own
/// (non-main) malloc heap shrinks after large frees (`shrink_heap`). In a filtered thread —
/// a vhost-user connection dropping a NIC whose transmit queue held frames for the scheduler
/// — that was a forbidden openat that ended `sluice serve net`. glibc caches the answer for
/// the process, so shrinking one heap here, on an unfiltered thread before any filter, means
/// the file is never read later: a new thread gets its own arena, and blocks below the mmap
/// threshold (128 KiB) freed together leave a top chunk past the trim threshold (128 KiB).
fn warm_heap_shrink_check() {
    #[cfg(target_env = "gnu")]
    {
        let _ = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..8).map(|_| vec![1u8; 96 << 10]).collect();
            drop(std::hint::black_box(blocks));
        })
        .join();
    }
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
    let allowed = allowed(kind);
    let starts_threads = allowed.contains(&libc::SYS_clone);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed.iter().map(|&nr| (nr, Vec::new())).collect();
    // A thread it starts inherits this filter and pins itself before applying its own
    // (`spawn_on`, `pin_workers`): only itself, pid 0, never another thread or process.
    if starts_threads {
        rules.insert(
            libc::SYS_sched_setaffinity,
            arg_is_one_of(0, &[0]).map_err(err)?,
        );
    }
    let requests = allowed_ioctls(kind);
    if !requests.is_empty() {
        rules.insert(libc::SYS_ioctl, arg_is_one_of(1, &requests).map_err(err)?);
    }
    // SIGBUS only: the vhost-user backend installs its handler (for frontends that shrink
    // shared memory) when it first maps a region, and puts the default back for a fault that
    // is not its own. No thread may touch SIGSYS's handler, which enforces the filters.
    let sigbus = libc::SIGBUS as u64;
    rules.insert(
        libc::SYS_rt_sigaction,
        arg_is_one_of(0, &[sigbus]).map_err(err)?,
    );
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

/// Rules allowing a call whose argument `index` (32 bits) is one of `values`.
fn arg_is_one_of(index: u8, values: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|&value| {
            let condition =
                SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
            SeccompRule::new(vec![condition])
        })
        .collect()
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
    // The panic hook drops a vhost-user connection by shutting its socket down.
    libc::SYS_shutdown,
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

/// The vhost-user-blk frontend: the session's messages (with fds), call fds, reconnecting to
/// the backend, the watchdog's shutdown of a socket.
const VHOST_FRONTEND: &[i64] = &[
    libc::SYS_socket,
    // Behind a vIOMMU each connection gets a backend request channel (IOTLB misses).
    libc::SYS_socketpair,
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
        ThreadKind::VhostFrontend => &[BASE, SPAWN, VHOST_FRONTEND, ACTIVATION],
        ThreadKind::IrqResampler => &[BASE],
        ThreadKind::Vcpu => &[BASE, SPAWN, QUEUE_WORKER, VHOST_FRONTEND, ACTIVATION],
        ThreadKind::Connection => &[BASE, SPAWN, QUEUE_WORKER, ACTIVATION, CONNECTION],
    };
    let mut all: Vec<i64> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Tap queues and offloads (virtio-net activation and control queue, vhost-user-net);
/// non-blocking, cloexec.
const TAP_AND_FD_IOCTLS: [u64; 5] = [
    libc::TUNSETOFFLOAD,
    libc::TUNSETQUEUE,
    libc::TUNSETVNETHDRSZ,
    libc::FIONBIO,
    libc::FIOCLEX,
];

/// KVM's ioctl type byte.
const KVMIO: u64 = 0xae;

/// Linux's `_IOC(dir, type, nr, size)` (asm-generic/ioctl.h).
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// What a vCPU thread asks of KVM: running, the doorbells, interrupt routes and lines a device
/// sets up at activation or raises from an exit, the register dump of a crash, and reading its
/// whole state for a snapshot while parked (vmm's `VcpuState::capture`). VM-wide setup
/// (memory slots, vCPU creation) is the unfiltered main thread's. GET/SET_IRQCHIP: with VT-d
/// interrupt remapping, a guest write to the IOAPIC front reprograms the in-kernel IOAPIC's
/// entry (sluice-vmm's intremap).
const KVM_VCPU_IOCTLS: [u64; 18] = {
    use kvm_bindings::*;
    use std::mem::size_of;
    [
        ioc(0, 0x80, 0),                                        // KVM_RUN
        ioc(IOC_READ, 0x81, size_of::<kvm_regs>()),             // KVM_GET_REGS
        ioc(IOC_READ, 0x83, size_of::<kvm_sregs>()),            // KVM_GET_SREGS
        ioc(IOC_READ, 0x8c, size_of::<kvm_fpu>()),              // KVM_GET_FPU
        ioc(IOC_READ | IOC_WRITE, 0x88, size_of::<kvm_msrs>()), // KVM_GET_MSRS
        ioc(IOC_READ, 0x8e, size_of::<kvm_lapic_state>()),      // KVM_GET_LAPIC
        ioc(IOC_READ, 0x9f, size_of::<kvm_vcpu_events>()),      // KVM_GET_VCPU_EVENTS
        ioc(IOC_READ, 0x98, size_of::<kvm_mp_state>()),         // KVM_GET_MP_STATE
        ioc(IOC_READ, 0xa4, size_of::<kvm_xsave>()),            // KVM_GET_XSAVE
        ioc(IOC_READ, 0xa6, size_of::<kvm_xcrs>()),             // KVM_GET_XCRS
        ioc(IOC_READ, 0xa1, size_of::<kvm_debugregs>()),        // KVM_GET_DEBUGREGS
        ioc(IOC_WRITE, 0x76, size_of::<kvm_irqfd>()),           // KVM_IRQFD
        ioc(IOC_WRITE, 0x79, size_of::<kvm_ioeventfd>()),       // KVM_IOEVENTFD
        ioc(IOC_WRITE, 0x6a, size_of::<kvm_irq_routing>()),     // KVM_SET_GSI_ROUTING
        KVM_SIGNAL_MSI,
        ioc(IOC_WRITE, 0x61, size_of::<kvm_irq_level>()), // KVM_IRQ_LINE
        ioc(IOC_READ | IOC_WRITE, 0x62, size_of::<kvm_irqchip>()), // KVM_GET_IRQCHIP
        ioc(IOC_READ, 0x63, size_of::<kvm_irqchip>()),    // KVM_SET_IRQCHIP (_IOR)
    ]
};

const KVM_SIGNAL_MSI: u64 = ioc(IOC_WRITE, 0xa5, size_of::<kvm_bindings::kvm_msi>());

/// What a vCPU thread asks for an assigned (VFIO) device from a guest config write: a BAR move
/// re-registers the memory slots over the BAR's mmapped pages, and MSI-X enable/disable points
/// the device's vectors at their irqfds. With `dma=on-demand`, the vCPU whose register write
/// invalidated the vIOMMU's caches (or turned Bus Master on) maps and unmaps the function's DMA
/// before the invalidation completes (crates/vmm/src/vfio_shadow.rs).
const VFIO_VCPU_IOCTLS: [u64; 4] = {
    use kvm_bindings::kvm_userspace_memory_region;
    use std::mem::size_of;
    /// VFIO's ioctl type byte (`;`) and VFIO_BASE.
    const VFIO_TYPE: u64 = 0x3b;
    const VFIO_BASE: u64 = 100;
    [
        ioc(IOC_WRITE, 0x46, size_of::<kvm_userspace_memory_region>()), // KVM_SET_USER_MEMORY_REGION
        (VFIO_TYPE << 8) | (VFIO_BASE + 10),                            // VFIO_DEVICE_SET_IRQS
        (VFIO_TYPE << 8) | (VFIO_BASE + 13),                            // VFIO_IOMMU_MAP_DMA
        (VFIO_TYPE << 8) | (VFIO_BASE + 14),                            // VFIO_IOMMU_UNMAP_DMA
    ]
};

/// ioctl requests a kind may make (none for kinds not listed).
fn allowed_ioctls(kind: ThreadKind) -> Vec<u64> {
    match kind {
        ThreadKind::Vcpu => [
            &KVM_VCPU_IOCTLS[..],
            &VFIO_VCPU_IOCTLS[..],
            &TAP_AND_FD_IOCTLS[..],
        ]
        .concat(),
        // SIOCOUTQ: the server checks what a frontend left unread before answering more.
        ThreadKind::Connection => [&TAP_AND_FD_IOCTLS[..], &[libc::TIOCOUTQ]].concat(),
        // A virtio-net control queue attaches tap queues (MQ_VQ_PAIRS_SET) and sets offloads;
        // an MSI that has no irqfd route (a vIOMMU's fault event raised by the DMA that
        // faulted, a vector whose route could not be programmed) goes out with KVM_SIGNAL_MSI.
        ThreadKind::QueueWorker => [&TAP_AND_FD_IOCTLS[..], &[KVM_SIGNAL_MSI]].concat(),
        ThreadKind::VhostFrontend | ThreadKind::IrqResampler => Vec::new(),
    }
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value that is then filled in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: SigsysHandler = on_sigsys;
    action.sa_sigaction = handler as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialised and the handler only calls async-signal-safe functions.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &raw const action, std::ptr::null_mut()) };
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
        let pump = allowed(ThreadKind::VhostFrontend);
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
                (libc::getpid() > 0, libc::sysinfo(&raw mut info) == -1)
            }
        })
        .join()
        .unwrap();

        assert!(allowed);
        assert!(refused);
    }

    #[test]
    fn kvm_request_numbers_match_the_kernel_headers() {
        // From <linux/kvm.h> as compiled for x86-64 (strace decodes the same numbers).
        let expected = [
            0xae80,
            0x8090_ae81,
            0x8138_ae83,
            0x81a0_ae8c,
            0xc008_ae88,
            0x8400_ae8e,
            0x8040_ae9f,
            0x8004_ae98,
            0x9000_aea4,
            0x8188_aea6,
            0x8080_aea1,
            0x4020_ae76,
            0x4040_ae79,
            0x4008_ae6a,
            0x4020_aea5,
            0x4008_ae61,
            0xc208_ae62,
            0x8208_ae63,
        ];

        assert_eq!(KVM_VCPU_IOCTLS, expected);
    }

    #[test]
    fn only_sigbus_handlers_may_change() {
        let filter = compile(
            ThreadKind::Connection,
            SeccompAction::Errno(libc::EPERM as u32),
        )
        .unwrap();

        let (sigbus, sigsys) = std::thread::spawn(move || {
            seccompiler::apply_filter(&filter).unwrap();
            // SAFETY: reading the current actions (no new action given) changes nothing.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                (
                    libc::sigaction(libc::SIGBUS, std::ptr::null(), &raw mut old),
                    libc::sigaction(libc::SIGSYS, std::ptr::null(), &raw mut old),
                )
            }
        })
        .join()
        .unwrap();

        assert_eq!((sigbus, sigsys), (0, -1));
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
