//! Runner tests with stand-in VMMs (shell scripts run as the `sluice` binary): console capture,
//! exit status mapping, and the hard timeout that must kill a hung VMM instead of waiting.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sluice_guest_kit::{ExitKind, Firmware, GuestKitRun, Verdict, Vmm};

/// A stand-in VMM script in a unique temp file, removed on drop.
struct FakeVmm(PathBuf);

impl FakeVmm {
    fn new(name: &str, body: &str) -> FakeVmm {
        let path = std::env::temp_dir().join(format!(
            "sluice-guest-kit-fake-{name}-{}.sh",
            std::process::id()
        ));
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write fake vmm");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod fake vmm");
        FakeVmm(path)
    }

    fn run(&self, timeout: Duration) -> GuestKitRun {
        GuestKitRun {
            vmm: Vmm::Sluice {
                binary: self.0.clone(),
                extra_args: Vec::new(),
            },
            cmdline: "w=info".into(),
            memory_mib: 64,
            cpus: 1,
            devices: Vec::new(),
            timeout,
            firmware: Firmware::SeaBios,
            packed_virtqueues: false,
            monitor: None,
        }
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn console_and_status_of_the_vmm_become_the_report() {
    let vmm = FakeVmm::new(
        "fail",
        "echo \"sluice-guest: args $*\"\necho 'GUEST-KIT FAIL blk'\necho oops >&2\nexit 1",
    );

    let report = vmm.run(Duration::from_secs(10)).run().expect("run");

    assert_eq!(
        report.exit,
        ExitKind::WorkloadFailed,
        "{}",
        report.describe()
    );
    assert_eq!(report.verdict, Some(Verdict::Fail("blk".into())));
    assert!(
        report.console.contains("--cmdline w=info"),
        "{}",
        report.console
    );
    assert_eq!(report.vmm_stderr, "oops\n");
    assert!(!report.host_timed_out);
}

#[test]
fn hung_vmm_is_killed_at_the_hard_timeout() {
    let vmm = FakeVmm::new(
        "hang",
        "echo 'sluice-guest: waiting forever'\nexec sleep 60",
    );
    let started = Instant::now();

    let report = vmm.run(Duration::from_millis(300)).run().expect("run");

    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(report.exit, ExitKind::Timeout);
    assert!(report.host_timed_out);
    assert!(
        report.console.contains("waiting forever"),
        "{}",
        report.console
    );
}

#[test]
fn vmm_killed_by_a_signal_is_reported_as_killed() {
    let vmm = FakeVmm::new("signal", "kill -KILL $$");

    let report = vmm.run(Duration::from_secs(10)).run().expect("run");

    assert_eq!(report.exit, ExitKind::Killed);
    assert!(!report.host_timed_out);
}

#[test]
fn missing_vmm_binary_is_a_runner_error() {
    let run = FakeVmm::new("unused", "").run(Duration::from_secs(1));
    let run = GuestKitRun {
        vmm: Vmm::Sluice {
            binary: PathBuf::from("/nonexistent/sluice"),
            extra_args: Vec::new(),
        },
        ..run
    };

    let result = run.run();

    let error = result.expect_err("spawn must fail").to_string();
    assert!(error.contains("/nonexistent/sluice"), "{error}");
}

#[test]
fn vmm_that_reports_a_fatal_kvm_error_is_stopped_without_waiting_for_the_timeout() {
    // QEMU prints this and then pauses the VM forever.
    let vmm = FakeVmm::new(
        "kvmerror",
        "echo 'KVM internal error. Suberror: 1' >&2\necho 'RIP=0000000000102624' >&2\nexec sleep 60",
    );
    let started = Instant::now();

    let report = vmm.run(Duration::from_secs(30)).run().expect("run");

    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(report.exit, ExitKind::VmmFailed, "{}", report.describe());
    assert!(!report.host_timed_out);
    assert!(report.vmm_stderr.contains("RIP="), "{}", report.vmm_stderr);
}
