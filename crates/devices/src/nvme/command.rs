//! Submission queue entries, completion queue entries and status codes (NVMe 1.4 §4.2, §4.6).

/// Bytes per submission queue entry (CC.IOSQES = 6).
pub const SQE_SIZE: u64 = 64;
/// Bytes per completion queue entry (CC.IOCQES = 4).
pub const CQE_SIZE: u64 = 16;

/// A 64-byte command as the driver wrote it. Every field is read through an accessor so that
/// the layout lives in one place; nothing here is trusted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Command(pub [u8; 64]);

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("opcode", &self.opcode())
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .finish_non_exhaustive()
    }
}

impl Command {
    fn dword(&self, index: usize) -> u32 {
        let at = index * 4;
        u32::from_le_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }

    fn qword(&self, index: usize) -> u64 {
        u64::from(self.dword(index)) | (u64::from(self.dword(index + 1)) << 32)
    }

    pub fn opcode(&self) -> u8 {
        self.0[0]
    }

    /// FUSE (CDW0 bits 9:8): fused operations are not supported.
    pub fn fuse(&self) -> u8 {
        self.0[1] & 0x3
    }

    /// PRP or SGL for data transfer (CDW0 bits 15:14).
    pub fn psdt(&self) -> u8 {
        self.0[1] >> 6
    }

    pub fn cid(&self) -> u16 {
        u16::from_le_bytes([self.0[2], self.0[3]])
    }

    pub fn nsid(&self) -> u32 {
        self.dword(1)
    }

    pub fn prp1(&self) -> u64 {
        self.qword(6)
    }

    pub fn prp2(&self) -> u64 {
        self.qword(8)
    }

    /// SGL entry 1 (the same bytes as PRP1 and PRP2).
    pub fn sgl1(&self) -> [u8; 16] {
        let mut sgl = [0u8; 16];
        sgl.copy_from_slice(&self.0[24..40]);
        sgl
    }

    /// Command dword 10..=15.
    pub fn cdw(&self, n: usize) -> u32 {
        debug_assert!((10..=15).contains(&n));
        self.dword(n)
    }

    /// CDW10..11 as one 64-bit value (the starting LBA of NVM commands).
    pub fn cdw10_11(&self) -> u64 {
        self.qword(10)
    }
}

/// A completion status: status code type (bits 10:8) and status code (bits 7:0), without the
/// phase tag. [`Status::field`] adds Do Not Retry to every error: retrying never helps here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

const SCT_COMMAND_SPECIFIC: u16 = 1 << 8;
const SCT_MEDIA: u16 = 2 << 8;
const DO_NOT_RETRY: u16 = 1 << 14;

impl Status {
    pub const SUCCESS: Status = Status(0x00);
    pub const INVALID_OPCODE: Status = Status(0x01);
    pub const INVALID_FIELD: Status = Status(0x02);
    pub const DATA_TRANSFER_ERROR: Status = Status(0x04);
    pub const INTERNAL_ERROR: Status = Status(0x06);
    pub const ABORTED_SQ_DELETION: Status = Status(0x08);
    pub const INVALID_NAMESPACE: Status = Status(0x0b);
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: Status = Status(0x0d);
    pub const INVALID_SGL_DESCRIPTOR_COUNT: Status = Status(0x0e);
    pub const DATA_SGL_LENGTH_INVALID: Status = Status(0x0f);
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status = Status(0x11);
    pub const PRP_OFFSET_INVALID: Status = Status(0x13);
    pub const LBA_OUT_OF_RANGE: Status = Status(0x80);
    pub const CAPACITY_EXCEEDED: Status = Status(0x81);

    pub const COMPLETION_QUEUE_INVALID: Status = Status(SCT_COMMAND_SPECIFIC);
    pub const INVALID_QUEUE_IDENTIFIER: Status = Status(SCT_COMMAND_SPECIFIC | 0x01);
    pub const INVALID_QUEUE_SIZE: Status = Status(SCT_COMMAND_SPECIFIC | 0x02);
    pub const AER_LIMIT_EXCEEDED: Status = Status(SCT_COMMAND_SPECIFIC | 0x05);
    pub const INVALID_INTERRUPT_VECTOR: Status = Status(SCT_COMMAND_SPECIFIC | 0x08);
    pub const INVALID_LOG_PAGE: Status = Status(SCT_COMMAND_SPECIFIC | 0x09);
    pub const INVALID_QUEUE_DELETION: Status = Status(SCT_COMMAND_SPECIFIC | 0x0c);
    pub const FEATURE_NOT_SAVEABLE: Status = Status(SCT_COMMAND_SPECIFIC | 0x0d);

    pub const WRITE_FAULT: Status = Status(SCT_MEDIA | 0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status(SCT_MEDIA | 0x81);

    pub fn is_success(self) -> bool {
        self == Status::SUCCESS
    }

    /// Status code type (0 generic, 1 command specific, 2 media).
    pub fn code_type(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Status code.
    pub fn code(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    /// The 15-bit status field of a completion entry (DW3 bits 31:17).
    pub fn field(self) -> u16 {
        if self.is_success() {
            0
        } else {
            self.0 | DO_NOT_RETRY
        }
    }

    /// Decodes a status field (the test driver's and the fuzz checks' view).
    pub fn from_field(field: u16) -> Status {
        Status(field & 0x7ff)
    }
}

/// A completion queue entry before the phase tag is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub result: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    pub status: Status,
}

impl Completion {
    pub fn new(cid: u16, status: Status, result: u32) -> Self {
        Completion {
            result,
            sq_head: 0,
            sq_id: 0,
            cid,
            status,
        }
    }

    /// The entry's bytes with phase tag `phase`.
    pub fn to_bytes(self, phase: bool) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&self.result.to_le_bytes());
        bytes[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        bytes[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.cid.to_le_bytes());
        let status = (self.status.field() << 1) | u16::from(phase);
        bytes[14..16].copy_from_slice(&status.to_le_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_from_their_dwords() {
        let mut raw = [0u8; 64];
        raw[0] = 0x02;
        raw[1] = 0x40; // PSDT 01
        raw[2..4].copy_from_slice(&0x1234u16.to_le_bytes());
        raw[4..8].copy_from_slice(&1u32.to_le_bytes());
        raw[24..32].copy_from_slice(&0xdead_b000u64.to_le_bytes());
        raw[40..48].copy_from_slice(&0x1_0000_0002u64.to_le_bytes());
        raw[48..52].copy_from_slice(&7u32.to_le_bytes());

        let cmd = Command(raw);

        assert_eq!(cmd.opcode(), 0x02);
        assert_eq!(cmd.psdt(), 1);
        assert_eq!(cmd.cid(), 0x1234);
        assert_eq!(cmd.nsid(), 1);
        assert_eq!(cmd.prp1(), 0xdead_b000);
        assert_eq!(cmd.cdw10_11(), 0x1_0000_0002);
        assert_eq!(cmd.cdw(12), 7);
    }

    #[test]
    fn completion_carries_phase_status_and_do_not_retry() {
        let mut entry = Completion::new(9, Status::LBA_OUT_OF_RANGE, 5);
        entry.sq_head = 3;
        entry.sq_id = 1;

        let bytes = entry.to_bytes(true);

        assert_eq!(u32::from_le_bytes(bytes[0..4].try_into().unwrap()), 5);
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 3);
        assert_eq!(u16::from_le_bytes([bytes[12], bytes[13]]), 9);
        let dw3 = u16::from_le_bytes([bytes[14], bytes[15]]);
        assert_eq!(dw3 & 1, 1);
        assert_eq!(Status::from_field(dw3 >> 1), Status::LBA_OUT_OF_RANGE);
        assert_ne!(dw3 & (DO_NOT_RETRY << 1), 0);
        assert_eq!(
            Completion::new(1, Status::SUCCESS, 0).to_bytes(false)[15],
            0
        );
    }
}
