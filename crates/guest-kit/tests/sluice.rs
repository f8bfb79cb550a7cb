//! The guest kit under sluice itself, when the test is told where the sluice binary is:
//! `SLUICE_BIN=target/debug/sluice cargo test -p sluice-guest-kit --test sluice`.
//! (sluice depends on this crate, so this crate cannot build it; sluice's own tests can use
//! `GuestKitRun::sluice(env!("CARGO_BIN_EXE_sluice"), ..)`.) Without `SLUICE_BIN` or KVM the
//! test prints a SKIP line.

use std::path::PathBuf;

use sluice_guest_kit::{skip_without_kvm, GuestKitRun};

fn sluice_binary(test: &str) -> Option<PathBuf> {
    match std::env::var_os("SLUICE_BIN") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            println!("SKIP {test}: SLUICE_BIN is not set");
            None
        }
    }
}

#[test]
fn info_passes_under_sluice() {
    const TEST: &str = "info_passes_under_sluice";
    let Some(binary) = sluice_binary(TEST) else {
        return;
    };
    if skip_without_kvm(TEST) {
        return;
    }

    let report = GuestKitRun::sluice(&binary, "w=info")
        .run()
        .expect("run sluice");

    assert!(report.passed(), "{}", report.describe());
    assert!(report.acpi_table("FACP").is_some(), "{}", report.describe());
    assert!(
        report.pci.iter().any(|p| p.is_host_bridge()),
        "{}",
        report.describe()
    );
}
