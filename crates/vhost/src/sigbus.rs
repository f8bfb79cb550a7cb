//! Surviving a frontend that shrinks the files it shared.
//!
//! Guest RAM (SET_MEM_TABLE / ADD_MEM_REG) and the inflight area (SET_INFLIGHT_FD) are files
//! the frontend keeps; the backend maps them MAP_SHARED. Their size is checked when they are
//! mapped, but the frontend can ftruncate them afterwards, and the next load or store this
//! process makes to a page past the new end of file raises SIGBUS, which kills the whole
//! server — every connection — by default. Kernel accesses (pread/pwrite/readv into guest
//! buffers, io_uring) fail with EFAULT instead, which the device models already report.
//!
//! Seals would prevent it (F_SEAL_SHRINK), and a sealed file is taken as is; but QEMU does
//! not seal guest RAM, so unsealed files must be served too. Recovering with sigsetjmp /
//! siglongjmp around every guest-memory access is not expressible in Rust (the accesses are
//! deep inside vm-memory and virtio-queue, and unwinding across a signal frame is undefined).
//! What is done instead:
//! * every mapping of a frontend's unsealed file is [`watch`]ed: its address range and the
//!   owning connection's [`Tripwire`] are entered in a fixed table of atomics the signal
//!   handler can read without locking or allocating;
//! * the SIGBUS handler, for a fault inside a watched range (`BUS_ADRERR`), maps one
//!   anonymous zero page over the faulting page (`MAP_FIXED`, so the faulting instruction is
//!   retried and now succeeds on memory nobody else sees) and trips the connection's tripwire
//!   (an eventfd write: async-signal-safe). Any other SIGBUS goes to the handler that was
//!   installed before (Rust's stack-overflow handler, libFuzzer's), or kills the process as
//!   before;
//! * the connection's thread waits on the tripwire next to its socket and drops the
//!   connection once it fires, stopping its rings.
//!
//! Between the fault and the drop, the rings of that connection see zeros (and stores into
//! the lost pages are discarded): the frontend destroyed that memory itself, and what the
//! backend writes to disk from it in that window is no worse than what the guest already lost.
//! The zero pages go away with the mapping.
//!
//! Slots are freed lazily: a slot names the mapping through a `Weak`, and the next [`watch`]
//! reuses slots whose mapping is gone, so a slot always outlives the mapping it describes.

use std::any::Any;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, Once, Weak};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Watched mappings at once, in the whole process (a connection has at most 32 regions and
/// one inflight area).
const SLOTS: usize = 1024;
const PAGE_SIZE: usize = 4096;
/// si_code of a SIGBUS for an access past the end of a mapped file.
const BUS_ADRERR: i32 = 2;

/// One watched range; `len == 0` means free (what the handler checks first).
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    notify: AtomicI32,
}

#[allow(
    clippy::declare_interior_mutable_const,
    reason = "only used to initialise `TABLE`"
)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    notify: AtomicI32::new(-1),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// What keeps each slot's mapping and notify fd alive (not read by the handler).
struct Owner {
    mapping: Weak<dyn Any + Send + Sync>,
    _notify: OwnedFd,
}

static OWNERS: Mutex<Vec<Option<Owner>>> = Mutex::new(Vec::new());

/// The handler that was installed before ours: its `sa_sigaction` and `sa_flags`.
static PREVIOUS_ACTION: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicI32 = AtomicI32::new(0);
static INSTALL: Once = Once::new();

/// Fires when a watched mapping of one connection faulted.
#[derive(Debug)]
pub struct Tripwire(EventFd);

impl Tripwire {
    pub fn new() -> io::Result<Self> {
        Ok(Tripwire(EventFd::new(EFD_NONBLOCK)?))
    }

    /// Readable once tripped.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Whether a watched mapping faulted (does not reset it).
    pub fn tripped(&self) -> bool {
        let mut pollfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; zero timeout.
        unsafe { libc::poll(&raw mut pollfd, 1, 0) > 0 }
    }
}

/// Whether `fd`'s file can no longer shrink (F_SEAL_SHRINK), so mapping it is safe as is.
pub fn shrink_sealed(fd: RawFd) -> bool {
    // SAFETY: F_GET_SEALS only reads the seals of `fd`; errors (not a memfd) return -1.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// Watches `len` bytes at `start`, a mapping owned by `mapping`, for the connection of
/// `tripwire`. Fails only when every slot is taken.
pub fn watch(
    start: usize,
    len: usize,
    mapping: Weak<dyn Any + Send + Sync>,
    tripwire: &Tripwire,
) -> io::Result<()> {
    install();
    if len == 0 {
        return Ok(());
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor (checked) that only we own.
    let duplicate = unsafe { libc::fcntl(tripwire.fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if duplicate < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `duplicate` is a fresh descriptor nobody else owns.
    let notify_fd = unsafe { OwnedFd::from_raw_fd(duplicate) };
    let mut owners = OWNERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if owners.len() < SLOTS {
        owners.resize_with(SLOTS, || None);
    }
    release_dead(&mut owners);
    let index = owners
        .iter()
        .position(Option::is_none)
        .ok_or_else(|| io::Error::other("too many watched guest memory mappings"))?;
    let slot = &TABLE[index];
    slot.notify.store(notify_fd.as_raw_fd(), Ordering::Relaxed);
    slot.start.store(start, Ordering::Relaxed);
    slot.len.store(len, Ordering::Release);
    owners[index] = Some(Owner {
        mapping,
        _notify: notify_fd,
    });
    Ok(())
}

/// Frees the slots whose mapping is gone (nobody can touch that range any more).
fn release_dead(owners: &mut [Option<Owner>]) {
    for (index, owner) in owners.iter_mut().enumerate() {
        if owner
            .as_ref()
            .is_some_and(|o| o.mapping.strong_count() == 0)
        {
            TABLE[index].len.store(0, Ordering::Release);
            TABLE[index].notify.store(-1, Ordering::Relaxed);
            *owner = None;
        }
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no handler, no flags, empty mask" value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        let handler: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        // SAFETY: zeroed storage for the previous action, filled by sigaction.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: valid action and output pointers; SIGBUS may have a handler.
        let installed =
            unsafe { libc::sigaction(libc::SIGBUS, &raw const action, &raw mut previous) } == 0;
        if installed {
            PREVIOUS_ACTION.store(previous.sa_sigaction, Ordering::Release);
            PREVIOUS_FLAGS.store(previous.sa_flags, Ordering::Release);
        } else {
            tracing::error!(
                "vhost-user: cannot install the SIGBUS handler: {}",
                io::Error::last_os_error()
            );
        }
    });
}

/// The watched slot containing `addr`.
fn slot_of(addr: usize) -> Option<&'static Slot> {
    TABLE.iter().find(|slot| {
        let len = slot.len.load(Ordering::Acquire);
        let start = slot.start.load(Ordering::Relaxed);
        len != 0 && addr >= start && addr - start < len
    })
}

extern "C" fn on_sigbus(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == BUS_ADRERR {
        if let Some(slot) = slot_of(addr) {
            if replace_page(addr) {
                let one = 1u64.to_ne_bytes();
                // SAFETY: write(2) is async-signal-safe; the fd stays open while its slot is
                // in use (see `Owner`); an error only means nobody gets told.
                let _ = unsafe {
                    libc::write(slot.notify.load(Ordering::Relaxed), one.as_ptr().cast(), 8)
                };
                return;
            }
        }
    }
    chain(signal, info, context);
}

/// Maps a private zero page over the page holding `addr`; false if that failed.
fn replace_page(addr: usize) -> bool {
    let page = addr & !(PAGE_SIZE - 1);
    // SAFETY: the page lies inside a watched mapping (not in memory Rust owns); MAP_FIXED
    // replaces just that page of it with fresh anonymous memory. mmap is a plain syscall.
    let mapped = unsafe {
        libc::mmap(
            page as *mut libc::c_void,
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    mapped as usize == page
}

/// Hands a SIGBUS that is not ours to the previous handler, or restores the default action
/// so that the retried access kills the process as it would have without us.
fn chain(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let action = PREVIOUS_ACTION.load(Ordering::Acquire);
    let flags = PREVIOUS_FLAGS.load(Ordering::Acquire);
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // SAFETY: a zeroed sigaction with SIG_DFL is the default disposition.
        let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
        default.sa_sigaction = libc::SIG_DFL;
        // SAFETY: sigaction is async-signal-safe; valid pointer, no old action wanted.
        unsafe { libc::sigaction(signal, &raw const default, std::ptr::null_mut()) };
        return;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed as an SA_SIGINFO handler with this
        // signature; we pass on exactly what the kernel gave us.
        let handler: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(action) };
        handler(signal, info, context);
    } else {
        // SAFETY: a handler installed without SA_SIGINFO takes just the signal number.
        let handler: extern "C" fn(i32) = unsafe { std::mem::transmute(action) };
        handler(signal);
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::sync::Arc;

    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::FileOffset;

    use super::*;

    fn memfd(size: u64, flags: u32) -> File {
        // SAFETY: NUL-terminated name; result checked.
        let fd = unsafe { libc::memfd_create(c"sigbus-test".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        file
    }

    #[test]
    fn a_watched_mapping_of_a_shrunk_file_reads_zeros_and_trips() {
        let file = memfd(2 * PAGE_SIZE as u64, 0);
        let region = Arc::new(
            MmapRegionBuilder::<()>::new(2 * PAGE_SIZE)
                .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .build()
                .unwrap(),
        );
        let tripwire = Tripwire::new().unwrap();
        let owner: Arc<dyn Any + Send + Sync> = region.clone();
        watch(
            region.as_ptr() as usize,
            region.size(),
            Arc::downgrade(&owner),
            &tripwire,
        )
        .unwrap();
        let at = region.as_ptr() as usize + PAGE_SIZE + 8;
        // SAFETY: inside the mapping; first page, still backed by the file.
        unsafe { region.as_ptr().write_volatile(1) };
        assert!(!tripwire.tripped());

        file.set_len(PAGE_SIZE as u64).unwrap();
        // SAFETY: inside the mapping; the page past end of file faults and is replaced.
        let value = unsafe { (at as *const u8).read_volatile() };

        assert_eq!(value, 0);
        assert!(tripwire.tripped());
    }

    #[test]
    fn shrink_seals_are_recognised() {
        let sealed = memfd(4096, libc::MFD_ALLOW_SEALING);
        // SAFETY: fcntl on our own fd.
        let added =
            unsafe { libc::fcntl(sealed.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(added, 0);

        assert!(shrink_sealed(sealed.as_raw_fd()));
        assert!(!shrink_sealed(memfd(4096, 0).as_raw_fd()));
    }
}
