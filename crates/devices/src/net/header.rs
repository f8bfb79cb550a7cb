//! `virtio_net_hdr_v1` (virtio 1.2 §5.1.6): 12 little-endian bytes in front of every frame.
//!
//! TX headers come from the guest, so [`parse_tx_packet`] checks every field against what was
//! negotiated before the packet reaches the tap (the kernel would refuse some bad headers, but
//! not all, and the guest must not be able to ask for an offload it did not negotiate).

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Size of `virtio_net_hdr_v1` (VERSION_1 always carries `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Ethernet header: the shortest frame the tap accepts.
pub const ETH_HLEN: usize = 14;
/// Largest frame moved in either direction: a 64 KiB GSO packet plus Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65_535 + ETH_HLEN + 4;
/// Largest header + frame.
pub const MAX_PACKET_LEN: usize = NET_HDR_LEN + MAX_FRAME_LEN;

/// The fields of `virtio_net_hdr_v1`, in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl NetHeader {
    /// Decodes the first [`NET_HDR_LEN`] bytes; `None` if there are fewer.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; NET_HDR_LEN] = bytes.get(..NET_HDR_LEN)?.try_into().ok()?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        })
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Checks a driver-supplied header for a frame of `frame_len` bytes.
    pub fn validate_tx(&self, frame_len: usize, offloads: TxOffloads) -> Result<(), HeaderError> {
        let needs_csum = self.flags & NEEDS_CSUM != 0;
        if self.flags & !NEEDS_CSUM != 0 {
            return Err(HeaderError::UnknownFlags(self.flags));
        }
        if usize::from(self.hdr_len) > frame_len {
            return Err(HeaderError::HdrLenOutOfFrame);
        }
        if needs_csum {
            self.validate_checksum(frame_len, offloads)?;
        }
        self.validate_gso(needs_csum, offloads)
    }

    fn validate_checksum(&self, frame_len: usize, offloads: TxOffloads) -> Result<(), HeaderError> {
        if !offloads.csum {
            return Err(HeaderError::ChecksumNotNegotiated);
        }
        // The 16-bit checksum is stored at csum_start + csum_offset.
        let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
        if end > frame_len {
            return Err(HeaderError::ChecksumOutOfFrame);
        }
        Ok(())
    }

    fn validate_gso(&self, needs_csum: bool, offloads: TxOffloads) -> Result<(), HeaderError> {
        if self.gso_type & ECN != 0 {
            // HOST_ECN is never offered.
            return Err(HeaderError::GsoNotNegotiated(self.gso_type));
        }
        let negotiated = match self.gso_type {
            GSO_NONE => return Ok(()),
            GSO_TCPV4 => offloads.tso4,
            GSO_TCPV6 => offloads.tso6,
            // UDP fragmentation / USO are never offered.
            _ => false,
        };
        if !negotiated {
            return Err(HeaderError::GsoNotNegotiated(self.gso_type));
        }
        if !needs_csum {
            return Err(HeaderError::GsoWithoutChecksum);
        }
        if self.gso_size == 0 {
            return Err(HeaderError::GsoSizeZero);
        }
        Ok(())
    }
}

const NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
const ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;
const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;
const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;

/// The host-side (guest TX) offloads the driver negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
}

impl TxOffloads {
    /// Every TX offload the device can offer (for fuzzing the widest parser surface).
    pub const ALL: Self = Self {
        csum: true,
        tso4: true,
        tso6: true,
    };

    /// From negotiated features; TSO only counts together with CSUM.
    pub fn from_features(features: u64) -> Self {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        let csum = has(VIRTIO_NET_F_CSUM);
        Self {
            csum,
            tso4: csum && has(VIRTIO_NET_F_HOST_TSO4),
            tso6: csum && has(VIRTIO_NET_F_HOST_TSO6),
        }
    }
}

/// Why a TX packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("packet of {0} bytes is shorter than header + Ethernet header")]
    TooShort(usize),
    #[error("packet of {0} bytes exceeds the largest frame")]
    TooLong(usize),
    #[error("unknown header flags {0:#x}")]
    UnknownFlags(u8),
    #[error("hdr_len beyond the frame")]
    HdrLenOutOfFrame,
    #[error("checksum offload requested but VIRTIO_NET_F_CSUM not negotiated")]
    ChecksumNotNegotiated,
    #[error("csum_start + csum_offset beyond the frame")]
    ChecksumOutOfFrame,
    #[error("gso_type {0:#x} not negotiated")]
    GsoNotNegotiated(u8),
    #[error("segmentation offload without NEEDS_CSUM")]
    GsoWithoutChecksum,
    #[error("segmentation offload with gso_size 0")]
    GsoSizeZero,
}

/// Parses and validates a guest TX packet (header followed by the Ethernet frame).
///
/// Pure: safe to call with arbitrary bytes. Returns the header the device hands to the kernel
/// (`num_buffers` cleared: it has no meaning on TX).
pub fn parse_tx_packet(packet: &[u8], offloads: TxOffloads) -> Result<NetHeader, HeaderError> {
    if packet.len() < NET_HDR_LEN + ETH_HLEN {
        return Err(HeaderError::TooShort(packet.len()));
    }
    if packet.len() > MAX_PACKET_LEN {
        return Err(HeaderError::TooLong(packet.len()));
    }
    let header = NetHeader::from_bytes(packet).ok_or(HeaderError::TooShort(packet.len()))?;
    header.validate_tx(packet.len() - NET_HDR_LEN, offloads)?;
    Ok(NetHeader {
        num_buffers: 0,
        ..header
    })
}
