//! `sluice bench --quick`: on a tiny slice of the matrix and on the whole quick matrix (the CI
//! smoke test). Each must finish, exit 0 and write a results.json whose layout readers rely on
//! (checked here independently of the bench crate), plus the markdown table and plots.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use sluice_guest_kit::skip_without_kvm;

/// `--only` matches substrings: `startup/sluice` also selects `startup-first-insn`, listed too.
const SCENARIOS: &[&str] = &["blk-randread-4k-qd1-1q", "startup", "startup-first-insn"];

/// The schema check: required fields and their types; every sample names a scenario and a
/// competitor the file declares.
fn check_schema(json: &Value) -> Result<(), String> {
    let require = |value: &Value, key: &str, ok: fn(&Value) -> bool| -> Result<(), String> {
        if ok(&value[key]) {
            Ok(())
        } else {
            Err(format!("field {key} missing or mistyped in {value}"))
        }
    };
    require(json, "schema_version", Value::is_u64)?;
    for key in [
        "scenarios",
        "competitors",
        "samples",
        "summary",
        "ratios",
        "skipped",
    ] {
        require(json, key, Value::is_array)?;
    }
    require(json, "machine", Value::is_object)?;
    require(json, "settings", Value::is_object)?;
    let ids = |key: &str| -> Vec<String> {
        json[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect()
    };
    let (scenarios, competitors) = (ids("scenarios"), ids("competitors"));
    for competitor in json["competitors"].as_array().into_iter().flatten() {
        require(competitor, "id", Value::is_string)?;
        require(competitor, "available", Value::is_boolean)?;
    }
    for sample in json["samples"].as_array().into_iter().flatten() {
        require(sample, "scenario", Value::is_string)?;
        require(sample, "competitor", Value::is_string)?;
        require(sample, "rep", Value::is_u64)?;
        require(sample, "ok", Value::is_boolean)?;
        require(sample, "wall_s", Value::is_number)?;
        require(sample, "metrics", Value::is_object)?;
        require(sample, "processes", Value::is_array)?;
        let scenario = sample["scenario"].as_str().unwrap_or_default();
        let competitor = sample["competitor"].as_str().unwrap_or_default();
        if !scenarios.iter().any(|s| s == scenario) {
            return Err(format!("sample of unknown scenario {scenario}"));
        }
        if !competitors.iter().any(|c| c == competitor) {
            return Err(format!("sample of unknown competitor {competitor}"));
        }
        if let Some((key, value)) = sample["metrics"]
            .as_object()
            .into_iter()
            .flatten()
            .find(|(_, v)| !v.is_number())
        {
            return Err(format!("metric {key} = {value} is not a number"));
        }
    }
    for row in json["summary"].as_array().into_iter().flatten() {
        for key in ["median", "min", "max"] {
            require(row, key, Value::is_number)?;
        }
    }
    Ok(())
}

fn run_bench(out: &Path, extra: &[&str]) -> (std::process::Output, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["bench", "--quick"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .arg("--image")
        .arg(out.join("disk.img"))
        .output()
        .expect("run sluice bench");
    let json = std::fs::read_to_string(out.join("results.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null);
    (output, json)
}

/// The whole quick matrix, one repetition of every scenario with every competitor this machine
/// has (missing ones are listed as skipped, with the reason, not failed).
#[test]
fn quick_matrix_runs_every_available_pair() {
    if skip_without_kvm("quick_matrix_runs_every_available_pair") {
        return;
    }
    let out =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-matrix-{}", std::process::id()));

    let (output, json) = run_bench(&out, &[]);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(check_schema(&json), Ok(()));
    let samples = json["samples"].as_array().expect("samples");
    let failed: Vec<&Value> = samples.iter().filter(|s| s["ok"] != true).collect();
    assert!(failed.is_empty(), "failed runs: {failed:?}");
    // Every scenario ran on sluice, unless the run says why not (e.g. no tap without root).
    let skipped = json["skipped"].as_array().expect("skipped");
    for scenario in json["scenarios"].as_array().expect("scenarios") {
        let id = &scenario["id"];
        let ran = samples
            .iter()
            .any(|s| &s["scenario"] == id && s["competitor"] == "sluice");
        let skip = skipped
            .iter()
            .find(|s| &s["scenario"] == id && s["competitor"] == "sluice");
        assert!(
            ran || skip.is_some_and(|s| s["reason"].as_str().is_some_and(|r| !r.is_empty())),
            "no sluice sample and no skip reason for {id}: {stderr}"
        );
    }
    let rasterizer = Command::new("rsvg-convert")
        .arg("--version")
        .output()
        .is_ok();
    for plot in ["throughput", "startup", "rss"] {
        assert!(
            out.join(plot).with_extension("svg").exists(),
            "{plot}.svg missing"
        );
        if rasterizer {
            assert!(
                out.join(plot).with_extension("png").exists(),
                "{plot}.png missing"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn quick_bench_writes_valid_results() {
    if skip_without_kvm("quick_bench_writes_valid_results") {
        return;
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{}", std::process::id()));
    let only: Vec<String> = SCENARIOS.iter().map(|s| format!("{s}/sluice")).collect();

    let (output, json) = run_bench(&out, &["--only", &only.join(",")]);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(check_schema(&json), Ok(()));
    let samples = json["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), SCENARIOS.len(), "{stderr}");
    for scenario in SCENARIOS {
        let sample = samples
            .iter()
            .find(|s| s["scenario"] == *scenario)
            .expect("a sample per scenario");
        assert_eq!(sample["ok"], true, "{sample}");
        assert!(sample["metrics"]["vmm_max_rss_mib"].as_f64().unwrap_or(0.0) > 0.0);
    }
    let blk = samples
        .iter()
        .find(|s| s["scenario"] == SCENARIOS[0])
        .expect("blk");
    assert!(
        blk["metrics"]["rate"].as_f64().unwrap_or(0.0) > 0.0,
        "{blk}"
    );
    assert!(blk["metrics"]["kicks_per_op"].as_f64().is_some(), "{blk}");
    let probe = samples
        .iter()
        .find(|s| s["scenario"] == "startup-first-insn")
        .expect("probe");
    assert!(
        probe["metrics"]["first_insn_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{probe}"
    );
    assert_eq!(
        stderr.matches("bench: [").count(),
        SCENARIOS.len(),
        "a progress line per run"
    );
    let table = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    assert!(table.contains("### blk-randread-4k-qd1-1q"), "{table}");
    assert!(out.join("throughput.svg").exists());
    let _ = std::fs::remove_dir_all(&out);
}

/// One blk, one net and the startup scenario on each anchor VMM.
const ANCHOR_SCENARIOS: &[&str] = &["blk-randread-4k-qd32-1q", "net-tx-64b", "startup"];
const ANCHORS: &[&str] = &["cloud-hypervisor", "firecracker"];

/// Cloud Hypervisor and Firecracker, when the anchors directory has them (the bench's own
/// lookup: $SLUICE_ANCHORS, else ../shared/anchors from the repository or an ancestor).
#[test]
fn quick_bench_runs_cloud_hypervisor_and_firecracker_when_present() {
    if skip_without_kvm("quick_bench_runs_cloud_hypervisor_and_firecracker_when_present") {
        return;
    }
    let anchors = sluice_bench::anchors::Anchors::locate(None);
    if ANCHORS.iter().any(|name| anchors.binary(name).is_err()) {
        eprintln!("skipping: no anchor VMMs ({:?})", anchors.candidates);
        return;
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-anchors-{}", std::process::id()));
    let only: Vec<String> = ANCHOR_SCENARIOS
        .iter()
        .flat_map(|s| ANCHORS.iter().map(move |c| format!("{s}/{c}")))
        .collect();

    let (output, json) = run_bench(&out, &["--only", &only.join(",")]);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(check_schema(&json), Ok(()));
    let samples = json["samples"].as_array().expect("samples");
    let skipped = json["skipped"].as_array().expect("skipped");
    for scenario in ANCHOR_SCENARIOS {
        for competitor in ANCHORS {
            let sample = samples
                .iter()
                .find(|s| s["scenario"] == *scenario && s["competitor"] == *competitor);
            // Net needs a tap (root); without one the pair must say why it was skipped.
            let Some(sample) = sample else {
                let skip = skipped
                    .iter()
                    .find(|s| s["scenario"] == *scenario && s["competitor"] == *competitor);
                assert!(
                    scenario.starts_with("net") && skip.is_some(),
                    "{scenario}/{competitor} neither ran nor was skipped: {stderr}"
                );
                continue;
            };
            assert_eq!(sample["ok"], true, "{sample}");
            let metrics = &sample["metrics"];
            assert!(
                metrics["vmm_max_rss_mib"].as_f64().unwrap_or(0.0) > 0.0,
                "{sample}"
            );
            assert!(
                metrics["ready_ms"].as_f64().unwrap_or(0.0) > 0.0,
                "{sample}"
            );
            assert!(
                metrics.get("exit_ms").is_none(),
                "the bench stopped it: no exit time ({sample})"
            );
            if *scenario != "startup" {
                assert!(metrics["rate"].as_f64().unwrap_or(0.0) > 0.0, "{sample}");
                assert!(metrics["host_cpu_us_per_op"].is_number(), "{sample}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// Without the anchors the pairs are skipped with a reason that says how to point at them.
#[test]
fn missing_anchors_are_skipped_with_the_place_looked_in() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-no-anchors-{}", std::process::id()));

    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "bench",
            "--quick",
            "--list",
            "--only",
            "startup/firecracker",
        ])
        .args(["--anchors", "/nonexistent/anchors", "--out"])
        .arg(&out)
        .output()
        .expect("run sluice bench --list");

    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stderr}");
    let skip = stderr
        .lines()
        .find(|l| l.starts_with("bench: skip startup/firecracker:"))
        .unwrap_or_else(|| panic!("no skip line: {stderr}"));
    assert!(skip.contains("/nonexistent/anchors"), "{skip}");
    assert!(
        skip.contains("--anchors") && skip.contains("SLUICE_ANCHORS"),
        "{skip}"
    );
    assert!(!stdout.contains("firecracker"), "nothing planned: {stdout}");
}

#[test]
fn schema_check_rejects_a_sample_of_an_unknown_competitor() {
    let json = serde_json::json!({
        "schema_version": 1, "machine": {}, "settings": {}, "summary": [], "ratios": [],
        "skipped": [], "scenarios": [{"id": "startup"}],
        "competitors": [{"id": "sluice", "available": true}],
        "samples": [{"scenario": "startup", "competitor": "xen", "rep": 1, "ok": true,
                     "wall_s": 0.5, "metrics": {}, "processes": []}],
    });

    let verdict = check_schema(&json);

    assert!(verdict.is_err_and(|e| e.contains("xen")));
}
