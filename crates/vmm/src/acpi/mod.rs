//! ACPI tables for x86_64 guests: RSDP, XSDT, FADT + FACS, DSDT, MADT and MCFG (and the DMAR
//! of `--iommu vtd`, [`build_dmar`], or the VIOT of `--iommu virtio`, [`build_viot`]).
//!
//! The tables are serialized with the `acpi_tables` crate (headers, checksums, AML) and laid out
//! by [`AcpiTableBuilder`] in `layout::ACPI_START..+ACPI_SIZE`: the RSDP first, at `ACPI_START`
//! (16-byte aligned in the BIOS area, so a legacy scan of 0xE0000..0xFFFFF finds it), then the
//! other tables, 8-byte aligned, the XSDT last. Only the MADT entries the crate lacks are encoded
//! by hand (see [`madt`]). Every address and port comes from [`crate::layout`], so the tables
//! agree with the devices and the e820 map.
//!
//! Adding a table (DMAR, VIOT, ...): build it as any `acpi_tables::Aml` value and either append
//! it in [`create_acpi_tables`] or pass it to [`create_acpi_tables_with`]; the builder gives it an
//! address and lists it in the XSDT.

mod builder;
mod dmar;
mod dsdt;
mod fadt;
pub mod hotplug;
mod madt;
#[cfg(test)]
mod tests;
pub mod tpm;
mod viot;

use acpi_tables::mcfg::MCFG;
use acpi_tables::Aml;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use builder::AcpiTableBuilder;
pub use dmar::build_dmar;
pub use dsdt::PciWindows;
pub use madt::DEFAULT_IOAPIC_ADDRESS;
pub use viot::build_viot;

use crate::layout;

/// OEM identification in every table header.
pub const OEM_ID: [u8; 6] = *b"SLUICE";
pub const OEM_TABLE_ID: [u8; 8] = *b"SLUICEVM";
pub const OEM_REVISION: u32 = 1;

/// The one PCI segment sluice has.
const PCI_SEGMENT: u16 = 0;

// The RSDP must be where a legacy scan looks: 16-byte aligned inside 0xE0000..0xFFFFF.
const _: () = assert!(layout::ACPI_START & 0xf == 0);
const _: () = assert!(layout::ACPI_START >= 0xe_0000 && layout::ACPI_START + 36 <= 0x10_0000);
// The 32-bit windows are named by 32-bit AML descriptors.
const _: () = assert!(layout::MMIO32_START + layout::MMIO32_SIZE <= 1 << 32);
const _: () = assert!(layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE <= 1 << 32);
const _: () = assert!(layout::ACPI_START + layout::ACPI_SIZE <= 1 << 32);

/// What the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; APIC ids are 0..num_cpus.
    pub num_cpus: u8,
    /// Guest RAM in bytes; places the 64-bit PCI window (`layout::mmio64_start`).
    pub ram_size: u64,
    /// Where the MADT says the IOAPIC is (`layout::IOAPIC_START`, or the remapping front).
    pub ioapic_address: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the MADT needs at least one vCPU")]
    NoCpus,
    #[error("RAM size {0:#x} leaves no room for the 64-bit PCI window")]
    RamTooLarge(u64),
    #[error("ACPI window {start:#x}+{size:#x} is misaligned or wraps")]
    BadWindow { start: u64, size: u64 },
    #[error("ACPI table {signature} does not fit in the {window_size:#x}-byte ACPI window")]
    WindowFull { signature: String, window_size: u64 },
    #[error("ACPI table {signature} of {len} bytes has an inconsistent header length")]
    MalformedTable { signature: String, len: usize },
    #[error("ACPI tables at {addr:#x}+{len:#x} are not backed by guest memory")]
    NotInGuestMemory { addr: u64, len: u64 },
    #[error("PCI INTx routing: {0}")]
    IntxRouting(sluice_pci::PciError),
    #[error("writing ACPI tables at {addr:#x}: {source}")]
    GuestMemory {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Writes the guest's ACPI tables into `mem` and returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    config: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    create_acpi_tables_with(mem, config, &[])
}

/// As [`create_acpi_tables`], with `extra_tables` (complete SDTs) also listed in the XSDT.
pub fn create_acpi_tables_with(
    mem: &GuestMemoryMmap,
    config: &AcpiConfig,
    extra_tables: &[&dyn Aml],
) -> Result<GuestAddress, AcpiError> {
    if config.num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let pci = pci_windows(config.ram_size)?;
    let mut tables = AcpiTableBuilder::new(GuestAddress(layout::ACPI_START), layout::ACPI_SIZE)?;

    let facs = tables.add_raw(builder::to_bytes(&fadt::build_facs()), fadt::FACS_ALIGN)?;
    let dsdt = tables.add_unlisted_table(&dsdt::build_dsdt(&pci))?;
    let facs_addr = u32::try_from(facs.0).map_err(|_| AcpiError::BadWindow {
        start: layout::ACPI_START,
        size: layout::ACPI_SIZE,
    })?;
    tables.add_table(&fadt::build_fadt(dsdt.0, facs_addr))?;
    tables.add_table(&madt::build_madt(
        u32::from(config.num_cpus),
        config.ioapic_address,
    ))?;
    tables.add_table(&build_mcfg(&pci))?;
    for table in extra_tables {
        tables.add_table(*table)?;
    }
    tables.write_to(mem)
}

/// The PCI host bridge windows for a guest with `ram_size` bytes of RAM.
pub fn pci_windows(ram_size: u64) -> Result<PciWindows, AcpiError> {
    // Bound RAM so that the layout arithmetic (RAM top, 1 GiB round-up, window end) cannot overflow.
    let headroom = layout::RAM_64BIT_START + layout::MMIO64_SIZE + (1 << 30);
    if ram_size.checked_add(headroom).is_none() {
        return Err(AcpiError::RamTooLarge(ram_size));
    }
    let mmio64_start = layout::mmio64_start(ram_size);
    Ok(PciWindows {
        mmio32_start: layout::MMIO32_START as u32,
        mmio32_last: (layout::MMIO32_START + layout::MMIO32_SIZE - 1) as u32,
        mmio64_start,
        mmio64_last: mmio64_start + layout::MMIO64_SIZE - 1,
        ecam_start: layout::PCI_ECAM_START as u32,
        ecam_size: layout::PCI_ECAM_SIZE as u32,
        last_bus: layout::PCI_ECAM_LAST_BUS,
        intx: sluice_pci::IntxRouting::new(layout::PCI_INTX_FIRST_GSI, layout::PCI_INTX_GSIS)
            .map_err(AcpiError::IntxRouting)?,
    })
}

/// MCFG: one ECAM allocation for segment 0.
fn build_mcfg(pci: &PciWindows) -> MCFG {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(u64::from(pci.ecam_start), PCI_SEGMENT, 0, pci.last_bus);
    mcfg
}
