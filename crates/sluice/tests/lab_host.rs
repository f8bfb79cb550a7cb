//! The host side of passthrough in the nested lab (docs/testing.md), where L1 has what this
//! host lacks:
//! - `iommu`: the NVMe PF's VFs made by `sluice vf create` (with the nvme-cli steps it prints
//!   run as printed) come online; `sluice host-check` says not ready for the PF on its nvme
//!   driver and ready for a VF on vfio-pci (VT-d, IR-PCI-MSI, its own group, ACS on the root
//!   port); `sluice vf reset` resets a VF by FLR; `sluice vf quarantine` leaves a function with
//!   no driver, Bus Master off, and no driver able to bind it.
//! - `numa` (2 CPUs: node 1 gets the second): `sluice run --numa 1` runs every thread on node
//!   1's CPU and binds guest RAM to node 1 (/proc/PID/task/*/status, /proc/PID/numa_maps).
//!
//! No QEMU or no L1 image: a SKIP line. Inside L1 itself: a SKIP line.

mod common;

use std::time::Duration;

use common::SLUICE;
use sluice_lab::{Lab, Topology};

const LAB_TIMEOUT: Duration = Duration::from_secs(300);

fn skip(test: &str) -> bool {
    if sluice_lab::inside_lab() {
        println!("SKIP {test}: already inside the lab");
        return true;
    }
    sluice_lab::skip_without_lab(test)
}

/// The value after `KEY=` on the line that starts with it.
fn value<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The text between `BEGIN name` and `END name` lines.
fn section<'a>(stdout: &'a str, name: &str) -> &'a str {
    let begin = format!("BEGIN {name}\n");
    let end = format!("END {name}\n");
    stdout
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map_or("", |(inside, _)| inside)
}

#[test]
fn lab_host_check_and_vf_create_reset_quarantine_on_the_nvme_pf() {
    if skip("lab-host-check-vf") {
        return;
    }
    let script = format!(
        r#"set -u
S={SLUICE}
pf=
for d in /sys/bus/pci/devices/*; do
    if [ -e "$d/sriov_totalvfs" ] && [ "$(cat $d/class)" = 0x010802 ]; then pf=$(basename $d); break; fi
done
echo PF=$pf
P=/sys/bus/pci/devices/$pf
echo BEGIN pf-check; $S host-check $pf; echo PF_CHECK_STATUS=$?; echo END pf-check
ctrl=/dev/$(ls $P/nvme)
# The steps before (sluice prints them; they must precede sriov_numvfs).
nvme virt-mgmt $ctrl -c 0 -r 1 -a 1 -n 0 >/dev/null
nvme virt-mgmt $ctrl -c 0 -r 0 -a 1 -n 0 >/dev/null
echo 1 > $P/reset
echo 0 > $P/sriov_drivers_autoprobe
echo BEGIN create; $S vf create --pf $pf --count 2 > /tmp/create.txt; echo CREATE_STATUS=$?; cat /tmp/create.txt; echo END create
echo BEGIN create-again; $S vf create --pf $pf --count 1 2>&1; echo AGAIN_STATUS=$?; echo END create-again
# The steps after, run exactly as sluice printed them.
grep -E '^ +nvme virt-mgmt .* -c [1-9]' /tmp/create.txt | sed 's/#.*//' > /tmp/after.sh
sh -e /tmp/after.sh; echo AFTER_STATUS=$?
echo BEGIN secondary; nvme list-secondary $ctrl; echo END secondary
vf1=$(basename $(readlink $P/virtfn0)); vf2=$(basename $(readlink $P/virtfn1))
echo VF1=$vf1; echo VF2=$vf2
lab-bind-vfio $vf1 >/dev/null
echo BEGIN vf-check; $S host-check $vf1 --memory 512M; echo VF_CHECK_STATUS=$?; echo END vf-check
$S host-check $vf1 --memory 512M --json > /tmp/vf.json; echo JSON_STATUS=$?
echo BEGIN vf-json; cat /tmp/vf.json; echo END vf-json
echo BEGIN reset; $S vf reset $vf1; echo RESET_STATUS=$?; echo END reset
echo PF_COMMAND_BEFORE=$(od -An -tx2 -j4 -N2 $P/config | tr -d ' ')
echo BEGIN quarantine; $S vf quarantine $pf; echo QUARANTINE_STATUS=$?; echo END quarantine
echo $pf > /sys/bus/pci/drivers_probe 2>/dev/null
echo PF_DRIVER_AFTER=$(basename "$(readlink $P/driver 2>/dev/null)")
echo PF_OVERRIDE_AFTER=$(cat $P/driver_override)
echo PF_COMMAND_AFTER=$(od -An -tx2 -j4 -N2 $P/config | tr -d ' ')
true
"#
    );

    let run = Lab::new()
        .topology(Topology::Iommu)
        .vfs(2)
        .timeout(LAB_TIMEOUT)
        .run(&script);

    run.assert_success();
    let out = &run.stdout;
    let context = run.transcript();
    // The PF on nvme is not ready for assignment; the IOMMU itself is.
    let pf_check = section(out, "pf-check");
    assert_eq!(value(pf_check, "PF_CHECK_STATUS"), Some("1"), "{context}");
    assert!(
        pf_check.contains("bound to nvme, not vfio-pci"),
        "{context}"
    );
    assert!(
        pf_check
            .lines()
            .any(|l| l.starts_with("iommu ") && l.contains(" ok ")),
        "{context}"
    );
    // vf create wrote sriov_numvfs, printed the NVMe steps, and refused a second create.
    let create = section(out, "create");
    assert_eq!(value(create, "CREATE_STATUS"), Some("0"), "{context}");
    assert!(create.contains("sriov_numvfs 2 of 2"), "{context}");
    assert!(create.contains("nvme virt-mgmt"), "{context}");
    let again = section(out, "create-again");
    assert_eq!(value(again, "AGAIN_STATUS"), Some("125"), "{context}");
    assert!(again.contains("already has 2 VFs"), "{context}");
    // The printed steps brought both secondary controllers online.
    assert_eq!(value(out, "AFTER_STATUS"), Some("0"), "{context}");
    let secondary = section(out, "secondary").to_lowercase();
    assert_eq!(secondary.matches("online").count(), 2, "{context}");
    // The VF on vfio-pci: ready.
    let vf1 = value(out, "VF1").expect("a VF");
    let vf_check = section(out, "vf-check");
    assert_eq!(value(vf_check, "VF_CHECK_STATUS"), Some("0"), "{context}");
    assert!(vf_check.contains("host-check: READY"), "{context}");
    let report: serde_json::Value =
        serde_json::from_str(section(out, "vf-json")).unwrap_or_else(|e| panic!("{e}\n{context}"));
    assert_eq!(report["ready"], true, "{context}");
    let device = &report["devices"][0];
    assert_eq!(device["bdf"], vf1, "{context}");
    assert_eq!(device["driver"], "vfio-pci", "{context}");
    assert_eq!(
        device["group"].as_array().map(Vec::len),
        Some(1),
        "alone in its group\n{context}"
    );
    assert_eq!(device["physfn"], value(out, "PF").unwrap(), "{context}");
    assert!(
        report["iommu"]["remapped_chips"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "{context}"
    );
    let root_port = &device["bridges"][0];
    assert_eq!(root_port["port_type"], "root_port", "{context}");
    // Reset: by the kernel, naming its methods.
    let reset = section(out, "reset");
    assert_eq!(value(reset, "RESET_STATUS"), Some("0"), "{context}");
    assert!(reset.contains("reset_method: "), "{context}");
    // Quarantine of the PF (bus master on while nvme drives it): off, unbound, and no probe
    // binds it again.
    let quarantine = section(out, "quarantine");
    assert_eq!(
        value(quarantine, "QUARANTINE_STATUS"),
        Some("0"),
        "{context}"
    );
    assert!(quarantine.contains("unbound from nvme"), "{context}");
    let before = u16::from_str_radix(value(out, "PF_COMMAND_BEFORE").unwrap(), 16).unwrap();
    let after = u16::from_str_radix(value(out, "PF_COMMAND_AFTER").unwrap(), 16).unwrap();
    assert_ne!(before & 0x4, 0, "Bus Master was on under nvme\n{context}");
    assert_eq!(after & 0x4, 0, "Bus Master is off\n{context}");
    assert_eq!(value(out, "PF_DRIVER_AFTER"), Some(""), "{context}");
    assert_eq!(
        value(out, "PF_OVERRIDE_AFTER"),
        Some("sluice-quarantine"),
        "{context}"
    );
    assert!(
        quarantine.contains(&format!("{before:#06x} -> {after:#06x} (Bus Master off)")),
        "the report shows the register as the driver left it and as it is now\n{context}"
    );
    let secondary = section(out, "secondary");
    println!(
        "lab-host-check-vf:\n{pf_check}{create}{again}{secondary}{}{reset}{quarantine}",
        section(out, "vf-check")
    );
}

#[test]
fn lab_numa_node_1_places_threads_and_guest_ram() {
    if skip("lab-numa-placement") {
        return;
    }
    let script = format!(
        r#"set -u
echo NODE1_CPUS=$(cat /sys/devices/system/node/node1/cpulist)
for c in /sys/class/nvme/*; do echo "NVME $(cat $c/serial | tr -d ' ') node=$(cat $c/device/numa_node)"; done
dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
SLUICE_LOG=info {SLUICE} run --numa 1 --cpus 2 --memory 256M --serial off \
    --disk path=/tmp/disk.img,queues=2 \
    --cmdline 'w=blk:op=randread:ops=10000000:cpus=2:queues=2 quiet' 2>/tmp/sluice.log &
pid=$!
# Wait until the vCPUs and the queue workers run (they start at device activation).
i=0
while [ $i -lt 150 ] && [ $(ls /proc/$pid/task 2>/dev/null | wc -l) -lt 5 ]; do sleep 0.2; i=$((i+1)); done
sleep 1
for t in /proc/$pid/task/*; do
    echo "THREAD $(cat $t/comm) $(grep Cpus_allowed_list $t/status | tr -d '\t')"
done
echo BEGIN numa_maps; grep sluice-guest-ram /proc/$pid/numa_maps; echo END numa_maps
kill $pid; wait $pid
echo BEGIN log; cat /tmp/sluice.log; echo END log
true
"#
    );

    let run = Lab::new()
        .topology(Topology::Numa)
        .smp(2)
        .timeout(LAB_TIMEOUT)
        .run(&script);

    run.assert_success();
    let out = &run.stdout;
    let context = run.transcript();
    assert_eq!(value(out, "NODE1_CPUS"), Some("1"), "{context}");
    assert!(out.contains("NVME lab-numa1 node=1"), "{context}");
    let threads: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("THREAD "))
        .collect();
    assert!(
        threads.len() >= 5,
        "main, 2 vCPUs, 2 queue workers\n{context}"
    );
    for thread in &threads {
        assert!(
            thread.ends_with("Cpus_allowed_list:1"),
            "thread off node 1: {thread}\n{context}"
        );
    }
    let maps = section(out, "numa_maps");
    assert!(!maps.is_empty(), "{context}");
    for line in maps.lines() {
        assert!(line.contains(" bind:1 "), "{line}\n{context}");
        assert!(
            line.contains(" N1="),
            "guest RAM pages on node 1: {line}\n{context}"
        );
        assert!(
            !line.contains(" N0="),
            "no guest RAM page on node 0: {line}\n{context}"
        );
    }
    assert!(
        section(out, "log").contains("guest RAM (256 MiB) bound to node 1"),
        "{context}"
    );
    println!("lab-numa-placement: threads {threads:?}\nnuma_maps: {maps}");
}
