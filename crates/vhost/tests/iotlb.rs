//! A scripted frontend with a vIOMMU (issue 14): VIRTIO_F_ACCESS_PLATFORM negotiated, ring and
//! buffer addresses are IOVAs, translations arrive as VHOST_USER_IOTLB_MSG updates, and the
//! backend asks for missing ones with MISS messages on the backend request channel.
//!
//! The IOVA space here is guest physical memory shifted up by `IOVA_BASE`; the test maps only
//! the pages it means the device to reach, each with the permission the driver would give it.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use std::fs::File;
use std::sync::atomic::Ordering;

use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const IOVA_BASE: u64 = 0x40_0000_0000;
const IOTLB_MSG: u32 = 22;
const NEED_REPLY: u32 = 1 << 3;
const MISS: u8 = 1;
const UPDATE: u8 = 2;
const INVALIDATE: u8 = 3;
const RO: u8 = 1;
const WO: u8 = 2;
const RW: u8 = 3;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const EVENT_IDX: u64 = 1 << 29;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const PAGE: u64 = 0x1000;
/// Longer than the backend waits for an UPDATE after a MISS (one second).
const REFUSAL_WAIT: Duration = Duration::from_secs(5);

fn iova(gpa: u64) -> u64 {
    IOVA_BASE + gpa
}

fn header_gpa(head: u16) -> u64 {
    HEADER_GPA + 0x100 * u64::from(head)
}

fn data_gpa(head: u16) -> u64 {
    DATA_GPA + 0x1000 * u64::from(head)
}

/// A `struct vhost_iotlb_msg` as the frontend sends it.
fn iotlb_body(iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    for word in [iova, size, uaddr] {
        body.extend_from_slice(&word.to_ne_bytes());
    }
    body.extend_from_slice(&[perm, kind, 0, 0, 0, 0, 0, 0]);
    body
}

/// A session whose guest sits behind a vIOMMU.
struct IommuSession {
    session: Session,
    /// A second handle on the main socket: the `vhost` crate's frontend has no IOTLB_MSG.
    raw: UnixStream,
    /// Our end of the backend request channel.
    channel: UnixStream,
    guest: Guest,
    /// The ring's error fd (NEEDS_RESET).
    error: EventFd,
}

impl IommuSession {
    /// Connects, hands over the backend channel, negotiates ACCESS_PLATFORM, shares memory
    /// and sets ring 0 up at IOVAs nothing is mapped for yet.
    fn start(server: &TestServer) -> Self {
        Self::start_on(server, Guest::new(), None)
    }

    /// As [`IommuSession::start`], on `guest`'s memory, with an inflight area if given (set
    /// before the rings, as QEMU does).
    fn start_on(
        server: &TestServer,
        guest: Guest,
        inflight: Option<&(VhostUserInflight, File)>,
    ) -> Self {
        let mut session = connect(&server.socket);
        if let Some((info, area)) = inflight {
            session
                .frontend
                .set_inflight_fd(info, area.as_raw_fd())
                .expect("SET_INFLIGHT_FD");
        }
        // SAFETY: the frontend's socket stays open as long as `session`; the duplicate is
        // an independent descriptor on the same connection.
        let raw = unsafe { dup_stream(session.frontend.as_raw_fd()) };
        raw.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
        let (channel, theirs) = UnixStream::pair().unwrap();
        channel.set_read_timeout(Some(REFUSAL_WAIT)).unwrap();
        let error = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let fe = &mut session.frontend;
        fe.set_backend_request_fd(&theirs)
            .expect("SET_BACKEND_REQ_FD");
        let features = (session.features | ACCESS_PLATFORM) & !EVENT_IDX & !RING_PACKED;
        fe.set_features(features).expect("SET_FEATURES");
        fe.set_mem_table(&[guest.region()]).expect("SET_MEM_TABLE");
        fe.set_vring_num(0, QUEUE_SIZE).expect("SET_VRING_NUM");
        fe.set_vring_base(0, 0).expect("SET_VRING_BASE");
        let rings = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: iova(DESC_GPA),
            used_ring_addr: iova(USED_GPA),
            avail_ring_addr: iova(AVAIL_GPA),
            log_addr: None,
        };
        fe.set_vring_addr(0, &rings).expect("SET_VRING_ADDR");
        fe.set_vring_call(0, &session.call).expect("SET_VRING_CALL");
        fe.set_vring_err(0, &error).expect("SET_VRING_ERR");
        fe.set_vring_kick(0, &session.kick).expect("SET_VRING_KICK");
        fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
        IommuSession {
            session,
            raw,
            channel,
            guest,
            error,
        }
    }

    /// Sends one IOTLB message; true if the backend acked it with success.
    fn iotlb(&mut self, iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8) -> bool {
        let mut message = Vec::new();
        for word in [IOTLB_MSG, 1 | NEED_REPLY, 32] {
            message.extend_from_slice(&word.to_ne_bytes());
        }
        message.extend_from_slice(&iotlb_body(iova, size, uaddr, perm, kind));
        self.raw.write_all(&message).expect("send IOTLB_MSG");
        let mut reply = [0u8; 20];
        self.raw.read_exact(&mut reply).expect("IOTLB_MSG reply");
        assert_eq!(
            u32::from_ne_bytes(reply[0..4].try_into().unwrap()),
            IOTLB_MSG
        );
        u64::from_ne_bytes(reply[12..20].try_into().unwrap()) == 0
    }

    /// Maps the guest page at `gpa` (IOVA `iova(gpa)`) with `perm`.
    fn map(&mut self, gpa: u64, perm: u8) {
        let uaddr = self.guest.host_base + gpa;
        assert!(
            self.iotlb(iova(gpa), PAGE, uaddr, perm, UPDATE),
            "UPDATE {gpa:#x}"
        );
    }

    fn unmap(&mut self, gpa: u64) {
        assert!(
            self.iotlb(iova(gpa), PAGE, 0, 0, INVALIDATE),
            "INVALIDATE {gpa:#x}"
        );
    }

    /// The next MISS on the backend channel: (iova, perm).
    fn next_miss(&mut self) -> Option<(u64, u8)> {
        let mut message = [0u8; 12 + 32];
        self.channel.read_exact(&mut message).ok()?;
        let request = u32::from_ne_bytes(message[0..4].try_into().unwrap());
        let size = u32::from_ne_bytes(message[8..12].try_into().unwrap());
        assert_eq!((request, size), (1, 32), "a backend IOTLB_MSG");
        let body = &message[12..];
        assert_eq!(body[25], MISS, "a MISS");
        Some((u64::from_ne_bytes(body[0..8].try_into().unwrap()), body[24]))
    }

    /// Reads MISS messages until one for `iova`'s page arrives.
    fn miss_for(&mut self, iova: u64) -> Option<u8> {
        loop {
            let (missed, perm) = self.next_miss()?;
            if missed & !(PAGE - 1) == iova & !(PAGE - 1) {
                return Some(perm);
            }
        }
    }

    /// The ring pages, mapped as a driver maps its rings (coherent memory: RW).
    fn map_rings(&mut self) {
        for gpa in [DESC_GPA, AVAIL_GPA, USED_GPA] {
            self.map(gpa, RW);
        }
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC_GPA + 16 * u64::from(index);
        let mem = &self.guest.mem;
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    /// A 3-descriptor request at `head` whose buffers are at IOVAs: header, `data_iova` for
    /// one sector, status.
    fn post(&mut self, head: u16, kind: u32, sector: u64, data_iova: u64) {
        let header = header_gpa(head);
        let mem = &self.guest.mem;
        mem.write_obj(kind.to_le(), GuestAddress(header)).unwrap();
        mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(header + 8))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(header + 0x80)).unwrap();
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            VRING_DESC_F_WRITE
        } else {
            0
        };
        self.write_desc(head, iova(header), 16, VRING_DESC_F_NEXT, head + 1);
        self.write_desc(
            head + 1,
            data_iova,
            SECTOR as u32,
            data_flags | VRING_DESC_F_NEXT,
            head + 2,
        );
        self.write_desc(head + 2, iova(header + 0x80), 1, VRING_DESC_F_WRITE, 0);
        self.guest.stage(head);
        self.guest.publish();
        self.session.kick();
    }

    fn completes(&self, used: u16) -> bool {
        wait_until_within(REFUSAL_WAIT, || self.guest.used_idx() == used)
    }
}

fn wait_until_within(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    condition()
}

/// A duplicate of the frontend's socket.
///
/// # Safety
/// `fd` must be an open unix stream socket.
unsafe fn dup_stream(fd: i32) -> UnixStream {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller guarantees `fd` is open; dup's result is checked.
    let copy = unsafe { libc::dup(fd) };
    assert!(copy >= 0, "dup");
    // SAFETY: a fresh descriptor owned by nobody else.
    unsafe { UnixStream::from_raw_fd(copy) }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..SECTOR).map(|i| (i as u8) ^ seed).collect()
}

/// The ring starts only once its IOVAs are mapped (the backend asks with MISS messages), and
/// a request whose buffers are all mapped lands in the image and reads back.
#[test]
fn rings_and_buffers_are_reached_through_iotlb_updates() {
    within(Duration::from_secs(60), || {
        let server = start_server("iotlb-ok");
        let mut s = IommuSession::start(&server);

        let ring_miss = s.miss_for(iova(DESC_GPA));
        s.map_rings();
        s.map(HEADER_GPA, RW);
        s.map(data_gpa(0), RO);
        s.map(data_gpa(3), WO);
        s.guest
            .mem
            .write_slice(&pattern(7), GuestAddress(data_gpa(0)))
            .unwrap();
        s.post(0, VIRTIO_BLK_T_OUT, 5, iova(data_gpa(0)));
        let wrote = s.completes(1);
        s.post(3, VIRTIO_BLK_T_IN, 5, iova(data_gpa(3)));
        let read = s.completes(2);

        assert!(ring_miss.is_some(), "a MISS for the descriptor ring");
        assert!(wrote && read, "both requests completed");
        assert_eq!((s.guest.status(0), s.guest.status(3)), (0, 0));
        assert_eq!(read_image(&server.image, 5 * 512, SECTOR), pattern(7));
        assert_eq!(s.guest.data(3), pattern(7));
    });
}

/// A cold IOTLB, as QEMU keeps one: the backend asks for a buffer's translation, waits, and
/// the request succeeds once the frontend answers the MISS with an UPDATE.
#[test]
fn a_miss_answered_in_time_lets_the_request_through() {
    within(Duration::from_secs(60), || {
        let server = start_server("iotlb-answered");
        let mut s = IommuSession::start(&server);
        s.map_rings();
        s.map(HEADER_GPA, RW);
        s.guest
            .mem
            .write_slice(&pattern(0x3c), GuestAddress(data_gpa(0)))
            .unwrap();

        s.post(0, VIRTIO_BLK_T_OUT, 12, iova(data_gpa(0)));
        let miss = s.miss_for(iova(data_gpa(0)));
        s.map(data_gpa(0), RO);
        let done = s.completes(1);

        assert_eq!(miss, Some(RO));
        assert!(done, "the request completed");
        assert_eq!(s.guest.status(0), 0, "and succeeded");
        assert_eq!(read_image(&server.image, 12 * 512, SECTOR), pattern(0x3c));
    });
}

/// A descriptor pointing at an IOVA with no mapping is refused: the backend asks for it
/// (MISS), gets no answer, fails the request with IOERR and touches neither the image nor
/// the guest memory the IOVA would have named. The queue keeps running.
#[test]
fn a_buffer_outside_the_mappings_is_refused_and_not_touched() {
    within(Duration::from_secs(60), || {
        let server = start_server("iotlb-unmapped");
        let mut s = IommuSession::start(&server);
        s.map_rings();
        s.map(HEADER_GPA, RW);
        s.map(data_gpa(6), RW);
        let sentinel = vec![0xa5u8; SECTOR];
        s.guest
            .mem
            .write_slice(&sentinel, GuestAddress(data_gpa(0)))
            .unwrap();
        s.guest
            .mem
            .write_slice(&sentinel, GuestAddress(data_gpa(3)))
            .unwrap();

        // A write whose data is unmapped (the device would read it), then a read into an
        // unmapped buffer (the device would write it).
        s.post(0, VIRTIO_BLK_T_OUT, 9, iova(data_gpa(0)));
        let write_miss = s.miss_for(iova(data_gpa(0)));
        let write_done = s.completes(1);
        s.post(3, VIRTIO_BLK_T_IN, 0, iova(data_gpa(3)));
        let read_miss = s.miss_for(iova(data_gpa(3)));
        let read_done = s.completes(2);
        // The queue still serves mapped requests.
        s.guest
            .mem
            .write_slice(&pattern(3), GuestAddress(data_gpa(6)))
            .unwrap();
        s.post(6, VIRTIO_BLK_T_OUT, 10, iova(data_gpa(6)));
        let mapped_done = s.completes(3);

        assert_eq!(
            write_miss,
            Some(RO),
            "a MISS asking to read the write's data"
        );
        assert_eq!(
            read_miss,
            Some(WO),
            "a MISS asking to write the read's buffer"
        );
        assert!(write_done && read_done, "the refused requests completed");
        assert_eq!(s.guest.status(0), VIRTIO_BLK_S_IOERR);
        assert_eq!(s.guest.status(3), VIRTIO_BLK_S_IOERR);
        assert_eq!(
            read_image(&server.image, 9 * 512, SECTOR),
            vec![0; SECTOR],
            "nothing was written from unmapped memory"
        );
        assert_eq!(s.guest.data(3), sentinel, "unmapped memory was not written");
        assert_eq!(s.guest.data(0), sentinel);
        assert!(mapped_done, "the queue kept running");
        assert_eq!(s.guest.status(6), 0);
        assert_eq!(read_image(&server.image, 10 * 512, SECTOR), pattern(3));
    });
}

/// A mapping without the access the device needs (a read request's buffer mapped read-only)
/// is refused like a missing one, and an INVALIDATE takes a mapping the device already used
/// away.
#[test]
fn wrong_permissions_and_invalidated_mappings_are_refused() {
    within(Duration::from_secs(60), || {
        let server = start_server("iotlb-perm");
        let mut s = IommuSession::start(&server);
        s.map_rings();
        s.map(HEADER_GPA, RW);
        s.map(data_gpa(0), RO);
        s.map(data_gpa(3), RW);
        let sentinel = vec![0x5au8; SECTOR];
        s.guest
            .mem
            .write_slice(&sentinel, GuestAddress(data_gpa(0)))
            .unwrap();

        s.post(0, VIRTIO_BLK_T_IN, 0, iova(data_gpa(0)));
        let read_only_done = s.completes(1);
        s.guest
            .mem
            .write_slice(&pattern(1), GuestAddress(data_gpa(3)))
            .unwrap();
        s.post(3, VIRTIO_BLK_T_OUT, 2, iova(data_gpa(3)));
        let used_once = s.completes(2);
        s.unmap(data_gpa(3));
        s.guest
            .mem
            .write_slice(&pattern(2), GuestAddress(data_gpa(3)))
            .unwrap();
        s.post(3, VIRTIO_BLK_T_OUT, 2, iova(data_gpa(3)));
        let after_invalidate = s.completes(3);

        assert!(read_only_done && used_once && after_invalidate);
        assert_eq!(
            s.guest.status(0),
            VIRTIO_BLK_S_IOERR,
            "write into a RO mapping"
        );
        assert_eq!(s.guest.data(0), sentinel);
        assert_eq!(s.guest.status(3), VIRTIO_BLK_S_IOERR, "invalidated mapping");
        assert_eq!(
            read_image(&server.image, 2 * 512, SECTOR),
            pattern(1),
            "only the write made while mapped landed"
        );
    });
}

/// An UPDATE that remaps an IOVA the device already used (no INVALIDATE in between) takes
/// effect: the translation the queue's DMA space cached from the old entry is dropped.
#[test]
fn a_remapped_iova_reaches_the_new_page() {
    within(Duration::from_secs(60), || {
        let server = start_server("iotlb-remap");
        let mut s = IommuSession::start(&server);
        s.map_rings();
        s.map(HEADER_GPA, RW);
        let buffer = iova(data_gpa(0));
        s.guest
            .mem
            .write_slice(&pattern(0x11), GuestAddress(data_gpa(0)))
            .unwrap();
        s.guest
            .mem
            .write_slice(&pattern(0x22), GuestAddress(data_gpa(5)))
            .unwrap();
        let base = s.guest.host_base;

        assert!(s.iotlb(buffer, PAGE, base + data_gpa(0), RO, UPDATE));
        s.post(0, VIRTIO_BLK_T_OUT, 30, buffer);
        let first = s.completes(1);
        assert!(s.iotlb(buffer, PAGE, base + data_gpa(5), RO, UPDATE));
        s.post(3, VIRTIO_BLK_T_OUT, 31, buffer);
        let second = s.completes(2);

        assert!(first && second);
        assert_eq!((s.guest.status(0), s.guest.status(3)), (0, 0));
        assert_eq!(read_image(&server.image, 30 * 512, SECTOR), pattern(0x11));
        assert_eq!(
            read_image(&server.image, 31 * 512, SECTOR),
            pattern(0x22),
            "the second write read the page the IOVA maps now"
        );
    });
}

/// Malformed IOTLB messages are answered with a failure and change nothing; the connection
/// stays.
#[test]
fn malformed_iotlb_updates_are_refused() {
    within(Duration::from_secs(60), || {
        let server = start_server("iotlb-bad");
        let mut s = IommuSession::start(&server);
        let base = s.guest.host_base;
        let end_of_memory = base + GUEST_SIZE as u64;

        let refused = [
            s.iotlb(iova(0), 0, base, RW, UPDATE),
            s.iotlb(u64::MAX - 0xfff, 0x2000, base, RW, UPDATE),
            s.iotlb(iova(0), PAGE, end_of_memory - 0x800, RW, UPDATE),
            s.iotlb(iova(0), PAGE, 0x1000, RW, UPDATE),
            s.iotlb(iova(0), PAGE, base, 0, UPDATE),
            s.iotlb(iova(0), PAGE, base, 4, UPDATE),
            s.iotlb(iova(0), PAGE, base, RW, MISS),
            s.iotlb(iova(0), 0, 0, 0, INVALIDATE),
        ];

        assert_eq!(refused, [false; 8]);
        assert!(!s.session.is_dropped(), "the connection stays");
        assert!(
            s.iotlb(iova(0), PAGE, base, RW, UPDATE),
            "a good one passes"
        );
    });
}

/// A status byte the device cannot write (mapped read-only) leaves no place to report the
/// failure: as for any chain without a writable status byte, the virtio-blk model completes
/// it with a zero-length used entry and performs nothing (sluice-devices' policy, the same
/// without a vIOMMU); the queue keeps running.
#[test]
fn an_unwritable_status_byte_gets_an_empty_completion_and_no_io() {
    within(Duration::from_secs(60), || {
        let server = start_server("iotlb-status");
        let mut s = IommuSession::start(&server);
        s.map_rings();
        s.map(HEADER_GPA, RO);
        s.map(data_gpa(0), RW);
        s.guest
            .mem
            .write_slice(&pattern(9), GuestAddress(data_gpa(0)))
            .unwrap();

        s.post(0, VIRTIO_BLK_T_OUT, 1, iova(data_gpa(0)));
        let completed = s.completes(1);

        assert!(completed, "the chain was given back");
        let used_len: u32 = s
            .guest
            .mem
            .read_obj(GuestAddress(USED_GPA + 4 + 4))
            .unwrap();
        assert_eq!(used_len, 0, "an empty completion");
        assert_eq!(s.guest.status(0), 0xff, "the status byte was not written");
        assert_eq!(read_image(&server.image, 512, SECTOR), vec![0; SECTOR]);
        assert!(s.error.read().is_err(), "the queue did not fail");
    });
}

/// A backend that crashed with a request in flight is replaced; the new connection starts with
/// an empty IOTLB. The recovered request is resubmitted on the queue worker, which asks for the
/// translations it needs and waits for them: the write lands once, the guest sees it complete.
#[test]
fn an_in_flight_request_is_resubmitted_behind_the_viommu() {
    within(Duration::from_secs(60), || {
        let server = start_server("iotlb-resubmit");
        server.stall.store(true, Ordering::SeqCst);
        // An area from the backend (a connection of its own: the frontend keeps the fd).
        let inflight = connect(&server.socket)
            .frontend
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QUEUE_SIZE))
            .expect("GET_INFLIGHT_FD");
        let mut first = IommuSession::start_on(&server, Guest::new(), Some(&inflight));
        first.map_rings();
        first.map(HEADER_GPA, RW);
        first.map(data_gpa(0), RO);
        first
            .guest
            .mem
            .write_slice(&pattern(0x77), GuestAddress(data_gpa(0)))
            .unwrap();
        first.post(0, VIRTIO_BLK_T_OUT, 20, iova(data_gpa(0)));
        let marked = wait_until_within(REFUSAL_WAIT, || inflight_flag(&inflight.1, 0) == 1);
        // The first frontend goes away (its guest memory stays).
        let IommuSession {
            session,
            raw,
            channel,
            guest,
            error,
        } = first;
        drop((session, raw, channel, error));
        server.stall.store(false, Ordering::SeqCst);

        let mut second = IommuSession::start_on(&server, guest, Some(&inflight));
        // Answer every miss, as QEMU does, until the request completed.
        let mut misses = 0;
        while second.guest.used_idx() != 1 && misses < 16 {
            let Some((missed, _)) = second.next_miss() else {
                break;
            };
            misses += 1;
            let gpa = (missed - IOVA_BASE) & !(PAGE - 1);
            second.map(gpa, RW);
        }
        let completed = second.completes(1);

        assert!(marked, "the first backend had the request in flight");
        assert!(completed, "the resubmitted request completed");
        assert!(
            misses >= 2,
            "the rings and buffers were asked for ({misses} misses)"
        );
        assert_eq!(second.guest.status(0), 0);
        assert_eq!(read_image(&server.image, 20 * 512, SECTOR), pattern(0x77));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(second.guest.used_idx(), 1, "it ran once");
    });
}

/// The in-flight flag of `head` in a split inflight area.
fn inflight_flag(area: &File, head: u16) -> u8 {
    use std::os::unix::fs::FileExt;
    let mut flag = [0u8; 1];
    area.read_exact_at(&mut flag, 16 + 16 * u64::from(head))
        .unwrap();
    flag[0]
}

/// Dirty logging behind a vIOMMU: the device's addresses are IOVAs, the log is by guest
/// physical address, so what the backend writes is logged where the IOVAs land.
#[test]
fn the_dirty_log_holds_guest_physical_pages_behind_the_viommu() {
    within(Duration::from_secs(60), || {
        let server = start_server("iotlb-log");
        let mut s = IommuSession::start(&server);
        s.map_rings();
        s.map(HEADER_GPA, RW);
        s.map(data_gpa(3), WO);
        let (log, file) = sluice_dma::shared_log::SharedLog::create(
            sluice_dma::shared_log::log_bytes_for(GUEST_SIZE as u64),
        )
        .unwrap();
        let region = vhost::VhostUserDirtyLogRegion {
            mmap_size: log.len() as u64,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        s.session
            .frontend
            .set_log_base(0, Some(region))
            .expect("SET_LOG_BASE");
        assert_ne!(s.session.features & LOG_ALL, 0, "LOG_ALL negotiated");

        s.post(3, VIRTIO_BLK_T_IN, 5, iova(data_gpa(3)));
        let read = s.completes(1);
        let logged = log.take();

        assert!(read, "the read completed");
        assert_eq!(s.guest.status(3), 0);
        let page = |gpa: u64| gpa / PAGE;
        let mut expected = vec![page(USED_GPA), page(HEADER_GPA), page(data_gpa(3))];
        expected.sort_unstable();
        assert_eq!(logged, expected);
    });
}
