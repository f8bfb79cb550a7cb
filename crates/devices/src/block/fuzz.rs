//! The body of the `blk_request` fuzz target (fuzz/fuzz_targets/blk_request.rs is a thin
//! wrapper), here so that `cargo test` replays the committed corpus through it
//! (tests/fuzz_corpus.rs) without libFuzzer.
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
