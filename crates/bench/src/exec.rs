//! Runs one VMM (or fio) and measures it: wall-clock marks on its console, CPU time of every
//! process involved sampled from `/proc/<pid>/stat` at those marks, the child's `wait4` CPU
//! time when it is reaped, and its peak RSS.
//!
//! Peak RSS is the `VmHWM` of `/proc/<pid>/status`, sampled while the child runs and just
//! before it is killed, not `wait4`'s `ru_maxrss`: Linux carries the forking process's
//! high-water mark across `exec` into the child's `ru_maxrss`, so every child smaller than
//! the benchmark process itself would report the benchmark's own size (measured: a forked
//! `/bin/true` reports the parent's 60 MiB; its `VmHWM` is 1.8 MiB).
//!
//! The guest kit runner (`sluice_guest_kit::GuestKitRun`) builds the command lines; this module
//! replaces only its wait loop, because the benchmark needs the pid while the VMM runs and the
//! rusage when it ends, which `std::process::Child::wait` does not give.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Poll interval of the exit check.
const POLL: Duration = Duration::from_millis(2);

/// CPU seconds (user + system, all threads) of process `pid`, from `/proc/<pid>/stat`.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field 3 (state) is index 0 here; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_s())
}

/// Peak resident set of process `pid`'s own address space (`VmHWM`, KiB); `None` once it
/// has exited (a zombie has no address space).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The highest `VmHWM` seen across samples of one process.
#[derive(Debug, Default)]
struct PeakRss(std::sync::atomic::AtomicU64);

impl PeakRss {
    fn sample(&self, pid: u32) {
        if let Some(kib) = peak_rss_kib(pid) {
            self.0.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn kib(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Resource use of a reaped child: CPU from `wait4`, peak RSS from `VmHWM` samples (0 if
/// the child was never seen alive).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_s: f64,
    pub max_rss_kib: u64,
}

fn cpu_s_of(rusage: &libc::rusage) -> f64 {
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(rusage.ru_utime) + seconds(rusage.ru_stime)
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

/// Kills (SIGKILL) and reaps a child started elsewhere, returning its usage (peak RSS read
/// just before the kill).
pub fn kill_and_reap(pid: u32) -> Option<Usage> {
    let max_rss_kib = peak_rss_kib(pid).unwrap_or(0);
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: signalling a child we spawned and have not reaped yet.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    reap(pid).map(|(_, cpu_s)| Usage { cpu_s, max_rss_kib })
}

/// Waits for `pid` and returns how it ended and its CPU seconds.
fn reap(pid: libc::pid_t) -> Option<(Ended, f64)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid out-parameter.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `rusage` are valid for writes; `pid` is our unreaped child.
        let rc = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut rusage) };
        if rc == pid {
            break;
        }
        if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return None;
        }
    }
    let ended = if libc::WIFEXITED(status) {
        Ended::Code(libc::WEXITSTATUS(status))
    } else {
        Ended::Signal(libc::WTERMSIG(status))
    };
    Some((ended, cpu_s_of(&rusage)))
}

/// True once `pid` has exited; does not reap it (WNOWAIT), so `/proc/<pid>` stays readable.
fn has_exited(pid: libc::pid_t) -> bool {
    // SAFETY: an all-zero siginfo_t is a valid out-parameter.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is valid for writes; P_PID with our child's pid.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &raw mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled `info` (or left it zeroed, where si_pid reads 0).
    rc == 0 && unsafe { info.si_pid() } == pid
}

/// CPU seconds of each watched process at one console mark.
pub type CpuMark = Vec<Option<f64>>;

/// What one measured run produced.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub ended: Option<Ended>,
    pub timed_out: bool,
    pub console: String,
    pub stderr: String,
    pub wall: Duration,
    /// Spawn to the first console line of the guest kit (`sluice-guest...`).
    pub first_line: Option<Duration>,
    /// Spawn to the first `RESULT` line.
    pub first_result: Option<Duration>,
    /// CPU of [child, extra pids...] at the last `PCI:` line (just before the workload starts).
    pub cpu_at_workload_start: Option<CpuMark>,
    /// CPU of [child, extra pids...] at the first `RESULT` line (the workload's end).
    pub cpu_at_result: Option<CpuMark>,
    /// The child's rusage when reaped.
    pub usage: Usage,
    /// The child was killed after printing the `stop_at` line.
    pub stopped_at_marker: bool,
}

impl Measured {
    /// CPU seconds all watched processes spent between the workload start and its RESULT.
    pub fn workload_cpu_s(&self) -> Option<f64> {
        let (start, end) = (
            self.cpu_at_workload_start.as_ref()?,
            self.cpu_at_result.as_ref()?,
        );
        start
            .iter()
            .zip(end)
            .map(|(a, b)| Some(b.as_ref()? - a.as_ref()?))
            .sum()
    }
}

/// Console line prefix of the guest kit's own lines; the first one marks the guest's first
/// output (a VMM's banner or log lines on the same stream do not count).
const GUEST_PREFIX: &str = "sluice-guest";

#[derive(Default)]
struct ConsoleLog {
    text: String,
    first_line: Option<Duration>,
    first_result: Option<Duration>,
    at_pci: Option<CpuMark>,
    at_result: Option<CpuMark>,
    /// The `stop_at` line was seen and the child killed.
    stopped: bool,
}

fn sample(pids: &[u32]) -> CpuMark {
    pids.iter().map(|&pid| process_cpu_s(pid)).collect()
}

/// Reads the console line by line, noting times and CPU samples at the marks; kills the child
/// (`pids[0]`) after the first line that starts with `stop_at`.
fn watch_console(
    pipe: impl Read,
    start: Instant,
    pids: Vec<u32>,
    stop_at: Option<&str>,
    peak: &PeakRss,
) -> ConsoleLog {
    let mut log = ConsoleLog::default();
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
        let text = String::from_utf8_lossy(&line);
        if text.starts_with(GUEST_PREFIX) {
            log.first_line.get_or_insert_with(|| start.elapsed());
        }
        if !log.stopped && stop_at.is_some_and(|marker| text.starts_with(marker)) {
            log.stopped = true;
            if let Some(&child) = pids.first() {
                peak.sample(child);
            }
            if let Some(pid) = pids.first().and_then(|&p| libc::pid_t::try_from(p).ok()) {
                // SAFETY: signalling our own child, which the spawning thread reaps only after
                // this thread ends.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if text.contains("PCI: ") {
            log.at_pci = Some(sample(&pids));
        } else if text.contains("RESULT ") && log.first_result.is_none() {
            log.first_result = Some(start.elapsed());
            log.at_result = Some(sample(&pids));
        }
        log.text.push_str(&text);
        line.clear();
    }
    log
}

/// Spawns `command`, watches its console, kills it after `timeout`, and reaps it with rusage.
/// `extra_pids` (backends) are sampled at the same console marks as the child.
pub fn run_measured(
    command: Command,
    timeout: Duration,
    extra_pids: &[u32],
) -> std::io::Result<Measured> {
    run_measured_until(command, timeout, extra_pids, None)
}

/// [`run_measured`], and the child is killed as soon as it prints a line starting with
/// `stop_at` (for VMMs that do not end when the guest kit is done).
pub fn run_measured_until(
    mut command: Command,
    timeout: Duration,
    extra_pids: &[u32],
    stop_at: Option<&'static str>,
) -> std::io::Result<Measured> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command.spawn()?;
    let pid = child.id();
    let raw_pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    let mut pids = vec![pid];
    pids.extend_from_slice(extra_pids);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let peak = std::sync::Arc::new(PeakRss::default());
    let console_peak = peak.clone();
    let console = thread::spawn(move || match stdout {
        Some(pipe) => watch_console(pipe, start, pids, stop_at, &console_peak),
        None => ConsoleLog::default(),
    });
    let errors = thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = stderr {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    });

    let deadline = start + timeout;
    let mut timed_out = false;
    while !has_exited(raw_pid) {
        peak.sample(pid);
        if Instant::now() >= deadline {
            timed_out = true;
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(raw_pid, libc::SIGKILL) };
            break;
        }
        thread::sleep(POLL);
    }
    // The child is a zombie (or being killed) now: its pipes close, the readers finish, and
    // the console thread's last samples could still read /proc/<pid>.
    let log = console.join().unwrap_or_default();
    let stderr = errors.join().unwrap_or_default();
    let reaped = reap(raw_pid);
    let wall = start.elapsed();
    Ok(Measured {
        ended: reaped.map(|(ended, _)| ended),
        timed_out,
        console: log.text,
        stderr,
        wall,
        first_line: log.first_line,
        first_result: log.first_result,
        cpu_at_workload_start: log.at_pci,
        cpu_at_result: log.at_result,
        usage: Usage {
            cpu_s: reaped.map_or(0.0, |(_, cpu_s)| cpu_s),
            max_rss_kib: peak.kib(),
        },
        stopped_at_marker: log.stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_the_childs_own_not_the_benchmarks() {
        // The parent holds 64 MiB of touched memory while it forks; a small child must not
        // inherit that as its peak (wait4's ru_maxrss does), and a child that touches 48 MiB
        // must show them.
        let ballast = vec![1u8; 64 << 20];
        let mut small = Command::new("sleep");
        small.arg("0.3");
        let mut large = Command::new("python3");
        large.args(["-c", "import time; b = b'a' * (48 << 20); time.sleep(0.3)"]);

        let small = run_measured(small, Duration::from_secs(20), &[]).expect("run sleep");
        let large = run_measured(large, Duration::from_secs(20), &[]).expect("run python3");
        drop(ballast);

        let (small, large) = (small.usage.max_rss_kib, large.usage.max_rss_kib);
        assert!(
            small > 0 && small < 16 << 10,
            "sleep's peak RSS {small} KiB"
        );
        assert!(
            (48 << 10..96 << 10).contains(&large),
            "python3's peak RSS {large} KiB"
        );
    }

    #[test]
    fn shell_child_is_measured_with_marks_and_exit_code() {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "echo hello; echo 'sluice-guest: booting'; echo 'PCI: 00:00.0'; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
             echo 'RESULT {}'; exit 3",
        ]);

        let measured = run_measured(command, Duration::from_secs(20), &[]).expect("run sh");

        assert_eq!(measured.ended, Some(Ended::Code(3)));
        assert!(!measured.timed_out);
        assert!(
            measured.console.starts_with("hello\n"),
            "{}",
            measured.console
        );
        assert!(measured.first_line <= measured.first_result);
        assert!(measured.first_result.is_some());
        let cpu = measured.workload_cpu_s().expect("both marks sampled");
        assert!(cpu >= 0.0, "{cpu}");
        assert!(measured.usage.max_rss_kib > 0);
    }

    #[test]
    fn a_child_is_stopped_after_the_marker_line() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'GUEST-KIT PASS'; exec sleep 30"]);

        let measured = run_measured_until(command, Duration::from_secs(20), &[], Some("GUEST-KIT"))
            .expect("run sh");

        assert!(measured.stopped_at_marker);
        assert!(!measured.timed_out);
        assert_eq!(measured.ended, Some(Ended::Signal(libc::SIGKILL)));
        assert!(
            measured.wall < Duration::from_secs(10),
            "{:?}",
            measured.wall
        );
        assert_eq!(measured.first_line, None, "no guest kit line was printed");
    }

    #[test]
    fn a_child_past_its_timeout_is_killed() {
        let mut command = Command::new("sleep");
        command.arg("30");

        let measured = run_measured(command, Duration::from_millis(100), &[]).expect("run");

        assert!(measured.timed_out);
        assert_eq!(measured.ended, Some(Ended::Signal(libc::SIGKILL)));
        assert!(measured.wall < Duration::from_secs(10));
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let cpu = process_cpu_s(std::process::id());

        assert!(cpu.is_some_and(|s| s >= 0.0));
    }
}
