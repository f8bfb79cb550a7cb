//! Linux's own drivers on sluice's in-process devices, in the nested lab: Debian's cloud kernel
//! (scripts/guest-image.py: busybox, fio, the virtio modules) is the L2 guest of `sluice run`
//! inside L1 (kvm_amd under QEMU TCG, scripts/lab), where a stock kernel boots on sluice.
//!
//! - virtio-blk: fio randwrite + verify with 2 jobs on 2 vCPUs (so both of the disk's 2
//!   queues carry I/O) at QD16; the image is then checked block by block on this host
//!   (`fio::scan_image`). The check is proven to check: one byte of the image is flipped in L1
//!   and a second L2 boot's verify-only pass must fail at that block, and the same flip in the
//!   host's copy must make the scan fail.
//! - virtio-net + virtio-rng: L2 pings L1 over a tap that sluice creates and fetches a file
//!   from L1's busybox httpd (its sha256 must match), and hw_random reads from virtio-rng.
//! - live migration with virtio-net: L2 pings L1 while sluice migrates it to another process on
//!   another tap; Linux acknowledges the destination's announce request and the ping goes on.
//!
//! - packed virtqueues: the same drivers with `packed=on` on every device, in one L2 boot: the
//!   negotiated features in L2's sysfs carry VIRTIO_F_RING_PACKED (bit 34) for virtio_blk,
//!   virtio_net and virtio_rng, fio's randwrite + verify passes and the image scan finds every
//!   block, and the ping / download / hw_random checks above pass. The other tests here leave
//!   `packed` at its default (off), so they keep running split rings.
//!
//! - e1000: Debian's *generic* kernel (L1's own, which has the `e1000` module; the cloud kernel
//!   has none) boots as L2 with the module added to the guest image, on sluice's `--e1000`:
//!   the stock driver binds, reads the EEPROM (Microwire), resets through the I/O BAR, brings
//!   the link up, pings L1, downloads a file from L1 and uploads it back (so the driver's
//!   checksum and segmentation offloads go through sluice's transmit path); both copies'
//!   sha256 must match the host's.
//! - VFIO: an NVMe VF of L1 (bound to vfio-pci) assigned to L2 with `--device vfio=`: L2's
//!   own nvme driver binds to it and fio runs randwrite + crc32c verify on /dev/nvme0n1; its
//!   completions arrive as MSI-X through the irqfds VFIO signals, and the data path takes no
//!   exits (BAR pages are KVM memory slots).
//!
//! - the vIOMMU: the same kernel with `intel_iommu=on` on `--iommu vtd`: Linux finds sluice's
//!   DMAR, enables translation on the emulated VT-d and puts the virtio devices and the NVMe
//!   controller in IOMMU groups; virtio_blk and virtio_rng negotiate VIRTIO_F_ACCESS_PLATFORM
//!   (bit 33), so their DMA, like the NVMe's, goes through the unit's page tables: fio
//!   randwrite + verify passes on virtio-blk and on NVMe, both images hold every block on the
//!   host, hw_random reads, and sluice's VT-d counters show the page walks and the
//!   invalidations Linux issued, and no fault.
//! - the vIOMMU in front of an assigned VF (`--iommu vtd --device vfio=VF,dma=on-demand`):
//!   L2's nvme driver on the VF translates through sluice's VT-d, sluice keeps the host IOMMU's
//!   mappings equal to L2's tables, fio randwrite + verify passes, and the most sluice ever
//!   mapped is a small fraction of L2's RAM (printed).
//! - the virtio-iommu: `--iommu virtio` with virtio-blk and NVMe behind it, fio verify on both,
//!   sluice's virtio-iommu counting MAP requests and no fault. Debian bookworm's kernels have no
//!   CONFIG_VIRTIO_IOMMU, so L2 runs trixie's cloud kernel (scripts/viommu-kernel.sh) with its
//!   virtio_iommu and virtio_blk modules in front of the guest image.
//!
//! sluice's `--metrics` JSON from each run (written to the share) shows the queues worked:
//! requests, kicks and interrupts on every queue that should have them.
//!
//! No QEMU or no way to build the images: a SKIP line.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::backend::sluice_binary;
use common::fio::{self, FioJob};
use common::qemu::{
    kernel_cmdline, kernel_cmdline_diskless, kernel_cmdline_waiting_for, parse_exit_marker,
};
use common::{prerequisites, GuestImage, Scratch};
use sluice_lab::{Lab, LabRun, Topology, SCRATCH};

const L2_MEMORY: &str = "512M";
/// Two jobs, each writing every 4 KiB block of its own 16 MiB region once, then verifying.
const JOB: FioJob = FioJob {
    jobs: 2,
    region_mib: 16,
    io_mib: 16,
};
const DISK_BYTES: u64 = 32 << 20;
/// The byte flipped to prove the checks check: inside the data (after fio's 44-byte header)
/// of the fourth block.
const CORRUPT_BLOCK: u64 = 3;
const CORRUPT_OFFSET: u64 = CORRUPT_BLOCK * fio::BLOCK_SIZE as u64 + 1000;
/// L1 boot (~5 s), two L2 boots (~7 s each) and fio's 16 MiB of writes and reads, with room
/// for a loaded host.
const LAB_TIMEOUT: Duration = Duration::from_secs(600);
/// One sluice run in L1 (an L2 boot and its command) is stopped after this, so that a hang
/// leaves metrics and a report before [`LAB_TIMEOUT`] ends L1: the whole budget but L1's boot
/// and setup. The vIOMMU tests need it: ~190–245 s on a loaded host (docs/testing.md).
const L2_RUN_TIMEOUT: Duration = Duration::from_secs(540);
/// The same for a test that boots L2 twice.
const L2_TWO_RUNS_TIMEOUT: Duration = Duration::from_secs(270);
/// When the L2 guest image prints its interrupt and in-flight state if still running.
const L2_WATCHDOG: Duration = Duration::from_secs(150);

/// L1 shell functions: `watched NAME SECONDS COMMAND...` runs a sluice with its output in
/// `NAME.console`; one still running after SECONDS first leaves `NAME.hang` — each thread's
/// name, state, kernel wait channel and stack, the syscall it sits in and the words at its user
/// stack pointer (return addresses to look up in the binary, whose mapping is listed), plus
/// L1's kernel log — then gets SIGTERM (which writes its metrics), and SIGKILL with a second
/// report 20 s later. What a hang waits for is then on record instead of lost with L1.
const WATCHED: &str = r#"thread_dump() {
  echo "== sluice pid $1 at $(cut -d' ' -f1 /proc/uptime) s of L1 uptime"
  grep ' r-xp .*sluice' /proc/$1/maps
  for t in /proc/$1/task/*; do
    echo "-- $(cat $t/comm) tid=${t##*/} state=$(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan)"
    sc=$(cat $t/syscall); echo "syscall: $sc"
    cat $t/stack
    sp=$(echo $sc | awk '{print $(NF-1)}')
    case $sp in 0x*) dd if=/proc/$1/mem bs=8 skip=$((sp / 8)) count=256 2>/dev/null | od -An -tx8 | xargs -n 8;; esac
  done
  echo "-- L1 kernel log"; dmesg | tail -40
}
watched() {
  name=$1; limit=$2; shift 2
  "$@" > /scratch/$name.console 2>&1 &
  pid=$!
  ( sleep $limit; kill -0 $pid 2>/dev/null || exit 0
    thread_dump $pid > /scratch/$name.hang 2>&1; kill -TERM $pid; sleep 20
    kill -0 $pid 2>/dev/null || exit 0
    echo "== still running 20 s after SIGTERM" >> /scratch/$name.hang
    thread_dump $pid >> /scratch/$name.hang 2>&1; kill -KILL $pid ) &
  watcher=$!
  wait $pid; status=$?
  kill $watcher 2>/dev/null
  return $status
}"#;

struct Setup {
    sluice: PathBuf,
    image: GuestImage,
    scratch: Scratch,
    /// Each sluice run's bound ([`L2_RUN_TIMEOUT`] unless a test boots L2 more than once).
    run_timeout: Duration,
    /// sluice's `--log` filter.
    log: &'static str,
    /// L2's RAM.
    memory: &'static str,
}

fn setup(test: &str) -> Option<Setup> {
    if sluice_lab::inside_lab() {
        println!("SKIP {test}: already inside the lab");
        return None;
    }
    let image = prerequisites(test, &[])?;
    if sluice_lab::skip_without_lab(test) {
        return None;
    }
    let sluice = sluice_binary().unwrap_or_else(|e| panic!("cannot build sluice: {e}"));
    Some(Setup {
        sluice,
        image,
        scratch: Scratch::new(test),
        run_timeout: L2_RUN_TIMEOUT,
        log: "warn,sluice_virtio=info",
        memory: L2_MEMORY,
    })
}

impl Setup {
    /// An L1 shell line that boots the L2 kernel on sluice with `devices`, running
    /// `l2_command` (through the guest image's `sluice.run=`) and keeping its console and
    /// metrics in the share as `<name>.console` and `<name>.json`.
    fn sluice_line(&self, name: &str, devices: &str, cmdline: &str) -> String {
        let kernel = self.image.kernel.display().to_string();
        let initrd = self.image.initramfs.display().to_string();
        self.sluice_line_booting(name, &kernel, &initrd, devices, cmdline)
    }

    /// [`Setup::sluice_line`] with another kernel and initramfs (paths in L1). A run that hangs
    /// is stopped with SIGTERM after `run_timeout`, which still writes the metrics (each
    /// queue's unread buffers and requests in flight) and the queues' stop report (logged by
    /// sluice_virtio at info); the guest image's watchdog prints the guest's side first.
    fn sluice_line_booting(
        &self,
        name: &str,
        kernel: &str,
        initrd: &str,
        devices: &str,
        cmdline: &str,
    ) -> String {
        format!(
            "watched {name} {timeout} {sluice} --log {log} run \
             --kernel {kernel} --initrd {initrd} --memory {memory} {devices} \
             --metrics {SCRATCH}/{name}.json \
             --cmdline '{cmdline} sluice.watchdog={watchdog}'",
            timeout = self.run_timeout.as_secs(),
            log = self.log,
            memory = self.memory,
            watchdog = L2_WATCHDOG.as_secs(),
            sluice = self.sluice.display(),
        )
    }

    /// Runs `script` in a plain L1 (see [`Setup::run_on`]).
    fn run(&self, script: &str) -> LabRun {
        self.run_on(Lab::new(), script)
    }

    /// Runs `script` in `lab`'s L1 with the share and [`WATCHED`] defined; prints any hang
    /// report a stopped sluice left (captured output: it shows when the test fails).
    fn run_on(&self, lab: Lab, script: &str) -> LabRun {
        let run = lab
            .share(&self.scratch.dir)
            .timeout(LAB_TIMEOUT)
            .run(&format!("{WATCHED}\n{script}"));
        for report in self.hang_reports() {
            println!("{report}");
        }
        run
    }

    fn hang_reports(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.scratch.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "hang"))
            .map(|e| {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                format!("--- {} ---\n{text}", e.path().display())
            })
            .collect()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.scratch.path(name)).unwrap_or_default()
    }

    fn metrics(&self, name: &str) -> serde_json::Value {
        let text = self.read(name);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"))
    }
}

/// The queues of the device in `metrics` whose name starts with `prefix`.
fn device_queues<'a>(metrics: &'a serde_json::Value, prefix: &str) -> &'a Vec<serde_json::Value> {
    metrics["devices"]
        .as_array()
        .and_then(|devices| {
            devices
                .iter()
                .find(|d| d["device"].as_str().is_some_and(|n| n.starts_with(prefix)))
        })
        .and_then(|device| device["queues"].as_array())
        .unwrap_or_else(|| panic!("no {prefix} device in the metrics: {metrics:#}"))
}

fn counter(queue: &serde_json::Value, name: &str) -> u64 {
    queue[name].as_u64().unwrap_or(0)
}

/// One line per queue: what the metrics say it did.
fn print_queues(device: &str, queues: &[serde_json::Value]) {
    for (index, queue) in queues.iter().enumerate() {
        println!(
            "{device} q{index}: requests {} kicks {} interrupts {} suppressed {}",
            counter(queue, "requests"),
            counter(queue, "kicks"),
            counter(queue, "interrupts"),
            counter(queue, "notifications_suppressed"),
        );
    }
}

/// A one-line L1 shell command that replaces the byte at `offset` of `path` by its complement.
fn flip_byte_in_l1(path: &str, offset: u64) -> String {
    format!(
        "b=$(dd if={path} bs=1 skip={offset} count=1 2>/dev/null | od -An -tu1 | tr -d ' '); \
         printf \"$(printf '\\\\%03o' $((255 - b)))\" | dd of={path} bs=1 seek={offset} conv=notrunc 2>/dev/null"
    )
}

fn flip_byte_on_host(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the image");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).expect("read a byte");
    file.write_all_at(&[!byte[0]], offset)
        .expect("write a byte");
}

#[test]
fn lab_fio_verify_on_sluice_virtio_blk() {
    let test = "lab-fio-verify";
    let Some(mut setup) = setup(test) else { return };
    setup.run_timeout = L2_TWO_RUNS_TIMEOUT;
    let devices = "--cpus 2 --disk path=/tmp/disk.img,queues=2";
    let mut script = String::from("set -u\n");
    writeln!(script, "truncate -s {DISK_BYTES} /tmp/disk.img").unwrap();
    let write = kernel_cmdline(&JOB.randwrite_command());
    writeln!(script, "{}", setup.sluice_line("write", devices, &write)).unwrap();
    writeln!(script, "echo sluice-write-exit=$?").unwrap();
    writeln!(script, "cp /tmp/disk.img {SCRATCH}/disk.img").unwrap();
    writeln!(
        script,
        "{}",
        flip_byte_in_l1("/tmp/disk.img", CORRUPT_OFFSET)
    )
    .unwrap();
    let verify = kernel_cmdline(&JOB.verify_only_command());
    writeln!(script, "{}", setup.sluice_line("verify", devices, &verify)).unwrap();
    writeln!(script, "echo sluice-verify-exit=$?").unwrap();

    let run = setup.run(&script);

    run.assert_success();
    let write_console = setup.read("write.console");
    let context = || {
        format!(
            "{}\n--- L2 (write) ---\n{write_console}\n--- metrics ---\n{}",
            run.transcript(),
            setup.read("write.json")
        )
    };
    assert!(run.stdout.contains("sluice-write-exit=0"), "{}", context());
    assert_eq!(parse_exit_marker(&write_console), Some(0), "{}", context());
    assert_eq!(
        fio::hardware_queues(&write_console),
        Some(2),
        "{}",
        context()
    );
    assert_blk_queues_worked(&setup.metrics("write.json"));
    assert_image_holds_every_block(&setup.scratch.path("disk.img"));
    let verify_console = setup.read("verify.console");
    assert_verify_fails_at_the_flipped_block(&verify_console);
    println!(
        "{test}: fio wrote and verified {} MiB on 2 queues; the flipped byte failed L2's verify",
        DISK_BYTES >> 20
    );
}

/// Linux's `nvme` driver (built into the cloud kernel) on sluice's emulated NVMe: the same fio
/// randwrite + verify on 2 I/O queues at QD16 as on virtio-blk, the image scanned on the host
/// block by block; the driver set up shadow doorbells, so most submissions rang no trapped
/// doorbell.
#[test]
#[ignore = "hangs in 2 of 3 runs on 2026-12-07's merged tree (L2 stops right after fio's \
            'Starting 2 processes', sluice never writes its metrics): under investigation, \
            see the closing note; run with --ignored"]
fn lab_fio_verify_on_sluice_nvme() {
    let test = "lab-fio-verify-nvme";
    let Some(setup) = setup(test) else { return };
    let devices = "--cpus 2 --nvme path=/tmp/disk.img,queues=2";
    let mut script = String::from("set -u\n");
    writeln!(script, "truncate -s {DISK_BYTES} /tmp/disk.img").unwrap();
    let write = kernel_cmdline_waiting_for("/dev/nvme0n1", &JOB.randwrite_command_on("nvme0n1"));
    writeln!(script, "{}", setup.sluice_line("write", devices, &write)).unwrap();
    writeln!(script, "echo sluice-write-exit=$?").unwrap();
    writeln!(script, "cp /tmp/disk.img {SCRATCH}/disk.img").unwrap();

    let run = setup.run(&script);

    run.assert_success();
    let console = setup.read("write.console");
    let context = || format!("{}\n--- L2 ---\n{console}", run.transcript());
    assert!(run.stdout.contains("sluice-write-exit=0"), "{}", context());
    assert_eq!(parse_exit_marker(&console), Some(0), "{}", context());
    assert_eq!(fio::hardware_queues(&console), Some(2), "{}", context());
    let metrics = setup.metrics("write.json");
    let queues = device_queues(&metrics, "nvme");
    print_queues("nvme", queues);
    let io_requests: u64 = queues.iter().skip(1).map(|q| counter(q, "requests")).sum();
    let blocks = DISK_BYTES / fio::BLOCK_SIZE as u64;
    assert!(
        io_requests >= 2 * blocks,
        "{io_requests} I/O commands: {metrics:#}"
    );
    let counters = &metrics["devices"]
        .as_array()
        .and_then(|d| {
            d.iter()
                .find(|d| d["device"].as_str().is_some_and(|n| n.starts_with("nvme")))
        })
        .expect("the nvme device")["counters"];
    let sq_exits = counters["exits_sq_doorbells"].as_u64().unwrap_or(u64::MAX);
    println!("{test}: {io_requests} I/O commands, {sq_exits} trapped SQ doorbell writes");
    assert!(
        sq_exits * 10 < io_requests,
        "shadow doorbells unused: {metrics:#}"
    );
    let scan = fio::scan_image(&setup.scratch.path("disk.img")).expect("read the image");
    assert_eq!(scan.bad_count, 0, "bad blocks: {:?}", scan.bad);
    assert_eq!(scan.fio_blocks, blocks, "{scan:?}");
}

fn assert_blk_queues_worked(metrics: &serde_json::Value) {
    assert_blk_queues_worked_on(metrics, DISK_BYTES);
}

/// [`assert_blk_queues_worked`] for a disk of `disk_bytes`.
fn assert_blk_queues_worked_on(metrics: &serde_json::Value, disk_bytes: u64) {
    let queues = device_queues(metrics, "blk");
    print_queues("blk", queues);
    assert_eq!(queues.len(), 2, "{metrics:#}");
    let blocks = disk_bytes / fio::BLOCK_SIZE as u64;
    let requests: u64 = queues.iter().map(|q| counter(q, "requests")).sum();
    // Every block is written once and read back once (plus the kernel's partition scan).
    assert!(requests >= 2 * blocks, "{requests} requests: {metrics:#}");
    for queue in queues {
        for name in ["requests", "kicks", "interrupts"] {
            assert!(counter(queue, name) > 0, "{name} on a queue: {metrics:#}");
        }
    }
}

fn assert_image_holds_every_block(image: &Path) {
    assert_image_of_size_holds_every_block(image, DISK_BYTES);
}

/// [`assert_image_holds_every_block`] for an image of `disk_bytes`.
fn assert_image_of_size_holds_every_block(image: &Path, disk_bytes: u64) {
    let scan = fio::scan_image(image).expect("read the image");
    assert_eq!(scan.bad_count, 0, "bad blocks: {:?}", scan.bad);
    assert_eq!(
        scan.fio_blocks,
        disk_bytes / fio::BLOCK_SIZE as u64,
        "{scan:?}"
    );
    // The check checks: one flipped byte is one bad block, at its offset.
    flip_byte_on_host(image, CORRUPT_OFFSET);
    let scan = fio::scan_image(image).expect("read the image");
    let bad_offsets: Vec<u64> = scan.bad.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(
        bad_offsets,
        [CORRUPT_BLOCK * fio::BLOCK_SIZE as u64],
        "{scan:?}"
    );
}

fn assert_verify_fails_at_the_flipped_block(console: &str) {
    let status = parse_exit_marker(console);
    assert!(
        status.is_some_and(|s| s != 0),
        "fio's verify-only pass ({status:?}) did not fail on the flipped byte\n{console}"
    );
    let expected = format!(
        "verify failed at file /dev/vda offset {}",
        CORRUPT_BLOCK * fio::BLOCK_SIZE as u64
    );
    assert!(console.contains(&expected), "no {expected:?}\n{console}");
}

/// 4 MiB that L2 fetches from L1 over the tap.
const BLOB_BYTES: usize = 4 << 20;
const L1_ADDRESS: &str = "10.77.0.1";
const L2_ADDRESS: &str = "10.77.0.2";

/// L2's network and hw_random checks: ping L1, fetch the blob from L1's httpd, read 4 KiB
/// from hw_random (`assert_net_and_rng_worked` reads what they print).
fn net_and_rng_checks_in_l2() -> String {
    format!(
        "ip link set eth0 up && ip addr add {L2_ADDRESS}/24 dev eth0; \
         ping -c 3 -W 5 {L1_ADDRESS}; \
         timeout 60 wget -q -O /tmp/blob http://{L1_ADDRESS}:8080/blob && sha256sum /tmp/blob; \
         echo rng-current=$(cat /sys/class/misc/hw_random/rng_current); \
         dd if=/dev/hwrng of=/tmp/random bs=512 count=8 2>/dev/null; \
         echo rng-bytes=$(wc -c < /tmp/random) rng-head=$(od -An -tx1 -N16 /tmp/random | tr -d ' ')"
    )
}

/// The L1 script around `sluice` (which creates tap lab0): L1 serves the share's blob over
/// httpd, gives the tap its address once it exists and waits for sluice; `before` and `after`
/// run around that.
fn l1_script_with_tap(before: &str, sluice: &str, after: &str) -> String {
    format!(
        "set -u\n\
         {before}\n\
         mkdir -p /tmp/www && cp {SCRATCH}/blob /tmp/www/blob && httpd -p 8080 -h /tmp/www\n\
         {sluice} &\n\
         pid=$!\n\
         i=0; while [ ! -e /sys/class/net/lab0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done\n\
         ip addr add {L1_ADDRESS}/24 dev lab0 && ip link set lab0 up\n\
         wait $pid\n\
         echo sluice-exit=$?\n\
         {after}\n"
    )
}

/// What `net_and_rng_checks_in_l2` must have printed on L2's console.
fn assert_net_and_rng_worked(console: &str, blob: &Path, context: &dyn Fn() -> String) {
    assert!(
        console.contains("3 packets transmitted, 3 packets received"),
        "{}",
        context()
    );
    let digest = sha256_hex(blob);
    assert!(
        console.contains(&format!("{digest}  /tmp/blob")),
        "L2 did not fetch the blob intact (sha256 {digest})\n{}",
        context()
    );
    assert!(console.contains("rng-current=virtio_rng"), "{}", context());
    assert!(console.contains("rng-bytes=4096"), "{}", context());
    assert!(
        !console.contains("rng-head=00000000000000000000000000000000"),
        "{}",
        context()
    );
}

#[test]
fn lab_virtio_net_and_rng_drivers_on_sluice() {
    let test = "lab-net-rng";
    let Some(setup) = setup(test) else { return };
    let blob = pseudo_random_bytes(BLOB_BYTES);
    std::fs::write(setup.scratch.path("blob"), &blob).expect("write the blob");
    let l2 = net_and_rng_checks_in_l2();
    let sluice = setup.sluice_line("net", "--net tap=lab0 --rng", &kernel_cmdline_diskless(&l2));
    let script = l1_script_with_tap("", &sluice, "");

    let run = setup.run(&script);

    run.assert_success();
    let console = setup.read("net.console");
    let context = || format!("{}\n--- L2 ---\n{console}", run.transcript());
    assert!(run.stdout.contains("sluice-exit=0"), "{}", context());
    assert_eq!(parse_exit_marker(&console), Some(0), "{}", context());
    assert_net_and_rng_worked(&console, &setup.scratch.path("blob"), &context);
    assert_net_and_rng_queues_worked(&setup.metrics("net.json"));
    println!("{test}: ping, a 4 MiB download and 4 KiB from hw_random through sluice's devices");
}

fn assert_net_and_rng_queues_worked(metrics: &serde_json::Value) {
    let net = device_queues(metrics, "net");
    print_queues("net", net);
    // Queue 0 receives, queue 1 transmits: both carried frames and raised interrupts.
    for queue in &net[..2] {
        for name in ["requests", "interrupts"] {
            assert!(counter(queue, name) > 0, "net {name}: {metrics:#}");
        }
    }
    assert!(counter(&net[1], "kicks") > 0, "net tx kicks: {metrics:#}");
    let rng = device_queues(metrics, "rng");
    print_queues("rng", rng);
    for name in ["requests", "kicks", "interrupts"] {
        assert!(counter(&rng[0], name) > 0, "rng {name}: {metrics:#}");
    }
}

/// Bit 34 of the virtio feature bits (virtio 1.2 §6).
const VIRTIO_F_RING_PACKED: usize = 34;

#[test]
fn lab_packed_virtqueues_blk_net_rng_on_sluice() {
    let test = "lab-packed";
    let Some(setup) = setup(test) else { return };
    let blob = pseudo_random_bytes(BLOB_BYTES);
    std::fs::write(setup.scratch.path("blob"), &blob).expect("write the blob");
    // Features first (sysfs: one character per bit, bit 0 first), then the network and
    // hw_random checks, then fio, whose status ends the command.
    let l2 = format!(
        "for d in /sys/bus/virtio/devices/virtio*; do \
         echo virtio-features $(cat $d/device) $(cat $d/features); done; \
         {checks}; {fio}",
        checks = net_and_rng_checks_in_l2(),
        fio = JOB.randwrite_command(),
    );
    let devices = "--cpus 2 --disk path=/tmp/disk.img,queues=2,packed=on \
                   --net tap=lab0,packed=on --rng=packed=on";
    let sluice = setup.sluice_line("packed", devices, &kernel_cmdline(&l2));
    let script = l1_script_with_tap(
        &format!("truncate -s {DISK_BYTES} /tmp/disk.img"),
        &sluice,
        &format!("cp /tmp/disk.img {SCRATCH}/disk.img"),
    );

    let run = setup.run(&script);

    run.assert_success();
    let console = setup.read("packed.console");
    let context = || format!("{}\n--- L2 ---\n{console}", run.transcript());
    assert!(run.stdout.contains("sluice-exit=0"), "{}", context());
    let packed = packed_ring_negotiated(&console);
    for device in ["0x0001", "0x0002", "0x0004"] {
        assert_eq!(
            packed.get(device),
            Some(&true),
            "device {device}: VIRTIO_F_RING_PACKED not negotiated ({packed:?})\n{}",
            context()
        );
    }
    assert_eq!(parse_exit_marker(&console), Some(0), "{}", context());
    assert_eq!(fio::hardware_queues(&console), Some(2), "{}", context());
    assert_net_and_rng_worked(&console, &setup.scratch.path("blob"), &context);
    let metrics = setup.metrics("packed.json");
    assert_blk_queues_worked(&metrics);
    assert_net_and_rng_queues_worked(&metrics);
    assert_image_holds_every_block(&setup.scratch.path("disk.img"));
    println!(
        "{test}: packed rings negotiated by virtio_blk, virtio_net and virtio_rng; fio wrote and \
         verified {} MiB on 2 queues, ping, a 4 MiB download and hw_random worked",
        DISK_BYTES >> 20
    );
}

/// fio for the migration test: random writes for a fixed time, each batch of 256 blocks read
/// back and verified as it goes (`--verify_backlog`), two jobs on their own 32 MiB regions. A
/// fixed run time, not a fixed amount: the debug-build sluice in L1 (QEMU TCG) sends guest RAM
/// at ~3 MB/s (round 0 of ~50 000 pages takes ~70 s), and the migration must land well inside
/// the job whatever the load. Every block is written many times over (a pass takes ~30 s).
fn migration_fio_command() -> String {
    format!(
        "fio --name=sluice --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
         --bs={block} --iodepth=16 --numjobs=2 --size=32M --offset_increment=32M \
         --time_based --runtime={MIGRATION_FIO_SECONDS} --verify=crc32c --verify_backlog=256 \
         --verify_fatal=1 --cpus_allowed=0-1 --cpus_allowed_policy=split --eta=never \
         --group_reporting",
        block = fio::BLOCK_SIZE,
    )
}
const MIGRATION_FIO_SECONDS: u32 = 150;
const MIGRATION_DISK_BYTES: u64 = 64 << 20;
/// Less RAM to send in round 0 than [`L2_MEMORY`] (Linux left ~200 MB of it non-zero).
const MIGRATION_L2_MEMORY: &str = "256M";
/// Both ends log the migration's rounds and the destination's resume.
const MIGRATION_LOG: &str =
    "warn,sluice_virtio=info,sluice_vmm::migration=info,sluice_vmm::machine=info";
/// Seconds from the L2 command's start (fio's own start takes ~1 s) to the migration.
const MIGRATE_AFTER_S: u32 = 4;

/// Issue 15: Linux in L2 keeps writing and verifying with fio while sluice migrates it from one
/// process to another in L1 (`sluice ctl migrate` to `sluice run --migrate-from`): the
/// destination finishes the job with no verify error and the image holds every block.
#[test]
fn lab_live_migration_of_linux_under_fio_verify() {
    let test = "lab-migration";
    let Some(mut setup) = setup(test) else { return };
    setup.log = MIGRATION_LOG;
    setup.memory = MIGRATION_L2_MEMORY;
    let disk = "--disk path=/tmp/disk.img,queues=2";
    let source = setup.sluice_line(
        "source",
        &format!("--cpus 2 {disk} --api-socket /tmp/api.sock"),
        &kernel_cmdline(&migration_fio_command()),
    );
    let sluice = setup.sluice.display();
    let timeout = setup.run_timeout.as_secs();
    let script = format!(
        "set -u\n\
         truncate -s {MIGRATION_DISK_BYTES} /tmp/disk.img\n\
         ({source}; echo source-exit=$? > /tmp/source.status) &\n\
         i=0; while [ $i -lt 600 ] && ! grep -q SLUICE-RUN-START {SCRATCH}/source.console; \
           do sleep 0.2; i=$((i+1)); done\n\
         sleep {MIGRATE_AFTER_S}\n\
         (timeout -s TERM {timeout} {sluice} --log {MIGRATION_LOG} run {disk} \
           --migrate-from unix:/tmp/migrate.sock --metrics {SCRATCH}/destination.json \
           > {SCRATCH}/destination.console 2>&1; echo destination-exit=$? > /tmp/destination.status) &\n\
         i=0; while [ $i -lt 100 ] && [ ! -S /tmp/migrate.sock ]; do sleep 0.1; i=$((i+1)); done\n\
         echo MIGRATE $({sluice} ctl --api-socket /tmp/api.sock migrate unix:/tmp/migrate.sock)\n\
         wait\n\
         cat /tmp/source.status /tmp/destination.status\n\
         cp /tmp/disk.img {SCRATCH}/disk.img\n"
    );

    let run = setup.run(&script);

    run.assert_success();
    let source_console = setup.read("source.console");
    let destination_console = setup.read("destination.console");
    let context = || {
        format!(
            "{}\n--- source ---\n{source_console}\n--- destination ---\n{destination_console}",
            run.transcript()
        )
    };
    assert!(run.stdout.contains("source-exit=0"), "{}", context());
    assert!(run.stdout.contains("destination-exit=0"), "{}", context());
    let report: serde_json::Value = run
        .stdout
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix("MIGRATE ")?).ok())
        .unwrap_or_else(|| panic!("no migration report\n{}", context()));
    assert!(
        report["total_ms"].is_number() && report["downtime_ms"].is_number(),
        "{report}\n{}",
        context()
    );
    // fio's output is block-buffered on the console: all of it comes out when the job ends.
    assert!(
        source_console.contains("SLUICE-RUN-START") && !source_console.contains("groupid="),
        "the migration happened while fio ran\n{}",
        context()
    );
    assert!(destination_console.contains("err= 0"), "{}", context());
    assert_eq!(
        parse_exit_marker(&destination_console),
        Some(0),
        "fio finished at the destination with verify ok\n{}",
        context()
    );
    assert_image_of_size_holds_every_block(&setup.scratch.path("disk.img"), MIGRATION_DISK_BYTES);
    println!(
        "{test}: Linux under fio verify migrated: total {} ms, downtime {} ms, {} rounds, {} \
         pages, throttle {}%",
        report["total_ms"],
        report["downtime_ms"],
        report["rounds"],
        report["pages_sent"],
        report["throttle_percent"]
    );
}

/// Pings L2 sends across the net migration (one a second; the migration's round 0 takes
/// ~70 s in L1).
const NET_MIGRATION_PINGS: u32 = 150;
const NET_MIGRATION_MAC: &str = "52:54:00:12:34:56";

/// Issue 15: Linux's virtio_net in L2 pings L1 once a second over the source's tap while sluice
/// live-migrates it to a second `sluice run --migrate-from` on another tap (L1's address and
/// MAC move to that tap once the source is gone, as a host's bridge port would). The destination asks the driver to announce itself
/// (GUEST_ANNOUNCE, on the control queue sluice offers): Linux sends its gratuitous ARP and acks
/// (`announce_acks` in the destination's metrics), and the ping goes on from the destination;
/// the loss is counted and printed.
#[test]
fn lab_linux_net_live_migrated_announces_itself_and_keeps_pinging() {
    let test = "lab-net-migration";
    let Some(mut setup) = setup(test) else { return };
    setup.log = MIGRATION_LOG;
    setup.memory = MIGRATION_L2_MEMORY;
    let l2 = format!(
        "ip link set eth0 up && ip addr add {L2_ADDRESS}/24 dev eth0; \
         ping -c {NET_MIGRATION_PINGS} -W 1 {L1_ADDRESS}"
    );
    let source = setup.sluice_line(
        "source",
        &format!("--net tap=lab0,mac={NET_MIGRATION_MAC} --api-socket /tmp/api.sock"),
        &kernel_cmdline(&l2),
    );
    let sluice = setup.sluice.display();
    let timeout = setup.run_timeout.as_secs();
    let script = format!(
        "set -u\n\
         ({source}; echo source-exit=$? > /tmp/source.status) &\n\
         i=0; while [ ! -e /sys/class/net/lab0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n\
         ip addr add {L1_ADDRESS}/24 dev lab0 && ip link set lab0 up\n\
         l1_mac=$(cat /sys/class/net/lab0/address)\n\
         i=0; while [ $i -lt 600 ] && ! grep -q 'seq=5 ' {SCRATCH}/source.console; \
           do sleep 0.2; i=$((i+1)); done\n\
         (timeout -s TERM {timeout} {sluice} --log {MIGRATION_LOG} run \
           --net tap=lab1,mac={NET_MIGRATION_MAC} \
           --migrate-from unix:/tmp/migrate.sock --metrics {SCRATCH}/destination.json \
           > {SCRATCH}/destination.console 2>&1; echo destination-exit=$? > /tmp/destination.status) &\n\
         i=0; while [ $i -lt 100 ] && [ ! -S /tmp/migrate.sock ]; do sleep 0.1; i=$((i+1)); done\n\
         echo MIGRATE $({sluice} ctl --api-socket /tmp/api.sock migrate unix:/tmp/migrate.sock)\n\
         i=0; while [ $i -lt 300 ] && [ ! -e /tmp/source.status ]; do sleep 0.1; i=$((i+1)); done\n\
         i=0; while [ ! -e /sys/class/net/lab1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n\
         ip link set lab1 down; ip link set lab1 address $l1_mac\n\
         ip addr add {L1_ADDRESS}/24 dev lab1 && ip link set lab1 up\n\
         wait\n\
         cat /tmp/source.status /tmp/destination.status\n"
    );

    let run = setup.run(&script);

    run.assert_success();
    let source_console = setup.read("source.console");
    let destination_console = setup.read("destination.console");
    let context = || {
        format!(
            "{}\n--- source ---\n{source_console}\n--- destination ---\n{destination_console}",
            run.transcript()
        )
    };
    assert!(run.stdout.contains("source-exit=0"), "{}", context());
    assert!(run.stdout.contains("destination-exit=0"), "{}", context());
    let report: serde_json::Value = run
        .stdout
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix("MIGRATE ")?).ok())
        .unwrap_or_else(|| panic!("no migration report\n{}", context()));
    let before = ping_replies(&source_console).last().copied().unwrap_or(0);
    let first_after = ping_replies(&destination_console).first().copied();
    assert!(
        first_after.is_some_and(|seq| seq > before),
        "replies reached L2 at the destination (last seq {before} at the source, first after \
         {first_after:?})\n{}",
        context()
    );
    let summary = destination_console
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary\n{}", context()));
    let metrics = setup.metrics("destination.json");
    let counters = metrics["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|d| d["device"] == "net"))
        .map(|device| device["counters"].clone())
        .unwrap_or_else(|| panic!("no net device in {metrics}"));
    println!(
        "{test}: Linux pinging L1 migrated: total {} ms, downtime {} ms, {} rounds, {} pages; \
         ping: {summary}, last reply at the source seq {before}, first at the destination \
         seq {}; destination net counters {counters}",
        report["total_ms"],
        report["downtime_ms"],
        report["rounds"],
        report["pages_sent"],
        first_after.unwrap_or_default()
    );
    assert_eq!(
        counters["announce_requests"],
        1,
        "{counters}\n{}",
        context()
    );
    assert_eq!(
        counters["announce_acks"],
        1,
        "Linux acknowledged the announce request\n{}",
        context()
    );
}

/// VIRTIO_F_ACCESS_PLATFORM: the driver uses the DMA API (IOVAs) for this device.
const VIRTIO_F_ACCESS_PLATFORM: usize = 33;

#[test]
fn lab_vtd_viommu_fio_verify_on_virtio_blk_and_nvme() {
    let test = "lab-vtd";
    let Some(setup) = setup(test) else { return };
    // What the IOMMU layer reported, the negotiated features, the groups, hw_random, then fio,
    // whose status ends the command.
    let l2 = format!(
        "dmesg | grep -e DMAR -e iommu -e IOMMU; \
         grep -e IR- -e DMAR /proc/interrupts; \
         for d in /sys/bus/virtio/devices/virtio*; do \
         echo virtio-features $(cat $d/device) $(cat $d/features); done; \
         for g in /sys/kernel/iommu_groups/*/devices/*; do echo iommu-group $g; done; \
         echo rng-current=$(cat /sys/class/misc/hw_random/rng_current); \
         dd if=/dev/hwrng of=/tmp/random bs=512 count=8 2>/dev/null; \
         echo rng-bytes=$(wc -c < /tmp/random); \
         i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done; \
         ({nvme_fio}); echo nvme-fio-status=$?; {fio}",
        nvme_fio = IOMMU_JOB.randwrite_command_on("nvme0n1"),
        fio = IOMMU_JOB.randwrite_command(),
    );
    let devices = "--cpus 2 --iommu vtd --disk path=/tmp/disk.img,queues=2 --rng \
                   --nvme path=/tmp/nvme.img,queues=2";
    let cmdline = format!("{} intel_iommu=on", kernel_cmdline(&l2));
    let mut script = String::from("set -u\n");
    writeln!(script, "truncate -s {IOMMU_DISK_BYTES} /tmp/disk.img").unwrap();
    writeln!(script, "truncate -s {IOMMU_DISK_BYTES} /tmp/nvme.img").unwrap();
    writeln!(script, "{}", setup.sluice_line("vtd", devices, &cmdline)).unwrap();
    writeln!(script, "echo sluice-exit=$?").unwrap();
    writeln!(script, "cp /tmp/disk.img /tmp/nvme.img {SCRATCH}/").unwrap();

    let run = setup.run(&script);

    run.assert_success();
    let console = setup.read("vtd.console");
    let context = || format!("{}\n--- L2 ---\n{console}", run.transcript());
    assert!(run.stdout.contains("sluice-exit=0"), "{}", context());
    assert!(
        console.contains("DMAR: Host address width 39"),
        "{}",
        context()
    );
    assert!(
        console.contains("DMAR: DRHD base: 0x000000fed90000 flags: 0x1"),
        "{}",
        context()
    );
    assert!(
        console.contains("DMAR: Intel(R) Virtualization Technology for Directed I/O"),
        "translation enabled\n{}",
        context()
    );
    // Interrupt remapping (on by default with `--iommu vtd`): Linux finds the IOAPIC in the
    // DMAR's scope, enables remapping, and its MSI-X vectors are on the IR-PCI-MSI chip (named
    // IR-PCI-MSIX-<bdf> by newer kernels); the IOAPIC pins (the console on IRQ 4, which carried
    // all of this output) are IR-IO-APIC.
    assert!(
        console.contains("DMAR-IR: Enabled IRQ remapping in xapic mode")
            || console.contains("DMAR-IR: Enabled IRQ remapping in x2apic mode"),
        "interrupt remapping enabled\n{}",
        context()
    );
    assert!(console.contains("IR-PCI-MSI"), "{}", context());
    assert!(console.contains("IR-IO-APIC"), "{}", context());
    let grouped = console
        .lines()
        .filter(|l| l.starts_with("iommu-group /sys/kernel/iommu_groups/"))
        .count();
    assert!(
        grouped >= 3,
        "virtio-blk, virtio-rng and the NVMe in groups\n{}",
        context()
    );
    let features = feature_bit_negotiated(&console, VIRTIO_F_ACCESS_PLATFORM);
    for device in ["0x0002", "0x0004"] {
        assert_eq!(
            features.get(device),
            Some(&true),
            "device {device}: VIRTIO_F_ACCESS_PLATFORM not negotiated ({features:?})\n{}",
            context()
        );
    }
    assert!(console.contains("rng-current=virtio_rng"), "{}", context());
    assert!(console.contains("rng-bytes=4096"), "{}", context());
    assert!(console.contains("nvme-fio-status=0"), "{}", context());
    assert_eq!(parse_exit_marker(&console), Some(0), "{}", context());
    let metrics = setup.metrics("vtd.json");
    assert_blk_queues_worked_on(&metrics, IOMMU_DISK_BYTES);
    assert_image_of_size_holds_every_block(&setup.scratch.path("disk.img"), IOMMU_DISK_BYTES);
    assert_image_of_size_holds_every_block(&setup.scratch.path("nvme.img"), IOMMU_DISK_BYTES);
    let nvme_queues = device_queues(&metrics, "nvme");
    print_queues("nvme", nvme_queues);
    let nvme_io: u64 = nvme_queues
        .iter()
        .skip(1)
        .map(|q| counter(q, "requests"))
        .sum();
    let blocks = IOMMU_DISK_BYTES / fio::BLOCK_SIZE as u64;
    assert!(
        nvme_io >= 2 * blocks,
        "{nvme_io} NVMe I/O commands: {metrics:#}"
    );
    for line in console
        .lines()
        .filter(|l| l.contains("DMAR") || l.contains("iommu"))
    {
        println!("{test}: L2: {}", line.trim());
    }
    let vtd = vtd_counters(&metrics);
    println!("{test}: vt-d counters {vtd}");
    for name in [
        "walks",
        "context_invalidations",
        "iotlb_invalidations",
        "queue_descriptors",
    ] {
        assert!(vtd[name].as_u64().unwrap_or(0) > 0, "{name}: {metrics:#}");
    }
    assert_eq!(vtd["faults"].as_u64(), Some(0), "{metrics:#}");
    for name in ["interrupts_remapped", "interrupt_entry_invalidations"] {
        assert!(vtd[name].as_u64().unwrap_or(0) > 0, "{name}: {metrics:#}");
    }
    assert_eq!(vtd["interrupt_faults"].as_u64(), Some(0), "{metrics:#}");
    println!(
        "{test}: Linux enabled translation and interrupt remapping on sluice's VT-d; fio wrote \
         and verified {} MiB on virtio-blk and on NVMe behind it, hw_random read 4 KiB",
        IOMMU_DISK_BYTES >> 20
    );
}

/// Overrides the directory `scripts/viommu-kernel.sh` gives (vmlinuz, virtio_iommu.ko,
/// virtio_blk.ko).
const VIOMMU_KERNEL_VAR: &str = "SLUICE_LAB_VIOMMU_KERNEL";
const VIOMMU_KERNEL_TIMEOUT: Duration = Duration::from_secs(300);
/// A quarter of [`JOB`] per disk behind a vIOMMU: with virtio-iommu every I/O is a MAP and an
/// UNMAP request on the IOMMU's queue, with the VT-d (strict flushing under caching mode) two
/// queued invalidations; L2 on a loaded host took ~3 min for [`JOB`] on one disk (2026-12-07),
/// which made the VT-d test 190–245 s and the virtio-iommu one not fit the lab's 600 s.
const IOMMU_JOB: FioJob = FioJob {
    jobs: 2,
    region_mib: 4,
    io_mib: 4,
};
const IOMMU_DISK_BYTES: u64 = 8 << 20;

/// The L2 kernel for `--iommu virtio` and its two modules: Debian bookworm's 6.1 kernels (the
/// guest image's cloud kernel, L1's generic one) are built with `# CONFIG_VIRTIO_IOMMU is not
/// set`, so `scripts/viommu-kernel.sh` fetches trixie's cloud kernel (6.12: VIRTIO_IOMMU=m,
/// ACPI_VIOT=y, virtio-pci and NVMe built in). `None` (after a SKIP line) if it cannot.
fn viommu_kernel(test: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(VIOMMU_KERNEL_VAR) {
        return Some(PathBuf::from(dir));
    }
    let script = common::repo_root().join("scripts/viommu-kernel.sh");
    match common::run_with_timeout(
        std::process::Command::new("sh").arg(&script),
        VIOMMU_KERNEL_TIMEOUT,
        "viommu-kernel.sh",
    ) {
        Ok(output) => Some(PathBuf::from(output.trim())),
        Err(reason) => {
            println!("SKIP {test}: no L2 kernel with virtio-iommu: {reason}");
            None
        }
    }
}

/// Puts the virtio-iommu kernel and an initramfs (its two modules, then the guest image) in
/// the share as `viommu.vmlinuz` and `viommu.initrd`.
fn stage_viommu_kernel(dir: &Path, setup: &Setup) {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()))
    };
    let (iommu, blk) = (read("virtio_iommu.ko"), read("virtio_blk.ko"));
    // An uncompressed archive first, then the guest image's gzip one: the kernel unpacks both.
    let mut initrd = newc_archive(&[
        ("sluice/extra/virtio_iommu.ko", &iommu),
        ("sluice/extra/virtio_blk.ko", &blk),
    ]);
    initrd.extend(std::fs::read(&setup.image.initramfs).expect("read the guest image"));
    std::fs::write(setup.scratch.path("viommu.initrd"), initrd).expect("write the L2 initrd");
    std::fs::copy(dir.join("vmlinuz"), setup.scratch.path("viommu.vmlinuz"))
        .expect("copy the L2 kernel");
}

/// Linux's virtio-iommu driver on sluice's `--iommu virtio`: it finds the VIOT, probes the
/// device (input range and page mask from its config space), puts virtio-blk and the NVMe
/// controller in IOMMU groups, and their DMA then goes through MAP requests: fio randwrite +
/// verify passes on both disks, both images hold every block on the host, and sluice's
/// virtio-iommu counted the ATTACH, PROBE and MAP requests and no fault.
#[test]
fn lab_virtio_iommu_fio_verify_on_virtio_blk_and_nvme() {
    let test = "lab-virtio-iommu";
    let Some(setup) = setup(test) else { return };
    let Some(kernel_dir) = viommu_kernel(test) else {
        return;
    };
    stage_viommu_kernel(&kernel_dir, &setup);
    // The guest image's own modules are 6.1's: its init fails to load them, harmlessly
    // (virtio-pci is built into this kernel). The IOMMU driver goes first; the endpoints that
    // probed before it (the NVMe) were deferred until it registered.
    let l2 = format!(
        "insmod /sluice/extra/virtio_iommu.ko; insmod /sluice/extra/virtio_blk.ko; \
         i=0; while {{ [ ! -b /dev/vda ] || [ ! -b /dev/nvme0n1 ]; }} && [ $i -lt 200 ]; do \
         sleep 0.1; i=$((i + 1)); done; \
         dmesg | grep -i -e virtio_iommu -e viot -e iommu; \
         for d in /sys/bus/virtio/devices/virtio*; do \
         echo virtio-features $(cat $d/device) $(cat $d/features); done; \
         for g in /sys/kernel/iommu_groups/*/devices/*; do echo iommu-group $g; done; \
         ({nvme_fio}); echo nvme-fio-status=$?; {fio}",
        nvme_fio = IOMMU_JOB.randwrite_command_on("nvme0n1"),
        fio = IOMMU_JOB.randwrite_command(),
    );
    let devices = "--cpus 2 --iommu virtio --disk path=/tmp/disk.img,queues=2 \
                   --nvme path=/tmp/nvme.img,queues=2";
    let mut script = String::from("set -u\n");
    writeln!(script, "truncate -s {IOMMU_DISK_BYTES} /tmp/disk.img").unwrap();
    writeln!(script, "truncate -s {IOMMU_DISK_BYTES} /tmp/nvme.img").unwrap();
    let line = setup.sluice_line_booting(
        "viommu",
        &format!("{SCRATCH}/viommu.vmlinuz"),
        &format!("{SCRATCH}/viommu.initrd"),
        devices,
        &kernel_cmdline_diskless(&l2),
    );
    writeln!(script, "{line}").unwrap();
    writeln!(script, "echo sluice-exit=$?").unwrap();
    writeln!(script, "cp /tmp/disk.img /tmp/nvme.img {SCRATCH}/").unwrap();

    let run = setup.run(&script);

    run.assert_success();
    let console = setup.read("viommu.console");
    let context = || format!("{}\n--- L2 ---\n{console}", run.transcript());
    assert!(run.stdout.contains("sluice-exit=0"), "{}", context());
    assert!(
        console.contains("input address: 48 bits"),
        "virtio_iommu probed the device\n{}",
        context()
    );
    assert!(
        console.contains("page mask: 0xfffffffffffff000"),
        "{}",
        context()
    );
    let grouped = console
        .lines()
        .filter(|l| l.starts_with("iommu-group /sys/kernel/iommu_groups/"))
        .count();
    assert!(
        grouped >= 2,
        "virtio-blk and the NVMe in groups\n{}",
        context()
    );
    let features = feature_bit_negotiated(&console, VIRTIO_F_ACCESS_PLATFORM);
    assert_eq!(
        features.get("0x0002"),
        Some(&true),
        "virtio-blk: VIRTIO_F_ACCESS_PLATFORM not negotiated ({features:?})\n{}",
        context()
    );
    assert!(console.contains("nvme-fio-status=0"), "{}", context());
    assert_eq!(parse_exit_marker(&console), Some(0), "{}", context());
    let metrics = setup.metrics("viommu.json");
    assert_blk_queues_worked_on(&metrics, IOMMU_DISK_BYTES);
    assert_image_of_size_holds_every_block(&setup.scratch.path("disk.img"), IOMMU_DISK_BYTES);
    assert_image_of_size_holds_every_block(&setup.scratch.path("nvme.img"), IOMMU_DISK_BYTES);
    for line in console
        .lines()
        .filter(|l| l.contains("iommu") || l.contains("VIOT"))
    {
        println!("{test}: L2: {}", line.trim());
    }
    let counters = virtio_iommu_counters(&metrics);
    println!("{test}: virtio-iommu counters {counters}");
    for name in ["attach", "probe", "map", "unmap", "translations"] {
        assert!(
            counters[name].as_u64().unwrap_or(0) > 0,
            "{name}: {metrics:#}"
        );
    }
    assert_eq!(counters["faults"].as_u64(), Some(0), "{metrics:#}");
    assert_eq!(counters["bad_requests"].as_u64(), Some(0), "{metrics:#}");
    println!(
        "{test}: Linux's virtio_iommu drove sluice's virtio-iommu; fio wrote and verified {} MiB \
         on virtio-blk and on NVMe behind it",
        IOMMU_DISK_BYTES >> 20
    );
}

/// The named counters of the `virtio-iommu` device in the metrics.
fn virtio_iommu_counters(metrics: &serde_json::Value) -> &serde_json::Value {
    metrics["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|d| d["device"] == "virtio-iommu"))
        .map(|device| &device["counters"])
        .unwrap_or_else(|| panic!("no virtio-iommu device in the metrics: {metrics:#}"))
}

/// The named counters of the `vt-d` device in the metrics.
fn vtd_counters(metrics: &serde_json::Value) -> &serde_json::Value {
    metrics["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|d| d["device"] == "vt-d"))
        .map(|device| &device["counters"])
        .unwrap_or_else(|| panic!("no vt-d device in the metrics: {metrics:#}"))
}

/// Device id (`0x0002`) → whether feature `bit` is set, from the `virtio-features ID BITS`
/// lines (sysfs: one character per bit, bit 0 first).
fn feature_bit_negotiated(console: &str, bit: usize) -> std::collections::BTreeMap<String, bool> {
    console
        .lines()
        .filter_map(|line| {
            let mut words = line
                .trim()
                .strip_prefix("virtio-features ")?
                .split_whitespace();
            let device = words.next()?.to_string();
            let bits = words.next()?;
            Some((device, bits.as_bytes().get(bit) == Some(&b'1')))
        })
        .collect()
}

/// Device id (`0x0002`) → whether bit 34 is set, from the `virtio-features ID BITS` lines.
fn packed_ring_negotiated(console: &str) -> std::collections::BTreeMap<String, bool> {
    console
        .lines()
        .filter_map(|line| {
            let mut words = line
                .trim()
                .strip_prefix("virtio-features ")?
                .split_whitespace();
            let device = words.next()?.to_string();
            let bits = words.next()?;
            Some((
                device,
                bits.as_bytes().get(VIRTIO_F_RING_PACKED) == Some(&b'1'),
            ))
        })
        .collect()
}

/// Deterministic bytes (xorshift64*) so a failure reproduces.
fn pseudo_random_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// The host's `sha256sum` of a file (coreutils).
fn sha256_hex(path: &Path) -> String {
    let output = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(output.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

// ---- e1000 -------------------------------------------------------------------------------------

/// The files of a newc cpio archive (what scripts/lab writes; no hard links, no compression).
fn newc_files(archive: &[u8]) -> Vec<(String, &[u8])> {
    const HEADER: usize = 110;
    let align = |n: usize| n.div_ceil(4) * 4;
    let field = |header: &[u8], index: usize| {
        let text = std::str::from_utf8(&header[6 + 8 * index..14 + 8 * index]).unwrap_or("0");
        usize::from_str_radix(text, 16).unwrap_or(0)
    };
    let mut files = Vec::new();
    let mut at = 0;
    while at + HEADER <= archive.len() && &archive[at..at + 6] == b"070701" {
        let header = &archive[at..at + HEADER];
        let (size, name_len) = (field(header, 6), field(header, 11));
        let name_end = at + HEADER + name_len;
        let name = String::from_utf8_lossy(&archive[at + HEADER..name_end.saturating_sub(1)]);
        if name == "TRAILER!!!" {
            break;
        }
        let data_start = align(name_end);
        let Some(data) = archive.get(data_start..data_start + size) else {
            break;
        };
        files.push((name.into_owned(), data));
        at = align(data_start + size);
    }
    files
}

/// A newc archive of `files` (regular files, mode 0644) under their directories.
fn newc_archive(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |name: &str, mode: u32, data: &[u8], inode: usize| {
        let fields = [
            inode,
            mode as usize,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for value in fields {
            out.extend_from_slice(format!("{value:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(4) * 4, 0);
    };
    let mut inode = 1;
    let mut directories = std::collections::BTreeSet::new();
    for (name, _) in files {
        let mut prefix = String::new();
        for part in name
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            prefix = if prefix.is_empty() {
                part.to_string()
            } else {
                format!("{prefix}/{part}")
            };
            directories.insert(prefix.clone());
        }
    }
    for directory in &directories {
        entry(directory, 0o40755, &[], inode);
        inode += 1;
    }
    for (name, data) in files {
        entry(name, 0o100644, data, inode);
        inode += 1;
    }
    entry("TRAILER!!!", 0, &[], 0);
    out
}

/// Puts L1's generic kernel and an initramfs (the guest image plus L1's e1000.ko) in the share;
/// `None` (after a SKIP line) if L1's image has no e1000 module.
fn generic_kernel_with_e1000(test: &str, setup: &Setup) -> Option<()> {
    let (kernel, l1_initramfs) =
        sluice_lab::l1_image().unwrap_or_else(|e| panic!("the L1 image: {e}"));
    let archive = std::fs::read(&l1_initramfs).expect("read L1's initramfs");
    let Some((_, module)) = newc_files(&archive)
        .into_iter()
        .find(|(name, _)| name == "lab/modules/e1000.ko")
    else {
        println!("SKIP {test}: L1's image has no e1000 module (an older cached image?)");
        return None;
    };
    // An uncompressed archive first, then the guest image's gzip one: the kernel unpacks both.
    let mut initrd = newc_archive(&[("sluice/extra/e1000.ko", module)]);
    initrd.extend(std::fs::read(&setup.image.initramfs).expect("read the guest image"));
    std::fs::write(setup.scratch.path("generic.initrd"), initrd).expect("write the L2 initrd");
    std::fs::copy(&kernel, setup.scratch.path("generic.vmlinuz")).expect("copy L1's kernel");
    Some(())
}

/// In L2: load the stock e1000 driver, ping L1, download the blob from L1 and upload it back.
fn e1000_checks_in_l2() -> String {
    format!(
        "insmod /sluice/extra/e1000.ko; \
         echo driver=$(basename $(readlink /sys/class/net/eth0/device/driver)); \
         ip link set eth0 up && ip addr add {L2_ADDRESS}/24 dev eth0; \
         ping -c 3 -W 5 {L1_ADDRESS}; \
         timeout 60 wget -q -O /tmp/blob http://{L1_ADDRESS}:8080/blob && sha256sum /tmp/blob; \
         timeout 60 nc -w 3 {L1_ADDRESS} 9000 < /tmp/blob; echo upload-status=$?; \
         dmesg | grep -E 'e1000.*(Link is Up|eth0:)'; grep eth0 /proc/interrupts"
    )
}

#[test]
fn lab_e1000_driver_on_sluice() {
    let test = "lab-e1000";
    let Some(setup) = setup(test) else { return };
    if generic_kernel_with_e1000(test, &setup).is_none() {
        return;
    }
    let blob = pseudo_random_bytes(BLOB_BYTES);
    std::fs::write(setup.scratch.path("blob"), &blob).expect("write the blob");
    let sluice = setup.sluice_line_booting(
        "e1000",
        &format!("{SCRATCH}/generic.vmlinuz"),
        &format!("{SCRATCH}/generic.initrd"),
        "--e1000 tap=lab0,mac=52:54:00:e1:00:02",
        &kernel_cmdline_diskless(&e1000_checks_in_l2()),
    );
    let script = l1_script_with_tap(
        // The listener's stdin must not end: busybox nc half-closes on stdin EOF, and the
        // client stops at that EOF before it has sent anything.
        "sleep 600 | nc -l -p 9000 > /tmp/upload &",
        &sluice,
        "sleep 1; echo upload-$(sha256sum /tmp/upload)",
    );

    let run = setup.run(&script);

    run.assert_success();
    let console = setup.read("e1000.console");
    let context = || format!("{}\n--- L2 ---\n{console}", run.transcript());
    assert!(run.stdout.contains("sluice-exit=0"), "{}", context());
    assert_eq!(parse_exit_marker(&console), Some(0), "{}", context());
    assert!(console.contains("driver=e1000"), "{}", context());
    assert!(
        console.contains("NIC Link is Up 1000 Mbps Full Duplex"),
        "{}",
        context()
    );
    assert!(
        console.contains("3 packets transmitted, 3 packets received"),
        "{}",
        context()
    );
    let digest = sha256_hex(&setup.scratch.path("blob"));
    assert!(
        console.contains(&format!("{digest}  /tmp/blob")),
        "L2 did not download the blob intact (sha256 {digest})\n{}",
        context()
    );
    assert!(
        run.stdout.contains(&format!("upload-{digest} /tmp/upload")),
        "L1 did not receive the blob intact from L2\n{}",
        context()
    );
    assert_e1000_worked(&setup.metrics("e1000.json"));
    println!("{test}: Linux's e1000 pinged, downloaded and uploaded 4 MiB through sluice's e1000");
}

fn assert_e1000_worked(metrics: &serde_json::Value) {
    let nic = metrics["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device"] == "e1000-0"))
        .unwrap_or_else(|| panic!("no e1000 in the metrics: {metrics:#}"));
    let queues = nic["queues"].as_array().expect("queues");
    print_queues("e1000", queues);
    println!("e1000 counters: {}", nic["counters"]);
    for (index, queue) in queues.iter().enumerate() {
        assert!(
            counter(queue, "requests") > 0,
            "e1000 q{index}: {metrics:#}"
        );
        assert_eq!(counter(queue, "errors"), 0, "e1000 q{index}: {metrics:#}");
        assert!(
            counter(queue, "interrupts") > 0,
            "e1000 q{index}: {metrics:#}"
        );
    }
    assert!(
        counter(&queues[0], "bytes") >= BLOB_BYTES as u64,
        "{metrics:#}"
    );
    assert!(
        counter(&queues[1], "bytes") >= BLOB_BYTES as u64,
        "{metrics:#}"
    );
    // Microwire EEPROM reads, the reset through the I/O BAR, and the checksum offload Linux's
    // e1000 uses for every TCP frame. (Segmentation offload is on too, but whether the upload
    // ever hands it a segment larger than the MSS depends on TCP's timing under TCG: counted in
    // `tx_segmentation_offload`, 0 or dozens per run, not asserted.)
    let counters = &nic["counters"];
    for name in [
        "interrupts",
        "exits_eecd",
        "exits_io",
        "exits_tdt",
        "exits_rdt",
        "tx_checksum_offload",
    ] {
        assert!(
            counters[name].as_u64().unwrap_or(0) > 0,
            "{name}: {metrics:#}"
        );
    }
}

/// The VF's share of the namespace fio writes and verifies (small: L1 runs under TCG).
const VFIO_FIO_MIB: u64 = 8;

#[test]
fn lab_fio_verify_on_an_nvme_vf_assigned_to_sluice() {
    let test = "lab-vfio-fio";
    let Some(setup) = setup(test) else { return };
    let fio = format!(
        "fio --name=vfio --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio --rw=randwrite \
         --bs={block} --iodepth=16 --size={VFIO_FIO_MIB}M --verify=crc32c --verify_fatal=1 \
         --eta=never; status=$?; echo fio-exit=$status; \
         echo model=$(cat /sys/class/nvme/nvme0/model); grep nvme /proc/interrupts; exit $status",
        block = fio::BLOCK_SIZE,
    );
    let cmdline = kernel_cmdline(&fio).replace("sluice.wait=/dev/vda", "sluice.wait=/dev/nvme0n1");
    let script = format!(
        "set -e\n\
         vfs=$(lab-enable-vfs 2); vf=$(echo $vfs | cut -d' ' -f1)\n\
         lab-bind-vfio $vf\n\
         set +e\n\
         {}\n\
         echo sluice-exit=$?\n",
        setup.sluice_line("vfio", "--device vfio=$vf", &cmdline)
    );

    let run = setup.run_on(Lab::new().topology(Topology::Iommu).vfs(2), &script);

    run.assert_success();
    let console = setup.read("vfio.console");
    let context = || format!("{}\n--- L2 ---\n{console}", run.transcript());
    assert!(run.stdout.contains("sluice-exit=0"), "{}", context());
    assert_eq!(parse_exit_marker(&console), Some(0), "{}", context());
    assert!(console.contains("fio-exit=0"), "{}", context());
    assert!(console.contains("model=QEMU NVMe Ctrl"), "{}", context());
    let blocks = (VFIO_FIO_MIB << 20) / fio::BLOCK_SIZE as u64;
    assert_eq!(
        fio::issued_reads_writes(&console),
        Some((blocks, blocks)),
        "every block written once and read back for the verify\n{}",
        context()
    );
    // The completions came as MSI-X: L2 counted interrupts on its nvme vectors.
    let interrupts: u64 = console
        .lines()
        .filter(|l| l.contains("nvme0q"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    assert!(interrupts > 0, "no nvme interrupts in L2\n{}", context());
    // No exit per I/O: doorbells and registers are KVM memory slots; what traps is the
    // MSI-X table page (the driver's setup).
    let metrics = setup.metrics("vfio.json");
    let bar_exits: u64 = metrics["exits"]["per_device"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["device"].as_str().is_some_and(|n| n.contains("vfio")))
        .map(|d| d["reads"].as_u64().unwrap_or(0) + d["writes"].as_u64().unwrap_or(0))
        .sum();
    let ios = 2 * blocks;
    assert!(
        bar_exits * 10 < ios,
        "{bar_exits} BAR exits for {ios} I/Os\n{metrics:#}"
    );
    println!(
        "{test}: L2 nvme on the VF: fio wrote and verified {VFIO_FIO_MIB} MiB ({ios} I/Os), \
         {interrupts} MSI-X interrupts, {bar_exits} BAR exits ({:.4} per I/O), {} bytes mapped \
         for DMA",
        bar_exits as f64 / ios as f64,
        metrics["vfio"][0]["dma_mapped_bytes"]
    );
}

/// L2's RAM in bytes (`L2_MEMORY`).
const L2_MEMORY_BYTES: u64 = 512 << 20;

#[test]
fn lab_vtd_viommu_fio_verify_on_an_nvme_vf_mapped_on_demand() {
    let test = "lab-vfio-on-demand";
    let Some(setup) = setup(test) else { return };
    let fio = format!(
        "dmesg | grep -e DMAR -e iommu; \
         echo nvme-group=$(readlink /sys/class/nvme/nvme0/device/iommu_group); \
         fio --name=vfio --filename=/dev/nvme0n1 --direct=1 --ioengine=libaio --rw=randwrite \
         --bs={block} --iodepth=16 --size={VFIO_FIO_MIB}M --verify=crc32c --verify_fatal=1 \
         --eta=never; status=$?; echo fio-exit=$status; exit $status",
        block = fio::BLOCK_SIZE,
    );
    let cmdline = format!(
        "{} intel_iommu=on",
        kernel_cmdline(&fio).replace("sluice.wait=/dev/vda", "sluice.wait=/dev/nvme0n1")
    );
    let script = format!(
        "set -e\n\
         vfs=$(lab-enable-vfs 2); vf=$(echo $vfs | cut -d' ' -f1)\n\
         lab-bind-vfio $vf\n\
         set +e\n\
         {}\n\
         echo sluice-exit=$?\n",
        setup.sluice_line(
            "on-demand",
            "--iommu vtd --device vfio=$vf,dma=on-demand",
            &cmdline
        )
    );

    let run = setup.run_on(Lab::new().topology(Topology::Iommu).vfs(2), &script);

    run.assert_success();
    let console = setup.read("on-demand.console");
    let context = || format!("{}\n--- L2 ---\n{console}", run.transcript());
    assert!(run.stdout.contains("sluice-exit=0"), "{}", context());
    assert_eq!(parse_exit_marker(&console), Some(0), "{}", context());
    assert!(
        console.contains("DMAR: Intel(R) Virtualization Technology for Directed I/O"),
        "translation enabled\n{}",
        context()
    );
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("nvme-group=") && l.contains("kernel/iommu_groups/")),
        "the VF is in an IOMMU group of sluice's VT-d\n{}",
        context()
    );
    assert!(console.contains("fio-exit=0"), "{}", context());
    let blocks = (VFIO_FIO_MIB << 20) / fio::BLOCK_SIZE as u64;
    assert_eq!(
        fio::issued_reads_writes(&console),
        Some((blocks, blocks)),
        "every block written once and read back for the verify\n{}",
        context()
    );
    let metrics = setup.metrics("on-demand.json");
    let vfio = &metrics["vfio"][0];
    assert_eq!(vfio["dma"], "on-demand", "{metrics:#}");
    assert!(vfio["quarantined"].is_null(), "{metrics:#}");
    let peak = vfio["dma_mapped_peak_bytes"].as_u64().unwrap_or(0);
    let updates = vfio["dma_updates"].as_u64().unwrap_or(0);
    // The driver's queues and each I/O's buffers were mapped, and only those: the guest's
    // DMA API maps per I/O (strict mode under caching mode), far below all of its RAM.
    assert!(peak > 0 && updates > 0, "{metrics:#}");
    assert!(
        peak < L2_MEMORY_BYTES / 4,
        "{peak} bytes mapped at most, guest RAM {L2_MEMORY_BYTES}\n{metrics:#}"
    );
    let vtd = vtd_counters(&metrics);
    assert_eq!(vtd["faults"].as_u64(), Some(0), "{metrics:#}");
    println!(
        "{test}: L2 nvme on the VF behind sluice's VT-d: fio wrote and verified {VFIO_FIO_MIB} MiB \
         ({} I/Os); peak {peak} bytes ({:.2} MiB, {:.3}% of {} MiB guest RAM) in at most {} \
         mappings, {} bytes mapped at the end, {updates} invalidations changed the host IOMMU; \
         vt-d counters {vtd}",
        2 * blocks,
        peak as f64 / 1_048_576.0,
        100.0 * peak as f64 / L2_MEMORY_BYTES as f64,
        L2_MEMORY_BYTES >> 20,
        vfio["dma_mappings_peak"],
        vfio["dma_mapped_bytes"],
    );
}

// ---- the passthrough failover dance --------------------------------------------------------

/// The MAC of the switch topology's e1000e (scripts/lab), which the standby virtio-net copies:
/// net_failover pairs the two by it.
const FAILOVER_MAC: &str = "52:54:00:fa:11:01";
/// L1's own NIC on the e1000e's QEMU hub (scripts/lab), bridged with L2's taps.
const FAILOVER_PEER_MAC: &str = "52:54:00:fa:11:fe";
/// L1's bridge, its MAC fixed: a bridge takes its lowest port's by default, so the taps coming
/// and going would change it under L2's ARP entry (measured: ~6 s of lost pings after the
/// migration until L2 asked again).
const FAILOVER_BRIDGE_MAC: &str = "52:54:00:fa:11:fd";
const FAILOVER_L1_ADDRESS: &str = "10.79.0.1";
const FAILOVER_L2_ADDRESS: &str = "10.79.0.2";
/// L1's modules L2 loads (in L1's load order): virtio-pci, the failover pair's drivers.
const FAILOVER_MODULES: [&str; 9] = [
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "e1000e",
];
/// Replies each phase waits for before the next step (pings every 0.2 s).
const FAILOVER_REPLIES_PER_PHASE: u32 = 40;
const FAILOVER_LAB_TIMEOUT: Duration = Duration::from_secs(1200);
const FAILOVER_RUN_TIMEOUT: Duration = Duration::from_secs(1000);

/// L2's script (in its initrd: the kernel command line is too short for it): load the drivers,
/// find the failover master net_failover made of the STANDBY virtio-net (the slave with the
/// e1000e's MAC, no upper device), address it and ping L1 every 0.2 s for ever; every 2 s
/// print which netdev is the primary (the e1000e, while there is one) and both slaves' sent
/// frames, so the path the pings take shows.
fn failover_l2_script() -> String {
    format!(
        r#"M={FAILOVER_MAC}
for m in $(cat /sluice/extra/order); do insmod /sluice/extra/$m.ko || echo FO-INSMOD-FAILED $m; done
drv() {{ basename "$(readlink /sys/class/net/$1/device/driver 2>/dev/null)" 2>/dev/null; }}
slave() {{ [ -e /sys/class/net/$1/master ]; }}
primary() {{ for n in $(ls /sys/class/net); do [ "$(drv $n)" = e1000e ] && echo $n; done; }}
standby() {{ for n in $(ls /sys/class/net); do [ "$(drv $n)" = virtio_net ] && slave $n && echo $n; done; }}
master=; i=0
while [ -z "$master" ] && [ $i -lt 600 ]; do
  for n in $(ls /sys/class/net); do
    [ "$(cat /sys/class/net/$n/address)" = $M ] && [ "$(drv $n)" = virtio_net ] && ! slave $n && master=$n
  done
  sleep 0.1; i=$((i+1))
done
[ -n "$master" ] || {{ echo FO-FAIL no failover master; ls -l /sys/class/net; exit 1; }}
i=0; while [ -z "$(primary)" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
echo FO-MASTER $master standby=$(standby) primary=$(primary)
ip link set $master up
ip addr add {FAILOVER_L2_ADDRESS}/24 dev $master
ping -i 0.2 {FAILOVER_L1_ADDRESS} &
while true; do
  vf=$(primary); sb=$(standby)
  echo FO-STAT up=$(cut -d' ' -f1 /proc/uptime) vf=${{vf:-none}} vf_tx=$(cat /sys/class/net/$vf/statistics/tx_packets 2>/dev/null) sb_tx=$(cat /sys/class/net/$sb/statistics/tx_packets 2>/dev/null)
  sleep 2
done
"#
    )
}

/// Puts L1's generic kernel and an initramfs (L1's virtio, failover and e1000e modules, their
/// load order and L2's script, then the guest image) in the share as `failover.vmlinuz` and
/// `failover.initrd`; `None` (after a SKIP line) if L1's image lacks a module.
fn stage_failover_kernel(test: &str, setup: &Setup) -> Option<()> {
    let (kernel, l1_initramfs) =
        sluice_lab::l1_image().unwrap_or_else(|e| panic!("the L1 image: {e}"));
    let archive = std::fs::read(&l1_initramfs).expect("read L1's initramfs");
    let files = newc_files(&archive);
    let module = |name: &str| {
        let path = format!("lab/modules/{name}.ko");
        files
            .iter()
            .find(|(n, _)| *n == path)
            .map(|(_, data)| *data)
    };
    let mut extra: Vec<(String, &[u8])> = Vec::new();
    for name in FAILOVER_MODULES {
        let Some(data) = module(name) else {
            println!("SKIP {test}: L1's image has no {name} module (an older cached image?)");
            return None;
        };
        extra.push((format!("sluice/extra/{name}.ko"), data));
    }
    let order = FAILOVER_MODULES.join("\n") + "\n";
    let script = failover_l2_script();
    extra.push(("sluice/extra/order".into(), order.as_bytes()));
    extra.push(("sluice/extra/failover.sh".into(), script.as_bytes()));
    let named: Vec<(&str, &[u8])> = extra.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    // An uncompressed archive first, then the guest image's gzip one: the kernel unpacks both.
    let mut initrd = newc_archive(&named);
    initrd.extend(std::fs::read(&setup.image.initramfs).expect("read the guest image"));
    std::fs::write(setup.scratch.path("failover.initrd"), initrd).expect("write the L2 initrd");
    std::fs::copy(&kernel, setup.scratch.path("failover.vmlinuz")).expect("copy L1's kernel");
    Some(())
}

/// L1's side of the dance, each step once the pings went on for a while (the destination's tap
/// joins the bridge as soon as it exists: the destination opens it once the stream is in, before
/// its vCPUs run); `PHASE NAME A B T`
/// lines give the last reply seen in the source's (A) and destination's (B) console when the
/// step began (T: L1's uptime).
fn failover_l1_script(setup: &Setup, source: &str) -> String {
    let sluice = setup.sluice.display();
    let (a, b) = (
        format!("{sluice} ctl --api-socket /tmp/a.sock"),
        format!("{sluice} ctl --api-socket /tmp/b.sock"),
    );
    format!(
        "set -u\n\
         seq_of() {{ s=$(grep -o 'seq=[0-9]*' {SCRATCH}/$1.console 2>/dev/null | tail -n 1 | cut -d= -f2); echo ${{s:-0}}; }}\n\
         await_seq() {{ i=0; while [ $(seq_of $1) -lt $2 ]; do i=$((i+1)); \
           [ $i -gt 3000 ] && {{ echo TIMEOUT $1 seq $2; return 1; }}; sleep 0.2; done; }}\n\
         phase() {{ echo PHASE $1 $(seq_of source) $(seq_of destination) $(cut -d' ' -f1 /proc/uptime); }}\n\
         addtap() {{ i=0; while [ ! -e /sys/class/net/$1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
           brctl addif br0 $1 && ip link set $1 up; }}\n\
         bdf=$(for d in /sys/bus/pci/devices/*; do [ \"$(cat $d/device)\" = 0x10d3 ] && echo ${{d##*/}}; done | head -n 1)\n\
         peer=$(for n in /sys/class/net/*; do [ \"$(cat $n/address)\" = {FAILOVER_PEER_MAC} ] && echo ${{n##*/}}; done)\n\
         echo VF $bdf PEER $peer\n\
         lab-bind-vfio $bdf || exit 1\n\
         brctl addbr br0 && ip link set br0 address {FAILOVER_BRIDGE_MAC} && brctl addif br0 $peer && \
           ip link set $peer up && ip addr add {FAILOVER_L1_ADDRESS}/24 dev br0 && ip link set br0 up || exit 1\n\
         ({source}; echo source-exit=$? > /tmp/source.status) &\n\
         addtap labfo0 || exit 1\n\
         await_seq source {n} || exit 1\n\
         phase unplug\n\
         id=$({a} info | grep -o '\"id\":\"vfio[^\"]*\"' | head -n 1 | cut -d'\"' -f4)\n\
         echo REMOVE $({a} remove-device $id)\n\
         i=0; while {a} info | grep -q \"\\\"$id\\\"\" && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done\n\
         echo INFO-AFTER-REMOVE $({a} info)\n\
         phase on-virtio\n\
         await_seq source $(( $(seq_of source) + {n} )) || exit 1\n\
         (timeout -s TERM {timeout} {sluice} --log {log} run \
           --net tap=labfo1,mac={FAILOVER_MAC},standby=on --api-socket /tmp/b.sock \
           --migrate-from unix:/tmp/migrate.sock --metrics {SCRATCH}/destination.json \
           > {SCRATCH}/destination.console 2>&1; echo destination-exit=$? > /tmp/destination.status) &\n\
         i=0; while [ $i -lt 300 ] && [ ! -S /tmp/migrate.sock ]; do sleep 0.1; i=$((i+1)); done\n\
         phase migrate\n\
         addtap labfo1 &\n\
         echo MIGRATE $({a} migrate unix:/tmp/migrate.sock)\n\
         phase migrated\n\
         await_seq destination $(( $(seq_of source) + {n} )) || exit 1\n\
         phase replug\n\
         echo ADD $({b} add-device path=/sys/bus/pci/devices/$bdf,id=vf1)\n\
         i=0; while ! grep -q 'FO-STAT.*vf=eth[0-9]* vf_tx=[1-9]' {SCRATCH}/destination.console && [ $i -lt 3000 ]; \
           do sleep 0.2; i=$((i+1)); done\n\
         phase on-vf-again\n\
         await_seq destination $(( $(seq_of destination) + {n} )) || exit 1\n\
         phase end\n\
         echo INFO-END $({b} info)\n\
         {b} shutdown\n\
         wait\n\
         cat /tmp/source.status /tmp/destination.status\n",
        n = FAILOVER_REPLIES_PER_PHASE,
        timeout = FAILOVER_RUN_TIMEOUT.as_secs(),
        log = setup.log,
    )
}

/// `PHASE` lines: each step's name and the highest reply seq seen when it began.
fn failover_phases(stdout: &str) -> Vec<(String, u32)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut fields = l.strip_prefix("PHASE ")?.split_whitespace();
            let name = fields.next()?.to_string();
            let source: u32 = fields.next()?.parse().ok()?;
            let destination: u32 = fields.next()?.parse().ok()?;
            Some((name, source.max(destination)))
        })
        .collect()
}

/// The reply seqs in a console (busybox ping: `64 bytes from ...: seq=N ttl=...`).
fn ping_replies(console: &str) -> std::collections::BTreeSet<u32> {
    console
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| number_after(l, "seq="))
        .collect()
}

/// The number right after `key` in `line` (`seq=12 ttl=64` → 12 for `seq=`).
fn number_after<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split(key)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Issue 15's passthrough failover dance: Linux in L2 (L1's generic kernel: the cloud kernel
/// has no e1000e) has a `standby=on` virtio-net and, with the same MAC, the switch topology's
/// e1000e passed through with vfio-pci (the VF's stand-in: QEMU 7.2 has no igb); net_failover
/// makes them one interface, which pings L1 every 0.2 s over L1's bridge (the tap and L1's
/// NIC on the e1000e's QEMU hub). Then: `remove-device` the e1000e (acpiphp ejects it, the
/// pings fail over to virtio-net), migrate to a second sluice started without it, and
/// `add-device` it there (net_failover takes it back as primary once its link is up: the
/// replug phase lasts until the e1000e sent frames). Each phase's lost pings are
/// printed; asserted: the ping goes on after every step, no phase loses half its pings, the
/// e1000e carried pings before the unplug and after the replug.
#[test]
fn lab_passthrough_failover_keeps_a_ping_across_unplug_migration_and_replug() {
    let test = "lab-failover";
    let Some(mut setup) = setup(test) else { return };
    if stage_failover_kernel(test, &setup).is_none() {
        return;
    }
    setup.log = "warn,sluice_vmm::hotplug=info,sluice_vmm::migration=info,sluice_vmm::vfio=info";
    // More than the migration tests' 256 MiB: L1's generic kernel is larger than the cloud one.
    setup.memory = "384M";
    setup.run_timeout = FAILOVER_RUN_TIMEOUT;
    let cmdline = kernel_cmdline_diskless("sh /sluice/extra/failover.sh");
    let source = setup.sluice_line_booting(
        "source",
        &format!("{SCRATCH}/failover.vmlinuz"),
        &format!("{SCRATCH}/failover.initrd"),
        &format!(
            "--net tap=labfo0,mac={FAILOVER_MAC},standby=on --device vfio=$bdf \
             --api-socket /tmp/a.sock"
        ),
        &cmdline,
    );
    let started = std::time::Instant::now();

    let run = setup.run_on(
        Lab::new()
            .topology(Topology::Iommu)
            .topology(Topology::Switch)
            .timeout(FAILOVER_LAB_TIMEOUT),
        &failover_l1_script(&setup, &source),
    );

    let elapsed = started.elapsed();
    let source_console = setup.read("source.console");
    let destination_console = setup.read("destination.console");
    let context = || {
        format!(
            "{}\n--- source ---\n{source_console}\n--- destination ---\n{destination_console}",
            run.transcript()
        )
    };
    run.assert_success();
    assert!(run.stdout.contains("source-exit=0"), "{}", context());
    assert!(run.stdout.contains("destination-exit=0"), "{}", context());
    assert!(
        source_console.contains("FO-MASTER") && source_console.contains("primary=eth"),
        "net_failover paired the e1000e with the standby virtio-net\n{}",
        context()
    );
    // The eject's teardown ran off the vCPU and released the group (its BAR mappings gone
    // before the device file, or the container keeps it: EBUSY).
    assert!(source_console.contains("torn down"), "{}", context());
    assert!(
        !source_console.contains("Could not unbind VFIO group"),
        "{}",
        context()
    );
    let report: serde_json::Value = run
        .stdout
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix("MIGRATE ")?).ok())
        .unwrap_or_else(|| panic!("no migration report\n{}", context()));
    let phases = failover_phases(&run.stdout);
    let names: Vec<&str> = phases.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "unplug",
            "on-virtio",
            "migrate",
            "migrated",
            "replug",
            "on-vf-again",
            "end"
        ],
        "{}",
        context()
    );
    let mut replies = ping_replies(&source_console);
    replies.extend(ping_replies(&destination_console));
    let first = replies.first().copied().unwrap_or_default();
    println!(
        "{test}: lab run {:.0} s; migration total {} ms, downtime {} ms, {} rounds",
        elapsed.as_secs_f64(),
        report["total_ms"],
        report["downtime_ms"],
        report["rounds"]
    );
    let mut start = ("on-vf".to_string(), first);
    for (name, end) in phases {
        let sent = end.saturating_sub(start.1);
        let received = replies.range(start.1 + 1..=end).count() as u32;
        let lost = sent.saturating_sub(received);
        println!(
            "{test}: phase {:<12} pings {:>4}..{:<4} sent {sent:>4} lost {lost:>4}",
            start.0, start.1, end
        );
        assert!(
            received > 0 && lost * 2 < sent.max(1),
            "phase {}: {lost} of {sent} pings lost\n{}",
            start.0,
            context()
        );
        start = (name, end);
    }
    // The e1000e carried the pings before the unplug and again after the replug.
    let vf_sent = |console: &str| -> Vec<u64> {
        console
            .lines()
            .filter(|l| l.starts_with("FO-STAT") && !l.contains("vf=none"))
            .filter_map(|l| number_after(l, "vf_tx="))
            .collect()
    };
    for (side, console) in [
        ("source", &source_console),
        ("destination", &destination_console),
    ] {
        let sent = vf_sent(console);
        assert!(
            sent.last() > sent.first(),
            "the e1000e sent frames at the {side}: {sent:?}\n{}",
            context()
        );
    }
}
