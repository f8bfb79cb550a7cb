//! Live migration end to end: a guest kit verifying a virtio-blk disk — on an image, or served
//! by a `sluice serve blk` backend process (vhost-user, its writes logged through
//! VHOST_USER_SET_LOG_BASE) — is migrated mid-run from one `sluice run` to another
//! `sluice run --migrate-from` over a Unix socket and finishes there; and a destination killed
//! mid-stream leaves the VM running at the source.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    ctl_with_stderr as ctl, skip_without_kvm, start_idle_vm_with_api, wait_for, wait_or_kill,
    EXIT_GUEST_CRASH, SLUICE,
};

/// The verify workload the migration test moves: writes a pattern over the span and reads it
/// back (about 2 s here); its 128 request buffers of 16 KiB (512 pages) are rewritten all the
/// time, by the guest and by the device, so pre-copy takes rounds.
const BUSY: Workload = Workload {
    cmdline: "w=blk:op=verify:bs=16384:qd=128:span_mb=768:seed=11",
    span: 768 << 20,
};
/// [`BUSY`] on the emulated NVMe controller: two I/O queue pairs with shadow doorbells.
const BUSY_NVME: Workload = Workload {
    cmdline: "w=nvme:op=verify:bs=16384:qd=128:queues=2:span_mb=768:seed=11:dbbuf=on",
    span: 768 << 20,
};
/// A shorter verify for the tests where the migration fails and the source finishes.
const SHORT: Workload = Workload {
    cmdline: "w=blk:op=verify:bs=4096:qd=16:span_mb=96:seed=11",
    span: 96 << 20,
};

struct Workload {
    cmdline: &'static str,
    span: u64,
}

/// This suite's directory `name` (see [`common::scratch_dir`]).
fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("migration", name)
}

/// The source: the guest kit running `workload` on a fresh image, console to `console`, API on
/// `socket`; returns once the kit found its disk.
fn start_source(
    dir: &Path,
    image: &Path,
    socket: &Path,
    console: &Path,
    workload: &Workload,
) -> Child {
    create_image(image, workload);
    start_source_on(
        dir,
        &format!("--disk=path={}", image.display()),
        socket,
        console,
        workload,
    )
}

fn create_image(image: &Path, workload: &Workload) {
    std::fs::File::create(image)
        .unwrap()
        .set_len(workload.span + (16 << 20))
        .unwrap();
}

/// [`start_source`] with `device` (`--disk=...` or `--nvme=...`; the image exists).
fn start_source_on(
    dir: &Path,
    device: &str,
    socket: &Path,
    console: &Path,
    workload: &Workload,
) -> Child {
    let child = Command::new(SLUICE)
        .args(["run", device])
        .arg("--api-socket")
        .arg(socket)
        .arg(format!("--serial=file={}", console.display()))
        .args(["--cmdline", workload.cmdline])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the source");
    wait_for("the workload", Duration::from_secs(30), || {
        std::fs::read_to_string(console).is_ok_and(|c| c.contains("virtio-blk 00:"))
            || requests_done(socket) > 0
    });
    child
}

/// Requests the source's devices have completed so far (every queue: an NVMe controller's
/// I/O queues follow its admin queue).
fn requests_done(socket: &Path) -> u64 {
    let (_, counters) = ctl(socket, &["counters"]);
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap_or_default();
    counters["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["queues"].as_array().into_iter().flatten())
        .filter_map(|q| q["requests"].as_u64())
        .sum()
}

/// The destination: the same devices, waiting for the stream at `url`.
fn start_destination(image: &Path, url: &str) -> Child {
    start_destination_on(&format!("--disk=path={}", image.display()), url)
}

/// [`start_destination`] with `device` (`--disk=...` or `--nvme=...`).
fn start_destination_on(device: &str, url: &str) -> Child {
    Command::new(SLUICE)
        .args(["--log", "sluice_vmm::machine=info"])
        .args(["run", device])
        .args(["--migrate-from", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination")
}

fn pattern_at(image: &Path, offset: u64) -> Result<(), String> {
    let mut block = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(image).unwrap(),
        &mut block,
        offset,
    )
    .unwrap();
    sluice_guest_kit::pattern::check_pattern(11, offset, &block).map_err(|e| format!("{e:?}"))
}

#[test]
fn a_guest_kit_verify_migrated_mid_run_over_a_unix_socket_finishes_at_the_destination() {
    if skip_without_kvm(
        "a_guest_kit_verify_migrated_mid_run_over_a_unix_socket_finishes_at_the_destination",
    ) {
        return;
    }
    let dir = scratch("blk");
    let image = dir.join("disk.img");
    create_image(&image, &BUSY);
    let disk = format!("--disk=path={}", image.display());

    migrate_busy_verify(&dir, &disk, &image, &BUSY);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The busy verify on the emulated NVMe controller (`--nvme`, two I/O queue pairs, shadow
/// doorbells): its queues quiesce at the stop-and-copy, its completions and data buffers are
/// in the device dirty log, and the destination's controller resumes them.
#[test]
fn a_guest_kit_nvme_verify_migrated_mid_run_finishes_at_the_destination() {
    if skip_without_kvm("a_guest_kit_nvme_verify_migrated_mid_run_finishes_at_the_destination") {
        return;
    }
    let dir = scratch("nvme");
    let image = dir.join("nvme.img");
    create_image(&image, &BUSY_NVME);
    let nvme = format!("--nvme=path={},queues=2,dbbuf=on", image.display());

    migrate_busy_verify(&dir, &nvme, &image, &BUSY_NVME);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The blk verify test on a vhost-user disk: `sluice serve blk` serves the image to the source,
/// logs what it writes while the migration runs, is handed over at the stop-and-copy and
/// serves the destination, where the verify finishes.
#[test]
fn a_guest_kit_verify_on_a_vhost_user_disk_migrated_mid_run_finishes_at_the_destination() {
    if skip_without_kvm(
        "a_guest_kit_verify_on_a_vhost_user_disk_migrated_mid_run_finishes_at_the_destination",
    ) {
        return;
    }
    let dir = scratch("vhost-user");
    let image = dir.join("disk.img");
    create_image(&image, &BUSY);
    let mut backend = ServeBlk::start(&dir, &image);

    migrate_busy_verify(&dir, &backend.disk(), &image, &BUSY);
    let log = backend.stop();
    assert!(
        log.contains("dirty log of"),
        "the backend was given a dirty log:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A migration of a VM with a vhost-user disk that fails after the hand-over (the destination
/// cannot restore the state): the source takes the backend back (its frontend reconnects and
/// restores the rings) and the verify finishes there.
#[test]
fn a_failed_migration_gives_the_vhost_user_disk_back_and_the_verify_finishes_at_the_source() {
    if skip_without_kvm(
        "a_failed_migration_gives_the_vhost_user_disk_back_and_the_verify_finishes_at_the_source",
    ) {
        return;
    }
    let dir = scratch("vhost-user-back");
    let (image, socket, console) = (
        dir.join("disk.img"),
        dir.join("api.sock"),
        dir.join("source.txt"),
    );
    create_image(&image, &SHORT);
    let mut backend = ServeBlk::start(&dir, &image);
    let stream = dir.join("migrate.sock");
    let url = format!("unix:{}", stream.display());
    // No disk: the state's function has nowhere to go, after the source handed the backend over.
    let destination = Command::new(SLUICE)
        .args(["run", "--migrate-from", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination");
    wait_for("the destination to listen", Duration::from_secs(10), || {
        stream.exists()
    });
    let mut source = start_source_on(&dir, &backend.disk(), &socket, &console, &SHORT);
    // The kit names the disk before its driver starts it; a migration before that finds the
    // backend's rings not running — nothing to log, nothing to hand over (seen under load).
    wait_for("the disk's first request", Duration::from_secs(30), || {
        requests_done(&socket) > 0
    });

    let (status, answer) = ctl(&socket, &["migrate", &url]);
    let refused = destination.wait_with_output().unwrap();
    let source_status = wait_or_kill(&mut source, Duration::from_secs(90));
    let console = std::fs::read_to_string(&console).unwrap();
    let log = backend.stop();

    println!("the source after the refusal: {}", answer.trim());
    assert_ne!(status, 0, "{answer}");
    assert!(answer.contains("did not acknowledge"), "{answer}");
    assert_ne!(refused.status.code(), Some(0));
    assert!(log.contains("dirty log of"), "{log}");
    assert_eq!(source_status, Some(0), "{console}\n--- backend ---\n{log}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    assert!(console.contains("\"verify\":\"ok\""), "{console}");
    assert_eq!(pattern_at(&image, SHORT.span - 4096), Ok(()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sluice serve blk` on `image`, logging to a file in the test's directory.
struct ServeBlk {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl ServeBlk {
    fn start(dir: &Path, image: &Path) -> Self {
        let (socket, log) = (dir.join("blk.sock"), dir.join("backend.log"));
        let child = Command::new(SLUICE)
            .args(["--log", "warn,sluice_vhost=info"])
            .args(["serve", "blk", "--socket"])
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sluice serve blk");
        wait_for("the backend to listen", Duration::from_secs(10), || {
            socket.exists()
        });
        Self { child, socket, log }
    }

    /// The `--disk` argument of a VM on this backend.
    fn disk(&self) -> String {
        format!("--disk=vhost_user=on,socket={}", self.socket.display())
    }

    /// Stops the backend and returns its log.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServeBlk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `workload` on `device` (`--disk=...` or `--nvme=...` over `image`), migrates it
/// mid-run to a second process and checks it finishes there with verify ok, the image holding
/// the pattern.
fn migrate_busy_verify(dir: &Path, device: &str, image: &Path, workload: &Workload) {
    let (socket, console) = (dir.join("api.sock"), dir.join("source.txt"));
    let stream = dir.join("migrate.sock");
    let url = format!("unix:{}", stream.display());
    let destination = start_destination_on(device, &url);
    wait_for("the destination to listen", Duration::from_secs(10), || {
        stream.exists()
    });
    let mut source = start_source_on(dir, device, &socket, &console, workload);
    // Every buffer used a few times: the data phase runs, and dirties pages as it goes.
    wait_for("the workload's data phase", Duration::from_secs(30), || {
        requests_done(&socket) >= 512
    });

    let (status, answer) = ctl(&socket, &["migrate", &url]);
    let source_status = wait_or_kill(&mut source, Duration::from_secs(20));
    let before = std::fs::read_to_string(&console).unwrap();
    let finished = destination.wait_with_output().unwrap();

    assert_eq!(
        status,
        0,
        "{answer}\n--- destination ---\n{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(answer.trim()).expect(&answer);
    println!(
        "migrated: total {} ms, downtime {} ms, {} rounds, {} pages, throttle {}%",
        report["total_ms"],
        report["downtime_ms"],
        report["rounds"],
        report["pages_sent"],
        report["throttle_percent"]
    );
    assert!(report["pages_sent"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["rounds"].as_u64().unwrap() >= 2,
        "pre-copy rounds, then the stop-and-copy: {report}"
    );
    let downtime = report["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0, "{report}");
    assert!(report["total_ms"].as_f64().unwrap() >= downtime, "{report}");
    assert_eq!(source_status, Some(0), "the source exits 0 once migrated");
    assert!(
        !before.contains("RESULT"),
        "the workload ended before the migration:\n{before}"
    );
    let console = String::from_utf8_lossy(&finished.stdout);
    let log = String::from_utf8_lossy(&finished.stderr);
    assert_eq!(finished.status.code(), Some(0), "{console}\n{log}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    assert!(console.contains("\"verify\":\"ok\""), "{console}");
    let resumed = report["resumed_unix_ns"].as_u64().unwrap();
    assert!(
        log.contains(&format!("vCPUs resumed at {resumed} ns")),
        "the destination logs the resume time the source reports:\n{log}"
    );
    assert_eq!(pattern_at(image, 0), Ok(()));
    assert_eq!(
        pattern_at(image, workload.span - 4096),
        Ok(()),
        "the last block of the span holds the pattern"
    );
}

#[test]
fn a_destination_killed_mid_stream_leaves_the_vm_running_at_the_source() {
    if skip_without_kvm("a_destination_killed_mid_stream_leaves_the_vm_running_at_the_source") {
        return;
    }
    let dir = scratch("killed");
    let (image, socket, console) = (
        dir.join("disk.img"),
        dir.join("api.sock"),
        dir.join("source.txt"),
    );
    let stream = dir.join("migrate.sock");
    let url = format!("unix:{}", stream.display());
    let mut destination = start_destination(&image, &url);
    wait_for("the destination to listen", Duration::from_secs(10), || {
        stream.exists()
    });
    // Stopped, the destination reads nothing: the source fills the socket and blocks in the
    // middle of round 0, where the kill below finds it.
    let pid = destination.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let mut source = start_source(&dir, &image, &socket, &console, &SHORT);

    let migrate = {
        let socket = socket.clone();
        let url = url.clone();
        std::thread::spawn(move || ctl(&socket, &["migrate", &url]))
    };
    std::thread::sleep(Duration::from_millis(300));
    destination.kill().unwrap();
    let _ = destination.wait();
    let (status, answer) = migrate.join().unwrap();
    let source_status = wait_or_kill(&mut source, Duration::from_secs(60));
    let console = std::fs::read_to_string(&console).unwrap();

    println!("the source after the kill: {}", answer.trim());
    assert_ne!(status, 0, "the migration cannot succeed: {answer}");
    assert!(answer.contains("migration failed"), "{answer}");
    assert_eq!(source_status, Some(0), "{console}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    assert!(console.contains("\"verify\":\"ok\""), "{console}");
    assert_eq!(pattern_at(&image, SHORT.span - 4096), Ok(()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_destination_that_cannot_restore_the_state_leaves_the_vm_running_at_the_source() {
    if skip_without_kvm(
        "a_destination_that_cannot_restore_the_state_leaves_the_vm_running_at_the_source",
    ) {
        return;
    }
    let dir = scratch("refused");
    let (image, socket, console) = (
        dir.join("disk.img"),
        dir.join("api.sock"),
        dir.join("source.txt"),
    );
    let stream = dir.join("migrate.sock");
    let url = format!("unix:{}", stream.display());
    // No disk: the state's virtio-blk function has nowhere to go, after the source paused,
    // captured the state and handed over its image locks.
    let destination = Command::new(SLUICE)
        .args(["run", "--migrate-from", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination");
    wait_for("the destination to listen", Duration::from_secs(10), || {
        stream.exists()
    });
    let mut source = start_source(&dir, &image, &socket, &console, &SHORT);

    let (status, answer) = ctl(&socket, &["migrate", &url]);
    let refused = destination.wait_with_output().unwrap();
    let source_status = wait_or_kill(&mut source, Duration::from_secs(60));
    let console = std::fs::read_to_string(&console).unwrap();

    println!("the source after the refusal: {}", answer.trim());
    assert_ne!(status, 0, "{answer}");
    assert!(answer.contains("did not acknowledge"), "{answer}");
    assert_ne!(refused.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("00:01.0"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(source_status, Some(0), "{console}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    assert!(console.contains("\"verify\":\"ok\""), "{console}");
    assert_eq!(pattern_at(&image, SHORT.span - 4096), Ok(()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_destination_refuses_a_stream_that_is_not_a_migration_and_replaces_a_stale_socket() {
    let dir = scratch("garbage");
    let stream = dir.join("migrate.sock");
    let log = dir.join("destination.log");
    // A socket left by a destination that was killed while it waited.
    drop(std::os::unix::net::UnixListener::bind(&stream).unwrap());
    let url = format!("unix:{}", stream.display());
    let mut destination = Command::new(SLUICE)
        .args(["run", "--migrate-from", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the destination");

    // The stale socket refuses connections until the destination replaced it.
    let mut peer = None;
    wait_for("the destination to listen", Duration::from_secs(10), || {
        peer = std::os::unix::net::UnixStream::connect(&stream).ok();
        peer.is_some()
    });
    let mut peer = peer.expect("connected");
    std::io::Write::write_all(&mut peer, b"GET / HTTP/1.1\r\nHost: sluice\r\n\r\n").unwrap();
    // Nothing more comes: a destination that wanted more bytes sees the end, never a hang.
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let status = wait_or_kill(&mut destination, Duration::from_secs(20));
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();

    assert!(status.is_some(), "the destination hung: {stderr}");
    assert_ne!(status, Some(0), "{stderr}");
    assert!(stderr.contains("not a sluice migration stream"), "{stderr}");
    assert!(
        !stream.exists(),
        "the listener is gone after its one connection"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vm_with_a_device_the_migration_cannot_cover_is_refused_by_name_and_runs_on() {
    if skip_without_kvm(
        "a_vm_with_a_device_the_migration_cannot_cover_is_refused_by_name_and_runs_on",
    ) {
        return;
    }
    let dir = scratch("viommu");
    let socket = dir.join("api.sock");
    let mut vm = start_idle_vm_with_api(&socket, &["--iommu=vtd".to_string()]);
    wait_for("the VM to run", Duration::from_secs(20), || {
        ctl(&socket, &["info"]).1.contains("\"Running\"")
    });
    let url = format!("unix:{}", dir.join("nobody.sock").display());

    let refused = ctl(&socket, &["migrate", &url]);
    let info = ctl(&socket, &["info"]);
    let _ = ctl(&socket, &["shutdown"]);
    let status = wait_or_kill(&mut vm, Duration::from_secs(20));

    assert_eq!(refused.0, 1, "{refused:?}");
    assert!(
        refused.1.contains("virtual IOMMU cannot be migrated"),
        "{refused:?}"
    );
    assert!(info.1.contains("\"Running\""), "{info:?}");
    assert_eq!(status, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// QEMU's "write not shared" lock byte (sluice-storage's lock module): whoever holds it owns the
/// image for writing, as a destination that opened the disk does.
fn hold_write_lock(image: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let lock = libc::flock {
        l_type: libc::F_RDLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 201,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads one struct flock, which lives on the stack.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    file
}

#[test]
fn a_source_that_cannot_take_its_disk_back_stops_rather_than_run_beside_the_destination() {
    if skip_without_kvm(
        "a_source_that_cannot_take_its_disk_back_stops_rather_than_run_beside_the_destination",
    ) {
        return;
    }
    let dir = scratch("split");
    let (image, socket, console) = (
        dir.join("disk.img"),
        dir.join("api.sock"),
        dir.join("source.txt"),
    );
    let stream = dir.join("migrate.sock");
    let url = format!("unix:{}", stream.display());
    // A destination that takes the whole stream and the disk, then never acknowledges (as if
    // its `Ack` were lost while it runs the VM).
    let listener = std::os::unix::net::UnixListener::bind(&stream).unwrap();
    let taker = {
        let image = image.clone();
        std::thread::spawn(move || {
            let (mut peer, _) = listener.accept().unwrap();
            let mut messages = 0;
            loop {
                match sluice_vmm::migration::protocol::read_message(&mut peer).unwrap() {
                    sluice_vmm::migration::protocol::Message::End => break,
                    _ => messages += 1,
                }
            }
            let held = hold_write_lock(&image);
            drop(peer);
            (messages, held)
        })
    };
    let mut source = start_source(&dir, &image, &socket, &console, &SHORT);

    let (status, answer) = ctl(&socket, &["migrate", &url]);
    let source_status = wait_or_kill(&mut source, Duration::from_secs(20));
    let (messages, _held) = taker.join().unwrap();
    let console = std::fs::read_to_string(&console).unwrap();

    println!("the source after the lost ack: {}", answer.trim());
    assert!(
        messages >= 3,
        "hello, pages and the state arrived: {messages}"
    );
    assert_ne!(status, 0, "{answer}");
    assert!(answer.contains("cannot be taken back"), "{answer}");
    assert_eq!(
        source_status,
        Some(EXIT_GUEST_CRASH),
        "the source stops (crash status) instead of resuming"
    );
    assert!(!console.contains("RESULT"), "the source ran on:\n{console}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The guest kit's side of the hot-plug dance, then a verify on the boot disk: ack the
/// source's eject request, ack one more (from the destination), verify.
const EJECT_TWICE_THEN_VERIFY: &str =
    "w=eject:wait=60000 w=eject:wait=120000 w=blk:op=verify:bs=4096:qd=16:span_mb=96:seed=11";

/// A destination for `url` with `disks` (`--disk=` values) and an API on `socket`.
fn start_destination_with(disks: &[&Path], url: &str, socket: &Path) -> Child {
    let mut command = Command::new(SLUICE);
    command.args(["--log", "sluice_vmm=info", "run"]);
    for disk in disks {
        command.arg(format!("--disk=path={}", disk.display()));
    }
    command
        .args(["--migrate-from", url])
        .arg("--api-socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination")
}

fn info_lists(socket: &Path, id: &str) -> bool {
    ctl(socket, &["info"])
        .1
        .contains(&format!("\"id\":\"{id}\""))
}

/// The failover dance with disks in place of the VF (no VFIO on this host): a disk is
/// hot-plugged next to the boot disk and removed again (the guest kit acknowledges the eject
/// as `_EJ0` would), then the VM migrates. A destination with a disk more than the source has
/// now is refused (its restore names the extra function) and the VM runs on at the source; one
/// started with the source's current devices takes it, a disk is plugged and removed there
/// too, and the verify on the boot disk finishes at the destination.
#[test]
fn a_vm_whose_plugged_disk_was_removed_migrates_to_a_destination_with_its_current_devices() {
    if skip_without_kvm(
        "a_vm_whose_plugged_disk_was_removed_migrates_to_a_destination_with_its_current_devices",
    ) {
        return;
    }
    let dir = scratch("unplugged");
    let (boot, socket, console) = (
        dir.join("boot.img"),
        dir.join("api.sock"),
        dir.join("source.txt"),
    );
    let (hot, hot_there) = (dir.join("hot.img"), dir.join("hot-there.img"));
    create_image(&boot, &SHORT);
    for image in [&hot, &hot_there] {
        std::fs::File::create(image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let mut source = Command::new(SLUICE)
        .args(["run", &format!("--disk=path={}", boot.display())])
        .arg("--api-socket")
        .arg(&socket)
        .arg(format!("--serial=file={}", console.display()))
        .args(["--cmdline", EJECT_TWICE_THEN_VERIFY])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the source");
    wait_for("the source's API", Duration::from_secs(30), || {
        ctl(&socket, &["info"]).1.contains("\"Running\"")
    });
    let hot_spec = format!("path={},id=hot0", hot.display());
    let plugged = ctl(&socket, &["add-disk", &hot_spec]);
    let removed = ctl(&socket, &["remove-device", "hot0"]);
    wait_for("the guest to eject hot0", Duration::from_secs(30), || {
        !info_lists(&socket, "hot0")
    });
    let stream = dir.join("migrate.sock");
    let url = format!("unix:{}", stream.display());

    // Two disks where the source has one: refused after the source paused; the source runs
    // on. (Not the boot image: a destination that opened it holds its lock until it exits,
    // and a source that cannot take its image back stops rather than risk two writers.)
    let wrong_socket = dir.join("wrong.sock");
    let wrong = start_destination_with(&[&hot, &hot_there], &url, &wrong_socket);
    wait_for("the destination to listen", Duration::from_secs(10), || {
        stream.exists()
    });
    let refused = ctl(&socket, &["migrate", &url]);
    let wrong = wrong.wait_with_output().unwrap();
    let after_refusal = ctl(&socket, &["info"]).1;
    let _ = std::fs::remove_file(&stream);

    let there = dir.join("there.sock");
    let destination = start_destination_with(&[&boot], &url, &there);
    wait_for("the destination to listen", Duration::from_secs(10), || {
        stream.exists()
    });
    let (status, answer) = ctl(&socket, &["migrate", &url]);
    let source_status = wait_or_kill(&mut source, Duration::from_secs(20));
    assert_eq!(status, 0, "{answer}");
    wait_for("the destination's API", Duration::from_secs(30), || {
        ctl(&there, &["info"]).1.contains("\"Running\"")
    });
    let there_spec = format!("path={},id=hot1", hot_there.display());
    let plugged_there = ctl(&there, &["add-disk", &there_spec]);
    let removed_there = ctl(&there, &["remove-device", "hot1"]);
    let finished = destination.wait_with_output().unwrap();
    let before = std::fs::read_to_string(&console).unwrap();
    let wrong_log = String::from_utf8_lossy(&wrong.stderr);

    assert_eq!(plugged.0, 0, "{plugged:?}");
    assert_eq!(removed.0, 0, "{removed:?}");
    assert_ne!(refused.0, 0, "{refused:?}");
    assert_ne!(wrong.status.code(), Some(0), "{wrong_log}");
    assert!(
        wrong_log.contains("here but not saved") && wrong_log.contains("00:02.0"),
        "the destination names the disk the source no longer has:\n{wrong_log}"
    );
    assert!(after_refusal.contains("\"Running\""), "{after_refusal}");
    assert_eq!(status, 0, "{answer}");
    let report: serde_json::Value = serde_json::from_str(answer.trim()).expect(&answer);
    println!(
        "migrated after the unplug: total {} ms, downtime {} ms",
        report["total_ms"], report["downtime_ms"]
    );
    assert_eq!(source_status, Some(0));
    assert!(
        before.contains("\"workload\":\"eject\",\"slots\":\"0x4\""),
        "the source's guest ejected slot 2:\n{before}"
    );
    assert!(!before.contains("\"verify\""), "{before}");
    assert_eq!(plugged_there.0, 0, "{plugged_there:?}");
    assert_eq!(removed_there.0, 0, "{removed_there:?}");
    let console = String::from_utf8_lossy(&finished.stdout);
    let log = String::from_utf8_lossy(&finished.stderr);
    assert_eq!(finished.status.code(), Some(0), "{console}\n{log}");
    assert!(
        console.contains("\"workload\":\"eject\",\"slots\":\"0x4\""),
        "the destination's plugged disk went to slot 2 and was ejected:\n{console}"
    );
    assert!(console.contains("\"verify\":\"ok\""), "{console}");
    assert_eq!(pattern_at(&boot, SHORT.span - 4096), Ok(()));
    let _ = std::fs::remove_dir_all(&dir);
}
