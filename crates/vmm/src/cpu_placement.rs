//! vCPU placement (`--cpus N,affinity=V:LIST,...,workers=LIST` and `--isolate`): each vCPU
//! thread on the host CPUs named for it, device worker threads on their own list, and a claim
//! on those CPUs that other sluice VMs can see.
//!
//! Threads: a vCPU thread pins itself as it starts ([`sluice_sandbox::spawn_on`]); every other
//! thread sluice starts later (queue workers, started by the vCPU that activates a device;
//! vhost-user frontends, INTx resamplers) goes to `workers=`, or, without it, to the CPUs the
//! process had before any placement — never to the CPU of whichever vCPU happened to start it.
//!
//! Claims: one lock file per host CPU under `/run/sluice/cpus/`, `flock`ed for the VM's life (the
//! kernel drops the lock when the process dies, however it dies, so nothing goes stale). A VM
//! that pins takes a shared lock on its CPUs; `--isolate` takes an exclusive one, so an isolated
//! VM and any other pinned VM on the same CPU refuse each other, whichever starts second. A VM
//! that does not pin keeps its threads off CPUs that an isolated VM holds.
//!
//! Host lists use the kernel's cpulist syntax with `+` instead of `,` (the option separator):
//! `2-3+6` is CPUs 2, 3 and 6.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sluice_host::numa::{format_cpulist, parse_cpulist};
use sluice_host::HostRoot;

/// Where the per-CPU lock files live.
pub const LOCK_DIR: &str = "/run/sluice/cpus";

/// `--cpus`: how many vCPUs and where they run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuSpec {
    pub count: u8,
    pub placement: CpuPlacement,
}

/// Where the VM's threads run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuPlacement {
    /// (vCPU index, host CPUs) for each vCPU named in `affinity=`.
    pub vcpus: Vec<(u8, Vec<u32>)>,
    /// Host CPUs of the device worker threads (`workers=`).
    pub workers: Option<Vec<u32>>,
    /// `--isolate`: the CPUs are this VM's alone.
    pub isolate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("--cpus: vCPU {vcpu} is pinned but the VM has {count} vCPUs")]
    NoSuchVcpu { vcpu: u8, count: u8 },
    #[error("--cpus: host CPUs {cpus} are not ones sluice may run on (allowed: {allowed})")]
    NotAllowed { cpus: String, allowed: String },
    #[error("--isolate needs --cpus ...,affinity= (which CPUs to isolate)")]
    NothingToIsolate,
    #[error(
        "{flag}: host CPU {cpu} is already {held} by another sluice VM{owner}; \
         refusing to share it. Host offers: {offers}"
    )]
    Taken {
        flag: &'static str,
        cpu: u32,
        held: &'static str,
        owner: String,
        offers: String,
    },
    #[error("cannot claim host CPU {cpu} ({path}): {source}")]
    Lock {
        cpu: u32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read or set the CPU affinity: {0}")]
    Affinity(std::io::Error),
}

impl CpuSpec {
    /// `N[,affinity=V:LIST[,V:LIST]...][,workers=LIST]`.
    pub fn parse(text: &str) -> Result<CpuSpec, String> {
        let mut parts = text.split(',');
        let count: u8 = parts
            .next()
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=254).contains(n))
            .ok_or_else(|| format!("`{text}`: expected a vCPU count 1..=254 first"))?;
        let mut placement = CpuPlacement::default();
        let mut in_affinity = false;
        for part in parts {
            let entry = if let Some(rest) = part.strip_prefix("affinity=") {
                if in_affinity || !placement.vcpus.is_empty() {
                    return Err("`affinity` is given more than once".into());
                }
                in_affinity = true;
                rest
            } else if let Some(list) = part.strip_prefix("workers=") {
                if placement.workers.is_some() {
                    return Err("`workers` is given more than once".into());
                }
                in_affinity = false;
                placement.workers = Some(host_list("workers", list)?);
                continue;
            } else if in_affinity {
                part
            } else {
                return Err(format!(
                    "`{part}`: expected affinity=V:LIST or workers=LIST"
                ));
            };
            let (vcpu, list) = entry
                .split_once(':')
                .ok_or_else(|| format!("affinity `{entry}`: expected VCPU:HOSTCPUS"))?;
            let vcpu: u8 = vcpu
                .parse()
                .map_err(|_| format!("affinity `{entry}`: `{vcpu}` is not a vCPU index"))?;
            if vcpu >= count {
                return Err(format!("affinity `{entry}`: the VM has {count} vCPUs"));
            }
            if placement.vcpus.iter().any(|(v, _)| *v == vcpu) {
                return Err(format!("affinity: vCPU {vcpu} is given more than once"));
            }
            placement.vcpus.push((vcpu, host_list("affinity", list)?));
        }
        Ok(CpuSpec { count, placement })
    }
}

/// `2-3+6`: a non-empty kernel cpulist with `+` for `,`.
fn host_list(key: &str, text: &str) -> Result<Vec<u32>, String> {
    parse_cpulist(&text.replace('+', ","))
        .filter(|cpus| !cpus.is_empty())
        .ok_or_else(|| format!("{key}: `{text}` is not a host CPU list like 2-3+6"))
}

/// The claims this process holds: open lock files, kept until the process ends.
static CLAIMS: Mutex<Option<Vec<File>>> = Mutex::new(None);

impl CpuPlacement {
    /// Whether any thread is placed.
    pub fn is_set(&self) -> bool {
        !self.vcpus.is_empty() || self.workers.is_some()
    }

    /// The host CPUs for vCPU `index`, if it is placed.
    pub fn vcpu_cpus(&self, index: u8) -> Option<Vec<u32>> {
        self.vcpus
            .iter()
            .find(|(vcpu, _)| *vcpu == index)
            .map(|(_, cpus)| cpus.clone())
    }

    /// Every host CPU this placement names, sorted, once each.
    pub fn host_cpus(&self) -> Vec<u32> {
        let mut cpus: Vec<u32> = self
            .vcpus
            .iter()
            .flat_map(|(_, cpus)| cpus.iter().copied())
            .chain(self.workers.iter().flatten().copied())
            .collect();
        cpus.sort_unstable();
        cpus.dedup();
        cpus
    }

    /// Checks the placement against the host, claims its CPUs in `lock_dir` and sets where
    /// worker threads go. Call before any VM thread starts; a second call in the same process
    /// does nothing (the claims are already held).
    pub fn apply(
        &self,
        root: &HostRoot,
        vcpu_count: u8,
        lock_dir: &Path,
    ) -> Result<(), PlacementError> {
        let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
        if claims.is_some() {
            return Ok(());
        }
        if let Some(&(vcpu, _)) = self.vcpus.iter().find(|(v, _)| *v >= vcpu_count) {
            return Err(PlacementError::NoSuchVcpu {
                vcpu,
                count: vcpu_count,
            });
        }
        if self.isolate && self.vcpus.is_empty() {
            return Err(PlacementError::NothingToIsolate);
        }
        let allowed = sluice_sandbox::current_thread_cpus().map_err(PlacementError::Affinity)?;
        let wanted = self.host_cpus();
        let outside: Vec<u32> = wanted
            .iter()
            .copied()
            .filter(|c| !allowed.contains(c))
            .collect();
        if !outside.is_empty() {
            return Err(PlacementError::NotAllowed {
                cpus: format_cpulist(&outside),
                allowed: format_cpulist(&allowed),
            });
        }
        let held = if self.is_set() {
            claim(root, lock_dir, &wanted, self.isolate)?
        } else {
            avoid_isolated_cpus(lock_dir, &allowed)?;
            Vec::new()
        };
        *claims = Some(held);
        if self.is_set() {
            let workers = self.workers.clone().unwrap_or(allowed);
            tracing::info!(
                "--cpus: vCPUs {:?}, workers on {}{}",
                self.vcpus,
                format_cpulist(&workers),
                if self.isolate { ", isolated" } else { "" }
            );
            sluice_sandbox::pin_workers(workers);
        }
        if self.isolate {
            let offers = HostIsolation::read(root);
            let unisolated: Vec<u32> = wanted
                .iter()
                .copied()
                .filter(|c| !offers.isolated.contains(c))
                .collect();
            if !unisolated.is_empty() {
                tracing::warn!(
                    "--isolate: host CPUs {} are not in the kernel's isolcpus, so host tasks \
                     may still run there ({})",
                    format_cpulist(&unisolated),
                    offers.describe()
                );
            }
        }
        Ok(())
    }
}

/// Locks each CPU's file: exclusively for `--isolate`, shared otherwise.
fn claim(
    root: &HostRoot,
    lock_dir: &Path,
    cpus: &[u32],
    isolate: bool,
) -> Result<Vec<File>, PlacementError> {
    let mut held = Vec::with_capacity(cpus.len());
    for &cpu in cpus {
        let (file, path) = open_lock(lock_dir, cpu)?;
        let mode = if isolate {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        match try_flock(&file, mode) {
            Ok(true) => {}
            Ok(false) => {
                let owner = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|text| text.trim().parse::<u32>().ok())
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(PlacementError::Taken {
                    flag: if isolate { "--isolate" } else { "--cpus" },
                    cpu,
                    held: if isolate { "pinned" } else { "isolated" },
                    owner,
                    offers: HostIsolation::read(root).describe(),
                });
            }
            Err(source) => return Err(PlacementError::Lock { cpu, path, source }),
        }
        // Who holds it, for the next VM's message; a shared lock's last holder wins.
        let _ = file.set_len(0);
        let _ = (&file).write_all(format!("{}\n", std::process::id()).as_bytes());
        held.push(file);
    }
    Ok(held)
}

/// A VM that does not pin keeps all its threads off the CPUs isolated VMs hold (if that
/// leaves any CPU).
fn avoid_isolated_cpus(lock_dir: &Path, allowed: &[u32]) -> Result<(), PlacementError> {
    if !lock_dir.is_dir() {
        return Ok(());
    }
    let mut free = Vec::with_capacity(allowed.len());
    for &cpu in allowed {
        let path = lock_dir.join(format!("cpu{cpu}"));
        let Ok(file) = File::open(&path) else {
            free.push(cpu);
            continue;
        };
        // A shared probe fails only against an exclusive (isolating) holder.
        if try_flock(&file, libc::LOCK_SH).unwrap_or(true) {
            free.push(cpu);
        }
    }
    if free.len() < allowed.len() && !free.is_empty() {
        tracing::info!(
            "host CPUs {} are isolated for other sluice VMs: this VM runs on {}",
            format_cpulist(
                &allowed
                    .iter()
                    .filter(|c| !free.contains(c))
                    .copied()
                    .collect::<Vec<_>>()
            ),
            format_cpulist(&free)
        );
        sluice_sandbox::pin_current_thread(&free).map_err(PlacementError::Affinity)?;
    }
    Ok(())
}

fn open_lock(lock_dir: &Path, cpu: u32) -> Result<(File, PathBuf), PlacementError> {
    let path = lock_dir.join(format!("cpu{cpu}"));
    let opened = std::fs::create_dir_all(lock_dir).and_then(|()| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
    });
    match opened {
        Ok(file) => Ok((file, path)),
        Err(source) => Err(PlacementError::Lock { cpu, path, source }),
    }
}

/// `flock(mode | LOCK_NB)`: `Ok(false)` when another open file holds a conflicting lock.
fn try_flock(file: &File, mode: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a file descriptor we own; it changes no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(error)
    }
}

/// What the host does to keep other work off CPUs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HostIsolation {
    /// `isolcpus=` (`/sys/devices/system/cpu/isolated`).
    pub isolated: Vec<u32>,
    /// `nohz_full=` (`/sys/devices/system/cpu/nohz_full`); `None` without NO_HZ_FULL.
    pub nohz_full: Option<Vec<u32>>,
    /// The cgroup cpuset sluice runs in (`cpuset.cpus.effective`), if readable.
    pub cpuset: Option<Vec<u32>>,
}

impl HostIsolation {
    pub fn read(root: &HostRoot) -> HostIsolation {
        let list = |relative: &str| {
            std::fs::read_to_string(root.sys(relative))
                .ok()
                .and_then(|text| parse_cpulist(&text))
        };
        HostIsolation {
            isolated: list("devices/system/cpu/isolated").unwrap_or_default(),
            nohz_full: list("devices/system/cpu/nohz_full"),
            cpuset: cgroup_cpuset(root),
        }
    }

    /// One line: `isolcpus 2-3, nohz_full none, cpuset 0-3`.
    pub fn describe(&self) -> String {
        let list = |cpus: &[u32]| {
            if cpus.is_empty() {
                "none".to_string()
            } else {
                format_cpulist(cpus)
            }
        };
        format!(
            "isolcpus {}, nohz_full {}, cgroup cpuset {}",
            list(&self.isolated),
            self.nohz_full
                .as_deref()
                .map_or("unsupported".to_string(), list),
            self.cpuset.as_deref().map_or("unknown".to_string(), list)
        )
    }
}

/// The effective cpuset of this process's cgroup: v2 (`0::/path`) or v1's cpuset hierarchy.
fn cgroup_cpuset(root: &HostRoot) -> Option<Vec<u32>> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |relative: String| {
        std::fs::read_to_string(root.sys(&relative))
            .ok()
            .and_then(|text| parse_cpulist(&text))
    };
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        let found = match controllers {
            "" => read(format!("fs/cgroup/{path}/cpuset.cpus.effective")),
            c if c.split(',').any(|c| c == "cpuset") => {
                read(format!("fs/cgroup/cpuset/{path}/cpuset.effective_cpus"))
            }
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_parses_vcpus_and_workers() {
        let spec = CpuSpec::parse("3,affinity=0:2,2:3-4+7,workers=5").unwrap();

        assert_eq!(spec.count, 3);
        assert_eq!(spec.placement.vcpus, vec![(0, vec![2]), (2, vec![3, 4, 7])]);
        assert_eq!(spec.placement.workers, Some(vec![5]));
        assert_eq!(spec.placement.host_cpus(), vec![2, 3, 4, 5, 7]);
        assert_eq!(
            CpuSpec::parse("2").unwrap().placement,
            CpuPlacement::default()
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        for bad in [
            "0",
            "255",
            "x",
            "2,affinity=2:1",
            "2,affinity=0:1,0:2",
            "2,affinity=0",
            "2,affinity=0:",
            "2,affinity=a:1",
            "2,workers=",
            "2,workers=1,workers=2",
            "2,1:3",
            "2,affinity=0:3-1",
            "2,affinity=0:1,affinity=1:1",
            "2,bogus=1",
        ] {
            assert!(CpuSpec::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn host_isolation_reads_the_kernel_lists() {
        let dir = std::env::temp_dir().join(format!("sluice-isolation-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sys/devices/system/cpu")).unwrap();
        std::fs::write(dir.join("sys/devices/system/cpu/isolated"), "2-3\n").unwrap();
        std::fs::write(dir.join("sys/devices/system/cpu/nohz_full"), "3\n").unwrap();

        let offers = HostIsolation::read(&HostRoot::at(&dir));

        assert_eq!(offers.isolated, vec![2, 3]);
        assert_eq!(offers.nohz_full, Some(vec![3]));
        assert!(
            offers.describe().starts_with("isolcpus 2-3, nohz_full 3, "),
            "{}",
            offers.describe()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_exclusive_claim_and_a_shared_one_refuse_each_other() {
        let dir = std::env::temp_dir().join(format!("sluice-cpu-claims-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = HostRoot::real();

        let isolated = claim(&root, &dir, &[0], true).unwrap();
        let shared = claim(&root, &dir, &[0], false).unwrap_err().to_string();
        drop(isolated);
        let first = claim(&root, &dir, &[0], false).unwrap();
        let second = claim(&root, &dir, &[0], false).unwrap();
        let exclusive = claim(&root, &dir, &[0], true).unwrap_err().to_string();

        assert!(
            shared.contains("host CPU 0 is already isolated"),
            "{shared}"
        );
        assert!(
            exclusive.contains("host CPU 0 is already pinned"),
            "{exclusive}"
        );
        assert!(exclusive.contains("Host offers: isolcpus"), "{exclusive}");
        drop((first, second));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
