//! VT-d register offsets and the capability words this model advertises (Intel VT-d
//! specification, chapter 11). Every value here is what the model really implements: the
//! capability registers are how the guest learns what it may use.

/// Version 1.0 (legacy root/context tables; no scalable mode).
pub const VER_VALUE: u32 = 0x10;

pub const VER: u64 = 0x00;
pub const CAP: u64 = 0x08;
pub const ECAP: u64 = 0x10;
pub const GCMD: u64 = 0x18;
pub const GSTS: u64 = 0x1c;
pub const RTADDR: u64 = 0x20;
pub const CCMD: u64 = 0x28;
pub const FSTS: u64 = 0x34;
pub const FECTL: u64 = 0x38;
pub const FEDATA: u64 = 0x3c;
pub const FEADDR: u64 = 0x40;
pub const FEUADDR: u64 = 0x44;
pub const IQH: u64 = 0x80;
pub const IQT: u64 = 0x88;
pub const IQA: u64 = 0x90;
pub const ICS: u64 = 0x9c;
pub const IECTL: u64 = 0xa0;
pub const IEDATA: u64 = 0xa4;
pub const IEADDR: u64 = 0xa8;
pub const IEUADDR: u64 = 0xac;
/// IOTLB registers (ECAP.IRO = 0x20, in 16-byte units): IVA, then the IOTLB command register.
pub const IVA: u64 = 0x200;
pub const IOTLB: u64 = 0x208;
/// Fault recording registers (CAP.FRO = 0x22): `FAULT_RECORDS` 16-byte records.
pub const FRCD: u64 = 0x220;
pub const FAULT_RECORDS: usize = 8;
pub const FRCD_END: u64 = FRCD + 16 * FAULT_RECORDS as u64;
/// The register page.
pub const REGISTER_PAGE_SIZE: u64 = 0x1000;

/// Maximum guest address width: 48 bits (4-level tables).
pub const MGAW_BITS: u32 = 48;
/// Largest address mask (AM) for page-selective IOTLB invalidation: 2^9 pages.
pub const MAMV: u64 = 9;

// CAP fields.
const CAP_ND_16BIT_DOMAINS: u64 = 6;
const CAP_CM: u64 = 1 << 7;
/// SAGAW bit 1: 39-bit 3-level tables; bit 2: 48-bit 4-level tables.
const CAP_SAGAW_39_48: u64 = 0b0110 << 8;
const CAP_MGAW: u64 = ((MGAW_BITS - 1) as u64) << 16;
const CAP_FRO: u64 = (FRCD / 16) << 24;
/// SLLPS: 2 MiB and 1 GiB second-level pages.
const CAP_SLLPS_2M_1G: u64 = 0b11 << 34;
const CAP_PSI: u64 = 1 << 39;
const CAP_NFR: u64 = ((FAULT_RECORDS - 1) as u64) << 40;
const CAP_MAMV: u64 = MAMV << 48;

/// 16-bit domain ids, caching mode (the guest must invalidate after making entries present,
/// so a model whose devices cache mappings can mirror them), 39/48-bit tables, 2M/1G pages,
/// page-selective invalidation, 8 fault records. No RWBF, no PLMR/PHMR, no AFL, no ZLR.
pub const CAP_VALUE: u64 = CAP_ND_16BIT_DOMAINS
    | CAP_CM
    | CAP_SAGAW_39_48
    | CAP_MGAW
    | CAP_FRO
    | CAP_SLLPS_2M_1G
    | CAP_PSI
    | CAP_NFR
    | CAP_MAMV;

const ECAP_C: u64 = 1;
const ECAP_QI: u64 = 1 << 1;
const ECAP_PT: u64 = 1 << 6;
const ECAP_IRO: u64 = (IVA / 16) << 8;

/// Coherent table walks (the model reads guest memory directly, no flushes needed), queued
/// invalidation, pass-through contexts. No device TLB (DT), no interrupt remapping (IR, EIM),
/// no snoop control, no scalable mode, no nested or first-level translation.
pub const ECAP_VALUE: u64 = ECAP_C | ECAP_QI | ECAP_PT | ECAP_IRO;

// GCMD / GSTS bits (same positions).
pub const GCMD_TE: u32 = 1 << 31;
pub const GCMD_SRTP: u32 = 1 << 30;
pub const GCMD_SFL: u32 = 1 << 29;
pub const GCMD_EAFL: u32 = 1 << 28;
pub const GCMD_WBF: u32 = 1 << 27;
pub const GCMD_QIE: u32 = 1 << 26;
pub const GCMD_IRE: u32 = 1 << 25;
pub const GCMD_SIRTP: u32 = 1 << 24;
pub const GCMD_CFI: u32 = 1 << 23;

/// RTADDR: bits 63:12 the table, bits 11:10 the translation table mode (only 00, legacy).
pub const RTADDR_MASK: u64 = !0xfff;
pub const RTADDR_TTM_MASK: u64 = 0b11 << 10;

// CCMD.
pub const CCMD_ICC: u64 = 1 << 63;
pub const CCMD_CIRG_SHIFT: u32 = 61;
pub const CCMD_CAIG_SHIFT: u32 = 59;

// IOTLB command register.
pub const IOTLB_IVT: u64 = 1 << 63;
pub const IOTLB_IIRG_SHIFT: u32 = 60;
pub const IOTLB_IAIG_SHIFT: u32 = 57;

// FSTS.
pub const FSTS_PFO: u32 = 1;
pub const FSTS_PPF: u32 = 1 << 1;
pub const FSTS_IQE: u32 = 1 << 4;
pub const FSTS_ICE: u32 = 1 << 5;
pub const FSTS_ITE: u32 = 1 << 6;
pub const FSTS_FRI_SHIFT: u32 = 8;
/// The write-1-to-clear bits of FSTS.
pub const FSTS_RW1C: u32 = FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE;

// FECTL / IECTL.
pub const CTL_IM: u32 = 1 << 31;
pub const CTL_IP: u32 = 1 << 30;

// ICS.
pub const ICS_IWC: u32 = 1;

/// IQA: bits 63:12 base, bit 11 DW (256-bit descriptors, scalable mode only), bits 2:0 QS.
pub const IQA_BASE_MASK: u64 = !0xfff;
pub const IQA_QS_MASK: u64 = 0b111;
/// IQH/IQT: bits 18:4 the descriptor index.
pub const IQ_INDEX_MASK: u64 = 0x7fff << 4;

/// FEADDR / IEADDR: bits 1:0 reserved.
pub const MSI_ADDR_MASK: u32 = !0b11;
