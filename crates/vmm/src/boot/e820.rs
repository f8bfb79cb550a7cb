//! The guest's physical memory map as firmware would report it (BIOS e820 / PVH memmap).
//!
//! Both boot protocols hand the guest the same map, built here from
//! [`layout::ram_regions`](crate::layout::ram_regions) so the map always agrees with the memory
//! that is really backed. No rust-vmm crate derives an e820 map from a layout, hence this module.

use crate::layout;

/// What a range of guest-physical addresses is, using the e820 type numbers (which the PVH
/// `hvm_memmap_table_entry` types reuse).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the guest must not use it as RAM.
    Reserved = 2,
}

impl E820Kind {
    /// The numeric type the e820 and PVH tables carry.
    pub fn raw(self) -> u32 {
        self as u32
    }
}

/// One range of the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

impl E820Entry {
    /// First address past the entry.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// The memory map for a VM with `ram_size` bytes of RAM laid out by `layout::ram_regions`,
/// sorted by address and free of overlaps.
///
/// - RAM below the EBDA (Linux needs usable RAM below 1 MiB for its real-mode trampoline),
/// - reserved EBDA..1 MiB, which also covers the ACPI tables in the BIOS area,
/// - RAM from 1 MiB to the end of the first region,
/// - reserved PCI ECAM window, so Linux trusts the MCFG table ("MMCONFIG ... reserved in E820"),
/// - reserved VT-d register page (whether or not `--iommu vtd` puts the unit there),
/// - RAM above 4 GiB, if the VM has memory past the 32-bit hole.
pub fn e820_map(ram_size: u64) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for (start, size) in layout::ram_regions(ram_size) {
        if start == 0 {
            push_low_region(&mut map, size);
        } else {
            push_nonempty(&mut map, start, size, E820Kind::Ram);
        }
    }
    push_nonempty(
        &mut map,
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
        E820Kind::Reserved,
    );
    push_nonempty(
        &mut map,
        layout::VTD_START,
        layout::VTD_SIZE,
        E820Kind::Reserved,
    );
    map.sort_by_key(|entry| entry.addr);
    map
}

/// The region starting at 0 is split around the legacy BIOS area (EBDA .. 1 MiB).
fn push_low_region(map: &mut Vec<E820Entry>, size: u64) {
    push_nonempty(map, 0, size.min(layout::EBDA_START), E820Kind::Ram);
    push_nonempty(
        map,
        layout::EBDA_START,
        layout::HIGH_RAM_START - layout::EBDA_START,
        E820Kind::Reserved,
    );
    push_nonempty(
        map,
        layout::HIGH_RAM_START,
        size.saturating_sub(layout::HIGH_RAM_START),
        E820Kind::Ram,
    );
}

fn push_nonempty(map: &mut Vec<E820Entry>, addr: u64, size: u64, kind: E820Kind) {
    if size > 0 {
        map.push(E820Entry { addr, size, kind });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn assert_sorted_without_overlaps(map: &[E820Entry]) {
        for pair in map.windows(2) {
            assert!(
                pair[0].end() <= pair[1].addr,
                "{:x?} overlaps or precedes {:x?}",
                pair[0],
                pair[1]
            );
        }
    }

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum()
    }

    fn ecam_entry() -> E820Entry {
        E820Entry {
            addr: layout::PCI_ECAM_START,
            size: layout::PCI_ECAM_SIZE,
            kind: E820Kind::Reserved,
        }
    }

    fn vtd_entry() -> E820Entry {
        E820Entry {
            addr: layout::VTD_START,
            size: layout::VTD_SIZE,
            kind: E820Kind::Reserved,
        }
    }

    #[test]
    fn map_for_128_mib_has_low_ram_bios_hole_high_ram_ecam_and_vtd() {
        let ram_size = 128 * MIB;

        let map = e820_map(ram_size);

        let expected = vec![
            E820Entry {
                addr: 0,
                size: layout::EBDA_START,
                kind: E820Kind::Ram,
            },
            E820Entry {
                addr: layout::EBDA_START,
                size: MIB - layout::EBDA_START,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                addr: MIB,
                size: 127 * MIB,
                kind: E820Kind::Ram,
            },
            ecam_entry(),
            vtd_entry(),
        ];
        assert_eq!(map, expected);
        assert_sorted_without_overlaps(&map);
        assert_eq!(ram_total(&map), ram_size - (MIB - layout::EBDA_START));
    }

    #[test]
    fn map_for_5_gib_splits_ram_around_the_32_bit_hole() {
        let ram_size = 5 * GIB;

        let map = e820_map(ram_size);

        assert_sorted_without_overlaps(&map);
        assert_eq!(map.len(), 6);
        assert_eq!(
            map[2],
            E820Entry {
                addr: MIB,
                size: layout::RAM_32BIT_END - MIB,
                kind: E820Kind::Ram,
            }
        );
        assert_eq!(map[3], ecam_entry());
        assert_eq!(map[4], vtd_entry());
        assert_eq!(
            map[5],
            E820Entry {
                addr: layout::RAM_64BIT_START,
                size: ram_size - layout::RAM_32BIT_END,
                kind: E820Kind::Ram,
            }
        );
        assert_eq!(ram_total(&map), ram_size - (MIB - layout::EBDA_START));
    }

    #[test]
    fn bios_area_and_acpi_tables_are_reserved_not_ram() {
        let map = e820_map(256 * MIB);

        let covering = |addr: u64| map.iter().find(|e| e.addr <= addr && addr < e.end());

        for addr in [
            layout::EBDA_START,
            layout::ACPI_START,
            layout::ACPI_START + layout::ACPI_SIZE - 1,
        ] {
            assert_eq!(covering(addr).map(|e| e.kind), Some(E820Kind::Reserved));
        }
        assert_eq!(
            covering(layout::EBDA_START - 1).map(|e| e.kind),
            Some(E820Kind::Ram)
        );
        assert_eq!(
            covering(layout::HIGH_RAM_START).map(|e| e.kind),
            Some(E820Kind::Ram)
        );
    }

    #[test]
    fn ram_never_overlaps_the_ecam_window() {
        for ram_size in [128 * MIB, 3 * GIB, 4 * GIB, 5 * GIB] {
            let map = e820_map(ram_size);

            assert!(map.contains(&ecam_entry()));
            assert_sorted_without_overlaps(&map);
        }
    }
}
