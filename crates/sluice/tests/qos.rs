//! One `sluice serve blk` shared by two guests (issue 16): two guest-kit VMs, each with its
//! own image on its own socket of one server, behind the sluice-qos scheduler (one disk with
//! `notify=sched`). Both verify their data, the images hold it, and the server's metrics show
//! each guest's share of the backend, queueing delay and throttled time. No timing is asserted (docs/benchmarks.md has
//! the numbers).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;

use common::{ctl, wait_for, wait_or_kill};
use sluice_guest_kit::pattern::check_pattern;
use sluice_guest_kit::{skip_without_kvm, GuestKitRun, Vmm};

const SEED: u64 = 16;
const OPS: u64 = 512;
const BLOCK: u64 = 4096;

/// This suite's directory `name` (see [`common::scratch_dir`]).
fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("qos", name)
}

/// `sluice serve blk` with `disks` (`--disk` values), its stderr in `dir/serve.log`.
fn serve(dir: &Path, disks: &[String], extra: &[&str]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.args(["serve", "blk", "--log", "info"]);
    for disk in disks {
        command.arg(format!("--disk={disk}"));
    }
    command
        .arg(format!("--metrics={}", dir.join("metrics.json").display()))
        .args(extra)
        .stdin(Stdio::null())
        .stderr(File::create(dir.join("serve.log")).unwrap());
    command.spawn().expect("start sluice serve")
}

/// Stops the server with SIGTERM (which writes its metrics) and returns them.
fn stop(mut server: Child, dir: &Path) -> serde_json::Value {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let status = wait_or_kill(&mut server, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{}", log(dir));
    let text = std::fs::read_to_string(dir.join("metrics.json")).expect("metrics written");
    serde_json::from_str(&text).unwrap()
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
}

fn guest(socket: &Path, cmdline: &str) -> GuestKitRun {
    let mut run = GuestKitRun::sluice(Path::new(env!("CARGO_BIN_EXE_sluice")), cmdline);
    run.timeout = Duration::from_secs(180);
    if let Vmm::Sluice { extra_args, .. } = &mut run.vmm {
        extra_args.push(format!("--disk=vhost_user=on,socket={}", socket.display()));
    }
    run
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(16 << 20).unwrap();
    path
}

fn assert_image_holds_pattern(path: &Path, blocks: u64) {
    let file = File::open(path).unwrap();
    let mut block = vec![0u8; BLOCK as usize];
    for index in [0, blocks / 2, blocks - 1] {
        file.read_exact_at(&mut block, index * BLOCK).unwrap();
        check_pattern(SEED, index * BLOCK, &block)
            .unwrap_or_else(|at| panic!("{}: wrong data at byte {at}", path.display()));
    }
}

#[test]
fn two_guests_share_one_served_backend_and_both_verify() {
    let name = "two_guests_share_one_served_backend_and_both_verify";
    if skip_without_kvm(name) {
        return;
    }
    let dir = scratch(name);
    let (a_image, b_image) = (image(&dir, "a.img"), image(&dir, "b.img"));
    let (a_sock, b_sock) = (dir.join("a.sock"), dir.join("b.sock"));
    let disks = [
        format!(
            "socket={},image={},name=heavy,weight=3",
            a_sock.display(),
            a_image.display()
        ),
        // Polled while the scheduler sees its backlog, interrupts otherwise (notify=sched):
        // the switch must never lose a request (it once did: both guests timed out).
        format!(
            "socket={},image={},name=light,weight=1,iops=100000,notify=sched",
            b_sock.display(),
            b_image.display()
        ),
    ];
    let server = serve(&dir, &disks, &["--qos-device=depth=2"]);
    wait_for("both sockets", Duration::from_secs(20), || {
        a_sock.exists() && b_sock.exists()
    });
    let cmdline =
        format!("quiet w=blk:op=verify:bs=4096:qd=8:ops={OPS}:span_mb=2:seed={SEED}:mode=irq");
    let runs = [guest(&a_sock, &cmdline), guest(&b_sock, &cmdline)];
    let reports = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .map(|run| scope.spawn(|| run.run().expect("run sluice")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let metrics = stop(server, &dir);
    for report in &reports {
        assert!(report.passed(), "{}\n{}", report.describe(), log(&dir));
        let blk = report.results_for("blk").next().unwrap();
        assert_eq!(blk.verify.as_deref(), Some("ok"), "{}", report.describe());
    }
    let blocks = (2 << 20) / BLOCK;
    assert_image_holds_pattern(&a_image, blocks);
    assert_image_holds_pattern(&b_image, blocks);

    let guests = metrics["qos"]["guests"].as_array().expect("qos stats");
    assert_eq!(guests.len(), 2, "{metrics:#}");
    assert_eq!(guests[0]["name"], "heavy");
    assert_eq!(guests[0]["weight"], 3);
    assert_eq!(guests[1]["iops_limit"], 100000);
    let mut share_sum = 0.0;
    for g in guests {
        // verify writes the span then reads it back: 512 + 512 requests, and a flush.
        let dispatched = g["dispatched"].as_u64().unwrap();
        assert!(dispatched > 2 * blocks, "{g:#}");
        assert_eq!(g["completed"].as_u64(), Some(dispatched), "{g:#}");
        assert_eq!(g["bytes"].as_u64(), Some(2 * blocks * BLOCK), "{g:#}");
        assert_eq!(g["refused_enqueues"], 0, "{g:#}");
        assert!(g["queue_delay_mean_us"].as_f64().is_some(), "{g:#}");
        assert!(g["throttled_ms"].as_u64().is_some(), "{g:#}");
        let share = g["share"].as_f64().unwrap();
        assert!(share > 0.0 && share < 1.0, "{g:#}");
        share_sum += share;
    }
    assert!((share_sum - 1.0).abs() < 1e-9, "{metrics:#}");
    assert_eq!(metrics["devices"].as_array().map(Vec::len), Some(2));
    // Each guest's mode is reported; whether and how often one was polled is timing.
    for g in guests {
        let mode = g["notify"].as_str().unwrap_or_default();
        assert!(["poll", "interrupt"].contains(&mode), "{g:#}");
        assert!(g["poll_switches"].as_u64().is_some(), "{g:#}");
        assert!(g["polled_ms"].as_u64().is_some(), "{g:#}");
    }
}

#[test]
fn a_disk_spec_without_socket_or_with_a_bad_qos_key_is_refused() {
    let dir = scratch("a_disk_spec_without_socket_or_with_a_bad_qos_key_is_refused");
    let img = image(&dir, "x.img");
    for (disk, why) in [
        (format!("image={}", img.display()), "socket= is required"),
        (
            format!(
                "socket={},image={},weight=0",
                dir.join("x.sock").display(),
                img.display()
            ),
            "weight must be in 1..=1000",
        ),
        (
            format!(
                "socket={},image={},speed=9",
                dir.join("x.sock").display(),
                img.display()
            ),
            "unknown qos key",
        ),
        (
            format!(
                "socket={},image={},name=device",
                dir.join("x.sock").display(),
                img.display()
            ),
            "is the scheduler's own in vm.qos",
        ),
    ] {
        let mut server = serve(&dir, std::slice::from_ref(&disk), &[]);
        let status = wait_or_kill(&mut server, Duration::from_secs(10));
        // 125: sluice's status for a refused command line or setup.
        assert_eq!(status, Some(125), "{disk}: {}", log(&dir));
        assert!(log(&dir).contains(why), "{disk}: {}", log(&dir));
        assert!(!dir.join("x.sock").exists());
    }
}

#[test]
fn an_in_process_disk_behind_the_scheduler_verifies() {
    let name = "an_in_process_disk_behind_the_scheduler_verifies";
    if skip_without_kvm(name) {
        return;
    }
    let dir = scratch(name);
    let img = image(&dir, "disk.img");
    let cmdline =
        format!("quiet w=blk:op=verify:bs=4096:qd=8:ops={OPS}:span_mb=2:seed={SEED}:mode=irq");
    let mut run = GuestKitRun::sluice(Path::new(env!("CARGO_BIN_EXE_sluice")), &cmdline);
    run.timeout = Duration::from_secs(180);
    if let Vmm::Sluice { extra_args, .. } = &mut run.vmm {
        extra_args.push(format!(
            "--disk=path={},weight=2,iops=100000,bps=1G,qos_queue=4",
            img.display()
        ));
    }
    let report = run.run().expect("run sluice");
    assert!(report.passed(), "{}", report.describe());
    let blk = report.results_for("blk").next().unwrap();
    assert_eq!(blk.verify.as_deref(), Some("ok"), "{}", report.describe());
    assert_image_holds_pattern(&img, (2 << 20) / BLOCK);
}

/// `sluice serve blk --api-socket`: `sluice ctl qos` lists both disks by name with their
/// settings, a change to one applies to it alone and is in the `--metrics` written at
/// SIGTERM; an unknown disk is a 404 and a bad value a 400 (status 1, a JSON error), and the
/// VM actions a server has no VM for are refused. The id `device` is the `--qos-device`
/// settings: changed live the same way, a refused change leaves them. No guest needed: the
/// scheduler's settings are what is checked.
#[test]
fn serve_blk_disks_are_reconfigured_live_through_its_api_socket() {
    let dir = scratch("serve-api");
    let socket = dir.join("api.sock");
    let disks = [
        format!(
            "socket={},image={},name=bulk,weight=1,iops=100",
            dir.join("a.sock").display(),
            image(&dir, "a.img").display()
        ),
        format!(
            "socket={},image={},name=reader,weight=3",
            dir.join("b.sock").display(),
            image(&dir, "b.img").display()
        ),
    ];
    let api = format!("--api-socket={}", socket.display());
    let server = serve(&dir, &disks, &[&api, "--qos-device=depth=2"]);
    wait_for("the API socket", Duration::from_secs(20), || {
        socket.exists()
    });

    let listed = ctl(&socket, &["qos"]);
    let changed = ctl(&socket, &["qos", "bulk", "iops=250,weight=2"]);
    let unknown = ctl(&socket, &["qos", "nope", "iops=1"]);
    let bad = ctl(&socket, &["qos", "reader", "weight=5000"]);
    let pause = ctl(&socket, &["pause"]);
    let device = ctl(&socket, &["qos", "device", "depth=8,bps=100M"]);
    let device_refused = ctl(&socket, &["qos", "device", "depth=8,weight=2"]);
    let after = ctl(&socket, &["qos"]);
    let metrics = stop(server, &dir);

    assert_eq!(listed.0, 0, "{listed:?}");
    let listed: serde_json::Value = serde_json::from_str(&listed.1).unwrap();
    let names: Vec<&str> = listed["disks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(names, ["bulk", "reader"], "{listed}");
    assert_eq!(listed["disks"][0]["iops_limit"], 100, "{listed}");
    assert_eq!(changed.0, 0, "{changed:?}");
    assert!(changed.1.contains("\"iops_limit\":250"), "{changed:?}");
    assert_eq!(unknown.0, 1, "{unknown:?}");
    assert!(unknown.1.contains("no disk with id `nope`"), "{unknown:?}");
    assert_eq!(bad.0, 1, "{bad:?}");
    assert!(bad.1.contains("weight must be in"), "{bad:?}");
    assert_eq!(pause.0, 1, "{pause:?}");
    assert!(pause.1.contains("no VM"), "{pause:?}");
    assert_eq!(
        listed["device"]["depth"], 2,
        "--qos-device depth=2: {listed}"
    );
    assert_eq!(device.0, 0, "{device:?}");
    assert!(device.1.contains("\"depth\":8"), "{device:?}");
    assert_eq!(device_refused.0, 1, "{device_refused:?}");
    assert!(
        device_refused.1.contains("unknown field `weight`"),
        "{device_refused:?}"
    );
    let after: serde_json::Value = serde_json::from_str(&after.1).unwrap();
    assert_eq!(
        (&after["disks"][0]["weight"], &after["disks"][1]["weight"]),
        (&2.into(), &3.into()),
        "only bulk changed: {after}"
    );
    assert_eq!(after["device"]["bps_limit"], 100 << 20, "{after}");
    assert_eq!(
        after["device"]["depth"], 8,
        "the refused change left it: {after}"
    );
    let guests = &metrics["qos"]["guests"];
    assert_eq!(guests[0]["iops_limit"], 250, "{metrics}");
    assert_eq!(guests[1]["weight"], 3, "{metrics}");
    assert_eq!(metrics["qos"]["depth"], 8, "{metrics}");
    assert!(!socket.exists(), "the API socket is removed at the stop");
    let _ = std::fs::remove_dir_all(&dir);
}
