//! DSDT: the AML namespace of a sluice guest, built with the `acpi_tables::aml` module.
//!
//! ```text
//! \_S5_            Package { S5_SLEEP_TYPE, 0, 0, 0 }
//! \_SB_.PCI0       PCIe host bridge: bus numbers, I/O around CF8..CFF, MMIO32 and MMIO64 windows;
//!                  _PRT: each slot's INTA..INTD to an IOAPIC GSI (swizzled, as the root wires it)
//! \_SB_.MBRD       motherboard resources: the ECAM window (Linux trusts MCFG only if reserved
//!                  here or in e820) and the PM block ports
//!                  plus the hot-plug slots, registers and notify method (acpi::hotplug)
//! \_SB_.GED_       Generic Event Device: hot-plug events (acpi::hotplug)
//! \_SB_.COM1       16550 UART        \_SB_.RTC_   CMOS RTC        \_SB_.KBD_   i8042 keyboard
//! ```

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name, Package,
    Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use sluice_pci::{InterruptPin, IntxRouting};

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout;

/// DSDT revision 2 and later means 64-bit AML integers (needed for the MMIO64 window).
const DSDT_REVISION: u8 = 2;
/// CMOS index + data ports, and the 16550 register block, as AML IO descriptor lengths.
const RTC_PORT_LEN: u8 = layout::RTC_PORT_LEN as u8;
const COM1_PORT_LEN: u8 = layout::SERIAL_PORT_LEN as u8;
/// Device slots on bus 0.
const PCI_SLOTS: u8 = 32;
/// `_PRT` address field: function "any" (0xFFFF) in the low word.
const PRT_ANY_FUNCTION: u32 = 0xffff;

/// The PCI host bridge's address windows, inclusive ends as AML wants them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciWindows {
    pub mmio32_start: u32,
    pub mmio32_last: u32,
    pub mmio64_start: u64,
    pub mmio64_last: u64,
    pub ecam_start: u32,
    pub ecam_size: u32,
    pub last_bus: u8,
    /// How the root bus's INTx pins reach the IOAPIC.
    pub intx: IntxRouting,
}

/// The DSDT table: a header followed by the namespace AML.
pub fn build_dsdt(pci: &PciWindows) -> Sdt {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&namespace_aml(pci));
    dsdt
}

/// The AML body of the DSDT.
pub fn namespace_aml(pci: &PciWindows) -> Vec<u8> {
    let mut system_bus = Vec::new();
    for device in [
        pci_host_bridge(pci),
        motherboard_resources(pci),
        super::hotplug::generic_event_device(),
        com1(),
        rtc(),
        keyboard(),
    ] {
        system_bus.extend_from_slice(&device);
    }
    let mut aml = s5_package();
    aml.extend_from_slice(&Scope::raw(Path::new("\\_SB_"), system_bus));
    aml
}

/// `\_S5_`: the SLP_TYP values the guest writes to PM1a_CNT to power off.
fn s5_package() -> Vec<u8> {
    let sleep_type: u8 = layout::S5_SLEEP_TYPE;
    let mut aml = Vec::new();
    Name::new(
        Path::new("\\_S5_"),
        &Package::new(vec![&sleep_type, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut aml);
    aml
}

fn pci_host_bridge(pci: &PciWindows) -> Vec<u8> {
    let bus_numbers = AddressSpace::<u16>::new_bus_number(0, u16::from(pci.last_bus));
    let config_ports = IO::new(
        layout::PCI_CONFIG_ADDRESS_PORT,
        layout::PCI_CONFIG_ADDRESS_PORT,
        1,
        u8::try_from(layout::PCI_CONFIG_PORT_LEN).unwrap_or(u8::MAX),
    );
    let io_below_config = AddressSpace::<u16>::new_io(0, layout::PCI_CONFIG_ADDRESS_PORT - 1, None);
    let io_above_config = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio32_start,
        pci.mmio32_last,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio64_start,
        pci.mmio64_last,
        None,
    );
    let resources = ResourceTemplate::new(vec![
        &bus_numbers,
        &config_ports,
        &io_below_config,
        &io_above_config,
        &mmio32,
        &mmio64,
    ]);
    device_aml(
        "PCI0",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0A08")),
            &Name::new(Path::new("_CID"), &EISAName::new("PNP0A03")),
            &Name::new(Path::new("_SEG"), &0u8),
            &Name::new(Path::new("_BBN"), &0u8),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_CRS"), &resources),
            &RawAml(routing_table(&pci.intx)),
            &RawAml(super::hotplug::pci_root_children()),
        ],
    )
}

/// Already-serialized AML, to put inside a `Device` next to other children.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// `_PRT`: `Package { slot << 16 | 0xFFFF, pin, 0, GSI }` for every slot and pin. Source 0
/// means the fourth field is a GSI (no link devices); such interrupts are level-triggered,
/// active-low, shareable (ACPI 6.5 §6.2.13).
fn routing_table(intx: &IntxRouting) -> Vec<u8> {
    let entries: Vec<(u32, u8, u32)> = (0..PCI_SLOTS)
        .flat_map(|slot| {
            InterruptPin::ALL.map(|pin| {
                let address = (u32::from(slot) << 16) | PRT_ANY_FUNCTION;
                (address, pin.index(), intx.gsi(slot, pin))
            })
        })
        .collect();
    let packages: Vec<Package<'_>> = entries
        .iter()
        .map(|(address, pin, gsi)| Package::new(vec![address, pin, &0u8, gsi]))
        .collect();
    let children: Vec<&dyn Aml> = packages.iter().map(|p| p as &dyn Aml).collect();
    let mut aml = Vec::new();
    Name::new(Path::new("_PRT"), &Package::new(children)).to_aml_bytes(&mut aml);
    aml
}

fn motherboard_resources(pci: &PciWindows) -> Vec<u8> {
    let ecam = Memory32Fixed::new(true, pci.ecam_start, pci.ecam_size);
    let pm_block = IO::new(
        layout::PM_BLOCK_PORT,
        layout::PM_BLOCK_PORT,
        1,
        u8::try_from(layout::PM_BLOCK_LEN).unwrap_or(u8::MAX),
    );
    let hotplug_block = IO::new(
        layout::HOTPLUG_PORT,
        layout::HOTPLUG_PORT,
        1,
        layout::HOTPLUG_LEN as u8,
    );
    let resources = ResourceTemplate::new(vec![&ecam, &pm_block, &hotplug_block]);
    device_aml(
        "MBRD",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C02")),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_CRS"), &resources),
        ],
    )
}

fn com1() -> Vec<u8> {
    let ports = IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, COM1_PORT_LEN);
    let irq = isa_irq(layout::COM1_IRQ);
    let resources = ResourceTemplate::new(vec![&ports, &irq]);
    device_aml(
        "COM1",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &1u8),
            &Name::new(Path::new("_CRS"), &resources),
        ],
    )
}

fn rtc() -> Vec<u8> {
    let ports = IO::new(layout::RTC_PORT, layout::RTC_PORT, 1, RTC_PORT_LEN);
    let irq = isa_irq(layout::RTC_IRQ);
    let resources = ResourceTemplate::new(vec![&ports, &irq]);
    device_aml(
        "RTC_",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0B00")),
            &Name::new(Path::new("_CRS"), &resources),
        ],
    )
}

fn keyboard() -> Vec<u8> {
    let data = IO::new(layout::I8042_DATA_PORT, layout::I8042_DATA_PORT, 1, 1);
    let command = IO::new(layout::I8042_COMMAND_PORT, layout::I8042_COMMAND_PORT, 1, 1);
    let irq = isa_irq(layout::KEYBOARD_IRQ);
    let resources = ResourceTemplate::new(vec![&data, &command, &irq]);
    device_aml(
        "KBD_",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0303")),
            &Name::new(Path::new("_CRS"), &resources),
        ],
    )
}

/// An edge-triggered, active-high, exclusive ISA interrupt consumed by the device.
fn isa_irq(irq: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, irq)
}

/// `Device (name) { children }` serialized.
fn device_aml(name: &str, children: &[&dyn Aml]) -> Vec<u8> {
    let mut aml = Vec::new();
    Device::new(Path::new(name), children.to_vec()).to_aml_bytes(&mut aml);
    aml
}
