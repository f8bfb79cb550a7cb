//! Platform (legacy PC) devices reached through port I/O: the COM1 UART, the i8042 keyboard
//! controller, the MC146818 CMOS RTC, the ACPI power-management block and the debug-exit port.
//!
//! Every device is a [`sluice_bus::BusDevice`] laid out alike: model struct, `BusDevice` impl,
//! constructor, tests. The devices crate does not depend on the VMM, so each module repeats the
//! port numbers it conventionally lives at as local constants that mirror
//! `crates/vmm/src/layout.rs`; the VMM chooses where to map them.

pub mod acpi_pm;
pub mod clock;
pub mod debug_exit;
pub mod i8042;
pub mod rtc;
pub mod serial;

#[cfg(test)]
mod testing;

pub use acpi_pm::AcpiPmBlock;
pub use clock::{ManualClock, MonotonicClock, SystemMonotonicClock, SystemWallClock, WallClock};
pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use rtc::Rtc;
pub use serial::{CaptureBuffer, Serial, SerialOutput};

/// The byte of a one-byte access, or `None` for any other width. The ISA registers modelled here
/// are byte-wide; guests (Linux, firmware) only use `inb`/`outb` on them.
fn single_byte(data: &[u8]) -> Option<u8> {
    match data {
        [byte] => Some(*byte),
        _ => None,
    }
}
