//! NVMe request logs (`--nvme ...,requests=FILE`, docs/replay.md "Device-level replay"):
//! every I/O command the controller answered, with the data it read from guest memory and the
//! answer it gave, so the commands can be re-run against the NVM command execution path alone
//! ([`super::rerun`]) and turned into `nvme_command` fuzz seeds.
//!
//! A record holds the 64-byte SQE as the worker fetched it, the bytes the PRP/SGL walker
//! gathered for a command that moves data to the device (Write, Dataset Management), the
//! length of a Read's transfer, the completion's status and, for a Read, an FNV-1a hash of the
//! bytes it returned. Records are written when the completion is made (completion order, all
//! I/O queues into one file); the framing and the writer are `crate::request_log`'s, shared
//! with virtio-blk's log:
//!
//! ```text
//! file    = magic "SLUICENQ" | version u32 (= 1) | blocks u64 | block_shift u32 | record*
//! record  = "RQ" | length u32 | checksum u64 | payload
//! payload = qid u16 | sqe (64 bytes) | data u8 (0 none; 1 to the device: len u32 and its
//!           bytes; 2 from the device: len u32) | status u16 (SCT << 8 | SC)
//!           | data_hash u64 (FNV-1a of a successful read's bytes, else 0)
//! ```
//!
//! A reader refuses a record over [`MAX_RECORD_BYTES`], data over [`MAX_DATA_BYTES`], an
//! unknown data kind, a bad checksum, a truncated record and another version.

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use sluice_dma::DmaSpace;
use vm_memory::Bytes;

use super::command::{Command, Status};
use super::io::{Namespace, OPC_DATASET_MANAGEMENT, OPC_READ, OPC_WRITE};
use super::prp::{data_segments, Segments, WalkLimits};
use crate::request_log::{self, fnv1a, Cursor, LogFile, TraceError};

pub const MAGIC: &[u8; 8] = b"SLUICENQ";
/// Data bytes per record (a transfer is at most MDTS, 128 KiB with 4 KiB pages; the bound
/// leaves room for larger pages).
pub const MAX_DATA_BYTES: u32 = 4 << 20;
pub const MAX_RECORD_BYTES: u32 = MAX_DATA_BYTES + 128;
pub(crate) const HEADER_BYTES: usize = 8 + 4 + 8 + 4;
/// Bytes per Dataset Management range.
const DSM_RANGE_BYTES: usize = 16;

/// What the data pointer carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracedData {
    /// No data moved (Flush, Write Zeroes, a command refused before or by the walk).
    None,
    /// Bytes the walker gathered from guest memory (Write, Dataset Management).
    ToDevice(Vec<u8>),
    /// A Read's transfer length.
    FromDevice(u32),
}

/// One answered I/O command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedCommand {
    pub qid: u16,
    pub sqe: [u8; 64],
    pub data: TracedData,
    /// The completion's status field (SCT << 8 | SC).
    pub status: u16,
    /// FNV-1a of a successful read's bytes; 0 otherwise.
    pub data_hash: u64,
}

/// Encodes the file header for a namespace.
pub fn encode_header(ns: &Namespace) -> Vec<u8> {
    let mut out = request_log::encode_preamble(MAGIC);
    out.extend_from_slice(&ns.blocks.to_le_bytes());
    out.extend_from_slice(&ns.block_shift.to_le_bytes());
    out
}

/// Whether `bytes` start like an NVMe request log (for `sluice replay --device`).
pub fn is_nvme_log(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// A record's payload.
pub fn encode_payload(command: &TracedCommand) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    out.extend_from_slice(&command.qid.to_le_bytes());
    out.extend_from_slice(&command.sqe);
    match &command.data {
        TracedData::None => out.push(0),
        TracedData::ToDevice(bytes) => {
            out.push(1);
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        TracedData::FromDevice(len) => {
            out.push(2);
            out.extend_from_slice(&len.to_le_bytes());
        }
    }
    out.extend_from_slice(&command.status.to_le_bytes());
    out.extend_from_slice(&command.data_hash.to_le_bytes());
    out
}

/// One framed record.
pub fn encode_record(command: &TracedCommand) -> Vec<u8> {
    request_log::frame(&encode_payload(command))
}

fn decode_payload(payload: &[u8]) -> Result<TracedCommand, String> {
    let mut cursor = Cursor { bytes: payload };
    let qid = cursor.u16()?;
    let mut sqe = [0u8; 64];
    sqe.copy_from_slice(cursor.take(64)?);
    let data = match cursor.u8()? {
        0 => TracedData::None,
        kind @ (1 | 2) => {
            let len = cursor.u32()?;
            if len > MAX_DATA_BYTES {
                return Err(format!("{len} bytes of data (at most {MAX_DATA_BYTES})"));
            }
            if kind == 1 {
                TracedData::ToDevice(cursor.take(len as usize)?.to_vec())
            } else {
                TracedData::FromDevice(len)
            }
        }
        kind => return Err(format!("unknown data kind {kind}")),
    };
    let status = cursor.u16()?;
    let data_hash = cursor.u64()?;
    cursor.finish()?;
    Ok(TracedCommand {
        qid,
        sqe,
        data,
        status,
        data_hash,
    })
}

/// Reads an NVMe request log record by record.
pub struct NvmeTraceReader<R: Read> {
    input: R,
    offset: u64,
    pub namespace: Namespace,
}

impl<R: Read> NvmeTraceReader<R> {
    /// Reads and checks the header (a block size of 512 B to 64 KiB).
    pub fn new(mut input: R) -> Result<Self, TraceError> {
        let mut raw = [0u8; HEADER_BYTES];
        input.read_exact(&mut raw).map_err(|_| TraceError::Magic)?;
        request_log::check_preamble(&raw, MAGIC)?;
        let blocks = u64::from_le_bytes(raw[12..20].try_into().unwrap_or_default());
        let block_shift = u32::from_le_bytes(raw[20..24].try_into().unwrap_or_default());
        if !(9..=16).contains(&block_shift) || blocks.checked_mul(1 << block_shift).is_none() {
            return Err(TraceError::Record {
                offset: 12,
                what: format!("a namespace of {blocks} blocks of 2^{block_shift} bytes"),
            });
        }
        Ok(Self {
            input,
            offset: HEADER_BYTES as u64,
            namespace: Namespace {
                blocks,
                block_shift,
            },
        })
    }

    /// The next record; `None` at a clean end of file.
    pub fn next_command(&mut self) -> Result<Option<TracedCommand>, TraceError> {
        request_log::read_record(
            &mut self.input,
            &mut self.offset,
            MAX_RECORD_BYTES,
            decode_payload,
        )
    }
}

/// The log file a controller's I/O queue workers write to.
pub struct NvmeRequestLog(Arc<LogFile>);

impl NvmeRequestLog {
    /// Creates the log at `path` for `ns`.
    pub fn create(path: &Path, ns: &Namespace) -> io::Result<Arc<Self>> {
        LogFile::create(path, &encode_header(ns), "nvme").map(|f| Arc::new(Self(f)))
    }

    /// Logs `pending`'s answer: `status`, and for a read the hash of what it returned.
    pub(super) fn answered(&self, mem: &DmaSpace, pending: PendingCommand, status: Status) {
        let data_hash = if status.is_success() && !pending.returned.is_empty() {
            fnv1a(&gather(mem, &pending.returned).unwrap_or_default())
        } else {
            0
        };
        self.0.append(&encode_payload(&TracedCommand {
            qid: pending.qid,
            sqe: pending.sqe,
            data: pending.data,
            status: status.0,
            data_hash,
        }));
    }
}

/// A command taken and not yet answered.
#[derive(Debug)]
pub struct PendingCommand {
    qid: u16,
    sqe: [u8; 64],
    data: TracedData,
    /// Where a read's data goes (hashed when it completes).
    returned: Segments,
}

impl PendingCommand {
    /// Notes a command the parser accepted: walks its data pointer once more (the walk is a
    /// pure function of the command and guest memory) for the bytes a write or Dataset
    /// Management carries, or where a read's bytes go.
    pub fn accepted(
        mem: &DmaSpace,
        qid: u16,
        cmd: &Command,
        ns: &Namespace,
        limits: &WalkLimits,
    ) -> Self {
        let mut pending = Self::refused(qid, cmd);
        let Some(len) = transfer_len(cmd, ns) else {
            return pending;
        };
        let Ok(segments) = data_segments(mem, cmd, len, limits) else {
            return pending;
        };
        if cmd.opcode() == OPC_READ {
            pending.data = TracedData::FromDevice(len as u32);
            pending.returned = segments;
        } else if let Some(bytes) = gather(mem, &segments) {
            pending.data = TracedData::ToDevice(bytes);
        }
        pending
    }

    /// A command the parser refused (nothing moved).
    pub fn refused(qid: u16, cmd: &Command) -> Self {
        Self {
            qid,
            sqe: cmd.0,
            data: TracedData::None,
            returned: Vec::new(),
        }
    }
}

/// Bytes the data pointer of `cmd` describes, for the commands that move data.
pub fn transfer_len(cmd: &Command, ns: &Namespace) -> Option<usize> {
    let len = match cmd.opcode() {
        OPC_READ | OPC_WRITE => (u64::from(cmd.cdw(12) & 0xffff) + 1) << ns.block_shift,
        OPC_DATASET_MANAGEMENT => (u64::from(cmd.cdw(10) & 0xff) + 1) * DSM_RANGE_BYTES as u64,
        _ => return None,
    };
    usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_DATA_BYTES as usize)
}

/// The bytes of `segments` as guest memory holds them now.
fn gather(mem: &DmaSpace, segments: &Segments) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for &(addr, len) in segments {
        let start = out.len();
        out.resize(start + len, 0);
        mem.read_slice(&mut out[start..], addr).ok()?;
    }
    Some(out)
}
