//! VIOT: the Virtual I/O Translation table (ACPI 6.4 §5.2.32) that tells the guest which
//! endpoints sit behind a paravirtual IOMMU, for `--iommu virtio`. `acpi_tables` has no VIOT, so
//! it is laid out here on its generic `Sdt`: the header, then one virtio-pci IOMMU node naming
//! the virtio-iommu's BDF and one PCI range node mapping segment 0's endpoint BDFs to it, with
//! endpoint id = BDF (the requester id the device's `DmaSpace` is keyed by).

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID, PCI_SEGMENT};

const VIOT_REVISION: u8 = 0;
/// Header (36) + node count (2) + node offset (2) + reserved (8).
const VIOT_HEADER_LEN: u32 = 48;
const NODE_PCI_RANGE: u8 = 1;
const NODE_VIRTIO_PCI_IOMMU: u8 = 3;
const PCI_RANGE_LEN: u16 = 24;
const VIRTIO_PCI_IOMMU_LEN: u16 = 16;

/// The VIOT for a virtio-pci IOMMU at `iommu_bdf` translating the endpoints with BDFs
/// `endpoints` (inclusive; `None`: no endpoint, the table names only the IOMMU).
pub fn build_viot(iommu_bdf: u16, endpoints: Option<(u16, u16)>) -> Sdt {
    let mut viot = Sdt::new(
        *b"VIOT",
        VIOT_HEADER_LEN,
        VIOT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let nodes = 1 + u16::from(endpoints.is_some());
    viot.write_u16(36, nodes);
    viot.write_u16(38, VIOT_HEADER_LEN as u16);
    // The IOMMU node comes first, so the range node's output points at the header's end.
    let iommu_offset = VIOT_HEADER_LEN as u16;
    let mut iommu = Vec::with_capacity(usize::from(VIRTIO_PCI_IOMMU_LEN));
    iommu.push(NODE_VIRTIO_PCI_IOMMU);
    iommu.push(0);
    iommu.extend_from_slice(&VIRTIO_PCI_IOMMU_LEN.to_le_bytes());
    iommu.extend_from_slice(&PCI_SEGMENT.to_le_bytes());
    iommu.extend_from_slice(&iommu_bdf.to_le_bytes());
    iommu.extend_from_slice(&[0; 8]);
    viot.append_slice(&iommu);
    if let Some((first, last)) = endpoints {
        let mut range = Vec::with_capacity(usize::from(PCI_RANGE_LEN));
        range.push(NODE_PCI_RANGE);
        range.push(0);
        range.extend_from_slice(&PCI_RANGE_LEN.to_le_bytes());
        // Endpoint id of the first BDF: ids are the BDFs themselves.
        range.extend_from_slice(&u32::from(first).to_le_bytes());
        range.extend_from_slice(&PCI_SEGMENT.to_le_bytes());
        range.extend_from_slice(&PCI_SEGMENT.to_le_bytes());
        range.extend_from_slice(&first.to_le_bytes());
        range.extend_from_slice(&last.to_le_bytes());
        range.extend_from_slice(&iommu_offset.to_le_bytes());
        range.extend_from_slice(&[0; 6]);
        viot.append_slice(&range);
    }
    viot
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le16(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([bytes[at], bytes[at + 1]])
    }

    #[test]
    fn viot_names_the_iommu_and_routes_the_endpoint_range_to_it() {
        let viot = build_viot(0x08, Some((0x10, 0x28)));
        let bytes = viot.as_slice();

        assert_eq!(&bytes[..4], b"VIOT");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 88);
        assert_eq!(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!((le16(bytes, 36), le16(bytes, 38)), (2, 48));
        // virtio-pci IOMMU node at 48.
        assert_eq!((bytes[48], le16(bytes, 50)), (3, 16));
        assert_eq!(
            (le16(bytes, 52), le16(bytes, 54)),
            (0, 0x08),
            "segment, BDF"
        );
        // PCI range node at 64.
        assert_eq!((bytes[64], le16(bytes, 66)), (1, 24));
        assert_eq!(
            u32::from_le_bytes(bytes[68..72].try_into().unwrap()),
            0x10,
            "endpoint id = BDF"
        );
        assert_eq!((le16(bytes, 72), le16(bytes, 74)), (0, 0), "segments");
        assert_eq!((le16(bytes, 76), le16(bytes, 78)), (0x10, 0x28), "BDFs");
        assert_eq!(le16(bytes, 80), 48, "output node: the IOMMU");
    }

    #[test]
    fn viot_without_endpoints_has_only_the_iommu_node() {
        let viot = build_viot(0x08, None);

        assert_eq!(viot.as_slice().len(), 64);
        assert_eq!(le16(viot.as_slice(), 36), 1);
    }
}
