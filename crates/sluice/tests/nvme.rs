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

/// NVMe generic status Data Transfer Error, as the kit prints it (SCT << 8 | SC).
const DATA_TRANSFER_ERROR: u64 = 0x04;

#[test]
fn hostile_guest_dma_outside_its_ram_fails_on_the_emulated_nvme_and_the_queue_still_verifies() {
    let name =
        "hostile_guest_dma_outside_its_ram_fails_on_the_emulated_nvme_and_the_queue_still_verifies";
    if skip_without_kvm(name) {
        return;
    }
    let image = image("hostile");
    let cmdline = format!(
        "quiet w=nvme:hostile=dma_outside:op=verify:bs={BLOCK}:qd=8:queues=1:span_mb={SPAN_MB}:seed={SEED}"
    );
    let nvme = format!("--nvme=path={}", image.display());

    let (report, _metrics) = run_on_sluice(&cmdline, vec![nvme]);

    let _ = std::fs::remove_file(&image);
    // sluice's own controller resolves PRP1 (60 GiB) against guest RAM, finds nothing there and
    // fails the command; the VM and the queue carry on.
    assert!(report.passed(), "{}", report.describe());
    let hostile = report
        .results_for("nvme_hostile")
        .next()
        .unwrap_or_else(|| panic!("no nvme_hostile RESULT\n{}", report.describe()));
    assert_eq!(hostile.raw["completed"], true, "{}", report.describe());
    assert_eq!(
        hostile.raw["hostile_status"].as_u64(),
        Some(DATA_TRANSFER_ERROR),
        "{}",
        report.describe()
    );
    let verify = report.results_for("nvme").next().expect("an nvme RESULT");
    assert_eq!(
        verify.verify.as_deref(),
        Some("ok"),
        "{}",
        report.describe()
    );
    assert_eq!(verify.errors, Some(0), "{}", report.describe());
}

/// Runs `hostile=dma_unmapped` then a verify on one queue pair, with the kit's own VT-d on
/// sluice's (`iommu`) or without any IOMMU; returns the hostile probe's RESULT and the metrics.
fn dma_unmapped_probe(iommu: bool) -> (serde_json::Value, serde_json::Value) {
    let image = image(if iommu { "unmapped-vtd" } else { "unmapped" });
    let kit_iommu = if iommu { "iommu=vtd " } else { "" };
    let cmdline = format!(
        "quiet {kit_iommu}w=nvme:hostile=dma_unmapped:op=verify:bs={BLOCK}:qd=8:queues=1:span_mb={SPAN_MB}:seed={SEED}"
    );
    let mut args = vec![format!("--nvme=path={}", image.display())];
    if iommu {
        args.push("--iommu=vtd".into());
    }

    let (report, metrics) = run_on_sluice(&cmdline, args);

    let _ = std::fs::remove_file(&image);
    let hostile = report
        .results_for("nvme_hostile")
        .next()
        .unwrap_or_else(|| panic!("no nvme_hostile RESULT\n{}", report.describe()))
        .raw
        .clone();
    let verify = report.results_for("nvme").next().expect("an nvme RESULT");
    assert_eq!(
        verify.verify.as_deref(),
        Some("ok"),
        "{}",
        report.describe()
    );
    (hostile, metrics)
}

#[test]
fn the_guests_own_vtd_refuses_a_dma_into_ram_it_never_mapped_and_records_the_fault() {
    let name = "the_guests_own_vtd_refuses_a_dma_into_ram_it_never_mapped_and_records_the_fault";
    if skip_without_kvm(name) {
        return;
    }

    let (hostile, metrics) = dma_unmapped_probe(true);

    assert_eq!(hostile["iommu"], true, "{hostile:#}");
    assert_eq!(hostile["page_intact"], true, "{hostile:#}");
    assert_eq!(hostile["pass"], true, "{hostile:#}");
    let fault = &hostile["iommu_fault"];
    assert_eq!(fault["address"], hostile["addr"], "{hostile:#}");
    assert_eq!(
        fault["read"], false,
        "the device writes the page: {hostile:#}"
    );
    assert!(
        hostile["iommu_mapped_bytes"].as_u64().unwrap_or(0) > 0,
        "{hostile:#}"
    );
    let vtd = metrics["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device"] == "vt-d"))
        .unwrap_or_else(|| panic!("no vt-d metrics: {metrics:#}"));
    assert!(
        vtd["counters"]["faults"].as_u64().unwrap_or(0) >= 1,
        "{vtd:#}"
    );
}

#[test]
fn without_an_iommu_the_same_dma_lands_in_the_unmapped_page() {
    if skip_without_kvm("without_an_iommu_the_same_dma_lands_in_the_unmapped_page") {
        return;
    }

    let (hostile, _) = dma_unmapped_probe(false);

    assert_eq!(hostile["iommu"], false, "{hostile:#}");
    assert_eq!(
        hostile["page_intact"], false,
        "nothing else would have stopped it: {hostile:#}"
    );
}

/// Runs `hostile=bad_irte` then a verify on one queue pair, with the kit's own VT-d on
/// sluice's `--iommu=<iommu>`; returns the hostile probe's RESULT, the verify's RESULT and the
/// unit's counters.
fn bad_irte_probe(iommu: &str) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let image = image(&format!("bad-irte-{}", iommu.replace([',', '='], "-")));
    let cmdline = format!(
        "quiet iommu=vtd w=nvme:hostile=bad_irte:op=verify:bs={BLOCK}:qd=8:queues=1:span_mb={SPAN_MB}:seed={SEED}"
    );
    let args = vec![
        format!("--nvme=path={}", image.display()),
        format!("--iommu={iommu}"),
    ];

    let (report, metrics) = run_on_sluice(&cmdline, args);

    let _ = std::fs::remove_file(&image);
    let hostile = report
        .results_for("nvme_hostile")
        .next()
        .unwrap_or_else(|| panic!("no nvme_hostile RESULT\n{}", report.describe()))
        .raw
        .clone();
    let verify = report.results_for("nvme").next().expect("an nvme RESULT");
    assert_eq!(
        verify.verify.as_deref(),
        Some("ok"),
        "{}",
        report.describe()
    );
    let vtd = metrics["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device"] == "vt-d"))
        .unwrap_or_else(|| panic!("no vt-d metrics: {metrics:#}"))["counters"]
        .clone();
    (hostile, verify.raw.clone(), vtd)
}

/// VT-d fault reason 0x24: a reserved field set in the IRTE.
const IRTE_RESERVED_FIELD: u64 = 0x24;

#[test]
fn the_guests_interrupt_remapping_refuses_a_bad_irte_records_the_fault_and_delivers_once_repaired()
{
    let name = "the_guests_interrupt_remapping_refuses_a_bad_irte_records_the_fault_and_delivers_once_repaired";
    if skip_without_kvm(name) {
        return;
    }

    let (hostile, verify, vtd) = bad_irte_probe("vtd");
    println!(
        "{hostile}\nworkload interrupts: {}\n{vtd}",
        verify["interrupts"]
    );

    assert_eq!(hostile["applicable"], true, "{hostile:#}");
    assert_eq!(
        hostile["completed"], true,
        "the command itself succeeds: {hostile:#}"
    );
    assert_eq!(hostile["hostile_status"], 0, "{hostile:#}");
    assert_eq!(hostile["delivered"], false, "{hostile:#}");
    let fault = &hostile["fault"];
    assert_eq!(
        fault["reason"].as_u64(),
        Some(IRTE_RESERVED_FIELD),
        "{hostile:#}"
    );
    assert_eq!(fault["index"], hostile["irte_index"], "{hostile:#}");
    assert!(
        hostile["repaired_interrupts"].as_u64().unwrap_or(0) >= 4,
        "{hostile:#}"
    );
    assert_eq!(hostile["pass"], true, "{hostile:#}");
    assert!(
        verify["interrupts"].as_u64().unwrap_or(0) > 0,
        "the workload's completions interrupt through the repaired IRTE: {verify:#}"
    );
    let counter = |name: &str| vtd[name].as_u64().unwrap_or(0);
    assert!(counter("interrupt_faults") >= 1, "{vtd:#}");
    assert!(counter("interrupts_remapped") >= 4, "{vtd:#}");
    assert!(counter("interrupt_entry_invalidations") >= 2, "{vtd:#}");
}

#[test]
fn without_interrupt_remapping_the_bad_irte_probe_is_not_applicable() {
    let name = "without_interrupt_remapping_the_bad_irte_probe_is_not_applicable";
    if skip_without_kvm(name) {
        return;
    }

    let (hostile, _, vtd) = bad_irte_probe("vtd,intremap=off");
    println!("{hostile}\n{vtd}");

    assert_eq!(hostile["iommu"], true, "{hostile:#}");
    assert_eq!(hostile["ir"], false, "ECAP.IR is clear: {hostile:#}");
    assert_eq!(hostile["applicable"], false, "{hostile:#}");
    assert_eq!(hostile["pass"], false, "nothing was shown: {hostile:#}");
    assert_eq!(vtd["interrupt_faults"].as_u64(), Some(0), "{vtd:#}");
}
