//! `sluice bench`: runs the benchmark matrix (scenarios × competitors, alternating competitors
//! within each repetition) and writes `results.json` (every sample), `results.md` and SVG plots.
//!
//! Competitors: sluice with in-process virtio (with each notify policy: irq, poll, batch),
//! sluice with vhost-user backends (`sluice serve blk`, qemu-storage-daemon), QEMU -accel kvm,
//! Cloud Hypervisor and Firecracker (prebuilt, from the anchors directory: see [`anchors`]), host
//! fio. Each is skipped, with the reason recorded, when the host lacks what it needs.

pub mod anchors;
pub mod competitor;
pub mod exec;
pub mod first_insn;
pub mod metric;
pub mod net;
pub mod report;
pub mod scenario;
pub mod schedule;
pub mod stats;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{json, Value};

use anchors::Anchors;
use competitor::{Competitor, Env, ALL};
use report::{Sample, Skip};
use scenario::{Scenario, Workload};

/// `sluice bench` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// One repetition and small op counts (about 2-3 minutes for the whole matrix).
    #[arg(long)]
    pub quick: bool,
    /// Run only matching pairs: `SCENARIO[/COMPETITOR]`, a substring of the scenario id and
    /// an exact competitor id, comma-separated alternatives; e.g. `blk-randread`,
    /// `startup/sluice`, `qd32-1q/qemu`.
    #[arg(long)]
    pub only: Option<String>,
    /// Output directory for results.json, results.md and the SVG plots.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Repetitions per pair (default 3; 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: Option<u32>,
    /// Disk image for the block scenarios (created, fully written, if missing or too small).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Print the planned runs and exit.
    #[arg(long)]
    pub list: bool,
    /// Directory holding the `cloud-hypervisor` and `firecracker` binaries. Default:
    /// $SLUICE_ANCHORS, else `../shared/anchors` from the repository root (or from one of its
    /// ancestors). Without them those competitors are skipped with the reason.
    #[arg(long, value_name = "DIR")]
    pub anchors: Option<PathBuf>,
}

impl BenchArgs {
    fn reps(&self) -> u32 {
        self.reps.unwrap_or(if self.quick { 1 } else { 3 })
    }

    fn image_mib(&self) -> u64 {
        if self.quick {
            32
        } else {
            256
        }
    }

    fn image_path(&self) -> PathBuf {
        self.image.clone().unwrap_or_else(|| {
            PathBuf::from(format!("/var/tmp/sluice-bench-{}M.img", self.image_mib()))
        })
    }
}

/// Hard limit per VM run.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// The plan: scenarios, competitors per scenario, and what is skipped.
struct Plan {
    anchors: Anchors,
    /// Per entry of [`ALL`]: whether this host can run it at all.
    availability: Vec<Result<(), String>>,
    scenarios: Vec<Scenario>,
    /// `pairs[s]`: indices into [`ALL`] that run scenario `s`.
    pairs: Vec<Vec<usize>>,
    skipped: Vec<Skip>,
}

fn plan(args: &BenchArgs) -> Plan {
    let anchors = Anchors::locate(args.anchors.as_deref());
    let availability: Vec<Result<(), String>> =
        ALL.iter().map(|c| c.availability(&anchors)).collect();
    let mut scenarios = Vec::new();
    let mut pairs = Vec::new();
    let mut skipped = Vec::new();
    for scenario in scenario::matrix(args.quick, args.image_mib()) {
        let mut runs = Vec::new();
        for (index, competitor) in ALL.iter().enumerate() {
            if !competitor.supports(&scenario)
                || !scenario.selected(competitor.id(), args.only.as_deref())
            {
                continue;
            }
            let ready = availability[index]
                .clone()
                .and_then(|_| competitor.scenario_availability(&scenario));
            match ready {
                Ok(()) => runs.push(index),
                Err(reason) => skipped.push(Skip {
                    scenario: scenario.id.clone(),
                    competitor: competitor.id().into(),
                    reason,
                }),
            }
        }
        if !runs.is_empty() || skipped.iter().any(|s| s.scenario == scenario.id) {
            scenarios.push(scenario);
            pairs.push(runs);
        }
    }
    Plan {
        anchors,
        availability,
        scenarios,
        pairs,
        skipped,
    }
}

/// Runs `sluice bench`; `sluice` is the binary that runs the VMs and serves vhost-user.
/// Returns the exit status: 0 when every run succeeded, 1 when some failed.
pub fn run(args: &BenchArgs, sluice: &Path) -> anyhow::Result<u8> {
    let started = Instant::now();
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let plan = plan(args);
    let reps = args.reps();
    let slots = schedule::alternating(&plan.pairs, reps);
    for skip in &plan.skipped {
        eprintln!(
            "bench: skip {}/{}: {}",
            skip.scenario, skip.competitor, skip.reason
        );
    }
    if args.list {
        for slot in &slots {
            println!(
                "{}/{} rep {}",
                plan.scenarios[slot.scenario].id,
                ALL[slot.competitor].id(),
                slot.rep
            );
        }
        return Ok(0);
    }
    anyhow::ensure!(
        !plan.scenarios.is_empty(),
        "--only {:?} selects no scenario/competitor pair (try --list)",
        args.only
    );

    let workdir = args.out.join("work");
    fs::create_dir_all(&workdir).with_context(|| format!("cannot create {}", workdir.display()))?;
    let kernel = workdir.join("sluice-guest.elf");
    fs::write(&kernel, sluice_guest_kit::GUEST_KIT_ELF)
        .context("cannot write the guest kit ELF")?;
    let image = args.image_path();
    let mut notes = Vec::new();
    let needs_image = slots
        .iter()
        .any(|s| matches!(plan.scenarios[s.scenario].workload, Workload::Blk(_)));
    if needs_image {
        notes.push(ensure_image(&image, args.image_mib())?);
    }
    notes.push(governor_note());
    for note in &notes {
        eprintln!("bench: {note}");
    }
    let env = Env {
        sluice: sluice.to_owned(),
        kernel,
        image: image.clone(),
        workdir: workdir.clone(),
        timeout: RUN_TIMEOUT,
        fio_runtime_s: if args.quick { 1 } else { 3 },
        anchors: plan.anchors.clone(),
    };

    let mut samples = Vec::new();
    for (seq, slot) in slots.iter().enumerate() {
        let scenario = &plan.scenarios[slot.scenario];
        let competitor = ALL[slot.competitor];
        let sample = run_one(scenario, competitor, &env, slot.rep, seq + 1);
        eprintln!(
            "bench: [{}/{} {:>4.0}s] {}/{} rep {}/{reps}: {}",
            seq + 1,
            slots.len(),
            started.elapsed().as_secs_f64(),
            scenario.id,
            competitor.id(),
            slot.rep,
            progress_text(&sample)
        );
        samples.push(sample);
    }
    let _ = fs::remove_dir_all(&workdir);

    let command = format!(
        "sluice {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let mut machine = machine_info(sluice);
    machine["anchors"] = plan.anchors.versions();
    write_outputs(
        args,
        &plan,
        samples,
        &notes,
        machine,
        &command,
        started,
        started_unix,
    )
}

fn run_one(scenario: &Scenario, competitor: Competitor, env: &Env, rep: u32, seq: usize) -> Sample {
    let start = Instant::now();
    let result = competitor.run(scenario, env);
    let wall_s = start.elapsed().as_secs_f64();
    let (ok, error, output) = match result {
        Ok(output) => (true, None, output),
        Err(error) => (false, Some(error), Default::default()),
    };
    Sample {
        scenario: scenario.id.clone(),
        competitor: competitor.id().into(),
        rep,
        seq,
        ok,
        error,
        wall_s,
        loadavg_1min: loadavg().and_then(|l| l.split_whitespace().next()?.parse().ok()),
        metrics: output.metrics,
        processes: output.processes,
        command: output.command,
    }
}

fn progress_text(sample: &Sample) -> String {
    if let Some(error) = &sample.error {
        return format!("FAILED: {}", error.lines().next().unwrap_or(""));
    }
    let m = &sample.metrics;
    let mut parts = Vec::new();
    let mut add = |key: &str, label: &str, digits: usize| {
        if let Some(v) = m.get(key) {
            parts.push(format!("{label} {v:.digits$}"));
        }
    };
    add(metric::RATE, "ops/s", 0);
    add(metric::HOST_CPU_US_PER_OP, "CPU µs/op", 0);
    add(metric::EXITS_PER_OP, "exits/op", 3);
    add(metric::KICKS_PER_OP, "kicks/op", 3);
    add(metric::READY_MS, "ready ms", 1);
    add(metric::FIRST_INSN_MS, "first insn ms", 2);
    add(metric::VMM_RSS_OVERHEAD_MIB, "RSS w/o guest RAM MiB", 2);
    add(metric::VMM_MAX_RSS_MIB, "max RSS MiB", 1);
    format!("{} ({:.1} s)", parts.join(", "), sample.wall_s)
}

#[allow(clippy::too_many_arguments, reason = "the parts of one run's output")]
fn write_outputs(
    args: &BenchArgs,
    plan: &Plan,
    samples: Vec<Sample>,
    notes: &[String],
    machine: Value,
    command: &str,
    started: Instant,
    started_unix: u64,
) -> anyhow::Result<u8> {
    let summary = report::summarize(&samples);
    let order: Vec<&str> = ALL.iter().map(|c| c.id()).collect();
    let ratios = report::ratios(&summary, &order);
    let failures: Vec<&Sample> = samples.iter().filter(|s| !s.ok).collect();
    let competitors: Vec<Value> = ALL
        .iter()
        .zip(&plan.availability)
        .map(|(c, availability)| {
            let unavailable = availability.clone().err();
            json!({"id": c.id(), "description": c.description(), "available": unavailable.is_none(),
                   "skip_reason": unavailable})
        })
        .collect();
    let scenarios: Vec<Value> = plan
        .scenarios
        .iter()
        .map(|s| {
            let mut value = serde_json::to_value(s).unwrap_or(Value::Null);
            value["guest_cmdline"] = s.guest_cmdline().into();
            value
        })
        .collect();
    let results = json!({
        "schema_version": report::SCHEMA_VERSION,
        "tool": "sluice bench",
        "command": command,
        "started_unix_s": started_unix,
        "duration_s": started.elapsed().as_secs_f64(),
        "settings": {"quick": args.quick, "reps": args.reps(), "only": args.only,
                     "image": args.image_path(), "image_mib": args.image_mib(),
                     "run_timeout_s": RUN_TIMEOUT.as_secs()},
        "machine": machine,
        "notes": notes,
        "scenarios": scenarios,
        "competitors": competitors,
        "skipped": plan.skipped,
        "samples": samples,
        "summary": summary,
        "ratios": ratios,
    });
    fs::create_dir_all(&args.out)?;
    let json_path = args.out.join("results.json");
    fs::write(&json_path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;

    let mut machine_lines = machine_lines(&results["machine"]);
    machine_lines.extend(notes.iter().cloned());
    let scenario_lines: Vec<(String, String)> = plan
        .scenarios
        .iter()
        .map(|s| (s.id.clone(), s.guest_cmdline()))
        .collect();
    let competitor_lines: Vec<(&str, &str)> = ALL
        .iter()
        .filter(|c| samples.iter().any(|s| s.competitor == c.id()))
        .map(|c| (c.id(), c.description()))
        .collect();
    let table = report::markdown(&report::MarkdownInput {
        command,
        machine_lines: &machine_lines,
        scenarios: &scenario_lines,
        competitors: &competitor_lines,
        summary: &summary,
        ratios: &ratios,
        skipped: &plan.skipped,
        failures: &failures,
    });
    fs::write(args.out.join("results.md"), &table)?;
    write_plots(&args.out, &plan.scenarios, &summary)?;
    eprintln!(
        "bench: {} runs ({} failed) in {:.0} s; wrote {}, results.md and plots in {}",
        samples.len(),
        failures.len(),
        started.elapsed().as_secs_f64(),
        json_path.display(),
        args.out.display()
    );
    Ok(if failures.is_empty() { 0 } else { 1 })
}

fn write_plots(
    out: &Path,
    scenarios: &[Scenario],
    summary: &[report::SummaryRow],
) -> anyhow::Result<()> {
    let legend: Vec<&str> = ALL.iter().map(|c| c.id()).collect();
    let groups = |metric: &str,
                  want: &dyn Fn(&Scenario) -> bool|
     -> Vec<(String, Vec<report::Bar>)> {
        scenarios
            .iter()
            .filter(|s| want(s))
            .map(|s| {
                let bars = ALL
                    .iter()
                    .enumerate()
                    .filter_map(|(index, c)| {
                        summary
                            .iter()
                            .find(|r| {
                                r.scenario == s.id && r.competitor == c.id() && r.metric == metric
                            })
                            .map(|r| (index, r.summary))
                    })
                    .collect::<Vec<_>>();
                (s.id.clone(), bars)
            })
            .filter(|(_, bars)| !bars.is_empty())
            .collect()
    };
    let charts = [
        (
            "throughput.svg",
            "Throughput",
            "ops/s",
            metric::RATE,
            true,
            false,
        ),
        (
            "cpu-per-op.svg",
            "Host CPU per op",
            "µs",
            metric::HOST_CPU_US_PER_OP,
            true,
            false,
        ),
        (
            "startup.svg",
            "Process start to guest kit RESULT",
            "ms",
            metric::READY_MS,
            false,
            true,
        ),
        (
            "rss.svg",
            "VMM max RSS",
            "MiB",
            metric::VMM_MAX_RSS_MIB,
            false,
            true,
        ),
    ];
    for (file, title, unit, metric, log, startup_only) in charts {
        let want = |s: &Scenario| (s.workload == Workload::Startup) == startup_only;
        let data = groups(metric, &want);
        if !data.is_empty() {
            let svg = out.join(file);
            fs::write(&svg, report::bar_chart(title, unit, &data, &legend, log))?;
            rasterize(&svg);
        }
    }
    Ok(())
}

/// Writes a PNG next to `svg` with librsvg's `rsvg-convert` (Debian: librsvg2-bin) when it is
/// installed; a Rust rasterizer would need a font and image stack, too heavy for this crate.
fn rasterize(svg: &Path) {
    let png = svg.with_extension("png");
    match std::process::Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png)
        .arg(svg)
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!(
            "bench: rsvg-convert failed for {} ({status})",
            svg.display()
        ),
        Err(_) => eprintln!(
            "bench: no PNG for {}: rsvg-convert missing (apt-get install librsvg2-bin)",
            svg.display()
        ),
    }
}

/// A raw image of `mib` MiB, every block written (no holes, so reads hit real blocks);
/// reused when it is already that size and fully allocated.
fn ensure_image(path: &Path, mib: u64) -> anyhow::Result<String> {
    let size = mib << 20;
    if let Ok(meta) = fs::metadata(path) {
        if meta.len() >= size && meta.blocks() * 512 >= meta.len() {
            return Ok(format!(
                "image {}: reused ({} MiB, fully allocated)",
                path.display(),
                meta.len() >> 20
            ));
        }
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(std::process::id());
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            // xorshift64: incompressible enough that no layer can shortcut the reads.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    let meta = file.metadata()?;
    anyhow::ensure!(
        meta.blocks() * 512 >= size,
        "image {} has holes after writing it ({} of {size} bytes allocated)",
        path.display(),
        meta.blocks() * 512
    );
    Ok(format!(
        "image {}: written ({mib} MiB of random data, fully allocated)",
        path.display()
    ))
}

fn governor_note() -> String {
    match fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") {
        Ok(governor) if governor.trim() == "performance" => "CPU governor: performance".into(),
        Ok(governor) => format!(
            "CPU governor: {} (not `performance`: frequency scaling may add noise)",
            governor.trim()
        ),
        Err(_) => "CPU governor: not exposed in /sys (cpufreq absent, typical of a VM)".into(),
    }
}

fn loadavg() -> Option<String> {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.trim().to_owned())
}

fn first_line(program: &str, arg: &str) -> Option<String> {
    let output = std::process::Command::new(program).arg(arg).output().ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .map(str::to_owned)
}

fn machine_info(sluice: &Path) -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")
            .and_then(|r| r.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
    });
    let kvm_modules: Vec<&str> = ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .collect();
    let built = fs::metadata(sluice)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model,
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "kvm_modules": kvm_modules,
        "qemu": first_line("qemu-system-x86_64", "--version"),
        "fio": first_line("fio", "--version"),
        "sluice_binary": sluice,
        "sluice_binary_mtime_unix_s": built,
        "loadavg_end": loadavg(),
    })
}

fn machine_lines(machine: &Value) -> Vec<String> {
    let text = |key: &str| machine[key].as_str().unwrap_or("?").to_owned();
    vec![
        format!(
            "Machine: {} CPUs ({}), Linux {}, KVM modules {}",
            machine["nproc"],
            text("cpu_model"),
            text("kernel"),
            machine["kvm_modules"]
        ),
        format!("QEMU: {}; fio: {}", text("qemu"), text("fio")),
        format!(
            "Cloud Hypervisor: {}; Firecracker: {} (anchors: {})",
            machine["anchors"][anchors::CLOUD_HYPERVISOR]
                .as_str()
                .unwrap_or("absent"),
            machine["anchors"][anchors::FIRECRACKER]
                .as_str()
                .unwrap_or("absent"),
            machine["anchors"]["dir"].as_str().unwrap_or("not found")
        ),
        format!("Load average at the end: {}", text("loadavg_end")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(only: Option<&str>) -> BenchArgs {
        BenchArgs {
            quick: true,
            only: only.map(str::to_owned),
            out: PathBuf::from("unused"),
            reps: None,
            image: None,
            list: false,
            anchors: None,
        }
    }

    #[test]
    fn quick_means_one_repetition_unless_reps_is_given() {
        let mut quick = args(None);
        assert_eq!(quick.reps(), 1);
        quick.reps = Some(4);
        assert_eq!(quick.reps(), 4);
        quick.quick = false;
        quick.reps = None;
        assert_eq!(quick.reps(), 3);
    }

    #[test]
    fn only_narrows_the_plan_to_matching_pairs() {
        let plan = plan(&args(Some("blk-seqread-128k-qd4-1q/fio")));

        assert_eq!(plan.scenarios.len(), 1);
        assert_eq!(plan.scenarios[0].id, "blk-seqread-128k-qd4-1q");
        let listed = plan.pairs[0].len() + plan.skipped.len();
        assert_eq!(listed, 1, "fio either runs or is skipped with a reason");
    }

    #[test]
    fn image_is_fully_allocated() {
        let path =
            std::env::temp_dir().join(format!("sluice-bench-image-{}.img", std::process::id()));

        let note = ensure_image(&path, 2).expect("write image");

        let meta = fs::metadata(&path).expect("metadata");
        assert_eq!(meta.len(), 2 << 20);
        assert!(meta.blocks() * 512 >= meta.len());
        assert!(note.contains("written"), "{note}");
        assert!(ensure_image(&path, 2).expect("reuse").contains("reused"));
        let _ = fs::remove_file(&path);
    }
}
