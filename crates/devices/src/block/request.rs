//! Turns one descriptor chain into a validated block request (virtio 1.2 §5.2.6).
//!
//! The chain is guest-controlled, so this is the block device's attack surface and is kept a
//! pure function of (guest memory, chain, disk limits): it reads the header and discard segments
//! through the chain's reader (virtio-queue's `Reader` on split rings, sluice's cursor on packed
//! ones; both bound-check every readable buffer against the [`DmaSpace`]), checks every device-writable buffer with `check_range(.., Write)`, and returns
//! the data buffers as guest addresses. It never touches the image; the handler turns the buffers
//! into host iovecs only after they passed here.
//!
//! Layout accepted (VIRTIO_F_VERSION_1 implies ANY_LAYOUT, so buffer boundaries are free): all
//! device-readable descriptors first, then all device-writable ones. The readable stream is the
//! 16-byte header followed by OUT data or discard / write-zeroes segments; the writable stream is
//! IN data or the GET_ID buffer followed by the one status byte, which is the last byte of the
//! last descriptor.

use std::io::Read;

use sluice_dma::DmaSpace;
use sluice_virtio::{Chain, ChainReader};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

/// Bytes per virtio-blk sector, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header {type u32, reserved u32, sector u64}.
pub const HEADER_SIZE: usize = 16;
/// Size of one discard / write-zeroes segment {sector u64, num_sectors u32, flags u32}.
pub const SEGMENT_SIZE: usize = 16;
/// Length of the GET_ID serial string.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Status byte values written at the end of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    pub fn as_byte(self) -> u8 {
        // The spec's constants are small; truncation is exact.
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// What the parser must know about the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// Most data descriptors in one IN / OUT request (the `seg_max` config field).
    pub seg_max: u32,
    /// Most data bytes in one IN / OUT request.
    pub max_request_bytes: u64,
    pub max_discard_seg: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub max_write_zeroes_sectors: u32,
}

/// One guest buffer of a request (device address and length), bound-checked by the parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One discard / write-zeroes range, already checked against the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    /// Write zeroes may deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    pub unmap: bool,
}

impl Segment {
    pub fn offset(&self) -> u64 {
        // Cannot overflow: the parser checked sector + num_sectors <= capacity in bytes.
        self.sector * SECTOR_SIZE
    }

    pub fn len(&self) -> u64 {
        u64::from(self.num_sectors) * SECTOR_SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.num_sectors == 0
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at `sector` into the device-writable `buffers`.
    Read {
        sector: u64,
        buffers: Vec<GuestBuffer>,
        len: u64,
    },
    /// Write `len` bytes at `sector` from the device-readable `buffers`.
    Write {
        sector: u64,
        buffers: Vec<GuestBuffer>,
        len: u64,
    },
    Flush,
    /// Write up to 20 serial bytes into `buffers` (`len` bytes in total).
    GetId {
        buffers: Vec<GuestBuffer>,
        len: u64,
    },
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
}

/// A request and where its status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub status_addr: GuestAddress,
    /// The header's I/O priority (Linux ioprio: class in bits 13..16), a hint the scheduler
    /// of a shared backend uses (sluice-qos); any value is accepted.
    pub ioprio: u32,
}

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty descriptor chain")]
    EmptyChain,
    #[error("chain longer than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("the last descriptor is not a device-writable status byte")]
    MissingStatus,
    #[error("the status byte is outside device-writable memory")]
    StatusInaccessible,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("a buffer lies outside the memory the device may access")]
    BadBuffer,
    #[error("header shorter than {HEADER_SIZE} bytes")]
    HeaderTooShort,
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("data length {0} is not a positive multiple of 512")]
    BadDataLength(u64),
    #[error("request of {0} bytes exceeds the device limits")]
    TooLarge(u64),
    #[error("more than seg_max data buffers ({0})")]
    TooManyBuffers(usize),
    #[error("sector {sector} + {len} bytes is outside the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unexpected buffers for this request type")]
    UnexpectedBuffers,
    #[error("bad segment list ({0} bytes)")]
    BadSegmentList(usize),
    #[error("unsupported segment flags {0:#x}")]
    BadSegmentFlags(u32),
}

impl ParseError {
    /// The status the driver sees for this error.
    pub fn status(&self) -> Status {
        match self {
            ParseError::UnsupportedType(_) | ParseError::BadSegmentFlags(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// A refused chain: the error, and the status byte to report it in, if the chain has one the
/// device may write (otherwise the chain completes with a zero-length used entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub error: ParseError,
    pub status_addr: Option<GuestAddress>,
}

/// Hard cap on descriptors kept per chain, whatever the queue or indirect table size.
const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Parses and validates one chain.
/// `mem` is the space the chain was popped from.
pub fn parse_request(
    mem: &DmaSpace,
    chain: &Chain<'_>,
    limits: &DiskLimits,
) -> Result<Request, Rejection> {
    let layout =
        ChainLayout::collect(chain.descriptors()).map_err(|(error, status_addr)| Rejection {
            error,
            status_addr: status_addr.filter(|&addr| status_writable(mem, addr)),
        })?;
    let status_addr = layout.status_addr;
    if !status_writable(mem, status_addr) {
        return Err(Rejection {
            error: ParseError::StatusInaccessible,
            status_addr: None,
        });
    }
    parse_body(mem, chain, &layout, limits)
        .map(|(kind, ioprio)| Request {
            kind,
            status_addr,
            ioprio,
        })
        .map_err(|error| Rejection {
            error,
            status_addr: Some(status_addr),
        })
}

fn status_writable(mem: &DmaSpace, addr: GuestAddress) -> bool {
    mem.check_range(addr, 1, Permissions::Write)
}

/// The chain split into its readable and writable parts, status byte removed.
struct ChainLayout {
    readable: Vec<GuestBuffer>,
    /// Writable buffers without the final status byte.
    writable_data: Vec<GuestBuffer>,
    status_addr: GuestAddress,
}

type CollectError = (ParseError, Option<GuestAddress>);

impl ChainLayout {
    fn collect<I: Iterator<Item = Descriptor>>(descriptors: I) -> Result<Self, CollectError> {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut count = 0usize;
        let mut out_of_order = false;
        let mut last = None;
        for desc in descriptors {
            count += 1;
            last = Some(desc);
            if count > MAX_CHAIN_DESCRIPTORS {
                continue; // keep walking only to find the status byte
            }
            let buffer = GuestBuffer {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                writable.push(buffer);
            } else if writable.is_empty() {
                readable.push(buffer);
            } else {
                out_of_order = true;
            }
        }
        let last = last.ok_or((ParseError::EmptyChain, None))?;
        let status_addr = status_byte_of(&last);
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err((
                ParseError::TooManyDescriptors(MAX_CHAIN_DESCRIPTORS),
                status_addr,
            ));
        }
        if out_of_order {
            return Err((ParseError::ReadableAfterWritable, status_addr));
        }
        let status_addr = status_addr.ok_or((ParseError::MissingStatus, None))?;
        // The last descriptor is writable and non-empty here, so it is the last pushed.
        if let Some(tail) = writable.last_mut() {
            tail.len -= 1;
        }
        Ok(ChainLayout {
            readable: non_empty(readable),
            writable_data: non_empty(writable),
            status_addr,
        })
    }
}

/// The status byte of a chain whose last descriptor is `last`, if that can hold one.
fn status_byte_of(last: &Descriptor) -> Option<GuestAddress> {
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    last.addr().checked_add(u64::from(last.len()) - 1)
}

fn non_empty(buffers: Vec<GuestBuffer>) -> Vec<GuestBuffer> {
    buffers.into_iter().filter(|b| b.len > 0).collect()
}

fn total_len(buffers: &[GuestBuffer]) -> u64 {
    buffers.iter().map(|b| u64::from(b.len)).sum()
}

/// Drops the first `count` bytes of a buffer list.
fn skip_bytes(buffers: &[GuestBuffer], mut count: u64) -> Result<Vec<GuestBuffer>, ParseError> {
    let mut rest = Vec::with_capacity(buffers.len());
    for b in buffers {
        let len = u64::from(b.len);
        if count >= len {
            count -= len;
            continue;
        }
        let addr = b.addr.checked_add(count).ok_or(ParseError::BadBuffer)?;
        // count < len <= u32::MAX, so the difference fits.
        rest.push(GuestBuffer {
            addr,
            len: (len - count) as u32,
        });
        count = 0;
    }
    Ok(rest)
}

fn check_writable(mem: &DmaSpace, buffers: &[GuestBuffer]) -> Result<(), ParseError> {
    let all_ok = buffers
        .iter()
        .all(|b| mem.check_range(b.addr, b.len as usize, Permissions::Write));
    if all_ok {
        Ok(())
    } else {
        Err(ParseError::BadBuffer)
    }
}

fn check_range(limits: &DiskLimits, sector: u64, len: u64) -> Result<(), ParseError> {
    let out_of_range = ParseError::OutOfRange { sector, len };
    let end = sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(len))
        .ok_or(out_of_range.clone())?;
    let capacity = limits.capacity_sectors.saturating_mul(SECTOR_SIZE);
    if end > capacity {
        return Err(out_of_range);
    }
    Ok(())
}

fn check_data_length(
    limits: &DiskLimits,
    buffers: &[GuestBuffer],
    len: u64,
) -> Result<(), ParseError> {
    if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ParseError::BadDataLength(len));
    }
    if len > limits.max_request_bytes {
        return Err(ParseError::TooLarge(len));
    }
    if buffers.len() > limits.seg_max as usize {
        return Err(ParseError::TooManyBuffers(buffers.len()));
    }
    Ok(())
}

fn parse_body(
    mem: &DmaSpace,
    chain: &Chain<'_>,
    layout: &ChainLayout,
    limits: &DiskLimits,
) -> Result<(RequestKind, u32), ParseError> {
    // Reader::new resolves every readable buffer through the DmaSpace and fails on any that
    // is outside it, so OUT data and segments are bound-checked here too.
    let mut reader = chain.reader(mem).map_err(|_| ParseError::BadBuffer)?;
    let mut header = [0u8; HEADER_SIZE];
    reader
        .read_exact(&mut header)
        .map_err(|_| ParseError::HeaderTooShort)?;
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let ioprio = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let payload = skip_bytes(&layout.readable, HEADER_SIZE as u64)?;
    let writable = &layout.writable_data;
    check_writable(mem, writable)?;

    let kind = match request_type {
        VIRTIO_BLK_T_IN => {
            expect_empty(&payload)?;
            let len = total_len(writable);
            check_data_length(limits, writable, len)?;
            check_range(limits, sector, len)?;
            Ok(RequestKind::Read {
                sector,
                buffers: writable.clone(),
                len,
            })
        }
        VIRTIO_BLK_T_OUT => {
            expect_empty(writable)?;
            let len = total_len(&payload);
            check_data_length(limits, &payload, len)?;
            check_range(limits, sector, len)?;
            refuse_if_read_only(limits)?;
            Ok(RequestKind::Write {
                sector,
                buffers: payload,
                len,
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            expect_empty(&payload)?;
            expect_empty(writable)?;
            Ok(RequestKind::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            expect_empty(&payload)?;
            let len = total_len(writable);
            if len == 0 {
                return Err(ParseError::BadDataLength(0));
            }
            Ok(RequestKind::GetId {
                buffers: writable.clone(),
                len,
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            expect_empty(writable)?;
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            let segments = read_segments(&mut reader, total_len(&payload), limits, discard)?;
            refuse_if_read_only(limits)?;
            Ok(if discard {
                RequestKind::Discard(segments)
            } else {
                RequestKind::WriteZeroes(segments)
            })
        }
        other => Err(ParseError::UnsupportedType(other)),
    };
    kind.map(|kind| (kind, ioprio))
}

fn expect_empty(buffers: &[GuestBuffer]) -> Result<(), ParseError> {
    if buffers.is_empty() {
        Ok(())
    } else {
        Err(ParseError::UnexpectedBuffers)
    }
}

fn refuse_if_read_only(limits: &DiskLimits) -> Result<(), ParseError> {
    if limits.read_only {
        Err(ParseError::ReadOnly)
    } else {
        Ok(())
    }
}

fn read_segments(
    reader: &mut ChainReader<'_>,
    payload_len: u64,
    limits: &DiskLimits,
    discard: bool,
) -> Result<Vec<Segment>, ParseError> {
    let (max_seg, max_sectors) = if discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    let bad_list = ParseError::BadSegmentList(payload_len as usize);
    let count = payload_len / SEGMENT_SIZE as u64;
    if payload_len == 0
        || !payload_len.is_multiple_of(SEGMENT_SIZE as u64)
        || count > u64::from(max_seg)
    {
        return Err(bad_list);
    }
    let allowed_flags = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    let mut segments = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut raw = [0u8; SEGMENT_SIZE];
        reader.read_exact(&mut raw).map_err(|_| bad_list.clone())?;
        let sector = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        if flags & !allowed_flags != 0 {
            return Err(ParseError::BadSegmentFlags(flags));
        }
        if num_sectors > max_sectors {
            return Err(ParseError::TooLarge(u64::from(num_sectors) * SECTOR_SIZE));
        }
        check_range(limits, sector, u64::from(num_sectors) * SECTOR_SIZE)?;
        segments.push(Segment {
            sector,
            num_sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segments)
}

/// What [`parse_request_for_fuzz`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FuzzOutcome {
    /// No chain was available (the fuzz input's avail ring was empty or broken).
    NoChain,
    Parsed(Request),
    Rejected(Rejection),
}

/// Fuzz entry point: `bytes` become the first 64 KiB of guest memory, which holds a 16-entry
/// split queue (descriptor table at 0x0, avail ring at 0x100, used ring at 0x200); the avail
/// index is forced to 1 so exactly one chain (whose head the input chooses) is parsed against a
/// 1 MiB disk. Everything else — descriptors, indirect tables, header, segments — is the input.
pub fn parse_request_for_fuzz(bytes: &[u8], read_only: bool) -> FuzzOutcome {
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestMemoryMmap};

    const MEMORY_SIZE: usize = 0x1_0000;
    const QUEUE_SIZE: u16 = 16;
    let Ok(memory) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
        return FuzzOutcome::NoChain;
    };
    let len = bytes.len().min(MEMORY_SIZE);
    let ram_ok = memory.write_slice(&bytes[..len], GuestAddress(0)).is_ok()
        && memory.write_obj(1u16, GuestAddress(0x102)).is_ok();
    let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
        return FuzzOutcome::NoChain;
    };
    if !ram_ok {
        return FuzzOutcome::NoChain;
    }
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x100), Some(0));
    queue.set_used_ring_address(Some(0x200), Some(0));
    queue.set_ready(true);
    let space = sluice_dma::identity(memory);
    let limits = DiskLimits {
        capacity_sectors: 2048,
        read_only,
        seg_max: 14,
        max_request_bytes: 1 << 20,
        max_discard_seg: 4,
        max_discard_sectors: 2048,
        max_write_zeroes_seg: 4,
        max_write_zeroes_sectors: 2048,
    };
    let Ok(mut chains) = queue.iter(&space) else {
        return FuzzOutcome::NoChain;
    };
    match chains.next() {
        None => FuzzOutcome::NoChain,
        Some(chain) => match parse_request(&space, &Chain::Split(chain), &limits) {
            Ok(request) => FuzzOutcome::Parsed(request),
            Err(rejection) => FuzzOutcome::Rejected(rejection),
        },
    }
}
