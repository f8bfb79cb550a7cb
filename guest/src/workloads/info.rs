//! `info`: the ACPI and PCI lines were printed during boot; this checks there was something
//! to print and reports counts.

use super::Outcome;

pub fn run() -> Outcome {
    let tables = crate::acpi::info().map(|info| info.tables.len()).unwrap_or(0);
    let devices = crate::pci::devices().len();
    let cpus = crate::acpi::info().map(|info| info.lapic_ids.len()).unwrap_or(0);
    let pass = tables > 0 && devices > 0;
    crate::println!(
        "RESULT {{\"workload\":\"info\",\"acpi_tables\":{},\"pci_devices\":{},\"cpus\":{},\"timer_irqs\":{},\"pass\":{}}}",
        tables,
        devices,
        cpus,
        crate::interrupts::count(crate::interrupts::TIMER_VECTOR),
        pass
    );
    if pass {
        Outcome::Pass
    } else {
        Outcome::Fail
    }
}
