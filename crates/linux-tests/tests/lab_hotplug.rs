//! PCI hot-plug seen by Linux, in the nested lab: Debian's cloud kernel (acpiphp and the ACPI
//! Generic Event Device driver are built in) boots as L2 on `sluice run --api-socket` in L1
//! with no disk and no NIC, and L1 drives sluice's control API while L2 watches, all in one
//! L1 boot and one L2 boot:
//!
//! 1. `sluice ctl add-disk path=/tmp/hot.img,id=hot0`: the GED interrupt runs `_EVT`,
//!    acpiphp scans the slot, virtio_blk binds and `/dev/vda` appears; fio writes every block
//!    of it and verifies them (crc32c).
//! 2. `sluice ctl remove-device hot0`: acpiphp gets the eject request, unbinds the driver and
//!    runs `_EJ0`; `/dev/vda` goes, sluice lists no hot0 and counts one eject, and the image
//!    lock is released: the same image is plugged again (hot1) — which a held lock would
//!    refuse — and fio's verify-only pass reads back what the first plug wrote; hot1 removed.
//! 3. `sluice ctl add-net tap=labhp0`: `eth0` appears in L2 with the MAC asked for and pings
//!    L1 over the tap; `remove-device` makes it disappear.
//! 4. L1 reads sluice's final device list and counters, then ends the VM with `sluice ctl
//!    shutdown`: L2 waits after its last step rather than powering off, which would race
//!    those last queries (sluice gone, the API socket with it).
//!
//! The image is checked block by block on this host afterwards. Printed: the whole lab run's
//! time and each plug / unplug's latency from the `ctl` request in L1 until L2 saw the device
//! come or go (L1 polls L2's console every 20 ms, L2 polls every 20 ms; L1's clock is
//! /proc/uptime, 10 ms steps: its `date` has no %N), with a `ctl ping`'s own time (the debug
//! binary's start under TCG) for comparison, and L2's kernel log lines of each scan.
//!
//! No QEMU or no way to build the images: a SKIP line.

mod common;

use std::time::{Duration, Instant};

use common::backend::sluice_binary;
use common::fio;
use common::qemu::kernel_cmdline_diskless;
use common::{prerequisites, Scratch};
use sluice_lab::{Lab, SCRATCH};

const HOT_DISK_BYTES: u64 = 8 << 20;
const LAB_TIMEOUT: Duration = Duration::from_secs(600);
const L2_RUN_TIMEOUT: Duration = Duration::from_secs(480);
/// How long L1 waits for each step L2 reports (boot, a plug, an unplug, fio on 8 MiB).
const STEP_TIMEOUT_S: u32 = 240;
const L1_ADDRESS: &str = "10.78.0.1";
const L2_ADDRESS: &str = "10.78.0.2";
const MAC: &str = "52:54:00:12:34:77";

/// fio on the hot-plugged disk: every 4 KiB block written once, then read back and verified
/// (L2's `$FIO`; once in a variable: the whole L2 script must fit the kernel command line).
fn fio_command() -> String {
    format!(
        "fio --name=hotplug --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
         --bs={block} --iodepth=16 --size={size} --verify=crc32c --verify_fatal=1 --eta=never \
         --group_reporting",
        block = fio::BLOCK_SIZE,
        size = HOT_DISK_BYTES,
    )
}

/// L2's side: report each device coming and going (uptime in seconds), run fio on the disk,
/// ping over the NIC.
fn l2_command() -> String {
    format!(
        "up() {{ cut -d' ' -f1 /proc/uptime; }}\n\
         until_true() {{ i=0; while ! eval \"$1\"; do i=$((i+1)); [ $i -gt 12000 ] && return 1; \
           sleep 0.02; done; }}\n\
         FIO='{fio}'\n\
         echo HP-READY $(up)\n\
         until_true '[ -b /dev/vda ]' || {{ echo HP-FAIL no vda; exit 1; }}\n\
         echo HP-DISK-SEEN $(up)\n\
         $FIO; echo HP-FIO-WRITE-STATUS=$?\n\
         echo HP-DISK-WRITTEN $(up)\n\
         until_true '[ ! -e /dev/vda ]' || {{ echo HP-FAIL vda stays; exit 1; }}\n\
         echo HP-DISK-GONE $(up)\n\
         until_true '[ -b /dev/vda ]' || {{ echo HP-FAIL no second vda; exit 1; }}\n\
         echo HP-DISK2-SEEN $(up)\n\
         $FIO --verify_only; echo HP-FIO-VERIFY-STATUS=$?\n\
         echo HP-DISK2-VERIFIED $(up)\n\
         until_true '[ ! -e /dev/vda ]' || {{ echo HP-FAIL second vda stays; exit 1; }}\n\
         echo HP-DISK2-GONE $(up)\n\
         until_true '[ -e /sys/class/net/eth0 ]' || {{ echo HP-FAIL no eth0; exit 1; }}\n\
         echo HP-NET-SEEN $(up) mac=$(cat /sys/class/net/eth0/address)\n\
         ip link set eth0 up && ip addr add {L2_ADDRESS}/24 dev eth0\n\
         ping -c 3 -W 5 {L1_ADDRESS}\n\
         echo HP-NET-PINGED $(up)\n\
         until_true '[ ! -e /sys/class/net/eth0 ]' || {{ echo HP-FAIL eth0 stays; exit 1; }}\n\
         echo HP-NET-GONE $(up)\n\
         dmesg | grep -E '0000:00:01.0: \\[1af4|\\[vda\\]|acpiphp: Slot \\[1\\]|Hot Plug PCI' | sed 's/^/HP-DMESG /'\n\
         echo HP-DONE; sleep 999; exit 1",
        fio = fio_command(),
    )
}

/// L1's side: start sluice, then for each step send the request and wait for L2's marker,
/// printing the time between the two.
fn l1_script(sluice: &str, run: &str) -> String {
    let ctl = format!("{sluice} ctl --api-socket /tmp/api.sock");
    format!(
        "set -u\n\
         now() {{ t=$(cut -d' ' -f1 /proc/uptime); echo $(( $(echo $t | tr -d .) * 10 )); }}\n\
         await() {{ i=0; while ! grep -q \"$1\" {SCRATCH}/l2.console; do i=$((i+1)); \
           if [ $i -gt {polls} ]; then echo TIMEOUT waiting for $1; return 1; fi; \
           sleep 0.02; done; }}\n\
         step() {{ marker=$1; shift; t0=$(now); out=$(\"$@\") || {{ echo FAILED \"$@\" \"$out\"; return 1; }}; \
           echo \"$@\" \"$out\"; await \"$marker\" || return 1; \
           t1=$(now); echo LATENCY $marker $(( t1 - t0 )) ms; }}\n\
         truncate -s {HOT_DISK_BYTES} /tmp/hot.img\n\
         ({run}; echo sluice-exit=$? > /tmp/sluice.status) &\n\
         await HP-READY || exit 1\n\
         echo INFO-BOOT $({ctl} info)\n\
         t0=$(now); {ctl} ping > /dev/null; t1=$(now); echo LATENCY ctl-ping $(( t1 - t0 )) ms\n\
         step HP-DISK-SEEN {ctl} add-disk path=/tmp/hot.img,id=hot0 || exit 1\n\
         await HP-DISK-WRITTEN || exit 1\n\
         step HP-DISK-GONE {ctl} remove-device hot0 || exit 1\n\
         i=0; while {ctl} info | grep -q '\"hot0\"' && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done\n\
         echo INFO-AFTER-REMOVE $({ctl} info)\n\
         echo COUNTERS-AFTER-REMOVE $({ctl} counters)\n\
         step HP-DISK2-SEEN {ctl} add-disk path=/tmp/hot.img,id=hot1 || exit 1\n\
         await HP-DISK2-VERIFIED || exit 1\n\
         step HP-DISK2-GONE {ctl} remove-device hot1 || exit 1\n\
         step HP-NET-SEEN {ctl} add-net tap=labhp0,mac={MAC},id=nic0 || exit 1\n\
         ip addr add {L1_ADDRESS}/24 dev labhp0 && ip link set labhp0 up\n\
         await HP-NET-PINGED || exit 1\n\
         step HP-NET-GONE {ctl} remove-device nic0 || exit 1\n\
         i=0; while [ -e /sys/class/net/labhp0 ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done\n\
         echo TAP-AFTER-REMOVE $([ -e /sys/class/net/labhp0 ] && echo present || echo gone)\n\
         echo INFO-END $({ctl} info)\n\
         echo COUNTERS-END $({ctl} counters)\n\
         {ctl} shutdown\n\
         wait\n\
         cat /tmp/sluice.status\n\
         cp /tmp/hot.img {SCRATCH}/hot.img\n",
        polls = STEP_TIMEOUT_S * 50,
    )
}

/// The JSON L1 printed after `prefix`; a missing or unparsable line fails the test (a `Null`
/// would make the device-list checks pass vacuously).
fn json_after(stdout: &str, prefix: &str) -> serde_json::Value {
    stdout
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix(prefix)?).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| panic!("no JSON object after `{prefix}` in L1's output:\n{stdout}"))
}

fn ids(info: &serde_json::Value) -> Vec<String> {
    info["devices"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|d| d["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn lab_pci_hotplug_of_virtio_blk_and_net_into_linux_on_sluice() {
    let test = "lab-hotplug";
    if sluice_lab::inside_lab() {
        println!("SKIP {test}: already inside the lab");
        return;
    }
    let Some(image) = prerequisites(test, &[]) else {
        return;
    };
    if sluice_lab::skip_without_lab(test) {
        return;
    }
    let sluice = sluice_binary().unwrap_or_else(|e| panic!("cannot build sluice: {e}"));
    let sluice = sluice.display().to_string();
    let scratch = Scratch::new(test);
    let run = format!(
        "timeout -s TERM {timeout} {sluice} --log warn,sluice_vmm::hotplug=info,sluice_pci=info \
         run --kernel {kernel} --initrd {initrd} --memory 512M --api-socket /tmp/api.sock \
         --cmdline '{cmdline}' > {SCRATCH}/l2.console 2>&1",
        timeout = L2_RUN_TIMEOUT.as_secs(),
        kernel = image.kernel.display(),
        initrd = image.initramfs.display(),
        cmdline = kernel_cmdline_diskless(&l2_command()),
    );
    let cmdline = kernel_cmdline_diskless(&l2_command());
    assert!(
        cmdline.len() < 2048,
        "L2's command line is {} bytes: the kernel takes 2047",
        cmdline.len()
    );
    let started = Instant::now();

    let lab = Lab::new()
        .share(&scratch.dir)
        .timeout(LAB_TIMEOUT)
        .run(&l1_script(&sluice, &run));

    let elapsed = started.elapsed();
    let console = std::fs::read_to_string(scratch.path("l2.console")).unwrap_or_default();
    let context = || format!("{}\n--- L2 ---\n{console}", lab.transcript());
    lab.assert_success();
    assert!(lab.stdout.contains("sluice-exit=0"), "{}", context());
    assert!(
        console.contains("HP-DONE"),
        "L2 ran every step\n{}",
        context()
    );
    assert!(console.contains("HP-FIO-WRITE-STATUS=0"), "{}", context());
    assert!(console.contains("HP-FIO-VERIFY-STATUS=0"), "{}", context());
    assert!(
        console.contains("HP-NET-SEEN") && console.contains(&format!("mac={MAC}")),
        "{}",
        context()
    );
    assert!(
        console.contains("3 packets transmitted, 3 packets received"),
        "{}",
        context()
    );
    let boot = json_after(&lab.stdout, "INFO-BOOT ");
    assert_eq!(ids(&boot), Vec::<String>::new(), "{}", context());
    let after_remove = json_after(&lab.stdout, "INFO-AFTER-REMOVE ");
    assert!(
        !ids(&after_remove).contains(&"hot0".to_string()),
        "hot0 removed once L2 ejected it: {after_remove:#}\n{}",
        context()
    );
    let counters = json_after(&lab.stdout, "COUNTERS-AFTER-REMOVE ");
    assert_eq!(
        counters["hotplug"]["ejects"],
        1,
        "{counters:#}\n{}",
        context()
    );
    assert_eq!(counters["hotplug"]["ejects_ignored"], 0, "{counters:#}");
    let end = json_after(&lab.stdout, "INFO-END ");
    assert_eq!(ids(&end), Vec::<String>::new(), "{end:#}\n{}", context());
    let counters = json_after(&lab.stdout, "COUNTERS-END ");
    assert_eq!(counters["hotplug"]["insertions"], 3, "{counters:#}");
    assert_eq!(counters["hotplug"]["ejects"], 3, "{counters:#}");
    assert_eq!(counters["hotplug"]["bad_accesses"], 0, "{counters:#}");
    assert!(
        lab.stdout.contains("TAP-AFTER-REMOVE gone"),
        "the tap closes with the device\n{}",
        context()
    );
    let scan = fio::scan_image(&scratch.path("hot.img")).expect("read the image");
    assert_eq!(scan.bad_count, 0, "bad blocks: {:?}", scan.bad);
    assert_eq!(
        scan.fio_blocks,
        HOT_DISK_BYTES / fio::BLOCK_SIZE as u64,
        "{scan:?}"
    );
    let latencies: Vec<&str> = lab
        .stdout
        .lines()
        .filter(|l| l.starts_with("LATENCY "))
        .collect();
    println!(
        "{test}: virtio-blk plugged, written, ejected, re-plugged and verified, virtio-net \
         plugged, pinged and ejected in one L2 boot; lab run {:.0} s",
        elapsed.as_secs_f64()
    );
    for line in latencies {
        println!("{test}: {line}");
    }
    // L2's own view (kernel timestamps): the slot scanned, the driver's device ready.
    for line in console.lines().filter(|l| l.starts_with("HP-DMESG ")) {
        println!("{test}: {line}");
    }
}
