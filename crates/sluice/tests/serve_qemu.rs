//! `sluice serve` behind QEMU's own vhost-user frontends (vhost-user-blk-pci, vhost-user-rng-pci,
//! virtio-net-pci on a vhost-user netdev) with packed virtqueues: QEMU offers `packed=on`, the guest kit asks for `vq=packed`, and the
//! rings the backend runs are packed ones. The guest kit verifies what it wrote; the image must
//! hold the pattern afterwards. The ring state crosses GET_VRING_BASE / SET_VRING_BASE when QEMU
//! stops and continues the VM (its monitor) and when the backend is killed and restarted (the
//! packed inflight area brings back what was in flight) — no request may be lost either way.
//!
//! QEMU runs TCG: the kit's drivers behave the same there, and it works on any host.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_guest_kit::pattern::check_pattern;
use sluice_guest_kit::{
    find_qemu, Accel, Device, GuestKitReport, GuestKitRun, Machine, WorkloadResult,
};

const SEED: u64 = 31;
const BLOCK: u64 = 4096;
const IMAGE_BYTES: u64 = 64 << 20;
/// Long enough (a few seconds under TCG) for the VM to be stopped or the backend killed mid-run.
const LONG_SPAN_MB: u64 = 24;

fn scratch(name: &str, suffix: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-qemu");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}.{suffix}", std::process::id()))
}

fn skip_without_qemu(test: &str) -> bool {
    match find_qemu() {
        Ok(_) => false,
        Err(e) => {
            println!("SKIP {test}: {e}");
            true
        }
    }
}

/// `sluice serve KIND ARGS --socket S`, its stderr (info level) in a file; killed on drop.
struct Serve {
    args: Vec<String>,
    socket: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Serve {
    fn start(name: &str, args: &[&str]) -> Serve {
        let socket = scratch(name, "sock");
        let log = scratch(name, "log");
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--socket".into(), socket.display().to_string()]);
        let child = Self::spawn(&args, &socket, &log);
        let mut serve = Serve {
            args,
            socket,
            log,
            child,
        };
        serve.wait_listening();
        serve
    }

    fn spawn(args: &[String], socket: &Path, log: &Path) -> Child {
        let _ = std::fs::remove_file(socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("serve")
            .args(args)
            .env("SLUICE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sluice serve")
    }

    fn wait_listening(&mut self) {
        if let Err(status) = self.try_wait_listening() {
            panic!("sluice serve exited: {status}: {}", self.log_text());
        }
    }

    /// Waits for the socket to accept; Err if the process exited first.
    fn try_wait_listening(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "sluice serve never listened");
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL (no cleanup, like a crash), then the same command again. The dead process's
    /// io_uring may hold the image (and its lock) for a moment after it died, so the new one
    /// is retried for a while, as a supervisor would.
    fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..50 {
            self.child = Self::spawn(&self.args, &self.socket, &self.log);
            if self.try_wait_listening().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sluice serve did not come back: {}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.log);
    }
}

fn image(name: &str) -> PathBuf {
    let path = scratch(name, "img");
    File::create(&path).unwrap().set_len(IMAGE_BYTES).unwrap();
    path
}

/// The guest kit under QEMU TCG with a vhost-user-blk disk on `socket`, packed rings offered
/// and asked for, verifying `span_mb` MiB.
fn blk_run(socket: &Path, span_mb: u64, reconnect: bool) -> GuestKitRun {
    let cmdline =
        format!("quiet vq=packed w=blk:op=verify:bs={BLOCK}:qd=8:span_mb={span_mb}:seed={SEED}");
    let mut run = GuestKitRun::qemu(Accel::Tcg, Machine::Q35, &cmdline)
        .with_device(Device::VhostUserBlk {
            socket: socket.to_path_buf(),
            queues: 1,
            reconnect,
        })
        .with_packed_virtqueues()
        .with_timeout(Duration::from_secs(240));
    run.memory_mib = 128;
    run
}

fn blk_result(report: &GuestKitReport) -> &WorkloadResult {
    report
        .results_for("blk")
        .next()
        .unwrap_or_else(|| panic!("no blk RESULT: {}", report.describe()))
}

/// The run passed, verified, over `layout` rings, and the image holds the pattern over the
/// span and nothing past it.
fn assert_verified(report: &GuestKitReport, image: &Path, span_mb: u64, layout: &str, log: &str) {
    assert!(
        report.passed(),
        "{}\n--- serve ---\n{log}",
        report.describe()
    );
    let blk = blk_result(report);
    assert_eq!(blk.verify.as_deref(), Some("ok"), "{}", report.describe());
    assert_eq!(blk.errors, Some(0), "{}", report.describe());
    assert_eq!(blk.raw["vq"], layout, "{}", report.describe());
    let file = File::open(image).unwrap();
    let span = span_mb << 20;
    for offset in [0, 17 * BLOCK, span / 2, span - BLOCK] {
        let mut bytes = vec![0u8; BLOCK as usize];
        file.read_exact_at(&mut bytes, offset).unwrap();
        assert_eq!(
            check_pattern(SEED, offset, &bytes),
            Ok(()),
            "image block at {offset:#x}"
        );
    }
    let mut past = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut past, span).unwrap();
    assert!(past.iter().all(|&b| b == 0), "written past the span");
}

#[test]
fn qemu_blk_over_packed_rings_on_sluice_serve_blk() {
    let name = "qemu_blk_packed";
    if skip_without_qemu(name) {
        return;
    }
    let image = image(name);
    let serve = Serve::start(name, &["blk", "--image", &image.display().to_string()]);

    let report = blk_run(&serve.socket, 1, false).run().expect("run QEMU");

    assert_verified(&report, &image, 1, "packed", &serve.log_text());
    let _ = std::fs::remove_file(&image);
}

/// `--packed off` (the A/B switch): QEMU's `packed=on` is masked by the backend's features and
/// the same kit, still asking for packed rings, runs split ones.
#[test]
fn qemu_blk_with_serve_packed_off_runs_split_rings() {
    let name = "qemu_blk_packed_off";
    if skip_without_qemu(name) {
        return;
    }
    let image = image(name);
    let serve = Serve::start(
        name,
        &[
            "blk",
            "--packed",
            "off",
            "--image",
            &image.display().to_string(),
        ],
    );

    let report = blk_run(&serve.socket, 1, false).run().expect("run QEMU");

    assert_verified(&report, &image, 1, "split", &serve.log_text());
    let _ = std::fs::remove_file(&image);
}

/// Sends HMP `command` to QEMU's monitor at `monitor`; false if QEMU is not (or no longer)
/// listening.
fn monitor_command(monitor: &Path, command: &str) -> bool {
    let Ok(mut stream) = UnixStream::connect(monitor) else {
        return false;
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    if stream.write_all(format!("{command}\n").as_bytes()).is_err() {
        return false;
    }
    // Wait for the prompt after the command's echo, so the command ran before we go on.
    let mut seen = String::new();
    let mut buffer = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && seen.matches("(qemu)").count() < 2 {
        match stream.read(&mut buffer) {
            Ok(0) => return false,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buffer[..n])),
            Err(_) => {}
        }
    }
    true
}

/// QEMU stops and continues the VM again and again while the kit verifies: each stop makes
/// QEMU's vhost-user-blk fetch the packed ring state (GET_VRING_BASE) and each continue hand
/// it back (SET_VRING_BASE). Every request must survive.
#[test]
fn qemu_stop_and_cont_mid_run_keep_every_packed_request() {
    let name = "qemu_blk_packed_stop_cont";
    if skip_without_qemu(name) {
        return;
    }
    let image = image(name);
    let serve = Serve::start(name, &["blk", "--image", &image.display().to_string()]);
    let monitor = scratch(name, "monitor");
    let mut run = blk_run(&serve.socket, LONG_SPAN_MB, false);
    run.monitor = Some(monitor.clone());
    let done = Arc::new(AtomicBool::new(false));

    let stopper = {
        let (monitor, done) = (monitor.clone(), done.clone());
        std::thread::spawn(move || {
            let mut cycles = 0;
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if monitor_command(&monitor, "stop") {
                    std::thread::sleep(Duration::from_millis(20));
                    if monitor_command(&monitor, "cont") {
                        cycles += 1;
                    }
                }
            }
            cycles
        })
    };
    let report = run.run().expect("run QEMU");
    done.store(true, Ordering::SeqCst);
    let cycles = stopper.join().unwrap();

    let log = serve.log_text();
    assert_verified(&report, &image, LONG_SPAN_MB, "packed", &log);
    // Ring positions the backend handed QEMU: the kit's rings stopped at different places on
    // different laps (0x0 is SeaBIOS's split ring before the kit's driver).
    let mut positions: Vec<&str> = log
        .lines()
        .filter_map(|line| line.split("stopped by GET_VRING_BASE at ").nth(1))
        .filter(|base| *base != "0x0")
        .collect();
    positions.dedup();
    assert!(
        cycles >= 3 && positions.len() >= 3,
        "{cycles} stop/cont cycles, ring stopped at {positions:?}: the state never crossed\n{log}"
    );
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&monitor);
}

/// The backend is killed (SIGKILL) mid-run and started again; QEMU reconnects and hands it the
/// packed inflight area: requests that were in flight are resubmitted, none is lost.
#[test]
fn qemu_blk_over_packed_rings_survives_a_backend_restart() {
    let name = "qemu_blk_packed_restart";
    if skip_without_qemu(name) {
        return;
    }
    let image = image(name);
    let mut serve = Serve::start(name, &["blk", "--image", &image.display().to_string()]);
    let run = blk_run(&serve.socket, LONG_SPAN_MB, true);

    let guest = std::thread::spawn(move || run.run().expect("run QEMU"));
    // Wait until the guest's first writes land, then kill the backend in the middle of it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let file = File::open(&image).unwrap();
    let mut first = vec![0u8; BLOCK as usize];
    while Instant::now() < deadline {
        file.read_exact_at(&mut first, 0).unwrap();
        if first.iter().any(|&b| b != 0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !guest.is_finished(),
        "the run ended before the backend could be killed"
    );
    serve.kill_and_restart();
    let report = guest.join().unwrap();

    let log = serve.log_text();
    assert_verified(&report, &image, LONG_SPAN_MB, "packed", &log);
    assert_eq!(log.matches("listening on").count(), 2, "one restart: {log}");
    // QEMU resends the last ring base it had, which is stale: the new backend takes the
    // positions (and whatever was in flight at the kill, often nothing under TCG) from the
    // area. crates/vhost/tests/packed.rs resubmits requests in flight deterministically.
    assert!(
        log.contains("the inflight area places the ring"),
        "the restarted backend did not resume from the inflight area: {log}"
    );
    let _ = std::fs::remove_file(&image);
}

#[test]
fn qemu_rng_over_packed_rings_on_sluice_serve_rng() {
    let name = "qemu_rng_packed";
    if skip_without_qemu(name) {
        return;
    }
    let serve = Serve::start(name, &["rng"]);
    let device = Device::VhostUserRng {
        socket: serve.socket.clone(),
    };

    let (report, rng) = run_packed(&serve, device, "w=rng:bytes=8192", "rng");

    assert_eq!(rng.raw["bytes"], 8192, "{}", report.describe());
}

/// QEMU (TCG) with `device` served by `serve`, packed rings offered and asked for (`vq=packed
/// <workloads>`): the run passed and `workload`'s RESULT says it ran packed rings.
fn run_packed(
    serve: &Serve,
    device: Device,
    workloads: &str,
    workload: &str,
) -> (GuestKitReport, WorkloadResult) {
    let cmdline = format!("quiet vq=packed {workloads}");
    let run = GuestKitRun::qemu(Accel::Tcg, Machine::Q35, &cmdline)
        .with_device(device)
        .with_packed_virtqueues()
        .with_timeout(Duration::from_secs(120));

    let report = run.run().expect("run QEMU");

    assert!(
        report.passed(),
        "{}\n{}",
        report.describe(),
        serve.log_text()
    );
    let result = report
        .results_for(workload)
        .next()
        .unwrap_or_else(|| panic!("no {workload} RESULT: {}", report.describe()))
        .clone();
    assert_eq!(result.raw["vq"], "packed", "{}", report.describe());
    (report, result)
}

/// QEMU's virtio-net on a vhost-user netdev served by `sluice serve net` over a tap, packed
/// rings: the kit's transmitted frames come out of the tap on the host.
#[test]
fn qemu_net_tx_over_packed_rings_on_sluice_serve_net() {
    let name = "qemu_net_packed";
    if skip_without_qemu(name) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || File::open("/dev/net/tun").is_err() {
        println!("SKIP {name}: creating a tap needs root and /dev/net/tun");
        return;
    }
    const FRAMES: u64 = 2000;
    let tap = format!("slvp{}", std::process::id() % 100_000);
    let serve = Serve::start(name, &["net", "--tap", &tap]);
    let tap_counter = |counter: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{counter}"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = tap_counter("rx_packets");
    let device = Device::VhostUserNet {
        socket: serve.socket.clone(),
    };

    let workloads = format!("w=net:dir=tx:size=64:frames={FRAMES}");
    let (report, net) = run_packed(&serve, device, &workloads, "net");

    assert_eq!(net.errors, Some(0), "{}", report.describe());
    let delivered = tap_counter("rx_packets") - before;
    assert!(
        delivered >= FRAMES,
        "{delivered} frames reached the tap, the kit sent {FRAMES}"
    );
}
