//! The control API end to end: `sluice run --api-socket` serving a running VM and `sluice ctl`
//! driving it — ping, info, pause, resume, counters, Prometheus metrics, shutdown — and bad
//! requests answered with a 4xx while the VM carries on, through `sluice ctl` and through curl
//! (malformed JSON, an unknown field, an unknown endpoint, a wrong method).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    build_guest, curl, skip_without_kvm, start_idle_vm_with_api, wait_for, wait_or_kill, SLUICE,
};

/// This suite's directory `name` (see [`common::scratch_dir`]).
fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("api", name)
}

/// `sluice ctl --api-socket SOCKET COMMAND` (words split at spaces): status and stdout.
fn ctl(socket: &Path, command: &str) -> (i32, String) {
    common::ctl(socket, &command.split(' ').collect::<Vec<_>>())
}

fn state(socket: &Path) -> String {
    let (_, out) = ctl(socket, "info");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    info["state"].as_str().unwrap_or("").to_string()
}

#[test]
fn sluice_ctl_pauses_resumes_reads_counters_and_shuts_the_vm_down() {
    if skip_without_kvm("sluice_ctl_pauses_resumes_reads_counters_and_shuts_the_vm_down") {
        return;
    }
    let dir = scratch("cycle");
    let socket = dir.join("api.sock");
    let metrics = dir.join("metrics.json");
    let mut vm = Command::new(SLUICE)
        .args(["run", "--kernel"])
        .arg(build_guest("wait"))
        .args(["--serial", "off", "--rng", "--api-socket"])
        .arg(&socket)
        .arg("--metrics")
        .arg(&metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice");
    wait_for("the VM to run", Duration::from_secs(20), || {
        state(&socket) == "Running"
    });

    let ping = ctl(&socket, "ping");
    let paused = ctl(&socket, "pause");
    let while_paused = state(&socket);
    let paused_again = ctl(&socket, "pause");
    let resumed = ctl(&socket, "resume");
    let after_resume = state(&socket);
    let counters = ctl(&socket, "counters");
    let prometheus = ctl(&socket, "metrics");
    let shutdown = ctl(&socket, "shutdown");
    let status = wait_or_kill(&mut vm, Duration::from_secs(20));

    assert_eq!(ping.0, 0, "{ping:?}");
    assert_eq!(paused.0, 0, "{paused:?}");
    assert_eq!(while_paused, "Paused");
    assert_eq!(
        paused_again.0, 1,
        "a paused VM cannot be paused: {paused_again:?}"
    );
    assert!(paused_again.1.contains("error"), "{paused_again:?}");
    assert_eq!(resumed.0, 0, "{resumed:?}");
    assert_eq!(after_resume, "Running");
    let counters: serde_json::Value = serde_json::from_str(&counters.1).unwrap();
    assert!(
        counters["devices"].as_array().is_some_and(|d| d
            .iter()
            .any(|d| d["device"].as_str().is_some_and(|n| n.contains("rng")))),
        "{counters:#}"
    );
    assert!(prometheus.1.contains("rng"), "{prometheus:?}");
    assert_eq!(shutdown.0, 0, "{shutdown:?}");
    assert_eq!(status, Some(0));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(written["outcome"], "Shutdown", "{written:#}");
    assert!(
        !socket.exists(),
        "the API socket is removed when the VM ends"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap_or_default()["error"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn curl_drives_the_api_and_malformed_or_unknown_requests_get_json_errors() {
    if skip_without_kvm("curl_drives_the_api_and_malformed_or_unknown_requests_get_json_errors") {
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        println!("SKIP curl test: no curl (scripts/install-deps.sh installs it)");
        return;
    }
    let dir = scratch("curl");
    let socket = dir.join("api.sock");
    let mut vm = start_idle_vm_with_api(&socket, &[]);
    wait_for("the VM to run", Duration::from_secs(20), || {
        state(&socket) == "Running"
    });

    let info = curl(&socket, "GET", "vm.info", None);
    let paused = curl(&socket, "PUT", "vm.pause", None);
    let malformed = curl(
        &socket,
        "PUT",
        "vm.snapshot",
        Some("{\"destination_url\": "),
    );
    let wrong_field = curl(&socket, "PUT", "vm.snapshot", Some("{\"destination\": 1}"));
    let unknown = curl(&socket, "GET", "vm.teleport", None);
    let wrong_method = curl(&socket, "GET", "vm.pause", None);
    let state_after_bad_requests = state(&socket);
    let resumed = curl(&socket, "PUT", "vm.resume", None);
    let shutdown = curl(&socket, "PUT", "vm.shutdown", None);
    let status = wait_or_kill(&mut vm, Duration::from_secs(20));

    assert_eq!(info.0, 200, "{info:?}");
    let info: serde_json::Value = serde_json::from_str(&info.1).unwrap();
    assert_eq!(info["state"], "Running", "{info:#}");
    assert_eq!(paused.0, 204, "{paused:?}");
    for (bad, code) in [
        (&malformed, 400),
        (&wrong_field, 400),
        (&unknown, 404),
        (&wrong_method, 405),
    ] {
        assert_eq!(bad.0, code, "{bad:?}");
        assert!(!error_message(&bad.1).is_empty(), "a JSON error: {bad:?}");
    }
    assert_eq!(state_after_bad_requests, "Paused", "the VM carried on");
    assert_eq!(resumed.0, 204, "{resumed:?}");
    assert_eq!(shutdown.0, 204, "{shutdown:?}");
    assert_eq!(status, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ticks a console shows, in order.
fn ticks(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

#[test]
fn a_snapshot_taken_mid_run_resumes_where_it_stopped_and_a_corrupt_one_is_refused() {
    if skip_without_kvm(
        "a_snapshot_taken_mid_run_resumes_where_it_stopped_and_a_corrupt_one_is_refused",
    ) {
        return;
    }
    let dir = scratch("snapshot");
    let socket = dir.join("api.sock");
    let first = dir.join("first.txt");
    let second = dir.join("second.txt");
    let snapshot = dir.join("snap");
    let mut vm = Command::new(SLUICE)
        .args(["run", "--kernel"])
        .arg(build_guest("ticker"))
        .arg(format!("--serial=file={}", first.display()))
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    wait_for("tick 3", Duration::from_secs(30), || {
        std::fs::read_to_string(&first).is_ok_and(|c| ticks(&c).contains(&3))
    });

    let running = ctl(&socket, &format!("snapshot {}", snapshot.display()));
    let paused = ctl(&socket, "pause");
    let taken = Command::new(SLUICE)
        .args(["ctl", "--api-socket"])
        .arg(&socket)
        .arg("snapshot")
        .arg(&snapshot)
        .output()
        .unwrap();
    let shutdown = ctl(&socket, "shutdown");
    let first_status = wait_or_kill(&mut vm, Duration::from_secs(20));
    let restored = Command::new(SLUICE)
        .args(["run", "--restore"])
        .arg(&snapshot)
        .arg(format!("--serial=file={}", second.display()))
        .output()
        .unwrap();
    let state = snapshot.join("state");
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, text.replacen("\"cpus\":1", "\"cpus\":3", 1)).unwrap();
    let corrupt = Command::new(SLUICE)
        .args(["run", "--restore"])
        .arg(&snapshot)
        .output()
        .unwrap();

    assert_eq!(running.0, 1, "only a paused VM is snapshotted: {running:?}");
    assert_eq!(paused.0, 0, "{paused:?}");
    assert!(taken.status.success(), "{taken:?}");
    assert_eq!(shutdown.0, 0);
    assert_eq!(first_status, Some(0));
    let before = ticks(&std::fs::read_to_string(&first).unwrap());
    let after_console = std::fs::read_to_string(&second).unwrap_or_default();
    let after = ticks(&after_console);
    assert_eq!(
        restored.status.code(),
        Some(0),
        "{restored:?}\n{after_console}"
    );
    let last_before = *before.last().unwrap();
    assert_eq!(
        after.first().copied(),
        Some(last_before + 1),
        "before {before:?}, after {after:?}"
    );
    assert_eq!(after.last().copied(), Some(12), "{after_console}");
    assert!(after_console.contains("done"), "{after_console}");
    assert_eq!(corrupt.status.code(), Some(125), "{corrupt:?}");
    assert!(
        String::from_utf8_lossy(&corrupt.stderr).contains("corrupt"),
        "{corrupt:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vm_with_devices_a_snapshot_cannot_carry_yet_is_refused_by_name() {
    if skip_without_kvm("a_vm_with_devices_a_snapshot_cannot_carry_yet_is_refused_by_name") {
        return;
    }
    let dir = scratch("refused");
    let socket = dir.join("api.sock");
    let mut vm = start_idle_vm_with_api(&socket, &["--iommu=vtd".to_string()]);
    wait_for("the VM to run", Duration::from_secs(20), || {
        state(&socket) == "Running"
    });

    let paused = ctl(&socket, "pause");
    let refused = ctl(&socket, &format!("snapshot {}", dir.join("snap").display()));
    let _ = ctl(&socket, "shutdown");
    let status = wait_or_kill(&mut vm, Duration::from_secs(20));

    assert_eq!(paused.0, 0);
    assert_eq!(refused.0, 1, "{refused:?}");
    assert!(refused.1.contains("virtual IOMMU"), "{refused:?}");
    assert!(!dir.join("snap").exists());
    assert_eq!(status, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The guest kit's block verify, snapshotted mid-run with its virtio-blk disk busy: the
/// restored VM finishes the same verify (every block written before the snapshot reads back)
/// and the image holds the pattern.
#[test]
fn a_guest_kit_verify_snapshotted_mid_run_on_virtio_blk_finishes_after_restore() {
    if skip_without_kvm(
        "a_guest_kit_verify_snapshotted_mid_run_on_virtio_blk_finishes_after_restore",
    ) {
        return;
    }
    let dir = scratch("blk");
    let socket = dir.join("api.sock");
    let image = dir.join("disk.img");
    let first = dir.join("first.txt");
    let snapshot = dir.join("snap");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let disk = format!("--disk=path={}", image.display());
    let mut vm = Command::new(SLUICE)
        .args(["run", &disk, "--api-socket"])
        .arg(&socket)
        .arg(format!("--serial=file={}", first.display()))
        .args([
            "--cmdline",
            "w=blk:op=verify:bs=4096:qd=16:span_mb=96:seed=9",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    wait_for("the blk workload", Duration::from_secs(30), || {
        std::fs::read_to_string(&first).is_ok_and(|c| c.contains("virtio-blk 00:"))
    });

    let paused = ctl(&socket, "pause");
    let before = std::fs::read_to_string(&first).unwrap();
    let taken = ctl(&socket, &format!("snapshot {}", snapshot.display()));
    let _ = ctl(&socket, "shutdown");
    let first_status = wait_or_kill(&mut vm, Duration::from_secs(20));
    let restored = Command::new(SLUICE)
        .args(["run", "--restore"])
        .arg(&snapshot)
        .arg(&disk)
        .output()
        .unwrap();

    assert_eq!(paused.0, 0, "{paused:?}");
    assert!(
        !before.contains("RESULT"),
        "paused after the workload ended:\n{before}"
    );
    assert_eq!(taken.0, 0, "{taken:?}");
    assert_eq!(first_status, Some(0));
    // COM1 as the kit programmed it (115200 8N1, DTR+RTS) travels in the snapshot.
    let saved = sluice_vmm::snapshot::read(&snapshot).expect("the snapshot reads back");
    let com1 = saved.platform.expect("platform state saved").com1;
    assert_eq!(
        (com1.divisor_low, com1.line_control, com1.modem_control),
        (0x01, 0x03, 0x03)
    );
    let console = String::from_utf8_lossy(&restored.stdout);
    assert_eq!(restored.status.code(), Some(0), "{console}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    assert!(console.contains("\"verify\":\"ok\""), "{console}");
    let mut block = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&image).unwrap(),
        &mut block,
        95 << 20,
    )
    .unwrap();
    assert_eq!(
        sluice_guest_kit::pattern::check_pattern(9, 95 << 20, &block),
        Ok(()),
        "the last MiB of the span holds the pattern"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Requests every device of the VM behind `socket` completed so far (all queues).
fn requests_done(socket: &Path) -> u64 {
    let (_, counters) = ctl(socket, "counters");
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap_or_default();
    counters["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["queues"].as_array().into_iter().flatten())
        .filter_map(|q| q["requests"].as_u64())
        .sum()
}

/// The guest kit's NVMe verify (two I/O queue pairs, shadow doorbells), snapshotted mid-run
/// with its queues busy: the restored VM — a new process, its controller rebuilt from the
/// saved registers, queues, shadow doorbell buffers and MSI-X table — finishes the verify.
#[test]
fn a_guest_kit_nvme_verify_snapshotted_mid_run_finishes_after_restore() {
    if skip_without_kvm("a_guest_kit_nvme_verify_snapshotted_mid_run_finishes_after_restore") {
        return;
    }
    let dir = scratch("nvme");
    let socket = dir.join("api.sock");
    let image = dir.join("nvme.img");
    let first = dir.join("first.txt");
    let snapshot = dir.join("snap");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let nvme = format!("--nvme=path={},queues=2,dbbuf=on", image.display());
    let mut vm = Command::new(SLUICE)
        .args(["run", &nvme, "--api-socket"])
        .arg(&socket)
        .arg(format!("--serial=file={}", first.display()))
        .args([
            "--cmdline",
            "w=nvme:op=verify:bs=4096:qd=16:queues=2:span_mb=96:seed=9:dbbuf=on",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    wait_for("the nvme workload", Duration::from_secs(30), || {
        requests_done(&socket) >= 256
    });

    let paused = ctl(&socket, "pause");
    let before = std::fs::read_to_string(&first).unwrap();
    let taken = ctl(&socket, &format!("snapshot {}", snapshot.display()));
    let _ = ctl(&socket, "shutdown");
    let first_status = wait_or_kill(&mut vm, Duration::from_secs(20));
    let restored = Command::new(SLUICE)
        .args(["run", "--restore"])
        .arg(&snapshot)
        .arg(&nvme)
        .output()
        .unwrap();

    assert_eq!(paused.0, 0, "{paused:?}");
    assert!(
        !before.contains("RESULT"),
        "paused after the workload ended:\n{before}"
    );
    assert_eq!(taken.0, 0, "{taken:?}");
    assert_eq!(first_status, Some(0));
    let console = String::from_utf8_lossy(&restored.stdout);
    let log = String::from_utf8_lossy(&restored.stderr);
    assert_eq!(restored.status.code(), Some(0), "{console}\n{log}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    assert!(console.contains("\"verify\":\"ok\""), "{console}");
    let mut block = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&image).unwrap(),
        &mut block,
        95 << 20,
    )
    .unwrap();
    assert_eq!(
        sluice_guest_kit::pattern::check_pattern(9, 95 << 20, &block),
        Ok(()),
        "the last MiB of the span holds the pattern"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The guest kit's block verify on a vhost-user disk (`sluice serve blk`), snapshotted mid-run:
/// the backend's rings are quiesced with GET_VRING_BASE for the snapshot, the first VM ends
/// (freeing the backend), and the restored VM's frontend takes the rings up at the saved
/// positions on the same backend and finishes the verify.
#[test]
fn a_guest_kit_verify_on_a_vhost_user_disk_snapshotted_mid_run_finishes_after_restore() {
    if skip_without_kvm(
        "a_guest_kit_verify_on_a_vhost_user_disk_snapshotted_mid_run_finishes_after_restore",
    ) {
        return;
    }
    let dir = scratch("vhost-user");
    let (socket, image, first) = (
        dir.join("api.sock"),
        dir.join("disk.img"),
        dir.join("first.txt"),
    );
    let (backend_socket, snapshot) = (dir.join("blk.sock"), dir.join("snap"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let mut backend = Command::new(SLUICE)
        .args(["serve", "blk", "--socket"])
        .arg(&backend_socket)
        .arg("--image")
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice serve blk");
    wait_for("the backend to listen", Duration::from_secs(10), || {
        backend_socket.exists()
    });
    let disk = format!("--disk=vhost_user=on,socket={}", backend_socket.display());
    let mut vm = Command::new(SLUICE)
        .args(["run", &disk, "--api-socket"])
        .arg(&socket)
        .arg(format!("--serial=file={}", first.display()))
        .args([
            "--cmdline",
            "w=blk:op=verify:bs=4096:qd=16:span_mb=96:seed=9",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    wait_for("the blk workload", Duration::from_secs(30), || {
        requests_done(&socket) >= 256
    });

    let paused = ctl(&socket, "pause");
    let before = std::fs::read_to_string(&first).unwrap();
    let taken = ctl(&socket, &format!("snapshot {}", snapshot.display()));
    let _ = ctl(&socket, "shutdown");
    let first_status = wait_or_kill(&mut vm, Duration::from_secs(20));
    let restored = Command::new(SLUICE)
        .args(["run", "--restore"])
        .arg(&snapshot)
        .arg(&disk)
        .output()
        .unwrap();
    let _ = backend.kill();
    let _ = backend.wait();

    assert_eq!(paused.0, 0, "{paused:?}");
    assert!(
        !before.contains("RESULT"),
        "paused after the workload ended:\n{before}"
    );
    assert_eq!(taken.0, 0, "{taken:?}");
    assert_eq!(first_status, Some(0));
    let console = String::from_utf8_lossy(&restored.stdout);
    let log = String::from_utf8_lossy(&restored.stderr);
    assert_eq!(restored.status.code(), Some(0), "{console}\n{log}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    assert!(console.contains("\"verify\":\"ok\""), "{console}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vm.qos` of the VM behind `socket`: disk0's entry, read with curl.
/// disk0's entry in `vm.qos` (null while the VM is still being built: no disks yet).
fn disk0_qos(socket: &Path) -> serde_json::Value {
    let (status, body) = curl(socket, "GET", "vm.qos", None);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    answer["disks"][0].clone()
}

fn dispatched(socket: &Path) -> u64 {
    disk0_qos(socket)["dispatched"].as_u64().unwrap_or(0)
}

/// Requests disk0's scheduler granted during a window, and the most its IOPS bucket can pass
/// in that window: the window is measured around both reads (so it is never too short), and
/// the bucket passes at most `rate × window + burst + one request` (its debt model) — a
/// bound a slow host only makes looser, never tighter.
fn served_within_bucket(socket: &Path, iops: u64, burst: u64, window: Duration) -> (u64, u64) {
    let start = std::time::Instant::now();
    let first = dispatched(socket);
    std::thread::sleep(window);
    let last = dispatched(socket);
    let elapsed = start.elapsed().as_secs_f64();
    let bound = (iops as f64 * elapsed).ceil() as u64 + burst + 1;
    (last - first, bound)
}

/// A guest-kit VM reading its disk as fast as it can, behind the I/O scheduler at 20 IOPS:
/// `vm.qos` shows it held within that bucket's bound and throttled; a PUT through curl raises
/// the limit and the guest then gets more than the old limit allowed; a change through
/// `sluice ctl qos` lowers it and it holds again. Unknown disks, unknown keys, bad values,
/// a missing id and malformed JSON are refused with a JSON 4xx and change nothing; a disk
/// hot-plugged with limits joins the scheduler under its id and can be changed too; the
/// metrics at exit carry the disk's final settings and stats.
#[test]
fn a_disks_iops_limit_changed_live_through_the_api_is_what_the_guest_gets() {
    let name = "a_disks_iops_limit_changed_live_through_the_api_is_what_the_guest_gets";
    if skip_without_kvm(name) {
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        println!("SKIP {name}: no curl (scripts/install-deps.sh installs it)");
        return;
    }
    let dir = scratch("qos");
    let socket = dir.join("api.sock");
    let image = dir.join("disk.img");
    let metrics = dir.join("metrics.json");
    let hot_image = dir.join("hot.img");
    for path in [&image, &hot_image] {
        std::fs::File::create(path)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
    }
    let mut vm = Command::new(SLUICE)
        .arg("run")
        .arg(format!("--disk=path={},iops=20", image.display()))
        .arg("--api-socket")
        .arg(&socket)
        .arg(format!("--metrics={}", metrics.display()))
        .arg(format!(
            "--serial=file={}",
            dir.join("console.txt").display()
        ))
        .args([
            "--cmdline",
            "w=blk:op=randread:bs=4096:qd=4:ops=100000000:span_mb=8:seed=16",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    wait_for("the guest's first reads", Duration::from_secs(60), || {
        socket.exists() && dispatched(&socket) > 0
    });

    // 20 IOPS, burst 2 (a tenth of a second's worth).
    let limited = served_within_bucket(&socket, 20, 2, Duration::from_secs(3));
    let before = disk0_qos(&socket);

    let raised = curl(
        &socket,
        "PUT",
        "vm.qos",
        Some(r#"{"id": "disk0", "iops": 2000}"#),
    );
    let raised_at = std::time::Instant::now();
    let raised_from = dispatched(&socket);
    // The guest now gets well past what 20 IOPS would have let through since the change.
    wait_for(
        "the guest to pass the old limit",
        Duration::from_secs(60),
        || {
            let old_bound = (20.0 * raised_at.elapsed().as_secs_f64()).ceil() as u64 + 2 + 1;
            dispatched(&socket) - raised_from > 4 * old_bound + 100
        },
    );

    let (lowered_status, lowered) = ctl(&socket, "qos disk0 iops=10,iops_burst=1");
    let held = served_within_bucket(&socket, 10, 1, Duration::from_secs(3));

    let put_qos = |body: &str| curl(&socket, "PUT", "vm.qos", Some(body));
    let unknown_disk = put_qos(r#"{"id": "disk9", "iops": 5}"#);
    let unknown_key = put_qos(r#"{"id": "disk0", "speed": 5}"#);
    let bad_value = put_qos(r#"{"id": "disk0", "weight": 0}"#);
    let burst_alone = put_qos(r#"{"id": "disk0", "iops": 0, "iops_burst": 3}"#);
    let no_id = put_qos(r#"{"iops": 5}"#);
    let malformed = put_qos(r#"{"id": "disk0", "iops": "#);
    let nested = put_qos(r#"{"id": "disk0", "iops": [1]}"#);
    let after_refusals = disk0_qos(&socket);
    // A hot-plugged disk with limits joins the scheduler under its id.
    let plug_body = format!(
        r#"{{"path": "{}", "iops": 50, "weight": 2, "id": "hot0"}}"#,
        hot_image.display()
    );
    let plugged = curl(&socket, "PUT", "vm.add-disk", Some(&plug_body));
    let hot_changed = curl(
        &socket,
        "PUT",
        "vm.qos",
        Some(r#"{"id": "hot0", "weight": 4}"#),
    );
    let (_, both) = curl(&socket, "GET", "vm.qos", None);
    let (listed_status, listed) = ctl(&socket, "qos");
    let prometheus = ctl(&socket, "metrics");
    let counters = ctl(&socket, "counters");

    let shutdown = curl(&socket, "PUT", "vm.shutdown", None);
    let status = wait_or_kill(&mut vm, Duration::from_secs(30));
    let final_metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap_or_default())
            .unwrap_or_default();

    println!("served/bound at 20 IOPS {limited:?}, at 10 IOPS {held:?}");
    assert!(limited.0 <= limited.1, "20 IOPS let through {limited:?}");
    assert!(limited.0 > 0 && held.0 > 0, "{limited:?} {held:?}");
    assert_eq!(before["iops_limit"], 20, "{before}");
    assert!(before["throttled_ms"].as_u64() > Some(0), "{before}");
    assert!(before["queue_delay_p99_us"].as_u64() > Some(0), "{before}");
    assert_eq!(raised.0, 200, "{raised:?}");
    let raised: serde_json::Value = serde_json::from_str(&raised.1).unwrap();
    assert_eq!(
        (&raised["id"], &raised["iops_limit"], &raised["iops_burst"]),
        (&"disk0".into(), &2000.into(), &200.into()),
        "{raised}"
    );
    assert_eq!(lowered_status, 0, "{lowered}");
    assert!(lowered.contains("\"iops_limit\":10"), "{lowered}");
    assert!(held.0 <= held.1, "10 IOPS let through {held:?}");
    for (what, (status, body), code) in [
        ("unknown disk", &unknown_disk, 404),
        ("unknown key", &unknown_key, 400),
        ("bad value", &bad_value, 400),
        ("burst without rate", &burst_alone, 400),
        ("no id", &no_id, 400),
        ("malformed", &malformed, 400),
        ("nested", &nested, 400),
    ] {
        assert_eq!(*status, code, "{what}: {body}");
        assert!(!error_message(body).is_empty(), "{what}: {body}");
    }
    assert_eq!(
        (
            &after_refusals["iops_limit"],
            &after_refusals["iops_burst"],
            &after_refusals["weight"]
        ),
        (&10.into(), &1.into(), &1.into()),
        "refused changes changed nothing: {after_refusals}"
    );
    assert_eq!(plugged.0, 200, "{plugged:?}");
    assert_eq!(hot_changed.0, 200, "{hot_changed:?}");
    let hot: serde_json::Value = serde_json::from_str(&hot_changed.1).unwrap();
    assert_eq!(
        (&hot["id"], &hot["weight"], &hot["iops_limit"]),
        (&"hot0".into(), &4.into(), &50.into()),
        "{hot}"
    );
    let both: serde_json::Value = serde_json::from_str(&both).unwrap();
    let ids: Vec<&str> = both["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["disk0", "hot0"], "{both}");
    assert_eq!(listed_status, 0, "{listed}");
    assert!(listed.contains("\"id\":\"disk0\""), "{listed}");
    assert!(
        prometheus
            .1
            .contains("sluice_qos_dispatched_total{disk=\"disk0\"}"),
        "{prometheus:?}"
    );
    let counters: serde_json::Value = serde_json::from_str(&counters.1).unwrap_or_default();
    assert_eq!(counters["qos"][0]["id"], "disk0", "{counters}");
    assert!(
        counters["qos"][0]["dispatched"].as_u64() > Some(0),
        "{counters}"
    );
    assert_eq!(shutdown.0, 204, "{shutdown:?}");
    assert_eq!(status, Some(0));
    let at_exit = &final_metrics["qos"][0];
    assert_eq!(at_exit["id"], "disk0", "{final_metrics}");
    assert_eq!(at_exit["iops_limit"], 10, "{final_metrics}");
    assert!(
        at_exit["dispatched"].as_u64() >= after_refusals["dispatched"].as_u64(),
        "{final_metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
