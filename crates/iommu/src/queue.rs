//! Invalidation queue descriptors (VT-d spec 6.5.2): the 128-bit legacy-mode forms of the
//! context-cache, IOTLB, interrupt entry cache and invalidation-wait descriptors. Any other
//! type (device TLB, PASID-based: features this model does not advertise) or a reserved bit set
//! is an invalid descriptor, which stops the queue with FSTS.IQE. The unit treats an interrupt
//! entry cache descriptor as invalid too when interrupt remapping is not offered.

use crate::regs::MAMV;

/// Which cached translations a descriptor (or CCMD / IOTLB register command) drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    Domain(u16),
    /// Context cache, device-selective: requester `source` with the low `function_mask` bits of
    /// its function number ignored, in `domain`.
    Device {
        domain: u16,
        source: u16,
        function_mask: u8,
    },
    /// IOTLB, page-selective: `2^(12 + mask)` bytes at `address` in `domain`.
    Pages {
        domain: u16,
        address: u64,
        mask: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    ContextCache(Scope),
    Iotlb(Scope),
    /// Interrupt entry cache: every entry (`None`) or the `2^mask` entries from `index`.
    InterruptEntryCache(Option<(u16, u8)>),
    Wait {
        /// Write `data` to `address` when every earlier descriptor is done.
        status: Option<(u64, u32)>,
        interrupt: bool,
    },
}

const TYPE_CONTEXT_CACHE: u64 = 1;
const TYPE_IOTLB: u64 = 2;
const TYPE_IEC: u64 = 4;
const TYPE_WAIT: u64 = 5;
/// Type bits 3:0 and 11:9 (the high type bits, non-zero only for scalable-mode descriptors).
const TYPE_MASK: u64 = 0xe0f;

const CC_LO_VALID: u64 = TYPE_MASK | 0x30 | 0x0003_ffff_ffff_0000;
const IOTLB_LO_VALID: u64 = TYPE_MASK | 0x30 | 0xc0 | 0xffff_0000;
const IOTLB_HI_VALID: u64 = !0xf80;
/// IEC: bit 4 granularity (index-selective), bits 31:27 index mask, bits 47:32 index.
const IEC_LO_VALID: u64 = TYPE_MASK | 0x10 | 0xf800_0000 | 0xffff_0000_0000;
const WAIT_LO_VALID: u64 = TYPE_MASK | 0xf0 | 0xffff_ffff_0000_0000;
const WAIT_HI_VALID: u64 = !0b11;

/// Decodes one descriptor; `None` if it is invalid.
pub fn decode(lo: u64, hi: u64) -> Option<Descriptor> {
    let granularity = (lo >> 4) & 0b11;
    let domain = ((lo >> 16) & 0xffff) as u16;
    match lo & TYPE_MASK {
        TYPE_CONTEXT_CACHE if lo & !CC_LO_VALID == 0 && hi == 0 => {
            let scope = match granularity {
                1 => Scope::All,
                2 => Scope::Domain(domain),
                3 => Scope::Device {
                    domain,
                    source: ((lo >> 32) & 0xffff) as u16,
                    function_mask: ((lo >> 48) & 0b11) as u8,
                },
                _ => return None,
            };
            Some(Descriptor::ContextCache(scope))
        }
        TYPE_IOTLB if lo & !IOTLB_LO_VALID == 0 && hi & !IOTLB_HI_VALID == 0 => {
            Some(Descriptor::Iotlb(iotlb_scope(granularity, domain, hi)?))
        }
        TYPE_IEC if lo & !IEC_LO_VALID == 0 && hi == 0 => {
            let selective = lo & 0x10 != 0;
            let index = ((lo >> 32) & 0xffff) as u16;
            let mask = ((lo >> 27) & 0x1f) as u8;
            Some(Descriptor::InterruptEntryCache(
                selective.then_some((index, mask)),
            ))
        }
        TYPE_WAIT if lo & !WAIT_LO_VALID == 0 && hi & !WAIT_HI_VALID == 0 => {
            let status_write = lo & (1 << 5) != 0;
            Some(Descriptor::Wait {
                status: status_write.then_some((hi, (lo >> 32) as u32)),
                interrupt: lo & (1 << 4) != 0,
            })
        }
        _ => None,
    }
}

/// The scope of an IOTLB invalidation: granularity 1 global, 2 domain, 3 pages (`iva` holds
/// the address, bits 5:0 the mask); `None` for granularity 0 or a mask above CAP.MAMV.
pub fn iotlb_scope(granularity: u64, domain: u16, iva: u64) -> Option<Scope> {
    match granularity {
        1 => Some(Scope::All),
        2 => Some(Scope::Domain(domain)),
        3 => {
            let mask = iva & 0x3f;
            (mask <= MAMV).then_some(Scope::Pages {
                domain,
                address: iva & !0xfff,
                mask: mask as u8,
            })
        }
        _ => None,
    }
}

impl Scope {
    /// The IOVA range `(start, length)` a page-selective scope covers, clipped to the address
    /// space (never empty, never wrapping): the naturally aligned `2^mask` pages holding
    /// `address` (what the specification invalidates), extended to `address + 2^mask` pages,
    /// since Linux 6.1 may pass a start that is not aligned to its mask and expect the pages
    /// after it to go too. Invalidating more than asked is always allowed.
    pub fn range(&self) -> Option<(u64, u64)> {
        let Scope::Pages { address, mask, .. } = *self else {
            return None;
        };
        let size = 1u64 << (12 + u32::from(mask));
        let start = address & !(size - 1);
        let length = (address - start).saturating_add(size);
        Some((start, length.min(u64::MAX - start).max(1)))
    }
}
