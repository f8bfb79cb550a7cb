//! `sluice host-check`: is this host ready to give a VM a PCI function? One list of checks,
//! each with a status, what was found and, when it fails, how to fix it.

use std::fmt::Write as _;

use crate::config_space::{Acs, PortType};
use crate::iommu::IommuState;
use crate::limits::{hugepages, CgroupMemory, Memlock};
use crate::pci::{group_members, Bdf, PciFunction};
use crate::HostRoot;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Meets what passthrough needs.
    Ok,
    /// Informational: nothing to meet.
    Info,
    /// Works, but weaker than it should be.
    Warn,
    /// Passthrough cannot work, or would be unsafe.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Info => "info",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
        fix: None,
    }
}

impl Check {
    fn fix(mut self, hint: impl Into<String>) -> Check {
        self.fix = Some(hint.into());
        self
    }
}

/// One bridge between a device and its root complex.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BridgeReport {
    pub bdf: Bdf,
    pub port_type: Option<PortType>,
    pub acs: Option<Acs>,
}

/// A function in the same IOMMU group.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GroupMember {
    pub bdf: Bdf,
    pub driver: Option<String>,
}

/// What was found about one requested function.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceReport {
    pub bdf: Bdf,
    pub id: String,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// Every function in the group, with its driver (this one included).
    pub group: Vec<GroupMember>,
    pub numa_node: Option<u32>,
    pub sriov_totalvfs: Option<u32>,
    pub sriov_numvfs: Option<u32>,
    pub physfn: Option<Bdf>,
    pub reset_methods: Vec<String>,
    pub bridges: Vec<BridgeReport>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub ready: bool,
    /// The guest RAM the limits were checked against, in bytes.
    pub memory: u64,
    pub iommu: IommuState,
    pub checks: Vec<Check>,
    pub devices: Vec<DeviceReport>,
}

/// What the checks are measured against.
#[derive(Clone, Debug)]
pub struct Request {
    pub devices: Vec<Bdf>,
    /// Guest RAM in bytes (all of it is pinned for a VFIO device with `dma=all`).
    pub memory: u64,
}

/// Drivers a group member may have while another member is assigned (what VFIO accepts:
/// vfio-pci itself, pci-stub, none; bridges keep pcieport).
const GROUP_SAFE_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

/// Runs every check.
pub fn host_check(root: &HostRoot, request: &Request) -> Report {
    let iommu = IommuState::read(root);
    let mut checks = vec![check_kvm(root)];
    checks.extend(check_iommu(&iommu));
    checks.push(check_vfio(root));
    checks.push(check_memlock(root, request.memory));
    checks.push(check_cgroup(root, request.memory));
    checks.push(check_hugepages(root));
    checks.push(check_numa(root));
    let mut devices = Vec::new();
    for &bdf in &request.devices {
        match PciFunction::open(root, bdf) {
            Ok(function) => {
                let device = describe(root, &function);
                checks.extend(device_checks(&device));
                devices.push(device);
            }
            Err(e) => checks.push(
                check(format!("{bdf} device"), Status::Fail, e.to_string())
                    .fix("check the address with lspci -D"),
            ),
        }
    }
    Report {
        ready: checks.iter().all(|c| c.status != Status::Fail),
        memory: request.memory,
        iommu,
        checks,
        devices,
    }
}

fn check_kvm(root: &HostRoot) -> Check {
    let kvm = root.dev("kvm");
    if kvm.exists() {
        check("kvm", Status::Ok, kvm.display().to_string())
    } else {
        check("kvm", Status::Fail, format!("{} is missing", kvm.display())).fix(
            "load kvm_intel or kvm_amd (modprobe kvm_intel) and enable virtualization in firmware",
        )
    }
}

fn check_iommu(iommu: &IommuState) -> Vec<Check> {
    let cmdline = if iommu.cmdline.is_empty() {
        "no IOMMU option on the kernel command line".to_string()
    } else {
        format!("cmdline {}", iommu.cmdline.join(" "))
    };
    let tables = if iommu.acpi_tables.is_empty() {
        "no DMAR or IVRS ACPI table".to_string()
    } else {
        format!("ACPI {}", iommu.acpi_tables.join(" "))
    };
    let present = if iommu.enabled() {
        check(
            "iommu",
            Status::Ok,
            format!(
                "{} ({} groups); {tables}; {cmdline}",
                iommu.units.join(" "),
                iommu.groups
            ),
        )
    } else {
        let why = if iommu.acpi_tables.is_empty() {
            format!(
                "{tables} (the firmware describes no IOMMU); /sys/class/iommu is empty; {cmdline}"
            )
        } else {
            format!("{tables} present but the kernel enabled no IOMMU (/sys/class/iommu is empty); {cmdline}")
        };
        let fix = match iommu.disabled_on_cmdline() {
            Some(option) => format!("remove `{option}` from the kernel command line"),
            None if iommu.acpi_tables.is_empty() => {
                "enable VT-d / AMD-Vi (IOMMU) in the firmware setup, then boot with intel_iommu=on (Intel) or amd_iommu=on".to_string()
            }
            None => "boot with intel_iommu=on (Intel) or amd_iommu=on (AMD)".to_string(),
        };
        check("iommu", Status::Fail, why).fix(fix)
    };
    let ecap = match iommu.vtd_ecap_ir {
        Some(true) => "; VT-d ECAP.IR set",
        Some(false) => "; VT-d ECAP.IR clear (hardware cannot remap)",
        None => "",
    };
    let remapping = if iommu.interrupt_remapping() {
        check(
            "interrupt-remapping",
            Status::Ok,
            format!(
                "/proc/interrupts has remapped chips: {}{ecap}",
                iommu.remapped_chips.join(" ")
            ),
        )
    } else {
        let detail = format!("no IR- interrupt chip in /proc/interrupts{ecap}");
        if iommu.allow_unsafe_interrupts == Some(true) {
            check(
                "interrupt-remapping",
                Status::Warn,
                format!("{detail}; vfio_iommu_type1 allow_unsafe_interrupts=Y lets a device's MSIs through unremapped"),
            )
            .fix("enable interrupt remapping (do not boot with intremap=off) and set allow_unsafe_interrupts=N")
        } else {
            check("interrupt-remapping", Status::Fail, detail).fix(
                "enable the IOMMU with interrupt remapping (x2APIC/IR in firmware, no intremap=off); \
                 only on a trusted host: modprobe vfio_iommu_type1 allow_unsafe_interrupts=1",
            )
        }
    };
    vec![present, remapping]
}

fn check_vfio(root: &HostRoot) -> Check {
    let container = root.dev("vfio/vfio");
    let type1 = root.sys("module/vfio_iommu_type1").exists();
    match (container.exists(), type1) {
        (true, true) => check(
            "vfio",
            Status::Ok,
            format!("{} and vfio_iommu_type1 loaded", container.display()),
        ),
        (present, _) => {
            let mut missing = Vec::new();
            if !present {
                missing.push(format!("{} is missing", container.display()));
            }
            if !type1 {
                missing.push("vfio_iommu_type1 is not loaded".to_string());
            }
            check("vfio", Status::Fail, missing.join("; "))
                .fix("modprobe vfio-pci vfio_iommu_type1")
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

fn check_memlock(root: &HostRoot, memory: u64) -> Check {
    let Some(memlock) = Memlock::read(root) else {
        return check("memlock", Status::Warn, "cannot read /proc/self/limits");
    };
    let limit = memlock.soft.map_or("unlimited".to_string(), mib);
    let detail = format!(
        "RLIMIT_MEMLOCK {limit}{}; guest RAM to pin {}",
        if memlock.cap_ipc_lock {
            " (CAP_IPC_LOCK: VFIO ignores the limit)"
        } else {
            ""
        },
        mib(memory)
    );
    if memlock.allows(memory) {
        check("memlock", Status::Ok, detail)
    } else {
        check("memlock", Status::Fail, detail).fix(format!(
            "raise the limit to at least {}: `ulimit -l {}` in the shell that starts sluice, \
             LimitMEMLOCK= in a systemd unit, or memlock in /etc/security/limits.conf",
            mib(memory),
            memory >> 10
        ))
    }
}

fn check_cgroup(root: &HostRoot, memory: u64) -> Check {
    let Some(cgroup) = CgroupMemory::read(root) else {
        return check("memory-cgroup", Status::Info, "no memory cgroup found");
    };
    let place = format!("cgroup v{} {}", cgroup.version, cgroup.cgroup.display());
    match cgroup.available() {
        None => check(
            "memory-cgroup",
            Status::Ok,
            format!("{place}: no limit; guest RAM {}", mib(memory)),
        ),
        Some(available) if available >= memory => check(
            "memory-cgroup",
            Status::Ok,
            format!(
                "{place}: {} available of {}; guest RAM {}",
                mib(available),
                mib(cgroup.limit.unwrap_or(0)),
                mib(memory)
            ),
        ),
        Some(available) => check(
            "memory-cgroup",
            Status::Fail,
            format!(
                "{place}: {} available of {} < guest RAM {} (the kernel would OOM-kill, not refuse)",
                mib(available),
                mib(cgroup.limit.unwrap_or(0)),
                mib(memory)
            ),
        )
        .fix(format!(
            "raise memory.max of {} by at least {}, or give the guest less --memory",
            cgroup.cgroup.display(),
            mib(memory - available)
        )),
    }
}

fn check_hugepages(root: &HostRoot) -> Check {
    let pools = hugepages(root);
    if pools.is_empty() {
        return check("hugepages", Status::Info, "no hugepage pools");
    }
    let text: Vec<String> = pools
        .iter()
        .map(|p| format!("{} kB: {} free of {}", p.size_kib, p.free, p.total))
        .collect();
    check("hugepages", Status::Info, text.join("; "))
}

fn check_numa(root: &HostRoot) -> Check {
    let nodes = crate::numa::online_nodes(root);
    let detail: Vec<String> = nodes
        .iter()
        .map(|&node| {
            let cpus = crate::numa::node_cpus(root, node).unwrap_or_default();
            format!(
                "node{node} cpus {}",
                none_if_empty(&crate::numa::format_cpulist(&cpus))
            )
        })
        .collect();
    check(
        "numa",
        Status::Info,
        if detail.is_empty() {
            "no NUMA information".to_string()
        } else {
            detail.join("; ")
        },
    )
}

fn none_if_empty(text: &str) -> &str {
    if text.is_empty() {
        "none"
    } else {
        text
    }
}

fn describe(root: &HostRoot, function: &PciFunction) -> DeviceReport {
    let group = function.iommu_group();
    let members = group
        .map(|g| group_members(root, g))
        .unwrap_or_default()
        .into_iter()
        .map(|bdf| {
            let driver = PciFunction::open(root, bdf).ok().and_then(|f| f.driver());
            GroupMember { bdf, driver }
        })
        .collect();
    let bridges = function
        .upstream_bridges()
        .into_iter()
        .map(|bdf| {
            let config = PciFunction::open(root, bdf).map(|f| f.config()).ok();
            BridgeReport {
                bdf,
                port_type: config.as_ref().and_then(|c| c.port_type()),
                acs: config.as_ref().and_then(|c| c.acs()),
            }
        })
        .collect();
    DeviceReport {
        bdf: function.bdf,
        id: function.id(),
        driver: function.driver(),
        iommu_group: group,
        group: members,
        numa_node: function.numa_node(),
        sriov_totalvfs: function.sriov_totalvfs(),
        sriov_numvfs: function.sriov_numvfs(),
        physfn: function.physfn(),
        reset_methods: function.reset_methods(),
        bridges,
    }
}

fn device_checks(device: &DeviceReport) -> Vec<Check> {
    let bdf = device.bdf;
    let mut checks = Vec::new();
    let driver = device.driver.as_deref();
    checks.push(match driver {
        Some("vfio-pci") => check(format!("{bdf} driver"), Status::Ok, format!("{} bound to vfio-pci", device.id)),
        other => check(
            format!("{bdf} driver"),
            Status::Fail,
            format!("{} bound to {}, not vfio-pci", device.id, other.unwrap_or("no driver")),
        )
        .fix(format!(
            "{}echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > /sys/bus/pci/drivers_probe",
            if other.is_some() {
                format!("echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; ")
            } else {
                String::new()
            }
        )),
    });
    checks.push(group_check(device));
    checks.extend(acs_checks(device));
    let sriov = match (device.sriov_totalvfs, device.sriov_numvfs, device.physfn) {
        (Some(total), Some(num), _) => format!("PF: {num} of {total} VFs enabled"),
        (_, _, Some(pf)) => format!("VF of {pf}"),
        _ => "no SR-IOV".to_string(),
    };
    checks.push(check(format!("{bdf} sr-iov"), Status::Info, sriov));
    checks.push(check(
        format!("{bdf} numa"),
        Status::Info,
        device
            .numa_node
            .map_or("no NUMA affinity (numa_node -1)".to_string(), |n| {
                format!("node {n}")
            }),
    ));
    checks.push(if device.reset_methods.is_empty() {
        check(format!("{bdf} reset"), Status::Warn, "the kernel has no reset method for it")
            .fix("the device cannot be reset between VMs: quarantine it after use (sluice vf quarantine)")
    } else {
        check(
            format!("{bdf} reset"),
            Status::Ok,
            format!("reset_method: {}", device.reset_methods.join(" ")),
        )
    });
    checks
}

fn group_check(device: &DeviceReport) -> Check {
    let bdf = device.bdf;
    let Some(group) = device.iommu_group else {
        return check(
            format!("{bdf} iommu-group"),
            Status::Fail,
            "in no IOMMU group",
        )
        .fix("enable the IOMMU (see the iommu check)");
    };
    let others: Vec<&GroupMember> = device.group.iter().filter(|m| m.bdf != bdf).collect();
    if others.is_empty() {
        return check(
            format!("{bdf} iommu-group"),
            Status::Ok,
            format!("group {group}, alone"),
        );
    }
    let describe =
        |m: &&GroupMember| format!("{} ({})", m.bdf, m.driver.as_deref().unwrap_or("no driver"));
    let unsafe_members: Vec<String> = others
        .iter()
        .filter(|m| {
            m.driver
                .as_deref()
                .is_some_and(|d| !GROUP_SAFE_DRIVERS.contains(&d))
        })
        .map(describe)
        .collect();
    let shared = others.iter().map(describe).collect::<Vec<_>>().join(", ");
    if unsafe_members.is_empty() {
        check(
            format!("{bdf} iommu-group"),
            Status::Warn,
            format!("group {group} shared with {shared}: all of them go to the same VM"),
        )
    } else {
        check(
            format!("{bdf} iommu-group"),
            Status::Fail,
            format!("group {group} shared with {shared}; bound to host drivers: {}", unsafe_members.join(", ")),
        )
        .fix("bind every function of the group to vfio-pci (and give them to the same VM), or move the device to a slot with ACS")
    }
}

fn acs_checks(device: &DeviceReport) -> Vec<Check> {
    let bdf = device.bdf;
    let ports: Vec<&BridgeReport> = device
        .bridges
        .iter()
        .filter(|b| b.port_type.is_some_and(PortType::routes_peer_to_peer))
        .collect();
    if device.bridges.is_empty() {
        return vec![check(
            format!("{bdf} acs"),
            Status::Info,
            "on the root bus: no bridge between it and the root complex",
        )];
    }
    if ports.is_empty() {
        let unknown = device.bridges.iter().any(|b| b.port_type.is_none());
        return vec![if unknown {
            check(
                format!("{bdf} acs"),
                Status::Warn,
                "cannot read the bridges' config space beyond 64 bytes",
            )
            .fix("run host-check as root (extended config space needs CAP_SYS_ADMIN)")
        } else {
            check(
                format!("{bdf} acs"),
                Status::Info,
                "no root or downstream port above it",
            )
        }];
    }
    ports
        .iter()
        .map(|port| {
            let name = format!("{bdf} acs {}", port.bdf);
            let kind = match port.port_type {
                Some(PortType::RootPort) => "root port",
                _ => "downstream port",
            };
            match port.acs {
                Some(acs) if acs.enabled.isolates() => check(
                    name,
                    Status::Ok,
                    format!("{kind}: ACS enabled {}", acs.enabled.describe()),
                ),
                Some(acs) => check(
                    name,
                    Status::Warn,
                    format!(
                        "{kind}: ACS enabled {} (capable {}): peer-to-peer below it bypasses the IOMMU",
                        acs.enabled.describe(),
                        acs.capable.describe()
                    ),
                )
                .fix("the kernel enables ACS when it can; a port lacking a flag isolates nothing below it (check the group)"),
                None => check(
                    name,
                    Status::Warn,
                    format!("{kind}: no ACS capability: functions below it may reach each other without the IOMMU"),
                )
                .fix("use a slot whose port has ACS; its IOMMU group shows who shares it"),
            }
        })
        .collect()
}

impl Report {
    /// The table for people: one line per check, a fix line under each that fails or warns.
    pub fn table(&self) -> String {
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut text = format!("{:width$}  {:6}  DETAIL\n", "CHECK", "STATUS");
        for c in &self.checks {
            let _ = writeln!(
                text,
                "{:width$}  {:6}  {}",
                c.name,
                c.status.label(),
                c.detail
            );
            if let Some(fix) = &c.fix {
                let _ = writeln!(text, "{:width$}  {:6}  fix: {fix}", "", "");
            }
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        if self.ready {
            text.push_str("host-check: READY\n");
        } else {
            let _ = writeln!(text, "host-check: NOT READY ({failed} failed)");
        }
        text
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_space::tests::config_with;
    use crate::config_space::EXT_CAP_ID_ACS;
    use crate::fake::FakeTree;

    /// A host with VT-d, interrupt remapping, VFIO, KVM and a root port (ACS on) above an NVMe
    /// PF (group 5) and its VF (group 6, bound to vfio-pci).
    fn ready_host() -> FakeTree {
        let tree = FakeTree::new();
        tree.write("dev/kvm", "");
        tree.write("dev/vfio/vfio", "");
        tree.write(
            "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
            "N\n",
        );
        tree.write("sys/firmware/acpi/tables/DMAR", [0u8; 48]);
        tree.write("sys/class/iommu/dmar0/intel-iommu/ecap", "f00f4a\n");
        tree.write("proc/cmdline", "intel_iommu=on\n");
        tree.write("proc/interrupts", " 25: 1 IR-PCI-MSI 524288-edge nvme0q0\n");
        tree.write(
            "proc/self/limits",
            "Max locked memory         unlimited            unlimited            bytes\n",
        );
        tree.write("proc/self/cgroup", "0::/\n");
        tree.write("sys/fs/cgroup/memory.current", "0\n");
        let root_port = config_with(4, &[(EXT_CAP_ID_ACS, &[0x001f_001f])]);
        tree.pci_function(
            "pci0000:00/0000:00:01.0",
            &root_port,
            Some("pcieport"),
            Some(1),
        );
        tree.pci_function(
            "pci0000:00/0000:00:01.0/0000:01:00.0",
            &config_with(0, &[]),
            Some("nvme"),
            Some(5),
        );
        tree.pci_function(
            "pci0000:00/0000:00:01.0/0000:01:00.1",
            &config_with(0, &[]),
            Some("vfio-pci"),
            Some(6),
        );
        tree.write(
            "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.1/reset_method",
            "flr\n",
        );
        tree.symlink(
            "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.1/physfn",
            "../0000:01:00.0",
        );
        tree
    }

    fn request(devices: &[&str], memory: u64) -> Request {
        Request {
            devices: devices.iter().map(|d| Bdf::parse(d).unwrap()).collect(),
            memory,
        }
    }

    fn status(report: &Report, name: &str) -> Status {
        report
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}:\n{}", report.table()))
            .status
    }

    #[test]
    fn a_vf_on_vfio_pci_behind_an_acs_root_port_is_ready() {
        let tree = ready_host();

        let report = host_check(&tree.root(), &request(&["01:00.1"], 1 << 30));

        assert!(report.ready, "{}", report.table());
        assert_eq!(status(&report, "0000:01:00.1 acs 0000:00:01.0"), Status::Ok);
        assert_eq!(status(&report, "0000:01:00.1 iommu-group"), Status::Ok);
        assert_eq!(report.devices[0].physfn, Bdf::parse("01:00.0").ok());
        assert!(report.table().ends_with("host-check: READY\n"));
        let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(json["ready"], true);
        assert_eq!(
            json["devices"][0]["bridges"][0]["acs"]["enabled"]["uf"],
            true
        );
    }

    #[test]
    fn a_function_on_a_host_driver_sharing_its_group_is_not_ready() {
        let tree = ready_host();
        // The VF joins the PF's group, whose PF stays on nvme.
        std::fs::remove_file(
            tree.path("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.1/iommu_group"),
        )
        .unwrap();
        tree.symlink(
            "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.1/iommu_group",
            &tree.path("sys/kernel/iommu_groups/5").to_string_lossy(),
        );
        tree.symlink(
            "sys/kernel/iommu_groups/5/devices/0000:01:00.1",
            &tree
                .path("sys/devices/pci0000:00/0000:00:01.0/0000:01:00.1")
                .to_string_lossy(),
        );

        let report = host_check(&tree.root(), &request(&["01:00.1"], 1 << 30));

        assert!(!report.ready);
        let group = report
            .checks
            .iter()
            .find(|c| c.name == "0000:01:00.1 iommu-group")
            .unwrap();
        assert_eq!(group.status, Status::Fail);
        assert!(
            group.detail.contains("0000:01:00.0 (nvme)"),
            "{}",
            group.detail
        );
    }

    #[test]
    fn a_port_without_acs_flags_is_a_warning_naming_them() {
        let tree = ready_host();
        let weak = config_with(4, &[(EXT_CAP_ID_ACS, &[0x0001_001f])]);
        tree.write("sys/devices/pci0000:00/0000:00:01.0/config", weak);

        let report = host_check(&tree.root(), &request(&["01:00.1"], 1 << 30));

        let acs = report
            .checks
            .iter()
            .find(|c| c.name == "0000:01:00.1 acs 0000:00:01.0")
            .unwrap();
        assert_eq!(acs.status, Status::Warn);
        assert!(acs.detail.contains("SV+ RR- CR- UF-"), "{}", acs.detail);
        assert!(report.ready, "a warning does not make the host unready");
    }

    #[test]
    fn bridges_read_as_non_root_warn_that_acs_is_unknown() {
        let tree = ready_host();
        // What sysfs gives a reader without CAP_SYS_ADMIN: the first 64 bytes.
        let mut short = config_with(4, &[(EXT_CAP_ID_ACS, &[0x001f_001f])]);
        short.truncate(64);
        tree.write("sys/devices/pci0000:00/0000:00:01.0/config", short);

        let report = host_check(&tree.root(), &request(&["01:00.1"], 1 << 30));

        let acs = report
            .checks
            .iter()
            .find(|c| c.name == "0000:01:00.1 acs")
            .unwrap();
        assert_eq!(acs.status, Status::Warn);
        assert!(acs.fix.as_deref().unwrap().contains("as root"), "{acs:?}");
    }

    #[test]
    fn limits_below_the_guest_size_fail_with_the_amount() {
        let tree = ready_host();
        tree.write(
            "proc/self/limits",
            "Max locked memory         65536                65536                bytes\n",
        );
        tree.write("proc/self/status", "CapEff:\t0000000000000000\n");
        tree.write("proc/self/cgroup", "0::/vm\n");
        tree.write("sys/fs/cgroup/vm/memory.max", "268435456\n");
        tree.write("sys/fs/cgroup/vm/memory.current", "0\n");

        let report = host_check(&tree.root(), &request(&[], 512 << 20));

        assert!(!report.ready);
        assert_eq!(status(&report, "memlock"), Status::Fail);
        let cgroup = report
            .checks
            .iter()
            .find(|c| c.name == "memory-cgroup")
            .unwrap();
        assert_eq!(cgroup.status, Status::Fail);
        assert!(
            cgroup.fix.as_deref().unwrap().contains("at least 256 MiB"),
            "{cgroup:?}"
        );
    }

    #[test]
    fn no_iommu_and_no_vfio_fail_with_fixes() {
        let tree = FakeTree::new();
        tree.write("dev/kvm", "");
        tree.write("proc/cmdline", "console=ttyS0\n");
        tree.write("proc/interrupts", " 0: 50 IO-APIC 2-edge timer\n");

        let report = host_check(&tree.root(), &request(&["01:00.0"], 128 << 20));

        assert!(!report.ready);
        for name in [
            "iommu",
            "interrupt-remapping",
            "vfio",
            "0000:01:00.0 device",
        ] {
            let c = report.checks.iter().find(|c| c.name == name).unwrap();
            assert_eq!(c.status, Status::Fail, "{name}");
            assert!(c.fix.is_some(), "{name} has no fix hint");
        }
        assert_eq!(status(&report, "kvm"), Status::Ok);
        assert!(
            report.table().contains("NOT READY (4 failed)"),
            "{}",
            report.table()
        );
    }
}
