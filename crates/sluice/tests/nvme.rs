//! The guest kit's NVMe driver on sluice's emulated NVMe controller (`--nvme`): the same block
//! workload as on virtio-blk, checked on the host image afterwards. With shadow doorbells the
//! I/O submission doorbells become ioeventfds, so the controller's trapped SQ doorbell writes
//! are the admin queue's only; with `dbbuf=off` every doorbell write traps.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::{metrics_device_exits, run_on_sluice, skip_without_kvm};
use sluice_guest_kit::pattern::check_pattern;

const BLOCK: u64 = 4096;
const SEED: u64 = 41;
const SPAN_MB: u64 = 2;

fn image(name: &str) -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nvme-{name}-{}.img", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(8 << 20).unwrap();
    path
}

fn read_block(path: &PathBuf, block: u64) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap();
    let mut bytes = vec![0; BLOCK as usize];
    file.read_exact_at(&mut bytes, block * BLOCK).unwrap();
    bytes
}

/// Verify on two queue pairs; returns the metrics JSON after checking the image.
fn verify_on_nvme(name: &str, dbbuf: &str) -> serde_json::Value {
    let image = image(name);
    let cmdline = format!(
        "quiet w=nvme:op=verify:bs={BLOCK}:qd=8:queues=2:span_mb={SPAN_MB}:seed={SEED}:dbbuf={dbbuf}"
    );
    let nvme = format!("--nvme=path={},queues=2,dbbuf={dbbuf}", image.display());

    let (report, metrics) = run_on_sluice(&cmdline, vec![nvme]);

    assert!(report.passed(), "{}", report.describe());
    let result = report.results_for("nvme").next().expect("an nvme RESULT");
    assert_eq!(
        result.verify.as_deref(),
        Some("ok"),
        "{}",
        report.describe()
    );
    let last = SPAN_MB * (1 << 20) / BLOCK - 1;
    for block in [0, 17, last] {
        assert_eq!(
            check_pattern(SEED, block * BLOCK, &read_block(&image, block)),
            Ok(()),
            "block {block}"
        );
    }
    assert!(
        read_block(&image, last + 1).iter().all(|&b| b == 0),
        "nothing written past the span"
    );
    let _ = std::fs::remove_file(&image);
    metrics
}

#[test]
fn guest_kit_verify_on_nvme_with_shadow_doorbells_lands_in_the_image() {
    let name = "guest_kit_verify_on_nvme_with_shadow_doorbells_lands_in_the_image";
    if skip_without_kvm(name) {
        return;
    }

    let shadow = verify_on_nvme("shadow", "on");
    let trapped = verify_on_nvme("trapped", "off");

    let counter = |m: &serde_json::Value, name: &str| {
        m["devices"][0]["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}: {m}"))
    };
    // 512 writes + 512 reads; with shadow doorbells only admin commands ring a trapped SQ
    // doorbell, without them every submission batch does.
    let (shadow_sq, trapped_sq) = (
        counter(&shadow, "exits_sq_doorbells"),
        counter(&trapped, "exits_sq_doorbells"),
    );
    println!("trapped SQ doorbell writes: {shadow_sq} with shadow doorbells, {trapped_sq} without");
    assert!(shadow_sq < 16, "{shadow}");
    assert!(
        trapped_sq > 4 * shadow_sq,
        "{shadow_sq} vs {trapped_sq}: {trapped}"
    );
    assert!(
        metrics_device_exits(&trapped, "nvme") > metrics_device_exits(&shadow, "nvme"),
        "{shadow}\n{trapped}"
    );
}
