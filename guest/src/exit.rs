//! Ending the run: the exit byte goes to the debug-exit port 0xf4 (sluice: process status;
//! QEMU isa-debug-exit: (byte << 1) | 1). If that port does nothing, ACPI S5 power-off via the
//! FADT's PM1a control block with SLP_TYP from the DSDT's `\_S5` package (see `acpi::S5`), and
//! failing that a HLT loop with interrupts off.

use crate::arch::{self, idt::TrapFrame};

// A copy (guest/ is its own no_std workspace) of `DEBUG_EXIT_PORT` in
// crates/devices/src/platform/debug_exit.rs.
const DEBUG_EXIT_PORT: u16 = 0xf4;
const SLP_EN: u16 = 1 << 13;

/// Exit statuses of the contract.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Status {
    Pass = 0,
    WorkloadFailed = 1,
    Panic = 2,
    CpuException = 3,
    Timeout = 4,
    BadCommandLine = 5,
}

impl Status {
    /// The status a byte names; anything unknown counts as a panic.
    pub fn from_byte(byte: u8) -> Status {
        match byte {
            0 => Status::Pass,
            1 => Status::WorkloadFailed,
            3 => Status::CpuException,
            4 => Status::Timeout,
            5 => Status::BadCommandLine,
            _ => Status::Panic,
        }
    }
}

/// Ends the run with `status`; never returns. From ring 3 through the `Exit` service.
pub fn exit(status: Status) -> ! {
    if arch::ring3::in_ring3() {
        arch::ring3::call(arch::ring3::Service::Exit, status as u64, 0);
    }
    arch::disable_interrupts();
    arch::outb(DEBUG_EXIT_PORT, status as u8);
    if let Some((port, sleep_type)) = crate::acpi::s5_control() {
        arch::outw(port, (u16::from(sleep_type) << 10) | SLP_EN);
    }
    arch::halt_forever()
}

/// Prints the final FAIL line and exits with `status`.
pub fn fail(status: Status, reason: core::fmt::Arguments<'_>) -> ! {
    crate::println!("GUEST-KIT FAIL {}", reason);
    exit(status)
}

/// Reports a CPU exception and exits with status 3.
pub fn cpu_exception(frame: &TrapFrame) -> ! {
    crate::say!(
        "CPU exception vector={} rip={:#x} error={:#x} rsp={:#x} cr2={:#x}",
        frame.vector,
        frame.rip,
        frame.error_code,
        frame.rsp,
        arch::read_cr2()
    );
    fail(
        Status::CpuException,
        format_args!("cpu exception {}", frame.vector),
    )
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(location) => crate::say!(
            "panic at {}:{}: {}",
            location.file(),
            location.line(),
            info.message()
        ),
        None => crate::say!("panic: {}", info.message()),
    }
    fail(Status::Panic, format_args!("panic"))
}
