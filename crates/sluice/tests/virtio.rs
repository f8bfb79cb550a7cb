//! Paravirtual I/O on sluice (KVM): the guest kit's virtio drivers against sluice's virtio-pci
//! devices. Data written by the guest is checked on the host image; exits and kicks come from
//! sluice's own metrics.
//!
//! Sizes are small: on kvm_pvm hosts the guest runs in KVM's instruction emulator (~1M instr/s).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sluice_guest_kit::pattern::check_pattern;
use sluice_guest_kit::{skip_without_kvm, GuestKitReport, GuestKitRun, Vmm};

const SEED: u64 = 11;
const BLOCK: u64 = 4096;

struct Image {
    path: PathBuf,
}

impl Image {
    fn new(name: &str, bytes: u64) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("virtio-images");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}-{}.img", std::process::id()));
        File::create(&path).unwrap().set_len(bytes).unwrap();
        Self { path }
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn run_on_sluice(cmdline: &str, args: Vec<String>) -> (GuestKitReport, serde_json::Value) {
    let metrics = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "metrics-{}-{}.json",
        std::process::id(),
        cmdline.len()
    ));
    let mut run = GuestKitRun::sluice(Path::new(env!("CARGO_BIN_EXE_sluice")), cmdline);
    run.timeout = std::time::Duration::from_secs(120);
    if let Vmm::Sluice { extra_args, .. } = &mut run.vmm {
        extra_args.extend(args);
        extra_args.push(format!("--metrics={}", metrics.display()));
    }
    let report = run.run().expect("run sluice");
    let metrics = std::fs::read_to_string(&metrics)
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (report, metrics)
}

fn blk_verify(name: &str, qd: u32, queues: u16, mode: &str, notify: &str) {
    if skip_without_kvm(name) {
        return;
    }
    let image = Image::new(name, 4 << 20);
    let cmdline = format!(
        "quiet w=blk:op=verify:bs={BLOCK}:qd={qd}:queues={queues}:span_mb=1:mode={mode}:seed={SEED}"
    );
    let disk = format!(
        "--disk=path={},queues={queues},notify={notify}",
        image.path.display()
    );

    let (report, metrics) = run_on_sluice(&cmdline, vec![disk]);

    assert!(report.passed(), "{}", report.describe());
    let blk = report.results_for("blk").next().unwrap();
    assert_eq!(blk.verify.as_deref(), Some("ok"));
    assert_eq!(blk.raw["queues"], queues, "{}", report.describe());
    for block in [0, 100, 255] {
        let bytes = image.read(block * BLOCK, BLOCK as usize);
        assert_eq!(
            check_pattern(SEED, block * BLOCK, &bytes),
            Ok(()),
            "block {block}"
        );
    }
    assert!(
        image.read(1 << 20, BLOCK as usize).iter().all(|&b| b == 0),
        "nothing written past the span"
    );
    // Kicks arrive through ioeventfds: the device's BAR exits are setup only, far fewer than
    // the 512 requests.
    let device_queues = metrics["devices"][0]["queues"].as_array().unwrap();
    let requests: u64 = device_queues
        .iter()
        .map(|q| q["requests"].as_u64().unwrap())
        .sum();
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
        "{bar_exits} BAR exits for {requests} requests"
    );
}

#[test]
fn blk_verify_qd1_one_queue_interrupts() {
    blk_verify("blk_verify_qd1_one_queue_interrupts", 1, 1, "irq", "irq");
}

#[test]
fn blk_verify_qd32_four_queues_polling() {
    blk_verify(
        "blk_verify_qd32_four_queues_polling",
        32,
        4,
        "poll",
        "poll:50",
    );
}

#[test]
fn blk_verify_qd32_two_queues_batching() {
    blk_verify(
        "blk_verify_qd32_two_queues_batching",
        32,
        2,
        "irq",
        "batch:8:100",
    );
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_the_image() {
    let name = "read_only_disk_refuses_writes_and_keeps_the_image";
    if skip_without_kvm(name) {
        return;
    }
    let image = Image::new(name, 1 << 20);
    let disk = format!("--disk=path={},readonly=on", image.path.display());

    let (report, _) = run_on_sluice("quiet w=blk:op=write:ops=8:qd=1", vec![disk]);

    assert!(!report.passed(), "{}", report.describe());
    assert!(image.read(0, 65536).iter().all(|&b| b == 0));
}
