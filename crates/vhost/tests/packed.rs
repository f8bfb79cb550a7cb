//! Packed virtqueues over vhost-user: a frontend that negotiates VIRTIO_F_RING_PACKED drives
//! the blk model through a packed ring (sluice-virtio's test driver publishing into the
//! shared guest memory), the ring's positions survive GET_VRING_BASE / SET_VRING_BASE, and a
//! base outside the ring is refused without taking the server down.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;

use common::*;
use sluice_dma::DmaSpace;
use sluice_virtio::ring::mock::PackedDriver;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{Bytes, GuestAddress};

const EVENT_IDX: u64 = 1 << 29;
/// Where the packed ring starts; its event areas follow it.
const RING_GPA: u64 = 0x1000;
const PACKED_SIZE: u16 = 8;
const WRAP: u32 = 1 << 15;

fn packed_ring_config(guest: &Guest) -> VringConfigData {
    let driver_event = RING_GPA + 16 * u64::from(PACKED_SIZE);
    VringConfigData {
        queue_max_size: PACKED_SIZE,
        queue_size: PACKED_SIZE,
        flags: 0,
        desc_table_addr: guest.host_base + RING_GPA,
        avail_ring_addr: guest.host_base + driver_event,
        used_ring_addr: guest.host_base + driver_event + 4,
        log_addr: None,
    }
}

const SET_VRING_BASE: u32 = 10;
const NEED_REPLY: u32 = 1 << 3;

/// A session plus a second handle on its socket: the `vhost` crate's frontend sends
/// SET_VRING_BASE as a u16 (split rings only), so packed bases go out raw.
struct PackedSession {
    session: Session,
    raw: UnixStream,
}

impl PackedSession {
    fn connect(socket: &std::path::Path) -> Self {
        let stream = UnixStream::connect(socket).expect("connect");
        stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
        let raw = stream.try_clone().unwrap();
        let mut frontend = Frontend::from_stream(stream, 1);
        let features = frontend.get_features().expect("GET_FEATURES") & !ACCESS_PLATFORM;
        let protocol = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(protocol).unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        frontend.set_owner().expect("SET_OWNER");
        let session = Session {
            frontend,
            features,
            kick: vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
            call: vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
        };
        PackedSession { session, raw }
    }

    /// SET_VRING_BASE with the whole 32-bit word; Err if the backend refused it (a NACK or a
    /// dropped connection).
    fn set_vring_base(&mut self, queue: u32, base: u32) -> Result<(), String> {
        let mut message = Vec::new();
        for word in [SET_VRING_BASE, 1 | NEED_REPLY, 8, queue, base] {
            message.extend_from_slice(&word.to_le_bytes());
        }
        self.raw.write_all(&message).map_err(|e| e.to_string())?;
        let mut reply = [0u8; 20];
        self.raw.read_exact(&mut reply).map_err(|e| e.to_string())?;
        let status = u64::from_le_bytes(reply[12..20].try_into().unwrap());
        if status == 0 {
            Ok(())
        } else {
            Err(format!("NACK {status}"))
        }
    }
}

/// Packed-ring features (no EVENT_IDX: every completion signals), memory, ring 0 at `base`.
fn start_packed_ring(session: &mut PackedSession, guest: &Guest, base: u32) {
    let features = (session.session.features | RING_PACKED) & !EVENT_IDX;
    let fe = &mut session.session.frontend;
    fe.set_features(features).expect("SET_FEATURES");
    fe.set_mem_table(&[guest.region()]).expect("SET_MEM_TABLE");
    resume_packed_ring(session, guest, base);
}

fn resume_packed_ring(packed: &mut PackedSession, guest: &Guest, base: u32) {
    packed
        .session
        .frontend
        .set_vring_num(0, PACKED_SIZE)
        .expect("SET_VRING_NUM");
    packed.set_vring_base(0, base).expect("SET_VRING_BASE");
    let session = &mut packed.session;
    let fe = &mut session.frontend;
    fe.set_vring_addr(0, &packed_ring_config(guest))
        .expect("SET_VRING_ADDR");
    fe.set_vring_call(0, &session.call).expect("SET_VRING_CALL");
    fe.set_vring_kick(0, &session.kick).expect("SET_VRING_KICK");
    fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
}

/// One blk request as a 3-descriptor chain with buffer id `id`: header, one sector, status.
fn request(
    driver: &mut PackedDriver<'_>,
    mem: &DmaSpace,
    id: u16,
    kind: u32,
    sector: u64,
    data: Option<&[u8]>,
) {
    let header = HEADER_GPA + 0x100 * u64::from(id);
    let status = header + 0x80;
    let buffer = DATA_GPA + 0x1000 * u64::from(id);
    mem.write_obj(kind.to_le(), GuestAddress(header)).unwrap();
    mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(header + 8))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    if let Some(data) = data {
        mem.write_slice(data, GuestAddress(buffer)).unwrap();
    }
    driver.add_chain(
        id,
        &[
            (header, 16, false),
            (buffer, SECTOR as u32, kind == VIRTIO_BLK_T_IN),
            (status, 1, true),
        ],
    );
}

fn wait_used(driver: &mut PackedDriver<'_>) -> Option<(u16, u32)> {
    let mut used = None;
    wait_until(|| {
        used = driver.used();
        used.is_some()
    });
    used
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..SECTOR)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

fn status(mem: &DmaSpace, id: u16) -> u8 {
    mem.read_obj(GuestAddress(HEADER_GPA + 0x100 * u64::from(id) + 0x80))
        .unwrap()
}

fn data(mem: &DmaSpace, id: u16) -> Vec<u8> {
    let mut data = vec![0u8; SECTOR];
    mem.read_slice(&mut data, GuestAddress(DATA_GPA + 0x1000 * u64::from(id)))
        .unwrap();
    data
}

#[test]
fn packed_ring_writes_reads_back_and_resumes_after_get_vring_base() {
    within(std::time::Duration::from_secs(60), || {
        let server = start_server("packed-rw");
        let guest = Guest::new();
        let mem = sluice_dma::identity(guest.mem.clone());
        let mut driver = PackedDriver::new(&mem, RING_GPA, PACKED_SIZE);
        let mut packed = PackedSession::connect(&server.socket);
        assert_ne!(
            packed.session.features & RING_PACKED,
            0,
            "packed rings offered"
        );
        start_packed_ring(&mut packed, &guest, WRAP | WRAP << 16);

        request(
            &mut driver,
            &mem,
            3,
            VIRTIO_BLK_T_OUT,
            5,
            Some(&pattern(0x5a)),
        );
        packed.session.kick();
        let written = wait_used(&mut driver);
        request(&mut driver, &mem, 4, VIRTIO_BLK_T_IN, 5, None);
        packed.session.kick();
        let read = wait_used(&mut driver);
        // Two 3-descriptor chains: both positions at 6 on the first lap.
        let base = packed
            .session
            .frontend
            .get_vring_base(0)
            .expect("GET_VRING_BASE");
        // The frontend restarts the ring where it stopped; the third chain wraps the ring.
        resume_packed_ring(&mut packed, &guest, base);
        request(&mut driver, &mem, 5, VIRTIO_BLK_T_IN, 5, None);
        packed.session.kick();
        let resumed = wait_used(&mut driver);

        assert_eq!(written, Some((3, 1)));
        assert_eq!(status(&mem, 3), 0);
        assert_eq!(read, Some((4, SECTOR as u32 + 1)));
        assert_eq!(data(&mem, 4), pattern(0x5a));
        assert_eq!(base, 6 | WRAP | (6 | WRAP) << 16);
        assert_eq!(resumed, Some((5, SECTOR as u32 + 1)));
        assert_eq!(data(&mem, 5), pattern(0x5a));
        assert_eq!(driver.used_off_wrap(), 1, "slot 1 of the second lap");
        assert_eq!(
            read_image(&server.image, 5 * SECTOR as u64, SECTOR),
            pattern(0x5a)
        );
    });
}

#[test]
fn packed_ring_base_outside_the_ring_is_refused() {
    within(std::time::Duration::from_secs(60), || {
        let server = start_server("packed-bad-base");
        let guest = Guest::new();
        let bad_bases = [
            u32::from(PACKED_SIZE) | WRAP, // avail index = size
            WRAP | (0x7fff | WRAP) << 16,  // used index far outside
            (u32::from(PACKED_SIZE) + 1) << 16 | WRAP | 0x7000, // both
        ];
        for base in bad_bases {
            let mut packed = PackedSession::connect(&server.socket);
            let features = (packed.session.features | RING_PACKED) & !EVENT_IDX;
            let fe = &mut packed.session.frontend;
            fe.set_features(features).unwrap();
            fe.set_mem_table(&[guest.region()]).unwrap();
            fe.set_vring_num(0, PACKED_SIZE).unwrap();

            let refused = packed.set_vring_base(0, base).is_err();

            assert!(refused, "base {base:#x}");
            assert!(
                packed.session.is_dropped(),
                "base {base:#x}: connection dropped"
            );
        }
        // A base given before the size is checked when the ring starts.
        let mut packed = PackedSession::connect(&server.socket);
        let features = (packed.session.features | RING_PACKED) & !EVENT_IDX;
        packed.session.frontend.set_features(features).unwrap();
        packed
            .session
            .frontend
            .set_mem_table(&[guest.region()])
            .unwrap();
        packed.set_vring_base(0, 0x4000 | WRAP).unwrap();
        let session = &mut packed.session;
        let fe = &mut session.frontend;
        fe.set_vring_num(0, PACKED_SIZE).unwrap();
        fe.set_vring_addr(0, &packed_ring_config(&guest)).unwrap();
        fe.set_vring_call(0, &session.call).unwrap();
        fe.set_vring_kick(0, &session.kick).unwrap();
        let started = fe.set_vring_enable(0, true);
        assert!(started.is_err(), "the ring cannot start at index 0x4000");
        assert!(session.is_dropped());

        // The server still serves a well-behaved frontend.
        let mut packed = PackedSession::connect(&server.socket);
        let mem = sluice_dma::identity(guest.mem.clone());
        let mut driver = PackedDriver::new(&mem, RING_GPA, PACKED_SIZE);
        start_packed_ring(&mut packed, &guest, WRAP | WRAP << 16);
        request(&mut driver, &mem, 0, VIRTIO_BLK_T_IN, 0, None);
        packed.session.kick();
        assert_eq!(wait_used(&mut driver), Some((0, SECTOR as u32 + 1)));
    });
}

#[test]
fn packed_rings_are_not_offered_when_turned_off() {
    let socket = temp_path("split-only.sock");
    let limits = sluice_vhost::Limits {
        offer_packed: false,
        ..Default::default()
    };
    let device = sluice_devices::rng::Rng::new();
    let server = sluice_vhost::Server::bind_with(&socket, device, limits).expect("bind");
    std::thread::spawn(move || server.run());

    let session = connect(&socket);
    let features = session.features;

    assert_eq!(features & RING_PACKED, 0);
}

fn get_packed_inflight(session: &mut Session) -> (VhostUserInflight, std::fs::File) {
    let request = VhostUserInflight::new(0, 0, 1, PACKED_SIZE);
    session
        .frontend
        .get_inflight_fd(&request)
        .expect("GET_INFLIGHT_FD")
}

/// The spec's packed region: `inflight` of desc[] entry `entry` (32-byte entries after a
/// 32-byte header).
fn packed_entry_inflight(area: &std::fs::File, entry: u64) -> u8 {
    use std::os::unix::fs::FileExt;
    let mut byte = [0u8];
    area.read_exact_at(&mut byte, 32 + 32 * entry).unwrap();
    byte[0]
}

/// The backend goes away with two requests popped and unanswered (a write, then a read of the
/// same sector); the next backend gets the packed inflight area back and the frontend's stale
/// base (what QEMU resends after a crash): it resubmits both in pop order from the area's copies
/// of their descriptors, and the guest sees each answered once, at the used positions it
/// expects, and the ring goes on after them.
#[test]
fn packed_requests_in_flight_are_resubmitted_by_the_next_backend() {
    within(std::time::Duration::from_secs(60), || {
        let server = start_server("packed-reconnect");
        server.stall.store(true, Ordering::SeqCst);
        let guest = Guest::new();
        let mem = sluice_dma::identity(guest.mem.clone());
        let mut driver = PackedDriver::new(&mem, RING_GPA, PACKED_SIZE);
        let (info, area) = {
            let mut first = PackedSession::connect(&server.socket);
            let features = (first.session.features | RING_PACKED) & !EVENT_IDX;
            first.session.frontend.set_features(features).unwrap();
            let (info, area) = get_packed_inflight(&mut first.session);
            first
                .session
                .frontend
                .set_inflight_fd(&info, area.as_raw_fd())
                .unwrap();
            start_packed_ring(&mut first, &guest, WRAP | WRAP << 16);
            request(
                &mut driver,
                &mem,
                5,
                VIRTIO_BLK_T_OUT,
                9,
                Some(&pattern(0x33)),
            );
            request(&mut driver, &mem, 2, VIRTIO_BLK_T_IN, 9, None);
            first.session.kick();
            assert!(
                wait_until(
                    || packed_entry_inflight(&area, 0) == 1 && packed_entry_inflight(&area, 3) == 1
                ),
                "both chains journaled (entries 0 and 3 head them)"
            );
            (info, area)
            // The connection goes with both requests popped and never answered.
        };
        server.stall.store(false, Ordering::SeqCst);
        // The ring slots no longer describe the requests (as when other buffers' used entries
        // overwrote them): only the area's copies can bring them back.
        mem.write_slice(&[0u8; 6 * 16], GuestAddress(RING_GPA))
            .unwrap();

        let mut second = PackedSession::connect(&server.socket);
        let features = (second.session.features | RING_PACKED) & !EVENT_IDX;
        second.session.frontend.set_features(features).unwrap();
        second
            .session
            .frontend
            .set_inflight_fd(&info, area.as_raw_fd())
            .unwrap();
        start_packed_ring(&mut second, &guest, WRAP | WRAP << 16);
        let first_answer = wait_used(&mut driver);
        let second_answer = wait_used(&mut driver);
        std::thread::sleep(std::time::Duration::from_millis(50));

        assert_eq!(first_answer, Some((5, 1)));
        assert_eq!(second_answer, Some((2, SECTOR as u32 + 1)));
        assert_eq!(data(&mem, 2), pattern(0x33), "the read ran after the write");
        assert_eq!(
            read_image(&server.image, 9 * SECTOR as u64, SECTOR),
            pattern(0x33)
        );
        assert_eq!(driver.used(), None, "each request answered once");
        assert_eq!(packed_entry_inflight(&area, 0), 0, "journal cleared");
        assert_eq!(packed_entry_inflight(&area, 3), 0, "journal cleared");
        // The ring goes on where the recovered requests left it.
        request(&mut driver, &mem, 7, VIRTIO_BLK_T_IN, 9, None);
        second.session.kick();
        assert_eq!(wait_used(&mut driver), Some((7, SECTOR as u32 + 1)));
    });
}

/// An inflight area set up before VIRTIO_F_RING_PACKED was negotiated has the split layout:
/// a packed ring over it could not be recovered, so it does not start (error, connection
/// dropped) instead of running untracked.
#[test]
fn a_split_inflight_area_under_packed_rings_is_refused() {
    within(std::time::Duration::from_secs(60), || {
        let server = start_server("packed-split-area");
        let guest = Guest::new();
        let mut packed = PackedSession::connect(&server.socket);
        let (info, area) = get_packed_inflight(&mut packed.session);
        packed
            .session
            .frontend
            .set_inflight_fd(&info, area.as_raw_fd())
            .unwrap();
        let features = (packed.session.features | RING_PACKED) & !EVENT_IDX;
        packed.session.frontend.set_features(features).unwrap();
        packed
            .session
            .frontend
            .set_mem_table(&[guest.region()])
            .unwrap();
        packed
            .session
            .frontend
            .set_vring_num(0, PACKED_SIZE)
            .unwrap();
        packed.set_vring_base(0, WRAP | WRAP << 16).unwrap();
        let session = &mut packed.session;
        let fe = &mut session.frontend;
        fe.set_vring_addr(0, &packed_ring_config(&guest)).unwrap();
        fe.set_vring_call(0, &session.call).unwrap();
        fe.set_vring_kick(0, &session.kick).unwrap();

        let started = fe.set_vring_enable(0, true);

        assert!(started.is_err());
        assert!(session.is_dropped());
    });
}

/// VHOST_F_LOG_ALL on a packed ring: the log holds exactly the pages the backend wrote — the
/// descriptor ring (used descriptors are written in place), the status byte's page and the
/// read's buffer (the device event area shares the ring's page here).
#[test]
fn a_packed_ring_logs_the_pages_it_writes() {
    within(std::time::Duration::from_secs(60), || {
        let server = start_server("packed-log");
        let guest = Guest::new();
        let mem = sluice_dma::identity(guest.mem.clone());
        let mut driver = PackedDriver::new(&mem, RING_GPA, PACKED_SIZE);
        let mut packed = PackedSession::connect(&server.socket);
        let (log, file) = sluice_dma::shared_log::SharedLog::create(
            sluice_dma::shared_log::log_bytes_for(GUEST_SIZE as u64),
        )
        .unwrap();
        let features = (packed.session.features | RING_PACKED | LOG_ALL) & !EVENT_IDX;
        let fe = &mut packed.session.frontend;
        fe.set_features(features).expect("SET_FEATURES");
        fe.set_mem_table(&[guest.region()]).expect("SET_MEM_TABLE");
        let region = vhost::VhostUserDirtyLogRegion {
            mmap_size: log.len() as u64,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        fe.set_log_base(0, Some(region)).expect("SET_LOG_BASE");
        resume_packed_ring(&mut packed, &guest, WRAP | WRAP << 16);
        let _start = log.take();

        request(&mut driver, &mem, 4, VIRTIO_BLK_T_IN, 5, None);
        packed.session.kick();
        let read = wait_used(&mut driver);
        let logged = log.take();

        assert!(read.is_some(), "the read completed");
        assert_eq!(status(&mem, 4), 0);
        let page = |gpa: u64| gpa >> 12;
        let mut expected = vec![
            page(RING_GPA),
            page(HEADER_GPA + 0x400 + 0x80),
            page(DATA_GPA + 0x4000),
        ];
        expected.sort_unstable();
        assert_eq!(logged, expected);
    });
}
