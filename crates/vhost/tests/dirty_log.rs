//! VHOST_USER_SET_LOG_BASE and VHOST_F_LOG_ALL from a scripted frontend: the backend's log has
//! exactly the guest pages it wrote, only while LOG_ALL is negotiated, and hostile logs are
//! refused without taking the server down.

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use sluice_dma::shared_log::{log_bytes_for, SharedLog};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

const VRING_F_LOG: u32 = 1;
const PAGE: u64 = 4096;

fn page_of(gpa: u64) -> u64 {
    gpa / PAGE
}

fn read_request(guest: &mut Guest, session: &Session, head: u16, done: u16) {
    guest.build_request(head, VIRTIO_BLK_T_IN, 2, None);
    guest.stage(head);
    guest.publish();
    session.kick();
    assert!(guest.wait_used(done), "request at head {head} completed");
    assert_eq!(guest.status(head), 0);
}

fn write_request(guest: &mut Guest, session: &Session, head: u16, done: u16) {
    guest.build_request(head, VIRTIO_BLK_T_OUT, 4, Some(&[0x5a; SECTOR]));
    guest.stage(head);
    guest.publish();
    session.kick();
    assert!(guest.wait_used(done), "request at head {head} completed");
    assert_eq!(guest.status(head), 0);
}

fn set_log_base(session: &mut Session, file: &std::fs::File, size: u64, offset: u64) -> bool {
    let region = VhostUserDirtyLogRegion {
        mmap_size: size,
        mmap_offset: offset,
        mmap_handle: file.as_raw_fd(),
    };
    session.frontend.set_log_base(0, Some(region)).is_ok()
}

#[test]
fn the_log_has_exactly_the_pages_the_backend_wrote_while_log_all_is_on() {
    within(Duration::from_secs(60), || {
        let server = start_server("dirtylog");
        let mut session = connect(&server.socket);
        assert!(session.features & LOG_ALL != 0, "VHOST_F_LOG_ALL offered");
        assert!(session
            .protocol_features()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD));
        let mut guest = Guest::new();
        session.start_ring(&guest, 0);
        read_request(&mut guest, &session, 0, 1);
        let (log, file) = SharedLog::create(log_bytes_for(GUEST_SIZE as u64)).unwrap();

        // Migration starts: the log, LOG_ALL, the ring's log flag (as QEMU sends them).
        assert!(set_log_base(&mut session, &file, log.len() as u64, 0));
        let features = session.features & !(1 << 29) & !RING_PACKED & !LOG_ALL;
        session.frontend.set_features(features | LOG_ALL).unwrap();
        let mut ring = guest.ring_config();
        ring.flags = VRING_F_LOG;
        ring.log_addr = Some(USED_GPA);
        session.frontend.set_vring_addr(0, &ring).unwrap();
        let _restart = log.take();
        read_request(&mut guest, &session, 3, 2);
        write_request(&mut guest, &session, 6, 3);
        let logged = log.take();
        // Migration over: LOG_ALL off, nothing logged any more.
        session.frontend.set_features(features).unwrap();
        read_request(&mut guest, &session, 9, 4);
        let after = log.take();

        let mut expected = vec![
            page_of(USED_GPA),
            page_of(HEADER_GPA + 0x300 + 0x80), // read's status (page of the headers)
            page_of(DATA_GPA + 0x3000),         // read's data buffer
        ];
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(
            logged, expected,
            "the used ring, status bytes and read buffer"
        );
        assert!(
            after.is_empty(),
            "nothing logged without LOG_ALL: {after:?}"
        );
        assert_eq!(guest.data(3), read_image(&server.image, 2 * 512, SECTOR));
    });
}

#[test]
fn hostile_log_bases_are_refused_and_the_server_serves_on() {
    within(Duration::from_secs(60), || {
        let server = start_server("dirtylog-hostile");
        let guest = Guest::new();
        let small = memfd("small-log", 0x1000);
        let needed = log_bytes_for(GUEST_SIZE as u64);
        // (file, size, offset): empty, misaligned, past the end of the file, wrapping, too
        // small for the memory table, absurdly large.
        let cases: [(&std::fs::File, u64, u64); 6] = [
            (&small, 0, 0),
            (&small, needed, 0x10),
            (&small, 0x1000, 0x1000),
            (&small, needed, !0xfff_u64),
            (&small, needed / 2, 0),
            (&small, 1 << 40, 0),
        ];
        for (file, size, offset) in cases {
            let mut session = connect(&server.socket);
            session.start_ring(&guest, 0);
            assert!(
                !set_log_base(&mut session, file, size, offset),
                "log of {size:#x} at {offset:#x} refused"
            );
            assert!(session.is_dropped(), "connection dropped after the refusal");
        }

        let mut session = connect(&server.socket);
        session.start_ring(&guest, 0);
        assert!(
            set_log_base(&mut session, &small, needed, 0),
            "a sane log is taken"
        );
    });
}
