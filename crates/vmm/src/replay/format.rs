//! The record/replay log, version 1 (docs/replay.md is the specification; keep both in step).
//!
//! A file is the 8-byte magic `SLUICERR`, a u32 LE version, then chunks. A chunk is the 4-byte
//! magic `CHNK`, a kind byte (0 = the meta JSON, 1 = events), the payload length (u32 LE, at
//! most [`MAX_CHUNK`]) and the FNV-1a checksum (u64 LE, over 64-bit words: kind and length as
//! one word, then the payload; the migration stream's checksum) before the payload. The first
//! chunk is the meta chunk; every other chunk holds whole events:
//!
//! | tag | event | fields (varints are unsigned LEB128, at most 10 bytes) |
//! |---|---|---|
//! | 1 | `InitPage` | page (varint, RAM file page number), page encoding |
//! | 2 | `Exit` | kind (byte: 0 PIO in, 1 PIO out, 2 MMIO read, 3 MMIO write), address (varint), size (byte, 1..=8), the size bytes (value read or written), RIP (varint), register hash (u64 LE) |
//! | 3 | `DmaPage` | page (varint), page encoding |
//! | 4 | `Msi` | address (varint), data (varint, < 2^32) |
//! | 5 | `End` | outcome (byte: 0 power off, 1 reset, 2 debug exit, 3 other), value (varint), exits (varint), memory hash (u64 LE) |
//!
//! A page encoding is the XOR of the page's 4096 bytes with the page's previous image (the last
//! `DmaPage` of that page in the log, zeros for the first one and for every `InitPage`), as runs:
//! (zero bytes: varint, literal length: varint, literal bytes) until exactly 4096 bytes are
//! described. Reader and writer keep the same images, so an unchanged used-ring page costs a few
//! bytes and a disk read's page its data.
//!
//! Hand-written because the format is small and must be fuzzed as one parser: no crate offers
//! chunked, checksummed varint records, and compression crates would add a dependency for what
//! zero runs already do on this data.

use std::collections::HashMap;
use std::io::{self, Read, Write};

pub(crate) use crate::migration::protocol::checksum;

pub const MAGIC: &[u8; 8] = b"SLUICERR";
pub const VERSION: u32 = 1;
const CHUNK_MAGIC: &[u8; 4] = b"CHNK";
pub const KIND_META: u8 = 0;
pub const KIND_EVENTS: u8 = 1;
/// The largest chunk payload a reader accepts (a writer flushes at [`CHUNK_TARGET`]).
pub const MAX_CHUNK: u32 = 1 << 20;
/// A writer starts a new chunk once its payload reaches this.
const CHUNK_TARGET: usize = 64 << 10;
pub const PAGE_SIZE: usize = 4096;
/// Page images a reader keeps for XOR deltas: a hostile log cannot make it keep more than
/// this many (4 GiB of distinct pages).
const MAX_IMAGES: usize = 1 << 20;

const TAG_INIT_PAGE: u8 = 1;
const TAG_EXIT: u8 = 2;
const TAG_DMA_PAGE: u8 = 3;
const TAG_MSI: u8 = 4;
const TAG_END: u8 = 5;

/// The kind of a PIO/MMIO exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    PioIn,
    PioOut,
    MmioRead,
    MmioWrite,
}

impl ExitKind {
    fn code(self) -> u8 {
        match self {
            ExitKind::PioIn => 0,
            ExitKind::PioOut => 1,
            ExitKind::MmioRead => 2,
            ExitKind::MmioWrite => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => ExitKind::PioIn,
            1 => ExitKind::PioOut,
            2 => ExitKind::MmioRead,
            3 => ExitKind::MmioWrite,
            _ => return None,
        })
    }

    pub fn is_read(self) -> bool {
        matches!(self, ExitKind::PioIn | ExitKind::MmioRead)
    }
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExitKind::PioIn => "PIO in",
            ExitKind::PioOut => "PIO out",
            ExitKind::MmioRead => "MMIO read",
            ExitKind::MmioWrite => "MMIO write",
        })
    }
}

/// One PIO/MMIO exit: what the guest did and what it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitRecord {
    pub kind: ExitKind,
    pub addr: u64,
    /// The value read (reads) or written (writes), `data.len()` = access size, 1..=8.
    pub data: Vec<u8>,
    pub rip: u64,
    /// FNV-1a of the general registers and RFLAGS at the exit.
    pub regs_hash: u64,
}

/// How the recorded run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndRecord {
    /// 0 power off, 1 reset, 2 debug exit (value = the byte), 3 anything else.
    pub outcome: u8,
    pub value: u64,
    pub exits: u64,
    pub memory_hash: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Initial RAM (before the first instruction), one non-zero page.
    InitPage {
        page: u64,
        bytes: Box<[u8]>,
    },
    Exit(ExitRecord),
    /// A page a device wrote during the preceding exit, its content when the exit ended.
    DmaPage {
        page: u64,
        bytes: Box<[u8]>,
    },
    /// An MSI a device sent during the preceding exit.
    Msi {
        address: u64,
        data: u32,
    },
    End(EndRecord),
}

/// Why a log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read the log: {0}")]
    Io(#[from] io::Error),
    #[error("not a sluice record/replay log (bad magic)")]
    Magic,
    #[error("log format version {0}, this sluice reads version {VERSION}")]
    Version(u32),
    #[error("chunk at byte {offset}: {what}")]
    Chunk { offset: u64, what: String },
    #[error("chunk at byte {offset}: checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the log is corrupt")]
    Checksum {
        offset: u64,
        stored: u64,
        computed: u64,
    },
    #[error("event {index} (chunk at byte {offset}): {what}")]
    Event {
        index: u64,
        offset: u64,
        what: String,
    },
    #[error("the log has no meta chunk")]
    NoMeta,
    #[error("bad meta chunk: {0}")]
    Meta(String),
}

/// What a replay needs besides the events: the VM's shape and how its boot vCPU starts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogMeta {
    pub memory: u64,
    pub cpus: u8,
    /// Informational: the command line and devices of the recorded run.
    pub cmdline: String,
    pub devices: Vec<String>,
    /// The boot vCPU's entry point and protocol ("pvh" or "linux64") with its pointer.
    pub entry: u64,
    pub protocol: String,
    pub protocol_pointer: u64,
}

pub fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A cursor over one chunk's payload; every read is bounds-checked.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.data.get(self.at).ok_or("truncated event")?;
        self.at += 1;
        Ok(b)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).ok_or("length overflow")?;
        let slice = self.data.get(self.at..end).ok_or("truncated event")?;
        self.at = end;
        Ok(slice)
    }

    fn u64_le(&mut self) -> Result<u64, String> {
        let b = self.bytes(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "truncated")?))
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err("varint overflows 64 bits".into());
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }
}

/// XOR delta of `page` against `previous` as zero runs and literals.
fn encode_page(out: &mut Vec<u8>, page: &[u8], previous: Option<&[u8]>) {
    let delta = |i: usize| page[i] ^ previous.map_or(0, |p| p[i]);
    let mut i = 0;
    while i < PAGE_SIZE {
        let zero_start = i;
        while i < PAGE_SIZE && delta(i) == 0 {
            i += 1;
        }
        let literal_start = i;
        // A literal ends at a run of 8 zero bytes (shorter runs cost more to encode).
        let mut zeros = 0;
        while i < PAGE_SIZE && zeros < 8 {
            zeros = if delta(i) == 0 { zeros + 1 } else { 0 };
            i += 1;
        }
        let literal_end = i - zeros;
        i = literal_end;
        write_varint(out, (literal_start - zero_start) as u64);
        write_varint(out, (literal_end - literal_start) as u64);
        out.extend((literal_start..literal_end).map(delta));
    }
}

fn decode_page(cursor: &mut Cursor<'_>, previous: Option<&[u8]>) -> Result<Box<[u8]>, String> {
    let mut page = vec![0u8; PAGE_SIZE].into_boxed_slice();
    let mut at = 0usize;
    while at < PAGE_SIZE {
        let zeros = usize::try_from(cursor.varint()?).map_err(|_| "run too long")?;
        let literal = usize::try_from(cursor.varint()?).map_err(|_| "run too long")?;
        let end = at
            .checked_add(zeros)
            .and_then(|a| a.checked_add(literal))
            .filter(|&end| end <= PAGE_SIZE)
            .ok_or("page runs exceed 4096 bytes")?;
        if zeros == 0 && literal == 0 {
            return Err("empty page run".into());
        }
        let bytes = cursor.bytes(literal)?;
        page[at + zeros..end].copy_from_slice(bytes);
        at = end;
    }
    if let Some(previous) = previous {
        page.iter_mut().zip(previous).for_each(|(b, p)| *b ^= p);
    }
    Ok(page)
}

/// Hash of general registers, as recorded in [`ExitRecord::regs_hash`].
pub fn regs_hash(words: &[u64]) -> u64 {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    checksum(0, 0, &bytes)
}

/// Writes a log: events are encoded into chunks, each written with its checksum when full.
pub struct LogWriter<W: Write> {
    out: W,
    chunk: Vec<u8>,
    images: HashMap<u64, Box<[u8]>>,
    /// Bytes written so far (the log's size once finished).
    pub written: u64,
}

impl<W: Write> LogWriter<W> {
    pub fn new(mut out: W, meta: &LogMeta) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        let mut writer = Self {
            out,
            chunk: Vec::with_capacity(CHUNK_TARGET + PAGE_SIZE * 2),
            images: HashMap::new(),
            written: 12,
        };
        let json = serde_json::to_vec(meta).map_err(io::Error::other)?;
        writer.write_chunk(KIND_META, &json)?;
        Ok(writer)
    }

    fn write_chunk(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l <= MAX_CHUNK)
            .ok_or_else(|| io::Error::other("chunk too large"))?;
        self.out.write_all(CHUNK_MAGIC)?;
        self.out.write_all(&[kind])?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out
            .write_all(&checksum(kind, len, payload).to_le_bytes())?;
        self.out.write_all(payload)?;
        self.written += 17 + u64::from(len);
        Ok(())
    }

    /// Appends one event (written out once its chunk is full).
    pub fn push(&mut self, event: &Event) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.chunk);
        match event {
            Event::InitPage { page, bytes } => {
                buf.push(TAG_INIT_PAGE);
                write_varint(&mut buf, *page);
                encode_page(&mut buf, bytes, None);
            }
            Event::Exit(exit) => {
                buf.push(TAG_EXIT);
                buf.push(exit.kind.code());
                write_varint(&mut buf, exit.addr);
                buf.push(exit.data.len() as u8);
                buf.extend_from_slice(&exit.data);
                write_varint(&mut buf, exit.rip);
                buf.extend_from_slice(&exit.regs_hash.to_le_bytes());
            }
            Event::DmaPage { page, bytes } => {
                buf.push(TAG_DMA_PAGE);
                write_varint(&mut buf, *page);
                encode_page(&mut buf, bytes, self.images.get(page).map(|b| &b[..]));
                self.images.insert(*page, bytes.clone());
            }
            Event::Msi { address, data } => {
                buf.push(TAG_MSI);
                write_varint(&mut buf, *address);
                write_varint(&mut buf, u64::from(*data));
            }
            Event::End(end) => {
                buf.push(TAG_END);
                buf.push(end.outcome);
                write_varint(&mut buf, end.value);
                write_varint(&mut buf, end.exits);
                buf.extend_from_slice(&end.memory_hash.to_le_bytes());
            }
        }
        self.chunk = buf;
        if self.chunk.len() >= CHUNK_TARGET {
            self.flush_chunk()?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.chunk);
        self.write_chunk(KIND_EVENTS, &chunk)?;
        self.chunk = chunk;
        self.chunk.clear();
        Ok(())
    }

    /// Writes the last chunk and flushes the output.
    pub fn finish(&mut self) -> io::Result<()> {
        self.flush_chunk()?;
        self.out.flush()
    }
}

/// Reads a log event by event, verifying each chunk's checksum before decoding it.
pub struct LogReader<R: Read> {
    input: R,
    offset: u64,
    chunk: Vec<u8>,
    chunk_offset: u64,
    at: usize,
    images: HashMap<u64, Box<[u8]>>,
    events: u64,
    pub meta: LogMeta,
}

impl<R: Read> LogReader<R> {
    pub fn new(mut input: R) -> Result<Self, LogError> {
        let mut head = [0u8; 12];
        input.read_exact(&mut head).map_err(|_| LogError::Magic)?;
        if &head[..8] != MAGIC {
            return Err(LogError::Magic);
        }
        let version = u32::from_le_bytes(head[8..].try_into().map_err(|_| LogError::Magic)?);
        if version != VERSION {
            return Err(LogError::Version(version));
        }
        let mut reader = Self {
            input,
            offset: 12,
            chunk: Vec::new(),
            chunk_offset: 0,
            at: 0,
            images: HashMap::new(),
            events: 0,
            meta: LogMeta {
                memory: 0,
                cpus: 0,
                cmdline: String::new(),
                devices: Vec::new(),
                entry: 0,
                protocol: String::new(),
                protocol_pointer: 0,
            },
        };
        match reader.read_chunk()? {
            Some(KIND_META) => {}
            _ => return Err(LogError::NoMeta),
        }
        reader.meta =
            serde_json::from_slice(&reader.chunk).map_err(|e| LogError::Meta(e.to_string()))?;
        reader.chunk.clear();
        Ok(reader)
    }

    /// Reads the next chunk into `self.chunk`; None at a clean end of file.
    fn read_chunk(&mut self) -> Result<Option<u8>, LogError> {
        let offset = self.offset;
        let chunk_err = |what: &str| LogError::Chunk {
            offset,
            what: what.into(),
        };
        let mut head = [0u8; 17];
        let mut got = 0;
        while got < head.len() {
            match self.input.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(chunk_err("truncated chunk header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if &head[..4] != CHUNK_MAGIC {
            return Err(chunk_err("bad chunk magic"));
        }
        let kind = head[4];
        let len = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
        let stored = u64::from_le_bytes(head[9..17].try_into().map_err(|_| chunk_err("header"))?);
        if len > MAX_CHUNK {
            return Err(chunk_err(&format!(
                "payload of {len} bytes (at most {MAX_CHUNK})"
            )));
        }
        if kind != KIND_META && kind != KIND_EVENTS {
            return Err(chunk_err(&format!("unknown chunk kind {kind}")));
        }
        self.chunk.clear();
        self.chunk.resize(len as usize, 0);
        self.input
            .read_exact(&mut self.chunk)
            .map_err(|_| chunk_err("truncated payload"))?;
        let computed = checksum(kind, len, &self.chunk);
        if computed != stored {
            return Err(LogError::Checksum {
                offset,
                stored,
                computed,
            });
        }
        self.chunk_offset = offset;
        self.offset += 17 + u64::from(len);
        self.at = 0;
        Ok(Some(kind))
    }

    /// The next event; None at the end of the log.
    pub fn next_event(&mut self) -> Result<Option<Event>, LogError> {
        while self.at >= self.chunk.len() {
            match self.read_chunk()? {
                None => return Ok(None),
                Some(KIND_EVENTS) => {}
                Some(_) => {
                    return Err(LogError::Chunk {
                        offset: self.chunk_offset,
                        what: "a second meta chunk".into(),
                    })
                }
            }
        }
        let mut cursor = Cursor {
            data: &self.chunk,
            at: self.at,
        };
        let event =
            decode_event(&mut cursor, &mut self.images).map_err(|what| LogError::Event {
                index: self.events,
                offset: self.chunk_offset,
                what,
            })?;
        self.at = cursor.at;
        self.events += 1;
        Ok(Some(event))
    }
}

/// Re-encodes the log `input` into `output` with `edit` applied to each event (by index), new
/// checksums included: how the tests tamper with a log the way a careful attacker would.
pub fn rewrite(
    input: &[u8],
    output: &mut Vec<u8>,
    mut edit: impl FnMut(u64, &mut Event),
) -> Result<(), LogError> {
    let mut reader = LogReader::new(input)?;
    let mut writer = LogWriter::new(&mut *output, &reader.meta)?;
    let mut index = 0;
    while let Some(mut event) = reader.next_event()? {
        edit(index, &mut event);
        writer.push(&event)?;
        index += 1;
    }
    writer.finish()?;
    Ok(())
}

fn decode_event(
    cursor: &mut Cursor<'_>,
    images: &mut HashMap<u64, Box<[u8]>>,
) -> Result<Event, String> {
    Ok(match cursor.byte()? {
        TAG_INIT_PAGE => {
            let page = cursor.varint()?;
            Event::InitPage {
                page,
                bytes: decode_page(cursor, None)?,
            }
        }
        TAG_EXIT => {
            let kind = cursor.byte()?;
            let kind = ExitKind::from_code(kind).ok_or(format!("unknown exit kind {kind}"))?;
            let addr = cursor.varint()?;
            let size = cursor.byte()?;
            if !(1..=8).contains(&size) {
                return Err(format!("access size {size} (1..=8)"));
            }
            let data = cursor.bytes(usize::from(size))?.to_vec();
            let rip = cursor.varint()?;
            let regs_hash = cursor.u64_le()?;
            Event::Exit(ExitRecord {
                kind,
                addr,
                data,
                rip,
                regs_hash,
            })
        }
        TAG_DMA_PAGE => {
            let page = cursor.varint()?;
            let bytes = decode_page(cursor, images.get(&page).map(|b| &b[..]))?;
            if images.len() >= MAX_IMAGES && !images.contains_key(&page) {
                return Err(format!("more than {MAX_IMAGES} distinct device pages"));
            }
            images.insert(page, bytes.clone());
            Event::DmaPage { page, bytes }
        }
        TAG_MSI => {
            let address = cursor.varint()?;
            let data = u32::try_from(cursor.varint()?).map_err(|_| "MSI data over 32 bits")?;
            Event::Msi { address, data }
        }
        TAG_END => Event::End(EndRecord {
            outcome: cursor.byte()?,
            value: cursor.varint()?,
            exits: cursor.varint()?,
            memory_hash: cursor.u64_le()?,
        }),
        tag => return Err(format!("unknown event tag {tag}")),
    })
}

#[cfg(test)]
mod tests;
