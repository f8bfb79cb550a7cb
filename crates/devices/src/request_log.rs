//! The framing both device request logs share (virtio-blk's `block::trace`, NVMe's
//! `nvme::trace`; docs/replay.md "Device-level replay"): a file is a magic naming the device
//! kind, a version, a device-specific header, then records
//!
//! ```text
//! record = "RQ" | length u32 | checksum u64 (FNV-1a, bytewise, of the payload) | payload
//! ```
//!
//! written one `write` each by [`LogFile`] (so a VM that dies leaves whole records behind) and
//! read back by [`read_record`], which refuses a record over the caller's bound, a bad tag, a
//! bad checksum or a truncated record, naming the byte offset. Hand-written for the same
//! reason as the replay log (crates/vmm/src/replay/format.rs): it must be bounded against a
//! hostile file and needs no schema machinery.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// The format version both logs are at.
pub const VERSION: u32 = 1;
const RECORD_TAG: &[u8; 2] = b"RQ";
/// Tag, length and checksum.
pub const RECORD_HEAD_BYTES: u64 = 14;

/// Why a request log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("not a sluice request log (bad magic)")]
    Magic,
    #[error("request log version {0}; this sluice reads version {VERSION}")]
    Version(u32),
    #[error("record at byte {offset}: {what}")]
    Record { offset: u64, what: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// FNV-1a, 64-bit, bytewise.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `magic | version` (the start of every log's header).
pub fn encode_preamble(magic: &[u8; 8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(&VERSION.to_le_bytes());
    out
}

/// Checks `raw` (at least 12 bytes) starts with `magic` and this version.
pub fn check_preamble(raw: &[u8], magic: &[u8; 8]) -> Result<(), TraceError> {
    if raw.len() < 12 || &raw[..8] != magic {
        return Err(TraceError::Magic);
    }
    let version = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    if version != VERSION {
        return Err(TraceError::Version(version));
    }
    Ok(())
}

/// Frames `payload` as one record.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + RECORD_HEAD_BYTES as usize);
    out.extend_from_slice(RECORD_TAG);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv1a(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A fuzz input as a log whose checksums are right: its first `header_len` bytes as they
/// are, then `[length u16][payload]...`, each payload framed as a record (so mutations reach
/// the record decoders past the checksums).
pub fn frame_fuzz_input(input: &[u8], header_len: usize) -> Vec<u8> {
    let (header, mut body) = input.split_at(input.len().min(header_len));
    let mut out = header.to_vec();
    while let [lo, hi, tail @ ..] = body {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (payload, next) = tail.split_at(len);
        out.extend_from_slice(&frame(payload));
        body = next;
    }
    out
}

/// Reads the record at `*offset` (advanced past it): its checked payload, or `None` at a clean
/// end of file. A payload is then decoded by `decode`, whose error is reported at the record.
pub fn read_record<T>(
    input: &mut impl Read,
    offset: &mut u64,
    max_payload: u32,
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Option<T>, TraceError> {
    let at = *offset;
    let bad = |what: &str| TraceError::Record {
        offset: at,
        what: what.to_string(),
    };
    let mut head = [0u8; RECORD_HEAD_BYTES as usize];
    match read_full(input, &mut head)? {
        0 => return Ok(None),
        n if n == head.len() => {}
        _ => return Err(bad("truncated record header")),
    }
    if &head[..2] != RECORD_TAG {
        return Err(bad("bad record tag"));
    }
    let length = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
    if length > max_payload {
        return Err(bad(&format!("record of {length} bytes")));
    }
    let checksum = u64::from_le_bytes(head[6..14].try_into().unwrap_or_default());
    let mut payload = vec![0u8; length as usize];
    if read_full(input, &mut payload)? != payload.len() {
        return Err(bad("truncated record"));
    }
    if fnv1a(&payload) != checksum {
        return Err(bad("checksum mismatch"));
    }
    *offset += RECORD_HEAD_BYTES + u64::from(length);
    decode(&payload).map(Some).map_err(|what| bad(&what))
}

/// `read` until `buf` is full or end of file; returns the bytes read.
pub fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match input.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A cursor over a payload that never reads past its end.
pub struct Cursor<'a> {
    pub bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("record payload ends early".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    /// Refuses bytes left after the record's fields.
    pub fn finish(&self) -> Result<(), String> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err("bytes after the record's fields".into())
        }
    }
}

/// The log file a device's queues write to, one framed record per `write`.
pub struct LogFile {
    file: Mutex<File>,
    /// For the one error message (`virtio-blk`, `nvme`).
    device: &'static str,
    error_reported: AtomicBool,
}

impl LogFile {
    /// Creates the log at `path` starting with `header` (preamble included).
    pub fn create(path: &Path, header: &[u8], device: &'static str) -> io::Result<Arc<Self>> {
        let mut file = File::create(path)?;
        file.write_all(header)?;
        Ok(Arc::new(Self {
            file: Mutex::new(file),
            device,
            error_reported: AtomicBool::new(false),
        }))
    }

    /// Appends one record with `payload`; a failed write is reported once, not fatal.
    pub fn append(&self, payload: &[u8]) {
        let record = frame(payload);
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = file.write_all(&record) {
            if !self.error_reported.swap(true, Ordering::Relaxed) {
                tracing::error!("{} request log: cannot write: {e}", self.device);
            }
        }
    }
}
