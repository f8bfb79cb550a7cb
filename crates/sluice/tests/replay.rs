//! Record and replay through the binary (issue 17, docs/replay.md): the guest kit's blk verify
//! and rng workloads recorded with `sluice run --record` and re-run with `sluice replay` with
//! the disk image gone, its blk verify and net echo (a tap with a host echo peer) recorded in
//! one run and replayed with the disk and the tap gone, a tampered log stopping at the
//! divergence point, a corrupt log refused, and the configurations recording cannot make
//! deterministic refused; and the device-level re-runs of a virtio-blk and an NVMe request log.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use common::{run_sluice, spawn_echo_peer, Run};
use sluice_guest_kit::skip_without_kvm;
use sluice_vmm::replay::format::{self, Event, ExitKind};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The virtual clock keeps the TSC and the LAPIC timer out of the run (guest/README.md). The
/// first blk workload waits for MSI-X interrupts: the log carries them. The verify pass makes
/// up most of the second half of the exits (the tampered-write test relies on it).
const CMDLINE: &str = "clock=virtual w=blk:op=read:bs=4096:qd=2:ops=64:mode=irq \
                       w=blk:op=verify:bs=4096:qd=4:span_mb=1:seed=7:mode=poll w=rng:bytes=4096";

/// Blk verify, then a net echo with MSI-X interrupts (irq mode) through the tap's echo peer.
const NET_CMDLINE: &str = "clock=virtual w=blk:op=verify:bs=4096:qd=4:span_mb=1:seed=7:mode=poll \
                           w=net:dir=echo:size=1000:frames=16:mode=irq";

struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("replay")
            .join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `memory hash 0x...` a record or replay run printed on stderr.
fn memory_hash(run: &Run) -> String {
    run.stderr
        .lines()
        .find_map(|l| l.split("memory hash ").nth(1))
        .unwrap_or_else(|| panic!("no memory hash:\n{}", run.transcript()))
        .trim()
        .to_string()
}

/// Records the guest kit on a fresh 16 MiB image into `log`, console into `console`, then
/// deletes the image: a replay must not need it.
fn record(scratch: &Scratch, log: &Path, console: &Path) -> Run {
    let image = scratch.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let run = run_sluice(
        &[
            "run".into(),
            "--memory".into(),
            "64M".into(),
            format!("--disk=path={}", image.display()),
            "--rng".into(),
            "--cmdline".into(),
            CMDLINE.into(),
            format!("--serial=file={}", console.display()),
            format!("--record={}", log.display()),
        ],
        TIMEOUT,
    );
    assert_eq!(run.status, Some(0), "{}", run.transcript());
    assert!(
        run.stderr.contains("sluice: recorded"),
        "{}",
        run.transcript()
    );
    std::fs::remove_file(&image).unwrap();
    run
}

fn replay(log: &Path, console: &Path) -> Run {
    run_sluice(
        &[
            "replay".into(),
            log.display().to_string(),
            format!("--serial=file={}", console.display()),
        ],
        TIMEOUT,
    )
}

#[test]
fn replay_reproduces_blk_verify_and_rng_without_the_disk() {
    if skip_without_kvm("replay_reproduces_blk_verify_and_rng_without_the_disk") {
        return;
    }
    let scratch = Scratch::new("reproduce");
    let (log, recorded_console) = (scratch.path("run.log"), scratch.path("recorded.txt"));
    let recorded = record(&scratch, &log, &recorded_console);
    let console = std::fs::read_to_string(&recorded_console).unwrap();
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    assert!(console.contains("\"verify\":\"ok\""), "{console}");
    let msis = logged_msis(&std::fs::read(&log).unwrap());
    assert!(
        msis > 0,
        "the irq-mode workload's interrupts are in the log"
    );

    let replayed_console = scratch.path("replayed.txt");
    let replayed = replay(&log, &replayed_console);

    assert_eq!(replayed.status, Some(0), "{}", replayed.transcript());
    assert!(
        replayed.stderr.contains("replay matched the log"),
        "{}",
        replayed.transcript()
    );
    assert_eq!(
        std::fs::read_to_string(&replayed_console).unwrap(),
        console,
        "the replayed console differs"
    );
    assert_eq!(memory_hash(&replayed), memory_hash(&recorded));
    // A second recording draws other random bytes from getrandom: its final memory differs,
    // so the replay above reproduced the recorded rng input, not a fresh one.
    let other = record(
        &scratch,
        &scratch.path("other.log"),
        &scratch.path("other.txt"),
    );
    assert_ne!(memory_hash(&other), memory_hash(&recorded));
}

/// Records once and returns the log's bytes (the scratch directory keeps the files).
fn recorded_log(scratch: &Scratch) -> Vec<u8> {
    let log = scratch.path("run.log");
    record(scratch, &log, &scratch.path("recorded.txt"));
    std::fs::read(&log).unwrap()
}

/// How many MSIs the log says devices sent.
fn logged_msis(log: &[u8]) -> usize {
    let mut reader = format::LogReader::new(log).unwrap();
    let mut count = 0;
    while let Some(event) = reader.next_event().unwrap() {
        count += usize::from(matches!(event, Event::Msi { .. }));
    }
    count
}

/// Exit ordinals (1-based) of the log's exits, with the event each is.
fn exits(log: &[u8]) -> Vec<(u64, format::ExitRecord)> {
    let mut reader = format::LogReader::new(log).unwrap();
    let mut exits = Vec::new();
    while let Some(event) = reader.next_event().unwrap() {
        if let Event::Exit(exit) = event {
            exits.push((exits.len() as u64 + 1, exit));
        }
    }
    exits
}

#[test]
fn a_tampered_read_value_stops_replay_at_the_divergence_point() {
    if skip_without_kvm("a_tampered_read_value_stops_replay_at_the_divergence_point") {
        return;
    }
    let scratch = Scratch::new("tampered-read");
    let log = recorded_log(&scratch);
    // The 10th read of COM1's line status with "transmit holding register empty" set: with
    // the bit cleared the guest reads the status again where the log has it write a byte.
    let (ordinal, target) = exits(&log)
        .into_iter()
        .filter(|(_, e)| e.kind == ExitKind::PioIn && e.addr == 0x3fd && e.data[0] & 0x20 != 0)
        .nth(9)
        .expect("the guest polls COM1's line status");
    let mut tampered = Vec::new();
    let mut seen = 0;
    format::rewrite(&log, &mut tampered, |_, event| {
        if let Event::Exit(exit) = event {
            seen += 1;
            if seen == ordinal {
                assert_eq!(*exit, target);
                exit.data[0] &= !0x20;
            }
        }
    })
    .unwrap();
    let path = scratch.path("tampered.log");
    std::fs::write(&path, &tampered).unwrap();

    let run = replay(&path, &scratch.path("replayed.txt"));

    assert_eq!(run.status, Some(124), "{}", run.transcript());
    let expected = format!("replay diverged at exit #{}", ordinal + 1);
    assert!(run.stderr.contains(&expected), "{}", run.transcript());
    assert!(
        run.stderr
            .contains("the guest made a PIO in of 1 bytes at 0x3fd; the log has a PIO out"),
        "{}",
        run.transcript()
    );
}

#[test]
fn a_tampered_device_write_stops_replay_before_the_end() {
    if skip_without_kvm("a_tampered_device_write_stops_replay_before_the_end") {
        return;
    }
    let scratch = Scratch::new("tampered-write");
    let log = recorded_log(&scratch);
    let total = exits(&log).len() as u64;
    // A disk read's data page from the verify pass (mostly pattern bytes): one byte changed
    // makes the guest's check fail, which it reports on the console.
    let mut exit_count = 0;
    let mut changed_at = None;
    let mut tampered = Vec::new();
    format::rewrite(&log, &mut tampered, |_, event| match event {
        Event::Exit(_) => exit_count += 1,
        Event::DmaPage { bytes, .. }
            if changed_at.is_none()
                && exit_count > total / 2
                && bytes.iter().filter(|&&b| b != 0).count() > 3000 =>
        {
            bytes[100] ^= 0xff;
            changed_at = Some(exit_count);
        }
        _ => {}
    })
    .unwrap();
    let changed_at = changed_at.expect("a data page in the second half of the log");
    let path = scratch.path("tampered.log");
    std::fs::write(&path, &tampered).unwrap();

    let run = replay(&path, &scratch.path("replayed.txt"));

    assert_eq!(run.status, Some(124), "{}", run.transcript());
    let diverged: u64 = run
        .stderr
        .split("replay diverged at exit #")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no divergence point:\n{}", run.transcript()));
    assert!(
        diverged > changed_at && diverged <= total,
        "diverged at {diverged}, page changed after exit {changed_at}, {total} exits:\n{}",
        run.transcript()
    );
}

#[test]
fn a_log_with_a_bad_checksum_is_refused() {
    if skip_without_kvm("a_log_with_a_bad_checksum_is_refused") {
        return;
    }
    let scratch = Scratch::new("corrupt");
    let mut log = recorded_log(&scratch);
    let middle = log.len() / 2;
    log[middle] ^= 0x01;
    let path = scratch.path("corrupt.log");
    std::fs::write(&path, &log).unwrap();
    let console = scratch.path("replayed.txt");

    let run = replay(&path, &console);

    assert_eq!(run.status, Some(125), "{}", run.transcript());
    assert!(
        run.stderr.contains("checksum mismatch") || run.stderr.contains("bad chunk magic"),
        "{}",
        run.transcript()
    );
}

/// The blk verify and the net echo in one recording: every frame the peer echoed entered the
/// guest at an exit (the kit's clock=virtual receive loop rings the RX doorbell, the inline RX
/// queue reads the tap there), so the replay, with the image deleted and the tap gone with the
/// recording sluice, prints the same console and ends with the same memory.
#[test]
fn replay_reproduces_blk_verify_and_net_echo_without_the_disk_or_the_tap() {
    let name = "replay_reproduces_blk_verify_and_net_echo_without_the_disk_or_the_tap";
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
    let scratch = Scratch::new("net-echo");
    let (log, recorded_console) = (scratch.path("run.log"), scratch.path("recorded.txt"));
    let tap = format!("slr{}", std::process::id() % 100_000);
    let (stop, peer) = spawn_echo_peer(tap.clone());
    let image = scratch.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let recorded = run_sluice(
        &[
            "run".into(),
            "--memory".into(),
            "64M".into(),
            format!("--disk=path={}", image.display()),
            format!("--net=tap={tap}"),
            "--cmdline".into(),
            NET_CMDLINE.into(),
            format!("--serial=file={}", recorded_console.display()),
            format!("--record={}", log.display()),
        ],
        TIMEOUT,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let echoed = peer.join().unwrap();
    std::fs::remove_file(&image).unwrap();
    assert_eq!(recorded.status, Some(0), "{}", recorded.transcript());
    let console = std::fs::read_to_string(&recorded_console).unwrap();
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    let results: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("RESULT"))
        .collect();
    assert!(
        results
            .iter()
            .any(|l| l.contains("\"workload\":\"blk\"") && l.contains("\"verify\":\"ok\"")),
        "{console}"
    );
    assert!(
        results.iter().any(|l| l.contains("\"workload\":\"net\"")
            && l.contains("\"frames\":16")
            && l.contains("\"verify\":\"ok\"")),
        "{console}"
    );
    assert!(echoed >= 16, "the host peer echoed {echoed} frames");
    assert!(logged_msis(&std::fs::read(&log).unwrap()) > 0);
    let name = std::ffi::CString::new(tap).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_eq!(index, 0, "the tap went away with the recording sluice");

    let replayed_console = scratch.path("replayed.txt");
    let replayed = replay(&log, &replayed_console);

    assert_eq!(replayed.status, Some(0), "{}", replayed.transcript());
    assert!(
        replayed.stderr.contains("replay matched the log"),
        "{}",
        replayed.transcript()
    );
    assert_eq!(
        std::fs::read_to_string(&replayed_console).unwrap(),
        console,
        "the replayed console differs"
    );
    assert_eq!(memory_hash(&replayed), memory_hash(&recorded));
}

/// `requests=` logs the disk's requests during a recording; `sluice replay --device` re-runs
/// them against the virtio-blk model alone (no VM, a fresh image) with the same answers, and
/// writes them as `blk_request` fuzz seeds; started from another image it reports the first
/// request whose answer differs; a corrupt log is refused before anything runs.
#[test]
fn a_disks_request_log_reruns_on_the_device_model_alone() {
    if skip_without_kvm("a_disks_request_log_reruns_on_the_device_model_alone") {
        return;
    }
    let scratch = Scratch::new("device-rerun");
    let (image, requests) = (scratch.path("disk.img"), scratch.path("disk.requests"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let recorded = run_sluice(
        &[
            "run".into(),
            "--memory".into(),
            "64M".into(),
            format!(
                "--disk=path={},requests={}",
                image.display(),
                requests.display()
            ),
            "--cmdline".into(),
            CMDLINE.replace(" w=rng:bytes=4096", ""),
            "--serial=off".into(),
            format!("--record={}", scratch.path("run.log").display()),
        ],
        TIMEOUT,
    );
    assert_eq!(recorded.status, Some(0), "{}", recorded.transcript());
    // Another starting image: the first read of the log (sector 0 of a fresh disk) differs.
    std::fs::write(&image, vec![0x5au8; 16 << 20]).unwrap();
    let corpus = scratch.path("corpus");

    let rerun = replay_device(&requests, format!("--corpus={}", corpus.display()));
    let other_image = replay_device(&requests, format!("--image={}", image.display()));

    assert_eq!(rerun.status, Some(0), "{}", rerun.transcript());
    // 64 reads, the verify's 256 writes and 256 reads, its flush.
    assert!(
        rerun
            .stderr
            .contains("device re-run matched the log: 577 requests"),
        "{}",
        rerun.transcript()
    );
    let seeds = read_seeds(&corpus);
    assert!(seeds.len() > 256, "{} seeds", seeds.len());
    for seed in &seeds {
        sluice_devices::block::fuzz::blk_request(seed);
    }
    assert_a_flipped_byte_is_refused(&requests, &scratch.path("corrupt.requests"));
    assert_eq!(
        other_image.status,
        Some(124),
        "{}",
        other_image.transcript()
    );
    assert!(
        other_image.stderr.contains(
            "device re-run diverged at request #1 (queue 0): the 4096 bytes written differ"
        ),
        "{}",
        other_image.transcript()
    );
}

/// The guest kit's NVMe reads and verify logged with `--nvme ...,requests=`, re-run against
/// the NVM command execution path alone (no VM, a fresh image) with the same statuses and read
/// data, written as `nvme_command` seeds; from another image the first read differs; a
/// corrupt log is refused before anything runs.
#[test]
fn an_nvme_request_log_reruns_on_the_command_path_alone() {
    if skip_without_kvm("an_nvme_request_log_reruns_on_the_command_path_alone") {
        return;
    }
    let scratch = Scratch::new("nvme-rerun");
    let (image, requests) = (scratch.path("nvme.img"), scratch.path("nvme.requests"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let recorded = run_sluice(
        &[
            "run".into(),
            "--memory".into(),
            "64M".into(),
            format!(
                "--nvme=path={},queues=2,requests={}",
                image.display(),
                requests.display()
            ),
            "--cmdline".into(),
            "w=nvme:op=read:bs=4096:qd=2:queues=1:ops=16 \
             w=nvme:op=verify:bs=4096:qd=4:queues=2:span_mb=1:seed=7"
                .into(),
            "--serial=off".into(),
        ],
        TIMEOUT,
    );
    assert_eq!(recorded.status, Some(0), "{}", recorded.transcript());
    std::fs::write(&image, vec![0x5au8; 16 << 20]).unwrap();
    let corpus = scratch.path("corpus");

    let rerun = replay_device(&requests, format!("--corpus={}", corpus.display()));
    let other_image = replay_device(&requests, format!("--image={}", image.display()));

    assert_eq!(rerun.status, Some(0), "{}", rerun.transcript());
    // 16 reads, the verify's 256 writes and 256 reads (a flush, if the kit sends one).
    let matched: u64 = rerun
        .stderr
        .split("device re-run matched the log: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", rerun.transcript()));
    assert!((528..=530).contains(&matched), "{}", rerun.transcript());
    let seeds = read_seeds(&corpus);
    assert!(seeds.len() > 256, "{} seeds", seeds.len());
    for seed in &seeds {
        sluice_devices::nvme::fuzz::nvme_command(seed);
    }
    assert_a_flipped_byte_is_refused(&requests, &scratch.path("corrupt.requests"));
    assert_eq!(
        other_image.status,
        Some(124),
        "{}",
        other_image.transcript()
    );
    assert!(
        other_image
            .stderr
            .contains("device re-run diverged at request #1 (queue 1): the 4096 bytes read differ"),
        "{}",
        other_image.transcript()
    );
}

#[test]
fn record_refuses_what_it_cannot_make_deterministic() {
    let scratch = Scratch::new("refuse");
    let log = scratch.path("never.log");
    let cases: [(&[&str], &str); 3] = [
        (&["--cpus", "2"], "more than one vCPU"),
        (&["--e1000", "tap=slrefused0"], "an e1000"),
        (
            &["--disk", "vhost_user=on,socket=/nonexistent/sock"],
            "a vhost-user disk",
        ),
    ];
    for (extra, why) in cases {
        let mut args = vec!["run".to_string(), format!("--record={}", log.display())];
        args.extend(extra.iter().map(|s| s.to_string()));
        let run = run_sluice(&args, TIMEOUT);
        assert_eq!(run.status, Some(125), "{}", run.transcript());
        assert!(
            run.stderr
                .contains("--record cannot make this VM deterministic")
                && run.stderr.contains(why),
            "{}",
            run.transcript()
        );
        assert!(!log.exists(), "a refused recording left a log");
    }
}

/// Logging a chain resolves buffers the device itself might not touch: behind a vIOMMU that
/// would add fault records the guest sees, so `requests=` with `--iommu` is refused.
#[test]
fn a_request_log_behind_a_viommu_is_refused() {
    if skip_without_kvm("a_request_log_behind_a_viommu_is_refused") {
        return;
    }
    let scratch = Scratch::new("rq-iommu");
    let (image, requests) = (scratch.path("disk.img"), scratch.path("disk.requests"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();

    let run = run_sluice(
        &[
            "run".into(),
            "--iommu=vtd".into(),
            format!(
                "--disk=path={},requests={}",
                image.display(),
                requests.display()
            ),
            "--cmdline".into(),
            "quiet".into(),
        ],
        TIMEOUT,
    );

    assert_eq!(run.status, Some(125), "{}", run.transcript());
    assert!(
        run.stderr
            .contains("requests= cannot be combined with --iommu"),
        "{}",
        run.transcript()
    );
    assert!(!requests.exists(), "a refused run left a request log");
}

/// Logging an NVMe command walks its data pointer again and reads a read's data back: behind a
/// vIOMMU each failed translation would be a fault record the guest sees, so it is refused.
#[test]
fn an_nvme_request_log_behind_a_viommu_is_refused() {
    if skip_without_kvm("an_nvme_request_log_behind_a_viommu_is_refused") {
        return;
    }
    let scratch = Scratch::new("nq-iommu");
    let (image, requests) = (scratch.path("nvme.img"), scratch.path("nvme.requests"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();

    let run = run_sluice(
        &[
            "run".into(),
            "--iommu=vtd".into(),
            format!(
                "--nvme=path={},requests={}",
                image.display(),
                requests.display()
            ),
            "--cmdline".into(),
            "quiet".into(),
        ],
        TIMEOUT,
    );

    assert_eq!(run.status, Some(125), "{}", run.transcript());
    assert!(
        run.stderr
            .contains("requests= cannot be combined with --iommu"),
        "{}",
        run.transcript()
    );
    assert!(!requests.exists(), "a refused run left a request log");
}

/// Every seed `sluice replay --device --corpus` wrote.
fn read_seeds(corpus: &Path) -> Vec<Vec<u8>> {
    std::fs::read_dir(corpus)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect()
}

/// A copy of the request log at `requests` with one byte flipped, written to `corrupt`, is
/// refused (125, bad checksum) before anything runs.
fn assert_a_flipped_byte_is_refused(requests: &Path, corrupt: &Path) {
    let mut bytes = std::fs::read(requests).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(corrupt, &bytes).unwrap();
    let refused = run_sluice(
        &[
            "replay".into(),
            "--device".into(),
            corrupt.display().to_string(),
        ],
        TIMEOUT,
    );
    assert_eq!(refused.status, Some(125), "{}", refused.transcript());
    assert!(
        refused.stderr.contains("checksum mismatch"),
        "{}",
        refused.transcript()
    );
}

/// `sluice replay --device LOG OPTION`: a request log re-run on the device model alone.
fn replay_device(log: &Path, option: String) -> Run {
    run_sluice(
        &[
            "replay".into(),
            "--device".into(),
            log.display().to_string(),
            option,
        ],
        TIMEOUT,
    )
}
