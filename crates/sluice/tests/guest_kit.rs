//! The embedded guest kit on sluice (KVM): it boots, finds sluice's ACPI tables and PCI devices,
//! takes timer interrupts on every vCPU setup, and exits cleanly through the debug-exit port.

use std::path::Path;

use sluice_guest_kit::{skip_without_kvm, GuestKitRun, Vmm};

fn sluice_run(cmdline: &str, extra_args: &[&str]) -> GuestKitRun {
    let mut run = GuestKitRun::sluice(Path::new(env!("CARGO_BIN_EXE_sluice")), cmdline);
    run.cpus = 2;
    if let Vmm::Sluice {
        extra_args: args, ..
    } = &mut run.vmm
    {
        args.extend(extra_args.iter().map(|s| s.to_string()));
    }
    run
}

#[test]
fn guest_kit_reports_sluice_acpi_tables_and_pci_devices() {
    if skip_without_kvm("guest_kit_reports_sluice_acpi_tables_and_pci_devices") {
        return;
    }

    let report = sluice_run("w=info", &["--test-device"]).run().unwrap();

    assert!(report.passed(), "{}", report.describe());
    for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
        assert!(
            report.acpi_table(table).is_some(),
            "{table} missing:\n{}",
            report.console
        );
    }
    let host_bridge = report.pci.iter().find(|p| p.is_host_bridge()).unwrap();
    assert_eq!(
        (host_bridge.vendor_id, host_bridge.device_id),
        (0x1b36, 0x0008)
    );
    let test_dev = report.pci.iter().find(|p| p.vendor_id == 0x1234).unwrap();
    assert_eq!(test_dev.device_id, 0x5c1e);
    assert!(
        test_dev
            .bars
            .iter()
            .all(|b| (0xc000_0000..0xe000_0000).contains(&b.address)),
        "BARs must sit in the 32-bit PCI window: {:?}",
        test_dev.bars
    );
}

/// The README's main job: `sluice run` with nothing else boots the embedded guest kit on
/// virtio-blk and on the emulated NVMe (shadow doorbells, then MMIO doorbells), one VM each,
/// and prints one table: every verify passed (behind the vIOMMU too), every class measured, and
/// trapped doorbells cost more exits per I/O than shadow ones.
#[test]
fn main_job_prints_the_spectrum_table() {
    if skip_without_kvm("main_job_prints_the_spectrum_table") {
        return;
    }

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--cpus", "2"])
        .output()
        .unwrap();

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(stdout.matches("GUEST-KIT PASS").count(), 5, "{stdout}");
    let table = &stdout[stdout.find("device ").expect("a table header")..];
    let exits_per_io = |label: &str| -> Vec<f64> {
        table
            .lines()
            .filter(|line| line.starts_with(label))
            .map(|line| {
                let cells: Vec<&str> = line[label.len()..].split_whitespace().collect();
                assert_eq!(cells.len(), 6, "{line}");
                assert!(
                    cells[1].parse::<f64>().is_ok_and(|iops| iops > 0.0),
                    "{line}"
                );
                assert!(matches!(cells[5], "ok" | "n/a"), "{line}");
                cells[4].parse().unwrap()
            })
            .collect()
    };
    let virtio = exits_per_io("virtio-blk (paravirtual)");
    let shadow = exits_per_io("NVMe, shadow doorbells");
    let mmio = exits_per_io("NVMe, MMIO doorbells");
    let virtio_translated = exits_per_io("virtio-blk, vIOMMU");
    let shadow_translated = exits_per_io("NVMe, shadow, vIOMMU");
    assert_eq!(
        (virtio.len(), shadow.len(), mmio.len()),
        (2, 2, 2),
        "{table}"
    );
    assert_eq!(
        (virtio_translated.len(), shadow_translated.len()),
        (2, 2),
        "{table}"
    );
    assert!(mmio[0] > shadow[0], "{table}");
}

/// `--cpus 2`: the guest kit starts vCPU 1 through its LAPIC (INIT-SIPI-SIPI, real-mode
/// trampoline, x2APIC) and both vCPUs' locked increments of one counter land. Few iterations:
/// on kvm_pvm every guest instruction is emulated.
#[test]
fn smp_workload_brings_up_the_second_vcpu_and_counts_on_both() {
    if skip_without_kvm("smp_workload_brings_up_the_second_vcpu_and_counts_on_both") {
        return;
    }
    const ITERS: u64 = 2000;

    let report = sluice_run(&format!("quiet w=smp:iters={ITERS}"), &[])
        .run()
        .unwrap();

    assert!(report.passed(), "{}", report.describe());
    let smp = report.results_for("smp").next().unwrap();
    assert_eq!(smp.raw["cpus"], 2, "{}", report.describe());
    assert_eq!(smp.raw["counter"], 2 * ITERS, "{}", report.describe());
    let mut apic_ids: Vec<u64> = smp.raw["apic_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|id| id.as_u64())
        .collect();
    apic_ids.sort_unstable();
    assert_eq!(apic_ids, [0, 1], "{}", report.describe());
    assert_eq!(
        smp.ring,
        Some(3),
        "both CPUs count in ring 3: {}",
        report.describe()
    );
}

/// The workloads' data paths run at CPL3 by default (the kit reads CS's RPL inside each
/// workload, on every CPU that takes part), with completion polling as ring 3's default mode;
/// `ring=0` keeps them at CPL0 with interrupts.
#[test]
fn workloads_run_in_ring_3_by_default_and_in_ring_0_when_asked() {
    let name = "workloads_run_in_ring_3_by_default_and_in_ring_0_when_asked";
    if skip_without_kvm(name) {
        return;
    }
    let image = test_file(name, "img");
    sparse_image(&image, 4 << 20);
    let disk = format!("--disk=path={}", image.display());
    let ring3 = sluice_run(
        "quiet w=blk:op=verify:bs=4096:qd=8:span_mb=1:seed=5 w=rng:bytes=4096 w=smp:iters=1000",
        &[&disk, "--rng"],
    );
    let ring0 = sluice_run(
        "quiet ring=0 w=blk:op=verify:bs=4096:qd=4:span_mb=1:seed=5 w=smp:iters=100",
        &[&disk],
    );

    let ring3 = ring3.run().unwrap();
    let ring0 = ring0.run().unwrap();
    let _ = std::fs::remove_file(&image);

    assert!(ring3.passed(), "{}", ring3.describe());
    assert_eq!(ring3.results.len(), 3, "{}", ring3.describe());
    for result in &ring3.results {
        assert_eq!(
            result.ring,
            Some(3),
            "{}: {}",
            result.workload,
            ring3.describe()
        );
    }
    let blk = ring3.results_for("blk").next().unwrap();
    assert_eq!(blk.verify.as_deref(), Some("ok"), "{}", ring3.describe());
    assert_eq!(blk.raw["mode"], "poll", "{}", ring3.describe());
    assert_eq!(blk.raw["interrupts"], 0, "{}", ring3.describe());
    assert!(ring0.passed(), "{}", ring0.describe());
    for result in &ring0.results {
        assert_eq!(
            result.ring,
            Some(0),
            "{}: {}",
            result.workload,
            ring0.describe()
        );
    }
    let blk = ring0.results_for("blk").next().unwrap();
    assert_eq!(blk.raw["mode"], "irq", "{}", ring0.describe());
    assert_eq!(blk.verify.as_deref(), Some("ok"), "{}", ring0.describe());
}

/// `--cpus 2` with a two-queue disk and `cpus=2`: vCPU 0 drives queue 0 and vCPU 1 queue 1
/// (its MSI-X vector aimed at vCPU 1), each verifying its half of a 1 MiB span. sluice's own
/// metrics show both queues served.
#[test]
fn blk_verify_with_one_queue_per_vcpu_serves_both_queues() {
    let name = "blk_verify_with_one_queue_per_vcpu_serves_both_queues";
    if skip_without_kvm(name) {
        return;
    }
    let image = test_file(name, "img");
    let metrics = test_file(name, "json");
    sparse_image(&image, 4 << 20);
    let disk = format!("--disk=path={},queues=2", image.display());
    let metrics_arg = format!("--metrics={}", metrics.display());
    let mut run = sluice_run(
        "quiet w=blk:op=verify:bs=4096:qd=4:queues=2:span_mb=1:mode=irq:seed=3:cpus=2",
        &[&disk, &metrics_arg],
    );
    run.timeout = std::time::Duration::from_secs(120);

    let report = run.run().unwrap();
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let _ = std::fs::remove_file(&image);

    assert!(report.passed(), "{}", report.describe());
    let blk = report.results_for("blk").next().unwrap();
    assert_eq!(blk.verify.as_deref(), Some("ok"), "{}", report.describe());
    assert_eq!(
        blk.raw["cpu_ops"],
        serde_json::json!([256, 256]),
        "{}",
        report.describe()
    );
    assert_eq!(
        blk.ring,
        Some(3),
        "both CPUs in ring 3: {}",
        report.describe()
    );
    let requests: Vec<u64> = metrics["devices"][0]["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|queue| queue["requests"].as_u64().unwrap_or(0))
        .collect();
    // 128 blocks written and read back per queue; queue 0 also carries the final flush.
    assert_eq!(requests, [257, 256], "{metrics}");
}

/// `vq=packed` on devices offering packed rings (`packed=on`): the kit negotiates
/// VIRTIO_F_RING_PACKED and reports the negotiated layout in every RESULT line. blk verify runs
/// over two queues driven by two vCPUs (ring 3, polling), then on one queue with interrupts
/// (EVENT_IDX's descriptor-position events), each lapping the 256-entry rings several times;
/// rng returns data. Without `vq=` the same devices run split rings.
#[test]
fn packed_virtqueues_are_used_when_asked_for_and_offered() {
    let name = "packed_virtqueues_are_used_when_asked_for_and_offered";
    if skip_without_kvm(name) {
        return;
    }
    let image = test_file(name, "img");
    sparse_image(&image, 4 << 20);
    let disk = format!("--disk=path={},queues=2,packed=on", image.display());
    let mut packed = sluice_run(
        "quiet vq=packed w=blk:op=verify:bs=4096:qd=8:queues=2:span_mb=1:seed=7:cpus=2 \
         w=blk:op=verify:bs=4096:qd=4:span_mb=1:mode=irq:seed=9 w=rng:bytes=8192",
        &[&disk, "--rng=packed=on"],
    );
    packed.timeout = std::time::Duration::from_secs(120);
    let split = sluice_run(
        "quiet w=blk:op=verify:bs=4096:qd=8:span_mb=1:seed=11 w=rng:bytes=4096",
        &[&disk, "--rng=packed=on"],
    );

    let packed = packed.run().unwrap();
    let split = split.run().unwrap();
    let _ = std::fs::remove_file(&image);

    assert!(packed.passed(), "{}", packed.describe());
    assert_eq!(packed.results.len(), 3, "{}", packed.describe());
    for result in &packed.results {
        assert_eq!(result.raw["vq"], "packed", "{}", packed.describe());
    }
    let mut blk = packed.results_for("blk");
    let smp = blk.next().unwrap();
    assert_eq!(smp.verify.as_deref(), Some("ok"), "{}", packed.describe());
    assert_eq!(smp.ring, Some(3), "{}", packed.describe());
    assert_eq!(
        smp.raw["cpu_ops"],
        serde_json::json!([256, 256]),
        "{}",
        packed.describe()
    );
    let irq = blk.next().unwrap();
    assert_eq!(irq.verify.as_deref(), Some("ok"), "{}", packed.describe());
    assert_eq!(irq.raw["event_idx"], true, "{}", packed.describe());
    assert!(
        irq.raw["interrupts"].as_u64().unwrap() > 0,
        "{}",
        packed.describe()
    );
    let rng = packed.results_for("rng").next().unwrap();
    assert_eq!(rng.raw["bytes"], 8192, "{}", packed.describe());
    assert!(split.passed(), "{}", split.describe());
    for result in &split.results {
        assert_eq!(result.raw["vq"], "split", "{}", split.describe());
    }
}

#[test]
fn queue_depth_256_needs_and_gets_a_1024_entry_ring() {
    let name = "queue_depth_256_needs_and_gets_a_1024_entry_ring";
    if skip_without_kvm(name) {
        return;
    }
    let image = test_file(name, "img");
    sparse_image(&image, 4 << 20);
    let workload = "quiet w=blk:op=verify:bs=4096:qd=256:span_mb=2:mode=poll:seed=5";
    let large = format!("--disk=path={},queue_size=1024", image.display());
    let default = format!("--disk=path={}", image.display());

    let large = sluice_run(workload, &[&large]).run().unwrap();
    let default = sluice_run(workload, &[&default]).run().unwrap();
    let _ = std::fs::remove_file(&image);

    // Each request takes 3 descriptors: 256 in flight need the larger ring, and the default
    // 256-entry ring holds 85.
    for (run, depth) in [(&large, 256), (&default, 85)] {
        assert!(run.passed(), "{}", run.describe());
        let blk = run.results_for("blk").next().unwrap();
        assert_eq!(blk.verify.as_deref(), Some("ok"), "{}", run.describe());
        assert_eq!(blk.raw["qd"], depth, "{}", run.describe());
    }
}

/// A per-test file in cargo's scratch directory for integration tests.
fn test_file(test: &str, extension: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{test}-{}.{extension}", std::process::id()))
}

/// A zero-filled sparse disk image of `bytes`.
fn sparse_image(path: &Path, bytes: u64) {
    std::fs::File::create(path)
        .and_then(|file| file.set_len(bytes))
        .unwrap();
}
