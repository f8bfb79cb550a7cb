//! The bodies of the `blk_request` and `blk_trace` fuzz targets (fuzz/fuzz_targets/*.rs are
//! thin wrappers), here so that `cargo test` replays the committed corpora through them
//! (tests/fuzz_corpus.rs) without libFuzzer. `blk_trace` is below [`blk_request`].
//!
//! The input is the first 64 KiB of guest memory (descriptor table at 0x0, avail ring at 0x100;
//! see [`parse_request_for_fuzz`]); a first byte of 1 makes the disk read-only. Besides "never
//! panics", it checks what the device relies on afterwards: a parsed request only names guest
//! memory that exists, stays inside the 1 MiB disk, and never writes a read-only disk.

use super::request::{GuestBuffer, SECTOR_SIZE};
use super::{parse_request_for_fuzz, FuzzOutcome, Request, RequestKind};

/// Guest RAM and disk size of the fuzz setup in [`parse_request_for_fuzz`].
const MEMORY_END: u64 = 0x1_0000;
const DISK_BYTES: u64 = 2048 * SECTOR_SIZE;

/// Parses `data` as a request and panics if the result breaks an invariant above.
pub fn blk_request(data: &[u8]) {
    let read_only = data.first() == Some(&1);
    match parse_request_for_fuzz(data, read_only) {
        FuzzOutcome::NoChain => {}
        FuzzOutcome::Rejected(rejection) => {
            if let Some(status) = rejection.status_addr {
                assert!(
                    status.0 < MEMORY_END,
                    "status byte outside memory: {rejection:?}"
                );
            }
        }
        FuzzOutcome::Parsed(request) => check_parsed(&request, read_only),
    }
}

fn check_parsed(request: &Request, read_only: bool) {
    assert!(request.status_addr.0 < MEMORY_END, "{request:?}");
    match &request.kind {
        RequestKind::Read {
            sector,
            buffers,
            len,
        } => {
            assert_in_memory(buffers);
            assert_on_disk(*sector, *len);
        }
        RequestKind::Write {
            sector,
            buffers,
            len,
        } => {
            assert!(!read_only, "write accepted on a read-only disk");
            assert_in_memory(buffers);
            assert_on_disk(*sector, *len);
        }
        RequestKind::GetId { buffers, .. } => assert_in_memory(buffers),
        RequestKind::Flush => {}
        RequestKind::Discard(segments) | RequestKind::WriteZeroes(segments) => {
            assert!(
                !read_only,
                "discard/write-zeroes accepted on a read-only disk"
            );
            for s in segments {
                let end = s.offset().checked_add(s.len());
                assert!(end.is_some_and(|e| e <= DISK_BYTES), "{s:?}");
            }
        }
    }
}

fn assert_in_memory(buffers: &[GuestBuffer]) {
    for b in buffers {
        let end = b.addr.0.checked_add(u64::from(b.len));
        assert!(
            b.len > 0 && end.is_some_and(|end| end <= MEMORY_END),
            "buffer outside guest memory: {b:?}"
        );
    }
}

fn assert_on_disk(sector: u64, len: u64) {
    let end = sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|s| s.checked_add(len));
    assert!(
        len > 0 && len.is_multiple_of(SECTOR_SIZE) && end.is_some_and(|end| end <= DISK_BYTES),
        "range outside the disk: sector {sector} len {len}"
    );
}

/// Records decoded per `blk_trace` input (the rest of a longer input is not looked at).
const TRACE_RECORDS: usize = 256;

/// The `blk_trace` target: `data` as a request log (`requests=`, [`super::trace`]). Besides
/// "never panics": every record decoded stays inside the bounds (buffers, bytes), encodes back
/// to bytes that decode to the same record, and its `blk_request` seed (if it fits) parses
/// within that target's invariants.
///
/// An input starting with 0xff is *framed* by this body so mutations get past the checksums:
/// the 47-byte file header, then `[length u16][payload]...`, each payload wrapped in a record
/// with its tag, length and valid checksum.
pub fn blk_trace(data: &[u8]) {
    use super::trace::{encode_record, TraceReader, MAX_BUFFERS, MAX_CHAIN_BYTES};
    let framed;
    let data = match data.split_first() {
        Some((0xff, rest)) => {
            framed = crate::request_log::frame_fuzz_input(rest, super::trace::HEADER_BYTES);
            &framed[..]
        }
        _ => data,
    };
    let Ok(mut reader) = TraceReader::new(data) else {
        return;
    };
    let read_only = reader.header.read_only;
    for _ in 0..TRACE_RECORDS {
        let Ok(Some(request)) = reader.next_request() else {
            return;
        };
        assert!(request.buffers.len() <= MAX_BUFFERS, "{request:?}");
        let total: u64 = request.buffers.iter().map(|b| u64::from(b.len())).sum();
        assert!(total <= MAX_CHAIN_BYTES, "{total} bytes of buffers");
        let mut again = super::trace::encode_header(&reader.header);
        again.extend_from_slice(&encode_record(&request));
        let decoded = TraceReader::new(&again[..])
            .and_then(|mut r| r.next_request())
            .expect("an encoded record decodes");
        assert_eq!(decoded.as_ref(), Some(&request));
        if let Some(seed) = super::rerun::blk_request_seed(&request, read_only) {
            assert!(seed.len() <= MEMORY_END as usize);
            blk_request(&seed);
        }
    }
}
