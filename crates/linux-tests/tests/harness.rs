//! Fast checks of the harness itself (no QEMU): the guest's exit marker, the command-line
//! encoding, fio's report and on-disk verify format. The on-disk check is also run against a
//! file written by the host's fio when it has one.

mod common;

use common::fio::{
    check_block, fio_crc32c, hardware_queues, issued_reads_writes, scan_image, FioJob, BLOCK_SIZE,
};
use common::qemu::{base64_encode, kernel_cmdline, parse_exit_marker};
use common::{find_program, Scratch};

#[test]
fn exit_marker_is_the_last_status_printed() {
    let console = "[    1.0] boot\nSLUICE-RUN-START\nfio output\nSLUICE-RUN-EXIT=3\r\n[ 2.0] reboot: Power down\n";

    let status = parse_exit_marker(console);

    assert_eq!(status, Some(3));
    assert_eq!(parse_exit_marker("SLUICE-RUN-START\nkernel panic\n"), None);
    assert_eq!(parse_exit_marker("SLUICE-RUN-EXIT=garbage\n"), None);
}

#[test]
fn base64_matches_rfc4648_vectors() {
    let vectors = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];

    for (plain, encoded) in vectors {
        assert_eq!(base64_encode(plain.as_bytes()), encoded, "{plain:?}");
    }
}

#[test]
fn kernel_cmdline_carries_the_command_as_one_word() {
    let cmdline = kernel_cmdline("fio --name=a 'x y' \"z\"");

    let run = cmdline
        .split(' ')
        .find_map(|w| w.strip_prefix("sluice.run="))
        .expect("sluice.run= present");
    assert_eq!(run, base64_encode(b"fio --name=a 'x y' \"z\""));
    assert!(cmdline.starts_with("console=ttyS0 "));
}

#[test]
fn fio_report_totals_are_parsed() {
    let report = "  IO depths    : 1=0.1%\n     issued rwts: total=8192,4202,0,0 short=0,0,0,0 dropped=0,0,0,0\n";

    assert_eq!(issued_reads_writes(report), Some((8192, 4202)));
    assert_eq!(issued_reads_writes("no summary"), None);
}

#[test]
fn hardware_queue_count_is_parsed() {
    let console = "Disk stats\nSLUICE-HW-QUEUES=2\nSLUICE-RUN-EXIT=0\n";

    assert_eq!(hardware_queues(console), Some(2));
    assert_eq!(hardware_queues("SLUICE-HW-QUEUES=\n"), None);
}

#[test]
fn fio_job_regions_do_not_overlap() {
    let command = FioJob {
        jobs: 2,
        region_mib: 128,
        io_mib: 32,
    }
    .command();

    assert!(
        command.contains("--numjobs=2 --size=128M --offset_increment=128M --io_size=32M"),
        "{command}"
    );
    assert!(
        command.contains("--verify=crc32c --verify_fatal=1"),
        "{command}"
    );
}

#[test]
fn crc32c_is_fios_uninverted_castagnoli() {
    // The standard CRC-32C check value of "123456789" is 0xe3069283 (with the final inversion).
    assert_eq!(!fio_crc32c(b"123456789"), 0xe306_9283);
}

/// A block as fio 3.33 writes it for `offset` (see common/fio.rs for the layout).
fn synthetic_block(offset: u64) -> [u8; BLOCK_SIZE] {
    let mut block = [0u8; BLOCK_SIZE];
    for (i, byte) in block.iter_mut().enumerate().skip(44) {
        *byte = (i as u8).wrapping_mul(31) ^ (offset as u8);
    }
    block[0..2].copy_from_slice(&0xaccau16.to_le_bytes());
    block[2..4].copy_from_slice(&5u16.to_le_bytes());
    block[4..8].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    block[16..24].copy_from_slice(&offset.to_le_bytes());
    let header_crc = fio_crc32c(&block[..36]);
    block[36..40].copy_from_slice(&header_crc.to_le_bytes());
    let data_crc = fio_crc32c(&block[44..]);
    block[40..44].copy_from_slice(&data_crc.to_le_bytes());
    block
}

#[test]
fn block_check_rejects_misplaced_and_corrupted_blocks() {
    let block = synthetic_block(0x3000);
    let mut corrupted = block;
    corrupted[2000] ^= 1;
    let mut bad_header = block;
    bad_header[30] ^= 1;

    assert_eq!(check_block(&block, 0x3000), None);
    assert_eq!(
        check_block(&block, 0x4000),
        Some("written for offset 0x3000".into())
    );
    assert_eq!(
        check_block(&corrupted, 0x3000),
        Some("data crc mismatch".into())
    );
    assert_eq!(
        check_block(&bad_header, 0x3000),
        Some("header crc mismatch".into())
    );
    assert_eq!(
        check_block(&[0x5a; BLOCK_SIZE], 0),
        Some("no fio header (magic 0x5a5a)".into())
    );
}

#[test]
fn image_scan_counts_fio_zero_and_bad_blocks() {
    let scratch = Scratch::new("scan");
    let mut image = Vec::new();
    image.extend_from_slice(&synthetic_block(0));
    image.extend_from_slice(&[0u8; BLOCK_SIZE]);
    image.extend_from_slice(&synthetic_block(0x1000)); // belongs one block earlier
    image.extend_from_slice(&synthetic_block(0x3000));
    let path = scratch.path("image");
    std::fs::write(&path, &image).expect("write the image");

    let scan = scan_image(&path).expect("scan");

    assert_eq!(
        (scan.fio_blocks, scan.zero_blocks, scan.bad_count),
        (2, 1, 1)
    );
    assert_eq!(
        scan.bad,
        vec![(0x2000, "written for offset 0x1000".to_string())]
    );
}

#[test]
fn image_scan_accepts_what_the_hosts_fio_writes() {
    if find_program("fio").is_none() {
        println!("SKIP image_scan_accepts_what_the_hosts_fio_writes: no fio on the host");
        return;
    }
    let scratch = Scratch::new("hostfio");
    let path = scratch.disk("image", 4 << 20);
    let output = std::process::Command::new("fio")
        .args([
            "--name=h",
            "--rw=randwrite",
            "--bs=4k",
            "--size=4M",
            "--io_size=1M",
            "--verify=crc32c",
            "--do_verify=0",
            // Nothing resumes this job: no verify state file (it would land in the cwd).
            "--verify_state_save=0",
        ])
        .arg(format!("--filename={}", path.display()))
        .current_dir(&scratch.dir)
        .output()
        .expect("run fio");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, writes) =
        issued_reads_writes(&String::from_utf8_lossy(&output.stdout)).expect("fio summary");

    let scan = scan_image(&path).expect("scan");

    assert_eq!(scan.bad, vec![]);
    assert_eq!(scan.fio_blocks, writes);
    assert_eq!(scan.fio_blocks + scan.zero_blocks, 1024);
    // fio saves a verify state file (`local-<job>-<n>-verify.state`) in its working directory,
    // which is this crate's directory under `cargo test`: one was once committed by accident.
    let stray = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("local-h-0-verify.state");
    assert!(!stray.exists(), "fio left {} behind", stray.display());
}
