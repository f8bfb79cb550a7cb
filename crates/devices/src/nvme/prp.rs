//! The data pointer walker: a command's PRP entries (PRP1, PRP2, PRP lists) or SGL descriptors
//! (data block, segment, last segment) turned into guest buffers of exactly the transfer's
//! length (NVMe 1.4 §4.3 and §4.4).
//!
//! Every rule the spec names is checked and mapped to its status: PRP1 dword aligned, every
//! later PRP entry (data pointers and list pointers to further list pages) page aligned, a
//! PRP2 list pointer qword aligned (a list may start mid-page; the last slot of each list page
//! points to the next page when more entries are needed); SGL descriptors with subtype 0
//! (address), segment lengths a positive multiple of 16, a segment descriptor only as the last
//! descriptor of a segment, no data after a last segment; the descriptors must describe at
//! least the transfer (`Data SGL Length Invalid`), bit buckets are not supported
//! (`SGL Descriptor Type Invalid`). The walk is bounded (pages per transfer by MDTS, SGL
//! segments by [`MAX_SGL_SEGMENTS`]), so a hostile list cannot loop it.
//!
//! The walker only reads the lists; the data buffers are resolved by the caller through the
//! device's `DmaSpace` (a buffer outside guest memory is a `Data Transfer Error` there).

use sluice_dma::DmaSpace;
use vm_memory::{Bytes, GuestAddress};

use super::command::{Command, Status};

/// SGL segments one command may chain (Linux uses one).
pub const MAX_SGL_SEGMENTS: usize = 16;
/// Descriptors in one SGL segment (a 4 KiB page of them).
pub const MAX_SGL_SEGMENT_DESCRIPTORS: usize = 256;
const SGL_DESCRIPTOR_SIZE: usize = 16;

const PSDT_PRP: u8 = 0;
const PSDT_SGL_CONTIGUOUS_METADATA: u8 = 1;
const PSDT_SGL_METADATA_SGL: u8 = 2;

const SGL_TYPE_DATA_BLOCK: u8 = 0x0;
const SGL_TYPE_BIT_BUCKET: u8 = 0x1;
const SGL_TYPE_SEGMENT: u8 = 0x2;
const SGL_TYPE_LAST_SEGMENT: u8 = 0x3;

/// Guest buffers `(address, length)` in transfer order.
pub type Segments = Vec<(GuestAddress, usize)>;

/// How the walker reads PRP lists and SGL segments.
#[derive(Debug, Clone, Copy)]
pub struct WalkLimits {
    /// CC.MPS page size in bytes (a power of two, at least 4096).
    pub page_size: u64,
    /// Largest transfer the controller takes (MDTS), in bytes.
    pub max_transfer: usize,
    /// Whether SGLs are allowed (I/O commands; admin commands over PCIe use PRPs only).
    pub allow_sgl: bool,
}

/// The buffers of `cmd`'s `len`-byte transfer.
pub fn data_segments(
    mem: &DmaSpace,
    cmd: &Command,
    len: usize,
    limits: &WalkLimits,
) -> Result<Segments, Status> {
    if len > limits.max_transfer {
        return Err(Status::INVALID_FIELD);
    }
    match cmd.psdt() {
        PSDT_PRP => prp_segments(mem, cmd.prp1(), cmd.prp2(), len, limits.page_size),
        PSDT_SGL_CONTIGUOUS_METADATA | PSDT_SGL_METADATA_SGL if limits.allow_sgl => {
            sgl_segments(mem, &cmd.sgl1(), len)
        }
        _ => Err(Status::INVALID_FIELD),
    }
}

/// Appends a buffer, merging it into the previous one when they touch (fewer iovecs).
fn push_segment(segments: &mut Segments, addr: u64, len: usize) {
    if len == 0 {
        return;
    }
    if let Some((last_addr, last_len)) = segments.last_mut() {
        if last_addr.0.checked_add(*last_len as u64) == Some(addr) {
            *last_len += len;
            return;
        }
    }
    segments.push((GuestAddress(addr), len));
}

fn read_u64(mem: &DmaSpace, addr: u64) -> Result<u64, Status> {
    mem.read_obj::<u64>(GuestAddress(addr))
        .map(u64::from_le)
        .map_err(|_| Status::DATA_TRANSFER_ERROR)
}

/// PRP1 + PRP2 (data pointer or list pointer) for `len` bytes with `page_size` pages.
pub fn prp_segments(
    mem: &DmaSpace,
    prp1: u64,
    prp2: u64,
    len: usize,
    page_size: u64,
) -> Result<Segments, Status> {
    let mut segments = Segments::new();
    if len == 0 {
        return Ok(segments);
    }
    let page_mask = page_size - 1;
    if prp1 & 0x3 != 0 {
        return Err(Status::PRP_OFFSET_INVALID);
    }
    let first = (page_size - (prp1 & page_mask)).min(len as u64);
    push_segment(&mut segments, prp1, first as usize);
    let mut remaining = len as u64 - first;
    if remaining == 0 {
        return Ok(segments);
    }
    if remaining <= page_size {
        if prp2 & page_mask != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        push_segment(&mut segments, prp2, remaining as usize);
        return Ok(segments);
    }
    if prp2 & 0x7 != 0 {
        return Err(Status::PRP_OFFSET_INVALID);
    }
    let mut entry = prp2;
    while remaining > 0 {
        let slots_left = (page_size - (entry & page_mask)) / 8;
        let value = read_u64(mem, entry)?;
        if value & page_mask != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        if slots_left == 1 && remaining > page_size {
            // The last slot of a list page points to the next list page (page aligned, so
            // each new page holds at least two entries and the walk always progresses).
            entry = value;
            continue;
        }
        let n = remaining.min(page_size);
        push_segment(&mut segments, value, n as usize);
        remaining -= n;
        entry = entry.checked_add(8).ok_or(Status::DATA_TRANSFER_ERROR)?;
    }
    Ok(segments)
}

/// One 16-byte SGL descriptor.
#[derive(Debug, Clone, Copy)]
struct SglDescriptor {
    addr: u64,
    len: u32,
    kind: u8,
    subtype: u8,
}

impl SglDescriptor {
    fn parse(bytes: &[u8]) -> Self {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[0..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[8..12]);
        SglDescriptor {
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes(len),
            kind: bytes[15] >> 4,
            subtype: bytes[15] & 0xf,
        }
    }

    fn is_segment(&self) -> bool {
        matches!(self.kind, SGL_TYPE_SEGMENT | SGL_TYPE_LAST_SEGMENT)
    }
}

/// Collects data blocks until `len` bytes are described.
struct SglWalk {
    segments: Segments,
    remaining: usize,
}

impl SglWalk {
    fn data_block(&mut self, desc: &SglDescriptor) -> Result<(), Status> {
        match desc.kind {
            SGL_TYPE_DATA_BLOCK if desc.subtype == 0 => {
                let n = (desc.len as usize).min(self.remaining);
                desc.addr
                    .checked_add(n as u64)
                    .ok_or(Status::DATA_TRANSFER_ERROR)?;
                push_segment(&mut self.segments, desc.addr, n);
                self.remaining -= n;
                Ok(())
            }
            SGL_TYPE_BIT_BUCKET => Err(Status::SGL_DESCRIPTOR_TYPE_INVALID),
            SGL_TYPE_SEGMENT | SGL_TYPE_LAST_SEGMENT => Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR),
            _ => Err(Status::SGL_DESCRIPTOR_TYPE_INVALID),
        }
    }
}

/// SGL entry 1 and the segments it chains, for `len` bytes.
pub fn sgl_segments(mem: &DmaSpace, sgl1: &[u8; 16], len: usize) -> Result<Segments, Status> {
    let mut walk = SglWalk {
        segments: Segments::new(),
        remaining: len,
    };
    let first = SglDescriptor::parse(sgl1);
    if !first.is_segment() {
        walk.data_block(&first)?;
    } else {
        walk_segments(mem, first, &mut walk)?;
    }
    if walk.remaining > 0 {
        return Err(Status::DATA_SGL_LENGTH_INVALID);
    }
    Ok(walk.segments)
}

fn walk_segments(mem: &DmaSpace, first: SglDescriptor, walk: &mut SglWalk) -> Result<(), Status> {
    let mut next = Some(first);
    let mut segments = 0;
    while let Some(segment) = next.take() {
        if walk.remaining == 0 {
            break;
        }
        segments += 1;
        if segments > MAX_SGL_SEGMENTS {
            return Err(Status::INVALID_SGL_DESCRIPTOR_COUNT);
        }
        if segment.subtype != 0 {
            return Err(Status::SGL_DESCRIPTOR_TYPE_INVALID);
        }
        let len = segment.len as usize;
        if len == 0 || !len.is_multiple_of(SGL_DESCRIPTOR_SIZE) {
            return Err(Status::INVALID_SGL_SEGMENT_DESCRIPTOR);
        }
        let count = len / SGL_DESCRIPTOR_SIZE;
        if count > MAX_SGL_SEGMENT_DESCRIPTORS {
            return Err(Status::INVALID_SGL_DESCRIPTOR_COUNT);
        }
        let mut bytes = vec![0u8; len];
        mem.read_slice(&mut bytes, GuestAddress(segment.addr))
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        let last_segment = segment.kind == SGL_TYPE_LAST_SEGMENT;
        for (i, raw) in bytes.chunks_exact(SGL_DESCRIPTOR_SIZE).enumerate() {
            let desc = SglDescriptor::parse(raw);
            if desc.is_segment() && i == count - 1 && !last_segment {
                next = Some(desc);
            } else {
                walk.data_block(&desc)?;
            }
        }
    }
    Ok(())
}
