//! `sluice host-check` and `sluice vf` through the binary: on this host (no IOMMU here: not
//! ready, with reasons and fixes, status 1), and against a fake sysfs/procfs tree given by
//! `SLUICE_HOST_ROOT` (a ready VF; `vf create` writing sriov_numvfs; a refused create).
//! The real IOMMU, VFs and NUMA nodes are in the lab tests (tests/lab.rs).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{EXIT_VMM_ERROR, SLUICE};

const EXIT_NOT_READY: i32 = 1;

struct Output {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn transcript(&self) -> String {
        format!(
            "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn sluice(args: &[&str], root: Option<&Path>) -> Output {
    let mut command = Command::new(SLUICE);
    command.args(args).env_remove("SLUICE_LOG");
    match root {
        Some(root) => command.env("SLUICE_HOST_ROOT", root),
        None => command.env_remove("SLUICE_HOST_ROOT"),
    };
    let output = command.output().expect("run sluice");
    Output {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A fresh fake tree under the target's tmp directory.
fn fake_tree(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("host")
        .join(format!("{}.{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(root: &Path, relative: &str, text: impl AsRef<[u8]>) {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn symlink(root: &Path, relative: &str, target: &Path) {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, path).unwrap();
}

/// A 4 KiB config space: PCIe capability of `port` type at 0x40, ACS (all enabled) at 0x100
/// when `acs`.
fn config(port: u16, acs: bool) -> Vec<u8> {
    let mut bytes = vec![0u8; 4096];
    bytes[0x06] = 1 << 4;
    bytes[0x34] = 0x40;
    bytes[0x40] = 0x10;
    bytes[0x42..0x44].copy_from_slice(&(2 | (port << 4)).to_le_bytes());
    if acs {
        bytes[0x100..0x104].copy_from_slice(&(0x000du32 | (1 << 16)).to_le_bytes());
        bytes[0x104..0x108].copy_from_slice(&0x001f_001fu32.to_le_bytes());
    }
    bytes
}

/// A PCI function below sys/devices with its driver and IOMMU group.
fn function(root: &Path, path: &str, driver: &str, group: u32) -> PathBuf {
    let dir = root.join("sys/devices").join(path);
    let bdf = dir.file_name().unwrap().to_str().unwrap().to_string();
    let port = if driver == "pcieport" { 4 } else { 0 };
    write(&dir, "config", config(port, driver == "pcieport"));
    write(&dir, "vendor", "0x1b36\n");
    write(&dir, "device", "0x0010\n");
    write(&dir, "class", "0x010802\n");
    write(&dir, "numa_node", "1\n");
    write(&dir, "driver_override", "(null)\n");
    symlink(root, &format!("sys/bus/pci/devices/{bdf}"), &dir);
    let driver_dir = root.join("sys/bus/pci/drivers").join(driver);
    fs::create_dir_all(&driver_dir).unwrap();
    symlink(&dir, "driver", &driver_dir);
    let group_dir = root.join(format!("sys/kernel/iommu_groups/{group}"));
    symlink(&group_dir, &format!("devices/{bdf}"), &dir);
    symlink(&dir, "iommu_group", &group_dir);
    dir
}

/// VT-d with interrupt remapping, VFIO, an NVMe PF (2 VFs possible, none enabled) behind a
/// root port with ACS, and a function on vfio-pci.
fn ready_host(name: &str) -> PathBuf {
    let root = fake_tree(name);
    write(&root, "dev/kvm", "");
    write(&root, "dev/vfio/vfio", "");
    write(
        &root,
        "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
        "N\n",
    );
    write(&root, "sys/firmware/acpi/tables/DMAR", [0u8; 48]);
    write(&root, "sys/class/iommu/dmar0/intel-iommu/ecap", "f00f4a\n");
    write(&root, "proc/cmdline", "intel_iommu=on\n");
    write(
        &root,
        "proc/interrupts",
        " 25: 1 IR-PCI-MSI 524288-edge nvme0q0\n",
    );
    write(
        &root,
        "proc/self/limits",
        "Max locked memory         unlimited            unlimited            bytes\n",
    );
    write(&root, "proc/self/cgroup", "0::/\n");
    function(&root, "pci0000:00/0000:00:01.0", "pcieport", 1);
    let pf = function(&root, "pci0000:00/0000:00:01.0/0000:01:00.0", "nvme", 5);
    write(&pf, "sriov_totalvfs", "2\n");
    write(&pf, "sriov_numvfs", "0\n");
    write(&pf, "nvme/nvme0/dev", "259:0\n");
    let vf = function(&root, "pci0000:00/0000:00:01.0/0000:01:00.1", "vfio-pci", 6);
    write(&vf, "reset_method", "flr\n");
    root
}

#[test]
fn host_check_on_this_host_without_an_iommu_is_not_ready_with_reasons() {
    let has_iommu = fs::read_dir("/sys/class/iommu").is_ok_and(|mut d| d.next().is_some());
    if has_iommu {
        println!("SKIP host_check_on_this_host: this host has an IOMMU");
        return;
    }

    let table = sluice(&["host-check", "--memory", "256M"], None);
    let json = sluice(&["host-check", "--json"], None);

    assert_eq!(table.status, Some(EXIT_NOT_READY), "{}", table.transcript());
    assert!(
        table.stdout.contains("host-check: NOT READY"),
        "{}",
        table.transcript()
    );
    let iommu_line = table
        .stdout
        .lines()
        .find(|l| l.starts_with("iommu "))
        .unwrap_or_else(|| panic!("no iommu line\n{}", table.transcript()));
    assert!(iommu_line.contains("FAIL"), "{iommu_line}");
    assert!(
        table.stdout.contains("guest RAM to pin 256 MiB"),
        "{}",
        table.transcript()
    );
    assert_eq!(json.status, Some(EXIT_NOT_READY), "{}", json.transcript());
    let report: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(report["ready"], false);
    let checks = report["checks"].as_array().unwrap();
    let failed: Vec<&serde_json::Value> = checks.iter().filter(|c| c["status"] == "fail").collect();
    assert!(
        failed.iter().any(|c| c["name"] == "iommu"),
        "{}",
        json.stdout
    );
    assert!(
        failed.iter().all(|c| c["fix"].is_string()),
        "a failure without a fix\n{}",
        json.stdout
    );
}

#[test]
fn host_check_on_a_fake_ready_host_passes_and_reports_the_vf() {
    let root = ready_host("ready");

    let run = sluice(&["host-check", "01:00.1", "--json"], Some(&root));

    assert_eq!(run.status, Some(0), "{}", run.transcript());
    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(report["ready"], true);
    let device = &report["devices"][0];
    assert_eq!(device["bdf"], "0000:01:00.1");
    assert_eq!(device["driver"], "vfio-pci");
    assert_eq!(device["iommu_group"], 6);
    assert_eq!(device["numa_node"], 1);
    assert_eq!(device["bridges"][0]["bdf"], "0000:00:01.0");
    assert_eq!(device["bridges"][0]["port_type"], "root_port");
    assert_eq!(device["bridges"][0]["acs"]["enabled"]["rr"], true);

    // The PF stays on nvme: not ready for assignment, with the commands that fix it.
    let pf = sluice(&["host-check", "0000:01:00.0"], Some(&root));
    assert_eq!(pf.status, Some(EXIT_NOT_READY), "{}", pf.transcript());
    assert!(
        pf.stdout.contains("bound to nvme, not vfio-pci"),
        "{}",
        pf.transcript()
    );
    assert!(
        pf.stdout
            .contains("fix: echo 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind"),
        "{}",
        pf.transcript()
    );
    let _ = fs::remove_dir_all(root);
}

#[test]
fn vf_create_writes_sriov_numvfs_and_refuses_a_second_time() {
    let root = ready_host("create");
    let numvfs = root.join("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/sriov_numvfs");

    let created = sluice(
        &["vf", "create", "--pf", "01:00.0", "--count", "2"],
        Some(&root),
    );
    let again = sluice(
        &["vf", "create", "--pf", "01:00.0", "--count", "1"],
        Some(&root),
    );

    assert_eq!(created.status, Some(0), "{}", created.transcript());
    assert_eq!(fs::read_to_string(&numvfs).unwrap(), "2");
    assert!(
        created
            .stdout
            .contains("nvme virt-mgmt /dev/nvme0 -c 1 -r 0 -a 9 -n 0"),
        "{}",
        created.transcript()
    );
    assert_eq!(again.status, Some(EXIT_VMM_ERROR), "{}", again.transcript());
    assert!(
        again
            .stderr
            .starts_with("sluice: error: 0000:01:00.0 already has 2 VFs"),
        "{}",
        again.transcript()
    );
    assert_eq!(fs::read_to_string(&numvfs).unwrap(), "2");
    let _ = fs::remove_dir_all(root);
}
