//! Guest physical memory map (x86_64). One place, so ACPI, e820, boot loaders and PCI agree.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00   RAM (low; holds boot structures below)
//! 0x0009_fc00 .. 0x000a_0000   reserved (EBDA)
//! 0x000e_0000 .. 0x0010_0000   reserved: ACPI tables (RSDP found by legacy scan here)
//! 0x0010_0000 .. RAM_32BIT_END RAM
//! 0xc000_0000 .. 0xe000_0000   32-bit PCI MMIO window (BARs)
//! 0xe000_0000 .. 0xf000_0000   PCI ECAM (MMCONFIG), buses 0..=255
//! 0xfec0_0000                  IOAPIC        0xfee0_0000  LAPIC
//! 0xfec0_1000                  the remapping IOAPIC front (`--iommu vtd` with interrupt
//!                              remapping: the IOAPIC the MADT names then)
//! 0xfed9_0000                  VT-d registers (`--iommu vtd`), reserved in e820
//! 4 GiB .. 4 GiB + rest        RAM above the hole
//! align_up(ram top, 1 GiB) ..  64-bit PCI MMIO window (MMIO64_SIZE)
//! ```

/// Boot GDT (PVH/Linux 64-bit entry).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty; the guest installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux zero page (boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity page tables for 64-bit Linux entry (PML4, PDPTE, PDE).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted (Linux COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// End of low RAM (start of the EBDA hole).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area so a legacy RSDP scan also finds them.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_SIZE: u64 = 0x20000;
/// Start of high RAM; kernels load here.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// RAM below 4 GiB stops here; above it starts the 32-bit device hole.
pub const RAM_32BIT_END: u64 = 0xc000_0000;
/// 32-bit PCI MMIO window for BARs.
pub const MMIO32_START: u64 = 0xc000_0000;
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration access (ECAM), segment 0, buses 0..=255.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
pub const PCI_ECAM_LAST_BUS: u8 = 255;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// With interrupt remapping, the MADT's IOAPIC: sluice's front that translates redirection
/// entries into KVM's in-kernel IOAPIC at `IOAPIC_START` (crate::intremap).
pub const REMAPPING_IOAPIC_START: u64 = 0xfec0_1000;
pub const REMAPPING_IOAPIC_SIZE: u64 = 0x1000;
/// The IOAPIC's source id for interrupt remapping (bus 0xff, 00.0, as QEMU's q35), named by the
/// DMAR's IOAPIC device scope.
pub const IOAPIC_REQUESTER_ID: u16 = 0xff00;
/// The VT-d register page (`--iommu vtd`), where QEMU's q35 puts it too; named by the DMAR.
pub const VTD_START: u64 = 0xfed9_0000;
pub const VTD_SIZE: u64 = 0x1000;
/// First address above the 32-bit hole.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// 64-bit PCI MMIO window size; its base is `mmio64_start(ram_size)`.
pub const MMIO64_SIZE: u64 = 0x4_0000_0000;

/// ISA IRQs of the legacy devices: COM1, the i8042 keyboard port, the CMOS RTC.
pub const COM1_IRQ: u32 = 4;
pub const KEYBOARD_IRQ: u32 = 1;
pub const RTC_IRQ: u32 = 8;
/// The port map: each device model defines where it lives (one definition, used here to map the
/// devices and to build the ACPI tables that advertise them).
pub use sluice_devices::platform::acpi_pm::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, PM1A_CNT_PORT, PM1A_EVT_PORT, PM_BLOCK_LEN, PM_BLOCK_PORT,
    PM_TMR_PORT, S5_SLEEP_TYPE,
};
pub use sluice_devices::platform::debug_exit::{DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
pub use sluice_devices::platform::i8042::{I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_PORT_LEN};
pub use sluice_devices::platform::rtc::{RTC_PORT, RTC_PORT_LEN};
pub use sluice_devices::platform::serial::{COM1_PORT, SERIAL_PORT_LEN};
/// PCI configuration mechanism #1 ports (CONFIG_ADDRESS, CONFIG_DATA).
pub use sluice_pci::{
    CONFIG_ADDRESS_PORT as PCI_CONFIG_ADDRESS_PORT, CONFIG_PORT_LEN as PCI_CONFIG_PORT_LEN,
};
/// IOAPIC id in the MADT and the number of IOAPIC pins (GSIs 0..24).
pub const IOAPIC_ID: u8 = 0;
pub const IOAPIC_PINS: u32 = 24;
/// SCI interrupt.
pub const SCI_IRQ: u32 = 9;
/// The PCI hot-plug register block (`crate::hotplug::registers`), after the PM block.
pub const HOTPLUG_PORT: u16 = 0x0620;
pub const HOTPLUG_LEN: u64 = crate::hotplug::registers::HOTPLUG_BLOCK_LEN;
/// The ACPI Generic Event Device's interrupt (hot-plug events): an ISA pin nothing else uses,
/// edge-triggered and active high as the GED's `_CRS` says.
pub const HOTPLUG_GED_IRQ: u32 = 5;
/// PCI INTx: the IOAPIC inputs above the ISA IRQs (GSIs 16..24), shared by the slots with the
/// standard swizzle (`sluice_pci::IntxRouting`); the DSDT's `_PRT` describes the same mapping.
pub const PCI_INTX_FIRST_GSI: u32 = 16;
pub const PCI_INTX_GSIS: u32 = IOAPIC_PINS - PCI_INTX_FIRST_GSI;

const GIB: u64 = 1 << 30;

// The windows must not overlap; checked at compile time.
const _: () = {
    assert!(MMIO32_START + MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
    assert!(IOAPIC_START + IOAPIC_SIZE <= VTD_START && VTD_START + VTD_SIZE <= LAPIC_START);
    assert!(IOAPIC_START + IOAPIC_SIZE <= REMAPPING_IOAPIC_START);
    assert!(REMAPPING_IOAPIC_START + REMAPPING_IOAPIC_SIZE <= VTD_START);
    assert!(ACPI_START + ACPI_SIZE <= HIGH_RAM_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
};

/// The guest RAM regions `(start, size)` for `ram_size` bytes of memory, split around the hole.
pub fn ram_regions(ram_size: u64) -> Vec<(u64, u64)> {
    if ram_size <= RAM_32BIT_END {
        vec![(0, ram_size)]
    } else {
        vec![
            (0, RAM_32BIT_END),
            (RAM_64BIT_START, ram_size - RAM_32BIT_END),
        ]
    }
}

/// End (exclusive) of the highest RAM region.
pub fn ram_top(ram_size: u64) -> u64 {
    ram_regions(ram_size)
        .last()
        .map(|(s, l)| s + l)
        .unwrap_or(0)
}

/// Base of the 64-bit PCI MMIO window: the first GiB boundary above RAM and above 4 GiB.
pub fn mmio64_start(ram_size: u64) -> u64 {
    ram_top(ram_size).max(RAM_64BIT_START).div_ceil(GIB) * GIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(mmio64_start(128 << 20), RAM_64BIT_START);
    }

    #[test]
    fn large_ram_splits_around_the_hole() {
        let regions = ram_regions(4 * GIB);
        assert_eq!(regions, vec![(0, RAM_32BIT_END), (RAM_64BIT_START, GIB)]);
        assert_eq!(ram_top(4 * GIB), 5 * GIB);
        assert_eq!(mmio64_start(4 * GIB), 5 * GIB);
    }
}
