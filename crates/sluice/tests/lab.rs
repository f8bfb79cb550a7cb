//! The nested lab's own tier (scripts/lab): an L1 Linux in QEMU TCG whose /dev/kvm is kvm_amd,
//! with the topologies the passthrough and vIOMMU work builds on.
//!
//! - The guest kit's SMP workloads on sluice with 2 vCPUs in L1 (hardware-KVM semantics: the
//!   kit's code runs at L1's speed there instead of in kvm_pvm's instruction emulator), and its
//!   NVMe and e1000 drivers on sluice's emulated devices.
//! - `iommu`: L1 runs with interrupt remapping on, the NVMe PF gets 2 SR-IOV VFs, and every
//!   function sits alone in its own IOMMU group; a VF binds to vfio-pci.
//! - `switch` + `numa`: L1 sees two NUMA nodes, the NVMe behind the pxb-pcie root bus on node 1,
//!   and the e1000e below the PCIe switch's downstream port.
//!
//! No QEMU or no way to build the L1 image: a SKIP line. Inside L1 itself: a SKIP line.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::SLUICE;
use sluice_guest_kit::{ExitKind, GuestKitReport};
use sluice_lab::{Lab, LabRun, Topology};

/// L1 boot (~5 s) and what runs in it, with room for a loaded host.
const LAB_TIMEOUT: Duration = Duration::from_secs(300);

fn skip(test: &str) -> bool {
    if sluice_lab::inside_lab() {
        println!("SKIP {test}: already inside the lab");
        return true;
    }
    sluice_lab::skip_without_lab(test)
}

/// Counter increments per CPU in `w=smp` (native speed in L1: cheap).
const SMP_ITERS: u64 = 200_000;
/// The kit's SMP workloads: every vCPU counts on one shared counter, then each vCPU drives
/// its own queue of a two-queue disk (verify), then virtio-rng.
fn smp_workloads() -> String {
    format!(
        "quiet w=smp:iters={SMP_ITERS} \
         w=blk:op=verify:bs=4096:qd=16:queues=2:cpus=2:ops=4000:span_mb=8 w=rng:bytes=4096"
    )
}

#[test]
fn lab_guest_kit_smp_workloads() {
    if skip("lab-guest-kit-smp") {
        return;
    }
    let script = format!(
        "truncate -s 16M /tmp/kit.img && {SLUICE} run --cpus 2 --disk path=/tmp/kit.img,queues=2 \
         --rng --metrics /tmp/kit.json --cmdline '{workloads}'; status=$?; \
         echo METRICS $(tr -d '\\n' < /tmp/kit.json); exit $status",
        workloads = smp_workloads()
    );

    let run = Lab::new().timeout(LAB_TIMEOUT).run(&script);

    let exit = match run.status {
        Some(0) => ExitKind::Pass,
        _ => ExitKind::WorkloadFailed,
    };
    let report = GuestKitReport::parse(&run.stdout, exit);
    let context = || format!("{}\n{}", report.describe(), run.transcript());
    assert!(report.passed(), "{}", context());
    let smp = report.results_for("smp").next().expect("an smp result");
    assert_eq!(smp.raw["cpus"], 2, "{}", context());
    assert_eq!(smp.raw["counter"], 2 * SMP_ITERS, "{}", context());
    assert_eq!(
        smp.ring,
        Some(3),
        "both vCPUs count in ring 3: {}",
        context()
    );
    let blk = report.results_for("blk").next().expect("a blk result");
    assert_eq!(
        blk.ring,
        Some(3),
        "both vCPUs drive I/O in ring 3: {}",
        context()
    );
    let cpu_ops: Vec<u64> = blk.raw["cpu_ops"]
        .as_array()
        .map(|ops| ops.iter().filter_map(|n| n.as_u64()).collect())
        .unwrap_or_default();
    assert!(
        cpu_ops.len() == 2 && cpu_ops.iter().all(|&n| n > 0),
        "both vCPUs drove I/O: {cpu_ops:?}\n{}",
        context()
    );
    let metrics: serde_json::Value = run
        .stdout
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix("METRICS ")?).ok())
        .unwrap_or_else(|| panic!("no metrics\n{}", context()));
    let blk_requests: Vec<u64> = metrics["devices"]
        .as_array()
        .and_then(|d| {
            d.iter()
                .find(|d| d["device"].as_str().is_some_and(|n| n.starts_with("blk")))
        })
        .and_then(|d| d["queues"].as_array())
        .map(|q| {
            q.iter()
                .map(|q| q["requests"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        blk_requests.len() == 2 && blk_requests.iter().all(|&n| n > 0),
        "sluice served both queues: {blk_requests:?}\n{}",
        context()
    );
    println!(
        "lab-guest-kit-smp: smp {} ns for 2x{SMP_ITERS} increments; blk cpu_ops {cpu_ops:?}, \
         queue requests {blk_requests:?}, {} ns",
        smp.raw["elapsed_ns"], blk.raw["elapsed_ns"]
    );
}

/// The guest kit's NVMe and e1000 drivers on sluice's emulated devices under hardware-KVM
/// semantics: NVMe verify on two queue pairs driven by two vCPUs, then e1000 tx into a tap
/// sluice creates in L1; the NVMe's I/O submissions went through shadow doorbells.
#[test]
fn lab_guest_kit_on_emulated_nvme_and_e1000() {
    if skip("lab-guest-kit-emulated") {
        return;
    }
    const FRAMES: u64 = 2000;
    let script = format!(
        "truncate -s 16M /tmp/kit.img && {SLUICE} run --cpus 2 \
         --nvme path=/tmp/kit.img,queues=2 --e1000 tap=kit0 --metrics /tmp/kit.json \
         --cmdline 'quiet w=nvme:op=verify:bs=4096:qd=16:queues=2:cpus=2:span_mb=8 \
         w=e1000:dir=tx:size=64:frames={FRAMES}'; status=$?; \
         echo METRICS $(tr -d '\\n' < /tmp/kit.json); exit $status"
    );

    let run = Lab::new().timeout(LAB_TIMEOUT).run(&script);

    let exit = match run.status {
        Some(0) => ExitKind::Pass,
        _ => ExitKind::WorkloadFailed,
    };
    let report = GuestKitReport::parse(&run.stdout, exit);
    let context = || format!("{}\n{}", report.describe(), run.transcript());
    assert!(report.passed(), "{}", context());
    let nvme = report.results_for("nvme").next().expect("an nvme result");
    assert_eq!(nvme.verify.as_deref(), Some("ok"), "{}", context());
    assert!(
        nvme.raw["doorbell_shadow"].as_u64() > Some(0),
        "{}",
        context()
    );
    let e1000 = report.results_for("e1000").next().expect("an e1000 result");
    assert_eq!(e1000.ops, Some(FRAMES), "{}", context());
    let metrics: serde_json::Value = run
        .stdout
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix("METRICS ")?).ok())
        .unwrap_or_else(|| panic!("no metrics\n{}", context()));
    let device = |prefix: &str| {
        metrics["devices"]
            .as_array()
            .and_then(|d| {
                d.iter()
                    .find(|d| d["device"].as_str().is_some_and(|n| n.starts_with(prefix)))
            })
            .unwrap_or_else(|| panic!("no {prefix} device\n{}", context()))
            .clone()
    };
    let io_requests: u64 = device("nvme")["queues"]
        .as_array()
        .map(|q| {
            q.iter()
                .skip(1)
                .map(|q| q["requests"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    assert!(io_requests >= 2 * 2048, "{}", context());
    println!(
        "lab-guest-kit-emulated: nvme verify {io_requests} I/O commands in {} ns, doorbells \
         {} MMIO / {} shadow-only; e1000 {FRAMES} frames in {} ns; e1000 counters {}",
        nvme.raw["elapsed_ns"],
        nvme.raw["doorbell_mmio"],
        nvme.raw["doorbell_shadow"],
        e1000.raw["elapsed_ns"],
        device("e1000")["counters"]
    );
}

/// One PCI function as L1's sysfs shows it.
#[derive(Debug)]
struct Function {
    id: String,
    class: String,
    group: String,
    is_vf: bool,
}

/// Prints one `fn BDF VENDOR:DEVICE CLASS GROUP VF` line per PCI function.
const LIST_FUNCTIONS: &str = "for d in /sys/bus/pci/devices/*; do \
     g=$(basename \"$(readlink \"$d/iommu_group\")\"); \
     vf=no; [ -e \"$d/physfn\" ] && vf=yes; \
     echo \"fn $(basename \"$d\") $(cat \"$d/vendor\" | cut -c3-):$(cat \"$d/device\" | cut -c3-) $(cat \"$d/class\") ${g:-none} $vf\"; \
     done";

fn functions(run: &LabRun) -> BTreeMap<String, Function> {
    run.stdout
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.strip_prefix("fn ")?.split_whitespace().collect();
            let [bdf, id, class, group, vf] = fields.as_slice() else {
                return None;
            };
            Some((
                bdf.to_string(),
                Function {
                    id: id.to_string(),
                    class: class.to_string(),
                    group: group.to_string(),
                    is_vf: *vf == "yes",
                },
            ))
        })
        .collect()
}

#[test]
fn lab_iommu_topology_gives_each_vf_its_own_group() {
    if skip("lab-iommu") {
        return;
    }
    let script = format!(
        "set -e\n\
         dmesg | grep -o 'DMAR-IR: Enabled IRQ remapping in [a-z0-9]* mode' || true\n\
         vfs=$(lab-enable-vfs 2)\n\
         echo vfs: $vfs\n\
         {LIST_FUNCTIONS}\n\
         for g in /sys/kernel/iommu_groups/*; do echo \"group $(basename $g) $(ls $g/devices | wc -l)\"; done\n\
         first=$(echo $vfs | cut -d' ' -f1)\n\
         node=$(lab-bind-vfio $first)\n\
         [ -c \"$node\" ] && echo \"vfio $first $node\"\n"
    );

    let run = Lab::new()
        .topology(Topology::Iommu)
        .vfs(2)
        .timeout(LAB_TIMEOUT)
        .run(&script);

    run.assert_success();
    let context = run.transcript();
    assert!(
        run.stdout
            .contains("DMAR-IR: Enabled IRQ remapping in xapic mode"),
        "{context}"
    );
    let functions = functions(&run);
    let nvme: Vec<(&String, &Function)> = functions
        .iter()
        .filter(|(_, f)| f.id == "1b36:0010" && f.class == "0x010802")
        .collect();
    let vfs: Vec<_> = nvme.iter().filter(|(_, f)| f.is_vf).collect();
    assert_eq!((nvme.len(), vfs.len()), (3, 2), "a PF and 2 VFs\n{context}");
    let mut groups: Vec<&str> = nvme.iter().map(|(_, f)| f.group.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    assert_eq!(groups.len(), 3, "PF and VFs share a group\n{context}");
    for group in groups {
        let line = format!("group {group} 1");
        assert!(
            run.stdout.lines().any(|l| l == line),
            "group {group} holds other devices\n{context}"
        );
    }
    let first_vf = vfs[0].0;
    assert!(
        run.stdout.contains(&format!("vfio {first_vf} /dev/vfio/")),
        "{context}"
    );
    println!(
        "lab-iommu: VFs {:?} in groups {:?}",
        vfs.iter().map(|(bdf, _)| bdf).collect::<Vec<_>>(),
        vfs.iter().map(|(_, f)| &f.group).collect::<Vec<_>>()
    );
}

#[test]
fn lab_switch_and_numa_topology() {
    if skip("lab-switch-numa") {
        return;
    }
    let script = format!(
        "echo nodes=$(cat /sys/devices/system/node/online)\n\
         {LIST_FUNCTIONS}\n\
         for c in /sys/class/nvme/*; do \
           echo \"nvme $(cat $c/serial | tr -d ' ') node=$(cat $c/device/numa_node)\"; done\n\
         for d in /sys/bus/pci/devices/*; do \
           [ \"$(cat $d/device)\" = 0x10d3 ] && echo \"e1000e-path $(readlink -f $d)\"; done\n\
         true\n"
    );

    let run = Lab::new()
        .topology(Topology::Switch)
        .topology(Topology::Numa)
        .timeout(LAB_TIMEOUT)
        .run(&script);

    run.assert_success();
    let context = run.transcript();
    assert!(run.stdout.contains("nodes=0-1"), "{context}");
    assert!(run.stdout.contains("nvme lab-numa1 node=1"), "{context}");
    let path = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("e1000e-path "))
        .unwrap_or_else(|| panic!("no e1000e\n{context}"));
    // .../<root port>/<switch upstream>/<switch downstream>/<e1000e>
    let bdfs: Vec<&str> = path.split('/').filter(|c| c.starts_with("0000:")).collect();
    let functions = functions(&run);
    let ids: Vec<&str> = bdfs
        .iter()
        .map(|bdf| functions.get(*bdf).map_or("?", |f| f.id.as_str()))
        .collect();
    assert_eq!(
        ids[ids.len().saturating_sub(3)..],
        ["104c:8232", "104c:8233", "8086:10d3"],
        "the e1000e is not below the switch: {path}\n{context}"
    );
}
