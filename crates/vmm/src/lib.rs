pub mod layout;
pub mod interrupts;
pub mod memory;
pub mod vcpu;
pub mod acpi;
pub mod boot;
