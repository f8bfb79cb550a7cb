//! `sluice-host`: what the host offers for device passthrough, read from sysfs and procfs —
//! PCI functions (driver, IOMMU group, NUMA node, SR-IOV, ACS of the bridges above them), the
//! IOMMU and interrupt remapping, memlock and memory cgroup limits, hugepages — and the
//! operator's SR-IOV actions (create VFs, reset, quarantine).
//!
//! Every path is rooted at a [`HostRoot`], so tests build fake trees (`HostRoot::at(dir)`)
//! and the code never needs the real host to be tested. Nothing here needs a crate beyond
//! serde: sysfs is plain files, and the one binary format (config space) is parsed in
//! `config_space`.

pub mod check;
pub mod config_space;
pub mod iommu;
pub mod limits;
pub mod numa;
pub mod pci;
pub mod vf;

use std::path::{Path, PathBuf};

/// Where sysfs, procfs and /dev are: `/sys`, `/proc` and `/dev` on a real host, or three
/// directories of a fake tree in tests.
#[derive(Clone, Debug)]
pub struct HostRoot {
    pub sys: PathBuf,
    pub proc: PathBuf,
    pub dev: PathBuf,
}

impl HostRoot {
    /// The running host.
    pub fn real() -> HostRoot {
        HostRoot {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            dev: PathBuf::from("/dev"),
        }
    }

    /// A fake tree: `dir/sys`, `dir/proc`, `dir/dev`.
    pub fn at(dir: &Path) -> HostRoot {
        HostRoot {
            sys: dir.join("sys"),
            proc: dir.join("proc"),
            dev: dir.join("dev"),
        }
    }

    pub fn sys(&self, relative: &str) -> PathBuf {
        self.sys.join(relative)
    }

    pub fn proc(&self, relative: &str) -> PathBuf {
        self.proc.join(relative)
    }

    pub fn dev(&self, relative: &str) -> PathBuf {
        self.dev.join(relative)
    }
}

/// A sysfs attribute as trimmed text; `None` when it is absent or unreadable.
pub(crate) fn read_attr(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The last component of a symlink's target (a driver's or a group's name).
pub(crate) fn link_name(path: &Path) -> Option<String> {
    std::fs::read_link(path)
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// Errors of the operator actions (`vf create|reset|quarantine`).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no PCI device {0} (not in /sys/bus/pci/devices)")]
    NoDevice(String),
    #[error(
        "`{0}` is not a PCI address (expected [DOMAIN:]BUS:DEVICE.FUNCTION, e.g. 0000:01:00.0)"
    )]
    BadAddress(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub(crate) fn io_error(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> HostError {
    let path = path.to_path_buf();
    move |source| HostError::Io { what, path, source }
}

#[cfg(test)]
pub(crate) mod fake {
    //! Fake sysfs/procfs trees for the unit tests.
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A temporary directory removed on drop.
    pub struct FakeTree {
        pub dir: PathBuf,
    }

    impl FakeTree {
        pub fn new() -> FakeTree {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "sluice-host-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            FakeTree { dir }
        }

        pub fn root(&self) -> super::HostRoot {
            super::HostRoot::at(&self.dir)
        }

        pub fn write(&self, relative: &str, text: impl AsRef<[u8]>) -> PathBuf {
            let path = self.dir.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            path
        }

        pub fn symlink(&self, relative: &str, target: &str) {
            let path = self.dir.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, path).unwrap();
        }

        pub fn read(&self, relative: &str) -> String {
            std::fs::read_to_string(self.dir.join(relative)).unwrap()
        }

        pub fn path(&self, relative: &str) -> PathBuf {
            self.dir.join(relative)
        }

        /// A PCI function at `device_path` (below sys/devices, e.g.
        /// "pci0000:00/0000:00:01.0/0000:01:00.0") with its config space, driver and group.
        pub fn pci_function(
            &self,
            device_path: &str,
            config: &[u8],
            driver: Option<&str>,
            group: Option<u32>,
        ) {
            let bdf = Path::new(device_path)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            let dir = format!("sys/devices/{device_path}");
            self.write(&format!("{dir}/config"), config);
            self.write(&format!("{dir}/vendor"), "0x1b36\n");
            self.write(&format!("{dir}/device"), "0x0010\n");
            self.write(&format!("{dir}/class"), "0x010802\n");
            self.write(&format!("{dir}/numa_node"), "-1\n");
            self.write(&format!("{dir}/driver_override"), "(null)\n");
            self.symlink(
                &format!("sys/bus/pci/devices/{bdf}"),
                &self.dir.join(&dir).to_string_lossy(),
            );
            if let Some(driver) = driver {
                std::fs::create_dir_all(self.dir.join(format!("sys/bus/pci/drivers/{driver}")))
                    .unwrap();
                self.symlink(
                    &format!("{dir}/driver"),
                    &format!("../../../../bus/pci/drivers/{driver}"),
                );
            }
            if let Some(group) = group {
                let group_dir = format!("sys/kernel/iommu_groups/{group}");
                std::fs::create_dir_all(self.dir.join(format!("{group_dir}/devices"))).unwrap();
                self.symlink(
                    &format!("{group_dir}/devices/{bdf}"),
                    &self.dir.join(&dir).to_string_lossy(),
                );
                self.symlink(
                    &format!("{dir}/iommu_group"),
                    &self.dir.join(&group_dir).to_string_lossy(),
                );
            }
        }
    }

    impl Drop for FakeTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
