pub mod acpi;
pub mod boot;
pub mod interrupts;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod platform;
pub mod vcpu;
