//! One `sluice serve net` shared by two guests (issue 16, the network half): two guest-kit
//! VMs under QEMU (sluice's own frontend has no vhost-user NIC), each on its own socket and
//! tap of one server, their transmit queues behind one sluice-qos scheduler — one guest with
//! weight 3 and `notify=sched`, the other held to a frames/s limit. Every frame each guest sent reaches its tap
//! (the scheduler delays, never drops: what it holds back stays in the guest's ring), and the
//! server's metrics count each guest's frames, bytes, share and throttled time. No timing is
//! asserted; a bad `--net` is refused with its reason.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;

use common::{wait_for, wait_or_kill};
use sluice_guest_kit::{find_qemu, Accel, Device, GuestKitRun, Machine};

/// Frames each guest sends, and their size (the kit's `size` is the whole Ethernet frame).
const FRAMES: u64 = 400;
const FRAME_BYTES: u64 = 64;
/// The limited guest's frames/s: its 400 frames need 4 s at least, far longer than the kit
/// needs to fill its ring, so the bucket must hold it back.
const PPS: u64 = 100;

/// This suite's directory `name` (see [`common::scratch_dir`]).
fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("net-qos", name)
}

fn serve(dir: &Path, nets: &[String]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.args(["serve", "net", "--log", "info"]);
    for net in nets {
        command.arg(format!("--net={net}"));
    }
    command
        .arg(format!("--metrics={}", dir.join("metrics.json").display()))
        .stdin(Stdio::null())
        .stderr(File::create(dir.join("serve.log")).unwrap());
    command.spawn().expect("start sluice serve net")
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
}

fn tap_counter(tap: &str, counter: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{counter}"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

fn can_make_taps(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || File::open("/dev/net/tun").is_err() {
        println!("SKIP {test}: creating a tap needs root and /dev/net/tun");
        return false;
    }
    true
}

#[test]
fn two_guests_share_one_served_nic_backend_and_every_frame_arrives() {
    let name = "two_guests_share_one_served_nic_backend";
    if let Err(e) = find_qemu() {
        println!("SKIP {name}: {e}");
        return;
    }
    if !can_make_taps(name) {
        return;
    }
    let dir = scratch(name);
    let suffix = std::process::id() % 100_000;
    let taps = [format!("slqa{suffix}"), format!("slqb{suffix}")];
    let sockets = [dir.join("heavy.sock"), dir.join("limited.sock")];
    let nets = [
        // Its transmit queue polled while the scheduler sees a backlog (notify=sched).
        format!(
            "socket={},tap={},weight=3,notify=sched",
            sockets[0].display(),
            taps[0]
        ),
        format!(
            "socket={},tap={},weight=1,pps={PPS}",
            sockets[1].display(),
            taps[1]
        ),
    ];
    let mut server = serve(&dir, &nets);
    wait_for("both sockets", Duration::from_secs(20), || {
        sockets.iter().all(|s| s.exists())
    });
    let before: Vec<u64> = taps.iter().map(|t| tap_counter(t, "rx_packets")).collect();
    let cmdline = format!("quiet w=net:dir=tx:size={FRAME_BYTES}:frames={FRAMES}");
    let runs: Vec<GuestKitRun> = sockets
        .iter()
        .map(|socket| {
            GuestKitRun::qemu(Accel::Tcg, Machine::Q35, &cmdline)
                .with_device(Device::VhostUserNet {
                    socket: socket.clone(),
                })
                .with_timeout(Duration::from_secs(240))
        })
        .collect();
    let reports = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .map(|run| scope.spawn(|| run.run().expect("run QEMU")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let delivered: Vec<u64> = taps
        .iter()
        .zip(&before)
        .map(|(t, b)| tap_counter(t, "rx_packets") - b)
        .collect();

    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let status = wait_or_kill(&mut server, Duration::from_secs(10));
    assert_eq!(status, Some(0), "{}", log(&dir));
    let text = std::fs::read_to_string(dir.join("metrics.json")).expect("metrics written");
    let metrics: serde_json::Value = serde_json::from_str(&text).unwrap();

    for (report, delivered) in reports.iter().zip(&delivered) {
        assert!(report.passed(), "{}\n{}", report.describe(), log(&dir));
        let net = report.results_for("net").next().expect("a net RESULT");
        assert_eq!(net.errors, Some(0), "{}", report.describe());
        assert!(
            *delivered >= FRAMES,
            "{delivered} frames reached the tap, the kit sent {FRAMES}\n{metrics:#}"
        );
    }
    let guests = metrics["qos"]["guests"].as_array().expect("qos stats");
    assert_eq!(guests.len(), 2, "{metrics:#}");
    assert_eq!(guests[0]["name"], "heavy");
    assert_eq!(guests[0]["weight"], 3);
    assert_eq!(guests[1]["iops_limit"], PPS, "the pps limit: {metrics:#}");
    let mut share_sum = 0.0;
    for g in guests {
        let frames = g["dispatched"].as_u64().unwrap();
        assert!(frames >= FRAMES, "{g:#}");
        assert_eq!(g["completed"].as_u64(), Some(frames), "{g:#}");
        assert!(
            g["bytes"].as_u64().unwrap() >= FRAMES * FRAME_BYTES,
            "{g:#}"
        );
        assert_eq!(g["refused_enqueues"], 0, "{g:#}");
        share_sum += g["share"].as_f64().unwrap();
    }
    assert!((share_sum - 1.0).abs() < 1e-9, "{metrics:#}");
    // The limited guest waited on its bucket (the kit fills its ring far faster than PPS);
    // the other never did.
    assert!(
        guests[1]["throttled_ms"].as_u64().unwrap() > 0,
        "{metrics:#}"
    );
    assert_eq!(guests[0]["throttled_ms"], 0, "{metrics:#}");
}

#[test]
fn a_bad_net_spec_is_refused_with_its_reason() {
    let cases = [
        ("socket=a.sock,weight=3", "tap= is required"),
        ("tap=x0,weight=3", "socket= is required"),
        (
            "socket=a.sock,tap=x0,weight=0",
            "weight must be in 1..=1000",
        ),
        (
            "socket=a.sock,tap=x0,iops=5",
            "iops is a disk key: a NIC takes pps",
        ),
        (
            "socket=a.sock,tap=x0,queue_prio=1:high",
            "queue_prio names pair 1",
        ),
        (
            "socket=a.sock,tap=x0,queue_prio=0:urgent",
            "queue_prio must be PAIR:",
        ),
        ("socket=a.sock,tap=x0,pps=lots", "bad pps value"),
        (
            "socket=a.sock,tap=x0,notify=sometimes",
            "expected irq, poll",
        ),
        (
            "socket=a.sock,tap=x0,name=device",
            "is the scheduler's own in vm.qos",
        ),
    ];
    for (spec, reason) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "net", &format!("--net={spec}")])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec}: accepted");
        assert!(stderr.contains(reason), "{spec}: {stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "net", "--net=socket=a.sock,tap=x0"])
        .arg("--net=socket=b.sock,tap=x0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "two NICs on one tap accepted");
    assert!(
        stderr.contains("each NIC needs its own socket, tap and name"),
        "{stderr}"
    );
}

/// `sluice ctl qos device` on `serve net`: the device-wide frame bucket (`--qos-device pps=`)
/// changed live in the NIC spelling (`pps`), listed by `vm.qos`; the disk spelling and a bad
/// value are refused and change nothing. No guest needed.
#[test]
fn serve_net_device_bucket_is_changed_live_through_its_api_socket() {
    let name = "serve_net_device_bucket_is_changed_live";
    if !can_make_taps(name) {
        return;
    }
    let dir = scratch(name);
    let suffix = std::process::id() % 100_000;
    let api = dir.join("api.sock");
    let nets = [
        format!(
            "socket={},tap=slqc{suffix},weight=3",
            dir.join("a.sock").display()
        ),
        format!("socket={},tap=slqd{suffix}", dir.join("b.sock").display()),
    ];
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.args(["serve", "net", "--qos-device=pps=600"]);
    for net in &nets {
        command.arg(format!("--net={net}"));
    }
    let mut server = command
        .arg(format!("--api-socket={}", api.display()))
        .stdin(Stdio::null())
        .stderr(File::create(dir.join("serve.log")).unwrap())
        .spawn()
        .expect("start sluice serve net");
    wait_for("the API socket", Duration::from_secs(20), || api.exists());

    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["ctl", "--api-socket"])
            .arg(&api)
            .args(args)
            .output()
            .expect("run sluice ctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let listed = ctl(&["qos"]);
    let changed = ctl(&["qos", "device", "pps=900,pps_burst=30"]);
    let disk_key = ctl(&["qos", "device", "iops=5"]);
    let bad = ctl(&["qos", "device", "pps=many"]);
    let after = ctl(&["qos"]);
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert_eq!(
        wait_or_kill(&mut server, Duration::from_secs(10)),
        Some(0),
        "{}",
        log(&dir)
    );

    let listed: serde_json::Value = serde_json::from_str(&listed.1).unwrap();
    assert_eq!(listed["device"]["iops_limit"], 600, "{listed}");
    assert_eq!(changed.0, 0, "{changed:?}");
    assert!(changed.1.contains("\"iops_limit\":900"), "{changed:?}");
    assert!(changed.1.contains("\"iops_burst\":30"), "{changed:?}");
    assert_eq!(disk_key.0, 1, "{disk_key:?}");
    assert!(disk_key.1.contains("a NIC takes pps"), "{disk_key:?}");
    assert_eq!(bad.0, 1, "{bad:?}");
    assert!(bad.1.contains("bad pps value"), "{bad:?}");
    let after: serde_json::Value = serde_json::from_str(&after.1).unwrap();
    assert_eq!(
        (
            &after["device"]["iops_limit"],
            &after["device"]["iops_burst"]
        ),
        (&900.into(), &30.into()),
        "the refused changes left it: {after}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
