//! A frontend that shrinks the memfds it shared (guest RAM, the inflight area) after the
//! backend mapped them: touching the lost pages raises SIGBUS in the backend's process. The
//! process (here: this test process) must survive, drop that connection and serve the next
//! one (issue 9, defect 2).

mod common;

use std::os::fd::AsRawFd;

use common::*;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;

/// Everything from the request headers on is cut off; the rings (below 0x3000) stay.
const SHRUNK_SIZE: u64 = HEADER_GPA;

fn next_connection_serves_io(server: &TestServer) {
    let mut next = connect(&server.socket);
    let mut guest = Guest::new();
    next.start_ring(&guest, 0);
    guest.build_request(0, VIRTIO_BLK_T_OUT, 1, Some(&[0x5a; SECTOR]));
    guest.stage(0);
    guest.publish();
    next.kick();
    assert!(guest.wait_used(1), "the next connection serves I/O");
    assert_eq!(read_image(&server.image, 512, SECTOR), vec![0x5a; SECTOR]);
}

#[test]
fn guest_ram_shrunk_under_a_running_ring_drops_only_that_connection() {
    let server = start_server("sigbus-ram");
    let mut session = connect(&server.socket);
    let mut guest = Guest::new();
    session.start_ring(&guest, 0);
    // The request header lives in the part about to be cut off.
    guest.build_request(0, VIRTIO_BLK_T_OUT, 3, Some(&[7; SECTOR]));
    guest.stage(0);

    guest.file.set_len(SHRUNK_SIZE).expect("shrink guest RAM");
    guest.publish();
    session.kick();

    assert!(
        wait_until(|| session.is_dropped()),
        "the backend drops the connection whose memory vanished"
    );
    next_connection_serves_io(&server);
}

#[test]
fn an_inflight_area_shrunk_under_a_running_ring_drops_only_that_connection() {
    let server = start_server("sigbus-inflight");
    let mut session = connect(&server.socket);
    let area = memfd("inflight", 4096);
    let info = VhostUserInflight::new(4096, 0, 1, QUEUE_SIZE);
    session
        .frontend
        .set_inflight_fd(&info, area.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    let mut guest = Guest::new();
    session.start_ring(&guest, 0);
    guest.build_request(0, VIRTIO_BLK_T_OUT, 3, Some(&[7; SECTOR]));
    guest.stage(0);

    area.set_len(0).expect("shrink the inflight area");
    guest.publish();
    session.kick();

    assert!(
        wait_until(|| session.is_dropped()),
        "the backend drops the connection whose inflight area vanished"
    );
    next_connection_serves_io(&server);
}
