//! Paravirtual I/O on sluice (KVM): the guest kit's virtio drivers against sluice's virtio-pci
//! devices. Data written by the guest is checked on the host image; exits and kicks come from
//! sluice's own metrics.
//!
//! Sizes are small: on kvm_pvm hosts the guest runs in KVM's instruction emulator (~1M instr/s).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod common;

use common::{metrics_device_exits, metrics_requests, run_on_sluice, spawn_echo_peer};
use sluice_guest_kit::pattern::check_pattern;
use sluice_guest_kit::skip_without_kvm;

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
    let requests = metrics_requests(&metrics);
    assert!(requests >= 512, "{metrics}");
    let bar_exits = metrics_device_exits(&metrics, "virtio-blk");
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

#[test]
fn rng_fills_guest_buffers() {
    if skip_without_kvm("rng_fills_guest_buffers") {
        return;
    }

    let (report, metrics) = run_on_sluice("quiet w=rng:bytes=8192", vec!["--rng".into()]);

    assert!(report.passed(), "{}", report.describe());
    let bytes = metrics["devices"][0]["queues"][0]["bytes"]
        .as_u64()
        .unwrap();
    assert!(bytes >= 8192, "{metrics}");
}

#[test]
fn net_echo_through_a_tap_with_a_host_peer() {
    net_echo_through_a_tap("net_echo_through_a_tap_with_a_host_peer", false);
}

/// The same echo with `packed=on` and the kit's `vq=packed`: both queues on packed rings.
#[test]
fn net_echo_through_a_tap_over_packed_virtqueues() {
    net_echo_through_a_tap("net_echo_through_a_tap_over_packed_virtqueues", true);
}

fn net_echo_through_a_tap(name: &str, packed: bool) {
    if skip_without_kvm(name) {
        return;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        println!("SKIP {name}: /dev/net/tun unusable ({e})");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP {name}: creating a tap needs CAP_NET_ADMIN (not root)");
        return;
    }
    // Distinct names: the two variants may run at the same time.
    let tap = format!(
        "slt{}{}",
        if packed { "p" } else { "" },
        std::process::id() % 100_000
    );
    let (stop, peer) = spawn_echo_peer(tap.clone());
    let (vq, device) = if packed {
        ("vq=packed ", format!("--net=tap={tap},packed=on"))
    } else {
        ("", format!("--net=tap={tap}"))
    };

    let (report, metrics) = run_on_sluice(
        &format!("quiet {vq}w=net:dir=echo:size=1000:frames=20"),
        vec![device],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let echoed = peer.join().unwrap();

    assert!(report.passed(), "{}", report.describe());
    assert!(echoed >= 20, "the host peer echoed {echoed} frames");
    let net = report.results_for("net").next().unwrap();
    assert_eq!(net.errors, Some(0), "{}", report.describe());
    let layout = if packed { "packed" } else { "split" };
    assert_eq!(net.raw["vq"], layout, "{}", report.describe());
    let queues = metrics["devices"][0]["queues"].as_array().unwrap();
    let requests: u64 = queues.iter().map(|q| q["requests"].as_u64().unwrap()).sum();
    assert!(requests >= 40, "20 frames out and 20 in: {metrics}");
}

/// The named counters of the device called `name` in a `--metrics` JSON.
fn device_counters<'a>(metrics: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    metrics["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|d| d["device"] == name))
        .map(|device| &device["counters"])
        .unwrap_or_else(|| panic!("no device {name} in {metrics}"))
}

/// `--iommu virtio`: the kit's `viommu` workload PROBEs, ATTACHes and MAPs through sluice's
/// virtio-iommu, then the blk verify passes with every DMA of the disk translated by the
/// IOMMU's mapping tree (no fault). The same disk with no `viommu` workload before it has its
/// DMA refused: the IOMMU really is in the path.
#[test]
fn blk_verify_through_the_virtio_iommu_and_refused_without_its_mappings() {
    let name = "blk_verify_through_the_virtio_iommu_and_refused_without_its_mappings";
    if skip_without_kvm(name) {
        return;
    }
    let image = Image::new(name, 4 << 20);
    let args = vec![
        "--iommu=virtio".to_string(),
        format!("--disk=path={}", image.path.display()),
    ];
    let blk = format!("w=blk:op=verify:bs={BLOCK}:qd=8:span_mb=1:seed={SEED}");

    let (report, metrics) = run_on_sluice(&format!("quiet w=viommu {blk}"), args.clone());
    let (refused, refused_metrics) = run_on_sluice(&format!("quiet timeout_ms=3000 {blk}"), args);

    assert!(report.passed(), "{}", report.describe());
    let viommu = report.results_for("viommu").next().unwrap();
    assert_eq!(viommu.raw["endpoints"], 1, "{}", report.describe());
    assert_eq!(viommu.raw["map_end"], "0xfee00000", "PROBE's MSI window");
    let verified = report.results_for("blk").next().unwrap();
    assert_eq!(verified.verify.as_deref(), Some("ok"));
    for block in [0, 100, 255] {
        let bytes = image.read(block * BLOCK, BLOCK as usize);
        assert_eq!(
            check_pattern(SEED, block * BLOCK, &bytes),
            Ok(()),
            "block {block}"
        );
    }
    let counters = device_counters(&metrics, "virtio-iommu");
    println!("{name}: virtio-iommu counters {counters}");
    for (counter, expected) in [("probe", 1), ("attach", 1), ("map", 1), ("faults", 0)] {
        assert_eq!(counters[counter], expected, "{counter}: {metrics}");
    }
    assert!(counters["translations"].as_u64().unwrap() > 0, "{metrics}");

    assert!(!refused.passed(), "{}", refused.describe());
    let refused_counters = device_counters(&refused_metrics, "virtio-iommu");
    println!("{name}: without mappings {refused_counters}");
    assert!(
        refused_counters["faults"].as_u64().unwrap() > 0,
        "{refused_metrics}"
    );
}
