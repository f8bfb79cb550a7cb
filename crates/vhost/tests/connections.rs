//! Several frontends at once (issue 9, defect 8): each connection is served on its own
//! thread, with a deadline for the handshake, a cap on connections and on mapped memory, and
//! one owner of the device at a time. Also where the server may listen (defect 1, 13).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use common::*;
use sluice_devices::block::{Block, BlockConfig};
use sluice_vhost::{Limits, Server};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

fn block(name: &str) -> (Block, std::path::PathBuf) {
    let image = make_image(name);
    (Block::new(BlockConfig::new(&image)).unwrap(), image)
}

fn serve_with(name: &str, limits: Limits) -> std::path::PathBuf {
    let (device, _) = block(name);
    let socket = temp_path(&format!("{name}.sock"));
    let server = Server::bind_with(&socket, device, limits).expect("bind");
    std::thread::spawn(move || server.run());
    socket
}

/// Whether the server closes `stream` within `within` (reads EOF or a reset).
fn closed_within(stream: &mut UnixStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut byte = [0u8; 1];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
    false
}

#[test]
fn a_connection_that_never_completes_its_handshake_is_dropped() {
    let socket = serve_with(
        "handshake-timeout",
        Limits {
            handshake_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
    );
    let mut idle = UnixStream::connect(&socket).unwrap();
    let started = Instant::now();

    let closed = closed_within(&mut idle, Duration::from_secs(5));

    assert!(closed, "the idle connection was dropped");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn connections_past_the_limit_are_refused_and_the_others_keep_working() {
    let socket = serve_with(
        "max-connections",
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
    );
    let mut owner = connect(&socket);
    let _second = UnixStream::connect(&socket).unwrap();
    std::thread::sleep(Duration::from_millis(100));

    let mut third = UnixStream::connect(&socket).unwrap();

    assert!(
        closed_within(&mut third, Duration::from_secs(5)),
        "the third connection is closed"
    );
    let mut guest = Guest::new();
    owner.start_ring(&guest, 0);
    guest.build_request(0, VIRTIO_BLK_T_IN, 0, None);
    guest.stage(0);
    guest.publish();
    owner.kick();
    assert!(guest.wait_used(1), "the first connection still serves I/O");
}

#[test]
fn a_second_frontend_cannot_take_a_device_another_one_owns() {
    let socket = serve_with("two-owners", Limits::default());
    let mut first = connect(&socket);
    let mut guest = Guest::new();
    first.start_ring(&guest, 0);

    let second = frontend(&socket);
    let features = second.get_features();
    let owned = second.set_owner().and_then(|()| second.get_features());

    assert!(features.is_ok(), "queries are answered: {features:?}");
    assert!(owned.is_err(), "the second SET_OWNER is refused");
    guest.build_request(0, VIRTIO_BLK_T_IN, 0, None);
    guest.stage(0);
    guest.publish();
    first.kick();
    assert!(guest.wait_used(1), "the owner keeps its device");
    drop(first);
    // At once, as a reconnecting frontend would: SET_OWNER waits for the old owner to go.
    let mut reconnected = connect(&socket);
    assert!(
        reconnected.frontend.get_queue_num().is_ok(),
        "the device is free again once its owner left"
    );
}

#[test]
fn a_memory_table_larger_than_the_limit_is_refused() {
    let socket = serve_with(
        "mapped-limit",
        Limits {
            max_mapped_bytes: GUEST_SIZE as u64 / 2,
            ..Limits::default()
        },
    );
    let session = connect(&socket);
    let guest = Guest::new();

    let refused = session.frontend.set_mem_table(&[guest.region()]);

    assert!(refused.is_err(), "1 MiB of guest RAM over a 512 KiB limit");
}

#[test]
fn bind_refuses_a_regular_file_and_keeps_it() {
    let path = temp_path("not-a-socket");
    std::fs::write(&path, b"precious").unwrap();
    let (device, _) = block("not-a-socket-dev");

    let bound = Server::bind(&path, device);

    let error = bound.err().expect("refused").to_string();
    assert!(error.contains("not a socket"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn bind_refuses_a_directory_saying_so() {
    let path = temp_path("a-directory");
    std::fs::create_dir_all(&path).unwrap();
    let (device, _) = block("a-directory-dev");

    let error = Server::bind(&path, device)
        .err()
        .expect("refused")
        .to_string();

    assert!(error.contains("is a directory"), "{error}");
    assert!(path.is_dir());
}

#[test]
fn bind_refuses_the_socket_of_a_live_server() {
    let live = serve_with("live-socket", Limits::default());
    let (device, _) = block("live-socket-second");

    let second = Server::bind(&live, device);

    let error = second.err().expect("refused").to_string();
    assert!(error.contains("already listening"), "{error}");
    let mut session = connect(&live);
    assert!(
        session.frontend.get_queue_num().is_ok(),
        "the first still serves"
    );
}

#[test]
fn bind_replaces_a_stale_socket_and_removes_its_own_when_dropped() {
    let path = temp_path("stale-socket");
    let _ = std::fs::remove_file(&path);
    drop(UnixListener::bind(&path).unwrap()); // Leaves the file, nobody listening.
    let (device, _) = block("stale-socket-dev");

    let server = Server::bind(&path, device).expect("a stale socket is replaced");
    let reachable = UnixStream::connect(&path).is_ok();
    drop(server);

    assert!(reachable);
    assert!(!path.exists(), "the server removed its socket");
}

/// A raw header (request, flags = version 1, payload size).
fn header(request: u32, size: u32) -> Vec<u8> {
    [request, 1, size]
        .iter()
        .flat_map(|word| word.to_le_bytes())
        .collect()
}

const GET_FEATURES: u32 = 1;

#[test]
fn a_message_that_never_arrives_whole_is_dropped_after_the_message_timeout() {
    let socket = serve_with(
        "torn-message",
        Limits {
            message_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
    );
    let mut torn = UnixStream::connect(&socket).unwrap();
    // SET_FEATURES promises 8 bytes; 3 arrive, and the socket stays open.
    let mut message = header(2, 8);
    message.extend_from_slice(&[0, 0, 0]);
    torn.write_all(&message).unwrap();

    assert!(closed_within(&mut torn, Duration::from_secs(5)));
}

#[test]
fn a_frontend_that_never_reads_its_replies_is_dropped() {
    let socket = serve_with("unread-replies", Limits::default());
    let mut spammer = UnixStream::connect(&socket).unwrap();
    spammer
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let requests: Vec<u8> = (0..50_000).flat_map(|_| header(GET_FEATURES, 0)).collect();

    // The server stops reading once the replies pile up, so the write may not finish.
    let _ = spammer.write_all(&requests);

    let mut replies = Vec::new();
    spammer
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let drained = spammer.read_to_end(&mut replies);
    assert!(
        drained.is_ok(),
        "the server closed the connection: {drained:?}"
    );
    assert!(
        replies.len() < 50_000 * 20,
        "not every request was answered"
    );
    let mut session = connect(&socket);
    assert!(
        session.frontend.get_queue_num().is_ok(),
        "the server serves"
    );
}
