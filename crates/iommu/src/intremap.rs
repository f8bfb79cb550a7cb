//! Interrupt remapping (Intel VT-d specification, chapters 5.1 and 9.10): the interrupt
//! remapping table address register (IRTA), the remappable-format MSI, the interrupt remapping
//! table entry (IRTE) and the fault reasons 0x20..0x27.
//!
//! With interrupt remapping enabled (GSTS.IRES) a device's interrupt request is either in
//! remappable format (address bit 4 set: a 16-bit handle, optionally plus a subhandle from the
//! data) and is translated through the guest's IRTE at that index, or in compatibility format
//! (the plain x86 MSI), which passes only while GSTS.CFIS is set. The translation checks, in
//! the specification's order: reserved request bits (0x20), the index against the table size
//! (0x21), the entry's readability (0x23), presence (0x22), reserved bits (0x24) and the
//! source id of the requester (0x26). The result is a compatibility-format message that KVM
//! can deliver.
//!
//! Only the remapped IRTE format is offered (no posted interrupts, IM = 1 is a reserved value)
//! and only xAPIC destinations (ECAP.EIM = 0: the destination is IRTE bits 47:40, and the other
//! destination bits are reserved). Everything here is a pure function of guest-chosen values;
//! any bad value is a [`IrFault`], never a panic.
//!
//! Written by hand: no crate models VT-d interrupt remapping.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use sluice_bus::irq::MsiMessage;

/// IRTA: the interrupt remapping table address register (64-bit).
pub const IRTA: u64 = 0xb8;
/// IRTA bits 63:12: the table; bit 11: EIME (x2APIC mode); bits 3:0: S, 2^(S+1) entries.
pub const IRTA_ADDRESS_MASK: u64 = !0xfff;
pub const IRTA_EIME: u64 = 1 << 11;
pub const IRTA_SIZE_MASK: u64 = 0xf;
/// What the register keeps (EIME reads back as written but is ignored: ECAP.EIM = 0).
pub const IRTA_WRITABLE: u64 = IRTA_ADDRESS_MASK | IRTA_EIME | IRTA_SIZE_MASK;

/// ECAP.IR: interrupt remapping supported.
pub const ECAP_IR: u64 = 1 << 3;

/// GSTS status bits of interrupt remapping (the same positions as their GCMD commands).
pub const GSTS_IRES: u32 = 1 << 25;
pub const GSTS_IRTPS: u32 = 1 << 24;
pub const GSTS_CFIS: u32 = 1 << 23;

/// The x86 interrupt address window (bits 31:20 = 0xfee).
const MSI_ADDRESS_WINDOW: u64 = 0xfee0_0000;
const MSI_ADDRESS_WINDOW_MASK: u64 = 0xffff_ffff_fff0_0000;
/// Remappable-format address: bit 4 the format, bit 3 SHV, bit 2 handle bit 15, bits 19:5
/// handle bits 14:0.
const MSI_REMAPPABLE: u64 = 1 << 4;
const MSI_SHV: u64 = 1 << 3;
const MSI_HANDLE_15: u64 = 1 << 2;

/// The interrupt-remapping fault reasons (VT-d spec, table 9-1x "interrupt remapping fault
/// conditions"), as recorded in a fault recording register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IrFaultReason {
    /// A remappable request with a reserved field set (here: outside the 0xfeex_xxxx window).
    RequestReserved = 0x20,
    /// The interrupt index is beyond the table size IRTA.S.
    IndexBeyondTable = 0x21,
    /// The IRTE's present bit is clear.
    EntryNotPresent = 0x22,
    /// The IRTE could not be read (outside guest memory or the host address width).
    TableUnreadable = 0x23,
    /// The IRTE has a reserved field set or a reserved value (posted format, a reserved
    /// delivery mode or source validation type).
    EntryReserved = 0x24,
    /// A compatibility-format request while GSTS.CFIS is clear.
    CompatibilityBlocked = 0x25,
    /// The requester id does not pass the IRTE's source validation.
    SourceIdInvalid = 0x26,
    /// A posted-interrupt descriptor could not be accessed; never raised (no posting offered).
    PostedDescriptorUnreadable = 0x27,
}

/// A refused interrupt request: why, for which index, and whether the IRTE asked for its faults
/// not to be recorded (FPD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrFault {
    pub reason: IrFaultReason,
    pub index: u16,
    pub suppressed: bool,
}

impl IrFault {
    fn new(reason: IrFaultReason, index: u16) -> Self {
        Self {
            reason,
            index,
            suppressed: false,
        }
    }
}

/// How an interrupt request is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsiFormat {
    /// A plain x86 MSI (bit 4 clear).
    Compatibility,
    /// A remappable request naming IRTE `index` (handle plus subhandle when SHV was set).
    Remappable { index: u32 },
}

/// Decodes the format of `message`; a remappable request outside the interrupt window is a
/// reserved-field fault.
pub fn decode_msi(message: MsiMessage) -> Result<MsiFormat, IrFault> {
    if message.address & MSI_REMAPPABLE == 0 {
        return Ok(MsiFormat::Compatibility);
    }
    let handle = ((message.address >> 5) & 0x7fff) as u32
        | if message.address & MSI_HANDLE_15 != 0 {
            1 << 15
        } else {
            0
        };
    if message.address & MSI_ADDRESS_WINDOW_MASK != MSI_ADDRESS_WINDOW {
        return Err(IrFault::new(IrFaultReason::RequestReserved, handle as u16));
    }
    let subhandle = if message.address & MSI_SHV != 0 {
        message.data & 0xffff
    } else {
        0
    };
    Ok(MsiFormat::Remappable {
        index: handle + subhandle,
    })
}

/// The remappable-format MSI that names IRTE `index` without a subhandle (what an IOAPIC
/// RTE in remappable format sends, and what tests program).
pub fn remappable_msi(index: u16) -> MsiMessage {
    let high = if index & 0x8000 != 0 {
        MSI_HANDLE_15
    } else {
        0
    };
    MsiMessage {
        address: MSI_ADDRESS_WINDOW | (u64::from(index & 0x7fff) << 5) | MSI_REMAPPABLE | high,
        data: 0,
    }
}

/// IOAPIC redirection entry bits (I/O APIC datasheet; VT-d spec 5.1.5.1 for the remappable
/// format): mask, trigger mode, and bit 48, the remappable format, whose index is bits 63:49
/// (index 14:0) and bit 11 (index 15).
pub const RTE_MASKED: u64 = 1 << 16;
pub const RTE_LEVEL: u64 = 1 << 15;
pub const RTE_REMAPPABLE: u64 = 1 << 48;
/// Polarity (bit 13), trigger mode (bit 15) and mask (bit 16): what an entry keeps of the
/// guest's when it is rebuilt from a translated message.
const RTE_KEPT: u64 = 0x1a000;

/// The interrupt request an IOAPIC redirection entry makes: the remappable request for its
/// index (the IOAPIC sends no subhandle), or the compatibility-format message of its vector,
/// delivery mode, destination mode and 8-bit destination.
pub fn ioapic_request(entry: u64) -> MsiMessage {
    if entry & RTE_REMAPPABLE != 0 {
        let index = ((entry >> 49) & 0x7fff) as u16 | ((((entry >> 11) & 1) as u16) << 15);
        return remappable_msi(index);
    }
    MsiMessage {
        address: MSI_ADDRESS_WINDOW | (((entry >> 56) & 0xff) << 12) | (((entry >> 11) & 1) << 2),
        data: (entry & 0x7ff) as u32,
    }
}

/// The compatibility-format entry that delivers `message` (a translation of `entry`'s request),
/// with `entry`'s polarity, trigger mode and mask.
pub fn ioapic_entry(entry: u64, message: MsiMessage) -> u64 {
    let vector_and_delivery = u64::from(message.data & 0x7ff);
    let logical = ((message.address >> 2) & 1) << 11;
    let destination = ((message.address >> 12) & 0xff) << 56;
    vector_and_delivery | logical | (entry & RTE_KEPT) | destination
}

/// The interrupt remapping table latched by the last SIRTP.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InterruptTable {
    pub address: u64,
    /// Number of entries, 2^(S+1).
    pub entries: u32,
}

impl InterruptTable {
    /// The table an IRTA value describes.
    pub fn from_irta(irta: u64) -> Self {
        Self {
            address: irta & IRTA_ADDRESS_MASK,
            entries: 2u32 << (irta & IRTA_SIZE_MASK),
        }
    }
}

/// A valid, present IRTE (remapped format, xAPIC destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Irte {
    pub fault_processing_disabled: bool,
    /// Logical (true) or physical destination mode.
    pub logical: bool,
    pub redirection_hint: bool,
    pub level_triggered: bool,
    pub delivery_mode: u8,
    pub vector: u8,
    /// The 8-bit xAPIC destination (IRTE bits 47:40).
    pub destination: u8,
    pub source: SourceValidation,
}

/// How an IRTE restricts which requesters may use it (SVT, SQ, SID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceValidation {
    /// SVT = 0.
    None,
    /// SVT = 1: the requester id equals `sid`, ignoring the function-number bits `ignored`.
    Requester { sid: u16, ignored: u16 },
    /// SVT = 2: the requester's bus is within `first..=last`.
    BusRange { first: u8, last: u8 },
}

const IRTE_PRESENT: u64 = 1;
const IRTE_FPD: u64 = 1 << 1;
const IRTE_DM: u64 = 1 << 2;
const IRTE_RH: u64 = 1 << 3;
const IRTE_TM: u64 = 1 << 4;
/// Low quadword bits that must be zero in a remapped-format xAPIC-mode IRTE: 14:12 reserved,
/// 15 IM (posted format, not offered), 31:24 reserved, 39:32 and 63:48 (the destination bits
/// an xAPIC destination does not use).
const IRTE_LO_RESERVED: u64 = 0x7000 | 0x8000 | 0xff00_0000 | 0xff_0000_0000 | 0xffff << 48;
/// High quadword: bits 63:20 reserved.
const IRTE_HI_RESERVED: u64 = !0xf_ffff;

/// Parses a raw IRTE (`lo`, `hi`): `Err` with reason 0x22 or 0x24 (FPD honoured, as the
/// specification records faults of a not-present entry only when its FPD is clear).
pub fn parse_irte(index: u16, lo: u64, hi: u64) -> Result<Irte, IrFault> {
    let suppressed = lo & IRTE_FPD != 0;
    let fault = |reason| IrFault {
        reason,
        index,
        suppressed,
    };
    if lo & IRTE_PRESENT == 0 {
        return Err(fault(IrFaultReason::EntryNotPresent));
    }
    let delivery_mode = ((lo >> 5) & 0b111) as u8;
    // 3 and 6 are reserved delivery modes.
    let bad_delivery = matches!(delivery_mode, 3 | 6);
    if lo & IRTE_LO_RESERVED != 0 || hi & IRTE_HI_RESERVED != 0 || bad_delivery {
        return Err(fault(IrFaultReason::EntryReserved));
    }
    let sid = (hi & 0xffff) as u16;
    let source = match (hi >> 18) & 0b11 {
        0 => SourceValidation::None,
        1 => SourceValidation::Requester {
            sid,
            // SQ 0: compare all 16 bits; 1..3: ignore function bit 2, bits 2:1, bits 2:0.
            ignored: [0, 0b100, 0b110, 0b111][((hi >> 16) & 0b11) as usize],
        },
        2 => SourceValidation::BusRange {
            first: (sid >> 8) as u8,
            last: sid as u8,
        },
        _ => return Err(fault(IrFaultReason::EntryReserved)),
    };
    Ok(Irte {
        fault_processing_disabled: suppressed,
        logical: lo & IRTE_DM != 0,
        redirection_hint: lo & IRTE_RH != 0,
        level_triggered: lo & IRTE_TM != 0,
        delivery_mode,
        vector: (lo >> 16) as u8,
        destination: (lo >> 40) as u8,
        source,
    })
}

impl SourceValidation {
    /// Whether `requester` may use the entry.
    pub fn allows(&self, requester: u16) -> bool {
        match *self {
            SourceValidation::None => true,
            SourceValidation::Requester { sid, ignored } => requester & !ignored == sid & !ignored,
            SourceValidation::BusRange { first, last } => {
                (first..=last).contains(&((requester >> 8) as u8))
            }
        }
    }
}

impl Irte {
    /// The compatibility-format MSI this entry delivers.
    pub fn message(&self) -> MsiMessage {
        let address = MSI_ADDRESS_WINDOW
            | (u64::from(self.destination) << 12)
            | if self.redirection_hint { 1 << 3 } else { 0 }
            | if self.logical { 1 << 2 } else { 0 };
        // Level-triggered: trigger mode (bit 15) and assert (bit 14).
        let trigger = if self.level_triggered { 0xc000 } else { 0 };
        MsiMessage {
            address,
            data: u32::from(self.vector) | (u32::from(self.delivery_mode) << 8) | trigger,
        }
    }
}

/// The remapping state a translation needs.
#[derive(Debug, Clone, Copy)]
pub struct RemapSettings {
    /// GSTS.IRES.
    pub enabled: bool,
    /// GSTS.CFIS: compatibility-format requests pass.
    pub compatibility_allowed: bool,
    pub table: InterruptTable,
    /// The host address width: the table must lie below 2^haw.
    pub haw: u32,
}

/// Translates `message` from `requester`: the message to deliver, or the fault.
pub fn remap(
    memory: &GuestMemoryMmap,
    settings: &RemapSettings,
    requester: u16,
    message: MsiMessage,
) -> Result<MsiMessage, IrFault> {
    if !settings.enabled {
        return Ok(message);
    }
    let index = match decode_msi(message)? {
        MsiFormat::Compatibility if settings.compatibility_allowed => return Ok(message),
        MsiFormat::Compatibility => {
            return Err(IrFault::new(IrFaultReason::CompatibilityBlocked, 0));
        }
        MsiFormat::Remappable { index } => index,
    };
    // The recorded index is 16 bits; a handle plus subhandle beyond that is beyond the table.
    let recorded = index as u16;
    if index >= settings.table.entries || index > 0xffff {
        return Err(IrFault::new(IrFaultReason::IndexBeyondTable, recorded));
    }
    let (lo, hi) = read_irte(memory, settings, index)
        .ok_or(IrFault::new(IrFaultReason::TableUnreadable, recorded))?;
    let irte = parse_irte(recorded, lo, hi)?;
    if !irte.source.allows(requester) {
        return Err(IrFault {
            reason: IrFaultReason::SourceIdInvalid,
            index: recorded,
            suppressed: irte.fault_processing_disabled,
        });
    }
    Ok(irte.message())
}

fn read_irte(memory: &GuestMemoryMmap, settings: &RemapSettings, index: u32) -> Option<(u64, u64)> {
    let at = settings.table.address.checked_add(u64::from(index) * 16)?;
    if (at + 15) >> settings.haw != 0 {
        return None;
    }
    let mut raw = [0u8; 16];
    memory.read_slice(&mut raw, GuestAddress(at)).ok()?;
    let lo = u64::from_le_bytes(raw[..8].try_into().ok()?);
    let hi = u64::from_le_bytes(raw[8..].try_into().ok()?);
    Some((lo, hi))
}

/// Something that holds translated interrupts (a device's MSI routes, the IOAPIC's pins) and
/// must translate them again when the guest changes what they were translated through: an
/// interrupt entry cache invalidation, a new table (SIRTP), or IRE / CFI toggled.
pub trait RemapClient: Send + Sync {
    fn remapping_changed(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    /// A present IRTE: vector, xAPIC destination, source validation of `sid` (SQ 0).
    fn irte(vector: u8, destination: u8, sid: u16) -> (u64, u64) {
        let lo = IRTE_PRESENT | (u64::from(vector) << 16) | (u64::from(destination) << 40);
        let hi = u64::from(sid) | (1 << 18);
        (lo, hi)
    }

    fn settings(entries_log2_minus_1: u64) -> RemapSettings {
        RemapSettings {
            enabled: true,
            compatibility_allowed: false,
            table: InterruptTable::from_irta(0x4000 | entries_log2_minus_1),
            haw: 39,
        }
    }

    fn write_irte(memory: &GuestMemoryMmap, index: u64, (lo, hi): (u64, u64)) {
        memory
            .write_obj(lo, GuestAddress(0x4000 + index * 16))
            .unwrap();
        memory
            .write_obj(hi, GuestAddress(0x4000 + index * 16 + 8))
            .unwrap();
    }

    #[test]
    fn remappable_request_is_translated_through_its_irte() {
        let memory = memory();
        write_irte(&memory, 5, irte(0x41, 2, 0x0018));

        let message = remap(&memory, &settings(3), 0x0018, remappable_msi(5)).unwrap();

        assert_eq!(
            message.address, 0xfee0_2000,
            "xAPIC destination 2, physical"
        );
        assert_eq!(message.data, 0x41, "fixed, edge, vector 0x41");
    }

    #[test]
    fn subhandle_is_added_to_the_handle_when_shv_is_set() {
        let mut message = remappable_msi(4);
        message.address |= MSI_SHV;
        message.data = 3;

        assert_eq!(
            decode_msi(message),
            Ok(MsiFormat::Remappable { index: 7 }),
            "handle 4 + subhandle 3"
        );
        message.address &= !MSI_SHV;
        assert_eq!(decode_msi(message), Ok(MsiFormat::Remappable { index: 4 }));
        assert_eq!(
            decode_msi(remappable_msi(0x8001)),
            Ok(MsiFormat::Remappable { index: 0x8001 }),
            "handle bit 15 from address bit 2"
        );
    }

    #[test]
    fn level_logical_lowest_priority_entry_builds_that_message() {
        let lo = IRTE_PRESENT | IRTE_DM | IRTE_RH | IRTE_TM | (1 << 5) | (0x55 << 16) | (3 << 40);

        let message = parse_irte(0, lo, 0).unwrap().message();

        assert_eq!(message.address, 0xfee0_300c);
        assert_eq!(message.data, 0xc000 | 0x100 | 0x55);
    }

    #[test]
    fn each_fault_reason_is_reported() {
        let memory = memory();
        write_irte(&memory, 0, irte(0x30, 0, 0x0018));
        write_irte(&memory, 1, (irte(0x30, 0, 0x18).0 | 1 << 12, 1 << 18));
        write_irte(&memory, 2, (0, 0));
        write_irte(&memory, 3, (IRTE_PRESENT | (3 << 5), 0));
        let s = settings(1); // 4 entries
        let reason =
            |requester, message| remap(&memory, &s, requester, message).unwrap_err().reason;

        let outside = MsiMessage {
            address: 0xfed0_0010,
            data: 0,
        };
        assert_eq!(reason(0x18, outside), IrFaultReason::RequestReserved);
        assert_eq!(
            reason(0x18, remappable_msi(4)),
            IrFaultReason::IndexBeyondTable
        );
        assert_eq!(
            reason(0x18, remappable_msi(2)),
            IrFaultReason::EntryNotPresent
        );
        assert_eq!(
            reason(0x18, remappable_msi(1)),
            IrFaultReason::EntryReserved
        );
        assert_eq!(
            reason(0x18, remappable_msi(3)),
            IrFaultReason::EntryReserved,
            "delivery mode 3 is reserved"
        );
        assert_eq!(
            reason(0x20, remappable_msi(0)),
            IrFaultReason::SourceIdInvalid
        );
        let compat = MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        };
        assert_eq!(reason(0x18, compat), IrFaultReason::CompatibilityBlocked);
        let beyond_memory = RemapSettings {
            table: InterruptTable::from_irta(0xfff0_0000 | 7),
            ..s
        };
        assert_eq!(
            remap(&memory, &beyond_memory, 0x18, remappable_msi(0))
                .unwrap_err()
                .reason,
            IrFaultReason::TableUnreadable
        );
    }

    #[test]
    fn compatibility_requests_pass_with_cfis_or_with_remapping_off() {
        let memory = memory();
        let compat = MsiMessage {
            address: 0xfee0_1000,
            data: 0x31,
        };
        let allowed = RemapSettings {
            compatibility_allowed: true,
            ..settings(0)
        };
        let off = RemapSettings {
            enabled: false,
            ..settings(0)
        };

        assert_eq!(remap(&memory, &allowed, 0, compat), Ok(compat));
        assert_eq!(
            remap(&memory, &off, 0, remappable_msi(9)),
            Ok(remappable_msi(9))
        );
    }

    #[test]
    fn ioapic_entries_make_their_requests_and_are_rebuilt_from_translations() {
        // Remappable, index 0x8005 (bit 11 = index bit 15), level, active low, vector = pin 9.
        let remappable = (5 << 49) | RTE_REMAPPABLE | (1 << 11) | RTE_LEVEL | (1 << 13) | 9;
        // Compatibility: vector 0x31, lowest priority, logical, destination 2, masked.
        let compat = (2 << 56) | RTE_MASKED | (1 << 11) | (1 << 8) | 0x31;
        let translated = MsiMessage {
            address: 0xfee0_3000,
            data: 0x45,
        };

        assert_eq!(ioapic_request(remappable), remappable_msi(0x8005));
        assert_eq!(
            ioapic_entry(remappable, translated),
            (3 << 56) | RTE_LEVEL | (1 << 13) | 0x45
        );
        let request = ioapic_request(compat);
        assert_eq!(request.address, 0xfee0_2004);
        assert_eq!(request.data, 0x131);
        assert_eq!(ioapic_entry(compat, request), compat, "a round trip");
    }

    #[test]
    fn fpd_suppresses_recording_even_for_a_not_present_entry() {
        let fault = parse_irte(7, IRTE_FPD, 0).unwrap_err();

        assert_eq!(fault.reason, IrFaultReason::EntryNotPresent);
        assert!(fault.suppressed);
        assert_eq!(fault.index, 7);
    }

    #[test]
    fn source_validation_honours_sq_and_bus_ranges() {
        let function_bits_ignored = SourceValidation::Requester {
            sid: 0x0018,
            ignored: 0b111,
        };
        let buses = SourceValidation::BusRange { first: 2, last: 4 };

        assert!(function_bits_ignored.allows(0x001f));
        assert!(!function_bits_ignored.allows(0x0020));
        assert!(buses.allows(0x0300));
        assert!(!buses.allows(0x0500));
        let (_, hi) = irte(0, 0, 0);
        assert_eq!(
            parse_irte(0, IRTE_PRESENT, hi | (3 << 18))
                .unwrap_err()
                .reason,
            IrFaultReason::EntryReserved,
            "SVT 3 is reserved"
        );
    }
}
