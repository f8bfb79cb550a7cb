//! Bad input to `sluice run` (and `sluice serve blk`): each case must end with one clear error
//! line on stderr (never a panic or a backtrace) and a non-zero status: 125 for errors sluice
//! reports, 2 for flags clap rejects. The messages name the offending input when KVM is
//! usable; without KVM, sluice stops earlier at /dev/kvm, and the tests then check only the
//! shape of the error.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use common::{build_guest, kvm_unusable_reason, run_sluice, Run, EXIT_VMM_ERROR};

/// clap's status for a rejected command line.
const EXIT_USAGE: i32 = 2;
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// A scratch file path unique to this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli");
    fs::create_dir_all(&dir).expect("create the scratch directory");
    dir.join(format!("{}.{name}", std::process::id()))
}

fn run(args: &[&str]) -> Run {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    run_sluice(&full, CLI_TIMEOUT)
}

/// Asserts the run failed with `status` and exactly one error line that mentions each of
/// `mentions` (case-insensitive; only checked when KVM is usable, or always for usage errors,
/// which clap reports before anything else runs).
fn assert_one_clear_error(run: &Run, status: i32, mentions: &[&str]) {
    let transcript = run.transcript();
    assert_eq!(run.status, Some(status), "{transcript}");
    assert!(!run.stderr.contains("panicked"), "{transcript}");
    assert!(!run.stderr.contains("backtrace"), "{transcript}");
    let error_lines: Vec<&str> = run
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("error"))
        .collect();
    assert_eq!(error_lines.len(), 1, "want one error line\n{transcript}");
    let line = error_lines[0];
    if status == EXIT_VMM_ERROR {
        assert_eq!(
            run.stderr_lines().len(),
            1,
            "want nothing but the error line\n{transcript}"
        );
        assert!(line.starts_with("sluice: error: "), "{transcript}");
    }
    assert_no_repeated_cause(line);
    if status == EXIT_USAGE || kvm_unusable_reason().is_none() {
        let lower = line.to_lowercase();
        for mention in mentions {
            assert!(
                lower.contains(&mention.to_lowercase()),
                "error line should mention {mention:?}: {line}"
            );
        }
    }
}

/// A cause chain printed twice ("x: No such file: No such file") reads as a bug.
fn assert_no_repeated_cause(line: &str) {
    let parts: Vec<&str> = line.split(": ").collect();
    for pair in parts.windows(2) {
        assert_ne!(pair[0], pair[1], "cause repeated in: {line}");
    }
}

/// Deterministic noise (xorshift), so a failure can be reproduced byte for byte.
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn missing_kernel_file() {
    let kernel = scratch("no-such-kernel");
    let run = run(&["--kernel", kernel.to_str().unwrap()]);
    assert_one_clear_error(&run, EXIT_VMM_ERROR, &["no-such-kernel"]);
}

#[test]
fn corrupt_kernel() {
    let kernel = scratch("noise-kernel");
    fs::write(&kernel, noise(64 * 1024)).unwrap();
    let run = run(&["--kernel", kernel.to_str().unwrap()]);
    let _ = fs::remove_file(&kernel);
    assert_one_clear_error(&run, EXIT_VMM_ERROR, &["noise-kernel", "kernel"]);
}

#[test]
fn missing_initrd_file() {
    let kernel = build_guest("hello");
    let initrd = scratch("no-such-initrd");
    let run = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    assert_one_clear_error(&run, EXIT_VMM_ERROR, &["no-such-initrd"]);
}

#[test]
fn initrd_larger_than_ram() {
    let kernel = build_guest("hello");
    let initrd = scratch("huge-initrd");
    // Sparse: 200 MiB of apparent size costs no disk.
    fs::File::create(&initrd)
        .and_then(|f| f.set_len(200 << 20))
        .unwrap();
    let run = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "128M",
    ]);
    let _ = fs::remove_file(&initrd);
    assert_one_clear_error(&run, EXIT_VMM_ERROR, &["initrd"]);
}

#[test]
fn cmdline_longer_than_2048_bytes() {
    let kernel = build_guest("hello");
    let cmdline = "x".repeat(2049);
    let run = run(&["--kernel", kernel.to_str().unwrap(), "--cmdline", &cmdline]);
    assert_one_clear_error(&run, EXIT_VMM_ERROR, &["command line"]);
}

#[test]
fn longest_accepted_cmdline_still_boots() {
    if common::skip_without_kvm("longest_accepted_cmdline_still_boots") {
        return;
    }
    let kernel = build_guest("hello");
    // 2048 bytes including the terminating NUL.
    let cmdline = "x".repeat(2047);
    let run = run(&["--kernel", kernel.to_str().unwrap(), "--cmdline", &cmdline]);
    assert_eq!(run.status, Some(0), "{}", run.transcript());
}

#[test]
fn memory_below_the_minimum_is_a_usage_error_in_the_users_units() {
    let kernel = build_guest("hello");
    for size in ["1M", "1K"] {
        let run = run(&["--kernel", kernel.to_str().unwrap(), "--memory", size]);
        assert_one_clear_error(&run, EXIT_USAGE, &["--memory", size, "16 MiB"]);
        assert!(!run.stderr.contains("0 MiB"), "{}", run.transcript());
    }
}

#[test]
fn zero_cpus() {
    let kernel = build_guest("hello");
    let run = run(&["--kernel", kernel.to_str().unwrap(), "--cpus", "0"]);
    assert_one_clear_error(&run, EXIT_USAGE, &["--cpus"]);
}

#[test]
fn unknown_serial_target() {
    let kernel = build_guest("hello");
    let run = run(&["--kernel", kernel.to_str().unwrap(), "--serial", "ttyS9"]);
    assert_one_clear_error(&run, EXIT_USAGE, &["--serial", "ttyS9"]);
}

#[test]
fn unparsable_memory_size() {
    let kernel = build_guest("hello");
    let run = run(&["--kernel", kernel.to_str().unwrap(), "--memory", "lots"]);
    assert_one_clear_error(&run, EXIT_USAGE, &["--memory", "lots"]);
}

#[test]
fn serial_file_in_a_missing_directory() {
    let kernel = build_guest("hello");
    let console = scratch("no-such-dir").join("console.txt");
    let serial = format!("file={}", console.display());
    let run = run(&["--kernel", kernel.to_str().unwrap(), "--serial", &serial]);
    assert_one_clear_error(&run, EXIT_VMM_ERROR, &["no-such-dir", "serial"]);
}

#[test]
fn disk_keys_given_twice_and_absurd_notify_budgets_are_usage_errors() {
    let kernel = build_guest("hello");
    for (disk, mention) in [
        ("path=a.img,path=b.img", "more than once"),
        ("path=a.img,notify=poll:3600000000", "at most 10000"),
        ("path=a.img,block_size=1000", "block_size=1000"),
    ] {
        let run = run(&["--kernel", kernel.to_str().unwrap(), "--disk", disk]);
        assert_one_clear_error(&run, EXIT_USAGE, &["--disk", mention]);
    }
}

#[test]
fn nvme_bad_keys_are_usage_errors_and_a_missing_image_is_named() {
    let kernel = build_guest("hello");
    for (nvme, mention) in [
        ("queues=2", "path=IMG"),
        ("path=a.img,queues=65", "queues=65"),
        ("path=a.img,readonly=on", "readonly"),
    ] {
        let run = run(&["--kernel", kernel.to_str().unwrap(), "--nvme", nvme]);
        assert_one_clear_error(&run, EXIT_USAGE, &["--nvme", mention]);
    }
    let image = scratch("no-such-nvme.img");
    let nvme = format!("path={}", image.display());

    let run = run(&["--kernel", kernel.to_str().unwrap(), "--nvme", &nvme]);

    assert_one_clear_error(&run, EXIT_VMM_ERROR, &["nvme", "no-such-nvme.img"]);
}

/// `sluice serve blk` on an image qemu-storage-daemon is writing: one clear error, status 125.
#[test]
fn serve_blk_refuses_an_image_qemu_holds() {
    let image = scratch("qemu-held.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let nbd = scratch("qemu-held.nbd");
    let pidfile = scratch("qemu-held.pid");
    let qsd = std::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
        .args(["--export", "type=nbd,id=e0,node-name=f0,writable=on"])
        .arg("--daemonize")
        .arg("--pidfile")
        .arg(&pidfile)
        .status();
    match qsd {
        Ok(status) if status.success() => {}
        other => {
            eprintln!("SKIP serve_blk_refuses_an_image_qemu_holds: qemu-storage-daemon: {other:?}");
            return;
        }
    }
    let socket = scratch("qemu-held.sock");

    let run = run_sluice(
        &[
            "serve",
            "blk",
            "--socket",
            socket.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ],
        CLI_TIMEOUT,
    );
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = fs::remove_file(&image);

    let mentions = ["in use by another process", "QEMU", "qemu-held.img"];
    assert_one_clear_error(&run, EXIT_VMM_ERROR, &mentions);
    // Checked whether or not KVM is usable: serve needs none.
    assert!(
        mentions.iter().all(|m| run.stderr.contains(m)),
        "{}",
        run.transcript()
    );
}

#[test]
fn vfio_device_without_an_iommu_group_is_refused_by_name() {
    // No host has a function at ff:1f.7 in an IOMMU group here; sluice must say which
    // function it could not assign (before pinning any memory).
    let run = run(&["--device", "vfio=ff:1f.7"]);

    assert_one_clear_error(&run, EXIT_VMM_ERROR, &["0000:ff:1f.7", "no IOMMU group"]);
}

#[test]
fn vfio_bad_addresses_and_dma_modes_are_usage_errors() {
    let bad_mode = run(&["--device", "vfio=01:00.1,dma=lazy"]);
    let bad_address = run(&["--device", "vfio=01:00.9"]);

    assert_one_clear_error(&bad_mode, EXIT_USAGE, &["dma=lazy", "on-demand"]);
    assert_one_clear_error(&bad_address, EXIT_USAGE, &["01:00.9"]);
}

#[test]
fn vfio_dma_modes_that_ignore_or_lack_the_virtual_iommu_are_refused_before_anything_is_assigned() {
    // dma=all behind the vIOMMU would let the function DMA to every guest address whatever the
    // guest's IOMMU tables say; dma=on-demand has no tables to follow without one.
    let all_behind_iommu = run(&["--iommu", "vtd", "--device", "vfio=01:00.1,dma=all"]);
    let on_demand_alone = run(&["--device", "vfio=01:00.1,dma=on-demand"]);

    assert_one_clear_error(
        &all_behind_iommu,
        EXIT_VMM_ERROR,
        &["dma=all", "--iommu", "dma=on-demand"],
    );
    assert_one_clear_error(
        &on_demand_alone,
        EXIT_VMM_ERROR,
        &["dma=on-demand", "--iommu vtd"],
    );
}

#[test]
fn vfio_behind_the_virtual_iommu_gets_as_far_as_the_host_checks() {
    // On-demand is implied behind --iommu: the refusal is lifted, and the function is looked
    // for (no host has ff:1f.7 in an IOMMU group here).
    let run = run(&["--iommu", "vtd", "--device", "vfio=ff:1f.7"]);

    assert_one_clear_error(&run, EXIT_VMM_ERROR, &["0000:ff:1f.7", "no IOMMU group"]);
}

#[test]
fn a_standby_nic_without_a_mac_is_a_usage_error_naming_why() {
    let run = run(&["--net", "tap=sby0,standby=on"]);
    assert_one_clear_error(&run, EXIT_USAGE, &["standby=on needs mac="]);
}

#[test]
fn an_unknown_progress_mode_is_a_usage_error() {
    let run = run(&["--progress", "loud"]);
    assert_one_clear_error(&run, EXIT_USAGE, &["--progress", "bar, json or off"]);
}
