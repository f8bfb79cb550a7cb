//! Console parser tests on recorded guest kit console text (the formats of the guest kit
//! contract), including noise, malformed and truncated lines.

use sluice_guest_kit::{ExitKind, GuestKitReport, PciBar, Verdict};

const PASSING_INFO_RUN: &str = "\
sluice-guest: booted, cmdline \"w=info\"\r
ACPI: RSDP @0xf5a80 len=20\r
ACPI: XSDT @0x3ffe2000 len=76\r
ACPI: FACP @0x3ffe1000 len=244\r
ACPI: DSDT @0x3ffe0000 len=6500\r
ACPI: APIC @0x3ffe3000 len=120\r
ACPI: MCFG @0x3ffe4000 len=60\r
PCI: 00:00.0 8086:29c0 class=060000\r
PCI: 00:01.0 1af4:1042 class=010000 bar1=0xfebd1000/0x1000 bar4=0xfe000000/0x4000\r
RESULT {\"workload\":\"info\",\"pass\":true,\"acpi_tables\":6,\"pci_devices\":2}\r
GUEST-KIT PASS\r
";

#[test]
fn passing_run_yields_tables_devices_result_and_verdict() {
    let report = GuestKitReport::parse(PASSING_INFO_RUN, ExitKind::Pass);

    assert!(report.passed(), "{}", report.describe());
    assert!(report.malformed.is_empty(), "{:?}", report.malformed);
    let signatures: Vec<_> = report
        .acpi_tables
        .iter()
        .map(|t| t.signature.as_str())
        .collect();
    assert_eq!(signatures, ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG"]);
    let dsdt = report.acpi_table("DSDT").expect("DSDT parsed");
    assert_eq!((dsdt.address, dsdt.length), (0x3ffe_0000, 6500));
    assert_eq!(report.pci.len(), 2);
    assert!(report.pci[0].is_host_bridge());
    let blk = &report.pci[1];
    assert_eq!((blk.bus, blk.device, blk.function), (0, 1, 0));
    assert_eq!(
        (blk.vendor_id, blk.device_id, blk.class),
        (0x1af4, 0x1042, 0x01_0000)
    );
    assert!(!blk.is_host_bridge());
    assert_eq!(
        blk.bars,
        [
            PciBar {
                index: 1,
                address: 0xfebd_1000,
                size: 0x1000
            },
            PciBar {
                index: 4,
                address: 0xfe00_0000,
                size: 0x4000
            },
        ]
    );
    assert_eq!(report.results.len(), 1);
    assert_eq!(report.results[0].raw["pci_devices"], 2);
}

#[test]
fn blk_result_fields_are_typed() {
    let console = concat!(
        r#"RESULT {"workload":"blk","op":"randread","bs":4096,"qd":32,"queues":1,"ops":1000,"#,
        r#""bytes":4096000,"elapsed_ns":123456,"lat_ns":{"p50":10,"p90":20,"p99":30,"max":40},"#,
        r#""notifies":900,"interrupts":800,"errors":0,"verify":"n/a","pass":true}"#,
        "\nGUEST-KIT PASS\n"
    );

    let report = GuestKitReport::parse(console, ExitKind::Pass);

    let blk = report.results_for("blk").next().expect("one blk result");
    assert_eq!(blk.op.as_deref(), Some("randread"));
    assert_eq!(
        (blk.ops, blk.bytes, blk.errors),
        (Some(1000), Some(4_096_000), Some(0))
    );
    assert_eq!(blk.lat_ns.as_ref().map(|l| l.p99), Some(30));
    assert_eq!(blk.verify.as_deref(), Some("n/a"));
    assert_eq!(blk.raw["notifies"], 900);
}

#[test]
fn failing_run_keeps_reason_and_failed_result() {
    let console = "\
sluice-guest: blk: read back mismatch at lba 17
RESULT {\"workload\":\"blk\",\"op\":\"verify\",\"errors\":1,\"verify\":\"fail\",\"pass\":false}
GUEST-KIT FAIL blk verify mismatch at lba 17
";

    let report = GuestKitReport::parse(console, ExitKind::from_qemu_status(3));

    assert_eq!(report.exit, ExitKind::WorkloadFailed);
    assert!(!report.passed());
    assert_eq!(
        report.verdict,
        Some(Verdict::Fail("blk verify mismatch at lba 17".into()))
    );
    assert_eq!(report.results[0].verify.as_deref(), Some("fail"));
    assert!(!report.results[0].pass);
}

#[test]
fn panic_run_has_panic_exit_and_no_pass() {
    let console = "sluice-guest: panic at src/virtio.rs:88: queue size 0\nGUEST-KIT FAIL panic\n";

    let report = GuestKitReport::parse(console, ExitKind::from_qemu_status(5));

    assert_eq!(report.exit, ExitKind::Panic);
    assert_eq!(report.verdict, Some(Verdict::Fail("panic".into())));
    assert!(!report.passed());
}

#[test]
fn garbage_lines_are_ignored_and_malformed_markers_are_recorded() {
    let console = "\
\u{1b}[2J\u{1b}[01;01HSeaBIOS noise
\u{1b}[0mACPI: FACP @0x1000 len=244
\u{0}\u{0}random bytes \u{fffd}\u{fffd}
ACPI: @0x1000 len=12
PCI: 00:40.0 8086:29c0 class=060000
PCI: 00:02.0 zzzz:1000 class=020000
PCI: 00:03.0 1af4:1000 class=020000 bar9=0x1/0x2
GUEST-KIT MAYBE
GUEST-KIT PASS
";

    let report = GuestKitReport::parse(console, ExitKind::Pass);

    assert_eq!(
        report.acpi_tables.len(),
        1,
        "escape-prefixed line still parses"
    );
    assert_eq!(report.acpi_tables[0].signature, "FACP");
    assert!(report.pci.is_empty(), "{:?}", report.pci);
    let bad_lines: Vec<_> = report.malformed.iter().map(|m| m.line_number).collect();
    assert_eq!(bad_lines, [4, 5, 6, 7, 8]);
    assert_eq!(report.verdict, Some(Verdict::Pass));
}

#[test]
fn truncated_json_is_malformed_and_no_verdict_means_no_pass() {
    let console = "RESULT {\"workload\":\"blk\",\"op\":\"read\",\"ops\":10";

    let report = GuestKitReport::parse(console, ExitKind::Timeout);

    assert!(report.results.is_empty());
    assert_eq!(report.malformed.len(), 1);
    assert!(
        report.malformed[0].reason.contains("JSON"),
        "{:?}",
        report.malformed
    );
    assert_eq!(report.verdict, None);
    assert!(!report.passed());
}

#[test]
fn result_without_required_fields_is_malformed() {
    let console = "RESULT {\"op\":\"read\"}\nRESULT [1,2]\n";

    let report = GuestKitReport::parse(console, ExitKind::Pass);

    assert!(report.results.is_empty());
    assert_eq!(report.malformed.len(), 2);
}

#[test]
fn pass_byte_without_pass_line_is_not_a_pass() {
    let report = GuestKitReport::parse("sluice-guest: hello\n", ExitKind::Pass);

    assert!(!report.passed());
}

#[test]
fn qemu_status_maps_back_to_the_guest_byte() {
    let cases = [
        (1, ExitKind::Pass),
        (3, ExitKind::WorkloadFailed),
        (5, ExitKind::Panic),
        (7, ExitKind::Exception),
        (9, ExitKind::Timeout),
        (11, ExitKind::BadCmdline),
        (13, ExitKind::Other(6)),
        (0, ExitKind::Other(0)),
        (2, ExitKind::Other(2)),
    ];

    for (status, expected) in cases {
        assert_eq!(
            ExitKind::from_qemu_status(status),
            expected,
            "status {status}"
        );
    }
}

#[test]
fn sluice_status_is_the_guest_byte() {
    assert_eq!(ExitKind::from_sluice_status(0), ExitKind::Pass);
    assert_eq!(ExitKind::from_sluice_status(3), ExitKind::Exception);
    assert_eq!(ExitKind::from_sluice_status(5), ExitKind::BadCmdline);
    assert_eq!(ExitKind::from_sluice_status(101), ExitKind::Other(101));
    assert_eq!(ExitKind::from_sluice_status(-1), ExitKind::Other(-1));
}
