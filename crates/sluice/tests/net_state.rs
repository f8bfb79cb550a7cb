//! virtio-net in snapshots and live migration, end to end through the binary: the guest kit's
//! echo workload (each frame sent, echoed by a host peer on the tap, checked) is snapshotted
//! mid-run and restored into a new process on another tap, and live-migrated mid-run between
//! two sluice processes, each end on its own tap with its own peer; the workload finishes with
//! every frame echoed and checked. Both runs use `--progress json`, whose lines are parsed
//! and checked (monotonic, a last line at 100 %). The emulated e1000 goes through the same
//! snapshot and migration runs with the kit's e1000 driver.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{
    ctl_with_stderr as ctl, send_frame, skip_without_kvm, spawn_counting_echo_peer, wait_for,
    wait_or_kill, SLUICE,
};
use sluice_guest_kit::{report::ExitKind, GuestKitReport};

const FRAMES: u64 = 2000;
const MAC: &str = "52:54:00:5e:0a:01";

/// The NIC under test and the kit workload that drives it.
#[derive(Clone, Copy)]
enum Nic {
    VirtioNet,
    E1000,
}

impl Nic {
    fn arg(self, tap: &str) -> String {
        match self {
            Nic::VirtioNet => format!("--net=tap={tap},mac={MAC}"),
            Nic::E1000 => format!("--e1000=tap={tap},mac={MAC}"),
        }
    }

    /// The kit's workload name, also its RESULT's name.
    fn workload_name(self) -> &'static str {
        match self {
            Nic::VirtioNet => "net",
            Nic::E1000 => "e1000",
        }
    }

    fn workload(self) -> String {
        let kit = self.workload_name();
        format!("quiet w={kit}:dir=echo:size=1000:frames={FRAMES}")
    }
}

/// This suite's directory `name` (see [`common::scratch_dir`]).
fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("net-state", name)
}

/// Why this host cannot run the test (taps need /dev/net/tun and CAP_NET_ADMIN).
fn skip_without_taps(name: &str) -> bool {
    if skip_without_kvm(name) {
        return true;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        println!("SKIP {name}: /dev/net/tun unusable ({e})");
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP {name}: creating a tap needs CAP_NET_ADMIN (not root)");
        return true;
    }
    false
}

/// A tap name of at most 15 bytes, distinct per test and process.
fn tap_name(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id() % 100_000)
}

/// A persistent tap made before the VM that uses it (with the flags sluice opens taps with),
/// so its echo peer is bound before a restored guest sends its first frame; deleted on drop.
struct PersistentTap(String);

impl PersistentTap {
    fn new(name: String) -> Self {
        let made = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"])
            .status()
            .expect("run ip tuntap");
        assert!(made.success(), "ip tuntap add {name}: {made}");
        Self(name)
    }
}

/// Whether a packet socket for EtherType 0x88b5 is bound to `tap` (its echo peer listens).
fn peer_bound(tap: &str) -> bool {
    let name = std::ffi::CString::new(tap).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    let sockets = std::fs::read_to_string("/proc/net/packet").unwrap_or_default();
    index != 0
        && sockets.lines().skip(1).any(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            columns
                .get(3)
                .is_some_and(|p| p.eq_ignore_ascii_case("88b5"))
                && columns.get(4) == Some(&index.to_string().as_str())
        })
}

impl Drop for PersistentTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["tuntap", "del", "dev", &self.0, "mode", "tap"])
            .status();
    }
}

/// The source VM: the echo workload on `tap`, console to `console`, API on `socket`, stderr
/// (progress lines) to `stderr`.
fn start_source(nic: Nic, tap: &str, socket: &Path, console: &Path, stderr: &Path) -> Child {
    Command::new(SLUICE)
        .args(["run", &nic.arg(tap)])
        .arg("--api-socket")
        .arg(socket)
        .arg(format!("--serial=file={}", console.display()))
        .args(["--cmdline", &nic.workload(), "--progress", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .expect("start the source")
}

/// The JSON progress lines of `phase` in `stderr` (other lines are the log).
fn progress_lines(stderr: &str, phase: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["phase"] == phase)
        .collect()
}

/// Progress never goes back (pages overall; bytes within a round, never past its total), and
/// the last line, only that one, says the phase completed at 100 %.
fn assert_phase(stderr: &str, phase: &str) {
    let lines = progress_lines(stderr, phase);
    let (last, rest) = lines
        .split_last()
        .unwrap_or_else(|| panic!("no {phase} progress lines in:\n{stderr}"));
    println!("{phase}: {} progress lines, last {last}", lines.len());
    let field = |v: &serde_json::Value, k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {v}"))
    };
    for pair in lines.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        for monotonic in ["pages", "round", "elapsed_ms"] {
            assert!(field(b, monotonic) >= field(a, monotonic), "{a} then {b}");
        }
        let same_step = field(a, "round") == field(b, "round")
            && field(a, "bytes_total") == field(b, "bytes_total");
        if same_step {
            assert!(
                field(b, "bytes_done") >= field(a, "bytes_done"),
                "{a} then {b}"
            );
        }
    }
    for line in &lines {
        assert!(
            field(line, "bytes_done") <= field(line, "bytes_total"),
            "{line}"
        );
        assert!(field(line, "percent") <= 100, "{line}");
    }
    for line in rest {
        assert_eq!(line["done"], false, "only the last line is done: {line}");
    }
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(field(last, "percent"), 100, "{last}");
    assert_eq!(
        field(last, "bytes_done"),
        field(last, "bytes_total"),
        "{last}"
    );
    assert!(field(last, "pages") > 0, "{last}");
}

/// The guest kit's echo ran to the end: every frame sent, echoed and checked.
fn assert_all_frames_echoed(nic: Nic, console: &str) {
    let report = GuestKitReport::parse(console, ExitKind::Pass);
    assert!(report.passed(), "{}", report.describe());
    let net = report
        .results_for(nic.workload_name())
        .next()
        .expect("a net RESULT");
    assert_eq!(net.errors, Some(0), "{}", report.describe());
    assert_eq!(net.raw["frames"], FRAMES, "{}", report.describe());
}

fn restore(nic: Nic, dir: &Path, tap: &str) -> Output {
    let child = Command::new(SLUICE)
        .args(["run", "--restore"])
        .arg(dir)
        .arg(nic.arg(tap))
        .args(["--progress", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("restore");
    output_within(child, Duration::from_secs(180))
}

/// The child's exit status and output; killed if it has not exited within `timeout`.
fn output_within(mut child: Child, timeout: Duration) -> Output {
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let (out, err) = (read(Box::new(out)), read(Box::new(err)));
    let status = wait_or_kill(&mut child, timeout);
    let status = child
        .wait()
        .unwrap_or_else(|_| panic!("sluice: {status:?}"));
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

#[test]
fn a_net_echo_snapshotted_mid_run_finishes_after_restore_on_another_tap() {
    let name = "a_net_echo_snapshotted_mid_run_finishes_after_restore_on_another_tap";
    snapshot_mid_run_then_restore(name, Nic::VirtioNet, ("sna", "snb"));
}

#[test]
fn an_e1000_echo_snapshotted_mid_run_finishes_after_restore_on_another_tap() {
    let name = "an_e1000_echo_snapshotted_mid_run_finishes_after_restore_on_another_tap";
    snapshot_mid_run_then_restore(name, Nic::E1000, ("sea", "seb"));
}

/// Snapshot of the echo mid-run, the first VM shut down, the snapshot restored on another
/// tap with its own peer: the echo finishes there.
fn snapshot_mid_run_then_restore(name: &str, nic: Nic, taps: (&str, &str)) {
    if skip_without_taps(name) {
        return;
    }
    let dir = scratch(taps.0);
    let (socket, console, stderr, snapshot) = (
        dir.join("api.sock"),
        dir.join("first.txt"),
        dir.join("first.err"),
        dir.join("snap"),
    );
    let (tap_a, tap_b) = (tap_name(taps.0), tap_name(taps.1));
    let peer_a = spawn_counting_echo_peer(tap_a.clone());
    let mut vm = start_source(nic, &tap_a, &socket, &console, &stderr);
    wait_for("the echo to run", Duration::from_secs(60), || {
        peer_a.echoed.load(Ordering::Relaxed) >= FRAMES / 10
    });

    let paused = ctl(&socket, &["pause"]);
    let before = std::fs::read_to_string(&console).unwrap();
    let taken = ctl(&socket, &["snapshot", &snapshot.display().to_string()]);
    let _ = ctl(&socket, &["shutdown"]);
    let first_status = wait_or_kill(&mut vm, Duration::from_secs(20));
    peer_a.stop.store(true, Ordering::Relaxed);
    let before_snapshot = peer_a.handle.join().unwrap();
    let persistent_b = PersistentTap::new(tap_b.clone());
    let peer_b = spawn_counting_echo_peer(tap_b.clone());
    wait_for("the peer on the new tap", Duration::from_secs(10), || {
        peer_bound(&tap_b)
    });
    let restored = restore(nic, &snapshot, &tap_b);
    peer_b.stop.store(true, Ordering::Relaxed);
    let after_restore = peer_b.handle.join().unwrap();
    drop(persistent_b);

    assert_eq!(paused.0, 0, "{paused:?}");
    assert_eq!(taken.0, 0, "{taken:?}");
    assert_eq!(first_status, Some(0));
    assert!(
        !before.contains("RESULT"),
        "ended before the snapshot:\n{before}"
    );
    let console = String::from_utf8_lossy(&restored.stdout);
    let log = String::from_utf8_lossy(&restored.stderr);
    println!("{name}: {before_snapshot} frames echoed before the snapshot, {after_restore} after");
    assert_eq!(restored.status.code(), Some(0), "{console}\n{log}");
    assert_all_frames_echoed(nic, &console);
    assert!(after_restore > 0, "the restored VM used the new tap");
    assert!(before_snapshot + after_restore >= FRAMES);
    assert_phase(&std::fs::read_to_string(&stderr).unwrap(), "snapshot");
    assert_phase(&log, "restore");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_net_echo_live_migrated_mid_run_finishes_at_the_destination_on_its_own_tap() {
    let name = "a_net_echo_live_migrated_mid_run_finishes_at_the_destination_on_its_own_tap";
    migrate_mid_run(name, Nic::VirtioNet, ("mga", "mgb"));
}

#[test]
fn an_e1000_echo_live_migrated_mid_run_finishes_at_the_destination_on_its_own_tap() {
    let name = "an_e1000_echo_live_migrated_mid_run_finishes_at_the_destination_on_its_own_tap";
    migrate_mid_run(name, Nic::E1000, ("mea", "meb"));
}

/// Live migration of the echo mid-run to a destination on its own tap with its own peer.
fn migrate_mid_run(name: &str, nic: Nic, taps: (&str, &str)) {
    if skip_without_taps(name) {
        return;
    }
    let dir = scratch(taps.0);
    let (socket, console, stderr) = (
        dir.join("api.sock"),
        dir.join("source.txt"),
        dir.join("source.err"),
    );
    let stream = dir.join("migrate.sock");
    let url = format!("unix:{}", stream.display());
    let (tap_a, tap_b) = (tap_name(taps.0), tap_name(taps.1));
    let peer_a = spawn_counting_echo_peer(tap_a.clone());
    let persistent_b = PersistentTap::new(tap_b.clone());
    let peer_b = spawn_counting_echo_peer(tap_b.clone());
    wait_for(
        "the peer on the destination's tap",
        Duration::from_secs(10),
        || peer_bound(&tap_b),
    );
    let destination = Command::new(SLUICE)
        .args(["run", &nic.arg(&tap_b)])
        .args(["--migrate-from", &url, "--progress", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination");
    wait_for("the destination to listen", Duration::from_secs(10), || {
        stream.exists()
    });
    let mut source = start_source(nic, &tap_a, &socket, &console, &stderr);
    wait_for("the echo to run", Duration::from_secs(60), || {
        peer_a.echoed.load(Ordering::Relaxed) >= FRAMES / 10
    });

    let (status, answer) = ctl(&socket, &["migrate", &url]);
    // A reply on the wire at the switchover (sent after the source captured its NIC) is lost,
    // as on any link; the peer sends its last one again on the new tap, as a retransmitting
    // peer would. The kit ignores a reply it already had (another sequence number).
    let last_reply = peer_a.last.lock().unwrap().clone();
    let resent = send_frame(&tap_b, &last_reply);
    let source_status = wait_or_kill(&mut source, Duration::from_secs(30));
    let before = std::fs::read_to_string(&console).unwrap();
    let finished = output_within(destination, Duration::from_secs(180));
    peer_a.stop.store(true, Ordering::Relaxed);
    peer_b.stop.store(true, Ordering::Relaxed);
    let (at_source, at_destination) =
        (peer_a.handle.join().unwrap(), peer_b.handle.join().unwrap());
    drop(persistent_b);

    assert_eq!(status, 0, "{answer}");
    let report: serde_json::Value = serde_json::from_str(answer.trim()).expect(&answer);
    println!(
        "{name}: total {} ms, downtime {} ms, {} rounds, {} pages; {at_source} frames echoed \
         at the source, {at_destination} at the destination",
        report["total_ms"], report["downtime_ms"], report["rounds"], report["pages_sent"]
    );
    assert_eq!(source_status, Some(0), "the source exits 0 once migrated");
    assert!(resent.is_ok(), "{resent:?}");
    assert!(
        !before.contains("RESULT"),
        "ended before the migration:\n{before}"
    );
    let console = String::from_utf8_lossy(&finished.stdout);
    let log = String::from_utf8_lossy(&finished.stderr);
    assert_eq!(finished.status.code(), Some(0), "{console}\n{log}");
    assert_all_frames_echoed(nic, &console);
    assert!(at_destination > 0, "the destination used its own tap");
    assert!(at_source + at_destination >= FRAMES);
    assert_phase(&std::fs::read_to_string(&stderr).unwrap(), "migrate");
    assert_phase(&log, "receive");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot stops the NIC's rings until the VM runs on: resumed after the snapshot, the echo
/// finishes in the same process with every frame echoed.
#[test]
fn a_net_echo_snapshotted_mid_run_and_resumed_in_place_finishes() {
    let name = "a_net_echo_snapshotted_mid_run_and_resumed_in_place_finishes";
    if skip_without_taps(name) {
        return;
    }
    let dir = scratch("resume");
    let (socket, console, stderr, snapshot) = (
        dir.join("api.sock"),
        dir.join("console.txt"),
        dir.join("console.err"),
        dir.join("snap"),
    );
    let tap = tap_name("snr");
    let peer = spawn_counting_echo_peer(tap.clone());
    let mut vm = start_source(Nic::VirtioNet, &tap, &socket, &console, &stderr);
    wait_for("the echo to run", Duration::from_secs(60), || {
        peer.echoed.load(Ordering::Relaxed) >= FRAMES / 10
    });

    let paused = ctl(&socket, &["pause"]);
    let taken = ctl(&socket, &["snapshot", &snapshot.display().to_string()]);
    let resumed = ctl(&socket, &["resume"]);
    let status = wait_or_kill(&mut vm, Duration::from_secs(120));
    peer.stop.store(true, Ordering::Relaxed);
    let total = peer.handle.join().unwrap();

    assert_eq!(paused.0, 0, "{paused:?}");
    assert_eq!(taken.0, 0, "{taken:?}");
    assert_eq!(resumed.0, 0, "{resumed:?}");
    let console = std::fs::read_to_string(&console).unwrap();
    assert_eq!(status, Some(0), "{console}");
    assert_all_frames_echoed(Nic::VirtioNet, &console);
    assert!(total >= FRAMES, "{total} frames echoed");
    let _ = std::fs::remove_dir_all(&dir);
}
