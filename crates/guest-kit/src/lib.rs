//! Host side of the sluice guest kit.
//!
//! The guest kit is a small freestanding kernel (`<repo>/guest`) that boots by PVH, exercises
//! devices according to its command line and reports on the serial console (see the guest kit
//! contract). This crate:
//! - builds it (build.rs) and embeds the ELF as [`GUEST_KIT_ELF`];
//! - runs it under QEMU or sluice with a hard timeout ([`GuestKitRun`]);
//! - parses the console into a [`GuestKitReport`].

pub mod host;
pub mod pattern;
pub mod report;
pub mod run;
pub mod tpm;

use std::io;
use std::path::PathBuf;

pub use host::{find_qemu, find_qemu_in, kvm_unavailable_reason, skip_without_kvm};
pub use report::{
    AcpiLine, ExitKind, GuestKitReport, Latency, MalformedLine, PciBar, PciLine, Verdict,
    WorkloadResult,
};
pub use run::{Accel, Device, Firmware, GuestKitRun, Machine, Vmm};

/// The guest kit ELF (PVH entry), built from `<repo>/guest` by this crate's build script.
pub static GUEST_KIT_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sluice-guest.elf"));

/// Errors of the runner (not of the guest: those are in [`GuestKitReport::exit`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{} not found on PATH; install it with: {}",
        host::QEMU_BINARY,
        host::QEMU_INSTALL_HINT
    )]
    QemuMissing,
    #[error("writing the guest kit ELF to {path}: {source}")]
    WriteKernel { path: PathBuf, source: io::Error },
    #[error("starting {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("waiting for the VMM: {0}")]
    Wait(io::Error),
    #[error("the runner attaches devices under QEMU only; pass sluice device flags in extra_args")]
    DevicesNeedQemu,
}
