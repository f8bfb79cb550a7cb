//! The backend driven by the `vhost` crate's frontend over a Unix socket: I/O, the inflight
//! area, reconnect recovery, and hostile frontends.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

fn pattern(seed: u8) -> Vec<u8> {
    (0..SECTOR)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Reads `desc[head]` of queue 0 from an inflight area: (inflight flag, counter).
fn inflight_entry(area: &std::fs::File, head: u16) -> (u8, u64) {
    let at = 16 + 16 * u64::from(head);
    let mut flag = [0u8; 1];
    let mut counter = [0u8; 8];
    area.read_exact_at(&mut flag, at).unwrap();
    area.read_exact_at(&mut counter, at + 8).unwrap();
    (flag[0], u64::from_le_bytes(counter))
}

fn write_inflight_entry(area: &std::fs::File, head: u16, flag: u8, counter: u64) {
    let at = 16 + 16 * u64::from(head);
    area.write_all_at(&[flag], at).unwrap();
    area.write_all_at(&counter.to_le_bytes(), at + 8).unwrap();
}

fn inflight_u16(area: &std::fs::File, offset: u64) -> u16 {
    let mut value = [0u8; 2];
    area.read_exact_at(&mut value, offset).unwrap();
    u16::from_le_bytes(value)
}

fn get_inflight(session: &mut Session) -> (VhostUserInflight, std::fs::File) {
    let request = VhostUserInflight::new(0, 0, 1, QUEUE_SIZE);
    session
        .frontend
        .get_inflight_fd(&request)
        .expect("GET_INFLIGHT_FD")
}

#[test]
fn write_lands_in_the_image_and_reads_back() {
    let server = start_server("roundtrip");
    let mut session = connect(&server.socket);
    let mut guest = Guest::new();
    session.start_ring(&guest, 0);
    let data = pattern(3);

    guest.build_request(0, VIRTIO_BLK_T_OUT, 5, Some(&data));
    guest.stage(0);
    guest.publish();
    session.kick();
    assert!(guest.wait_used(1), "write completed");
    guest.build_request(3, VIRTIO_BLK_T_IN, 5, None);
    guest.stage(3);
    guest.publish();
    session.kick();
    assert!(guest.wait_used(2), "read completed");

    assert_eq!(guest.status(0), 0, "write status OK");
    assert_eq!(read_image(&server.image, 5 * 512, SECTOR), data);
    assert_eq!(guest.status(3), 0, "read status OK");
    assert_eq!(guest.data(3), data);
    assert_eq!(guest.used_id(1), 3);
    assert!(session.call.read().unwrap_or(0) > 0, "call fd signalled");
}

#[test]
fn io_uring_requests_complete_and_get_vring_base_waits_for_them() {
    let server = start_server_with("uring", sluice_devices::block::IoEngine::Auto);
    let mut session = connect(&server.socket);
    let mut guest = Guest::new();
    session.start_ring(&guest, 0);
    for (slot, head) in [0u16, 3, 6, 9, 12].into_iter().enumerate() {
        guest.build_request(
            head,
            VIRTIO_BLK_T_OUT,
            slot as u64,
            Some(&pattern(slot as u8)),
        );
        guest.stage(head);
    }
    guest.publish();
    session.kick();

    // All five were published before the kick, so the first pass popped all of them.
    assert!(wait_until(|| guest.used_idx() >= 1));

    let base = session.frontend.get_vring_base(0).unwrap();

    assert_eq!(base, 5);
    assert_eq!(
        guest.used_idx(),
        5,
        "popped requests completed before the answer"
    );
    for slot in 0..5u8 {
        let on_disk = read_image(&server.image, u64::from(slot) * 512, SECTOR);
        assert_eq!(on_disk, pattern(slot));
    }
}

#[test]
fn config_space_and_queue_count_come_from_the_model() {
    let server = start_server("config");
    let mut session = connect(&server.socket);

    let queues = session.frontend.get_queue_num().unwrap();
    let (_, config) = session
        .frontend
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();

    assert_eq!(queues, 1);
    let capacity = u64::from_le_bytes(config[..8].try_into().unwrap());
    assert_eq!(capacity, IMAGE_SIZE / 512);
}

#[test]
fn get_vring_base_stops_the_ring_and_reports_next_avail() {
    let server = start_server("vring-base");
    let mut session = connect(&server.socket);
    let mut guest = Guest::new();
    session.start_ring(&guest, 0);
    guest.build_request(0, VIRTIO_BLK_T_OUT, 1, Some(&pattern(1)));
    guest.stage(0);
    guest.publish();
    session.kick();
    assert!(guest.wait_used(1));

    let base = session.frontend.get_vring_base(0).unwrap();
    guest.build_request(3, VIRTIO_BLK_T_OUT, 2, Some(&pattern(2)));
    guest.stage(3);
    guest.publish();
    session.kick();
    std::thread::sleep(Duration::from_millis(50));

    assert_eq!(base, 1);
    assert_eq!(guest.used_idx(), 1, "a stopped ring processes nothing");
}

#[test]
fn inflight_area_marks_a_popped_request() {
    let server = start_server("inflight-mark");
    server.stall.store(true, Ordering::SeqCst);
    let mut session = connect(&server.socket);
    let mut guest = Guest::new();
    let (info, area) = get_inflight(&mut session);
    session
        .frontend
        .set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&area))
        .unwrap();
    session.start_ring(&guest, 0);

    guest.build_request(6, VIRTIO_BLK_T_OUT, 9, Some(&pattern(9)));
    guest.stage(6);
    guest.publish();
    session.kick();

    assert!(
        wait_until(|| inflight_entry(&area, 6).0 == 1),
        "head 6 marked"
    );
    assert_eq!(inflight_u16(&area, 8), 1, "version");
    assert_eq!(inflight_u16(&area, 10), QUEUE_SIZE, "desc_num");
    assert_eq!(inflight_entry(&area, 0).0, 0, "other heads unmarked");
    assert_eq!(guest.used_idx(), 0, "nothing completed");
}

#[test]
fn inflight_request_is_resubmitted_on_a_new_connection() {
    let server = start_server("reconnect");
    server.stall.store(true, Ordering::SeqCst);
    let mut guest = Guest::new();
    let data = pattern(42);
    let (info, area) = {
        let mut first = connect(&server.socket);
        let (info, area) = get_inflight(&mut first);
        first
            .frontend
            .set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&area))
            .unwrap();
        first.start_ring(&guest, 0);
        guest.build_request(0, VIRTIO_BLK_T_OUT, 7, Some(&data));
        guest.stage(0);
        guest.publish();
        first.kick();
        assert!(wait_until(|| inflight_entry(&area, 0).0 == 1));
        (info, area)
        // The frontend goes away with the request popped and never completed.
    };
    server.stall.store(false, Ordering::SeqCst);

    // Like QEMU after a backend crash: same inflight fd, base = used index.
    let mut second = connect(&server.socket);
    second
        .frontend
        .set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&area))
        .unwrap();
    second.start_ring(&guest, 0);

    assert!(guest.wait_used(1), "resubmitted request completed");
    assert_eq!(guest.used_id(0), 0);
    assert_eq!(guest.status(0), 0);
    assert_eq!(read_image(&server.image, 7 * 512, SECTOR), data);
    assert!(wait_until(|| inflight_entry(&area, 0).0 == 0), "cleared");
    assert_eq!(inflight_u16(&area, 14), 1, "area used_idx follows the ring");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        guest.used_idx(),
        1,
        "the request ran once, not again as a new entry"
    );
}

#[test]
fn resubmission_follows_counter_order_not_avail_order() {
    let server = start_server("counter-order");
    let mut guest = Guest::new();
    // Two writes to one sector; the avail ring has head 0 first, but head 4 was popped first.
    guest.build_request(0, VIRTIO_BLK_T_OUT, 3, Some(&pattern(0xa0)));
    guest.build_request(4, VIRTIO_BLK_T_OUT, 3, Some(&pattern(0xb0)));
    guest.stage(0);
    guest.stage(4);
    guest.publish();
    let mut session = connect(&server.socket);
    let (info, area) = get_inflight(&mut session);
    // A previous backend's area: version 1, nothing used, both heads in flight.
    area.write_all_at(&1u16.to_le_bytes(), 8).unwrap();
    write_inflight_entry(&area, 4, 1, 7);
    write_inflight_entry(&area, 0, 1, 9);
    session
        .frontend
        .set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&area))
        .unwrap();

    session.start_ring(&guest, 0);

    assert!(guest.wait_used(2));
    assert_eq!((guest.used_id(0), guest.used_id(1)), (4, 0));
    assert_eq!(read_image(&server.image, 3 * 512, SECTOR), pattern(0xa0));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        guest.used_idx(),
        2,
        "next_avail skipped both recovered entries"
    );
}

/// Expects the backend to drop the connection after `attempt`, then checks that a new
/// connection still serves I/O.
fn assert_dropped_then_next_works(server: &TestServer, attempt: impl FnOnce(&mut Session, &Guest)) {
    let guest = Guest::new();
    let mut session = connect(&server.socket);
    attempt(&mut session, &guest);
    assert!(session.is_dropped(), "connection dropped");
    drop(session);

    let mut next = connect(&server.socket);
    let mut guest = Guest::new();
    next.start_ring(&guest, 0);
    guest.build_request(0, VIRTIO_BLK_T_OUT, 1, Some(&pattern(5)));
    guest.stage(0);
    guest.publish();
    next.kick();
    assert!(guest.wait_used(1), "next connection serves I/O");
}

#[test]
fn hostile_memory_tables_drop_only_their_connection() {
    let server = start_server("hostile-memory");
    // Two regions overlapping in guest physical space.
    assert_dropped_then_next_works(&server, |s, guest| {
        let first = guest.region();
        let mut second = guest.region();
        second.guest_phys_addr = 0x1000;
        second.userspace_addr += 0x1000_0000;
        assert!(s.frontend.set_mem_table(&[first, second]).is_err());
    });
    // A region longer than its file (touching it would SIGBUS the backend).
    assert_dropped_then_next_works(&server, |s, guest| {
        let mut region = guest.region();
        region.memory_size = 64 * GUEST_SIZE as u64;
        assert!(s.frontend.set_mem_table(&[region]).is_err());
    });
    // A ring outside every region.
    assert_dropped_then_next_works(&server, |s, guest| {
        s.frontend.set_mem_table(&[guest.region()]).unwrap();
        s.frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        let mut ring = guest.ring_config();
        ring.used_ring_addr = guest.host_base + GUEST_SIZE as u64 - 8;
        assert!(s.frontend.set_vring_addr(0, &ring).is_err());
    });
    // ADD_MEM_REG overlapping the table.
    assert_dropped_then_next_works(&server, |s, guest| {
        s.frontend.set_mem_table(&[guest.region()]).unwrap();
        let overlapping = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0x8000,
            userspace_addr: guest.host_base + 0x4000_0000,
            memory_size: 0x1000,
            ..guest.region()
        };
        assert!(s.frontend.add_mem_region(&overlapping).is_err());
    });
}

#[test]
fn hostile_rings_drop_only_their_connection() {
    let server = start_server("hostile-rings");
    for size in [0u16, 3, 1000] {
        assert_dropped_then_next_works(&server, |s, _| {
            assert!(s.frontend.set_vring_num(0, size).is_err(), "size {size}");
        });
    }
    // Ring addresses before any memory.
    assert_dropped_then_next_works(&server, |s, guest| {
        s.frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        let ring = VringConfigData {
            ..guest.ring_config()
        };
        assert!(s.frontend.set_vring_addr(0, &ring).is_err());
    });
}

/// A raw vhost-user message: header {request, flags = version 1, size} + payload.
fn raw_message(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::new();
    message.extend_from_slice(&request.to_le_bytes());
    message.extend_from_slice(&1u32.to_le_bytes());
    message.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    message.extend_from_slice(payload);
    message
}

/// Sends `bytes` on a fresh raw connection; true if the backend then closes it.
fn raw_connection_is_dropped(server: &TestServer, bytes: &[u8], half_close: bool) -> bool {
    let mut stream = UnixStream::connect(&server.socket).unwrap();
    stream.write_all(bytes).unwrap();
    if half_close {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf), Ok(0))
}

const SET_OWNER: u32 = 3;
const SET_FEATURES: u32 = 2;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_KICK: u32 = 12;

#[test]
fn hostile_raw_messages_drop_only_their_connection() {
    let server = start_server("hostile-raw");
    let owner = raw_message(SET_OWNER, &[]);
    let vring_state = |index: u32, num: u32| {
        let mut payload = index.to_le_bytes().to_vec();
        payload.extend_from_slice(&num.to_le_bytes());
        payload
    };

    // A message before SET_OWNER.
    let early = raw_message(SET_FEATURES, &0u64.to_le_bytes());
    assert!(raw_connection_is_dropped(&server, &early, false));
    // A queue size past the split-ring maximum (a power of two the u16 API cannot say).
    let mut too_big = owner.clone();
    too_big.extend(raw_message(SET_VRING_NUM, &vring_state(0, 65536)));
    assert!(raw_connection_is_dropped(&server, &too_big, false));
    // A queue index past the queues offered.
    let mut bad_index = owner.clone();
    bad_index.extend(raw_message(SET_VRING_NUM, &vring_state(7, 16)));
    assert!(raw_connection_is_dropped(&server, &bad_index, false));
    // A kick fd promised (bit 8 clear) but not attached.
    let mut no_fd = owner.clone();
    no_fd.extend(raw_message(SET_VRING_KICK, &0u64.to_le_bytes()));
    assert!(raw_connection_is_dropped(&server, &no_fd, false));
    // A truncated message: the header promises 8 bytes, 3 arrive.
    let mut truncated = owner.clone();
    truncated.extend(&raw_message(SET_FEATURES, &0u64.to_le_bytes())[..15]);
    assert!(raw_connection_is_dropped(&server, &truncated, true));

    let mut next = connect(&server.socket);
    let mut guest = Guest::new();
    next.start_ring(&guest, 0);
    guest.build_request(0, VIRTIO_BLK_T_IN, 0, None);
    guest.stage(0);
    guest.publish();
    next.kick();
    assert!(guest.wait_used(1), "the server still serves");
}
