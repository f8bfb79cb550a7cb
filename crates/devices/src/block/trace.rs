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
//! The record framing (tag, length, checksum) and the file writer are shared with NVMe's log
//! (`crate::request_log`). The format is small and hand-written (like the replay log, crates/vmm/src/replay/format.rs)
//! because it must be bounded against a hostile file and needs no schema machinery:
//!
//! ```text
//! file    = magic "SLUICEBQ" | version u32 (= 1) | capacity_sectors u64 | block_size u32
//!           | flags u8 (bit 0 read-only) | serial (20 bytes, GET_ID's answer)
//!           | queue_size u16 (the device's limits derive from it) | record*
//! record  = "RQ" | length u32 | checksum u64 | payload (length bytes)
//! payload = queue u16 | count u16 | buffer{count} | used_len u32 | status u16
//!           (0x100 | byte, or 0 when no status byte was written) | data_hash u64
//! buffer  = len u32 | kind u8 (0 device-readable with its `len` bytes following,
//!           1 device-writable, 2 outside guest memory (readable), 3 outside (writable))
//! ```
//!
//! Integers are little-endian. `checksum` is FNV-1a (64-bit, bytewise) of the payload. A
//! reader refuses a record over [`MAX_RECORD_BYTES`], a chain over [`MAX_BUFFERS`] buffers or
//! over [`MAX_CHAIN_BYTES`] bytes of buffers, and anything after a record that does not decode.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use sluice_dma::DmaSpace;
use sluice_virtio::Chain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::request_log::{self, Cursor, LogFile};

pub const MAGIC: &[u8; 8] = b"SLUICEBQ";
pub use crate::request_log::{fnv1a, TraceError, VERSION};
/// Buffers per logged chain; a longer chain is answered but not logged.
pub const MAX_BUFFERS: usize = 64;
/// Bytes of buffers (readable and writable) per logged chain.
pub const MAX_CHAIN_BYTES: u64 = 4 << 20;
/// Largest record a reader accepts.
pub const MAX_RECORD_BYTES: u32 = (MAX_CHAIN_BYTES as u32) + 4096;
pub(crate) const HEADER_BYTES: usize = 8 + 4 + 8 + 4 + 1 + 20 + 2;

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

/// Encodes the file header.
pub fn encode_header(header: &TraceHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES);
    out.extend_from_slice(&request_log::encode_preamble(MAGIC));
    out.extend_from_slice(&header.capacity_sectors.to_le_bytes());
    out.extend_from_slice(&header.block_size.to_le_bytes());
    out.push(u8::from(header.read_only));
    out.extend_from_slice(&header.serial);
    out.extend_from_slice(&header.queue_size.to_le_bytes());
    out
}

/// Encodes one record (tag, length, checksum, payload).
pub fn encode_record(request: &TracedRequest) -> Vec<u8> {
    request_log::frame(&encode_payload(request))
}

fn encode_payload(request: &TracedRequest) -> Vec<u8> {
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
    payload
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
        request_log::check_preamble(&raw, MAGIC)?;
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
        request_log::read_record(
            &mut self.input,
            &mut self.offset,
            MAX_RECORD_BYTES,
            decode_payload,
        )
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
    cursor.finish()?;
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

/// The log file a disk's queues write to.
pub struct RequestLog(Arc<LogFile>);

impl RequestLog {
    /// Creates the log at `path` for a device of `header`'s shape.
    pub fn create(path: &Path, header: &TraceHeader) -> io::Result<Arc<Self>> {
        LogFile::create(path, &encode_header(header), "virtio-blk").map(|f| Arc::new(Self(f)))
    }

    fn append(&self, request: &TracedRequest) {
        self.0.append(&encode_payload(request));
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
