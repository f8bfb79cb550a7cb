use std::io::Cursor;

use super::protocol::*;
use super::*;

const RAM: u64 = 16 * PAGE_SIZE;

/// A well-formed stream: hello, two page runs, the state, end.
fn stream() -> Vec<u8> {
    let mut out = Vec::new();
    send_hello(&mut out, 2, RAM).unwrap();
    send_pages(&mut out, PAGE_SIZE, &[0xaa; 2 * PAGE_SIZE as usize]).unwrap();
    send_pages(&mut out, 15 * PAGE_SIZE, &[0x55; PAGE_SIZE as usize]).unwrap();
    send_state(&mut out, &crate::snapshot::tests::machine(2, RAM)).unwrap();
    send_end(&mut out).unwrap();
    out
}

fn receive_all(bytes: &[u8]) -> Result<(Vec<u8>, MachineState, u64), ProtocolError> {
    let mut input = Cursor::new(bytes);
    let hello = read_hello(&mut input)?;
    let mut ram = vec![0u8; hello.memory as usize];
    let (state, pages) = receive(&mut input, hello.cpus, &mut ram)?;
    Ok((ram, state, pages))
}

/// The error a stream is refused with (a stream accepted fails the test).
fn refused(bytes: &[u8]) -> ProtocolError {
    match receive_all(bytes) {
        Ok(_) => panic!("the stream was accepted"),
        Err(e) => e,
    }
}

#[test]
fn a_stream_round_trips_pages_and_state() {
    let bytes = stream();

    let (ram, state, pages) = receive_all(&bytes).unwrap();

    assert_eq!(pages, 3);
    assert_eq!(ram[..PAGE_SIZE as usize], [0u8; PAGE_SIZE as usize]);
    assert!(ram[PAGE_SIZE as usize..3 * PAGE_SIZE as usize]
        .iter()
        .all(|&b| b == 0xaa));
    assert!(ram[15 * PAGE_SIZE as usize..].iter().all(|&b| b == 0x55));
    assert_eq!(state.cpus, 2);
    assert_eq!(state.vcpus[1].regs.rip, 0x1001);
}

#[test]
fn a_flipped_payload_byte_is_a_corrupt_frame() {
    let mut bytes = stream();
    // Inside the first page run's data (hello frame: 20 + 32 bytes, then a 20-byte header
    // and the 8-byte offset).
    bytes[52 + 20 + 8 + 100] ^= 1;

    let error = refused(&bytes);

    assert!(matches!(error, ProtocolError::Corrupt), "{error}");
}

#[test]
fn a_flipped_kind_or_length_is_refused() {
    let mut kind = stream();
    kind[52 + 4] = 4; // pages -> end: the checksum covers the kind
    let mut length = stream();
    length[52 + 8] ^= 0x10;

    assert!(matches!(refused(&kind), ProtocolError::Corrupt));
    assert!(matches!(
        refused(&length),
        ProtocolError::Corrupt | ProtocolError::Truncated
    ));
}

#[test]
fn another_version_is_refused_by_name() {
    let mut payload = Vec::new();
    payload.extend_from_slice(&FORMAT);
    payload.extend_from_slice(&(VERSION + 1).to_le_bytes());
    payload.extend_from_slice(&[0; 12]);
    let mut bytes = Vec::new();
    write_frame(&mut bytes, 1, &payload).unwrap();

    let error = refused(&bytes);

    assert!(
        matches!(error, ProtocolError::Version { found } if found == VERSION + 1),
        "{error}"
    );
    assert!(error.to_string().contains("version 2"), "{error}");
}

#[test]
fn not_a_migration_stream_is_refused() {
    let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    let mut other_format = Vec::new();
    write_frame(&mut other_format, 1, b"sluice-snapshot!\x01\0\0\0").unwrap();

    assert!(matches!(refused(&http), ProtocolError::BadMagic));
    assert!(matches!(refused(&other_format), ProtocolError::Format(_)));
}

#[test]
fn a_truncated_stream_is_refused_wherever_it_ends() {
    let bytes = stream();
    // Every cut: inside a header, inside a payload, between frames (no `End`).
    for cut in [
        0,
        10,
        52,
        60,
        52 + 28 + 4096,
        bytes.len() - 20,
        bytes.len() - 1,
    ] {
        let error = refused(&bytes[..cut]);

        assert!(
            matches!(error, ProtocolError::Truncated),
            "cut at {cut}: {error}"
        );
    }
}

#[test]
fn pages_outside_ram_or_unaligned_are_refused() {
    let mut outside = Vec::new();
    send_hello(&mut outside, 1, RAM).unwrap();
    send_pages(&mut outside, RAM - PAGE_SIZE, &[1; 2 * PAGE_SIZE as usize]).unwrap();
    let mut unaligned = Vec::new();
    send_hello(&mut unaligned, 1, RAM).unwrap();
    let mut payload = 100u64.to_le_bytes().to_vec();
    payload.extend_from_slice(&[1; PAGE_SIZE as usize]);
    write_frame(&mut unaligned, 2, &payload).unwrap();
    let mut wrapping = Vec::new();
    send_hello(&mut wrapping, 1, RAM).unwrap();
    send_pages(&mut wrapping, u64::MAX - 4095, &[1; PAGE_SIZE as usize]).unwrap();

    for bytes in [outside, unaligned, wrapping] {
        let error = refused(&bytes);
        assert!(
            matches!(error, ProtocolError::Malformed { kind: "pages", .. }),
            "{error}"
        );
    }
}

#[test]
fn a_huge_length_is_refused_before_allocating() {
    let mut bytes = Vec::new();
    send_hello(&mut bytes, 1, RAM).unwrap();
    let mut header = [0u8; 20];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = 2;
    header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(&header);

    let error = refused(&bytes);

    assert!(
        matches!(error, ProtocolError::TooLarge(u32::MAX)),
        "{error}"
    );
}

#[test]
fn a_state_for_another_shape_or_out_of_order_messages_are_refused() {
    let mut wrong_shape = Vec::new();
    send_hello(&mut wrong_shape, 2, RAM).unwrap();
    send_state(&mut wrong_shape, &crate::snapshot::tests::machine(1, RAM)).unwrap();
    send_end(&mut wrong_shape).unwrap();
    let mut end_first = Vec::new();
    send_hello(&mut end_first, 1, RAM).unwrap();
    send_end(&mut end_first).unwrap();
    let mut pages_after_state = Vec::new();
    send_hello(&mut pages_after_state, 1, RAM).unwrap();
    send_state(
        &mut pages_after_state,
        &crate::snapshot::tests::machine(1, RAM),
    )
    .unwrap();
    send_pages(&mut pages_after_state, 0, &[1; PAGE_SIZE as usize]).unwrap();
    let mut second_hello = Vec::new();
    send_hello(&mut second_hello, 1, RAM).unwrap();
    send_hello(&mut second_hello, 1, RAM).unwrap();

    assert!(matches!(
        refused(&wrong_shape),
        ProtocolError::Malformed { kind: "state", .. }
    ));
    for bytes in [end_first, pages_after_state, second_hello] {
        let error = refused(&bytes);
        assert!(matches!(error, ProtocolError::Unexpected { .. }), "{error}");
    }
}

#[test]
fn a_hello_with_no_vcpus_or_odd_memory_is_refused() {
    let mut no_cpus = Vec::new();
    send_hello(&mut no_cpus, 0, RAM).unwrap();
    let mut odd_memory = Vec::new();
    send_hello(&mut odd_memory, 1, RAM + 1).unwrap();

    for bytes in [no_cpus, odd_memory] {
        let error = refused(&bytes);
        assert!(
            matches!(error, ProtocolError::Malformed { kind: "hello", .. }),
            "{error}"
        );
    }
}

#[test]
fn urls_are_unix_or_tcp() {
    assert_eq!(
        MigrationUrl::parse("unix:/tmp/m.sock").unwrap(),
        MigrationUrl::Unix("/tmp/m.sock".into())
    );
    assert_eq!(
        MigrationUrl::parse("tcp:127.0.0.1:4444").unwrap(),
        MigrationUrl::Tcp("127.0.0.1:4444".into())
    );
    for bad in ["unix:", "tcp:host", "tcp::1", "file:///x", "/tmp/m.sock"] {
        assert!(MigrationUrl::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn an_ack_round_trips() {
    let mut bytes = Vec::new();
    send_ack(&mut bytes, 1_234_567_890).unwrap();

    let message = read_message(&mut Cursor::new(bytes)).unwrap();

    assert!(matches!(
        message,
        Message::Ack {
            resumed_unix_ns: 1_234_567_890
        }
    ));
}

/// Sends a whole stream to `url` (once something listens there) and returns the `Ack`'s time.
fn send_stream_to(url: String, memory: u64) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let target = MigrationUrl::parse(&url).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match target.connect() {
                Ok(stream) => break stream,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        send_hello(&mut stream, 1, memory).unwrap();
        send_pages(&mut stream, 0x1000, &[0x5a; 0x2000]).unwrap();
        send_pages(&mut stream, memory - 0x1000, &[0xa5; 0x1000]).unwrap();
        send_state(&mut stream, &crate::snapshot::tests::machine(1, memory)).unwrap();
        send_end(&mut stream).unwrap();
        match read_message(&mut stream).unwrap() {
            Message::Ack { resumed_unix_ns } => resumed_unix_ns,
            other => panic!("{other:?}"),
        }
    })
}

#[test]
fn a_stream_over_unix_and_tcp_lands_in_guest_ram_and_is_acknowledged() {
    let memory = 32 << 20;
    let socket = std::env::temp_dir().join(format!("sluice-migrate-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    // A free port: bound, noted, released (the destination binds it again right away).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for url in [
        format!("unix:{}", socket.display()),
        format!("tcp:127.0.0.1:{port}"),
    ] {
        let source = send_stream_to(url.clone(), memory);

        let mut incoming = Incoming::accept(&url).unwrap();
        let ram = GuestRam::new(incoming.hello().memory).unwrap();
        let state = incoming.receive(&ram).unwrap();
        incoming.acknowledge(42).unwrap();

        assert_eq!(source.join().unwrap(), 42, "{url}");
        assert_eq!(state.vcpus.len(), 1);
        let mut page = vec![0u8; 0x3000];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.file, &mut page, 0).unwrap();
        assert!(page[..0x1000].iter().all(|&b| b == 0), "{url}");
        assert!(page[0x1000..].iter().all(|&b| b == 0x5a), "{url}");
        let mut last = [0u8; 0x1000];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.file, &mut last, memory - 0x1000).unwrap();
        assert!(last.iter().all(|&b| b == 0xa5), "{url}");
        assert!(
            !socket.exists(),
            "the Unix listener is gone after its one connection"
        );
    }
}
