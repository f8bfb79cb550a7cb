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
//! - VFIO: an NVMe VF bound to vfio-pci is assigned to sluice (`--device vfio=`); the guest
//!   kit's NVMe driver verifies through it, and L1 reads the pattern back through the PF's
//!   namespace; a VF not bound to vfio-pci is refused by name, and so is a bound one when
//!   sluice runs in a memory cgroup below the guest RAM `dma=all` would pin (the limit named).
//! - A hostile guest: the kit programs the assigned VF to DMA far outside its RAM; L1's IOMMU
//!   refuses it (a DMAR fault naming the VF in L1's dmesg), sluice and the VM carry on, and a
//!   verify on the same queue passes.
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

/// The guest kit's report from a lab run whose script exits with sluice's status.
fn kit_report(run: &LabRun) -> GuestKitReport {
    let exit = match run.status {
        Some(0) => ExitKind::Pass,
        _ => ExitKind::WorkloadFailed,
    };
    GuestKitReport::parse(&run.stdout, exit)
}

/// The `iommu` topology with the NVMe PF's two VFs enabled.
fn with_two_vfs() -> Lab {
    Lab::new()
        .topology(Topology::Iommu)
        .vfs(2)
        .timeout(LAB_TIMEOUT)
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

    let report = kit_report(&run);
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

    let report = kit_report(&run);
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

    let run = with_two_vfs().run(&script);

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

/// The verify span the assigned VF gets (small: L1 runs under TCG) and the pattern's seed.
const VFIO_SPAN_MB: u64 = 1;
const VFIO_SEED: u64 = 7;
const VFIO_BLOCK: u64 = 4096;

/// `BLOCK n hex...` lines: 4 KiB blocks L1 read through the PF's namespace after the run.
fn dumped_blocks(stdout: &str) -> BTreeMap<u64, Vec<u8>> {
    let mut blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("BLOCK ") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let Some(block) = fields.next().and_then(|b| b.parse().ok()) else {
            continue;
        };
        let bytes = fields.filter_map(|h| u8::from_str_radix(h, 16).ok());
        blocks.entry(block).or_default().extend(bytes);
    }
    blocks
}

/// L1 shell lines that run sluice with the bound VF `$vf` inside a memory cgroup whose
/// memory.max (64 MiB) is below the guest RAM `dma=all` would pin (the default 128 MiB).
fn cgroup_refusal() -> String {
    format!(
        "mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup\n\
         echo +memory > /sys/fs/cgroup/cgroup.subtree_control\n\
         mkdir -p /sys/fs/cgroup/small && echo 64M > /sys/fs/cgroup/small/memory.max\n\
         out=$(sh -c \"echo \\$\\$ > /sys/fs/cgroup/small/cgroup.procs && exec {SLUICE} run --device vfio=$vf\" 2>&1)\n\
         echo \"cgroup-status $?\"\n\
         echo \"$out\" | sed 's/^/CGROUP /'\n"
    )
}

#[test]
fn lab_vfio_nvme_vf_on_sluice_verifies_and_the_pf_reads_the_data() {
    if skip("lab-vfio-nvme") {
        return;
    }
    let last = VFIO_SPAN_MB * (1 << 20) / VFIO_BLOCK - 1;
    let beyond = last + 1;
    let workload = format!(
        "w=nvme:op=verify:bs={VFIO_BLOCK}:qd=4:queues=1:span_mb={VFIO_SPAN_MB}:seed={VFIO_SEED}"
    );
    // Zero the span (and the block after it) through the PF first, so the pattern read back
    // afterwards can only come from the run. The second VF stays unbound: sluice must refuse it.
    let script = format!(
        "set -e\n\
         ns=$(ls /dev/nvme*n1 | head -1)\n\
         dd if=/dev/zero of=$ns bs=1M count={zero_mb} conv=fsync 2>/dev/null\n\
         vfs=$(lab-enable-vfs 2)\n\
         vf=$(echo $vfs | cut -d' ' -f1); unbound=$(echo $vfs | cut -d' ' -f2)\n\
         echo \"vf $vf unbound $unbound\"\n\
         set +e\n\
         out=$({SLUICE} run --device vfio=$unbound --cmdline 'quiet {workload}' 2>&1); echo \"refused-status $?\"\n\
         echo \"$out\" | sed 's/^/REFUSED /'\n\
         set -e\n\
         lab-bind-vfio $vf\n\
         set +e\n\
         {cgroup_refusal}\
         {SLUICE} run --device vfio=$vf --metrics /tmp/vfio.json --cmdline 'quiet {workload}'; status=$?\n\
         echo METRICS $(tr -d '\\n' < /tmp/vfio.json)\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         for b in 0 17 {last} {beyond}; do\n\
           echo \"BLOCK $b $(dd if=$ns bs={VFIO_BLOCK} skip=$b count=1 2>/dev/null | od -An -tx1 -v | tr -s ' \\n' '  ')\"\n\
         done\n\
         exit $status\n",
        zero_mb = VFIO_SPAN_MB + 1,
        cgroup_refusal = cgroup_refusal(),
    );

    let run = with_two_vfs().run(&script);

    let report = kit_report(&run);
    let context = || format!("{}\n{}", report.describe(), run.transcript());
    // (c) the unbound VF is refused, by name, before the guest starts.
    let unbound = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("vf ")?.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("no VF line\n{}", context()))
        .to_string();
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("refused-status ") && l != "refused-status 0"),
        "sluice started with an unbound VF\n{}",
        context()
    );
    assert!(
        run.stdout
            .contains(&format!("{unbound} is not bound to vfio-pci (no driver)")),
        "{}",
        context()
    );
    // (a) the kit's NVMe driver verified every block through the assigned VF.
    assert!(report.passed(), "{}", context());
    let nvme = report
        .results_for("nvme")
        .next()
        .unwrap_or_else(|| panic!("no nvme RESULT\n{}", context()));
    assert_eq!(nvme.verify.as_deref(), Some("ok"), "{}", context());
    assert_eq!(nvme.errors, Some(0), "{}", context());
    let ops = 2 * VFIO_SPAN_MB * (1 << 20) / VFIO_BLOCK;
    assert_eq!(nvme.ops, Some(ops), "{}", context());
    // The data reached the device: L1 reads the pattern through the PF's view of the namespace.
    let blocks = dumped_blocks(&run.stdout);
    for block in [0, 17, last] {
        let bytes = blocks
            .get(&block)
            .filter(|b| b.len() == VFIO_BLOCK as usize)
            .unwrap_or_else(|| panic!("block {block} not dumped\n{}", context()));
        let checked =
            sluice_guest_kit::pattern::check_pattern(VFIO_SEED, block * VFIO_BLOCK, bytes);
        assert_eq!(
            checked,
            Ok(()),
            "block {block} through the PF\n{}",
            context()
        );
    }
    assert!(
        blocks
            .get(&beyond)
            .is_some_and(|b| b.iter().all(|&x| x == 0)),
        "the block after the span stays zero\n{}",
        context()
    );
    // (d) in a memory cgroup too small for the guest RAM it would pin, the bound VF is refused
    // with the limit named, before anything is mapped.
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("cgroup-status ") && l != "cgroup-status 0"),
        "sluice started in a cgroup too small to pin its RAM\n{}",
        context()
    );
    assert!(
        run.stdout.contains(
            "cannot set up device vfio: dma=all pins all guest RAM: the memory cgroup limit \
             /sys/fs/cgroup/small/memory.max is 64 MiB, 128 MiB needed"
        ),
        "{}",
        context()
    );
    // Doorbells and registers go straight to the VF's BAR (KVM memory slots), not through exits;
    // all guest RAM was mapped for its DMA.
    let metrics: serde_json::Value = run
        .stdout
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix("METRICS ")?).ok())
        .unwrap_or_else(|| panic!("no metrics\n{}", context()));
    let vfio_exits: u64 = metrics["exits"]["per_device"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["device"].as_str().is_some_and(|n| n.contains("vfio")))
        .map(|d| d["reads"].as_u64().unwrap_or(0) + d["writes"].as_u64().unwrap_or(0))
        .sum();
    let doorbells = nvme.raw["doorbell_mmio"].as_u64().unwrap_or(0);
    assert!(doorbells > 0, "{}", context());
    assert!(
        vfio_exits < doorbells,
        "{vfio_exits} BAR exits for {doorbells} doorbell writes\n{}",
        context()
    );
    let mapped = metrics["vfio"][0]["dma_mapped_bytes"].as_u64().unwrap_or(0);
    assert_eq!(
        mapped,
        128 << 20,
        "all guest RAM (the default 128M) mapped\n{}",
        context()
    );
    println!(
        "lab-vfio-nvme: verify ok over {ops} ops, {doorbells} doorbell writes, {vfio_exits} BAR \
         exits, {} ns, {mapped} bytes mapped for DMA",
        nvme.raw["elapsed_ns"]
    );
}

/// The address the kit's `hostile=dma_outside` Read points PRP1 at (guest/src/drivers/nvme.rs).
const HOSTILE_DMA_ADDR: u64 = 0xF_0000_0000;

/// `DMESG ...` lines that report a DMAR fault (Linux's intel-iommu: "DMAR: [DMA Write ...]
/// Request device [bb:dd.f] fault addr 0x...").
fn dmar_faults(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("DMESG "))
        .filter(|l| l.contains("DMAR") && l.contains("fault addr"))
        .collect()
}

#[test]
fn lab_hostile_guest_dma_outside_its_memory_is_refused_by_the_l1_iommu() {
    if skip("lab-vfio-hostile-dma") {
        return;
    }
    // The hostile Read first, then a normal verify on the same queue of the same controller.
    let workload = format!(
        "w=nvme:hostile=dma_outside:op=verify:bs={VFIO_BLOCK}:qd=4:queues=1:\
         span_mb={VFIO_SPAN_MB}:seed={VFIO_SEED}"
    );
    let marker = VFIO_SPAN_MB * (1 << 20) / VFIO_BLOCK + 8;
    // A random block outside the verify span, written through the PF: the hostile guest must
    // not change it (its checksum before and after the run).
    let script = format!(
        "set -e\n\
         ns=$(ls /dev/nvme*n1 | head -1)\n\
         dd if=/dev/urandom of=$ns bs={VFIO_BLOCK} seek={marker} count=1 conv=fsync 2>/dev/null\n\
         echo \"MARKER-BEFORE $(dd if=$ns bs={VFIO_BLOCK} skip={marker} count=1 iflag=direct 2>/dev/null | sha256sum)\"\n\
         vf=$(lab-enable-vfs 2 | head -1)\n\
         echo \"vf $vf\"\n\
         lab-bind-vfio $vf >/dev/null\n\
         dmesg -c >/dev/null\n\
         set +e\n\
         {SLUICE} run --device vfio=$vf --cmdline 'quiet {workload}'; status=$?\n\
         echo \"sluice-status $status\"\n\
         sleep 1\n\
         dmesg | sed 's/^/DMESG /'\n\
         echo \"MARKER-AFTER $(dd if=$ns bs={VFIO_BLOCK} skip={marker} count=1 iflag=direct 2>/dev/null | sha256sum)\"\n\
         exit $status\n"
    );

    let run = with_two_vfs().run(&script);

    let report = kit_report(&run);
    let context = || format!("{}\n{}", report.describe(), run.transcript());
    // sluice kept running: the kit went on to its verify and the VM ended with its verdict.
    assert!(
        run.stdout.lines().any(|l| l == "sluice-status 0"),
        "{}",
        context()
    );
    assert!(report.passed(), "{}", context());
    let hostile = report
        .results_for("nvme_hostile")
        .next()
        .unwrap_or_else(|| panic!("no nvme_hostile RESULT\n{}", context()));
    assert_eq!(hostile.raw["addr"], HOSTILE_DMA_ADDR, "{}", context());
    assert_eq!(hostile.raw["controller_fatal"], false, "{}", context());
    // The device and the VM still work: the verify after it, on the same queue, passed.
    let nvme = report
        .results_for("nvme")
        .next()
        .unwrap_or_else(|| panic!("no nvme RESULT\n{}", context()));
    assert!(nvme.pass, "{}", context());
    assert_eq!(nvme.verify.as_deref(), Some("ok"), "{}", context());
    assert_eq!(nvme.errors, Some(0), "{}", context());
    // L1's IOMMU refused the DMA: a DMAR fault naming the VF (bus:dev.fn, no domain) at the
    // hostile address.
    let vf = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("vf "))
        .unwrap_or_else(|| panic!("no VF line\n{}", context()))
        .trim()
        .to_string();
    let source = vf.strip_prefix("0000:").unwrap_or(&vf).to_string();
    let faults = dmar_faults(&run.stdout);
    let fault = faults
        .iter()
        .find(|l| {
            l.contains(&format!("[{source}]"))
                && l.contains(&format!("fault addr {HOSTILE_DMA_ADDR:#x}"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no DMAR fault for {source} at {HOSTILE_DMA_ADDR:#x} in L1's dmesg\n{}",
                context()
            )
        });
    // The PF's other data is untouched.
    let marker_sum = |tag: &str| {
        run.stdout
            .lines()
            .find_map(|l| l.strip_prefix(tag))
            .map(|s| s.trim().to_string())
            .filter(|s| s.len() >= 64)
            .unwrap_or_else(|| panic!("no {tag}\n{}", context()))
    };
    assert_eq!(
        marker_sum("MARKER-BEFORE "),
        marker_sum("MARKER-AFTER "),
        "the PF's block {marker} changed\n{}",
        context()
    );
    println!(
        "lab-vfio-hostile-dma: completed {} with status {}, then verify ok over {:?} ops; L1: {fault}",
        hostile.raw["completed"],
        hostile.raw["hostile_status"],
        nvme.ops
    );
}

/// Least privilege end to end: an NVMe VF behind sluice's VT-d (`dma=on-demand`), driven by
/// the guest kit with its own VT-d driver (`iommu=vtd`), which maps only its DMA buffers. The
/// host IOMMU then maps only those pages, so the kit's Read into a page of its own RAM that it
/// never mapped is refused by L1's IOMMU — the page keeps its fill, L1 logs a DMAR fault for
/// the VF at that page — while the verify after it passes, and sluice never mapped more than
/// a sliver of guest RAM.
#[test]
fn lab_vf_behind_the_viommu_cannot_reach_guest_ram_the_guest_did_not_map() {
    if skip("lab-vfio-viommu-hostile") {
        return;
    }
    let workload = format!(
        "iommu=vtd w=nvme:hostile=dma_unmapped:op=verify:bs={VFIO_BLOCK}:qd=4:queues=1:\
         span_mb={VFIO_SPAN_MB}:seed={VFIO_SEED}"
    );
    let script = format!(
        "set -e\n\
         vf=$(lab-enable-vfs 2 | head -1)\n\
         echo \"vf $vf\"\n\
         lab-bind-vfio $vf >/dev/null\n\
         dmesg -c >/dev/null\n\
         set +e\n\
         {SLUICE} run --iommu vtd --device vfio=$vf --metrics /tmp/vfio.json \
           --cmdline 'quiet {workload}'; status=$?\n\
         echo \"sluice-status $status\"\n\
         echo METRICS $(tr -d '\\n' < /tmp/vfio.json)\n\
         sleep 1\n\
         dmesg | sed 's/^/DMESG /'\n\
         exit $status\n"
    );

    let run = with_two_vfs().run(&script);

    let report = kit_report(&run);
    let context = || format!("{}\n{}", report.describe(), run.transcript());
    assert!(report.passed(), "{}", context());
    let hostile = report
        .results_for("nvme_hostile")
        .next()
        .unwrap_or_else(|| panic!("no nvme_hostile RESULT\n{}", context()));
    assert_eq!(hostile.raw["iommu"], true, "{}", context());
    assert_eq!(hostile.raw["page_intact"], true, "{}", context());
    let page = hostile.raw["addr"].as_u64().unwrap_or(0);
    let nvme = report
        .results_for("nvme")
        .next()
        .unwrap_or_else(|| panic!("no nvme RESULT\n{}", context()));
    assert_eq!(nvme.verify.as_deref(), Some("ok"), "{}", context());
    let vf = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("vf "))
        .unwrap_or_else(|| panic!("no VF line\n{}", context()))
        .trim()
        .to_string();
    let source = vf.strip_prefix("0000:").unwrap_or(&vf).to_string();
    let faults = dmar_faults(&run.stdout);
    assert!(
        faults
            .iter()
            .any(|l| l.contains(&format!("[{source}]"))
                && l.contains(&format!("fault addr {page:#x}"))),
        "no DMAR fault for {source} at {page:#x} in L1's dmesg\n{}",
        context()
    );
    let metrics: serde_json::Value = run
        .stdout
        .lines()
        .find_map(|l| serde_json::from_str(l.strip_prefix("METRICS ")?).ok())
        .unwrap_or_else(|| panic!("no metrics\n{}", context()));
    let peak = metrics["vfio"][0]["dma_mapped_peak_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        peak < (128 << 20) / 16,
        "peak {peak} bytes mapped of 128 MiB\n{metrics:#}\n{}",
        context()
    );
    println!(
        "lab-vfio-viommu-hostile: page {page:#x} intact, L1 refused it, verify ok; peak {peak} \
         bytes mapped for DMA of 128 MiB"
    );
}
