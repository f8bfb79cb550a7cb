//! vCPU placement through the binary (`--cpus N,affinity=...,workers=...`, `--isolate`): every
//! vCPU and worker thread's `Cpus_allowed_list` read back from /proc while the guest kit runs,
//! and a second VM refused the CPUs an isolated VM holds.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{build_guest, skip_without_kvm, wait_for, wait_or_kill, EXIT_VMM_ERROR, SLUICE};

/// (thread name, Cpus_allowed_list) of every thread of `pid`.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
        .map(|status| {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            (field("Name:"), field("Cpus_allowed_list:"))
        })
        .collect()
}

/// The two tests claim the same host CPUs, one exclusively: one at a time.
static CPU_CLAIMS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn image(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("placement-{name}-{}.img", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    path
}

/// The guest kit on two vCPUs pinned one per host CPU, with a two-queue disk whose workers are
/// pinned to CPU 1: vCPU 0 activates the disk, so a worker that merely inherited its starter's
/// affinity would show CPU 0.
#[test]
fn vcpu_and_worker_threads_run_where_placed() {
    if skip_without_kvm("vcpu_and_worker_threads_run_where_placed") || online_cpus() < 2 {
        return;
    }
    let _claims = CPU_CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    let disk = image("workers");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("placement-{}.out", std::process::id()));
    let mut child = Command::new(SLUICE)
        .args(["run", "--cpus", "2,affinity=0:0,1:1,workers=1", "--disk"])
        .arg(format!("path={},queues=2", disk.display()))
        .args([
            "--cmdline",
            "quiet w=blk:op=randread:bs=4096:qd=2:queues=2:span_mb=1:ops=100000000:\
             dur_ms=3000:mode=irq:seed=5:cpus=2",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();

    let mut seen = Vec::new();
    wait_for(
        "two vCPU and two queue threads",
        Duration::from_secs(60),
        || {
            seen = thread_cpus(pid);
            let workers = seen.iter().filter(|(n, _)| n.contains("-q")).count();
            let vcpus = seen.iter().filter(|(n, _)| n.starts_with("vcpu")).count();
            workers >= 2 && vcpus == 2 || child.try_wait().unwrap().is_some()
        },
    );
    let status = wait_or_kill(&mut child, Duration::from_secs(120));

    let console = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(status, Some(0), "{console}");
    assert!(console.contains("GUEST-KIT PASS"), "{console}");
    let cpus_of = |name: &str| -> Vec<&str> {
        seen.iter()
            .filter(|(n, _)| n.contains(name))
            .map(|(_, cpus)| cpus.as_str())
            .collect()
    };
    assert_eq!(cpus_of("vcpu0"), vec!["0"], "{seen:?}");
    assert_eq!(cpus_of("vcpu1"), vec!["1"], "{seen:?}");
    let workers = cpus_of("-q");
    assert!(workers.len() >= 2, "{seen:?}");
    assert!(workers.iter().all(|cpus| *cpus == "1"), "{seen:?}");
    let _ = std::fs::remove_file(disk);
    let _ = std::fs::remove_file(out);
}

fn start_waiting_vm(cpus: &str, isolate: bool) -> Child {
    let mut command = Command::new(SLUICE);
    command
        .args(["run", "--kernel"])
        .arg(build_guest("wait"))
        .args(["--serial", "off", "--cpus", cpus]);
    if isolate {
        command.arg("--isolate");
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// An isolated VM on host CPU 1: a second `--isolate` VM and a plainly pinned VM on CPU 1 are
/// refused with a message naming the CPU and what the host offers; a VM that does not pin runs
/// all its threads on CPU 0; CPU 0 stays usable for another isolated VM.
#[test]
fn a_second_vm_is_refused_the_cpus_an_isolated_vm_holds() {
    if skip_without_kvm("a_second_vm_is_refused_the_cpus_an_isolated_vm_holds") || online_cpus() < 2
    {
        return;
    }
    let _claims = CPU_CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    let mut first = start_waiting_vm("1,affinity=0:1", true);
    let pid = first.id();
    wait_for("the first VM's vCPU", Duration::from_secs(30), || {
        thread_cpus(pid).iter().any(|(n, _)| n == "vcpu0")
    });

    let refused = |cpus: &str, isolate: bool| {
        let mut second = start_waiting_vm(cpus, isolate);
        let status = wait_or_kill(&mut second, Duration::from_secs(30));
        let mut stderr = String::new();
        use std::io::Read;
        second
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status, stderr)
    };
    let (isolated_status, isolated_message) = refused("1,affinity=0:1", true);
    let (pinned_status, pinned_message) = refused("1,affinity=0:0-1", false);
    let mut unpinned = start_waiting_vm("1", false);
    let unpinned_pid = unpinned.id();
    let mut unpinned_threads = Vec::new();
    wait_for("the unpinned VM's vCPU", Duration::from_secs(30), || {
        unpinned_threads = thread_cpus(unpinned_pid);
        unpinned_threads.iter().any(|(n, _)| n == "vcpu0") || unpinned.try_wait().unwrap().is_some()
    });
    let _ = unpinned.kill();
    let _ = unpinned.wait();
    let mut elsewhere = start_waiting_vm("1,affinity=0:0", true);
    let elsewhere_pid = elsewhere.id();
    wait_for("the VM on CPU 0", Duration::from_secs(30), || {
        thread_cpus(elsewhere_pid).iter().any(|(n, _)| n == "vcpu0")
            || elsewhere.try_wait().unwrap().is_some()
    });
    let elsewhere_running = elsewhere.try_wait().unwrap().is_none();
    for child in [&mut first, &mut elsewhere] {
        let _ = child.kill();
        let _ = child.wait();
    }

    assert_eq!(isolated_status, Some(EXIT_VMM_ERROR), "{isolated_message}");
    assert!(
        isolated_message.contains("--isolate: host CPU 1 is already pinned by another sluice VM"),
        "{isolated_message}"
    );
    assert!(
        isolated_message.contains(&format!("(pid {pid})")),
        "{isolated_message}"
    );
    assert!(
        isolated_message.contains("Host offers: isolcpus"),
        "{isolated_message}"
    );
    assert_eq!(pinned_status, Some(EXIT_VMM_ERROR), "{pinned_message}");
    assert!(
        pinned_message.contains("host CPU 1 is already isolated by another sluice VM"),
        "{pinned_message}"
    );
    assert!(elsewhere_running, "a VM on CPU 0 must start");
    // A VM that does not pin keeps every thread off the isolated CPU.
    assert!(
        unpinned_threads.iter().any(|(n, _)| n == "vcpu0"),
        "{unpinned_threads:?}"
    );
    assert!(
        unpinned_threads.iter().all(|(_, cpus)| cpus == "0"),
        "{unpinned_threads:?}"
    );
}
