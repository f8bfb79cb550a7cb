//! Request logs end to end without a VM: a traced queue handler answers chains the re-run
//! driver publishes, the log is read back, re-run on a fresh image, tampered with, and turned
//! into `blk_request` seeds.

use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::block::request::{parse_request_for_fuzz, FuzzOutcome, RequestKind};
use crate::block::trace::{encode_header, encode_record, RequestLog, TraceHeader};

const IMAGE_BYTES: u64 = 1 << 20;

fn request_header(kind: u32, sector: u64) -> TracedBuffer {
    let mut bytes = vec![0u8; 16];
    bytes[..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    TracedBuffer::Readable(bytes)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ 0x5a)
        .collect()
}

/// A write, its read-back, a read past the end, GET_ID, a write whose data buffer is outside
/// guest memory, and a flush.
fn traffic() -> Vec<Vec<TracedBuffer>> {
    vec![
        vec![
            request_header(VIRTIO_BLK_T_OUT, 8),
            TracedBuffer::Readable(pattern(4096)),
            TracedBuffer::Writable(1),
        ],
        vec![
            request_header(VIRTIO_BLK_T_IN, 8),
            TracedBuffer::Writable(4096),
            TracedBuffer::Writable(1),
        ],
        vec![
            request_header(VIRTIO_BLK_T_IN, IMAGE_BYTES / 512),
            TracedBuffer::Writable(512),
            TracedBuffer::Writable(1),
        ],
        vec![
            request_header(VIRTIO_BLK_T_GET_ID, 0),
            TracedBuffer::Writable(20),
            TracedBuffer::Writable(1),
        ],
        vec![
            request_header(VIRTIO_BLK_T_OUT, 0),
            TracedBuffer::Outside {
                len: 512,
                writable: false,
            },
            TracedBuffer::Writable(1),
        ],
        vec![
            request_header(VIRTIO_BLK_T_FLUSH, 0),
            TracedBuffer::Writable(1),
        ],
    ]
}

fn image() -> TempFile {
    let file = TempFile::new_with_prefix("/tmp/sluice-rerun-test-").unwrap();
    file.as_file().set_len(IMAGE_BYTES).unwrap();
    file
}

/// Runs [`traffic`] through a handler that logs into `log`.
fn record(log: &Path) {
    let image = image();
    let mut config = BlockConfig::new(image.as_path());
    config.serial = "trace-serial".into();
    config.queue_size = 64;
    let block = Block::new(config).unwrap();
    let log = RequestLog::create(log, &block.trace_header()).unwrap();
    let mut handler = block.queue_handler(64).with_request_log(log, 3);
    let mut driver = Driver::new().unwrap();
    for buffers in traffic() {
        driver.exchange(&mut handler, &buffers).unwrap();
    }
}

fn read_log(path: &Path) -> (TraceHeader, Vec<TracedRequest>) {
    let mut reader = TraceReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut requests = Vec::new();
    while let Some(request) = reader.next_request().unwrap() {
        requests.push(request);
    }
    (reader.header, requests)
}

fn write_log(path: &Path, header: &TraceHeader, requests: &[TracedRequest]) {
    let mut bytes = encode_header(header);
    for request in requests {
        bytes.extend_from_slice(&encode_record(request));
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_request_log_holds_each_chain_as_read_and_its_answer() {
    let log = TempFile::new_with_prefix("/tmp/sluice-rq-").unwrap();
    record(log.as_path());

    let (header, requests) = read_log(log.as_path());

    assert_eq!(header.capacity_sectors, IMAGE_BYTES / 512);
    assert_eq!(&header.serial[..12], b"trace-serial");
    assert_eq!(header.queue_size, 64);
    assert_eq!(requests.len(), traffic().len());
    assert!(requests.iter().all(|r| r.queue == 3));
    assert_eq!(
        requests[0].buffers,
        traffic()[0],
        "the write as the device read it"
    );
    let ok = Some(VIRTIO_BLK_S_OK as u8);
    assert_eq!(requests[0].answer.status, ok);
    let read = requests[1].answer;
    assert_eq!((read.used_len, read.status), (4097, ok));
    assert_eq!(
        read.data_hash,
        fnv1a(&pattern(4096)),
        "the read returned the write"
    );
    assert_eq!(requests[2].answer.status, Some(VIRTIO_BLK_S_IOERR as u8));
    assert_eq!(requests[3].answer.used_len, 21);
    let mut serial = [0u8; 20];
    serial[..12].copy_from_slice(b"trace-serial");
    assert_eq!(requests[3].answer.data_hash, fnv1a(&serial));
    assert!(matches!(
        requests[4].buffers[1],
        TracedBuffer::Outside {
            len: 512,
            writable: false
        }
    ));
    assert_ne!(
        requests[4].answer.status, ok,
        "a buffer outside memory is refused"
    );
}

#[test]
fn a_rerun_on_a_fresh_image_gives_every_logged_answer() {
    let log = TempFile::new_with_prefix("/tmp/sluice-rq-").unwrap();
    record(log.as_path());

    let report = rerun(log.as_path(), &RerunOptions::default()).unwrap();

    assert_eq!(report.mismatch, None);
    assert_eq!(report.matched, traffic().len() as u64);
}

#[test]
fn a_tampered_request_or_another_image_stops_the_rerun_where_the_answer_differs() {
    let log = TempFile::new_with_prefix("/tmp/sluice-rq-").unwrap();
    record(log.as_path());
    let (header, mut requests) = read_log(log.as_path());
    // Other data in the write: the read-back (request #2) returns other bytes.
    if let TracedBuffer::Readable(bytes) = &mut requests[0].buffers[1] {
        bytes[100] ^= 0xff;
    }
    let tampered = TempFile::new_with_prefix("/tmp/sluice-rq-").unwrap();
    write_log(tampered.as_path(), &header, &requests);
    // Starting from an image whose sector 0 is not zero changes nothing the log read: the
    // write to sector 8 comes first. A log that reads sector 0 first does differ.
    let nonzero = image();
    std::fs::write(nonzero.as_path(), vec![0x11u8; IMAGE_BYTES as usize]).unwrap();
    let (_, original) = read_log(log.as_path());
    let mut read_zero = original[1].clone();
    read_zero.buffers[0] = request_header(VIRTIO_BLK_T_IN, 0);
    read_zero.answer.data_hash = fnv1a(&[0u8; 4096]);
    let reads_sector_zero = TempFile::new_with_prefix("/tmp/sluice-rq-").unwrap();
    write_log(reads_sector_zero.as_path(), &header, &[read_zero]);

    let tampered_report = rerun(tampered.as_path(), &RerunOptions::default()).unwrap();
    let fresh = rerun(reads_sector_zero.as_path(), &RerunOptions::default()).unwrap();
    let other_image = rerun(
        reads_sector_zero.as_path(),
        &RerunOptions {
            image: Some(nonzero.as_path().to_path_buf()),
            corpus: None,
        },
    )
    .unwrap();

    let mismatch = tampered_report.mismatch.expect("the read-back differs");
    assert_eq!((mismatch.request, mismatch.queue), (2, 3));
    assert!(mismatch.what.contains("bytes written differ"), "{mismatch}");
    assert_eq!(tampered_report.matched, 1);
    assert_eq!((fresh.matched, fresh.mismatch), (1, None));
    assert_eq!(other_image.mismatch.map(|m| m.request), Some(1));
}

#[test]
fn seeds_from_a_log_parse_as_the_logged_requests_in_the_fuzz_target() {
    let log = TempFile::new_with_prefix("/tmp/sluice-rq-").unwrap();
    record(log.as_path());
    let (_, requests) = read_log(log.as_path());
    let dir = std::env::temp_dir().join(format!("sluice-rq-corpus-{}", std::process::id()));

    let report = rerun(
        log.as_path(),
        &RerunOptions {
            image: None,
            corpus: Some(dir.clone()),
        },
    )
    .unwrap();

    assert_eq!(report.seeds, requests.len() as u64);
    let write = blk_request_seed(&requests[0], false).unwrap();
    match parse_request_for_fuzz(&write, false) {
        FuzzOutcome::Parsed(request) => {
            assert!(
                matches!(
                    request.kind,
                    RequestKind::Write {
                        sector: 8,
                        len: 4096,
                        ..
                    }
                ),
                "{request:?}"
            );
        }
        other => panic!("the logged write does not parse: {other:?}"),
    }
    let read_only = blk_request_seed(&requests[0], true).unwrap();
    assert_eq!(read_only[0], 1, "the fuzz target's read-only flag");
    assert!(matches!(
        parse_request_for_fuzz(&read_only, true),
        FuzzOutcome::Rejected(_)
    ));
    for entry in std::fs::read_dir(&dir).unwrap() {
        crate::block::fuzz::blk_request(&std::fs::read(entry.unwrap().path()).unwrap());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_reader_refuses_broken_logs_without_panicking() {
    let header = TraceHeader {
        capacity_sectors: 2048,
        block_size: 512,
        read_only: false,
        serial: [0; 20],
        queue_size: 64,
    };
    let good = encode_record(&TracedRequest {
        queue: 0,
        buffers: traffic()[0].clone(),
        answer: crate::block::trace::TracedAnswer {
            used_len: 1,
            status: Some(0),
            data_hash: 7,
        },
    });
    let mut flipped = good.clone();
    flipped[20] ^= 1;
    let mut huge = good.clone();
    huge[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut many = good.clone();
    many[16..18].copy_from_slice(&(MAX_BUFFERS as u16 + 1).to_le_bytes());
    let sum = fnv1a(&many[14..]);
    many[6..14].copy_from_slice(&sum.to_le_bytes());
    let mut version = encode_header(&header);
    version[8] = 2;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (flipped, "checksum"),
        (huge, "record of"),
        (good[..good.len() - 3].to_vec(), "truncated"),
        (many, "buffers (at most"),
    ];
    for (record, why) in cases {
        let mut bytes = encode_header(&header);
        bytes.extend_from_slice(&record);
        let mut reader = TraceReader::new(&bytes[..]).unwrap();
        let error = reader.next_request().unwrap_err().to_string();
        assert!(error.contains(why), "{why}: {error}");
    }
    assert!(matches!(
        TraceReader::new(&b"SLUICERR"[..]),
        Err(TraceError::Magic)
    ));
    assert!(matches!(
        TraceReader::new(&version[..]),
        Err(TraceError::Version(2))
    ));
    let mut bytes = encode_header(&header);
    bytes.extend_from_slice(&good);
    crate::block::fuzz::blk_trace(&bytes);
    let mut reader = TraceReader::new(&bytes[..]).unwrap();
    let decoded = reader.next_request().unwrap().unwrap();
    assert_eq!(encode_record(&decoded), good, "a record round-trips");
    assert!(reader.next_request().unwrap().is_none());
}
