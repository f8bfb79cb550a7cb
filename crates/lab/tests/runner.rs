//! The lab runner's own promises, through a real L1: the command's output and status come
//! back, the repository is read-only for L1 (its writes land in a tmpfs overlay), the share is
//! writable, and the hard timeout stops a command that never ends.

use std::time::Duration;

use sluice_lab::{repo_root, Lab, SCRATCH};

fn skip(test: &str) -> bool {
    if sluice_lab::inside_lab() {
        println!("SKIP {test}: already inside the lab");
        return true;
    }
    sluice_lab::skip_without_lab(test)
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-lab-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the share");
    dir
}

#[test]
fn lab_returns_output_and_status_and_keeps_the_repository_read_only() {
    if skip("lab-runner") {
        return;
    }
    let share = temp_dir("runner");
    let probe = repo_root().join(format!("lab-write-probe-{}", std::process::id()));
    let script = format!(
        "echo to-stdout; echo to-stderr >&2; \
         test -c /dev/kvm && echo kvm-ok; \
         echo written-in-l1 > {probe} && cat {probe}; \
         echo shared > {SCRATCH}/from-l1; \
         exit 7",
        probe = probe.display()
    );

    let run = Lab::new()
        .share(&share)
        .timeout(Duration::from_secs(180))
        .run(&script);

    assert_eq!(run.status, Some(7), "{}", run.transcript());
    for line in ["to-stdout", "kvm-ok", "written-in-l1"] {
        assert!(
            run.stdout.lines().any(|l| l == line),
            "{}",
            run.transcript()
        );
    }
    assert!(run.stderr.contains("to-stderr"), "{}", run.transcript());
    assert!(!probe.exists(), "L1 wrote {} on the host", probe.display());
    let shared = std::fs::read_to_string(share.join("from-l1")).unwrap_or_default();
    assert_eq!(shared, "shared\n");
    let _ = std::fs::remove_dir_all(&share);
}

#[test]
fn lab_hard_timeout_stops_a_command_that_never_ends() {
    if skip("lab-timeout") {
        return;
    }
    let timeout = Duration::from_secs(30);

    let run = Lab::new()
        .timeout(timeout)
        .run("echo started; sleep 100000");

    assert_eq!(run.status, None, "{}", run.transcript());
    assert!(
        run.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("timeout")),
        "{}",
        run.transcript()
    );
    assert!(run.stdout.contains("started"), "{}", run.transcript());
    // The runner polls every 0.2 s; the slack covers QEMU's exit. (Counted from QEMU's start:
    // waiting for another test's L1 is not part of the timeout.)
    let total = run.total_seconds.expect("the runner measured the run");
    assert!(
        total >= timeout.as_secs_f64() && total < timeout.as_secs_f64() + 5.0,
        "stopped after {total:.1} s"
    );
}
