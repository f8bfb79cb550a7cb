//! `--tpm` through the binary: the guest kit's CRB driver (`w=tpm`, checked first on QEMU's
//! tpm-crb in crates/guest-kit/tests/qemu.rs) on sluice's TPM, backed by a swtpm that sluice
//! starts (`state=DIR`) or that runs already (`socket=PATH`); and the TPM's state in a
//! snapshot, restored into a new process on a swtpm of its own.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    ctl, run_on_sluice, run_sluice, skip_without_kvm, wait_for, wait_or_kill, EXIT_VMM_ERROR,
    GUEST_TIMEOUT, SLUICE,
};
use sluice_guest_kit::tpm::{check_pcr_chain, SwtpmProcess};

fn swtpm_installed() -> bool {
    Command::new("swtpm").arg("--version").output().is_ok()
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

/// The guest kit's RESULT object on a console.
fn kit_result(console: &str) -> serde_json::Value {
    console
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix("RESULT ")?).ok())
        .unwrap_or_else(|| panic!("no RESULT on the console:\n{console}"))
}

/// PCR 16 extended (`w=tpm:hold=MS`), then the VM paused and snapshotted while the kit holds;
/// the snapshot is restored into a new process whose swtpm starts from an empty state
/// directory: the restored kit reads PCR 16 back equal to what it extended — the TPM's state
/// (swtpm's permanent and volatile blobs, the CRB registers) travelled in the snapshot, not
/// in a state directory. A restore of that snapshot without `--tpm` is refused by name.
#[test]
fn a_pcr_extended_before_a_snapshot_reads_back_equal_after_restore_on_a_fresh_swtpm() {
    let name = "a_pcr_extended_before_a_snapshot_reads_back_equal_after_restore_on_a_fresh_swtpm";
    if skip_without_kvm(name) || !swtpm_installed() {
        return;
    }
    let dir = temp_dir("snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    let (socket, first, snapshot) = (
        dir.join("api.sock"),
        dir.join("first.txt"),
        dir.join("snap"),
    );
    let (state_a, state_b) = (dir.join("tpm-a"), dir.join("tpm-b"));
    let mut vm = start_holding_pcr_16(&state_a, &socket, &first);

    let paused = ctl(&socket, &["pause"]);
    let taken = ctl(&socket, &["snapshot", &snapshot.display().to_string()]);
    let _ = ctl(&socket, &["shutdown"]);
    let first_status = wait_or_kill(&mut vm, Duration::from_secs(20));
    let without_tpm = Command::new(SLUICE)
        .args(["run", "--restore"])
        .arg(&snapshot)
        .output()
        .unwrap();
    let restored = Command::new(SLUICE)
        .args(["run", "--restore"])
        .arg(&snapshot)
        .arg(format!("--tpm=state={}", state_b.display()))
        .output()
        .unwrap();

    assert_eq!(paused.0, 0, "{paused:?}");
    assert_eq!(taken.0, 0, "{taken:?}");
    assert_eq!(first_status, Some(0));
    let before = std::fs::read_to_string(&first).unwrap();
    assert!(
        !before.contains("RESULT"),
        "paused after the hold:\n{before}"
    );
    let saved = sluice_vmm::snapshot::read(&snapshot).expect("the snapshot reads back");
    let tpm = saved
        .platform
        .and_then(|p| p.tpm)
        .expect("the snapshot carries the TPM");
    assert!(!tpm.tpm.permanent.data.is_empty(), "swtpm's permanent blob");
    assert!(!tpm.tpm.volatile.data.is_empty(), "swtpm's volatile blob");
    assert_eq!(without_tpm.status.code(), Some(EXIT_VMM_ERROR));
    assert!(
        String::from_utf8_lossy(&without_tpm.stderr).contains("restore it with --tpm"),
        "{without_tpm:?}"
    );
    let console = String::from_utf8_lossy(&restored.stdout);
    let log = String::from_utf8_lossy(&restored.stderr);
    assert_eq!(restored.status.code(), Some(0), "{console}\n{log}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    let result = kit_result(&console);
    check_pcr_chain(&result).unwrap();
    assert_eq!(
        result["pcr_held"], result["pcr_after"],
        "PCR 16 after the restore equals PCR 16 before the snapshot: {result}"
    );
    println!(
        "{name}: PCR 16 {} before the snapshot and after the restore; blobs: permanent {} \
         bytes, volatile {} bytes, savestate {} bytes",
        result["pcr_held"],
        tpm.tpm.permanent.data.len(),
        tpm.tpm.volatile.data.len(),
        tpm.tpm.savestate.data.len()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The same through a live migration: the kit extends PCR 16 and holds; `sluice ctl migrate`
/// moves the VM to a `sluice run --migrate-from` on a swtpm of its own (empty state directory);
/// the kit finishes there and reads PCR 16 back equal.
#[test]
fn a_pcr_extended_before_a_live_migration_reads_back_equal_at_the_destination() {
    let name = "a_pcr_extended_before_a_live_migration_reads_back_equal_at_the_destination";
    if skip_without_kvm(name) || !swtpm_installed() {
        return;
    }
    let dir = temp_dir("migration");
    std::fs::create_dir_all(&dir).unwrap();
    let (socket, first) = (dir.join("api.sock"), dir.join("source.txt"));
    let stream = dir.join("migrate.sock");
    let url = format!("unix:{}", stream.display());
    let destination = Command::new(SLUICE)
        .arg("run")
        .arg(format!("--tpm=state={}", dir.join("tpm-b").display()))
        .args(["--migrate-from", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination");
    wait_for("the destination to listen", Duration::from_secs(10), || {
        stream.exists()
    });
    let mut source = start_holding_pcr_16(&dir.join("tpm-a"), &socket, &first);

    let (status, answer) = ctl(&socket, &["migrate", &url]);
    let source_status = wait_or_kill(&mut source, Duration::from_secs(20));
    let finished = destination.wait_with_output().unwrap();

    let console = String::from_utf8_lossy(&finished.stdout);
    let log = String::from_utf8_lossy(&finished.stderr);
    assert_eq!(status, 0, "{answer}\n--- destination ---\n{log}");
    assert_eq!(source_status, Some(0), "the source exits 0 once migrated");
    let before = std::fs::read_to_string(&first).unwrap();
    assert!(
        !before.contains("RESULT"),
        "migrated after the hold:\n{before}"
    );
    assert_eq!(finished.status.code(), Some(0), "{console}\n{log}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    let result = kit_result(&console);
    check_pcr_chain(&result).unwrap();
    assert_eq!(
        result["pcr_held"], result["pcr_after"],
        "PCR 16 at the destination equals PCR 16 at the source: {result}"
    );
    let report: serde_json::Value = serde_json::from_str(answer.trim()).expect(&answer);
    println!(
        "{name}: PCR 16 {} at both ends; total {} ms, downtime {} ms",
        result["pcr_held"], report["total_ms"], report["downtime_ms"]
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A VM on `--tpm=state=STATE` whose kit extends PCR 16 and holds (`w=tpm:hold=8000`),
/// returned once its console (`serial`) says so.
fn start_holding_pcr_16(state: &Path, socket: &Path, serial: &Path) -> Child {
    let vm = Command::new(SLUICE)
        .arg("run")
        .arg(format!("--tpm=state={}", state.display()))
        .arg("--api-socket")
        .arg(socket)
        .arg(format!("--serial=file={}", serial.display()))
        .args(["--cmdline", "w=tpm:hold=8000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    wait_for("the kit to extend PCR 16", Duration::from_secs(60), || {
        std::fs::read_to_string(serial).is_ok_and(|c| c.contains("tpm: holding"))
    });
    vm
}
