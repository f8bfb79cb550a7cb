//! Cloud Hypervisor and Firecracker as competitors: prebuilt binaries in an "anchors" directory
//! (`--anchors DIR`, else `$SLUICE_ANCHORS`, else `../shared/anchors` from the repository root or
//! one of its ancestors, which also finds it from a worktree one level deeper).
//!
//! Both boot the guest kit ELF unchanged through its PVH entry note. Neither ends when the guest
//! kit does: the guest kit powers off through the debug-exit port (0xf4), which neither emulates,
//! and Cloud Hypervisor's ACPI power-off is not the one the guest kit uses. So the bench kills
//! them after the `GUEST-KIT` verdict line and takes the verdict as the exit status; their
//! process-exit time is therefore not reported.
//!
//! Command lines and configuration are those of the anchors' README (shared/anchors/README.md).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use sluice_guest_kit::ExitKind;

use crate::competitor::{command_line, guest_output, tap_name, RunOutput};
use crate::exec::{self, Ended, Measured};
use crate::metric;
use crate::net;
use crate::scenario::{Scenario, Workload};

/// Environment variable naming the anchors directory (when `--anchors` is not given).
pub const DIR_ENV: &str = "SLUICE_ANCHORS";
pub const CLOUD_HYPERVISOR: &str = "cloud-hypervisor";
pub const FIRECRACKER: &str = "firecracker";
/// The guest kit's verdict line; the bench stops the VMM once it is printed.
const VERDICT: &str = "GUEST-KIT";

/// Where the anchor binaries are, or where they were looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchors {
    /// The first candidate directory that exists.
    pub dir: Option<PathBuf>,
    /// Every directory considered, in order (for the skip message).
    pub candidates: Vec<PathBuf>,
}

impl Anchors {
    /// `flag` (`--anchors`) wins over `$SLUICE_ANCHORS`, which wins over the default search.
    pub fn locate(flag: Option<&Path>) -> Anchors {
        let from_env = std::env::var_os(DIR_ENV).filter(|v| !v.is_empty());
        let candidates = match (flag, from_env) {
            (Some(dir), _) => vec![dir.to_owned()],
            (None, Some(dir)) => vec![PathBuf::from(dir)],
            (None, None) => default_candidates(&repository_root()),
        };
        Anchors::among(candidates)
    }

    /// The first existing directory of `candidates`.
    pub fn among(candidates: Vec<PathBuf>) -> Anchors {
        let dir = candidates.iter().find(|d| d.is_dir()).cloned();
        Anchors { dir, candidates }
    }

    /// The path of binary `name`, or why it cannot be used.
    pub fn binary(&self, name: &str) -> Result<PathBuf, String> {
        let looked_in = || {
            self.candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(dir) = &self.dir else {
            return Err(format!(
                "no anchors directory (looked in {}); pass --anchors DIR or set {DIR_ENV}",
                looked_in()
            ));
        };
        let path = dir.join(name);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() && is_executable(&meta) => Ok(path),
            Ok(_) => Err(format!("{} is not an executable file", path.display())),
            Err(e) => Err(format!("{name} not in {}: {e}", dir.display())),
        }
    }

    /// `<binary> --version` of each anchor found, for the results' machine record.
    pub fn versions(&self) -> Value {
        let version = |name: &str| {
            let path = self.binary(name).ok()?;
            let output = Command::new(path).arg("--version").output().ok()?;
            let text = String::from_utf8_lossy(&output.stdout);
            text.lines().next().map(str::to_owned)
        };
        json!({
            "dir": self.dir,
            CLOUD_HYPERVISOR: version(CLOUD_HYPERVISOR),
            FIRECRACKER: version(FIRECRACKER),
        })
    }
}

fn is_executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

/// The repository this crate was built from (crates/bench/../..).
fn repository_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// `<root>/../shared/anchors` first, then `shared/anchors` under each further ancestor.
fn default_candidates(root: &Path) -> Vec<PathBuf> {
    root.ancestors()
        .skip(1)
        .map(|dir| dir.join("shared").join("anchors"))
        .collect()
}

/// Runs `scenario` on Cloud Hypervisor.
pub fn run_cloud_hypervisor(
    binary: &Path,
    scenario: &Scenario,
    env: &crate::competitor::Env,
) -> Result<RunOutput, String> {
    let mut command = Command::new(binary);
    command.arg("--kernel").arg(&env.kernel);
    command.args(["--cpus", "boot=1", "--memory"]);
    command.arg(format!("size={}M", scenario.memory_mib()));
    command.args(["--serial", "tty", "--console", "off", "--cmdline"]);
    command.arg(scenario.guest_cmdline());
    let mut feeder = None;
    match &scenario.workload {
        Workload::Blk(b) => {
            command.arg("--disk").arg(format!(
                "path={},direct=on,image_type=raw,num_queues={}",
                env.image.display(),
                b.queues
            ));
        }
        Workload::Net(n) => {
            // Cloud Hypervisor creates the tap and brings it up; it vanishes with the process.
            let tap = tap_name();
            command.arg("--net").arg(format!("tap={tap}"));
            if n.dir == "rx" {
                feeder = Some(net::feed_tap(tap, n.size as usize));
            }
        }
        Workload::Startup | Workload::FirstInstruction => {}
    }
    let argv = command_line(&command);
    let measured = exec::run_measured_until(command, env.timeout, &[], Some(VERDICT));
    if let Some(feeder) = feeder {
        feeder.stop();
    }
    let measured = measured.map_err(|e| format!("starting {CLOUD_HYPERVISOR}: {e}"))?;
    finish(scenario, &measured, CLOUD_HYPERVISOR, argv)
}

/// Runs `scenario` on Firecracker (`--no-api --enable-pci --config-file`).
pub fn run_firecracker(
    binary: &Path,
    scenario: &Scenario,
    env: &crate::competitor::Env,
) -> Result<RunOutput, String> {
    let id = crate::competitor::unique();
    let config_path = env.workdir.join(format!("firecracker-{id}.json"));
    let log_path = env.workdir.join(format!("firecracker-{id}.log"));
    // Firecracker opens the log file without creating it.
    fs::write(&log_path, "").map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut tap = None;
    let mut feeder = None;
    if let Workload::Net(n) = &scenario.workload {
        // Firecracker opens an existing tap and leaves it down: the bench makes one.
        let made = PersistentTap::create(tap_name())?;
        if n.dir == "rx" {
            feeder = Some(net::feed_tap(made.name.clone(), n.size as usize));
        }
        tap = Some(made);
    }
    let config = firecracker_config(
        scenario,
        &env.kernel,
        &env.image,
        tap.as_ref().map(|t| t.name.as_str()),
        &log_path,
    );
    fs::write(&config_path, config.to_string())
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let mut command = Command::new(binary);
    command.args(["--no-api", "--enable-pci", "--config-file"]);
    command.arg(&config_path);
    let mut argv = command_line(&command);
    argv.push(format!("# config: {config}"));
    let measured = exec::run_measured_until(command, env.timeout, &[], Some(VERDICT));
    if let Some(feeder) = feeder {
        feeder.stop();
    }
    drop(tap);
    let mut measured = measured.map_err(|e| format!("starting {FIRECRACKER}: {e}"))?;
    // Its log (warnings and errors) explains a failed run.
    if let Ok(log) = fs::read_to_string(&log_path) {
        measured.stderr.push_str(&log);
    }
    let _ = fs::remove_file(&log_path);
    let _ = fs::remove_file(&config_path);
    finish(scenario, &measured, FIRECRACKER, argv)
}

/// Firecracker's whole VM configuration (its `--config-file`).
fn firecracker_config(
    scenario: &Scenario,
    kernel: &Path,
    image: &Path,
    tap: Option<&str>,
    log: &Path,
) -> Value {
    let drives: Vec<Value> = match &scenario.workload {
        Workload::Blk(_) => vec![json!({
            "drive_id": "d0",
            "path_on_host": image,
            "is_root_device": false,
            "is_read_only": false,
            "io_engine": "Async",
        })],
        _ => Vec::new(),
    };
    let mut config = json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": scenario.guest_cmdline()},
        "drives": drives,
        "machine-config": {"vcpu_count": 1, "mem_size_mib": scenario.memory_mib()},
        "logger": {"log_path": log, "level": "Warn"},
    });
    if let Some(tap) = tap {
        config["network-interfaces"] = json!([{"iface_id": "n0", "host_dev_name": tap}]);
    }
    config
}

/// The verdict stands in for the exit status the guest kit could not deliver.
fn exit_of(measured: &Measured) -> ExitKind {
    if measured.stopped_at_marker {
        let passed = measured
            .console
            .lines()
            .any(|l| l.trim_end() == "GUEST-KIT PASS");
        return if passed {
            ExitKind::Pass
        } else {
            ExitKind::WorkloadFailed
        };
    }
    match measured.ended {
        Some(Ended::Code(code)) => ExitKind::Other(code),
        _ => ExitKind::Killed,
    }
}

fn finish(
    scenario: &Scenario,
    measured: &Measured,
    role: &str,
    argv: Vec<String>,
) -> Result<RunOutput, String> {
    let workload = scenario.result_workload();
    let mut output = guest_output(workload, measured, exit_of(measured), role, argv)?;
    // The bench killed it: the time to exit says nothing about the VMM.
    output.metrics.remove(metric::EXIT_MS);
    Ok(output)
}

/// A tap made with `ip tuntap` for a VMM that only opens existing ones; deleted on drop.
struct PersistentTap {
    name: String,
}

impl PersistentTap {
    fn create(name: String) -> Result<PersistentTap, String> {
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])?;
        let tap = PersistentTap { name };
        ip(&["link", "set", &tap.name, "up"])?;
        Ok(tap)
    }
}

impl Drop for PersistentTap {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.name]) {
            eprintln!("bench: cannot delete tap {}: {e}", self.name);
        }
    }
}

/// Runs iproute2's `ip` (Debian: iproute2).
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::matrix;

    fn scenario(id: &str) -> Scenario {
        matrix(true, 32).into_iter().find(|s| s.id == id).expect(id)
    }

    #[test]
    fn default_search_starts_next_to_the_repository_and_climbs() {
        let candidates = default_candidates(Path::new("/work/wt/anchors"));

        assert_eq!(
            candidates,
            [
                PathBuf::from("/work/wt/shared/anchors"),
                PathBuf::from("/work/shared/anchors"),
                PathBuf::from("/shared/anchors"),
            ]
        );
    }

    #[test]
    fn missing_directory_names_where_it_looked_and_how_to_point_at_it() {
        let anchors = Anchors::among(vec![PathBuf::from("/nonexistent/anchors")]);

        let reason = anchors.binary(FIRECRACKER).expect_err("no directory");

        assert!(reason.contains("/nonexistent/anchors"), "{reason}");
        assert!(
            reason.contains("--anchors") && reason.contains(DIR_ENV),
            "{reason}"
        );
    }

    #[test]
    fn binary_must_be_an_executable_file_in_the_directory() {
        let dir = std::env::temp_dir().join(format!("sluice-anchors-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let plain = dir.join(CLOUD_HYPERVISOR);
        fs::write(&plain, "not a program").expect("write");
        let anchors = Anchors::among(vec![PathBuf::from("/nonexistent"), dir.clone()]);

        let not_executable = anchors.binary(CLOUD_HYPERVISOR);
        let absent = anchors.binary(FIRECRACKER);

        assert_eq!(anchors.dir.as_deref(), Some(dir.as_path()));
        assert!(not_executable.is_err_and(|e| e.contains("not an executable")));
        assert!(absent.is_err_and(|e| e.contains("firecracker not in")));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn firecracker_config_has_the_drive_only_for_block_scenarios() {
        let (kernel, image, log) = (Path::new("/k.elf"), Path::new("/d.img"), Path::new("/l"));

        let blk = firecracker_config(
            &scenario("blk-randread-4k-qd32-1q"),
            kernel,
            image,
            None,
            log,
        );
        let net = firecracker_config(&scenario("net-tx-64b"), kernel, image, Some("tap7"), log);

        assert_eq!(blk["drives"][0]["path_on_host"], "/d.img");
        assert_eq!(blk["drives"][0]["io_engine"], "Async");
        assert_eq!(
            blk["boot-source"]["boot_args"],
            scenario("blk-randread-4k-qd32-1q").guest_cmdline()
        );
        assert_eq!(blk["machine-config"]["mem_size_mib"], 256);
        assert!(blk.get("network-interfaces").is_none());
        assert_eq!(net["drives"], json!([]));
        assert_eq!(net["network-interfaces"][0]["host_dev_name"], "tap7");
    }

    #[test]
    fn a_stopped_run_takes_its_exit_from_the_verdict() {
        let stopped = |console: &str| Measured {
            console: console.into(),
            stopped_at_marker: true,
            ended: Some(Ended::Signal(libc::SIGKILL)),
            ..Measured::default()
        };

        assert_eq!(exit_of(&stopped("x\nGUEST-KIT PASS\n")), ExitKind::Pass);
        assert_eq!(
            exit_of(&stopped("GUEST-KIT FAIL blk\n")),
            ExitKind::WorkloadFailed
        );
        let crashed = Measured {
            ended: Some(Ended::Code(1)),
            ..Measured::default()
        };
        assert_eq!(exit_of(&crashed), ExitKind::Other(1));
    }
}
