//! Controller registers (NVMe 1.4 §3.1): offsets, the capabilities sluice advertises and the
//! validation of a Controller Configuration write.

/// Register offsets in BAR0.
pub const CAP: u64 = 0x00;
pub const VS: u64 = 0x08;
pub const INTMS: u64 = 0x0c;
pub const INTMC: u64 = 0x10;
pub const CC: u64 = 0x14;
pub const CSTS: u64 = 0x1c;
pub const NSSR: u64 = 0x20;
pub const AQA: u64 = 0x24;
pub const ASQ: u64 = 0x28;
pub const ACQ: u64 = 0x30;
/// Start of the doorbells.
pub const DOORBELLS: u64 = 0x1000;

/// NVMe 1.4.0.
pub const VERSION: u32 = 0x0001_0400;

/// Largest queue (entries, 0-based as CAP.MQES): 1024 entries.
pub const MQES: u16 = 1023;
/// CAP.DSTRD: doorbells 4 bytes apart.
pub const DSTRD: u32 = 0;
/// CAP.TO in 500 ms units: enabling and disabling are immediate here, 5 s is generous.
pub const TIMEOUT_UNITS: u64 = 10;
/// CAP.MPSMIN/MPSMAX: pages of 4 KiB to 64 KiB (the walkers take any power of two).
pub const MPS_MIN: u32 = 0;
pub const MPS_MAX: u32 = 4;
/// MDTS: 2^5 minimum pages per transfer (128 KiB with 4 KiB pages).
pub const MDTS: u8 = 5;

/// CC fields.
pub const CC_EN: u32 = 1;
const CC_CSS_SHIFT: u32 = 4;
const CC_MPS_SHIFT: u32 = 7;
const CC_AMS_SHIFT: u32 = 11;
const CC_SHN_SHIFT: u32 = 14;
const CC_IOSQES_SHIFT: u32 = 16;
const CC_IOCQES_SHIFT: u32 = 20;

/// CSTS fields.
pub const CSTS_RDY: u32 = 1;
pub const CSTS_CFS: u32 = 1 << 1;
pub const CSTS_SHST_MASK: u32 = 0x3 << 2;
pub const CSTS_SHST_COMPLETE: u32 = 0x2 << 2;

/// The capabilities register: MQES, contiguous queues required, timeout, stride, the NVM
/// command set, page sizes.
pub fn capabilities() -> u64 {
    u64::from(MQES)
        | 1 << 16 // CQR
        | TIMEOUT_UNITS << 24
        | u64::from(DSTRD) << 32
        | 1 << 37 // CSS: NVM command set
        | u64::from(MPS_MIN) << 48
        | u64::from(MPS_MAX) << 52
}

/// The fields of CC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Configuration(pub u32);

impl Configuration {
    pub fn enabled(self) -> bool {
        self.0 & CC_EN != 0
    }

    pub fn css(self) -> u32 {
        (self.0 >> CC_CSS_SHIFT) & 0x7
    }

    pub fn mps(self) -> u32 {
        (self.0 >> CC_MPS_SHIFT) & 0xf
    }

    pub fn ams(self) -> u32 {
        (self.0 >> CC_AMS_SHIFT) & 0x7
    }

    /// Shutdown notification (0 none, 1 normal, 2 abrupt).
    pub fn shn(self) -> u32 {
        (self.0 >> CC_SHN_SHIFT) & 0x3
    }

    pub fn iosqes(self) -> u32 {
        (self.0 >> CC_IOSQES_SHIFT) & 0xf
    }

    pub fn iocqes(self) -> u32 {
        (self.0 >> CC_IOCQES_SHIFT) & 0xf
    }

    /// Page size in bytes.
    pub fn page_size(self) -> u64 {
        1 << (12 + self.mps())
    }

    /// Whether the controller can start with these settings: the NVM command set (or admin
    /// only), round robin arbitration, a page size in CAP's range, entry sizes 0 (set later)
    /// or the only ones supported (64-byte SQ, 16-byte CQ entries).
    pub fn valid_for_enable(self) -> bool {
        matches!(self.css(), 0 | 7)
            && self.ams() == 0
            && (MPS_MIN..=MPS_MAX).contains(&self.mps())
            && matches!(self.iosqes(), 0 | 6)
            && matches!(self.iocqes(), 0 | 4)
    }
}

/// Admin queue sizes from AQA (entries, 2..=4096 each), or `None` if either is too small.
pub fn admin_queue_sizes(aqa: u32) -> Option<(u16, u16)> {
    let sq = (aqa & 0xfff) as u16 + 1;
    let cq = ((aqa >> 16) & 0xfff) as u16 + 1;
    (sq >= 2 && cq >= 2).then_some((sq, cq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_say_what_the_controller_does() {
        let cap = capabilities();

        assert_eq!(cap & 0xffff, 1023);
        assert_eq!((cap >> 16) & 1, 1, "contiguous queues required");
        assert_eq!((cap >> 37) & 0xff, 1, "NVM command set only");
        assert_eq!((cap >> 48) & 0xf, 0);
        assert_eq!((cap >> 52) & 0xf, 4);
    }

    #[test]
    fn configuration_is_validated_at_enable() {
        let linux = Configuration(CC_EN | 6 << 16 | 4 << 20);
        let bad_css = Configuration(CC_EN | 1 << 4);
        let bad_mps = Configuration(CC_EN | 5 << 7);
        let bad_ams = Configuration(CC_EN | 1 << 11);
        let bad_sqes = Configuration(CC_EN | 7 << 16);

        assert!(linux.valid_for_enable());
        assert_eq!(linux.page_size(), 4096);
        for bad in [bad_css, bad_mps, bad_ams, bad_sqes] {
            assert!(!bad.valid_for_enable(), "{bad:?}");
        }
        assert_eq!(admin_queue_sizes(0x001f_001f), Some((32, 32)));
        assert_eq!(admin_queue_sizes(0x001f_0000), None);
    }
}
