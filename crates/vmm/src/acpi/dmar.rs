//! DMAR: the DMA remapping reporting table that tells the guest where its VT-d unit is (Intel
//! VT-d spec, chapter 8). `acpi_tables` has no DMAR, so it is laid out here on its generic
//! `Sdt`: the header fields, then one DRHD (hardware unit definition) with INCLUDE_PCI_ALL for
//! segment 0, so every PCI device sluice creates is behind the unit without device scopes.
//! With interrupt remapping the flags say so (INTR_REMAP) and the DRHD gains the one device
//! scope Linux requires before it remaps: the IOAPIC, by its MADT id and its source id (the
//! path bus:dev.fn its interrupt requests carry).

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID, PCI_SEGMENT};

const DMAR_REVISION: u8 = 1;
/// Header (36) + host address width (1) + flags (1) + reserved (10).
const DMAR_HEADER_LEN: u32 = 48;
const DRHD_TYPE: u16 = 0;
const DRHD_LEN: u16 = 16;
/// Device scope: type 3 (IOAPIC), length 8 (6-byte header + one 2-byte path entry).
const SCOPE_IOAPIC: u8 = 3;
const SCOPE_IOAPIC_LEN: u8 = 8;
const DRHD_INCLUDE_PCI_ALL: u8 = 1;
/// DMAR flags bit 0: interrupt remapping supported. No x2APIC opt-out (bit 1): Linux keeps
/// x2APIC and remaps in xAPIC mode (the unit has no EIM). No DMA control opt-in (bit 2).
const DMAR_FLAG_INTR_REMAP: u8 = 1;

/// The DMAR for one remapping unit whose registers are at `register_base`, addressing
/// `host_address_width` bits of guest physical memory; with `interrupt_remapping`, the IOAPIC
/// `ioapic_id` with source id `ioapic_source` is in its scope.
pub fn build_dmar(
    host_address_width: u8,
    register_base: u64,
    interrupt_remapping: Option<(u8, u16)>,
) -> Sdt {
    let mut dmar = Sdt::new(
        *b"DMAR",
        DMAR_HEADER_LEN,
        DMAR_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    // The width field holds N - 1 for an N-bit width.
    dmar.write_u8(36, host_address_width.saturating_sub(1));
    let flags = if interrupt_remapping.is_some() {
        DMAR_FLAG_INTR_REMAP
    } else {
        0
    };
    dmar.write_u8(37, flags);
    let scope_len = if interrupt_remapping.is_some() {
        u16::from(SCOPE_IOAPIC_LEN)
    } else {
        0
    };
    let mut drhd = Vec::with_capacity(usize::from(DRHD_LEN + scope_len));
    drhd.extend_from_slice(&DRHD_TYPE.to_le_bytes());
    drhd.extend_from_slice(&(DRHD_LEN + scope_len).to_le_bytes());
    drhd.push(DRHD_INCLUDE_PCI_ALL);
    // Size of the register set: 2^0 pages.
    drhd.push(0);
    drhd.extend_from_slice(&PCI_SEGMENT.to_le_bytes());
    drhd.extend_from_slice(&register_base.to_le_bytes());
    if let Some((ioapic_id, source)) = interrupt_remapping {
        let [bus, devfn] = source.to_be_bytes();
        // Type, length, 2 reserved bytes, enumeration id (the MADT's IOAPIC id), start bus,
        // then the path: device, function.
        drhd.extend_from_slice(&[SCOPE_IOAPIC, SCOPE_IOAPIC_LEN, 0, 0, ioapic_id, bus]);
        drhd.extend_from_slice(&[devfn >> 3, devfn & 7]);
    }
    dmar.append_slice(&drhd);
    dmar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmar_has_one_include_all_drhd_and_a_valid_checksum() {
        let dmar = build_dmar(39, 0xfed9_0000, None);
        let bytes = dmar.as_slice();

        assert_eq!(&bytes[..4], b"DMAR");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 64);
        assert_eq!(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(bytes[36], 38, "host address width 39");
        assert_eq!(bytes[37], 0, "no interrupt remapping");
        assert_eq!(u16::from_le_bytes([bytes[48], bytes[49]]), 0, "DRHD");
        assert_eq!(u16::from_le_bytes([bytes[50], bytes[51]]), 16);
        assert_eq!(bytes[52], 1, "INCLUDE_PCI_ALL");
        assert_eq!(u16::from_le_bytes([bytes[54], bytes[55]]), 0, "segment 0");
        assert_eq!(
            u64::from_le_bytes(bytes[56..64].try_into().unwrap()),
            0xfed9_0000
        );
    }

    #[test]
    fn interrupt_remapping_sets_the_flag_and_scopes_the_ioapic() {
        let dmar = build_dmar(39, 0xfed9_0000, Some((0, 0xff00)));
        let bytes = dmar.as_slice();

        assert_eq!(bytes[37], 1, "INTR_REMAP");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 72);
        assert_eq!(
            u16::from_le_bytes([bytes[50], bytes[51]]),
            24,
            "DRHD with a scope"
        );
        assert_eq!(
            &bytes[64..72],
            &[3, 8, 0, 0, 0, 0xff, 0, 0],
            "IOAPIC 0 at ff:00.0"
        );
        assert_eq!(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }
}
