use super::*;

fn meta() -> LogMeta {
    LogMeta {
        memory: 16 << 20,
        cpus: 1,
        cmdline: "clock=virtual".into(),
        devices: vec!["virtio-blk x.img".into()],
        entry: 0x10_0000,
        protocol: "pvh".into(),
        protocol_pointer: 0x6000,
    }
}

fn page(fill: impl Fn(usize) -> u8) -> Box<[u8]> {
    (0..PAGE_SIZE).map(fill).collect()
}

fn sample_events() -> Vec<Event> {
    vec![
        Event::InitPage {
            page: 256,
            bytes: page(|i| (i % 7) as u8),
        },
        Event::Exit(ExitRecord {
            kind: ExitKind::PioIn,
            addr: 0x3fd,
            data: vec![0x60],
            rip: 0x10_0123,
            regs_hash: 0xdead_beef,
        }),
        Event::DmaPage {
            page: 300,
            bytes: page(|i| if i < 16 { 1 } else { 0 }),
        },
        // The same page again: encoded as a delta against the previous image.
        Event::DmaPage {
            page: 300,
            bytes: page(|i| if i < 16 || i == 4000 { 1 } else { 0 }),
        },
        Event::Msi {
            address: 0xfee0_0000,
            data: 0x41,
        },
        Event::Exit(ExitRecord {
            kind: ExitKind::MmioWrite,
            addr: 0x1_0000_3000,
            data: vec![1, 0, 0, 0, 0, 0, 0, 0],
            rip: u64::MAX,
            regs_hash: 1,
        }),
        Event::End(EndRecord {
            outcome: 2,
            value: 0,
            exits: 2,
            memory_hash: 42,
        }),
    ]
}

fn encode(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut writer = LogWriter::new(&mut out, &meta()).unwrap();
    for event in events {
        writer.push(event).unwrap();
    }
    writer.finish().unwrap();
    out
}

fn decode(bytes: &[u8]) -> Result<Vec<Event>, LogError> {
    let mut reader = LogReader::new(bytes)?;
    assert_eq!(reader.meta, meta());
    let mut events = Vec::new();
    while let Some(event) = reader.next_event()? {
        events.push(event);
    }
    Ok(events)
}

#[test]
fn events_round_trip() {
    let events = sample_events();
    assert_eq!(decode(&encode(&events)).unwrap(), events);
}

#[test]
fn a_repeated_page_costs_only_its_changes() {
    let first = page(|i| (i * 31 % 251) as u8);
    let mut second = first.clone();
    second[100] ^= 0xff;
    let one = encode(&[Event::DmaPage {
        page: 1,
        bytes: first.clone(),
    }]);
    let two = encode(&[
        Event::DmaPage {
            page: 1,
            bytes: first,
        },
        Event::DmaPage {
            page: 1,
            bytes: second,
        },
    ]);
    assert!(two.len() - one.len() < 16, "{} vs {}", two.len(), one.len());
}

#[test]
fn many_events_span_chunks_and_still_round_trip() {
    let events: Vec<Event> = (0..200)
        .map(|n| Event::DmaPage {
            page: n,
            bytes: page(|i| (i as u64 * 13 + n) as u8),
        })
        .collect();
    let bytes = encode(&events);
    assert!(bytes.len() > 3 * CHUNK_TARGET);
    assert_eq!(decode(&bytes).unwrap(), events);
}

#[test]
fn a_flipped_payload_byte_fails_the_checksum() {
    let mut bytes = encode(&sample_events());
    let at = bytes.len() - 5;
    bytes[at] ^= 1;
    let err = decode(&bytes).unwrap_err();
    assert!(matches!(err, LogError::Checksum { .. }), "{err}");
}

#[test]
fn bad_magic_version_and_truncation_are_refused() {
    let bytes = encode(&sample_events());
    assert!(matches!(
        decode(b"NOTALOG!\x01\0\0\0"),
        Err(LogError::Magic)
    ));
    let mut version = bytes.clone();
    version[8] = 2;
    assert!(matches!(decode(&version), Err(LogError::Version(2))));
    for cut in [13, 30, bytes.len() - 1] {
        assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn malformed_events_are_errors_not_panics() {
    // Each payload framed with a valid checksum: the event decoder must refuse it.
    let cases: &[&[u8]] = &[
        &[TAG_EXIT, 9, 0, 1, 0, 0],                   // unknown exit kind
        &[TAG_EXIT, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8], // size 9
        &[TAG_DMA_PAGE, 1, 0xff, 0x1f, 0],            // a run past 4096 bytes
        &[TAG_DMA_PAGE, 1, 0, 0],                     // an empty run
        &[TAG_MSI, 0, 0xff, 0xff, 0xff, 0xff, 0x7f],  // MSI data over 32 bits
        &[
            TAG_MSI, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ], // varint overflow
        &[77],                                        // unknown tag
        &[TAG_END, 0],                                // truncated
    ];
    for payload in cases {
        let mut bytes = encode(&[]);
        let len = payload.len() as u32;
        bytes.extend_from_slice(CHUNK_MAGIC);
        bytes.push(KIND_EVENTS);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&checksum(KIND_EVENTS, len, payload).to_le_bytes());
        bytes.extend_from_slice(payload);
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, LogError::Event { .. }), "{payload:?}: {err}");
    }
}

#[test]
fn rewrite_changes_one_event_and_keeps_the_log_valid() {
    let bytes = encode(&sample_events());
    let mut out = Vec::new();
    rewrite(&bytes, &mut out, |index, event| {
        if let (1, Event::Exit(exit)) = (index, event) {
            exit.data[0] ^= 0x20;
        }
    })
    .unwrap();
    let events = decode(&out).unwrap();
    let Event::Exit(exit) = &events[1] else {
        panic!("{:?}", events[1])
    };
    assert_eq!(exit.data, vec![0x40]);
    assert_eq!(events[2..], sample_events()[2..]);
}

/// The generated seeds that describe whole logs (fuzz/make_seeds.py writes the format on its
/// own) decode to their end record: the seed generator and this reader agree.
#[test]
fn the_valid_fuzz_seeds_decode_to_the_end() {
    let corpus =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/replay_log");
    for name in ["init_exit_end", "dma_delta_msi", "two_chunks"] {
        let bytes = std::fs::read(corpus.join(name)).unwrap();
        let mut reader = LogReader::new(&bytes[..]).unwrap();
        let mut last = None;
        while let Some(event) = reader
            .next_event()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
        {
            last = Some(event);
        }
        assert!(matches!(last, Some(Event::End(_))), "{name}: {last:?}");
    }
}
