//! The live-migration stream: framed, versioned messages, each with its own checksum.
//!
//! Every frame is a 20-byte header — magic `SLMG`, the message kind (one byte), three zero
//! bytes, the payload length (u32 LE), the FNV-1a checksum (over 64-bit words) of kind, length
//! and payload (u64 LE) — and the payload. The source sends `Hello` (format name, version, vCPUs, RAM size), any
//! number of `Pages` (a file offset in guest RAM and whole pages), `State` (the snapshot's
//! [`MachineState`] as JSON) and `End`; the destination answers `Ack` (the wall-clock time its
//! vCPUs resumed) once running, or closes the connection.
//!
//! Hand-written: the stream is a handful of message kinds whose payloads are either raw pages
//! (no serialisation framework should copy 4 KiB pages through a generic encoder) or the
//! snapshot's existing JSON; a serde binary format would add a dependency for the header alone.
//! The receiver trusts nothing: lengths are capped before anything is allocated, page runs must
//! lie inside RAM, the state must match the VM's shape, and a frame that fails its checksum, a
//! version it does not speak or a stream that ends early are refused with an error naming it.

use std::io::{self, Read, Write};

use crate::snapshot::MachineState;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SLMG";
/// The format name in `Hello`.
pub const FORMAT: [u8; 16] = *b"sluice-migration";
/// Bumped whenever the stream's layout changes; other versions are refused.
pub const VERSION: u32 = 1;
pub const PAGE_SIZE: u64 = 4096;
/// Largest page run one `Pages` frame carries.
pub const MAX_RUN_PAGES: usize = 256;
/// Largest payload accepted (the state is the biggest; pages are at most 1 MiB + 8).
pub const MAX_PAYLOAD: u32 = 16 << 20;
const HEADER_LEN: usize = 20;
const HELLO_LEN: usize = FORMAT.len() + 4 + 4 + 8;

/// Message kinds on the wire.
const KIND_HELLO: u8 = 1;
const KIND_PAGES: u8 = 2;
const KIND_STATE: u8 = 3;
const KIND_END: u8 = 4;
const KIND_ACK: u8 = 5;

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("migration stream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the migration stream ended early (truncated)")]
    Truncated,
    #[error("not a sluice migration stream (bad magic)")]
    BadMagic,
    #[error("corrupt migration frame (checksum mismatch)")]
    Corrupt,
    #[error("migration frame of {0} bytes is larger than the {MAX_PAYLOAD} allowed")]
    TooLarge(u32),
    #[error("not a sluice migration stream (format `{0}`)")]
    Format(String),
    #[error("migration stream version {found}, this sluice speaks version {VERSION}")]
    Version { found: u32 },
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("unexpected {found} message ({expected} expected)")]
    Unexpected {
        found: &'static str,
        expected: &'static str,
    },
    #[error("unknown migration message kind {0}")]
    UnknownKind(u8),
}

/// The stream's first message: what VM is coming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub cpus: u8,
    pub memory: u64,
}

/// One decoded message.
pub enum Message {
    Hello(Hello),
    /// Whole pages at this byte offset of the guest RAM file.
    Pages {
        offset: u64,
        data: Vec<u8>,
    },
    State(Box<MachineState>),
    End,
    /// The destination runs; its vCPUs resumed at this wall-clock time (ns since the epoch).
    Ack {
        resumed_unix_ns: u64,
    },
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Hello(hello) => write!(f, "Hello({hello:?})"),
            Message::Pages { offset, data } => write!(f, "Pages({offset:#x}+{:#x})", data.len()),
            Message::State(state) => write!(f, "State({} vCPUs)", state.cpus),
            Message::End => write!(f, "End"),
            Message::Ack { resumed_unix_ns } => write!(f, "Ack({resumed_unix_ns})"),
        }
    }
}

impl Message {
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => KIND_HELLO,
            Message::Pages { .. } => KIND_PAGES,
            Message::State(_) => KIND_STATE,
            Message::End => KIND_END,
            Message::Ack { .. } => KIND_ACK,
        }
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_HELLO => "hello",
        KIND_PAGES => "pages",
        KIND_STATE => "state",
        KIND_END => "end",
        KIND_ACK => "ack",
        _ => "unknown",
    }
}

/// FNV-1a over 64-bit little-endian words: the kind and length as one word, then the payload
/// (a short tail zero-padded) — a word at a time, so checksumming a megabyte of pages costs
/// about as much as copying it.
pub(crate) fn checksum(kind: u8, len: u32, payload: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |word: u64| {
        hash ^= word;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    };
    feed(u64::from(kind) | u64::from(len) << 8);
    let mut words = payload.chunks_exact(8);
    for word in &mut words {
        feed(u64::from_le_bytes(word.try_into().expect("8 bytes")));
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut word = [0u8; 8];
        word[..tail.len()].copy_from_slice(tail);
        feed(u64::from_le_bytes(word));
    }
    hash
}

/// Writes one frame.
pub fn write_frame(out: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&len| len <= MAX_PAYLOAD)
        .ok_or_else(|| io::Error::other("migration payload too large"))?;
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = kind;
    header[8..12].copy_from_slice(&len.to_le_bytes());
    header[12..20].copy_from_slice(&checksum(kind, len, payload).to_le_bytes());
    out.write_all(&header)?;
    out.write_all(payload)
}

pub fn send_hello(out: &mut impl Write, cpus: u8, memory: u64) -> io::Result<()> {
    let mut payload = Vec::with_capacity(HELLO_LEN);
    payload.extend_from_slice(&FORMAT);
    payload.extend_from_slice(&VERSION.to_le_bytes());
    payload.extend_from_slice(&u32::from(cpus).to_le_bytes());
    payload.extend_from_slice(&memory.to_le_bytes());
    write_frame(out, KIND_HELLO, &payload)
}

/// Sends `data` (whole pages) found at byte `offset` of the RAM file, in runs of at most
/// [`MAX_RUN_PAGES`].
pub fn send_pages(out: &mut impl Write, offset: u64, data: &[u8]) -> io::Result<()> {
    let run = MAX_RUN_PAGES * PAGE_SIZE as usize;
    for (index, chunk) in data.chunks(run).enumerate() {
        let mut payload = Vec::with_capacity(8 + chunk.len());
        payload.extend_from_slice(&(offset + (index * run) as u64).to_le_bytes());
        payload.extend_from_slice(chunk);
        write_frame(out, KIND_PAGES, &payload)?;
    }
    Ok(())
}

pub fn send_state(out: &mut impl Write, state: &MachineState) -> io::Result<()> {
    let body = serde_json::to_vec(state).map_err(io::Error::other)?;
    write_frame(out, KIND_STATE, &body)
}

pub fn send_end(out: &mut impl Write) -> io::Result<()> {
    write_frame(out, KIND_END, &[])
}

pub fn send_ack(out: &mut impl Write, resumed_unix_ns: u64) -> io::Result<()> {
    write_frame(out, KIND_ACK, &resumed_unix_ns.to_le_bytes())
}

/// Reads and checks one frame; a clean end of stream before the header is `Truncated` too
/// (every stream ends with `End`).
pub fn read_message(input: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    read_exact(input, &mut header)?;
    if header[..4] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let kind = header[4];
    let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let sum = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    read_exact(input, &mut payload)?;
    if header[5..8] != [0, 0, 0] || checksum(kind, len, &payload) != sum {
        return Err(ProtocolError::Corrupt);
    }
    decode(kind, payload)
}

fn read_exact(input: &mut impl Read, buf: &mut [u8]) -> Result<(), ProtocolError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })
}

fn malformed(kind: &'static str, reason: impl ToString) -> ProtocolError {
    ProtocolError::Malformed {
        kind,
        reason: reason.to_string(),
    }
}

fn decode(kind: u8, payload: Vec<u8>) -> Result<Message, ProtocolError> {
    match kind {
        KIND_HELLO => decode_hello(&payload).map(Message::Hello),
        KIND_PAGES => {
            if payload.len() < 8 || !(payload.len() - 8).is_multiple_of(PAGE_SIZE as usize) {
                return Err(malformed("pages", "not an offset and whole pages"));
            }
            let offset = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
            if !offset.is_multiple_of(PAGE_SIZE) {
                return Err(malformed("pages", format!("offset {offset:#x} unaligned")));
            }
            let mut data = payload;
            data.drain(..8);
            Ok(Message::Pages { offset, data })
        }
        KIND_STATE => serde_json::from_slice(&payload)
            .map(|state| Message::State(Box::new(state)))
            .map_err(|e| malformed("state", e)),
        KIND_END if payload.is_empty() => Ok(Message::End),
        KIND_END => Err(malformed("end", "has a payload")),
        KIND_ACK => payload
            .as_slice()
            .try_into()
            .map(|ns| Message::Ack {
                resumed_unix_ns: u64::from_le_bytes(ns),
            })
            .map_err(|_| malformed("ack", "not 8 bytes")),
        other => Err(ProtocolError::UnknownKind(other)),
    }
}

fn decode_hello(payload: &[u8]) -> Result<Hello, ProtocolError> {
    if payload.len() < FORMAT.len() + 4 || payload[..FORMAT.len()] != FORMAT {
        let shown = &payload[..payload.len().min(FORMAT.len())];
        return Err(ProtocolError::Format(
            String::from_utf8_lossy(shown).into_owned(),
        ));
    }
    let word = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
    let version = word(FORMAT.len());
    // The version is checked before the rest: a newer hello may be longer or shorter.
    if version != VERSION {
        return Err(ProtocolError::Version { found: version });
    }
    if payload.len() != HELLO_LEN {
        return Err(malformed("hello", format!("{} bytes", payload.len())));
    }
    let cpus = word(FORMAT.len() + 4);
    let memory = u64::from_le_bytes(payload[HELLO_LEN - 8..].try_into().expect("8 bytes"));
    let cpus = u8::try_from(cpus)
        .ok()
        .filter(|&c| c > 0)
        .ok_or_else(|| malformed("hello", format!("{cpus} vCPUs")))?;
    if memory == 0 || !memory.is_multiple_of(PAGE_SIZE) {
        return Err(malformed("hello", format!("{memory} bytes of RAM")));
    }
    Ok(Hello {
        version,
        cpus,
        memory,
    })
}

/// Reads the stream's `Hello`.
pub fn read_hello(input: &mut impl Read) -> Result<Hello, ProtocolError> {
    match read_message(input)? {
        Message::Hello(hello) => Ok(hello),
        other => Err(ProtocolError::Unexpected {
            found: other.name(),
            expected: "hello",
        }),
    }
}

/// Where received pages go (guest RAM; a buffer in tests and the fuzz target).
pub trait PageSink {
    /// Bytes of guest RAM.
    fn size(&self) -> u64;
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
}

/// Reads everything after `Hello` up to `End` into `ram`: pages, then the state, which must
/// describe a VM of `cpus` vCPUs and `ram.size()` bytes. Returns the state and the number of
/// pages received.
pub fn receive(
    input: &mut impl Read,
    cpus: u8,
    ram: &mut impl PageSink,
) -> Result<(MachineState, u64), ProtocolError> {
    let mut state = None;
    let mut pages = 0u64;
    loop {
        match read_message(input)? {
            Message::Pages { offset, data } if state.is_none() => {
                let fits = offset
                    .checked_add(data.len() as u64)
                    .is_some_and(|end| end <= ram.size());
                if !fits {
                    return Err(malformed(
                        "pages",
                        format!("{:#x}+{:#x} outside guest RAM", offset, data.len()),
                    ));
                }
                ram.write_at(offset, &data)?;
                pages += data.len() as u64 / PAGE_SIZE;
            }
            Message::State(received) if state.is_none() => {
                if received.cpus != cpus
                    || received.memory != ram.size()
                    || received.vcpus.len() != usize::from(cpus)
                {
                    return Err(malformed(
                        "state",
                        format!(
                            "{} vCPUs ({} states) and {} bytes of RAM, the VM has {cpus} and {}",
                            received.cpus,
                            received.vcpus.len(),
                            received.memory,
                            ram.size()
                        ),
                    ));
                }
                state = Some(*received);
            }
            Message::End => {
                return state
                    .map(|state| (state, pages))
                    .ok_or(ProtocolError::Unexpected {
                        found: "end",
                        expected: "state",
                    })
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    found: other.name(),
                    expected: if state.is_some() {
                        "end"
                    } else {
                        "pages or state"
                    },
                })
            }
        }
    }
}

/// A byte buffer as guest RAM.
impl PageSink for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let target = start
            .checked_add(data.len())
            .and_then(|end| self.get_mut(start..end))
            .ok_or_else(|| io::Error::other("outside the buffer"))?;
        target.copy_from_slice(data);
        Ok(())
    }
}
