//! PCI functions as sysfs shows them: address, identity, driver, IOMMU group, NUMA node,
//! SR-IOV counts, reset methods and the bridges between a function and its root complex.

use std::fmt;
use std::path::PathBuf;

use crate::config_space::ConfigSpace;
use crate::{link_name, read_attr, HostError, HostRoot};

/// A PCI address, always with its domain: `0000:01:00.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl Bdf {
    /// `DDDD:BB:DD.F` or `BB:DD.F` (domain 0), as lspci and sysfs write them.
    pub fn parse(text: &str) -> Result<Bdf, HostError> {
        let bad = || HostError::BadAddress(text.to_string());
        let parts: Vec<&str> = text.split(':').collect();
        let (domain, bus, rest) = match parts.as_slice() {
            [bus, rest] => ("0", *bus, *rest),
            [domain, bus, rest] => (*domain, *bus, *rest),
            _ => return Err(bad()),
        };
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |s: &str, max_len: usize| {
            if s.is_empty() || s.len() > max_len {
                None
            } else {
                u32::from_str_radix(s, 16).ok()
            }
        };
        let domain = hex(domain, 4).ok_or_else(bad)? as u16;
        let bus = hex(bus, 2).ok_or_else(bad)? as u8;
        let device = hex(device, 2).filter(|&d| d < 32).ok_or_else(bad)? as u8;
        let function = hex(function, 1).filter(|&f| f < 8).ok_or_else(bad)? as u8;
        Ok(Bdf {
            domain,
            bus,
            device,
            function,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl serde::Serialize for Bdf {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One PCI function's sysfs directory.
#[derive(Clone, Debug)]
pub struct PciFunction {
    pub bdf: Bdf,
    /// `/sys/bus/pci/devices/BDF` (a symlink into /sys/devices).
    pub dir: PathBuf,
}

/// Class code of an NVMe controller (mass storage, non-volatile memory, NVMe).
pub const CLASS_NVME: u32 = 0x010802;

impl PciFunction {
    /// The function at `bdf`, if sysfs has it.
    pub fn open(root: &HostRoot, bdf: Bdf) -> Result<PciFunction, HostError> {
        let dir = root.sys(&format!("bus/pci/devices/{bdf}"));
        if !dir.exists() {
            return Err(HostError::NoDevice(bdf.to_string()));
        }
        Ok(PciFunction { bdf, dir })
    }

    pub fn attr(&self, name: &str) -> Option<String> {
        read_attr(&self.dir.join(name))
    }

    fn hex_attr(&self, name: &str) -> Option<u32> {
        let text = self.attr(name)?;
        u32::from_str_radix(text.trim_start_matches("0x"), 16).ok()
    }

    /// `vendor:device` as lspci -n prints it.
    pub fn id(&self) -> String {
        format!(
            "{:04x}:{:04x}",
            self.hex_attr("vendor").unwrap_or(0xffff),
            self.hex_attr("device").unwrap_or(0xffff)
        )
    }

    pub fn class(&self) -> Option<u32> {
        self.hex_attr("class")
    }

    pub fn is_nvme(&self) -> bool {
        self.class() == Some(CLASS_NVME)
    }

    /// The bound driver's name.
    pub fn driver(&self) -> Option<String> {
        link_name(&self.dir.join("driver"))
    }

    pub fn driver_override(&self) -> Option<String> {
        self.attr("driver_override").filter(|d| d != "(null)")
    }

    /// The IOMMU group number, if the kernel put the function in one.
    pub fn iommu_group(&self) -> Option<u32> {
        link_name(&self.dir.join("iommu_group"))?.parse().ok()
    }

    /// The NUMA node of the function; `None` for -1 (no affinity) or no attribute.
    pub fn numa_node(&self) -> Option<u32> {
        self.attr("numa_node")?.parse::<i64>().ok()?.try_into().ok()
    }

    pub fn sriov_totalvfs(&self) -> Option<u32> {
        self.attr("sriov_totalvfs")?.parse().ok()
    }

    pub fn sriov_numvfs(&self) -> Option<u32> {
        self.attr("sriov_numvfs")?.parse().ok()
    }

    /// The PF of a VF (`physfn`).
    pub fn physfn(&self) -> Option<Bdf> {
        Bdf::parse(&link_name(&self.dir.join("physfn"))?).ok()
    }

    /// The reset methods the kernel will try, in order (`reset_method`, Linux 5.15+); empty
    /// when the function has none or the kernel predates the attribute.
    pub fn reset_methods(&self) -> Vec<String> {
        self.attr("reset_method")
            .map(|m| m.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    pub fn has_reset(&self) -> bool {
        self.dir.join("reset").exists()
    }

    /// Config space as far as this process may read it (64 bytes without CAP_SYS_ADMIN).
    pub fn config(&self) -> ConfigSpace {
        ConfigSpace::new(std::fs::read(self.dir.join("config")).unwrap_or_default())
    }

    /// The functions above this one, nearest first, up to the root complex: the PCI addresses
    /// in the canonical sysfs path (`/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0`).
    pub fn upstream_bridges(&self) -> Vec<Bdf> {
        let Ok(path) = std::fs::canonicalize(&self.dir) else {
            return Vec::new();
        };
        let mut bridges: Vec<Bdf> = path
            .components()
            .filter_map(|c| Bdf::parse(&c.as_os_str().to_string_lossy()).ok())
            .collect();
        bridges.pop(); // the function itself
        bridges.reverse();
        bridges
    }
}

/// The functions in IOMMU group `group`.
pub fn group_members(root: &HostRoot, group: u32) -> Vec<Bdf> {
    let dir = root.sys(&format!("kernel/iommu_groups/{group}/devices"));
    let mut members: Vec<Bdf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| Bdf::parse(&e.ok()?.file_name().to_string_lossy()).ok())
                .collect()
        })
        .unwrap_or_default();
    members.sort();
    members
}

/// How many IOMMU groups the kernel made.
pub fn group_count(root: &HostRoot) -> usize {
    std::fs::read_dir(root.sys("kernel/iommu_groups"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_space::tests::config_with;
    use crate::fake::FakeTree;

    #[test]
    fn addresses_parse_with_and_without_domain() {
        assert_eq!(Bdf::parse("01:00.1").unwrap().to_string(), "0000:01:00.1");
        assert_eq!(
            Bdf::parse("0001:40:1f.7").unwrap(),
            Bdf {
                domain: 1,
                bus: 0x40,
                device: 0x1f,
                function: 7
            }
        );
        for bad in [
            "",
            "01:00",
            "01:20.0",
            "01:00.8",
            "x:00.0",
            "00000:00:00.0",
            "1:2:3:4.0",
        ] {
            assert!(Bdf::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn a_function_reports_driver_group_node_sriov_and_its_bridges() {
        let tree = FakeTree::new();
        tree.pci_function(
            "pci0000:00/0000:00:01.0",
            &config_with(4, &[]),
            Some("pcieport"),
            Some(1),
        );
        tree.pci_function(
            "pci0000:00/0000:00:01.0/0000:01:00.0",
            &config_with(0, &[]),
            Some("nvme"),
            Some(5),
        );
        tree.write(
            "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/numa_node",
            "1\n",
        );
        tree.write(
            "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/sriov_totalvfs",
            "2\n",
        );
        tree.write(
            "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/sriov_numvfs",
            "0\n",
        );
        tree.write(
            "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/reset_method",
            "flr bus\n",
        );
        let root = tree.root();

        let pf = PciFunction::open(&root, Bdf::parse("01:00.0").unwrap()).unwrap();

        assert_eq!(pf.driver().as_deref(), Some("nvme"));
        assert_eq!(pf.iommu_group(), Some(5));
        assert_eq!(pf.numa_node(), Some(1));
        assert_eq!(pf.sriov_totalvfs(), Some(2));
        assert_eq!(pf.sriov_numvfs(), Some(0));
        assert_eq!(pf.reset_methods(), ["flr", "bus"]);
        assert!(pf.is_nvme());
        assert_eq!(pf.id(), "1b36:0010");
        assert_eq!(pf.upstream_bridges(), [Bdf::parse("00:01.0").unwrap()]);
        assert_eq!(group_members(&root, 5), [pf.bdf]);
        assert_eq!(group_count(&root), 2);
        let bridge = PciFunction::open(&root, Bdf::parse("00:01.0").unwrap()).unwrap();
        assert_eq!(bridge.numa_node(), None);
        assert!(PciFunction::open(&root, Bdf::parse("02:00.0").unwrap()).is_err());
    }
}
