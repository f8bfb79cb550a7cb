//! sluice as a vhost-user frontend: `--disk vhost_user=on,socket=PATH` puts a virtio-blk
//! device on the guest's PCI bus whose rings are served by an external backend
//! (qemu-storage-daemon, or `sluice serve blk`). The guest kit writes and verifies a pattern;
//! the host image must hold it afterwards. Kicks reach the backend through the ioeventfd, so
//! the device's BAR sees only setup exits.
//!
//! Sizes are small: on kvm_pvm hosts the guest runs in KVM's instruction emulator (~1M instr/s).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_guest_kit::pattern::check_pattern;
use sluice_guest_kit::{skip_without_kvm, GuestKitRun, Vmm};

const SEED: u64 = 23;
const BLOCK: u64 = 4096;

fn scratch(name: &str, suffix: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vhost-user");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{}.{suffix}", std::process::id()))
}

/// A backend process serving an image on a unix socket; killed (and cleaned up) on drop.
struct Backend {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
}

impl Backend {
    /// Starts `command` (which must listen on `socket`) and waits for the socket.
    fn start(mut command: Command, socket: PathBuf, image: PathBuf) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(&socket);
        let child = command.stdin(Stdio::null()).spawn()?;
        let mut backend = Self {
            child,
            socket,
            image,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !backend.socket.exists() {
            assert!(Instant::now() < deadline, "the backend never listened");
            if let Some(status) = backend.child.try_wait().unwrap() {
                panic!("the backend exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(backend)
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.image);
    }
}

fn image(name: &str) -> PathBuf {
    let path = scratch(name, "img");
    File::create(&path).unwrap().set_len(4 << 20).unwrap();
    path
}

/// qemu-storage-daemon exporting a fresh image, or None (with a SKIP line) if it is missing.
fn qemu_storage_daemon(name: &str) -> Option<Backend> {
    let image = image(name);
    let socket = scratch(name, "sock");
    let mut command = Command::new("qemu-storage-daemon");
    command
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,addr.type=unix,addr.path={},node-name=f,writable=on",
            socket.display()
        ));
    match Backend::start(command, socket, image.clone()) {
        Ok(backend) => Some(backend),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("SKIP {name}: qemu-storage-daemon is not installed");
            let _ = std::fs::remove_file(&image);
            None
        }
        Err(e) => panic!("qemu-storage-daemon: {e}"),
    }
}

fn sluice_serve_blk(name: &str) -> Backend {
    let image = image(name);
    let socket = scratch(name, "sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(["serve", "blk", "--socket"])
        .arg(&socket)
        .arg("--image")
        .arg(&image);
    Backend::start(command, socket, image).expect("start sluice serve blk")
}

/// The guest kit writes and verifies 1 MiB at QD 8 on a vhost-user disk; the host image must
/// hold the pattern, and the requests must not have gone through sluice's BAR handler.
fn verify_on(name: &str, backend: &Backend) {
    let metrics_path = scratch(name, "json");
    let cmdline = format!("quiet w=blk:op=verify:bs={BLOCK}:qd=8:queues=1:span_mb=1:seed={SEED}");
    let mut run = GuestKitRun::sluice(Path::new(env!("CARGO_BIN_EXE_sluice")), &cmdline);
    run.timeout = Duration::from_secs(180);
    if let Vmm::Sluice { extra_args, .. } = &mut run.vmm {
        extra_args.push(format!(
            "--disk=vhost_user=on,socket={}",
            backend.socket.display()
        ));
        extra_args.push(format!("--metrics={}", metrics_path.display()));
    }

    let report = run.run().expect("run sluice");

    assert!(report.passed(), "{}", report.describe());
    let blk = report.results_for("blk").next().unwrap();
    assert_eq!(blk.verify.as_deref(), Some("ok"), "{}", report.describe());
    for block in [0, 100, 255] {
        let bytes = backend.read(block * BLOCK, BLOCK as usize);
        assert_eq!(
            check_pattern(SEED, block * BLOCK, &bytes),
            Ok(()),
            "block {block}"
        );
    }
    assert!(
        backend
            .read(1 << 20, BLOCK as usize)
            .iter()
            .all(|&b| b == 0),
        "nothing written past the span"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&metrics_path);
    let device = &metrics["devices"][0];
    assert_eq!(device["device"], "vhost-user-blk", "{metrics}");
    // Completions as the interrupt pump saw them in the used ring.
    let requests = device["queues"][0]["requests"].as_u64().unwrap();
    assert!(requests >= 512, "{metrics}");
    let bar_exits = metrics["exits"]["per_device"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"].as_str().unwrap().contains("virtio-blk"))
        .map(|d| d["reads"].as_u64().unwrap() + d["writes"].as_u64().unwrap())
        .unwrap();
    assert!(
        bar_exits * 5 < requests,
        "{bar_exits} BAR exits for {requests} requests: kicks are not going to the backend"
    );
}

#[test]
fn blk_verify_against_qemu_storage_daemon() {
    let name = "blk_verify_against_qemu_storage_daemon";
    if skip_without_kvm(name) {
        return;
    }
    let Some(backend) = qemu_storage_daemon(name) else {
        return;
    };
    verify_on(name, &backend);
}

#[test]
fn blk_verify_against_sluice_serve_blk() {
    let name = "blk_verify_against_sluice_serve_blk";
    if skip_without_kvm(name) {
        return;
    }
    let backend = sluice_serve_blk(name);
    verify_on(name, &backend);
}

#[test]
fn a_missing_backend_is_a_clear_startup_error() {
    let name = "a_missing_backend_is_a_clear_startup_error";
    if skip_without_kvm(name) {
        return;
    }
    let socket = scratch(name, "sock");
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(format!("--disk=vhost_user=on,socket={}", socket.display()))
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("vhost-user") && stderr.contains(&*socket.to_string_lossy()),
        "{stderr}"
    );
}
