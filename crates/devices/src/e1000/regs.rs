//! Register offsets and bits of the 82540EM (Intel's "PCI/PCI-X Family of Gigabit Ethernet
//! Controllers Software Developer's Manual", 317453, chapter 13), only those sluice models.

/// Size of BAR0 (memory-mapped registers) and of the I/O BAR (IOADDR/IODATA window).
pub const MMIO_SIZE: u64 = 0x2_0000;
pub const IO_SIZE: u64 = 0x40;

pub const CTRL: u32 = 0x0000;
pub const STATUS: u32 = 0x0008;
pub const EECD: u32 = 0x0010;
pub const EERD: u32 = 0x0014;
pub const MDIC: u32 = 0x0020;
pub const ICR: u32 = 0x00c0;
pub const ITR: u32 = 0x00c4;
pub const ICS: u32 = 0x00c8;
pub const IMS: u32 = 0x00d0;
pub const IMC: u32 = 0x00d8;
pub const RCTL: u32 = 0x0100;
pub const TCTL: u32 = 0x0400;
pub const RDBAL: u32 = 0x2800;
pub const RDBAH: u32 = 0x2804;
pub const RDLEN: u32 = 0x2808;
pub const RDH: u32 = 0x2810;
pub const RDT: u32 = 0x2818;
pub const TDBAL: u32 = 0x3800;
pub const TDBAH: u32 = 0x3804;
pub const TDLEN: u32 = 0x3808;
pub const TDH: u32 = 0x3810;
pub const TDT: u32 = 0x3818;
pub const MTA: u32 = 0x5200;
pub const MTA_ENTRIES: u32 = 128;
pub const RAL0: u32 = 0x5400;
pub const RAH0: u32 = 0x5404;
pub const RA_ENTRIES: u32 = 16;

/// Statistics block: every register in it is clear-on-read.
pub const STATS_START: u32 = 0x4000;
pub const STATS_END: u32 = 0x4100;
pub const MPC: u32 = 0x4010;
pub const RNBC: u32 = 0x40a0;
pub const ROC: u32 = 0x40ac;
pub const GPRC: u32 = 0x4074;
pub const BPRC: u32 = 0x4078;
pub const MPRC: u32 = 0x407c;
pub const GPTC: u32 = 0x4080;
pub const GORCL: u32 = 0x4088;
pub const GOTCL: u32 = 0x4090;
pub const TORL: u32 = 0x40c0;
pub const TOTL: u32 = 0x40c8;
pub const TPR: u32 = 0x40d0;
pub const TPT: u32 = 0x40d4;
pub const MPTC: u32 = 0x40f0;
pub const BPTC: u32 = 0x40f4;

pub const CTRL_SLU: u32 = 1 << 6;
pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_VME: u32 = 1 << 30;
pub const CTRL_PHY_RST: u32 = 1 << 31;

pub const STATUS_FD: u32 = 1 << 0;
pub const STATUS_LU: u32 = 1 << 1;
pub const STATUS_SPEED_1000: u32 = 1 << 7;

pub const EECD_SK: u32 = 1 << 0;
pub const EECD_CS: u32 = 1 << 1;
pub const EECD_DI: u32 = 1 << 2;
pub const EECD_DO: u32 = 1 << 3;
pub const EECD_REQ: u32 = 1 << 6;
pub const EECD_GNT: u32 = 1 << 7;
pub const EECD_PRES: u32 = 1 << 8;

pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;

pub const MDIC_OP_WRITE: u32 = 1 << 26;
pub const MDIC_OP_READ: u32 = 2 << 26;
pub const MDIC_READY: u32 = 1 << 28;
pub const MDIC_INT_EN: u32 = 1 << 29;
pub const MDIC_ERROR: u32 = 1 << 30;

/// Interrupt causes (ICR/ICS/IMS/IMC bits).
pub const ICR_TXDW: u32 = 1 << 0;
pub const ICR_TXQE: u32 = 1 << 1;
pub const ICR_LSC: u32 = 1 << 2;
pub const ICR_RXDMT0: u32 = 1 << 4;
pub const ICR_RXO: u32 = 1 << 6;
pub const ICR_RXT0: u32 = 1 << 7;
pub const ICR_MDAC: u32 = 1 << 9;
/// Causes the 82540EM defines (bits 0..=16 minus reserved ones); others never latch.
pub const ICR_VALID: u32 = 0x0001_f6df;

pub const RCTL_EN: u32 = 1 << 1;
pub const RCTL_UPE: u32 = 1 << 3;
pub const RCTL_MPE: u32 = 1 << 4;
pub const RCTL_LPE: u32 = 1 << 5;
pub const RCTL_RDMTS_SHIFT: u32 = 8;
pub const RCTL_MO_SHIFT: u32 = 12;
pub const RCTL_BAM: u32 = 1 << 15;
pub const RCTL_BSIZE_SHIFT: u32 = 16;
pub const RCTL_BSEX: u32 = 1 << 25;
pub const RCTL_SECRC: u32 = 1 << 26;

pub const TCTL_EN: u32 = 1 << 1;

pub const RAH_AV: u32 = 1 << 31;

/// Descriptor rings: 16-byte descriptors, lengths in multiples of 128 bytes.
pub const DESCRIPTOR_LEN: u64 = 16;
pub const RING_LEN_ALIGN: u32 = 128;
/// RDLEN/TDLEN are 20 bits wide (bits 19:7 significant): at most 65 536 descriptors.
pub const RING_LEN_MASK: u32 = 0x000f_ff80;

/// Register name for the per-register exit counters ("other" for the rest).
pub fn exit_counter(offset: u32) -> usize {
    match offset {
        CTRL => 0,
        STATUS => 1,
        EECD => 2,
        EERD => 3,
        MDIC => 4,
        ICR => 5,
        IMS => 6,
        IMC => 7,
        ICS => 8,
        RCTL => 9,
        TCTL => 10,
        RDT => 11,
        TDT => 12,
        _ => 13,
    }
}

/// Names of the counters [`exit_counter`] indexes, then the device-wide ones.
pub const COUNTER_NAMES: &[&str] = &[
    "exits_ctrl",
    "exits_status",
    "exits_eecd",
    "exits_eerd",
    "exits_mdic",
    "exits_icr",
    "exits_ims",
    "exits_imc",
    "exits_ics",
    "exits_rctl",
    "exits_tctl",
    "exits_rdt",
    "exits_tdt",
    "exits_other",
    "exits_io",
    "interrupts",
    "tx_checksum_offload",
    "tx_segmentation_offload",
];
pub const COUNTER_IO: usize = 14;
pub const COUNTER_INTERRUPTS: usize = 15;
/// Frames sent with NEEDS_CSUM, and with GSO, in their tap header.
pub const COUNTER_TX_CSUM: usize = 16;
pub const COUNTER_TX_GSO: usize = 17;
