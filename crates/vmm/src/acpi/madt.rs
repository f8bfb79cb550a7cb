//! MADT (signature "APIC"): local APICs, the IOAPIC, ISA overrides and the LINT1 NMI.
//!
//! `acpi_tables` encodes the Processor Local APIC and I/O APIC entries, which are used here, but
//! its MADT type has no way to set the header flags (PCAT_COMPAT) and no interrupt source
//! override, local APIC NMI or x2APIC entries. So the table is assembled on the crate's generic
//! `Sdt` (header, length and checksum kept by the crate) and those four small fixed-layout entries
//! are encoded here, field by field from ACPI 6.5 section 5.2.12.

use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;

use super::builder::to_bytes;
use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout;

/// MADT revision of ACPI 6.3 and later.
const MADT_REVISION: u8 = 5;
/// Header (36) + local interrupt controller address (4) + flags (4).
const MADT_HEADER_LEN: u32 = 44;
/// Flags: the platform also has dual 8259 PICs (Linux then masks them).
const PCAT_COMPAT: u32 = 1;

const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const TYPE_LOCAL_APIC_NMI: u8 = 4;
const TYPE_LOCAL_X2APIC: u8 = 9;
const TYPE_LOCAL_X2APIC_NMI: u8 = 0xa;

/// Local APIC flags: enabled.
const LAPIC_ENABLED: u32 = 1;
/// Highest APIC id a (8-bit) Processor Local APIC entry may carry; 0xff is the broadcast id.
pub const MAX_XAPIC_ID: u32 = 254;
/// Processor UID meaning "all processors" in NMI entries.
const ALL_PROCESSORS_UID: u8 = 0xff;
const ALL_PROCESSORS_X2APIC_UID: u32 = 0xffff_ffff;

/// MPS INTI flags (polarity bits 1:0, trigger mode bits 3:2).
const INTI_ACTIVE_HIGH: u16 = 0b01;
const INTI_EDGE: u16 = 0b01 << 2;
const INTI_LEVEL: u16 = 0b11 << 2;
const INTI_CONFORMS: u16 = 0;

/// The ISA bus, source of every override.
const ISA_BUS: u8 = 0;
/// The PIT is wired to ISA IRQ 0 but to IOAPIC pin 2.
const PIT_ISA_IRQ: u8 = 0;
const PIT_GSI: u32 = 2;
/// LINT1 of every local APIC carries NMI.
const NMI_LINT: u8 = 1;

/// The MADT for `num_cpus` vCPUs, APIC id = cpu index, with the IOAPIC at `ioapic_address`.
pub fn build_madt(num_cpus: u32, ioapic_address: u32) -> Sdt {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, lapic_address());
    madt.write_u32(40, PCAT_COMPAT);
    for cpu in 0..num_cpus {
        madt.append_slice(&local_apic_entry(cpu));
    }
    let ioapic = IoApic::new(layout::IOAPIC_ID, ioapic_address, 0);
    madt.append_slice(&to_bytes(&ioapic));
    madt.append_slice(&interrupt_source_override(
        PIT_ISA_IRQ,
        PIT_GSI,
        INTI_ACTIVE_HIGH | INTI_EDGE,
    ));
    let sci = u8::try_from(layout::SCI_IRQ).unwrap_or(u8::MAX);
    madt.append_slice(&interrupt_source_override(
        sci,
        layout::SCI_IRQ,
        INTI_ACTIVE_HIGH | INTI_LEVEL,
    ));
    madt.append_slice(&local_apic_nmi(ALL_PROCESSORS_UID, INTI_CONFORMS, NMI_LINT));
    if num_cpus > MAX_XAPIC_ID + 1 {
        madt.append_slice(&local_x2apic_nmi(
            ALL_PROCESSORS_X2APIC_UID,
            INTI_CONFORMS,
            NMI_LINT,
        ));
    }
    madt
}

const _: () = assert!(layout::LAPIC_START <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);

fn lapic_address() -> u32 {
    layout::LAPIC_START as u32
}

/// The default IOAPIC address, for `AcpiConfig::ioapic_address`.
pub const DEFAULT_IOAPIC_ADDRESS: u32 = layout::IOAPIC_START as u32;
const _: () = assert!(layout::REMAPPING_IOAPIC_START <= u32::MAX as u64);

/// A Processor Local APIC entry for ids that fit in 8 bits, a Local x2APIC entry otherwise.
fn local_apic_entry(cpu: u32) -> Vec<u8> {
    match u8::try_from(cpu) {
        Ok(id) if cpu <= MAX_XAPIC_ID => {
            to_bytes(&ProcessorLocalApic::new(id, id, EnabledStatus::Enabled))
        }
        _ => local_x2apic(cpu, cpu).to_vec(),
    }
}

/// Interrupt Source Override (type 2, 10 bytes).
fn interrupt_source_override(source_irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut entry = [0u8; 10];
    entry[0] = TYPE_INTERRUPT_SOURCE_OVERRIDE;
    entry[1] = 10;
    entry[2] = ISA_BUS;
    entry[3] = source_irq;
    entry[4..8].copy_from_slice(&gsi.to_le_bytes());
    entry[8..10].copy_from_slice(&flags.to_le_bytes());
    entry
}

/// Local APIC NMI (type 4, 6 bytes).
fn local_apic_nmi(processor_uid: u8, flags: u16, lint: u8) -> [u8; 6] {
    let mut entry = [0u8; 6];
    entry[0] = TYPE_LOCAL_APIC_NMI;
    entry[1] = 6;
    entry[2] = processor_uid;
    entry[3..5].copy_from_slice(&flags.to_le_bytes());
    entry[5] = lint;
    entry
}

/// Processor Local x2APIC (type 9, 16 bytes), enabled.
fn local_x2apic(x2apic_id: u32, processor_uid: u32) -> [u8; 16] {
    let mut entry = [0u8; 16];
    entry[0] = TYPE_LOCAL_X2APIC;
    entry[1] = 16;
    entry[4..8].copy_from_slice(&x2apic_id.to_le_bytes());
    entry[8..12].copy_from_slice(&LAPIC_ENABLED.to_le_bytes());
    entry[12..16].copy_from_slice(&processor_uid.to_le_bytes());
    entry
}

/// Local x2APIC NMI (type 0xA, 12 bytes).
fn local_x2apic_nmi(processor_uid: u32, flags: u16, lint: u8) -> [u8; 12] {
    let mut entry = [0u8; 12];
    entry[0] = TYPE_LOCAL_X2APIC_NMI;
    entry[1] = 12;
    entry[2..4].copy_from_slice(&flags.to_le_bytes());
    entry[4..8].copy_from_slice(&processor_uid.to_le_bytes());
    entry[8] = lint;
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ids_use_processor_local_apic_entries() {
        let entry = local_apic_entry(7);

        assert_eq!(entry, vec![0, 8, 7, 7, 1, 0, 0, 0]);
    }

    #[test]
    fn ids_past_254_use_x2apic_entries() {
        let entry = local_apic_entry(300);

        assert_eq!(entry.len(), 16);
        assert_eq!(entry[0], TYPE_LOCAL_X2APIC);
        assert_eq!(u32::from_le_bytes(entry[4..8].try_into().unwrap()), 300);
        assert_eq!(u32::from_le_bytes(entry[8..12].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(entry[12..16].try_into().unwrap()), 300);
    }

    fn entry_types(madt: &[u8]) -> Vec<u8> {
        let mut types = Vec::new();
        let mut offset = MADT_HEADER_LEN as usize;
        while let (Some(&kind), Some(&len)) = (madt.get(offset), madt.get(offset + 1)) {
            types.push(kind);
            offset += usize::from(len.max(1));
        }
        types
    }

    #[test]
    fn x2apic_nmi_added_only_with_x2apic_cpus() {
        let small = build_madt(2, DEFAULT_IOAPIC_ADDRESS);
        let large = build_madt(256, DEFAULT_IOAPIC_ADDRESS);

        let small_types = entry_types(small.as_slice());
        let large_types = entry_types(large.as_slice());

        assert!(!small_types.contains(&TYPE_LOCAL_X2APIC));
        assert!(!small_types.contains(&TYPE_LOCAL_X2APIC_NMI));
        assert_eq!(
            large_types
                .iter()
                .filter(|&&t| t == TYPE_LOCAL_X2APIC)
                .count(),
            1
        );
        assert!(large_types.contains(&TYPE_LOCAL_X2APIC_NMI));
    }
}
