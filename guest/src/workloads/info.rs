//! `info`: the ACPI and PCI lines were printed during boot; this checks there was something
//! to print and reports counts.

use super::Outcome;

/// Sleeps until two wake-up timer interrupts arrived (exercises delivery, EOI and IRET).
fn timer_ticks() -> u64 {
    let vector = crate::interrupts::TIMER_VECTOR;
    let before = crate::interrupts::count(vector);
    let deadline = crate::time::Deadline::after_ms(200);
    while crate::interrupts::count(vector) < before + 2 && !deadline.expired() {
        crate::arch::wait_for_interrupt_unless(|| crate::interrupts::count(vector) >= before + 2);
    }
    crate::interrupts::count(vector) - before
}

pub fn run() -> Outcome {
    let ticks = timer_ticks();
    let tables = crate::acpi::info()
        .map(|info| info.tables.len())
        .unwrap_or(0);
    let devices = crate::pci::devices().len();
    let cpus = crate::acpi::info()
        .map(|info| info.lapic_ids.len())
        .unwrap_or(0);
    // `clock=virtual` runs no wake-up timer: there are no ticks to count.
    let pass = tables > 0 && devices > 0 && (ticks >= 2 || crate::time::is_virtual());
    crate::println!(
        "RESULT {{\"workload\":\"info\",\"acpi_tables\":{},\"pci_devices\":{},\"cpus\":{},\"timer_irqs\":{},\"pass\":{}}}",
        tables,
        devices,
        cpus,
        ticks,
        pass
    );
    if pass {
        Outcome::Pass
    } else {
        Outcome::Fail
    }
}
