//! [`Iotlb`]: vhost-user device IOTLB, for frontends with a virtual IOMMU.
//!
//! Once VIRTIO_F_ACCESS_PLATFORM is negotiated, every address the driver gives the device —
//! ring addresses in SET_VRING_ADDR, buffer addresses in descriptors — is an IOVA. The frontend
//! sends translations in VHOST_USER_IOTLB_MSG (`struct vhost_iotlb_msg`): UPDATE maps
//! `[iova, iova + size)` to the frontend's *user* addresses `[uaddr, uaddr + size)` (resolved
//! through the memory table's user addresses to guest physical addresses) with RO, WO or RW
//! permission, INVALIDATE removes mappings. When a lookup finds nothing, the backend sends a
//! MISS on the backend request channel (SET_BACKEND_REQ_FD) and the frontend answers with an
//! UPDATE on the main channel. QEMU asks for no protocol feature of its own for this: it
//! requires VHOST_USER_PROTOCOL_F_BACKEND_REQ and F_REPLY_ACK next to ACCESS_PLATFORM, and
//! it always sets NEED_REPLY on IOTLB messages.
//!
//! Written here on top of the `vhost` crate's types because the crate (0.18) has neither the
//! IOTLB message (its backend handler refuses request 22) nor a way to send one on the
//! backend channel (its `Backend` only sends its own requests, and does not give the socket
//! back): the server reads IOTLB_MSG and SET_BACKEND_REQ_FD itself (see `crate::server`), and
//! MISS messages are written here.
//!
//! Policy:
//! * UPDATE is validated (size > 0, no wrap of the IOVA or user range, the user range inside
//!   one memory-table region, perm RO/WO/RW); a refused one is answered with a failure and
//!   changes nothing. An UPDATE overlapping older entries replaces them. At most
//!   [`MAX_ENTRIES`] entries are kept: past that the lowest entry is dropped (this is a cache:
//!   the frontend sends it again on the next miss).
//! * INVALIDATE removes every entry overlapping its range (clipped at the top of the address
//!   space; an empty one is refused) and drops what the connection's `DmaSpace` cached for
//!   them, so running queues re-translate on their next access.
//! * A lookup that misses (no entry, or one without the access's permission) sends a MISS
//!   and, on a queue worker, waits up to [`MISS_WAIT`] for an UPDATE that covers it, sending
//!   the MISS again after each INVALIDATE meanwhile (the UPDATE may have come and been
//!   invalidated before the worker woke: a guest that maps and invalidates often, as sluice's
//!   guest kit does, made a ring fail that way); after
//!   that the access fails and the request with it (virtio-blk answers IOERR when it can,
//!   else the queue goes NEEDS_RESET). Waiting keeps a cold IOTLB working (QEMU fills entries
//!   only on demand); the bound keeps a guest that points at unmapped memory from stalling
//!   its queue forever (the frontend never answers a miss its vIOMMU cannot translate). The
//!   connection thread never waits: it is the thread that would read the UPDATE. Ring
//!   addresses are resolved there without waiting: a ring whose IOVAs miss sends MISSes and
//!   starts when an UPDATE fills the gap. Without a backend channel (a frontend that never
//!   sent SET_BACKEND_REQ_FD) a miss fails at once.
//! * Requests a crashed backend left in flight (inflight area) are resubmitted on the queue
//!   worker's first pass rather than at ring start when the rings are translated: the new
//!   connection's IOTLB is empty, and only a worker may wait for the updates. The shadow avail
//!   ring holding the recovered heads sits at an IOVA no vIOMMU can map (bit 63).
//! * Entries hold user addresses and are resolved against the memory table at lookup time, so
//!   a memory table change cannot leave a stale guest physical address behind.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use sluice_dma::{DmaTranslator, Mapping, TranslationSource};
use vm_memory::{ByteValued, Permissions};

/// VIRTIO_F_ACCESS_PLATFORM (bit 33) as a feature mask.
pub const FEATURE_ACCESS_PLATFORM: u64 = 1 << 33;
/// Most entries one connection's IOTLB holds.
pub const MAX_ENTRIES: usize = 16384;
/// How long a queue worker waits for the UPDATE answering its MISS.
pub const MISS_WAIT: Duration = Duration::from_secs(1);

/// `vhost_iotlb_msg.type` values.
pub const IOTLB_MISS: u8 = 1;
pub const IOTLB_UPDATE: u8 = 2;
pub const IOTLB_INVALIDATE: u8 = 3;
pub const IOTLB_ACCESS_FAIL: u8 = 4;
/// `vhost_iotlb_msg.perm` values.
pub const ACCESS_RO: u8 = 1;
pub const ACCESS_WO: u8 = 2;
pub const ACCESS_RW: u8 = 3;
/// VHOST_USER_BACKEND_IOTLB_MSG, the backend channel's request code.
const BACKEND_IOTLB_MSG: u32 = 1;
/// Header flags of a backend-channel message: version 1, no reply wanted.
const BACKEND_MSG_FLAGS: u32 = 1;

/// `struct vhost_iotlb_msg` as it travels in VHOST_USER_IOTLB_MSG (32 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IotlbMsg {
    pub iova: u64,
    pub size: u64,
    pub uaddr: u64,
    pub perm: u8,
    pub kind: u8,
    pub padding: [u8; 6],
}

// SAFETY: plain old data: integers and bytes, no padding the compiler adds (24 + 1 + 1 + 6).
unsafe impl ByteValued for IotlbMsg {}

/// Bytes in an IOTLB message body.
pub const IOTLB_MSG_BYTES: usize = size_of::<IotlbMsg>();

/// Why an IOTLB message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IotlbError {
    #[error("IOTLB message type {0} is not one a frontend sends")]
    Kind(u8),
    #[error("IOTLB UPDATE with permission {0} (not RO, WO or RW)")]
    Permission(u8),
    #[error("IOTLB range {iova:#x} + {size:#x} is empty or wraps")]
    Range { iova: u64, size: u64 },
    #[error("IOTLB UPDATE of {iova:#x}: user range {uaddr:#x} + {size:#x} is not inside one memory region")]
    OutsideMemory { iova: u64, uaddr: u64, size: u64 },
}

/// One region of the memory table as the frontend addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRange {
    pub user_addr: u64,
    pub size: u64,
    pub gpa: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    uaddr: u64,
    permissions: Permissions,
}

/// What the IOTLB counted (for logs and tests).
#[derive(Debug, Default)]
pub struct IotlbCounters {
    pub updates: AtomicU64,
    pub invalidations: AtomicU64,
    pub misses_sent: AtomicU64,
    pub refused_messages: AtomicU64,
    /// Lookups that found no usable entry in time (the access failed).
    pub faults: AtomicU64,
}

/// A snapshot of [`IotlbCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IotlbStats {
    pub updates: u64,
    pub invalidations: u64,
    pub misses_sent: u64,
    pub refused_messages: u64,
    pub faults: u64,
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<u64, Entry>,
    memory: Vec<UserRange>,
    /// Counts INVALIDATE messages: a waiting lookup whose answer may have been removed before
    /// it woke asks again.
    invalidations: u64,
}

/// One connection's IOTLB (see the module doc).
#[derive(Debug)]
pub struct Iotlb {
    state: Mutex<State>,
    updated: Condvar,
    channel: Mutex<Option<UnixStream>>,
    /// The DMA space the queues run on, whose cached translations INVALIDATE drops.
    translator: Mutex<Weak<DmaTranslator>>,
    /// The connection thread: it never waits for an UPDATE (it would be the one to read it).
    connection_thread: ThreadId,
    miss_wait: Duration,
    counters: IotlbCounters,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn permissions_of(perm: u8) -> Option<Permissions> {
    match perm {
        ACCESS_RO => Some(Permissions::Read),
        ACCESS_WO => Some(Permissions::Write),
        ACCESS_RW => Some(Permissions::ReadWrite),
        _ => None,
    }
}

fn perm_of(access: Permissions) -> u8 {
    match access {
        Permissions::Read | Permissions::No => ACCESS_RO,
        Permissions::Write => ACCESS_WO,
        Permissions::ReadWrite => ACCESS_RW,
    }
}

impl State {
    fn resolve(&self, uaddr: u64, size: u64) -> Option<u64> {
        let end = uaddr.checked_add(size)?;
        self.memory.iter().find_map(|r| {
            let region_end = r.user_addr.checked_add(r.size)?;
            (r.user_addr <= uaddr && end <= region_end).then(|| r.gpa + (uaddr - r.user_addr))
        })
    }

    /// The entry covering `iova` with its IOVA, if any.
    fn covering(&self, iova: u64) -> Option<(u64, Entry)> {
        let (&start, &entry) = self.entries.range(..=iova).next_back()?;
        (iova - start < entry.size).then_some((start, entry))
    }

    /// The mapping for `iova` if an entry covers it, allows `access` and lies in memory.
    fn mapping(&self, iova: u64, access: Permissions) -> Option<Mapping> {
        let (start, entry) = self.covering(iova)?;
        if !entry.permissions.allow(access) {
            return None;
        }
        let target = self.resolve(entry.uaddr, entry.size)?;
        Some(Mapping {
            iova: start,
            target,
            length: entry.size,
            permissions: entry.permissions,
        })
    }

    /// Removes the entries overlapping `[iova, end)`; returns the span they covered joined
    /// with the range itself, or `None` if there were none.
    fn remove_overlapping(&mut self, iova: u64, end: u64) -> Option<(u64, u64)> {
        let mut span = (iova, end);
        let mut removed = false;
        let mut doomed: Vec<u64> = self
            .entries
            .range(iova..end)
            .map(|(&start, _)| start)
            .collect();
        if let Some((start, _)) = self.covering(iova) {
            doomed.push(start);
        }
        for start in doomed {
            if let Some(entry) = self.entries.remove(&start) {
                removed = true;
                span.0 = span.0.min(start);
                span.1 = span.1.max(start.saturating_add(entry.size));
            }
        }
        removed.then_some(span)
    }
}

impl Iotlb {
    /// An empty IOTLB for a connection served on the calling thread.
    pub fn new() -> Self {
        Self::with_miss_wait(MISS_WAIT)
    }

    /// As [`Iotlb::new`], with another bound on waiting for a miss to be answered.
    pub fn with_miss_wait(miss_wait: Duration) -> Self {
        Iotlb {
            state: Mutex::default(),
            updated: Condvar::new(),
            channel: Mutex::new(None),
            translator: Mutex::new(Weak::new()),
            connection_thread: thread::current().id(),
            miss_wait,
            counters: IotlbCounters::default(),
        }
    }

    /// The backend request channel MISS messages go to (SET_BACKEND_REQ_FD).
    pub fn set_channel(&self, channel: Option<UnixStream>) {
        if let Some(channel) = &channel {
            // A frontend that stops reading its channel must not block a queue worker.
            let _ = channel.set_nonblocking(true);
        }
        *locked(&self.channel) = channel;
    }

    /// Whether a backend request channel is set.
    pub fn has_channel(&self) -> bool {
        locked(&self.channel).is_some()
    }

    /// The memory table's regions, by user address (after every memory change).
    pub fn set_memory(&self, memory: Vec<UserRange>) {
        locked(&self.state).memory = memory;
        self.updated.notify_all();
    }

    /// The translator of the DMA space the queues run on (INVALIDATE drops its cache).
    pub fn set_translator(&self, translator: Weak<DmaTranslator>) {
        *locked(&self.translator) = translator;
    }

    /// Drops every entry (a reset or a new feature negotiation).
    pub fn clear(&self) {
        locked(&self.state).entries.clear();
        if let Some(translator) = locked(&self.translator).upgrade() {
            translator.invalidate_all();
        }
    }

    pub fn stats(&self) -> IotlbStats {
        let c = &self.counters;
        IotlbStats {
            updates: c.updates.load(Ordering::Relaxed),
            invalidations: c.invalidations.load(Ordering::Relaxed),
            misses_sent: c.misses_sent.load(Ordering::Relaxed),
            refused_messages: c.refused_messages.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
        }
    }

    /// Applies one VHOST_USER_IOTLB_MSG from the frontend.
    pub fn handle(&self, msg: &IotlbMsg) -> Result<(), IotlbError> {
        let result = match msg.kind {
            IOTLB_UPDATE => self.update(msg),
            IOTLB_INVALIDATE => self.invalidate(msg.iova, msg.size),
            kind => Err(IotlbError::Kind(kind)),
        };
        if result.is_err() {
            self.counters
                .refused_messages
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn update(&self, msg: &IotlbMsg) -> Result<(), IotlbError> {
        let permissions = permissions_of(msg.perm).ok_or(IotlbError::Permission(msg.perm))?;
        let end = checked_end(msg.iova, msg.size)?;
        let mut state = locked(&self.state);
        if state.resolve(msg.uaddr, msg.size).is_none() {
            return Err(IotlbError::OutsideMemory {
                iova: msg.iova,
                uaddr: msg.uaddr,
                size: msg.size,
            });
        }
        let replaced = state.remove_overlapping(msg.iova, end);
        if state.entries.len() >= MAX_ENTRIES {
            state.entries.pop_first();
        }
        state.entries.insert(
            msg.iova,
            Entry {
                size: msg.size,
                uaddr: msg.uaddr,
                permissions,
            },
        );
        drop(state);
        if let Some((from, to)) = replaced {
            // Older entries were replaced: what the DMA space cached from them is stale.
            self.drop_cached(from, to);
        }
        self.counters.updates.fetch_add(1, Ordering::Relaxed);
        self.updated.notify_all();
        Ok(())
    }

    fn invalidate(&self, iova: u64, size: u64) -> Result<(), IotlbError> {
        if size == 0 {
            return Err(IotlbError::Range { iova, size });
        }
        // A range past the top of the address space is clipped, not refused: dropping more
        // translations than asked is always safe, keeping one the guest revoked is not.
        let end = iova.saturating_add(size);
        let removed = {
            let mut state = locked(&self.state);
            state.invalidations = state.invalidations.wrapping_add(1);
            state.remove_overlapping(iova, end)
        };
        // Waiting lookups check whether the invalidation took what they waited for.
        self.updated.notify_all();
        // The DMA space may cache the range even where the IOTLB holds nothing any more.
        let (from, to) = removed.unwrap_or((iova, end));
        self.drop_cached(from, to);
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn drop_cached(&self, from: u64, to: u64) {
        if let Some(translator) = locked(&self.translator).upgrade() {
            translator.invalidate(from, to - from);
        }
    }

    /// Checks what every lookup relies on: at most [`MAX_ENTRIES`] entries, none empty,
    /// wrapping or overlapping the next (for the fuzz target).
    pub fn check_entries(&self) -> Result<(), String> {
        let state = locked(&self.state);
        if state.entries.len() > MAX_ENTRIES {
            return Err(format!("{} entries", state.entries.len()));
        }
        let mut previous_end = 0u64;
        for (i, (&iova, entry)) in state.entries.iter().enumerate() {
            let end = iova
                .checked_add(entry.size)
                .filter(|_| entry.size > 0)
                .ok_or_else(|| format!("entry {iova:#x} + {:#x}", entry.size))?;
            if i > 0 && iova < previous_end {
                return Err(format!("entry {iova:#x} overlaps the one before"));
            }
            previous_end = end;
        }
        Ok(())
    }

    /// The guest physical address of `[iova, iova + len)` if the IOTLB maps it whole, with
    /// `access`, onto one contiguous range. `Ok(None)`: part of it is missing (a MISS was
    /// sent for the first missing piece, without waiting); `Err`: mapped, but not contiguous.
    pub fn resolve_contiguous(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<Option<u64>, String> {
        let end = iova
            .checked_add(len)
            .ok_or_else(|| format!("{iova:#x} + {len:#x} wraps"))?;
        let state = locked(&self.state);
        let mut at = iova;
        let mut start_gpa = None;
        while at < end || start_gpa.is_none() {
            let Some(m) = state.mapping(at, access) else {
                drop(state);
                self.send_miss(at, access);
                return Ok(None);
            };
            let gpa = m.target + (at - m.iova);
            let first = *start_gpa.get_or_insert(gpa);
            if gpa != first + (at - iova) {
                return Err(format!(
                    "IOVA {iova:#x} + {len:#x} is not one contiguous range of guest memory"
                ));
            }
            at = m.iova.saturating_add(m.length);
            if len == 0 {
                break;
            }
        }
        Ok(start_gpa)
    }

    /// Sends a MISS for `iova` on the backend channel; false if there is none or it failed.
    fn send_miss(&self, iova: u64, access: Permissions) -> bool {
        let mut channel = locked(&self.channel);
        let Some(stream) = channel.as_ref() else {
            return false;
        };
        let msg = IotlbMsg {
            iova,
            perm: perm_of(access),
            kind: IOTLB_MISS,
            ..IotlbMsg::default()
        };
        let mut bytes = Vec::with_capacity(12 + IOTLB_MSG_BYTES);
        for word in [BACKEND_IOTLB_MSG, BACKEND_MSG_FLAGS, IOTLB_MSG_BYTES as u32] {
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        bytes.extend_from_slice(msg.as_slice());
        match write_all_or_nothing(stream, &bytes) {
            Ok(n) if n == bytes.len() => {
                self.counters.misses_sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tracing::warn!("vhost-user: IOTLB MISS for {iova:#x} dropped: the frontend is not reading its backend channel");
                false
            }
            result => {
                // A torn message would desynchronise the channel: give it up.
                tracing::warn!("vhost-user: backend channel failed ({result:?}); no more IOTLB misses are sent");
                *channel = None;
                false
            }
        }
    }

    /// The lookup a queue's DMA space makes on a miss of its own cache (see the module doc).
    fn lookup(&self, iova: u64, access: Permissions) -> Option<Mapping> {
        if let Some(mapping) = locked(&self.state).mapping(iova, access) {
            return Some(mapping);
        }
        let asked_at = locked(&self.state).invalidations;
        let sent = self.send_miss(iova, access);
        if !sent || thread::current().id() == self.connection_thread {
            self.counters.faults.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let deadline = Instant::now() + self.miss_wait;
        let mut state = locked(&self.state);
        let mut asked_at = asked_at;
        loop {
            if let Some(mapping) = state.mapping(iova, access) {
                return Some(mapping);
            }
            if state.invalidations != asked_at {
                // The answer may have come and gone before this thread woke (an UPDATE, then
                // an INVALIDATE): ask again rather than wait for an UPDATE already spent.
                asked_at = state.invalidations;
                drop(state);
                self.send_miss(iova, access);
                state = locked(&self.state);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.counters.faults.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            state = self
                .updated
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

/// One write(2) of `bytes` to the channel. Not `UnixStream::write`: that is send(2), which
/// the queue workers' seccomp filter does not allow (write(2) it does; SIGPIPE is ignored by
/// the Rust runtime, so a closed channel is EPIPE).
fn write_all_or_nothing(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is valid for reads of its length; the fd is owned by `stream`.
    let n = unsafe { libc::write(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn checked_end(iova: u64, size: u64) -> Result<u64, IotlbError> {
    match iova.checked_add(size) {
        Some(end) if size > 0 => Ok(end),
        _ => Err(IotlbError::Range { iova, size }),
    }
}

/// A queue DMA space's [`TranslationSource`]: the connection's IOTLB.
#[derive(Debug, Clone)]
pub struct IotlbSource(pub Arc<Iotlb>);

impl TranslationSource for IotlbSource {
    fn lookup(&self, iova: u64, access: Permissions) -> Option<Mapping> {
        self.0.lookup(iova, access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Vec<UserRange> {
        vec![UserRange {
            user_addr: 0x7f00_0000_0000,
            size: 0x10_0000,
            gpa: 0,
        }]
    }

    fn update(iova: u64, size: u64, uaddr: u64, perm: u8) -> IotlbMsg {
        IotlbMsg {
            iova,
            size,
            uaddr,
            perm,
            kind: IOTLB_UPDATE,
            ..IotlbMsg::default()
        }
    }

    fn iotlb() -> Iotlb {
        let iotlb = Iotlb::with_miss_wait(Duration::from_millis(10));
        iotlb.set_memory(memory());
        iotlb
    }

    #[test]
    fn message_is_the_kernels_32_bytes() {
        assert_eq!(IOTLB_MSG_BYTES, 32);
    }

    #[test]
    fn update_maps_iova_to_the_gpa_behind_the_user_address() {
        let iotlb = iotlb();

        iotlb
            .handle(&update(0x1_0000_0000, 0x1000, 0x7f00_0000_3000, ACCESS_RW))
            .unwrap();

        let m = iotlb.lookup(0x1_0000_0800, Permissions::Write).unwrap();
        assert_eq!(
            (m.iova, m.target, m.length),
            (0x1_0000_0000, 0x3000, 0x1000)
        );
        assert_eq!(iotlb.stats().updates, 1);
    }

    #[test]
    fn bad_updates_are_refused_and_change_nothing() {
        let iotlb = iotlb();
        let bad = [
            update(0x1000, 0, 0x7f00_0000_0000, ACCESS_RW),
            update(u64::MAX - 0xfff, 0x2000, 0x7f00_0000_0000, ACCESS_RW),
            update(0x1000, 0x1000, 0x7f00_000f_f800, ACCESS_RW),
            update(0x1000, 0x1000, 0x1000, ACCESS_RW),
            update(0x1000, 0x1000, 0x7f00_0000_0000, 0),
            update(0x1000, 0x1000, 0x7f00_0000_0000, 7),
            IotlbMsg {
                kind: IOTLB_MISS,
                ..update(0x1000, 0x1000, 0x7f00_0000_0000, ACCESS_RW)
            },
        ];

        for msg in &bad {
            assert!(iotlb.handle(msg).is_err(), "{msg:?}");
        }

        assert!(iotlb.lookup(0x1000, Permissions::Read).is_none());
        assert_eq!(iotlb.stats().refused_messages, bad.len() as u64);
    }

    #[test]
    fn permissions_are_enforced() {
        let iotlb = iotlb();
        iotlb
            .handle(&update(0x2000, 0x1000, 0x7f00_0000_0000, ACCESS_RO))
            .unwrap();

        assert!(iotlb.lookup(0x2000, Permissions::Read).is_some());
        assert!(iotlb.lookup(0x2000, Permissions::Write).is_none());
    }

    #[test]
    fn invalidate_removes_overlapping_entries() {
        let iotlb = iotlb();
        iotlb
            .handle(&update(0x2000, 0x2000, 0x7f00_0000_0000, ACCESS_RW))
            .unwrap();
        iotlb
            .handle(&update(0x8000, 0x1000, 0x7f00_0000_8000, ACCESS_RW))
            .unwrap();

        iotlb
            .handle(&IotlbMsg {
                iova: 0x3000,
                size: 0x1000,
                kind: IOTLB_INVALIDATE,
                ..IotlbMsg::default()
            })
            .unwrap();

        assert!(iotlb.lookup(0x2000, Permissions::Read).is_none());
        assert!(iotlb.lookup(0x8000, Permissions::Read).is_some());
    }

    #[test]
    fn an_invalidation_past_the_top_of_the_address_space_is_clipped() {
        let iotlb = iotlb();
        iotlb
            .handle(&update(0x8000, 0x1000, 0x7f00_0000_8000, ACCESS_RW))
            .unwrap();

        let clipped = iotlb.handle(&IotlbMsg {
            iova: 0x4000,
            size: u64::MAX,
            kind: IOTLB_INVALIDATE,
            ..IotlbMsg::default()
        });

        assert_eq!(clipped, Ok(()));
        assert!(iotlb.lookup(0x8000, Permissions::Read).is_none());
    }

    #[test]
    fn entries_are_bounded() {
        let iotlb = iotlb();
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            iotlb
                .handle(&update(i * 0x1000, 0x1000, 0x7f00_0000_0000, ACCESS_RW))
                .unwrap();
        }

        assert_eq!(locked(&iotlb.state).entries.len(), MAX_ENTRIES);
    }

    /// A waiting lookup whose answer an INVALIDATE may have taken asks again.
    #[test]
    fn a_waiting_miss_is_sent_again_after_an_invalidation() {
        let iotlb = Arc::new(Iotlb::with_miss_wait(Duration::from_secs(5)));
        iotlb.set_memory(memory());
        let (ours, theirs) = UnixStream::pair().unwrap();
        iotlb.set_channel(Some(ours));
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let read_miss = || {
            let mut raw = [0u8; 12 + IOTLB_MSG_BYTES];
            io::Read::read_exact(&mut &theirs, &mut raw).expect("a MISS");
            u64::from_ne_bytes(raw[12..20].try_into().unwrap())
        };
        let worker = {
            let iotlb = iotlb.clone();
            thread::spawn(move || iotlb.lookup(0x9000, Permissions::Read))
        };

        let first = read_miss();
        iotlb
            .handle(&IotlbMsg {
                iova: 0,
                size: 1 << 40,
                kind: IOTLB_INVALIDATE,
                ..IotlbMsg::default()
            })
            .unwrap();
        let again = read_miss();
        iotlb
            .handle(&update(0x9000, 0x1000, 0x7f00_0000_2000, ACCESS_RO))
            .unwrap();

        assert_eq!((first, again), (0x9000, 0x9000));
        let mapping = worker
            .join()
            .unwrap()
            .expect("answered after the second MISS");
        assert_eq!(mapping.target, 0x2000);
    }

    #[test]
    fn a_ring_must_be_contiguous_in_guest_memory() {
        let iotlb = iotlb();
        iotlb
            .handle(&update(0x1_0000, 0x1000, 0x7f00_0000_5000, ACCESS_RW))
            .unwrap();
        iotlb
            .handle(&update(0x1_1000, 0x1000, 0x7f00_0000_6000, ACCESS_RW))
            .unwrap();
        iotlb
            .handle(&update(0x2_0000, 0x1000, 0x7f00_0000_5000, ACCESS_RW))
            .unwrap();
        iotlb
            .handle(&update(0x2_1000, 0x1000, 0x7f00_0000_9000, ACCESS_RW))
            .unwrap();

        let contiguous = iotlb.resolve_contiguous(0x1_0800, 0x1000, Permissions::Read);
        let split = iotlb.resolve_contiguous(0x2_0800, 0x1000, Permissions::Read);
        let missing = iotlb.resolve_contiguous(0x3_0000, 0x10, Permissions::Read);

        assert_eq!(contiguous, Ok(Some(0x5800)));
        assert!(split.is_err());
        assert_eq!(missing, Ok(None));
    }
}
