//! Platform (legacy PC) devices reached through port I/O: the COM1 UART, the i8042 keyboard
//! controller, the MC146818 CMOS RTC, the ACPI power-management block and the debug-exit port.
//!
//! Every device is a [`sluice_bus::BusDevice`] laid out alike: model struct, `BusDevice` impl,
//! constructor, tests. Each module defines the ports it conventionally lives at (the one
//! definition: `crates/vmm/src/layout.rs` re-exports them to map the devices and build the ACPI
//! tables; the guest kit, its own no_std workspace, keeps copies that point here).

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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use sluice_bus::{Bus, SharedDevice};

    use super::acpi_pm::{PM_BLOCK_LEN, PM_BLOCK_PORT};
    use super::debug_exit::{DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
    use super::i8042::{I8042_DATA_PORT, I8042_PORT_LEN};
    use super::rtc::{RTC_PORT, RTC_PORT_LEN};
    use super::serial::{COM1_PORT, SERIAL_PORT_LEN};
    use super::testing::{RecordingExitSink, RecordingIrq};
    use super::*;
    use crate::GuestExit;

    fn shared(device: impl sluice_bus::BusDevice + 'static) -> SharedDevice {
        Arc::new(Mutex::new(device))
    }

    /// Maps every platform device at its conventional ports, as the VMM will.
    fn platform_bus() -> (Bus, Arc<RecordingExitSink>, CaptureBuffer) {
        let exits = RecordingExitSink::new();
        let console = CaptureBuffer::new();
        // 2026-11-22 13:45:30 UTC.
        let wall = ManualClock::new(Duration::from_secs(1_795_355_130));
        let serial = Serial::new(
            SerialOutput::capture_only(console.clone()),
            RecordingIrq::new(),
        );
        let pm = AcpiPmBlock::new(exits.clone(), None, Box::new(ManualClock::default()));
        let devices: [(&str, SharedDevice, u16, u16); 5] = [
            ("com1", shared(serial), COM1_PORT, SERIAL_PORT_LEN),
            (
                "i8042",
                shared(I8042::new(exits.clone(), None)),
                I8042_DATA_PORT,
                I8042_PORT_LEN,
            ),
            (
                "rtc",
                shared(Rtc::new(Box::new(wall))),
                RTC_PORT,
                RTC_PORT_LEN,
            ),
            ("acpi-pm", shared(pm), PM_BLOCK_PORT, PM_BLOCK_LEN),
            (
                "debug-exit",
                shared(DebugExit::new(exits.clone())),
                DEBUG_EXIT_PORT,
                DEBUG_EXIT_LEN,
            ),
        ];
        let bus = Bus::new();
        for (name, device, port, len) in devices {
            bus.insert(name, device, port.into(), len.into()).unwrap();
        }
        (bus, exits, console)
    }

    #[test]
    fn devices_answer_at_their_conventional_ports() {
        let (bus, exits, console) = platform_bus();
        let mut minutes = [0u8];
        let mut i8042_status = [0u8];

        bus.write(0x3f8, b"A");
        bus.write(0x70, &[0x02]);
        bus.read(0x71, &mut minutes);
        bus.read(0x64, &mut i8042_status);
        bus.write(0x64, &[0xfe]);
        bus.write(0x604, &((5u16 << 10) | (1 << 13)).to_le_bytes());
        bus.write(0x60c, &[6]);
        bus.write(0xf4, &[0x2a]);

        assert_eq!(console.text(), "A");
        assert_eq!(minutes, [0x45]);
        assert_eq!(i8042_status[0] & 0x04, 0x04, "system flag");
        assert_eq!(
            exits.exits(),
            vec![
                GuestExit::Reset,
                GuestExit::PowerOff,
                GuestExit::Reset,
                GuestExit::DebugExit(42)
            ]
        );
    }
}
