//! Wiring `--tpm`: the TPM 2.0 CRB device (sluice-devices `tpm`) on the MMIO bus at its
//! fixed pages, backed by swtpm — connected to a running one (`socket=PATH`) or started here
//! with per-guest state (`state=DIR`) — and its ACPI tables (acpi/tpm.rs).
//!
//! swtpm is connected and initialised before any vCPU runs, on the main thread (its control
//! channel handshake passes an fd, which vCPU filters do not allow); afterwards the vCPU that
//! starts a command only reads and writes the two sockets. Snapshots and migration save and
//! restore the device through `PlatformDevices` (platform.rs), on the thread that captures or
//! builds the VM.

use std::sync::{Arc, Mutex};

use sluice_devices::tpm::swtpm::Swtpm;
use sluice_devices::tpm::{TpmCrb, CRB_BASE, CRB_SIZE};

use crate::config::TpmSpec;
use crate::machine::{device_err, VmError};
use crate::vcpu::ExitDispatch;

/// Connects or starts swtpm and maps the CRB device; returns it for snapshots.
pub fn attach_tpm(
    dispatch: &ExitDispatch,
    spec: Option<&TpmSpec>,
) -> Result<Option<Arc<Mutex<TpmCrb>>>, VmError> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    let swtpm = match spec {
        TpmSpec::Socket(path) => Swtpm::connect(path),
        TpmSpec::State(dir) => Swtpm::spawn(dir),
    }
    .map_err(|e| device_err("tpm", e))?;
    let crb = Arc::new(Mutex::new(TpmCrb::new(Box::new(swtpm))));
    dispatch
        .mmio
        .insert("tpm-crb", crb.clone(), CRB_BASE, CRB_SIZE)
        .map_err(|e| device_err("tpm", e))?;
    tracing::info!("tpm: CRB at {CRB_BASE:#x}, backed by swtpm ({spec:?})");
    Ok(Some(crb))
}

/// The TPM2 table and the SSDT with the TPM device, when there is a TPM.
pub fn acpi_tables(tpm: bool) -> Vec<acpi_tables::sdt::Sdt> {
    if tpm {
        vec![
            crate::acpi::tpm::build_tpm2(),
            crate::acpi::tpm::build_tpm_ssdt(),
        ]
    } else {
        Vec::new()
    }
}
