//! Hostile or unusual frontends scripted with the `vhost` crate's frontend and raw sockets:
//! a saturated call fd, rings whose memory goes away and comes back, rings set up in the
//! order a frontend without VHOST_USER_F_PROTOCOL_FEATURES may use, a region re-added with
//! another fd, and an idle connection next to a working one (issue 9, defects 4, 6, 8, 12).

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::EventFd;

const PROTOCOL_FEATURES: u64 = 1 << 30;
const EVENT_IDX: u64 = 1 << 29;

fn pattern(seed: u8) -> Vec<u8> {
    (0..SECTOR).map(|i| (i as u8) ^ seed).collect()
}

/// One write at `sector` through head 0 of `guest`'s ring; true once it completed.
fn write_completes(session: &Session, guest: &mut Guest, head: u16, sector: u64) -> bool {
    let used = guest.used_idx();
    guest.build_request(head, VIRTIO_BLK_T_OUT, sector, Some(&pattern(sector as u8)));
    guest.stage(head);
    guest.publish();
    session.kick();
    guest.wait_used(used.wrapping_add(1))
}

/// Features (no EVENT_IDX), memory by ADD_MEM_REG, ring 0 set up and enabled.
fn start_ring_with_added_region(session: &mut Session, guest: &Guest) {
    let fe = &mut session.frontend;
    fe.set_features(session.features & !EVENT_IDX & !RING_PACKED)
        .unwrap();
    fe.add_mem_region(&guest.region()).expect("ADD_MEM_REG");
    fe.set_vring_num(0, QUEUE_SIZE).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(0, &guest.ring_config()).unwrap();
    fe.set_vring_call(0, &session.call).unwrap();
    fe.set_vring_kick(0, &session.kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
}

/// Defect 4: a call eventfd at its maximum count makes a blocking write(2) wait until the
/// frontend reads it — which a hostile one never does. The backend must not block on it.
#[test]
fn a_saturated_call_fd_does_not_hang_the_backend() {
    within(Duration::from_secs(30), saturated_call_fd);
}

fn saturated_call_fd() {
    let server = start_server("full-call");
    let mut session = connect(&server.socket);
    let blocking_call = EventFd::new(0).unwrap();
    blocking_call.write(0xffff_ffff_ffff_fffe).unwrap();
    session.call = blocking_call;
    let mut guest = Guest::new();
    session.start_ring(&guest, 0);

    let completed = write_completes(&session, &mut guest, 0, 1);
    let base = session.frontend.get_vring_base(0);

    assert!(completed, "the request completed");
    assert_eq!(
        base.expect("GET_VRING_BASE answered (the worker was not stuck signalling)"),
        1
    );
    drop(session);
    let mut next = connect(&server.socket);
    let mut guest = Guest::new();
    next.start_ring(&guest, 0);
    assert!(write_completes(&next, &mut guest, 0, 2), "next connection");
}

/// Defect 6: REM_MEM_REG of the region holding a running ring stops it; ADD_MEM_REG of the
/// region must start it again.
#[test]
fn a_ring_stopped_by_removing_its_memory_restarts_when_the_memory_returns() {
    let server = start_server("mem-returns");
    let mut session = connect(&server.socket);
    let mut guest = Guest::new();
    start_ring_with_added_region(&mut session, &guest);
    assert!(write_completes(&session, &mut guest, 0, 1), "before");

    session
        .frontend
        .remove_mem_region(&guest.region())
        .expect("REM_MEM_REG");
    session
        .frontend
        .add_mem_region(&guest.region())
        .expect("ADD_MEM_REG again");

    assert!(write_completes(&session, &mut guest, 3, 2), "after");
    assert_eq!(read_image(&server.image, 2 * 512, SECTOR), pattern(2));
}

/// Defect 6: without VHOST_USER_F_PROTOCOL_FEATURES a ring runs as soon as it is complete,
/// whatever order its messages came in (here SET_VRING_KICK before SET_VRING_ADDR).
#[test]
fn without_protocol_features_a_kick_before_the_addresses_still_starts_the_ring() {
    let server = start_server("kick-first");
    let frontend = frontend(&server.socket);
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    frontend
        .set_features(features & !PROTOCOL_FEATURES & !EVENT_IDX & !RING_PACKED & !ACCESS_PLATFORM)
        .unwrap();
    let mut guest = Guest::new();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    frontend.set_mem_table(&[guest.region()]).unwrap();
    frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
    frontend.set_vring_base(0, 0).unwrap();
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    frontend.set_vring_addr(0, &guest.ring_config()).unwrap();
    // No reply-ack without protocol features: a reply-bearing request makes sure the backend
    // handled everything above.
    frontend.get_features().unwrap();

    guest.build_request(0, VIRTIO_BLK_T_OUT, 4, Some(&pattern(4)));
    guest.stage(0);
    guest.publish();
    kick.write(1).unwrap();

    assert!(guest.wait_used(1), "the ring runs");
    assert_eq!(read_image(&server.image, 4 * 512, SECTOR), pattern(4));
}

/// Defect 12: ADD_MEM_REG of a region the backend already has (same addresses and size) but
/// backed by another file must not leave the backend on the old memory.
#[test]
fn a_region_re_added_with_another_fd_is_served_from_the_new_memory() {
    let server = start_server("readd-fd");
    let mut session = connect(&server.socket);
    let first = Guest::new();
    start_ring_with_added_region(&mut session, &first);
    let mut second = Guest::new();
    // The same guest range at the same frontend address, now backed by the second memfd.
    let moved = VhostUserMemoryRegionInfo {
        userspace_addr: first.host_base,
        ..second.region()
    };

    session
        .frontend
        .add_mem_region(&moved)
        .expect("ADD_MEM_REG with another fd");

    assert!(
        write_completes(&session, &mut second, 0, 5),
        "the request in the new memory was served"
    );
    assert_eq!(read_image(&server.image, 5 * 512, SECTOR), pattern(5));
    assert_eq!(first.used_idx(), 0, "the old memory is left alone");
}

/// Defect 8: a frontend that connects and says nothing must not keep a second one waiting.
#[test]
fn an_idle_connection_does_not_block_the_next_frontend() {
    within(Duration::from_secs(30), idle_connection_then_another);
}

fn idle_connection_then_another() {
    let server = start_server("idle-first");
    let _idle = UnixStream::connect(&server.socket).unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let mut session = connect(&server.socket);
    let mut guest = Guest::new();
    session.start_ring(&guest, 0);

    assert!(write_completes(&session, &mut guest, 0, 6));
}
