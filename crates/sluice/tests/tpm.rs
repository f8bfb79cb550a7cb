//! `--tpm` through the binary: the guest kit's CRB driver (`w=tpm`, checked first on QEMU's
//! tpm-crb in crates/guest-kit/tests/qemu.rs) on sluice's TPM, backed by a swtpm that sluice
//! starts (`state=DIR`) or that runs already (`socket=PATH`).

mod common;

use std::path::{Path, PathBuf};

use common::{run_on_sluice, run_sluice, skip_without_kvm, EXIT_VMM_ERROR, GUEST_TIMEOUT};
use sluice_guest_kit::tpm::{check_pcr_chain, SwtpmProcess};

fn swtpm_installed() -> bool {
    std::process::Command::new("swtpm")
        .arg("--version")
        .output()
        .is_ok()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tpm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// sluice starts swtpm with this guest's state: the kit sees the TPM2 table and the SSDT, and
/// PCR 16 extend then read gives SHA-256(zeros || digest); swtpm's state is in DIR afterwards.
#[test]
fn guest_kit_extends_a_pcr_on_a_tpm_sluice_started() {
    if skip_without_kvm("guest_kit_extends_a_pcr_on_a_tpm_sluice_started") || !swtpm_installed() {
        return;
    }
    let state = temp_dir("state");

    let (report, _) = run_on_sluice(
        "w=tpm",
        vec!["--tpm".into(), format!("state={}", state.display())],
    );

    assert!(report.passed(), "{}", report.describe());
    assert!(report.acpi_table("TPM2").is_some(), "{}", report.console);
    assert!(report.acpi_table("SSDT").is_some(), "{}", report.console);
    check_pcr_chain(&report.results[0].raw).unwrap();
    assert!(
        state.join("tpm2-00.permall").exists(),
        "no swtpm state in {}",
        state.display()
    );
    let _ = std::fs::remove_dir_all(state);
}

/// Two guests on two running swtpms (`socket=PATH`), one after the other on the same TPMs:
/// each TPM's PCR chain holds and each guest reads its own random bytes.
#[test]
fn guest_kit_extends_a_pcr_on_a_running_swtpm() {
    if skip_without_kvm("guest_kit_extends_a_pcr_on_a_running_swtpm") || !swtpm_installed() {
        return;
    }
    let dirs = [temp_dir("socket-a"), temp_dir("socket-b")];
    let mut randoms = Vec::new();

    for dir in &dirs {
        let swtpm = SwtpmProcess::start(dir).expect("start swtpm");
        let (report, _) = run_on_sluice(
            "w=tpm",
            vec!["--tpm".into(), format!("socket={}", swtpm.socket.display())],
        );
        assert!(report.passed(), "{}", report.describe());
        let result = &report.results[0].raw;
        check_pcr_chain(result).unwrap();
        randoms.push(result["random"].as_str().unwrap().to_string());
    }

    assert_ne!(randoms[0], randoms[1]);
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A control socket nobody serves: sluice refuses to start, naming it.
#[test]
fn a_missing_swtpm_socket_is_refused_at_start() {
    if skip_without_kvm("a_missing_swtpm_socket_is_refused_at_start") {
        return;
    }
    let socket = temp_dir("missing").join("ctrl.sock");

    let run = run_sluice(
        &[
            "run".to_string(),
            "--tpm".to_string(),
            format!("socket={}", socket.display()),
            "--cmdline".to_string(),
            "w=info".to_string(),
        ],
        GUEST_TIMEOUT,
    );

    assert_eq!(run.status, Some(EXIT_VMM_ERROR), "{}", run.transcript());
    assert!(
        run.stderr
            .contains("cannot connect to swtpm's control socket"),
        "{}",
        run.transcript()
    );
}
