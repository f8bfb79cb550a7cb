//! End-to-end boots of the assembler test guests (`tests/guests/*.S`) through the real `sluice`
//! binary on KVM: console output, debug-exit status, ACPI power-off, i8042 reset, crash
//! reporting, PCI config access (CF8/CFC and ECAM), the RTC, SMP bring-up and MSI-X delivery.
//! Without a usable /dev/kvm each test prints a SKIP line and passes.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{
    boot_guest, build_guest, skip_without_kvm, wait_or_kill, Run, EXIT_GUEST_CRASH,
    EXIT_GUEST_RESET,
};

/// Exit codes the guests use for their own failures (tests/guests/common.inc).
const GUEST_EXIT_TIMEOUT: i32 = 3;
const GUEST_EXIT_NOT_FOUND: i32 = 4;

fn assert_status(run: &Run, expected: i32) {
    assert_eq!(run.status, Some(expected), "{}", run.transcript());
}

fn assert_console_has(run: &Run, text: &str) {
    assert!(
        run.stdout.contains(text),
        "console lacks {text:?}\n{}",
        run.transcript()
    );
}

/// The console line starting with `prefix`, without the prefix.
fn console_value<'a>(run: &'a Run, prefix: &str) -> &'a str {
    run.stdout
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no console line starting {prefix:?}\n{}", run.transcript()))
}

#[test]
fn hello_guest_prints_and_exits_zero() {
    if skip_without_kvm("hello_guest_prints_and_exits_zero") {
        return;
    }
    let run = boot_guest("hello", &[]);
    assert_console_has(&run, "hello from the guest\n");
    assert_status(&run, 0);
}

#[test]
fn debug_exit_value_becomes_the_exit_status() {
    if skip_without_kvm("debug_exit_value_becomes_the_exit_status") {
        return;
    }
    let run = boot_guest("exit_code", &[]);
    assert_console_has(&run, "exit_code: leaving with 42");
    assert_status(&run, 42);
}

#[test]
fn acpi_s5_powers_off_with_status_zero() {
    if skip_without_kvm("acpi_s5_powers_off_with_status_zero") {
        return;
    }
    let run = boot_guest("poweroff", &[]);
    assert_console_has(&run, "poweroff: entering S5");
    assert!(
        !run.stdout.contains("still running"),
        "{}",
        run.transcript()
    );
    assert_status(&run, 0);
}

#[test]
fn i8042_reset_stops_the_vm_with_status_120() {
    if skip_without_kvm("i8042_reset_stops_the_vm_with_status_120") {
        return;
    }
    let run = boot_guest("reset", &[]);
    assert_status(&run, EXIT_GUEST_RESET);
    assert!(
        run.stderr.contains("reset"),
        "sluice should say the guest reset\n{}",
        run.transcript()
    );
    assert!(
        !run.stdout.contains("still running"),
        "{}",
        run.transcript()
    );
}

#[test]
fn triple_fault_is_reported_as_a_crash() {
    if skip_without_kvm("triple_fault_is_reported_as_a_crash") {
        return;
    }
    let run = boot_guest("crash", &[]);
    assert_status(&run, EXIT_GUEST_CRASH);
    assert!(run.stderr.contains("crashed"), "{}", run.transcript());
    assert!(!run.stderr.contains("panicked"), "{}", run.transcript());
}

#[test]
fn serial_goes_to_a_file_or_nowhere_as_asked() {
    if skip_without_kvm("serial_goes_to_a_file_or_nowhere_as_asked") {
        return;
    }
    let console = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hello-console.{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&console);
    let to_file = boot_guest("hello", &[&format!("--serial=file={}", console.display())]);
    let silent = boot_guest("hello", &["--serial", "off"]);

    let written = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_file(&console);
    assert_status(&to_file, 0);
    assert!(
        written.contains("hello from the guest"),
        "file held {written:?}"
    );
    assert!(
        !to_file.stdout.contains("hello"),
        "{}",
        to_file.transcript()
    );
    assert_status(&silent, 0);
    assert!(!silent.stdout.contains("hello"), "{}", silent.transcript());
}

#[test]
fn pci_config_space_agrees_through_cf8_and_ecam() {
    if skip_without_kvm("pci_config_space_agrees_through_cf8_and_ecam") {
        return;
    }
    let run = boot_guest("pci", &[]);
    let cf8 = console_value(&run, "cf8 id=");
    let ecam = console_value(&run, "ecam id=");
    assert_eq!(cf8.len(), 8, "{}", run.transcript());
    assert_ne!(
        cf8,
        "ffffffff",
        "no host bridge at 00:00.0\n{}",
        run.transcript()
    );
    assert_eq!(cf8, ecam, "{}", run.transcript());
    assert_console_has(&run, "missing 00:1f.0 cf8=ffffffff ecam=ffffffff");
    assert_status(&run, 0);
}

/// Days since 1970-01-01 of a proleptic Gregorian date (civil calendar arithmetic on 400-year
/// eras, so no table of month lengths is needed).
fn days_since_epoch(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let shifted_month = (month + 9) % 12; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Parses `YYYY-MM-DD HH:MM:SS` into Unix seconds.
fn parse_rtc_line(text: &str) -> Option<i64> {
    let (date, time) = text.trim().split_once(' ')?;
    let date: Vec<i64> = date
        .split('-')
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let time: Vec<i64> = time
        .split(':')
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let ([y, mo, d], [h, mi, s]) = (date.as_slice(), time.as_slice()) else {
        return None;
    };
    let valid = (1..=12).contains(mo) && (1..=31).contains(d) && *h < 24 && *mi < 60 && *s < 60;
    valid.then(|| days_since_epoch(*y, *mo, *d) * 86_400 + h * 3600 + mi * 60 + s)
}

#[test]
fn rtc_date_conversion_matches_known_instants() {
    assert_eq!(parse_rtc_line("1970-01-01 00:00:00"), Some(0));
    assert_eq!(parse_rtc_line("2000-03-01 00:00:00"), Some(951_868_800));
    assert_eq!(parse_rtc_line("2026-11-22 03:56:51"), Some(1_795_319_811));
    assert_eq!(parse_rtc_line("2026-13-01 00:00:00"), None);
}

#[test]
fn rtc_reads_host_utc() {
    if skip_without_kvm("rtc_reads_host_utc") {
        return;
    }
    let run = boot_guest("rtc", &[]);
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;

    assert_status(&run, 0);
    let shown = console_value(&run, "rtc ");
    let guest_now = parse_rtc_line(shown)
        .unwrap_or_else(|| panic!("unparsable RTC line {shown:?}\n{}", run.transcript()));
    assert!(
        (guest_now - host_now).abs() <= 120,
        "guest RTC {shown} is {} s away from host UTC\n{}",
        guest_now - host_now,
        run.transcript()
    );
}

#[test]
fn second_cpu_starts_through_init_sipi() {
    if skip_without_kvm("second_cpu_starts_through_init_sipi") {
        return;
    }
    let run = boot_guest("smp", &["--cpus", "2"]);
    assert_console_has(&run, "smp: ap apic id 1 up\n");
    assert_status(&run, 0);
}

#[test]
fn smp_guest_times_out_with_one_cpu() {
    if skip_without_kvm("smp_guest_times_out_with_one_cpu") {
        return;
    }
    let run = boot_guest("smp", &["--cpus", "1"]);
    assert_console_has(&run, "smp: timeout waiting for the AP");
    assert_status(&run, GUEST_EXIT_TIMEOUT);
}

#[test]
fn test_device_msix_interrupt_reaches_the_guest() {
    if skip_without_kvm("test_device_msix_interrupt_reaches_the_guest") {
        return;
    }
    let run = boot_guest("msix", &["--test-device"]);
    assert_console_has(&run, "msix: interrupt received\n");
    assert_console_has(&run, "msix: second interrupt received\n");
    assert_status(&run, 0);
}

#[test]
fn test_device_intx_is_routed_by_the_line_register_and_reasserts_until_cleared() {
    if skip_without_kvm(
        "test_device_intx_is_routed_by_the_line_register_and_reasserts_until_cleared",
    ) {
        return;
    }
    let run = boot_guest("intx", &["--test-device"]);
    assert_console_has(&run, "intx: interrupt received\n");
    assert_console_has(&run, "intx: re-asserted after EOI\n");
    assert_console_has(&run, "intx: quiet after the ISR read (");
    assert_status(&run, 0);
}

#[test]
fn test_device_is_absent_unless_asked_for() {
    if skip_without_kvm("test_device_is_absent_unless_asked_for") {
        return;
    }
    let run = boot_guest("msix", &[]);
    assert_console_has(&run, "msix: test device not found on bus 0");
    assert_status(&run, GUEST_EXIT_NOT_FOUND);
}

#[test]
fn sigterm_stops_the_vm_and_still_writes_its_metrics() {
    if skip_without_kvm("sigterm_stops_the_vm_and_still_writes_its_metrics") {
        return;
    }
    let scratch = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sigterm.{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let console = scratch.join("console.txt");
    let metrics = scratch.join("metrics.json");
    let mut child = std::process::Command::new(common::SLUICE)
        .args(["run", "--kernel"])
        .arg(build_guest("wait"))
        .arg(format!("--serial=file={}", console.display()))
        .arg("--metrics")
        .arg(&metrics)
        .arg("--rng")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start sluice");
    let waiting = wait_for_text(&console, "waiting", std::time::Duration::from_secs(20));

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_or_kill(&mut child, std::time::Duration::from_secs(20));

    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let written = std::fs::read_to_string(&metrics).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(waiting, "the guest never said it was waiting");
    assert_eq!(status, Some(128 + libc::SIGTERM), "stderr: {stderr}");
    assert!(stderr.contains("stopped by signal 15"), "stderr: {stderr}");
    let json: serde_json::Value = serde_json::from_str(&written).expect("metrics JSON");
    assert!(
        json["outcome"].as_str().unwrap_or("").contains("Stopped"),
        "{json:#}"
    );
    assert!(
        json["devices"].as_array().is_some_and(|d| !d.is_empty()),
        "{json:#}"
    );
}

/// Polls `path` until it contains `text` or `timeout` passes.
fn wait_for_text(path: &std::path::Path, text: &str, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(text)) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}
