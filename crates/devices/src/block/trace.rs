//! virtio-blk request logs (`--disk ...,requests=FILE`, docs/replay.md "Device-level replay"):
//! every chain the device answered, as the device read it, with the answer it gave — so the
//! requests can be re-run against the device model alone ([`super::rerun`]) and turned into
//! `blk_request` fuzz seeds.
//!
//! A record holds the chain's buffers in order (length, device-writable or not, and for a
//! device-readable buffer the bytes the device could read there; a buffer outside guest memory
//! is marked as such), and the answer: the used length, the status byte and an FNV-1a hash of
//! the bytes the used length says the device wrote before the status byte (a read's data,
//! GET_ID's serial). Indirect tables are followed and flattened: the record is the chain the
//! parser saw, not the ring layout that carried it. Records are written when the chain is
//! answered, so their order is the order of completion.
//!
//! The format is small and hand-written (like the replay log, crates/vmm/src/replay/format.rs)
//! because it must be bounded against a hostile file and needs no schema machinery:
//!
//!     file    = magic "SLUICEBQ" | version u32 (= 1) | capacity_sectors u64 | block_size u32
//!               | flags u8 (bit 0 read-only) | serial (20 bytes, GET_ID's answer)
//!               | queue_size u16 (the device's limits derive from it) | record*
//!     record  = "RQ" | length u32 | checksum u64 | payload (length bytes)
//!     payload = queue u16 | count u16 | buffer{count} | used_len u32 | status u16
//!               (0x100 | byte, or 0 when no status byte was written) | data_hash u64
//!     buffer  = len u32 | kind u8 (0 device-readable with its `len` bytes following,
//!               1 device-writable, 2 outside guest memory (readable), 3 outside (writable))
//!
//! Integers are little-endian. `checksum` is FNV-1a (64-bit, bytewise) of the payload. A
//! reader refuses a record over [`MAX_RECORD_BYTES`], a chain over [`MAX_BUFFERS`] buffers or
//! over [`MAX_CHAIN_BYTES`] bytes of buffers, and anything after a record that does not decode.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use sluice_dma::DmaSpace;
use sluice_virtio::Chain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

pub const MAGIC: &[u8; 8] = b"SLUICEBQ";
pub const VERSION: u32 = 1;
/// Buffers per logged chain; a longer chain is answered but not logged.
pub const MAX_BUFFERS: usize = 64;
/// Bytes of buffers (readable and writable) per logged chain.
pub const MAX_CHAIN_BYTES: u64 = 4 << 20;
/// Largest record a reader accepts.
pub const MAX_RECORD_BYTES: u32 = (MAX_CHAIN_BYTES as u32) + 4096;
const RECORD_TAG: &[u8; 2] = b"RQ";
const HEADER_BYTES: usize = 8 + 4 + 8 + 4 + 1 + 20 + 2;

/// What the device looked like (the first bytes of the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceHeader {
    pub capacity_sectors: u64,
    pub block_size: u32,
    pub read_only: bool,
    /// GET_ID's answer (zero-padded).
    pub serial: [u8; 20],
    pub queue_size: u16,
}

/// One buffer of a logged chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracedBuffer {
    /// Device-readable, with the bytes the device could read.
    Readable(Vec<u8>),
    /// Device-writable, of this many bytes.
    Writable(u32),
    /// A buffer of this length that did not lie in guest memory.
    Outside { len: u32, writable: bool },
}

impl TracedBuffer {
    pub fn len(&self) -> u32 {
        match self {
            TracedBuffer::Readable(bytes) => bytes.len() as u32,
            TracedBuffer::Writable(len) | TracedBuffer::Outside { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn writable(&self) -> bool {
        matches!(
            self,
            TracedBuffer::Writable(_) | TracedBuffer::Outside { writable: true, .. }
        )
    }
}

/// One answered chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedRequest {
    pub queue: u16,
    pub buffers: Vec<TracedBuffer>,
    pub answer: TracedAnswer,
}

/// What the device answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TracedAnswer {
    pub used_len: u32,
    /// The status byte, if one was written.
    pub status: Option<u8>,
    /// FNV-1a of the `used_len - 1` bytes the device wrote before the status byte.
    pub data_hash: u64,
}

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

/// Encodes the file header.
pub fn encode_header(header: &TraceHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&header.capacity_sectors.to_le_bytes());
    out.extend_from_slice(&header.block_size.to_le_bytes());
    out.push(u8::from(header.read_only));
    out.extend_from_slice(&header.serial);
    out.extend_from_slice(&header.queue_size.to_le_bytes());
    out
}

/// Encodes one record (tag, length, checksum, payload).
pub fn encode_record(request: &TracedRequest) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&request.queue.to_le_bytes());
    payload.extend_from_slice(&(request.buffers.len() as u16).to_le_bytes());
    for buffer in &request.buffers {
        payload.extend_from_slice(&buffer.len().to_le_bytes());
        match buffer {
            TracedBuffer::Readable(bytes) => {
                payload.push(0);
                payload.extend_from_slice(bytes);
            }
            TracedBuffer::Writable(_) => payload.push(1),
            TracedBuffer::Outside { writable, .. } => payload.push(2 + u8::from(*writable)),
        }
    }
    let answer = &request.answer;
    payload.extend_from_slice(&answer.used_len.to_le_bytes());
    let status = answer.status.map_or(0, |s| 0x100 | u16::from(s));
    payload.extend_from_slice(&status.to_le_bytes());
    payload.extend_from_slice(&answer.data_hash.to_le_bytes());
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.extend_from_slice(RECORD_TAG);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv1a(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Reads a request log record by record.
pub struct TraceReader<R: Read> {
    input: R,
    offset: u64,
    pub header: TraceHeader,
}

impl<R: Read> TraceReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self, TraceError> {
        let mut raw = [0u8; HEADER_BYTES];
        input.read_exact(&mut raw).map_err(|_| TraceError::Magic)?;
        if &raw[..8] != MAGIC {
            return Err(TraceError::Magic);
        }
        let version = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(TraceError::Version(version));
        }
        let header = TraceHeader {
            capacity_sectors: u64::from_le_bytes(raw[12..20].try_into().unwrap_or_default()),
            block_size: u32::from_le_bytes(raw[20..24].try_into().unwrap_or_default()),
            read_only: raw[24] & 1 != 0,
            serial: raw[25..45].try_into().unwrap_or_default(),
            queue_size: u16::from_le_bytes([raw[45], raw[46]]),
        };
        Ok(Self {
            input,
            offset: HEADER_BYTES as u64,
            header,
        })
    }

    /// The next record; `None` at a clean end of file.
    pub fn next_request(&mut self) -> Result<Option<TracedRequest>, TraceError> {
        let offset = self.offset;
        let bad = |what: &str| TraceError::Record {
            offset,
            what: what.to_string(),
        };
        let mut head = [0u8; 14];
        match read_full(&mut self.input, &mut head)? {
            0 => return Ok(None),
            14 => {}
            _ => return Err(bad("truncated record header")),
        }
        if &head[..2] != RECORD_TAG {
            return Err(bad("bad record tag"));
        }
        let length = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
        if length > MAX_RECORD_BYTES {
            return Err(bad(&format!("record of {length} bytes")));
        }
        let checksum = u64::from_le_bytes(head[6..14].try_into().unwrap_or_default());
        let mut payload = vec![0u8; length as usize];
        if read_full(&mut self.input, &mut payload)? != payload.len() {
            return Err(bad("truncated record"));
        }
        if fnv1a(&payload) != checksum {
            return Err(bad("checksum mismatch"));
        }
        self.offset += 14 + u64::from(length);
        decode_payload(&payload)
            .map(Some)
            .map_err(|what| bad(&what))
    }
}

/// `read` until `buf` is full or end of file; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
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
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("record payload ends early".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
}

fn decode_payload(payload: &[u8]) -> Result<TracedRequest, String> {
    let mut cursor = Cursor { bytes: payload };
    let queue = cursor.u16()?;
    let count = usize::from(cursor.u16()?);
    if count > MAX_BUFFERS {
        return Err(format!("{count} buffers (at most {MAX_BUFFERS})"));
    }
    let mut buffers = Vec::with_capacity(count);
    let mut total = 0u64;
    for _ in 0..count {
        let len = cursor.u32()?;
        total += u64::from(len);
        if total > MAX_CHAIN_BYTES {
            return Err(format!("buffers over {MAX_CHAIN_BYTES} bytes"));
        }
        let kind = cursor.take(1)?[0];
        buffers.push(match kind {
            0 => TracedBuffer::Readable(cursor.take(len as usize)?.to_vec()),
            1 => TracedBuffer::Writable(len),
            2 | 3 => TracedBuffer::Outside {
                len,
                writable: kind == 3,
            },
            _ => return Err(format!("unknown buffer kind {kind}")),
        });
    }
    let used_len = cursor.u32()?;
    let status = match cursor.u16()? {
        0 => None,
        s if s & 0xff00 == 0x100 => Some(s as u8),
        s => return Err(format!("bad status field {s:#x}")),
    };
    let data_hash = cursor.u64()?;
    if !cursor.bytes.is_empty() {
        return Err("bytes after the record's fields".into());
    }
    Ok(TracedRequest {
        queue,
        buffers,
        answer: TracedAnswer {
            used_len,
            status,
            data_hash,
        },
    })
}

/// The log file a device's queues write to (one record per write, so a VM that dies leaves
/// whole records behind).
pub struct RequestLog {
    file: Mutex<File>,
    error_reported: std::sync::atomic::AtomicBool,
}

impl RequestLog {
    /// Creates the log at `path` for a device of `header`'s shape.
    pub fn create(path: &Path, header: &TraceHeader) -> io::Result<Arc<Self>> {
        let mut file = File::create(path)?;
        file.write_all(&encode_header(header))?;
        Ok(Arc::new(Self {
            file: Mutex::new(file),
            error_reported: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn append(&self, request: &TracedRequest) {
        let record = encode_record(request);
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = file.write_all(&record) {
            if !self
                .error_reported
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::error!("virtio-blk request log: cannot write: {e}");
            }
        }
    }
}

/// One queue's side of the log: chains taken and not yet answered, by head.
pub(super) struct QueueTrace {
    log: Arc<RequestLog>,
    queue: u16,
    pending: HashMap<u16, PendingChain>,
}

/// A chain as the device read it, with where its writable buffers are.
struct PendingChain {
    buffers: Vec<TracedBuffer>,
    writable: Vec<(GuestAddress, u32)>,
}

impl QueueTrace {
    pub(super) fn new(log: Arc<RequestLog>, queue: u16) -> Self {
        Self {
            log,
            queue,
            pending: HashMap::new(),
        }
    }

    /// Notes `chain` as the device reads it (before the parser looks at it). A chain over the
    /// record bounds is answered but not logged.
    pub(super) fn taken(&mut self, mem: &DmaSpace, chain: &Chain<'_>) {
        let mut buffers = Vec::new();
        let mut writable = Vec::new();
        let mut total = 0u64;
        for descriptor in chain.descriptors() {
            let (addr, len) = (descriptor.addr(), descriptor.len());
            total += u64::from(len);
            if buffers.len() == MAX_BUFFERS || total > MAX_CHAIN_BYTES {
                self.pending.remove(&chain.head_index());
                return;
            }
            let is_writable =
                descriptor.flags() & virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16 != 0;
            buffers.push(if is_writable {
                // Only whether it resolves: its content is the device's to write.
                if mem.check_range(addr, len as usize, Permissions::Write) {
                    writable.push((addr, len));
                    TracedBuffer::Writable(len)
                } else {
                    TracedBuffer::Outside {
                        len,
                        writable: true,
                    }
                }
            } else {
                let mut bytes = vec![0u8; len as usize];
                match mem.read_slice(&mut bytes, addr) {
                    Ok(()) => TracedBuffer::Readable(bytes),
                    Err(_) => TracedBuffer::Outside {
                        len,
                        writable: false,
                    },
                }
            });
        }
        self.pending
            .insert(chain.head_index(), PendingChain { buffers, writable });
    }

    /// Logs the answer to the chain at `head`: `used_len`, and the status byte at
    /// `status_addr` if one was written.
    pub(super) fn answered(
        &mut self,
        mem: &DmaSpace,
        head: u16,
        used_len: u32,
        status_addr: Option<GuestAddress>,
    ) {
        let Some(chain) = self.pending.remove(&head) else {
            return;
        };
        let status = status_addr
            .filter(|_| used_len > 0)
            .and_then(|addr| mem.read_obj::<u8>(addr).ok());
        let data_hash = fnv1a(&written_bytes(
            mem,
            &chain.writable,
            used_len.saturating_sub(1),
        ));
        self.log.append(&TracedRequest {
            queue: self.queue,
            buffers: chain.buffers,
            answer: TracedAnswer {
                used_len,
                status,
                data_hash,
            },
        });
    }
}

/// The first `len` bytes of `buffers` (in chain order) as guest memory holds them now.
pub(super) fn written_bytes(mem: &DmaSpace, buffers: &[(GuestAddress, u32)], len: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut left = len as usize;
    for &(addr, buffer_len) in buffers {
        let n = left.min(buffer_len as usize);
        let mut bytes = vec![0u8; n];
        if mem.read_slice(&mut bytes, addr).is_err() {
            break;
        }
        out.extend_from_slice(&bytes);
        left -= n;
        if left == 0 {
            break;
        }
    }
    out
}
