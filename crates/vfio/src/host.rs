//! What the host must offer before a device is assigned, read from sysfs/procfs under a root
//! directory (the real `/`, or a fake tree in tests): the function's IOMMU group and whether every
//! member of it is safe to hand over, interrupt remapping, and the limits on pinned memory.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// A PCI function on the host: `DDDD:BB:DD.F`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostBdf(String);

impl HostBdf {
    /// Accepts `DDDD:BB:DD.F`, `BB:DD.F` (domain 0) or a sysfs path ending in one.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let name = spec
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(spec);
        let full = if name.matches(':').count() == 1 {
            format!("0000:{name}")
        } else {
            name.to_string()
        };
        let bad = || format!("{spec:?} is not a PCI address (DDDD:BB:DD.F or BB:DD.F)");
        let (domain, rest) = full.split_once(':').ok_or_else(bad)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |s: &str, len: usize, max: u32| {
            s.len() == len
                && s.chars().all(|c| c.is_ascii_hexdigit())
                && u32::from_str_radix(s, 16).is_ok_and(|v| v <= max)
        };
        let valid = hex(domain, 4, 0xffff)
            && hex(bus, 2, 0xff)
            && hex(device, 2, 0x1f)
            && hex(function, 1, 7);
        if !valid {
            return Err(bad());
        }
        Ok(Self(full.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `ROOT/sys/bus/pci/devices/BDF`.
    pub fn sysfs_path(&self, root: &Path) -> PathBuf {
        root.join("sys/bus/pci/devices").join(&self.0)
    }
}

impl fmt::Display for HostBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a function's group cannot be given to this VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("{bdf}: no IOMMU group (is the IOMMU on? {path} is missing)")]
    NoGroup { bdf: HostBdf, path: PathBuf },
    #[error(
        "{bdf}: IOMMU group {group} also holds {}; every device in the group must be bound to vfio-pci and given to this VM",
        .others.join(", ")
    )]
    NotViable {
        bdf: HostBdf,
        group: u32,
        /// Each offending member as `BDF (driver D)` / `BDF (no driver)` / `BDF (vfio-pci, not given to this VM)`.
        others: Vec<String>,
    },
    #[error("{bdf} is not bound to vfio-pci ({}); bind it first (driver_override + drivers_probe)", .driver.as_deref().map_or("no driver".to_string(), |d| format!("driver {d}")))]
    NotVfio {
        bdf: HostBdf,
        driver: Option<String>,
    },
    #[error("{bdf}: reading sysfs: {reason}")]
    Sysfs { bdf: HostBdf, reason: String },
}

/// PCI class codes of bridges: the kernel lets them share a group with assigned devices
/// (vfio's `vfio_dev_driver_allowed` / bridge exemption), since they do no DMA of their own.
const CLASS_BRIDGE: u32 = 0x06;

/// The function's IOMMU group number, after checking every other member is bound to vfio-pci
/// (or driverless bridge, as the kernel allows) and is among `assigned` (all functions this VM
/// is given). One error names every offending member.
pub fn check_group(root: &Path, bdf: &HostBdf, assigned: &[HostBdf]) -> Result<u32, GroupError> {
    let own_driver = driver_of(&bdf.sysfs_path(root));
    let link = bdf.sysfs_path(root).join("iommu_group");
    let target = fs::read_link(&link).map_err(|_| GroupError::NoGroup {
        bdf: bdf.clone(),
        path: link.clone(),
    })?;
    let sysfs_err = |reason: String| GroupError::Sysfs {
        bdf: bdf.clone(),
        reason,
    };
    let group: u32 = target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| sysfs_err(format!("odd group link {}", target.display())))?;
    if own_driver.as_deref() != Some("vfio-pci") {
        return Err(GroupError::NotVfio {
            bdf: bdf.clone(),
            driver: own_driver,
        });
    }
    let members = root.join(format!("sys/kernel/iommu_groups/{group}/devices"));
    let mut names: Vec<String> = fs::read_dir(&members)
        .map_err(|e| sysfs_err(format!("{}: {e}", members.display())))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut others = Vec::new();
    for name in names.iter().filter(|n| *n != bdf.as_str()) {
        let device = root.join("sys/bus/pci/devices").join(name);
        let driver = driver_of(&device);
        let problem = match driver.as_deref() {
            Some("vfio-pci") if assigned.iter().any(|a| a.as_str() == name) => None,
            Some("vfio-pci") => Some(format!("{name} (vfio-pci, not given to this VM)")),
            None if is_bridge(&device) => None,
            Some(d) if d == "pcieport" && is_bridge(&device) => None,
            Some(d) => Some(format!("{name} (driver {d})")),
            None => Some(format!("{name} (no driver)")),
        };
        others.extend(problem);
    }
    if others.is_empty() {
        Ok(group)
    } else {
        Err(GroupError::NotViable {
            bdf: bdf.clone(),
            group,
            others,
        })
    }
}

/// The name of the driver a device is bound to.
pub fn driver_of(device: &Path) -> Option<String> {
    let target = fs::read_link(device.join("driver")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn is_bridge(device: &Path) -> bool {
    fs::read_to_string(device.join("class"))
        .ok()
        .and_then(|c| u32::from_str_radix(c.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|class| class >> 16 == CLASS_BRIDGE)
}

/// The host's interrupt remapping, as far as userspace can see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptRemapping {
    /// An `IR-` irqchip (Intel VT-d: `IR-PCI-MSI`, `IR-IO-APIC`) or AMD-Vi's `AMD-IR` exists in
    /// /proc/interrupts: the kernel enabled remapping and routes interrupts through it.
    pub enabled: bool,
    /// `vfio_iommu_type1 allow_unsafe_interrupts=Y`: the kernel assigns devices without it.
    pub kernel_allows_unsafe: bool,
}

/// Reads [`InterruptRemapping`] under `root`.
///
/// There is no sysfs flag for "remapping on": the kernel names the irqchips it stacks on the
/// remapping domain `IR-*` (VT-d) or `AMD-IR` (AMD-Vi), and /proc/interrupts lists the chip of
/// every interrupt in use, so at least the IOAPIC's shows up once remapping is enabled.
pub fn interrupt_remapping(root: &Path) -> InterruptRemapping {
    let interrupts = fs::read_to_string(root.join("proc/interrupts")).unwrap_or_default();
    let enabled = interrupts
        .split_whitespace()
        .any(|word| word.starts_with("IR-") || word.starts_with("AMD-IR"));
    let parameter = root.join("sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts");
    let kernel_allows_unsafe = fs::read_to_string(parameter)
        .map(|v| matches!(v.trim(), "Y" | "1"))
        .unwrap_or(false);
    InterruptRemapping {
        enabled,
        kernel_allows_unsafe,
    }
}

/// Refuses a host without interrupt remapping unless the user said `allow_unsafe_interrupts=on`.
pub fn check_interrupt_remapping(
    state: InterruptRemapping,
    allow_unsafe: bool,
) -> Result<(), String> {
    if state.enabled || allow_unsafe {
        return Ok(());
    }
    Err(format!(
        "the host has no IOMMU interrupt remapping (no IR-/AMD-IR irqchip in /proc/interrupts{}): a device could inject arbitrary interrupts; pass allow_unsafe_interrupts=on to accept that",
        if state.kernel_allows_unsafe {
            "; vfio_iommu_type1 allow_unsafe_interrupts=Y"
        } else {
            ""
        }
    ))
}

/// Limits on memory this process may pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinLimits {
    /// RLIMIT_MEMLOCK soft limit in bytes (`None`: unlimited).
    pub memlock: Option<u64>,
    /// CAP_IPC_LOCK in the effective set: type1 then ignores RLIMIT_MEMLOCK.
    pub ipc_lock: bool,
    /// The memory cgroup's memory.max in bytes (`None`: max or no cgroup v2).
    pub cgroup_max: Option<u64>,
    /// Where that limit lives, for the message.
    pub cgroup_path: Option<PathBuf>,
}

/// Checks that `needed` bytes (all guest RAM) can be pinned; one line naming the limit otherwise.
pub fn check_pin_limits(limits: &PinLimits, needed: u64) -> Result<(), String> {
    let mib = |b: u64| b.div_ceil(1 << 20);
    if let (Some(memlock), false) = (limits.memlock, limits.ipc_lock) {
        if memlock < needed {
            return Err(format!(
                "dma=all pins all guest RAM: RLIMIT_MEMLOCK is {} MiB, {} MiB needed (raise it with `ulimit -l {}` or grant CAP_IPC_LOCK)",
                memlock >> 20,
                mib(needed),
                needed.div_ceil(1024)
            ));
        }
    }
    if let Some(max) = limits.cgroup_max {
        if max < needed {
            let path = limits
                .cgroup_path
                .as_ref()
                .map_or_else(|| "memory.max".to_string(), |p| p.display().to_string());
            return Err(format!(
                "dma=all pins all guest RAM: the memory cgroup limit {path} is {} MiB, {} MiB needed",
                max >> 20,
                mib(needed)
            ));
        }
    }
    Ok(())
}

/// This process's [`PinLimits`] (cgroup v2 only; v1 limits are not read).
pub fn current_pin_limits(root: &Path) -> io::Result<PinLimits> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let memlock = (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur);
    let status = fs::read_to_string(root.join("proc/self/status")).unwrap_or_default();
    let ipc_lock = capability_effective(&status, 14);
    let (cgroup_max, cgroup_path) = cgroup_memory_max(root);
    Ok(PinLimits {
        memlock,
        ipc_lock,
        cgroup_max,
        cgroup_path,
    })
}

/// Whether capability `bit` is in the `CapEff:` line of /proc/self/status.
fn capability_effective(status: &str, bit: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// The lowest memory.max from this process's cgroup v2 up to the root.
fn cgroup_memory_max(root: &Path) -> (Option<u64>, Option<PathBuf>) {
    let cgroup = fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
    let Some(relative) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) else {
        return (None, None);
    };
    let mut best: (Option<u64>, Option<PathBuf>) = (None, None);
    let mut dir = root
        .join("sys/fs/cgroup")
        .join(relative.trim().trim_start_matches('/'));
    loop {
        let file = dir.join("memory.max");
        if let Some(value) = fs::read_to_string(&file)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            if best.0.is_none_or(|b| value < b) {
                best = (Some(value), Some(file));
            }
        }
        if dir.ends_with("sys/fs/cgroup") || !dir.pop() {
            return best;
        }
    }
}
