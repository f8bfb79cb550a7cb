//! NUMA placement (`--numa auto|off|NODE`): guest RAM, vCPU threads and device worker threads
//! on one node — the node of the first assigned device (auto) or the one named.
//!
//! Threads: the main thread's CPU affinity is set to the node's CPUs before any vCPU or worker
//! thread exists; every thread sluice starts afterwards (vCPUs, and the queue workers that the
//! vCPU threads start at device activation) inherits it, so no thread kind needs
//! sched_setaffinity in its seccomp list. Memory: each guest RAM mapping gets an mbind policy
//! before the first page is touched; on the memfd's MAP_SHARED mappings that becomes the
//! file's shared policy, so every page of guest RAM is allocated on the node. An explicit node
//! is strict (MPOL_BIND: an operator asked for it); auto only prefers (MPOL_PREFERRED: a hint
//! from a device must not make a VM fail for want of memory on one node).
//!
//! libc has no mbind wrapper (it is libnuma's), so the system call is made directly.

use sluice_host::pci::{Bdf, PciFunction};
use sluice_host::HostRoot;

use crate::memory::GuestRam;

/// `--numa`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NumaPolicy {
    /// No placement (the default).
    #[default]
    Off,
    /// The node of the first assigned device; without one, nothing.
    Auto,
    /// This node.
    Node(u32),
}

impl NumaPolicy {
    pub fn parse(text: &str) -> Result<NumaPolicy, String> {
        match text {
            "off" => Ok(NumaPolicy::Off),
            "auto" => Ok(NumaPolicy::Auto),
            node => node
                .parse()
                .map(NumaPolicy::Node)
                .map_err(|_| format!("expected auto, off or a node number, got `{node}`")),
        }
    }
}

/// Where the VM goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub node: u32,
    /// The node's CPUs; empty for a memory-only node (threads are then left where they are).
    pub cpus: Vec<u32>,
    /// MPOL_BIND (true) or MPOL_PREFERRED.
    pub strict: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    #[error("--numa {node}: no such NUMA node (online: {online})")]
    NoNode { node: u32, online: String },
    #[error("--numa: cannot pin threads to node {node}'s CPUs {cpus}: {source}")]
    Affinity {
        node: u32,
        cpus: String,
        source: std::io::Error,
    },
    #[error("--numa: cannot bind guest memory to node {node} (mbind): {source}")]
    Mbind { node: u32, source: std::io::Error },
}

/// Turns the policy into a placement. `devices` are the VM's assigned PCI functions, first
/// first (none until VFIO devices are wired in; then `auto` follows the first one).
pub fn resolve(
    root: &HostRoot,
    policy: NumaPolicy,
    devices: &[Bdf],
) -> Result<Option<Placement>, NumaError> {
    let (node, strict) = match policy {
        NumaPolicy::Off => return Ok(None),
        NumaPolicy::Node(node) => (node, true),
        NumaPolicy::Auto => {
            let Some(&first) = devices.first() else {
                tracing::info!("--numa auto: no assigned device, so no NUMA placement");
                return Ok(None);
            };
            let node = PciFunction::open(root, first)
                .ok()
                .and_then(|f| f.numa_node());
            match node {
                Some(node) => (node, false),
                None => {
                    tracing::info!("--numa auto: {first} has no NUMA node, so no placement");
                    return Ok(None);
                }
            }
        }
    };
    let cpus = sluice_host::numa::node_cpus(root, node).ok_or_else(|| NumaError::NoNode {
        node,
        online: sluice_host::numa::format_cpulist(&sluice_host::numa::online_nodes(root)),
    })?;
    Ok(Some(Placement { node, cpus, strict }))
}

impl Placement {
    /// Pins the calling thread (and so every thread it starts later) to the node's CPUs.
    pub fn pin_threads(&self) -> Result<(), NumaError> {
        if self.cpus.is_empty() {
            tracing::info!(
                "--numa: node {} has no CPUs; threads stay where they are",
                self.node
            );
            return Ok(());
        }
        if let Err(source) = sluice_sandbox::pin_current_thread(&self.cpus) {
            return Err(NumaError::Affinity {
                node: self.node,
                cpus: sluice_host::numa::format_cpulist(&self.cpus),
                source,
            });
        }
        tracing::info!(
            "--numa: sluice's threads run on node {} (CPUs {})",
            self.node,
            sluice_host::numa::format_cpulist(&self.cpus)
        );
        Ok(())
    }

    /// Gives every guest RAM mapping the node's memory policy. Call before the guest's memory
    /// is first touched: pages already allocated are not moved.
    pub fn bind_memory(&self, ram: &GuestRam) -> Result<(), NumaError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        const MPOL_PREFERRED: i32 = 1;
        const MPOL_BIND: i32 = 2;
        let mode = if self.strict {
            MPOL_BIND
        } else {
            MPOL_PREFERRED
        };
        // A mask of 1024 nodes (the kernel's largest MAX_NUMNODES); the kernel reads
        // maxnode - 1 bits of it.
        let mut mask = [0u64; 16];
        let word = (self.node / 64) as usize;
        if word >= mask.len() {
            return Err(NumaError::Mbind {
                node: self.node,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        mask[word] |= 1 << (self.node % 64);
        let maxnode = (mask.len() * 64 + 1) as u64;
        for region in ram.memory.iter() {
            // SAFETY: the range is a live mapping owned by `ram`; mbind only changes the
            // memory policy of those pages, never their contents or the mapping itself; `mask`
            // outlives the call and holds `maxnode - 1` bits.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_mbind,
                    region.as_ptr() as usize,
                    region.len() as usize,
                    mode,
                    mask.as_ptr(),
                    maxnode,
                    0u32,
                )
            };
            if rc != 0 {
                return Err(NumaError::Mbind {
                    node: self.node,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        tracing::info!(
            "--numa: guest RAM ({} MiB) {} node {}",
            ram.size >> 20,
            if self.strict { "bound to" } else { "prefers" },
            self.node
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_parses() {
        assert_eq!(NumaPolicy::parse("auto"), Ok(NumaPolicy::Auto));
        assert_eq!(NumaPolicy::parse("off"), Ok(NumaPolicy::Off));
        assert_eq!(NumaPolicy::parse("1"), Ok(NumaPolicy::Node(1)));
        assert!(NumaPolicy::parse("node1").is_err());
    }

    #[test]
    fn auto_without_devices_and_off_place_nothing() {
        let root = HostRoot::real();

        assert_eq!(resolve(&root, NumaPolicy::Auto, &[]).unwrap(), None);
        assert_eq!(resolve(&root, NumaPolicy::Off, &[]).unwrap(), None);
    }

    #[test]
    fn auto_follows_the_first_device_and_only_prefers_its_node() {
        let dir = std::env::temp_dir().join(format!("sluice-numa-auto-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let write = |relative: &str, text: &str| {
            let path = dir.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("sys/bus/pci/devices/0000:40:00.0/numa_node", "1\n");
        write("sys/bus/pci/devices/0000:00:03.0/numa_node", "-1\n");
        write("sys/devices/system/node/online", "0-1\n");
        write("sys/devices/system/node/node0/cpulist", "0-3\n");
        write("sys/devices/system/node/node1/cpulist", "4-7\n");
        let root = HostRoot::at(&dir);
        let nvme = Bdf::parse("40:00.0").unwrap();
        let no_node = Bdf::parse("00:03.0").unwrap();

        let placement = resolve(&root, NumaPolicy::Auto, &[nvme, no_node]).unwrap();
        let without_node = resolve(&root, NumaPolicy::Auto, &[no_node, nvme]).unwrap();
        let explicit = resolve(&root, NumaPolicy::Node(0), &[nvme]).unwrap();

        assert_eq!(
            placement,
            Some(Placement {
                node: 1,
                cpus: vec![4, 5, 6, 7],
                strict: false
            })
        );
        assert_eq!(without_node, None);
        assert_eq!(explicit.map(|p| (p.node, p.strict)), Some((0, true)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_node_is_an_error_naming_the_online_ones() {
        let message = resolve(&HostRoot::real(), NumaPolicy::Node(999), &[])
            .unwrap_err()
            .to_string();

        assert!(message.contains("no such NUMA node"), "{message}");
    }

    #[test]
    fn node_zero_binds_guest_ram_and_the_pages_land_there() {
        let root = HostRoot::real();
        if sluice_host::numa::node_cpus(&root, 0).is_none() {
            println!("SKIP node_zero_binds_guest_ram: no NUMA node 0 in sysfs");
            return;
        }
        let placement = resolve(&root, NumaPolicy::Node(0), &[]).unwrap().unwrap();
        let ram = GuestRam::new(32 << 20).unwrap();

        placement.bind_memory(&ram).unwrap();
        use vm_memory::Bytes;
        ram.memory
            .write_obj(0x5a5a_u16, vm_memory::GuestAddress(0x2000))
            .unwrap();

        let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
        let line = maps
            .lines()
            .find(|l| l.contains("sluice-guest-ram"))
            .unwrap_or_else(|| panic!("no guest RAM in numa_maps:\n{maps}"));
        assert!(line.contains("bind:0"), "{line}");
        assert!(line.contains("N0="), "{line}");
    }
}
