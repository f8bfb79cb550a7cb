//! The debug-exit port: a guest write ends the VM with a chosen status, for test guests.
//!
//! The low byte `v` of a 1..=4 byte write becomes [`GuestExit::DebugExit`]`(v)`, and sluice exits
//! with status `v` itself. This differs from QEMU's `isa-debug-exit`, which exits with
//! `(v << 1) | 1` so that no guest value can look like success; sluice's guest kit wants to
//! report 0 for success directly. Reads return 0. Wider writes are not something a port I/O
//! instruction can produce and are ignored.

use std::sync::Arc;

use sluice_bus::BusDevice;

use crate::{ExitSink, GuestExit};

/// The port of QEMU's `isa-debug-exit,iobase=0xf4`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ports mapped: four, like QEMU's `iosize=4`; only a write at offset 0 acts.
pub const DEBUG_EXIT_LEN: u16 = 4;

/// The debug-exit device model.
pub struct DebugExit {
    exit: Arc<dyn ExitSink>,
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [status, ..]) if data.len() <= 4 => {
                tracing::info!(status, "guest wrote the debug-exit port");
                self.exit.request_exit(GuestExit::DebugExit(*status));
            }
            _ => tracing::debug!(offset, len = data.len(), "ignored debug-exit write"),
        }
    }
}

impl DebugExit {
    /// A debug-exit port reporting to `exit`.
    pub fn new(exit: Arc<dyn ExitSink>) -> Self {
        Self { exit }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::testing::{fuzz_device, RecordingExitSink};

    const BASE: u64 = DEBUG_EXIT_PORT as u64;

    #[test]
    fn byte_write_requests_exit_with_that_value() {
        let sink = RecordingExitSink::new();
        let mut dev = DebugExit::new(sink.clone());

        dev.write(BASE, 0, &[0x2a]);

        assert_eq!(sink.exits(), vec![GuestExit::DebugExit(42)]);
    }

    #[test]
    fn wide_write_uses_low_byte() {
        let sink = RecordingExitSink::new();
        let mut dev = DebugExit::new(sink.clone());

        dev.write(BASE, 0, &0x1234_5601u32.to_le_bytes());

        assert_eq!(sink.exits(), vec![GuestExit::DebugExit(1)]);
    }

    #[test]
    fn writes_wider_than_four_bytes_or_off_port_are_ignored() {
        let sink = RecordingExitSink::new();
        let mut dev = DebugExit::new(sink.clone());

        dev.write(BASE, 0, &[1; 8]);
        dev.write(BASE, 1, &[1]);
        dev.write(BASE, 0, &[]);

        assert!(sink.exits().is_empty());
    }

    #[test]
    fn reads_return_zero() {
        let mut dev = DebugExit::new(RecordingExitSink::new());
        let mut data = [0xffu8; 4];

        dev.read(BASE, 0, &mut data);

        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let mut dev = DebugExit::new(RecordingExitSink::new());

        fuzz_device(&mut dev, BASE, DEBUG_EXIT_LEN.into(), 10_000);
    }
}
