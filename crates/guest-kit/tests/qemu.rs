//! The guest kit against QEMU's devices (test tier 3): proves the guest kit's drivers so that
//! the same workloads on sluice prove sluice's devices. Each scenario runs under TCG and under
//! KVM (skipped with a `SKIP` line when /dev/kvm cannot be opened).

mod common;

use std::time::{Duration, Instant};

use common::{assert_passed, free_udp_port, qemu, skip, EchoPeer, TempImage};
use sluice_guest_kit::{Accel, Device, ExitKind, GuestKitReport, Machine, Verdict};

/// One `#[test]` per accelerator for a scenario `fn(Accel, &str)`; the `&str` is the test name
/// for SKIP lines. An optional `ignore = "reason"` applies to both.
macro_rules! tcg_and_kvm {
    ($name:ident, $scenario:ident $(, ignore = $reason:literal)?) => {
        mod $name {
            use super::*;

            #[test]
            $(#[ignore = $reason])?
            fn tcg() {
                $scenario(Accel::Tcg, concat!(stringify!($name), "::tcg"));
            }

            #[test]
            $(#[ignore = $reason])?
            fn kvm() {
                if skip(Accel::Kvm, concat!(stringify!($name), "::kvm")) {
                    return;
                }
                $scenario(Accel::Kvm, concat!(stringify!($name), "::kvm"));
            }
        }
    };
}

// ---- boot -------------------------------------------------------------------------------------

/// The guest kit boots and ends the run itself with a verdict and a matching exit byte, whatever
/// the workloads do; this catches boot, SSE and exit-path problems separately from drivers.
fn boots_to_a_verdict(accel: Accel, _test: &str) {
    let report = qemu(accel, Machine::Q35, "w=info").run().expect("run QEMU");

    assert!(
        report.verdict.is_some(),
        "no verdict: {}",
        report.describe()
    );
    assert!(
        matches!(report.exit, ExitKind::Pass | ExitKind::WorkloadFailed),
        "{}",
        report.describe()
    );
    assert_eq!(
        report.exit == ExitKind::Pass,
        report.verdict == Some(Verdict::Pass),
        "exit byte and verdict disagree: {}",
        report.describe()
    );
}

tcg_and_kvm!(guest_kit_boots_to_a_verdict, boots_to_a_verdict);

// ---- info -------------------------------------------------------------------------------------

fn info_on(accel: Accel, machine: Machine, _test: &str) -> GuestKitReport {
    let report = qemu(accel, machine, "w=info").run().expect("run QEMU");
    assert_passed(&report);
    for table in ["FACP", "APIC", "DSDT"] {
        assert!(
            report.acpi_table(table).is_some(),
            "no {table}: {}",
            report.describe()
        );
    }
    assert!(
        report.pci.iter().any(|p| p.is_host_bridge()),
        "no PCI host bridge: {}",
        report.describe()
    );
    report
}

fn info_q35(accel: Accel, test: &str) {
    let report = info_on(accel, Machine::Q35, test);

    let mcfg = report.acpi_table("MCFG");
    assert!(mcfg.is_some(), "q35 has PCIe ECAM: {}", report.describe());
}

fn info_pc(accel: Accel, test: &str) {
    // i440FX has no MCFG; the common checks are the point here.
    info_on(accel, Machine::Pc, test);
}

tcg_and_kvm!(
    info_q35_passes_with_acpi_and_pci,
    info_q35,
    ignore = "waiting for guest workload info"
);
tcg_and_kvm!(
    info_pc_passes_with_acpi_and_pci,
    info_pc,
    ignore = "waiting for guest workload info"
);

// ---- blk --------------------------------------------------------------------------------------

const IMAGE_BYTES: u64 = 2 << 20;

fn blk_verify(accel: Accel, queues: u16, mode: &str) {
    let image = TempImage::new("verify", IMAGE_BYTES);
    let cmdline = format!(
        "quiet w=blk:op=verify:bs=4096:qd=4:queues={queues}:ops=64:span_mb=1:mode={mode}:seed=7"
    );
    let run = qemu(accel, Machine::Q35, &cmdline).with_device(Device::VirtioBlk {
        image: image.path.clone(),
        queues,
        read_only: false,
    });

    let report = run.run().expect("run QEMU");

    assert_passed(&report);
    let blk = report
        .results_for("blk")
        .next()
        .unwrap_or_else(|| panic!("no blk RESULT: {}", report.describe()));
    assert_eq!(blk.verify.as_deref(), Some("ok"), "{}", report.describe());
    assert_eq!(blk.errors, Some(0), "{}", report.describe());
    assert!(
        image.read_at(0, 1 << 20).iter().any(|b| *b != 0),
        "the guest's writes did not reach the image"
    );
}

fn blk_verify_1q_irq(accel: Accel, _test: &str) {
    blk_verify(accel, 1, "irq");
}
fn blk_verify_2q_irq(accel: Accel, _test: &str) {
    blk_verify(accel, 2, "irq");
}
fn blk_verify_1q_poll(accel: Accel, _test: &str) {
    blk_verify(accel, 1, "poll");
}
fn blk_verify_2q_poll(accel: Accel, _test: &str) {
    blk_verify(accel, 2, "poll");
}

tcg_and_kvm!(
    blk_verify_one_queue_irq,
    blk_verify_1q_irq,
    ignore = "waiting for guest driver virtio-blk"
);
tcg_and_kvm!(
    blk_verify_two_queues_irq,
    blk_verify_2q_irq,
    ignore = "waiting for guest driver virtio-blk"
);
tcg_and_kvm!(
    blk_verify_one_queue_poll,
    blk_verify_1q_poll,
    ignore = "waiting for guest driver virtio-blk"
);
tcg_and_kvm!(
    blk_verify_two_queues_poll,
    blk_verify_2q_poll,
    ignore = "waiting for guest driver virtio-blk"
);

// ---- rng --------------------------------------------------------------------------------------

fn rng(accel: Accel, _test: &str) {
    let run = qemu(accel, Machine::Q35, "w=rng:bytes=4096").with_device(Device::VirtioRng);

    let report = run.run().expect("run QEMU");

    assert_passed(&report);
    let rng = report
        .results_for("rng")
        .next()
        .unwrap_or_else(|| panic!("no rng RESULT: {}", report.describe()));
    assert_eq!(rng.bytes, Some(4096), "{}", report.describe());
}

tcg_and_kvm!(
    rng_reads_entropy,
    rng,
    ignore = "waiting for guest driver virtio-rng"
);

// ---- net --------------------------------------------------------------------------------------

fn net_echo(accel: Accel, _test: &str) {
    const FRAMES: u64 = 16;
    let peer = EchoPeer::start();
    let run = qemu(
        accel,
        Machine::Q35,
        &format!("w=net:dir=echo:size=1000:frames={FRAMES}"),
    )
    .with_device(Device::VirtioNet {
        host_port: peer.port,
        vmm_port: free_udp_port(),
    });

    let report = run.run().expect("run QEMU");

    assert_passed(&report);
    let net = report
        .results_for("net")
        .next()
        .unwrap_or_else(|| panic!("no net RESULT: {}", report.describe()));
    assert_eq!(net.errors.unwrap_or(0), 0, "{}", report.describe());
    let echoed = peer.echoed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        echoed >= FRAMES,
        "host echoed {echoed} frames, guest sent fewer than {FRAMES}: {}",
        report.describe()
    );
}

tcg_and_kvm!(
    net_echo_through_udp_peer,
    net_echo,
    ignore = "waiting for guest driver virtio-net"
);

// ---- broken runs ------------------------------------------------------------------------------

/// A blk workload with no virtio-blk device: the guest must fail cleanly and quickly (exit 1,
/// a FAIL line), not hang and not pass.
fn blk_without_device(accel: Accel, _test: &str) {
    let started = Instant::now();

    let report = qemu(accel, Machine::Q35, "w=blk:op=read:ops=8:timeout_ms=1000")
        .run()
        .expect("run QEMU");

    assert!(!report.host_timed_out, "guest hung: {}", report.describe());
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        report.exit,
        ExitKind::WorkloadFailed,
        "{}",
        report.describe()
    );
    assert!(
        matches!(report.verdict, Some(Verdict::Fail(_))),
        "{}",
        report.describe()
    );
}

tcg_and_kvm!(
    blk_workload_without_device_fails_cleanly,
    blk_without_device,
    ignore = "waiting for guest driver virtio-blk"
);

/// An unknown workload is a bad command line: exit 5 and a FAIL line, before touching devices.
fn unknown_workload(accel: Accel, _test: &str) {
    let report = qemu(accel, Machine::Q35, "w=teleport:speed=9")
        .run()
        .expect("run QEMU");

    assert!(!report.host_timed_out, "guest hung: {}", report.describe());
    assert_eq!(report.exit, ExitKind::BadCmdline, "{}", report.describe());
    assert!(
        matches!(report.verdict, Some(Verdict::Fail(_))),
        "{}",
        report.describe()
    );
}

tcg_and_kvm!(
    unknown_workload_is_a_bad_command_line,
    unknown_workload,
    ignore = "waiting for guest command-line parser"
);
