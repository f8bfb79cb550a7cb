//! What bounds the memory a VM may pin or use: RLIMIT_MEMLOCK (VFIO type1 charges every pinned
//! page to it unless the process has CAP_IPC_LOCK), the memory cgroup (guest RAM is charged to
//! it; a limit below the guest's size means the OOM killer, not an error), and hugepages.
//!
//! All read from procfs/sysfs, not from getrlimit, so that the same code runs on fake trees;
//! `/proc/self` is this process.

use std::path::PathBuf;

use crate::{read_attr, HostRoot};

/// CAP_IPC_LOCK's bit in the capability sets.
const CAP_IPC_LOCK: u32 = 14;
/// Limits at or above this are "no limit" (cgroup v1 writes PAGE_COUNTER_MAX pages in bytes,
/// 0x7ffffffffffff000).
const UNLIMITED_FLOOR: u64 = 1 << 62;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Memlock {
    /// The soft limit in bytes; `None` for unlimited.
    pub soft: Option<u64>,
    /// Whether the process has CAP_IPC_LOCK in its effective set (VFIO then skips the limit).
    pub cap_ipc_lock: bool,
}

impl Memlock {
    /// `None` when /proc/self/limits has no readable "Max locked memory" line.
    pub fn read(root: &HostRoot) -> Option<Memlock> {
        let limits = read_attr(&root.proc("self/limits"))?;
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max locked memory"))?;
        let soft = line
            .trim_start_matches("Max locked memory")
            .split_whitespace()
            .next()?;
        let soft = match soft {
            "unlimited" => None,
            bytes => Some(bytes.parse().ok()?),
        };
        Some(Memlock {
            soft,
            cap_ipc_lock: effective_capabilities(root)
                .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0),
        })
    }

    /// Whether `bytes` can be pinned.
    pub fn allows(&self, bytes: u64) -> bool {
        self.cap_ipc_lock || self.soft.is_none_or(|soft| soft >= bytes)
    }
}

fn effective_capabilities(root: &HostRoot) -> Option<u64> {
    let status = read_attr(&root.proc("self/status"))?;
    let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(caps.trim(), 16).ok()
}

/// The tightest memory cgroup limit over this process's cgroup and its ancestors.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CgroupMemory {
    /// The cgroup directory whose limit is the tightest (or this process's own, if none is set).
    pub cgroup: PathBuf,
    /// `memory.max` (v2) or `memory.limit_in_bytes` (v1); `None` for no limit.
    pub limit: Option<u64>,
    /// What that cgroup already uses.
    pub usage: Option<u64>,
    pub version: u8,
}

impl CgroupMemory {
    /// `None` when this process's memory cgroup cannot be found.
    pub fn read(root: &HostRoot) -> Option<CgroupMemory> {
        let membership = read_attr(&root.proc("self/cgroup"))?;
        // v1's memory controller wins when both exist: it is the one that limits memory.
        let (version, path, limit_file, usage_file) =
            match membership.lines().find_map(|l| v1_memory_path(l)) {
                Some(path) => (
                    1,
                    root.sys("fs/cgroup/memory")
                        .join(path.trim_start_matches('/')),
                    "memory.limit_in_bytes",
                    "memory.usage_in_bytes",
                ),
                None => {
                    let path = membership.lines().find_map(|l| l.strip_prefix("0::"))?;
                    (
                        2,
                        root.sys("fs/cgroup").join(path.trim_start_matches('/')),
                        "memory.max",
                        "memory.current",
                    )
                }
            };
        let top = match version {
            1 => root.sys("fs/cgroup/memory"),
            _ => root.sys("fs/cgroup"),
        };
        let mut tightest = CgroupMemory {
            cgroup: path.clone(),
            limit: None,
            usage: read_attr(&path.join(usage_file)).and_then(|u| u.parse().ok()),
            version,
        };
        let mut dir = Some(path.as_path());
        while let Some(current) = dir {
            if let Some(limit) = read_attr(&current.join(limit_file)).and_then(|l| parse_limit(&l))
            {
                if tightest.limit.is_none_or(|t| limit < t) {
                    tightest.cgroup = current.to_path_buf();
                    tightest.limit = Some(limit);
                    tightest.usage =
                        read_attr(&current.join(usage_file)).and_then(|u| u.parse().ok());
                }
            }
            if current == top {
                break;
            }
            dir = current.parent().filter(|p| p.starts_with(&top));
        }
        Some(tightest)
    }

    /// Bytes the cgroup can still take; `None` for no limit.
    pub fn available(&self) -> Option<u64> {
        self.limit
            .map(|l| l.saturating_sub(self.usage.unwrap_or(0)))
    }
}

/// The path of a cgroup v1 membership line for the memory controller (`4:memory:/a/b`).
fn v1_memory_path(line: &str) -> Option<&str> {
    let mut fields = line.splitn(3, ':');
    let _id = fields.next()?;
    let controllers = fields.next()?;
    let path = fields.next()?;
    controllers
        .split(',')
        .any(|c| c == "memory")
        .then_some(path)
}

/// A limit value: bytes, or `max` / a huge number for none.
fn parse_limit(text: &str) -> Option<u64> {
    if text == "max" {
        return None;
    }
    text.parse().ok().filter(|&bytes| bytes < UNLIMITED_FLOOR)
}

/// One hugepage size's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HugepagePool {
    pub size_kib: u64,
    pub total: u64,
    pub free: u64,
}

/// Every hugepage size the kernel offers, smallest first.
pub fn hugepages(root: &HostRoot) -> Vec<HugepagePool> {
    let dir = root.sys("kernel/mm/hugepages");
    let mut pools: Vec<HugepagePool> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let name = e.ok()?.file_name().to_string_lossy().into_owned();
                    let size_kib = name
                        .strip_prefix("hugepages-")?
                        .strip_suffix("kB")?
                        .parse()
                        .ok()?;
                    let number = |attr: &str| {
                        read_attr(&dir.join(&name).join(attr)).and_then(|v| v.parse().ok())
                    };
                    Some(HugepagePool {
                        size_kib,
                        total: number("nr_hugepages")?,
                        free: number("free_hugepages")?,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    pools.sort_by_key(|p| p.size_kib);
    pools
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeTree;

    const LIMITS: &str =
        "Limit                     Soft Limit           Hard Limit           Units     \n\
        Max open files            1024                 4096                 files     \n\
        Max locked memory         8388608              16777216             bytes     \n";

    #[test]
    fn memlock_is_the_soft_limit_unless_cap_ipc_lock() {
        let tree = FakeTree::new();
        tree.write("proc/self/limits", LIMITS);
        tree.write(
            "proc/self/status",
            "Name:\tsluice\nCapEff:\t0000000000000000\n",
        );

        let memlock = Memlock::read(&tree.root()).unwrap();

        assert_eq!(memlock.soft, Some(8 << 20));
        assert!(!memlock.cap_ipc_lock);
        assert!(memlock.allows(8 << 20));
        assert!(!memlock.allows((8 << 20) + 1));

        tree.write("proc/self/status", "CapEff:\t000001fffeffffff\n");
        let privileged = Memlock::read(&tree.root()).unwrap();
        assert!(privileged.cap_ipc_lock);
        assert!(privileged.allows(1 << 40));
    }

    #[test]
    fn unlimited_memlock_allows_anything() {
        let tree = FakeTree::new();
        tree.write(
            "proc/self/limits",
            "Max locked memory         unlimited            unlimited            bytes\n",
        );

        let memlock = Memlock::read(&tree.root()).unwrap();

        assert_eq!(memlock.soft, None);
        assert!(memlock.allows(u64::MAX));
    }

    #[test]
    fn cgroup_v2_takes_the_tightest_ancestor_limit() {
        let tree = FakeTree::new();
        tree.write("proc/self/cgroup", "0::/machine/vm1\n");
        tree.write("sys/fs/cgroup/machine/memory.max", "1073741824\n");
        tree.write("sys/fs/cgroup/machine/memory.current", "104857600\n");
        tree.write("sys/fs/cgroup/machine/vm1/memory.max", "max\n");
        tree.write("sys/fs/cgroup/machine/vm1/memory.current", "4096\n");

        let cgroup = CgroupMemory::read(&tree.root()).unwrap();

        assert_eq!(cgroup.version, 2);
        assert_eq!(cgroup.limit, Some(1 << 30));
        assert_eq!(cgroup.cgroup, tree.path("sys/fs/cgroup/machine"));
        assert_eq!(cgroup.available(), Some((1 << 30) - (100 << 20)));
    }

    #[test]
    fn cgroup_v1_memory_controller_and_its_unlimited_value() {
        let tree = FakeTree::new();
        tree.write("proc/self/cgroup", "5:devices:/\n4:memory:/jobs/a\n0::/\n");
        tree.write(
            "sys/fs/cgroup/memory/jobs/a/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        tree.write("sys/fs/cgroup/memory/jobs/a/memory.usage_in_bytes", "123\n");

        let cgroup = CgroupMemory::read(&tree.root()).unwrap();

        assert_eq!(cgroup.version, 1);
        assert_eq!(cgroup.limit, None);
        assert_eq!(cgroup.available(), None);

        tree.write(
            "sys/fs/cgroup/memory/jobs/memory.limit_in_bytes",
            "536870912\n",
        );
        tree.write("sys/fs/cgroup/memory/jobs/memory.usage_in_bytes", "0\n");
        let limited = CgroupMemory::read(&tree.root()).unwrap();
        assert_eq!(limited.limit, Some(512 << 20));
        assert_eq!(limited.available(), Some(512 << 20));
    }

    #[test]
    fn hugepage_pools_are_listed_smallest_first() {
        let tree = FakeTree::new();
        tree.write(
            "sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
            "0\n",
        );
        tree.write(
            "sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages",
            "0\n",
        );
        tree.write(
            "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            "64\n",
        );
        tree.write(
            "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
            "60\n",
        );

        let pools = hugepages(&tree.root());

        assert_eq!(
            pools,
            [
                HugepagePool {
                    size_kib: 2048,
                    total: 64,
                    free: 60
                },
                HugepagePool {
                    size_kib: 1 << 20,
                    total: 0,
                    free: 0
                },
            ]
        );
    }
}
