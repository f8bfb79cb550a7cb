//! The TPM's ACPI description (`--tpm`): the TPM2 table (TCG ACPI Specification, rev 4: start
//! method 7, "Command Response Buffer", naming the CRB control area) and an SSDT holding
//! `\_SB_.TPM_`, HID MSFT0101 with the CRB pages as its `_CRS` — what Linux's tpm_crb binds to.
//! The device sits in an SSDT rather than the DSDT so that the DSDT stays the same with or
//! without a TPM. `acpi_tables` has no TPM2 table, so it is laid out on the generic `Sdt`.

use acpi_tables::aml::{Device, Memory32Fixed, Name, Path, ResourceTemplate, Scope};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use sluice_devices::tpm::{CONTROL_AREA, CRB_BASE, CRB_SIZE};

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

const TPM2_REVISION: u8 = 4;
/// Header (36), platform class (2), reserved (2), control area (8), start method (4), start
/// method parameters (12).
const TPM2_LEN: u32 = 64;
const START_METHOD_CRB: u32 = 7;
/// _STA: present, enabled, shown, functioning.
const STA_PRESENT: u8 = 0x0f;

/// The TPM2 table: a client-platform TPM started through its CRB control area.
pub fn build_tpm2() -> Sdt {
    let mut tpm2 = Sdt::new(
        *b"TPM2",
        TPM2_LEN,
        TPM2_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    tpm2.write_u64(40, CONTROL_AREA);
    tpm2.write_u32(48, START_METHOD_CRB);
    tpm2.update_checksum();
    tpm2
}

/// An SSDT with `\_SB_.TPM_` (MSFT0101) and its register pages.
pub fn build_tpm_ssdt() -> Sdt {
    let mut ssdt = Sdt::new(*b"SSDT", 36, 2, OEM_ID, *b"SLUICTPM", OEM_REVISION);
    let registers = Memory32Fixed::new(true, CRB_BASE as u32, CRB_SIZE as u32);
    let resources = ResourceTemplate::new(vec![&registers]);
    let hid = Name::new(Path::new("_HID"), &"MSFT0101");
    let sta = Name::new(Path::new("_STA"), &STA_PRESENT);
    let crs = Name::new(Path::new("_CRS"), &resources);
    let device = Device::new(Path::new("TPM_"), vec![&hid, &sta, &crs]);
    let scope = Scope::new(Path::new("\\_SB_"), vec![&device]);
    let mut aml = Vec::new();
    scope.to_aml_bytes(&mut aml);
    ssdt.append_slice(&aml);
    ssdt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm2_names_the_crb_control_area_and_start_method() {
        let tpm2 = build_tpm2();
        let bytes = tpm2.as_slice();

        assert_eq!(&bytes[..4], b"TPM2");
        assert_eq!(bytes.len(), 64);
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 64);
        assert_eq!(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(
            u64::from_le_bytes(bytes[40..48].try_into().unwrap()),
            0xfed4_0040
        );
        assert_eq!(u32::from_le_bytes(bytes[48..52].try_into().unwrap()), 7);
    }

    #[test]
    fn the_ssdt_holds_an_msft0101_device_over_the_crb_pages() {
        let ssdt = build_tpm_ssdt();
        let bytes = ssdt.as_slice();
        let find = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);

        assert_eq!(&bytes[..4], b"SSDT");
        assert_eq!(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert!(find(b"MSFT0101\0"));
        assert!(find(b"TPM_"));
        // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
        let mut descriptor = vec![0x86, 9, 0, 1];
        descriptor.extend_from_slice(&0xfed4_0000u32.to_le_bytes());
        descriptor.extend_from_slice(&0x5000u32.to_le_bytes());
        assert!(find(&descriptor), "{bytes:x?}");
    }
}
