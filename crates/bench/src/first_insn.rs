//! The `startup-first-insn` scenario: process start to the first guest instruction, sluice's
//! in-process setup time and the VMM's own memory (without guest RAM).
//!
//! The guest is a probe (bench/guests/first-insn-exit.S, assembled here with gcc and ld) whose
//! very first instruction writes the debug-exit port, so sluice's first vCPU exit is that
//! instruction. sluice logs the exit's wall-clock time (`first_exit_unix_ns`), `setup_us` and
//! `rss_overhead_kib` at `SLUICE_LOG=info` when the VM stops; this module reads them back from
//! its stderr.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::competitor::{command_line, on_path, Env, Metrics, ProcessUsage, RunOutput};
use crate::exec::{self, Ended};
use crate::metric as m;
use crate::scenario::STARTUP_MEMORY_MIB;

/// The probe's source, embedded so that `sluice bench` runs from any directory.
const PROBE_SOURCE: &str = include_str!("../../../bench/guests/first-insn-exit.S");

/// `Err(reason)` when the probe cannot be built here.
pub fn probe_tools() -> Result<(), String> {
    on_path("gcc", "apt-get install -y --no-install-recommends gcc")
        .and_then(|_| on_path("ld", "apt-get install -y --no-install-recommends binutils"))
}

/// Assembles and links the probe in `workdir` once; returns the ELF.
fn probe(workdir: &Path) -> Result<PathBuf, String> {
    let elf = workdir.join("first-insn-exit.elf");
    if elf.exists() {
        return Ok(elf);
    }
    let source = workdir.join("first-insn-exit.S");
    let object = workdir.join("first-insn-exit.o");
    std::fs::write(&source, PROBE_SOURCE).map_err(|e| format!("{}: {e}", source.display()))?;
    let mut assemble = Command::new("gcc");
    assemble.arg("-c").arg(&source).arg("-o").arg(&object);
    let mut link = Command::new("ld");
    link.args(["-static", "-nostdlib", "-N", "-Ttext=0x100000"])
        .args(["--no-warn-rwx-segments", "-o"])
        .arg(&elf)
        .arg(&object);
    for mut step in [assemble, link] {
        let output = step.output().map_err(|e| format!("{step:?}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "{step:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    Ok(elf)
}

/// Runs sluice once on the probe (1 vCPU, the startup scenario's RAM, no console).
pub fn run(env: &Env) -> Result<RunOutput, String> {
    let elf = probe(&env.workdir)?;
    let mut command = Command::new(&env.sluice);
    command
        .args(["run", "--cpus", "1", "--serial", "off", "--kernel"])
        .arg(&elf)
        .arg(format!("--memory={STARTUP_MEMORY_MIB}M"))
        .env("SLUICE_LOG", "info")
        .env("NO_COLOR", "1");
    let argv = command_line(&command);
    let spawned = unix_ns();
    let measured = exec::run_measured(command, env.timeout, &[])
        .map_err(|e| format!("starting sluice: {e}"))?;
    if measured.ended != Some(Ended::Code(0)) {
        return Err(format!(
            "sluice on the probe ended {:?}: {}",
            measured.ended, measured.stderr
        ));
    }
    let mut metrics = log_metrics(&measured.stderr, spawned)?;
    metrics.insert(m::EXIT_MS.into(), measured.wall.as_secs_f64() * 1e3);
    metrics.insert(
        m::VMM_MAX_RSS_MIB.into(),
        measured.usage.max_rss_kib as f64 / 1024.0,
    );
    Ok(RunOutput {
        metrics,
        processes: vec![ProcessUsage {
            role: "sluice".into(),
            cpu_s: measured.usage.cpu_s,
            max_rss_kib: measured.usage.max_rss_kib,
        }],
        command: argv,
    })
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The numbers sluice's "VM stopped" log line carries, for a process spawned at `spawned_ns`.
fn log_metrics(stderr: &str, spawned_ns: u64) -> Result<Metrics, String> {
    let text = strip_ansi(stderr);
    let field = |key: &str| -> Result<u64, String> {
        let pattern = format!("{key}=");
        let start = text
            .find(&pattern)
            .ok_or_else(|| format!("no {key} in sluice's log: {text}"))?
            + pattern.len();
        let digits: String = text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().map_err(|e| format!("{key}: {e}"))
    };
    let first_exit = field("first_exit_unix_ns")?;
    if first_exit < spawned_ns {
        return Err(format!(
            "first exit at {first_exit} ns precedes the spawn at {spawned_ns} ns"
        ));
    }
    let mut metrics = Metrics::new();
    metrics.insert(
        m::FIRST_INSN_MS.into(),
        (first_exit - spawned_ns) as f64 / 1e6,
    );
    metrics.insert(m::SETUP_MS.into(), field("setup_us")? as f64 / 1e3);
    metrics.insert(
        m::VMM_RSS_OVERHEAD_MIB.into(),
        field("rss_overhead_kib")? as f64 / 1024.0,
    );
    Ok(metrics)
}

/// `text` without ANSI escape sequences (`ESC [ ... final byte`), should the log be coloured.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for code in chars.by_ref() {
                if code.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-12-04T19:00:00Z  INFO sluice: VM stopped: DebugExit(0) \
        \u{1b}[3msetup_us\u{1b}[0m\u{1b}[2m=\u{1b}[0m6180 rss_overhead_kib=3532 \
        guest_ram_resident_kib=900 first_exit_unix_ns=1000007640000\n";

    #[test]
    fn log_fields_become_startup_metrics() {
        let metrics = log_metrics(LOG, 1_000_000_000_000).expect("parsed");

        assert_eq!(metrics[m::FIRST_INSN_MS], 7.64);
        assert_eq!(metrics[m::SETUP_MS], 6.18);
        assert_eq!(metrics[m::VMM_RSS_OVERHEAD_MIB], 3532.0 / 1024.0);
    }

    #[test]
    fn a_log_without_the_fields_is_an_error() {
        let verdict = log_metrics("INFO sluice: VM stopped: PowerOff\n", 0);

        assert!(verdict.is_err_and(|e| e.contains("first_exit_unix_ns")));
    }

    #[test]
    fn probe_builds_into_an_elf() {
        if let Err(reason) = probe_tools() {
            println!("SKIP probe_builds_into_an_elf: {reason}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("sluice-bench-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let elf = probe(&dir).expect("probe built");

        let bytes = std::fs::read(&elf).unwrap();
        assert_eq!(&bytes[..4], b"\x7fELF");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
