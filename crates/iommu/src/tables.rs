//! Legacy-mode translation structures, walked in guest memory: the root table (one entry per
//! bus), context tables (one entry per device/function) and second-level page tables (3 or 4
//! levels, 2 MiB and 1 GiB leaves). Every entry is guest-written: a read that fails, a reserved
//! bit set or an address beyond the host address width is a fault with the reason the VT-d
//! specification gives (section 7.1.3), never a panic.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

/// Fault reasons (VT-d spec, table 7-1, legacy mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FaultReason {
    RootNotPresent = 0x1,
    ContextNotPresent = 0x2,
    ContextInvalid = 0x3,
    AddressBeyondGaw = 0x4,
    WriteDenied = 0x5,
    ReadDenied = 0x6,
    PageTableUnreadable = 0x7,
    RootTableUnreadable = 0x8,
    ContextTableUnreadable = 0x9,
    RootReserved = 0xa,
    ContextReserved = 0xb,
    PageEntryReserved = 0xc,
}

/// A failed walk: why, and whether the context entry asked for faults not to be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkFault {
    pub reason: FaultReason,
    /// Context entry FPD (fault processing disable).
    pub suppressed: bool,
}

impl From<FaultReason> for WalkFault {
    fn from(reason: FaultReason) -> Self {
        Self {
            reason,
            suppressed: false,
        }
    }
}

/// A translated page: `size` bytes at the naturally aligned `iova` map to `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageMapping {
    pub iova: u64,
    pub target: u64,
    pub size: u64,
    pub permissions: Permissions,
}

/// How a context entry asks a requester's DMA to be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextKind {
    /// Second-level translation with `levels` (3 or 4) levels from `table`.
    Translated { table: u64, levels: u32 },
    /// Pass-through (T = 2): the IOVA is the guest physical address.
    PassThrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextEntry {
    pub domain: u16,
    pub kind: ContextKind,
    pub fault_processing_disabled: bool,
}

const PRESENT: u64 = 1;
pub(crate) const PAGE_SHIFT: u32 = 12;
const ENTRY_SIZE: u64 = 16;

// Root entry (legacy): lo bit 0 P, bits 11:1 reserved, 63:12 context-table pointer; hi reserved.
const ROOT_LO_RESERVED: u64 = 0xffe;

// Context entry: lo bit 0 P, bit 1 FPD, bits 3:2 T, bits 11:4 reserved, 63:12 SLPTPTR;
// hi bits 2:0 AW, 6:3 available to software, 7 reserved, 23:8 DID, 63:24 reserved.
const CONTEXT_FPD: u64 = 1 << 1;
const CONTEXT_T_SHIFT: u32 = 2;
const CONTEXT_LO_RESERVED: u64 = 0xff0;
const CONTEXT_HI_RESERVED: u64 = !0xff_ff7f;
const TRANSLATION_UNTRANSLATED_ONLY: u64 = 0;
const TRANSLATION_PASS_THROUGH: u64 = 2;

// Second-level entry: bit 0 R, bit 1 W, bit 7 PS (in levels 2 and 3), bits 51:12 the address,
// bit 62 TM (reserved without a device TLB). Bits 11:8, 6:2 and 63, 61:52 are ignored or
// only meaningful with snoop control / EMT, which this model does not offer.
pub(crate) const SL_READ: u64 = 1;
pub(crate) const SL_WRITE: u64 = 1 << 1;
pub(crate) const SL_PAGE_SIZE: u64 = 1 << 7;
pub(crate) const SL_TM: u64 = 1 << 62;
pub(crate) const SL_ADDRESS_TOP: u32 = 52;

/// Bits `bits..52`, which must be clear in a table or page address (beyond the host address width).
pub(crate) fn beyond_width(bits: u32) -> u64 {
    let below_top = (1u64 << SL_ADDRESS_TOP) - 1;
    below_top & !((1u64 << bits) - 1)
}

fn read_pair(mem: &GuestMemoryMmap, addr: u64) -> Option<(u64, u64)> {
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, GuestAddress(addr)).ok()?;
    let lo = u64::from_le_bytes(raw[..8].try_into().ok()?);
    let hi = u64::from_le_bytes(raw[8..].try_into().ok()?);
    Some((lo, hi))
}

/// The walker: guest memory plus the widths the model advertises.
#[derive(Debug, Clone, Copy)]
pub struct Tables<'a> {
    pub memory: &'a GuestMemoryMmap,
    /// Host address width: table and page addresses must be below 2^haw.
    pub haw: u32,
}

impl Tables<'_> {
    /// The context entry of `requester` (bus << 8 | devfn) under the root table at `root`.
    pub fn context(&self, root: u64, requester: u16) -> Result<ContextEntry, WalkFault> {
        let bus = u64::from(requester >> 8);
        let devfn = u64::from(requester & 0xff);
        let (root_lo, root_hi) = read_pair(self.memory, root + bus * ENTRY_SIZE)
            .ok_or(FaultReason::RootTableUnreadable)?;
        if root_lo & PRESENT == 0 {
            return Err(FaultReason::RootNotPresent.into());
        }
        let context_table = root_lo & !0xfff;
        if root_lo & ROOT_LO_RESERVED != 0
            || root_hi != 0
            || context_table & beyond_width(self.haw) != 0
            || context_table >> SL_ADDRESS_TOP != 0
        {
            return Err(FaultReason::RootReserved.into());
        }
        let (lo, hi) = read_pair(self.memory, context_table + devfn * ENTRY_SIZE)
            .ok_or(FaultReason::ContextTableUnreadable)?;
        if lo & PRESENT == 0 {
            return Err(FaultReason::ContextNotPresent.into());
        }
        let suppressed = lo & CONTEXT_FPD != 0;
        let fault = |reason| WalkFault { reason, suppressed };
        let table = lo & !0xfff;
        if lo & CONTEXT_LO_RESERVED != 0 || hi & CONTEXT_HI_RESERVED != 0 {
            return Err(fault(FaultReason::ContextReserved));
        }
        let kind = match (lo >> CONTEXT_T_SHIFT) & 0b11 {
            TRANSLATION_PASS_THROUGH => ContextKind::PassThrough,
            TRANSLATION_UNTRANSLATED_ONLY => {
                let levels = match hi & 0b111 {
                    1 => 3,
                    2 => 4,
                    _ => return Err(fault(FaultReason::ContextInvalid)),
                };
                if table & beyond_width(self.haw) != 0 || table >> SL_ADDRESS_TOP != 0 {
                    return Err(fault(FaultReason::ContextReserved));
                }
                ContextKind::Translated { table, levels }
            }
            // T = 1 needs a device TLB (ECAP.DT), T = 3 is reserved.
            _ => return Err(fault(FaultReason::ContextInvalid)),
        };
        Ok(ContextEntry {
            domain: ((hi >> 8) & 0xffff) as u16,
            kind,
            fault_processing_disabled: suppressed,
        })
    }

    /// Translates `iova` for `requester`: the page holding it and its permissions.
    pub fn translate(
        &self,
        root: u64,
        requester: u16,
        iova: u64,
        mgaw: u32,
    ) -> Result<PageMapping, WalkFault> {
        let context = self.context(root, requester)?;
        let suppressed = context.fault_processing_disabled;
        let fault = |reason| WalkFault { reason, suppressed };
        match context.kind {
            ContextKind::PassThrough => {
                if iova >> self.haw != 0 {
                    return Err(fault(FaultReason::AddressBeyondGaw));
                }
                let page = iova & !((1 << PAGE_SHIFT) - 1);
                Ok(PageMapping {
                    iova: page,
                    target: page,
                    size: 1 << PAGE_SHIFT,
                    permissions: Permissions::ReadWrite,
                })
            }
            ContextKind::Translated { table, levels } => {
                let width = (PAGE_SHIFT + 9 * levels).min(mgaw);
                if iova >> width != 0 {
                    return Err(fault(FaultReason::AddressBeyondGaw));
                }
                self.walk(table, levels, iova).map_err(fault)
            }
        }
    }

    fn walk(&self, mut table: u64, levels: u32, iova: u64) -> Result<PageMapping, FaultReason> {
        let mut read = true;
        let mut write = true;
        for level in (1..=levels).rev() {
            let shift = PAGE_SHIFT + 9 * (level - 1);
            let index = (iova >> shift) & 0x1ff;
            let entry: u64 = self
                .memory
                .read_obj(GuestAddress(table + index * 8))
                .map_err(|_| FaultReason::PageTableUnreadable)?;
            if entry & (SL_READ | SL_WRITE) == 0 {
                // Not present: reported as the access that was refused (the caller decides).
                return Err(FaultReason::ReadDenied);
            }
            read &= entry & SL_READ != 0;
            write &= entry & SL_WRITE != 0;
            let large = entry & SL_PAGE_SIZE != 0;
            // PS is allowed on 2 MiB (level 2) and 1 GiB (level 3) entries, both in CAP.SLLPS.
            if entry & beyond_width(self.haw) != 0 || entry & SL_TM != 0 || (large && level > 3) {
                return Err(FaultReason::PageEntryReserved);
            }
            let address = entry & beyond_width(PAGE_SHIFT) & ((1 << self.haw) - 1);
            if level == 1 || large {
                let size = 1u64 << shift;
                if address & (size - 1) != 0 {
                    // A large page's low address bits are reserved.
                    return Err(FaultReason::PageEntryReserved);
                }
                return Ok(PageMapping {
                    iova: iova & !(size - 1),
                    target: address,
                    size,
                    permissions: permissions(read, write),
                });
            }
            table = address;
        }
        Err(FaultReason::PageTableUnreadable)
    }
}

fn permissions(read: bool, write: bool) -> Permissions {
    match (read, write) {
        (true, true) => Permissions::ReadWrite,
        (true, false) => Permissions::Read,
        (false, true) => Permissions::Write,
        (false, false) => Permissions::No,
    }
}
