//! The virtio-iommu request format (virtio 1.2 §5.13.6): a device-readable head and body, a
//! device-writable tail (and, for PROBE, the property buffer before it). Every field comes from
//! the guest: [`parse`] checks lengths, types and reserved fields and never panics.

/// Request types.
pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;

/// ATTACH flags: the domain lets its endpoints bypass translation (with F_BYPASS_CONFIG).
pub const ATTACH_F_BYPASS: u32 = 1;

/// MAP flags.
pub const MAP_F_READ: u32 = 1;
pub const MAP_F_WRITE: u32 = 2;
/// Memory-mapped I/O; only with VIRTIO_IOMMU_F_MMIO, which sluice does not offer.
pub const MAP_F_MMIO: u32 = 4;

/// Bytes of the request head (`type`, 3 reserved) and of the tail (`status`, 3 reserved).
pub const HEAD_LEN: usize = 4;
pub const TAIL_LEN: usize = 4;

/// Device-readable body lengths after the head.
const ATTACH_BODY: usize = 16;
const DETACH_BODY: usize = 16;
const MAP_BODY: usize = 32;
const UNMAP_BODY: usize = 24;
const PROBE_BODY: usize = 68;

/// The longest device-readable part of any request (PROBE's): what a handler reads.
pub const MAX_REQUEST_LEN: usize = HEAD_LEN + PROBE_BODY;

/// Probe property types and the RESV_MEM subtypes.
pub const PROBE_T_NONE: u16 = 0;
pub const PROBE_T_RESV_MEM: u16 = 1;
pub const RESV_MEM_T_RESERVED: u8 = 0;
pub const RESV_MEM_T_MSI: u8 = 1;
/// A RESV_MEM property: 4-byte header + subtype, 3 reserved, start, end.
pub const RESV_MEM_PROPERTY_LEN: usize = 4 + 20;

/// Request status codes (the tail's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
    DevErr = 3,
    Inval = 4,
    Range = 5,
    NoEnt = 6,
    Fault = 7,
    NoMem = 8,
}

/// One parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Attach {
        domain: u32,
        endpoint: u32,
        flags: u32,
    },
    Detach {
        domain: u32,
        endpoint: u32,
    },
    /// `virt_end` is inclusive, as on the wire.
    Map {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    },
    Probe {
        endpoint: u32,
    },
}

impl Request {
    /// The counter this request's type is counted in (see `device::COUNTER_NAMES`).
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Attach { .. } => "attach",
            Request::Detach { .. } => "detach",
            Request::Map { .. } => "map",
            Request::Unmap { .. } => "unmap",
            Request::Probe { .. } => "probe",
        }
    }
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    if let Some(field) = bytes.get(at..at + 4) {
        raw.copy_from_slice(field);
    }
    u32::from_le_bytes(raw)
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    if let Some(field) = bytes.get(at..at + 8) {
        raw.copy_from_slice(field);
    }
    u64::from_le_bytes(raw)
}

fn zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Parses the device-readable part of a request. An unknown type is UNSUPP; a part shorter
/// than its type's layout, or a non-zero reserved body field, is INVAL. Bytes past the layout
/// are ignored (a driver may pad).
pub fn parse(bytes: &[u8]) -> Result<Request, Status> {
    let Some(&kind) = bytes.first() else {
        return Err(Status::Inval);
    };
    if bytes.len() < HEAD_LEN {
        return Err(Status::Inval);
    }
    let body_len = match kind {
        T_ATTACH => ATTACH_BODY,
        T_DETACH => DETACH_BODY,
        T_MAP => MAP_BODY,
        T_UNMAP => UNMAP_BODY,
        T_PROBE => PROBE_BODY,
        _ => return Err(Status::Unsupp),
    };
    let body = bytes
        .get(HEAD_LEN..HEAD_LEN + body_len)
        .ok_or(Status::Inval)?;
    let request = match kind {
        T_ATTACH => {
            if !zero(&body[12..16]) {
                return Err(Status::Inval);
            }
            Request::Attach {
                domain: le32(body, 0),
                endpoint: le32(body, 4),
                flags: le32(body, 8),
            }
        }
        T_DETACH => {
            if !zero(&body[8..16]) {
                return Err(Status::Inval);
            }
            Request::Detach {
                domain: le32(body, 0),
                endpoint: le32(body, 4),
            }
        }
        T_MAP => Request::Map {
            domain: le32(body, 0),
            virt_start: le64(body, 4),
            virt_end: le64(body, 12),
            phys_start: le64(body, 20),
            flags: le32(body, 28),
        },
        T_UNMAP => {
            if !zero(&body[20..24]) {
                return Err(Status::Inval);
            }
            Request::Unmap {
                domain: le32(body, 0),
                virt_start: le64(body, 4),
                virt_end: le64(body, 12),
            }
        }
        _ => {
            if !zero(&body[4..]) {
                return Err(Status::Inval);
            }
            Request::Probe {
                endpoint: le32(body, 0),
            }
        }
    };
    Ok(request)
}

/// A RESV_MEM property for `start..=end` of `subtype`.
pub fn resv_mem_property(subtype: u8, start: u64, end: u64) -> [u8; RESV_MEM_PROPERTY_LEN] {
    let mut property = [0u8; RESV_MEM_PROPERTY_LEN];
    property[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
    // The length field counts the value, not the 4-byte header.
    property[2..4].copy_from_slice(&((RESV_MEM_PROPERTY_LEN - 4) as u16).to_le_bytes());
    property[4] = subtype;
    property[8..16].copy_from_slice(&start.to_le_bytes());
    property[16..24].copy_from_slice(&end.to_le_bytes());
    property
}

/// Encoders for tests and fuzz seeds: a request's device-readable bytes as a driver lays them out.
pub mod encode {
    use super::*;

    fn head(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![kind, 0, 0, 0];
        bytes.extend_from_slice(body);
        bytes
    }

    pub fn attach(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&domain.to_le_bytes());
        body.extend_from_slice(&endpoint.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
        head(T_ATTACH, &body)
    }

    pub fn detach(domain: u32, endpoint: u32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&domain.to_le_bytes());
        body.extend_from_slice(&endpoint.to_le_bytes());
        body.extend_from_slice(&[0; 8]);
        head(T_DETACH, &body)
    }

    pub fn map(
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&domain.to_le_bytes());
        body.extend_from_slice(&virt_start.to_le_bytes());
        body.extend_from_slice(&virt_end.to_le_bytes());
        body.extend_from_slice(&phys_start.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        head(T_MAP, &body)
    }

    pub fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&domain.to_le_bytes());
        body.extend_from_slice(&virt_start.to_le_bytes());
        body.extend_from_slice(&virt_end.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
        head(T_UNMAP, &body)
    }

    pub fn probe(endpoint: u32) -> Vec<u8> {
        let mut body = endpoint.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 64]);
        head(T_PROBE, &body)
    }
}
