//! Transmit descriptors (legacy, context and data; manual §3.3) and how a finished frame
//! becomes a tap packet.
//!
//! A frame is the buffers of consecutive descriptors up to the one with EOP. The checksum and
//! segmentation offloads the 82540EM has (Linux's e1000 uses them: it enables HW_CSUM and TSO
//! for this MAC) are not done here by hand; they become the tap's `virtio_net_hdr`, so the host
//! kernel does them: TXSM → NEEDS_CSUM from TUCSS with the offset TUCSO − TUCSS; TSE → GSO
//! TCPv4 / TCPv6 with MSS and HDRLEN, after filling in what the hardware would fill per segment
//! (the IP length and the pseudo-header length, which the driver leaves 0). IXSM (the IPv4 header
//! checksum) and the legacy descriptor's CSO/CSS checksum are computed here. Every header the
//! guest builds this way is checked by the virtio-net parser (`NetHeader::validate_tx`) before
//! the kernel sees it; a frame that fails any check is dropped, not sent half-right.

use serde::{Deserialize, Serialize};

use crate::net::header::{ETH_HLEN, MAX_FRAME_LEN};
use crate::net::{NetHeader, TxOffloads, NET_HDR_LEN};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Legacy CMD / data DCMD bits.
const CMD_EOP: u8 = 1 << 0;
const CMD_IC: u8 = 1 << 2;
const CMD_RS: u8 = 1 << 3;
const CMD_TSE: u8 = 1 << 2;
const CMD_DEXT: u8 = 1 << 5;
const CMD_VLE: u8 = 1 << 6;
/// Context TUCMD bits.
const TUCMD_TCP: u8 = 1 << 0;
const TUCMD_IP: u8 = 1 << 1;
/// Data POPTS bits.
const POPTS_IXSM: u8 = 1 << 0;
const POPTS_TXSM: u8 = 1 << 1;
/// Status: descriptor done.
pub const STA_DD: u8 = 1 << 0;
/// Offset of the status byte inside a descriptor.
pub const STATUS_OFFSET: u64 = 12;
const DTYP_CONTEXT: u8 = 0;
const DTYP_DATA: u8 = 1;
const VLAN_TPID: u16 = 0x8100;

/// The offload context set by the last context descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    pub ipcss: u8,
    pub ipcso: u8,
    pub ipcse: u16,
    pub tucss: u8,
    pub tucso: u8,
    pub tucmd: u8,
    pub hdrlen: u8,
    pub mss: u16,
}

/// One decoded transmit descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    Legacy {
        addr: u64,
        len: u16,
        cso: u8,
        cmd: u8,
        css: u8,
        special: u16,
    },
    Context {
        context: Context,
        tucmd: u8,
    },
    Data {
        addr: u64,
        len: u32,
        dcmd: u8,
        popts: u8,
        special: u16,
    },
    /// DEXT with a descriptor type the 82540EM does not define: skipped.
    Unknown {
        cmd: u8,
    },
}

impl Descriptor {
    pub fn decode(raw: &[u8; 16]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        let addr = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
        let cmd = raw[11];
        if cmd & CMD_DEXT == 0 {
            return Descriptor::Legacy {
                addr,
                len: u16_at(8),
                cso: raw[10],
                cmd,
                css: raw[13],
                special: u16_at(14),
            };
        }
        match raw[10] >> 4 {
            DTYP_CONTEXT => Descriptor::Context {
                context: Context {
                    ipcss: raw[0],
                    ipcso: raw[1],
                    ipcse: u16_at(2),
                    tucss: raw[4],
                    tucso: raw[5],
                    tucmd: cmd,
                    hdrlen: raw[13],
                    mss: u16_at(14),
                },
                tucmd: cmd,
            },
            DTYP_DATA => Descriptor::Data {
                addr,
                len: u32::from_le_bytes([raw[8], raw[9], raw[10] & 0x0f, 0]),
                dcmd: cmd,
                popts: raw[13],
                special: u16_at(14),
            },
            _ => Descriptor::Unknown { cmd },
        }
    }

    /// Whether the driver asked for the status to be written back (RS).
    pub fn report_status(&self) -> bool {
        let cmd = match *self {
            Descriptor::Legacy { cmd, .. } => cmd,
            Descriptor::Context { tucmd, .. } => tucmd,
            Descriptor::Data { dcmd, .. } => dcmd,
            Descriptor::Unknown { cmd } => cmd,
        };
        cmd & CMD_RS != 0
    }
}

/// How the frame being assembled is to be finished (taken from its first descriptor).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct FrameOptions {
    extended: bool,
    tse: bool,
    ixsm: bool,
    txsm: bool,
    legacy_checksum: Option<(u8, u8)>,
    vlan: Option<u16>,
}

/// Why a frame was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum TxDrop {
    #[error("a buffer lies outside guest memory")]
    BadBuffer,
    #[error("the frame exceeds {MAX_FRAME_LEN} bytes")]
    TooLong,
    #[error("the frame is shorter than an Ethernet header")]
    TooShort,
    #[error("the offload context does not fit the frame")]
    BadOffload,
}

/// What one descriptor did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// More descriptors belong to the frame (or it was a context descriptor).
    Continue,
    /// The frame is complete: [`TxAssembler::packet`] holds header + frame.
    Frame,
    /// The frame ended and is dropped.
    Dropped(TxDrop),
}

/// Assembles frames from descriptors; keeps the offload context between frames.
#[derive(Debug)]
pub struct TxAssembler {
    context: Context,
    /// vnet header room, then the frame.
    packet: Vec<u8>,
    options: FrameOptions,
    in_frame: bool,
    failed: Option<TxDrop>,
}

impl Default for TxAssembler {
    fn default() -> Self {
        Self {
            context: Context::default(),
            packet: vec![0; NET_HDR_LEN],
            options: FrameOptions::default(),
            in_frame: false,
            failed: None,
        }
    }
}

/// A frame whose descriptors the driver had not all handed over when the VM was saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedFrame {
    options: FrameOptions,
    bytes: Vec<u8>,
    failed: Option<TxDrop>,
}

/// The assembler in a snapshot: the offload context (it outlives frames) and a frame in
/// progress, if any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedTx {
    context: Context,
    frame: Option<SavedFrame>,
}

impl TxAssembler {
    pub fn save(&self) -> SavedTx {
        SavedTx {
            context: self.context,
            frame: self.in_frame.then(|| SavedFrame {
                options: self.options,
                bytes: self.packet[NET_HDR_LEN..].to_vec(),
                failed: self.failed,
            }),
        }
    }

    /// The assembler [`TxAssembler::save`] described; a frame longer than any the assembler
    /// builds is refused.
    pub fn restored(saved: &SavedTx) -> Result<Self, String> {
        let mut tx = Self {
            context: saved.context,
            ..Self::default()
        };
        if let Some(frame) = &saved.frame {
            if frame.bytes.len() > MAX_FRAME_LEN {
                return Err(format!("a saved TX frame of {} bytes", frame.bytes.len()));
            }
            tx.packet.extend_from_slice(&frame.bytes);
            tx.options = frame.options;
            tx.failed = frame.failed;
            tx.in_frame = true;
        }
        Ok(tx)
    }

    /// Header + frame of the last completed frame (valid after [`Step::Frame`]).
    pub fn packet(&self) -> &[u8] {
        &self.packet
    }

    /// The frame part of [`TxAssembler::packet`].
    pub fn frame_len(&self) -> usize {
        self.packet.len() - NET_HDR_LEN
    }

    /// Forgets the frame in progress and the context (device reset).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Feeds one descriptor. `read` copies guest memory at an address into a buffer and says
    /// whether all of it existed; `vlan_enabled` is CTRL.VME.
    pub fn push(
        &mut self,
        descriptor: &Descriptor,
        vlan_enabled: bool,
        read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
    ) -> Step {
        let (addr, len, eop) = match *descriptor {
            Descriptor::Context { context, .. } => {
                self.context = context;
                return Step::Continue;
            }
            Descriptor::Unknown { .. } => return Step::Continue,
            Descriptor::Legacy {
                addr,
                len,
                cso,
                cmd,
                css,
                special,
            } => {
                if !self.in_frame {
                    self.options = FrameOptions {
                        legacy_checksum: (cmd & CMD_IC != 0).then_some((cso, css)),
                        vlan: (cmd & CMD_VLE != 0 && vlan_enabled).then_some(special),
                        ..FrameOptions::default()
                    };
                }
                (addr, len as usize, cmd & CMD_EOP != 0)
            }
            Descriptor::Data {
                addr,
                len,
                dcmd,
                popts,
                special,
            } => {
                if !self.in_frame {
                    self.options = FrameOptions {
                        extended: true,
                        tse: dcmd & CMD_TSE != 0,
                        ixsm: popts & POPTS_IXSM != 0,
                        txsm: popts & POPTS_TXSM != 0,
                        legacy_checksum: None,
                        vlan: (dcmd & CMD_VLE != 0 && vlan_enabled).then_some(special),
                    };
                }
                (addr, len as usize, dcmd & CMD_EOP != 0)
            }
        };
        self.in_frame = true;
        self.append(addr, len, read);
        if !eop {
            return Step::Continue;
        }
        self.in_frame = false;
        let outcome = match self.failed.take() {
            Some(why) => Err(why),
            None => self.finish(),
        };
        match outcome {
            Ok(()) => Step::Frame,
            Err(why) => {
                self.packet.truncate(NET_HDR_LEN);
                Step::Dropped(why)
            }
        }
    }

    /// Starts the next frame's bytes (call after a completed or dropped frame was handled).
    pub fn clear(&mut self) {
        self.packet.truncate(NET_HDR_LEN);
        self.packet[..NET_HDR_LEN].fill(0);
    }

    fn append(&mut self, addr: u64, len: usize, read: &mut dyn FnMut(u64, &mut [u8]) -> bool) {
        if self.failed.is_some() || len == 0 {
            return;
        }
        if self.frame_len() + len > MAX_FRAME_LEN {
            self.failed = Some(TxDrop::TooLong);
            return;
        }
        let start = self.packet.len();
        self.packet.resize(start + len, 0);
        if !read(addr, &mut self.packet[start..]) {
            self.failed = Some(TxDrop::BadBuffer);
        }
    }

    /// Applies VLAN insertion and the offloads to the complete frame and writes its header.
    fn finish(&mut self) -> Result<(), TxDrop> {
        if self.frame_len() < ETH_HLEN {
            return Err(TxDrop::TooShort);
        }
        if let Some(tci) = self.options.vlan {
            if self.frame_len() + 4 > MAX_FRAME_LEN {
                return Err(TxDrop::TooLong);
            }
            let at = NET_HDR_LEN + 12;
            let mut tag = [0u8; 4];
            tag[..2].copy_from_slice(&VLAN_TPID.to_be_bytes());
            tag[2..].copy_from_slice(&tci.to_be_bytes());
            self.packet.splice(at..at, tag);
        }
        let options = self.options;
        let context = self.context;
        let frame = &mut self.packet[NET_HDR_LEN..];
        let mut header = NetHeader::default();
        if let Some((cso, css)) = options.legacy_checksum {
            insert_checksum(frame, usize::from(css), frame.len(), usize::from(cso))?;
        }
        if options.extended {
            if options.tse {
                header = segmentation_header(frame, &context)?;
            } else if options.txsm {
                header = checksum_header(&context)?;
            }
            if options.ixsm && context.tucmd & TUCMD_IP != 0 {
                let end = usize::from(context.ipcse) + 1;
                let end = if context.ipcse == 0 { frame.len() } else { end };
                insert_checksum(
                    frame,
                    usize::from(context.ipcss),
                    end,
                    usize::from(context.ipcso),
                )?;
            }
        }
        header
            .validate_tx(frame.len(), TxOffloads::ALL)
            .map_err(|_| TxDrop::BadOffload)?;
        self.packet[..NET_HDR_LEN].copy_from_slice(&header.to_bytes());
        Ok(())
    }
}

/// NEEDS_CSUM from TUCSS, the checksum field at TUCSO.
fn checksum_header(context: &Context) -> Result<NetHeader, TxDrop> {
    let offset = context
        .tucso
        .checked_sub(context.tucss)
        .ok_or(TxDrop::BadOffload)?;
    Ok(NetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        csum_start: u16::from(context.tucss),
        csum_offset: u16::from(offset),
        ..NetHeader::default()
    })
}

/// TSE: GSO over TCP, after completing the fields the hardware fills per segment.
fn segmentation_header(frame: &mut [u8], context: &Context) -> Result<NetHeader, TxDrop> {
    if context.tucmd & TUCMD_TCP == 0 || context.mss == 0 {
        return Err(TxDrop::BadOffload);
    }
    let ipcss = usize::from(context.ipcss);
    let ipv4 = context.tucmd & TUCMD_IP != 0;
    let (length_at, length) = if ipv4 {
        (ipcss + 2, frame.len().checked_sub(ipcss))
    } else {
        (ipcss + 4, frame.len().checked_sub(ipcss + 40))
    };
    let length = length
        .and_then(|l| u16::try_from(l).ok())
        .ok_or(TxDrop::BadOffload)?;
    put_be16(frame, length_at, length)?;
    // The driver's pseudo-header sum leaves the TCP length out; the kernel's GSO expects it in.
    let tucss = usize::from(context.tucss);
    let tcp_length = frame
        .len()
        .checked_sub(tucss)
        .and_then(|l| u16::try_from(l).ok())
        .ok_or(TxDrop::BadOffload)?;
    let check_at = usize::from(context.tucso);
    let partial = get_be16(frame, check_at)?;
    put_be16(
        frame,
        check_at,
        fold(u32::from(partial) + u32::from(tcp_length)),
    )?;
    let mut header = checksum_header(context)?;
    header.gso_type = if ipv4 {
        VIRTIO_NET_HDR_GSO_TCPV4
    } else {
        VIRTIO_NET_HDR_GSO_TCPV6
    } as u8;
    header.gso_size = context.mss;
    header.hdr_len = u16::from(context.hdrlen);
    Ok(header)
}

fn get_be16(frame: &[u8], at: usize) -> Result<u16, TxDrop> {
    let bytes = frame.get(at..at + 2).ok_or(TxDrop::BadOffload)?;
    Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn put_be16(frame: &mut [u8], at: usize, value: u16) -> Result<(), TxDrop> {
    let bytes = frame.get_mut(at..at + 2).ok_or(TxDrop::BadOffload)?;
    bytes.copy_from_slice(&value.to_be_bytes());
    Ok(())
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    !fold(sum)
}

/// Stores the checksum of `frame[start..end]` at `at`. Like the hardware, the sum includes what
/// the driver left in the field (zero, or a pseudo-header seed).
fn insert_checksum(frame: &mut [u8], start: usize, end: usize, at: usize) -> Result<(), TxDrop> {
    let end = end.min(frame.len());
    if start >= end || at + 2 > frame.len() {
        return Err(TxDrop::BadOffload);
    }
    let sum = internet_checksum(&frame[start..end]);
    put_be16(frame, at, sum)
}
