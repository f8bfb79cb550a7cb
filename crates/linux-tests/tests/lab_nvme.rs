//! Linux's `nvme` driver on sluice's emulated NVMe controller (`--nvme`), in the nested lab.
//!
//! L2 is Debian's *generic* kernel (the L1 image's own kernel, `scripts/lab build`: unlike the
//! cloud kernel of scripts/guest-image.py it has nvme as a module), booted on sluice in L1 with
//! an initramfs built in L1 from L1's own files: busybox, nvme-cli and its libraries, the nvme
//! modules L1 loads (`/lab/modules`), and a 4 MiB pattern written on this host. In L2, the
//! driver binds, `nvme list` / `nvme id-ctrl` describe the controller, the pattern is written
//! to /dev/nvme0n1 at 1 MiB, the page cache dropped and the range read back and compared; the
//! image is then checked on this host; a controller reset (sysfs `reset_controller`: Linux
//! deletes the queues, disables, re-enables and sets everything up again) must leave the data
//! readable; eight parallel readers then load both queues, and
//! `nvme smart-log` reads the controller's counters. Two boots: with Doorbell Buffer Config
//! offered (Linux uses shadow doorbells: sluice logs the buffers, counts the commands consumed
//! without a doorbell write, and makes the I/O SQ doorbells ioeventfds, so none of their writes
//! exits) and with `dbbuf=off` (every doorbell write exits), whose exits are the comparison.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::backend::sluice_binary;
use common::{run_with_timeout, Scratch};
use sluice_lab::{Lab, SCRATCH};

const PATTERN_BYTES: usize = 4 << 20;
/// Where L2 writes the pattern (dd seek=16 with bs=64k).
const PATTERN_OFFSET: usize = 1 << 20;
const IMAGE_MIB: u64 = 16;
const SERIAL: &str = "SLUICE-LAB-NVME";
const MODULES: &str = "crct10dif_common crc_t10dif crc64 crc64_rocksoft t10_pi nvme_core nvme";
const LAB_TIMEOUT: Duration = Duration::from_secs(600);

/// L2's /init: load the nvme modules, describe the controller, write + read back the pattern.
const L2_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "L2: insmod $m failed"; done
tries=0
while [ ! -e /dev/nvme0n1 ] && [ $tries -lt 300 ]; do sleep 0.1; tries=$((tries + 1)); done
echo "L2: nvme list"
nvme list
echo "L2: nvme id-ctrl"
nvme id-ctrl /dev/nvme0 | grep -E '^(vid|sn|mn|mdts|oacs|sqes|cqes|nn|oncs|vwc|sgls) '
echo "L2: hardware queues $(ls /sys/block/nvme0n1/mq | wc -l)"
dd if=/pattern.bin of=/dev/nvme0n1 bs=64k seek=16 conv=fsync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nvme0n1 of=/tmp/back bs=64k skip=16 count=64
if cmp /pattern.bin /tmp/back; then echo L2-NVME-READBACK-OK; else echo L2-NVME-READBACK-BAD; fi
echo 1 > /sys/class/nvme/nvme0/reset_controller
tries=0
while [ "$(cat /sys/class/nvme/nvme0/state)" != live ] && [ $tries -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
echo "L2: state after reset: $(cat /sys/class/nvme/nvme0/state)"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nvme0n1 of=/tmp/back2 bs=64k skip=16 count=64
if cmp /pattern.bin /tmp/back2; then echo L2-NVME-RESET-READBACK-OK; fi
echo 3 > /proc/sys/vm/drop_caches
for i in 0 1 2 3 4 5 6 7; do dd if=/dev/nvme0n1 of=/dev/null bs=4k skip=$((i * 512)) count=512 2>/dev/null & done
wait
echo L2-NVME-PARALLEL-READS-DONE
nvme smart-log /dev/nvme0 | grep -E '^(data_units|host_)'
dmesg | grep -i nvme
sync
echo L2-NVME-DONE
poweroff -f
"#;

/// A deterministic pattern (xorshift), different in every 4 KiB block.
fn pattern() -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..PATTERN_BYTES / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}

/// The L1 image's kernel (Debian's generic kernel), from `scripts/lab build`.
fn l1_kernel() -> Result<PathBuf, String> {
    let script = sluice_lab::repo_root().join("scripts/lab");
    let output = run_with_timeout(
        Command::new(script).arg("build"),
        Duration::from_secs(600),
        "scripts/lab build",
    )?;
    output
        .lines()
        .next()
        .map(PathBuf::from)
        .ok_or_else(|| format!("scripts/lab build printed {output:?}"))
}

/// The L1 script: build L2's initramfs from L1's files, then one L2 boot per dbbuf mode.
fn l1_script(sluice: &Path) -> String {
    let mut script = String::from("set -u\nS=");
    script.push_str(SCRATCH);
    script.push('\n');
    script.push_str(
        "mkdir -p /tmp/l2/bin /tmp/l2/usr/sbin /tmp/l2/modules /tmp/l2/lib64 /tmp/l2/lib \
         /tmp/l2/proc /tmp/l2/sys /tmp/l2/dev /tmp/l2/tmp\n\
         cp $(which busybox) /tmp/l2/bin/busybox\n\
         cp /usr/sbin/nvme /tmp/l2/usr/sbin/nvme\n\
         cp -a /lib/x86_64-linux-gnu /tmp/l2/lib/\n\
         cp -L /lib64/ld-linux-x86-64.so.2 /tmp/l2/lib64/\n",
    );
    writeln!(
        script,
        "for m in {MODULES}; do cp /lab/modules/$m.ko /tmp/l2/modules/; done"
    )
    .unwrap();
    writeln!(
        script,
        "echo {MODULES} | tr ' ' '\\n' > /tmp/l2/modules.order"
    )
    .unwrap();
    script.push_str(
        "cp $S/pattern.bin /tmp/l2/pattern.bin\n\
         cp $S/l2-init /tmp/l2/init && chmod 755 /tmp/l2/init\n\
         (cd /tmp/l2 && find . | cpio -o -H newc > /tmp/l2.cpio) 2>/dev/null\n",
    );
    for mode in ["on", "off"] {
        writeln!(
            script,
            "truncate -s {IMAGE_MIB}M /tmp/nvme-{mode}.img\n\
             SLUICE_LOG=info {sluice} run --kernel $S/vmlinuz --initrd /tmp/l2.cpio --memory 512M \
             --cpus 2 --nvme path=/tmp/nvme-{mode}.img,queues=2,serial={SERIAL},dbbuf={mode} \
             --metrics $S/nvme-{mode}.json --cmdline 'console=ttyS0 panic=-1 loglevel=4' \
             > $S/nvme-{mode}.console 2>&1\n\
             echo sluice-{mode}-exit=$?\n\
             cp /tmp/nvme-{mode}.img $S/nvme-{mode}.img",
            sluice = sluice.display()
        )
        .unwrap();
    }
    script
}

/// The `nvme0` device in a metrics file.
fn nvme_device(metrics: &serde_json::Value) -> serde_json::Value {
    metrics["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device"] == "nvme0"))
        .cloned()
        .unwrap_or_else(|| panic!("no nvme0 in the metrics: {metrics:#}"))
}

/// The `nvme0` device's queues in a metrics file.
fn nvme_queues(metrics: &serde_json::Value) -> Vec<serde_json::Value> {
    nvme_device(metrics)["queues"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn sum(queues: &[serde_json::Value], counter: &str) -> u64 {
    queues
        .iter()
        .skip(1)
        .map(|q| q[counter].as_u64().unwrap_or(0))
        .sum()
}

fn nvme_mmio_writes(metrics: &serde_json::Value) -> u64 {
    metrics["exits"]["per_device"]
        .as_array()
        .and_then(|d| {
            d.iter()
                .find(|d| d["device"].as_str().is_some_and(|n| n.ends_with(" nvme0")))
        })
        .and_then(|d| d["writes"].as_u64())
        .unwrap_or(0)
}

#[test]
fn lab_linux_nvme_driver_on_sluice_nvme() {
    let test = "lab-nvme";
    if sluice_lab::inside_lab() {
        println!("SKIP {test}: already inside the lab");
        return;
    }
    if sluice_lab::skip_without_lab(test) {
        return;
    }
    let sluice = sluice_binary().unwrap_or_else(|e| panic!("cannot build sluice: {e}"));
    let kernel = match l1_kernel() {
        Ok(kernel) => kernel,
        Err(reason) => {
            println!("SKIP {test}: no L1 image ({reason})");
            return;
        }
    };
    let scratch = Scratch::new(test);
    std::fs::copy(&kernel, scratch.path("vmlinuz")).expect("copy the kernel");
    let data = pattern();
    std::fs::write(scratch.path("pattern.bin"), &data).unwrap();
    std::fs::write(scratch.path("l2-init"), L2_INIT).unwrap();

    let run = Lab::new()
        .share(&scratch.dir)
        .timeout(LAB_TIMEOUT)
        .run(&l1_script(&sluice));

    run.assert_success();
    let mut per_request = Vec::new();
    for mode in ["on", "off"] {
        let console = std::fs::read_to_string(scratch.path(&format!("nvme-{mode}.console")))
            .unwrap_or_default();
        let context = || format!("{}\n--- L2 ({mode}) ---\n{console}", run.transcript());
        assert!(
            run.stdout.contains(&format!("sluice-{mode}-exit=0")),
            "{}",
            context()
        );
        assert!(console.contains("L2-NVME-READBACK-OK"), "{}", context());
        assert!(
            console.contains("L2-NVME-PARALLEL-READS-DONE"),
            "{}",
            context()
        );
        assert!(
            console.contains(SERIAL),
            "nvme list shows the serial: {}",
            context()
        );
        assert!(console.contains("sluice NVMe controller"), "{}", context());
        let oacs = if mode == "on" { "0x100" } else { "0" };
        assert!(
            console
                .lines()
                .any(|l| l.starts_with("oacs") && l.trim_end().ends_with(oacs)),
            "id-ctrl oacs {oacs}: {}",
            context()
        );
        assert_eq!(
            console.contains("shadow doorbells at"),
            mode == "on",
            "{}",
            context()
        );
        let image = std::fs::read(scratch.path(&format!("nvme-{mode}.img"))).unwrap();
        assert_eq!(image.len() as u64, IMAGE_MIB << 20);
        assert!(
            image[PATTERN_OFFSET..PATTERN_OFFSET + PATTERN_BYTES] == data[..],
            "the image ({mode}) holds the pattern at 1 MiB"
        );
        assert!(
            image[..PATTERN_OFFSET].iter().all(|b| *b == 0),
            "nothing before it"
        );
        let metrics: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(scratch.path(&format!("nvme-{mode}.json"))).unwrap(),
        )
        .unwrap();
        let queues = nvme_queues(&metrics);
        let (requests, kicks) = (sum(&queues, "requests"), sum(&queues, "kicks"));
        let suppressed = sum(&queues, "notifications_suppressed");
        let interrupts = sum(&queues, "interrupts");
        assert!(requests > 0 && interrupts > 0, "{metrics:#}");
        if mode == "on" {
            assert!(
                suppressed > 0,
                "shadow doorbells saved no exit: {metrics:#}"
            );
        } else {
            assert_eq!(suppressed, 0, "{metrics:#}");
        }
        for line in console
            .lines()
            .filter(|l| l.contains("nvme") && l.contains("queues"))
        {
            println!("{test} ({mode}): {line}");
        }
        println!(
            "{test} (dbbuf={mode}): {requests} I/O requests, {kicks} SQ doorbell writes, \
             {suppressed} commands without a doorbell write, {interrupts} interrupts, \
             {} MMIO writes to the controller in all",
            nvme_mmio_writes(&metrics)
        );
        let counters = &nvme_device(&metrics)["counters"];
        let exits = |name: &str| counters[name].as_u64().unwrap_or(0);
        // With shadow doorbells the I/O SQ doorbells are ioeventfds: only the admin queue's
        // doorbell writes exit. Without, every doorbell write does.
        let admin_kicks = queues[0]["kicks"].as_u64().unwrap_or(0);
        let expected_exits = if mode == "on" {
            admin_kicks
        } else {
            admin_kicks + kicks
        };
        assert_eq!(exits("exits_sq_doorbells"), expected_exits, "{metrics:#}");
        println!(
            "{test} (dbbuf={mode}): exits per register: {}",
            counters
                .as_object()
                .map(|c| c
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_default()
        );
        per_request.push(kicks as f64 / requests as f64);
    }
    println!(
        "{test}: SQ doorbell writes per I/O request: {:.3} with shadow doorbells (none exits), \
         {:.3} without",
        per_request[0], per_request[1]
    );
}
