//! COM1 console (0x3f8, 115200 8N1), polled. A missing or stuck UART never hangs the guest:
//! the wait for "transmit holding register empty" gives up after a bounded spin.

use crate::arch::{inb, outb};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

// A copy (guest/ is its own no_std workspace): the host defines it as `COM1_PORT` in
// crates/devices/src/platform/serial.rs.
const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const THR_EMPTY: u8 = 0x20;
const MAX_SPIN: u32 = 100_000;

static QUIET: AtomicBool = AtomicBool::new(false);

/// Programs the UART: 115200 baud, 8N1, FIFOs on, interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
    outb(COM1 + 4, 0x03);
}

fn put_byte(byte: u8) {
    let mut spins = 0;
    while inb(LINE_STATUS) & THR_EMPTY == 0 && spins < MAX_SPIN {
        crate::arch::pause();
        spins += 1;
    }
    outb(COM1, byte);
}

/// Suppresses `chatter!` lines (the `quiet` command-line token).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether per-device chatter is suppressed.
pub fn is_quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Writes bytes to the UART (CPL0 only: port I/O).
pub fn write_bytes(bytes: &[u8]) {
    for &byte in bytes {
        put_byte(byte);
    }
}

/// The console as a `fmt::Write` sink.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes formatted text to the console. In ring 3 the text is formatted first and handed to
/// ring 0 in one `Write` service call (each call is a round trip through the IDT).
pub fn write_fmt(args: fmt::Arguments<'_>) {
    if crate::arch::ring3::in_ring3() {
        let text = alloc::fmt::format(args);
        crate::arch::ring3::call(
            crate::arch::ring3::Service::Write,
            text.as_ptr() as u64,
            text.len() as u64,
        );
        return;
    }
    let _ = Console.write_fmt(args);
}

/// Prints a line verbatim.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        $crate::console::write_fmt(format_args!("{}\n", format_args!($($arg)*)));
    }};
}

/// Prints a `sluice-guest: ...` line.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        $crate::println!("sluice-guest: {}", format_args!($($arg)*));
    }};
}

/// Prints a `sluice-guest: ...` line unless `quiet` was given.
#[macro_export]
macro_rules! chatter {
    ($($arg:tt)*) => {{
        if !$crate::console::is_quiet() {
            $crate::say!($($arg)*);
        }
    }};
}
