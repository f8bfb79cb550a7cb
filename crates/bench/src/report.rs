//! The outputs: `results.json` (every sample plus summaries; see [`SCHEMA_VERSION`]),
//! `results.md` (tables) and SVG bar charts.
//!
//! The SVG is written by hand: a bar chart is a few dozen lines of markup, and a plotting crate
//! would add minutes to every CI build. PNG is left out: rasterizing needs a font and image
//! stack that no light crate in the workspace provides.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

use crate::metric;
use crate::stats::{ratio_of_medians, Summary};

/// Version of the `results.json` layout; bump it when a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub scenario: String,
    pub competitor: String,
    pub rep: u32,
    /// Position in the run order, from 1.
    pub seq: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub wall_s: f64,
    pub loadavg_1min: Option<f64>,
    pub metrics: BTreeMap<String, f64>,
    pub processes: Vec<crate::competitor::ProcessUsage>,
    pub command: Vec<String>,
}

/// A scenario/competitor pair that did not run, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    pub scenario: String,
    pub competitor: String,
    pub reason: String,
}

/// Median/min/max of one metric of one pair.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    pub scenario: String,
    pub competitor: String,
    pub metric: String,
    #[serde(flatten)]
    pub summary: Summary,
}

/// `numerator / denominator` of the medians of one metric in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct RatioRow {
    pub scenario: String,
    pub numerator: String,
    pub denominator: String,
    pub metric: String,
    pub value: f64,
}

/// Summaries of every metric of every (scenario, competitor) over its successful samples.
pub fn summarize(samples: &[Sample]) -> Vec<SummaryRow> {
    let mut values: BTreeMap<(&str, &str, &str), Vec<f64>> = BTreeMap::new();
    let mut order: Vec<(&str, &str, &str)> = Vec::new();
    for sample in samples.iter().filter(|s| s.ok) {
        for (name, value) in &sample.metrics {
            let key = (
                sample.scenario.as_str(),
                sample.competitor.as_str(),
                name.as_str(),
            );
            if !values.contains_key(&key) {
                order.push(key);
            }
            values.entry(key).or_default().push(*value);
        }
    }
    order
        .into_iter()
        .filter_map(|key| {
            let summary = Summary::of(values.get(&key)?)?;
            Some(SummaryRow {
                scenario: key.0.into(),
                competitor: key.1.into(),
                metric: key.2.into(),
                summary,
            })
        })
        .collect()
}

fn is_sluice(id: &str) -> bool {
    id.starts_with("sluice")
}

/// Which competitors are compared: every sluice variant against every other VMM or tool, and
/// the vhost-user variants against in-process sluice.
pub fn ratio_pairs<'a>(ids: &[&'a str]) -> Vec<(&'a str, &'a str)> {
    let mut pairs = Vec::new();
    for &a in ids.iter().filter(|id| is_sluice(id)) {
        for &b in ids {
            let other_tool = !is_sluice(b);
            let vhost_vs_in_process = a != "sluice" && b == "sluice";
            if other_tool || vhost_vs_in_process {
                pairs.push((a, b));
            }
        }
    }
    pairs
}

/// Ratios of medians for the metrics in [`metric::RATIOS`].
pub fn ratios(summary: &[SummaryRow], competitor_order: &[&str]) -> Vec<RatioRow> {
    let find = |scenario: &str, competitor: &str, metric: &str| {
        summary
            .iter()
            .find(|r| r.scenario == scenario && r.competitor == competitor && r.metric == metric)
            .map(|r| r.summary)
    };
    let mut scenarios: Vec<&str> = summary.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    let mut rows = Vec::new();
    for scenario in scenarios {
        let present: Vec<&str> = competitor_order
            .iter()
            .copied()
            .filter(|c| {
                summary
                    .iter()
                    .any(|r| r.scenario == scenario && r.competitor == *c)
            })
            .collect();
        for (a, b) in ratio_pairs(&present) {
            for &metric in metric::RATIOS {
                let (Some(x), Some(y)) = (find(scenario, a, metric), find(scenario, b, metric))
                else {
                    continue;
                };
                if let Some(value) = ratio_of_medians(&x, &y) {
                    rows.push(RatioRow {
                        scenario: scenario.into(),
                        numerator: a.into(),
                        denominator: b.into(),
                        metric: metric.into(),
                        value,
                    });
                }
            }
        }
    }
    rows
}

/// `median (min–max)` with `digits` decimals.
fn cell(summary: &Summary, digits: usize) -> String {
    if summary.n == 1 || summary.min == summary.max {
        format!("{:.digits$}", summary.median)
    } else {
        format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            summary.median, summary.min, summary.max
        )
    }
}

/// Everything the markdown needs besides the samples.
pub struct MarkdownInput<'a> {
    pub command: &'a str,
    pub machine_lines: &'a [String],
    pub scenarios: &'a [(String, String)],
    pub competitors: &'a [(&'a str, &'a str)],
    pub summary: &'a [SummaryRow],
    pub ratios: &'a [RatioRow],
    pub skipped: &'a [Skip],
    pub failures: &'a [&'a Sample],
}

/// `results.md`: one table per scenario (median (min–max) over the repetitions), the ratios,
/// what was skipped and what failed.
pub fn markdown(input: &MarkdownInput<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Command: `{}`\n", input.command);
    for line in input.machine_lines {
        let _ = writeln!(out, "- {line}");
    }
    out.push_str("\nCompetitors:\n");
    for (id, description) in input.competitors {
        let _ = writeln!(out, "- **{id}**: {description}");
    }
    for (scenario, cmdline) in input.scenarios {
        let rows: Vec<&SummaryRow> = input
            .summary
            .iter()
            .filter(|r| &r.scenario == scenario)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let columns = if scenario.starts_with("startup") {
            metric::STARTUP_TABLE
        } else {
            metric::TABLE
        };
        let columns: Vec<_> = columns
            .iter()
            .filter(|(name, _, _)| rows.iter().any(|r| r.metric == *name))
            .collect();
        let _ = writeln!(out, "\n### {scenario}\n\nGuest: `{cmdline}`\n");
        out.push_str("| competitor | runs |");
        for (_, header, _) in &columns {
            let _ = write!(out, " {header} |");
        }
        out.push_str("\n|---|---|");
        out.push_str(&"---|".repeat(columns.len()));
        out.push('\n');
        for (competitor, _) in input.competitors {
            let of = |name: &str| {
                rows.iter()
                    .find(|r| r.competitor == *competitor && r.metric == name)
            };
            let Some(first) = rows.iter().find(|r| r.competitor == *competitor) else {
                continue;
            };
            let _ = write!(out, "| {competitor} | {} |", first.summary.n);
            for (name, _, digits) in &columns {
                let text = of(name).map_or("-".to_owned(), |r| cell(&r.summary, *digits));
                let _ = write!(out, " {text} |");
            }
            out.push('\n');
        }
    }
    if !input.ratios.is_empty() {
        out.push_str(
            "\n### Ratios of medians\n\n| scenario | ratio | metric | value |\n|---|---|---|---|\n",
        );
        for r in input.ratios {
            let _ = writeln!(
                out,
                "| {} | {} / {} | {} | {:.3} |",
                r.scenario, r.numerator, r.denominator, r.metric, r.value
            );
        }
    }
    if !input.skipped.is_empty() {
        out.push_str("\n### Skipped\n\n");
        for s in input.skipped {
            let _ = writeln!(out, "- {}/{}: {}", s.scenario, s.competitor, s.reason);
        }
    }
    if !input.failures.is_empty() {
        out.push_str("\n### Failed runs\n\n");
        for s in input.failures {
            let error = s
                .error
                .as_deref()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("");
            let _ = writeln!(
                out,
                "- {}/{} rep {}: {error}",
                s.scenario, s.competitor, s.rep
            );
        }
    }
    out
}

/// Bar colours by competitor position: one per competitor of the matrix (nine), so no two
/// share a colour.
const COLOURS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One bar: competitor position, median, min, max.
pub type Bar = (usize, Summary);

/// A horizontal bar chart, one group of bars per scenario, with min–max whiskers. `log` puts
/// the value axis on a log10 scale (fio and the VMMs differ by orders of magnitude).
pub fn bar_chart(
    title: &str,
    unit: &str,
    groups: &[(String, Vec<Bar>)],
    legend: &[&str],
    log: bool,
) -> String {
    const LABEL_W: f64 = 230.0;
    const PLOT_W: f64 = 560.0;
    const BAR_H: f64 = 12.0;
    const GROUP_GAP: f64 = 10.0;
    const TOP: f64 = 40.0;
    let bars: usize = groups.iter().map(|(_, b)| b.len()).sum();
    let height = TOP
        + bars as f64 * BAR_H
        + groups.len() as f64 * GROUP_GAP
        + 40.0
        + 16.0 * legend.len() as f64;
    let max = groups
        .iter()
        .flat_map(|(_, b)| b.iter().map(|(_, s)| s.max))
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let min_positive = groups
        .iter()
        .flat_map(|(_, b)| b.iter().map(|(_, s)| s.min))
        .filter(|v| *v > 0.0)
        .fold(max, f64::min);
    let floor = if log {
        10f64.powf(min_positive.log10().floor())
    } else {
        0.0
    };
    let ceiling = if log {
        10f64.powf(max.log10().ceil())
    } else {
        max * 1.05
    };
    let x = |v: f64| {
        let fraction = if log {
            (v.max(floor).log10() - floor.log10()) / (ceiling.log10() - floor.log10()).max(1e-9)
        } else {
            v / ceiling
        };
        LABEL_W + fraction.clamp(0.0, 1.0) * PLOT_W
    };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
        LABEL_W + PLOT_W + 90.0
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let scale = if log { ", log scale" } else { "" };
    let _ = writeln!(
        svg,
        r#"<text x="10" y="20" font-size="14">{} ({}{scale}; bar = median, line = min–max)</text>"#,
        escape(title),
        escape(unit)
    );
    let mut y = TOP;
    for (label, group) in groups {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            LABEL_W - 6.0,
            y + BAR_H * group.len() as f64 / 2.0 + 4.0,
            escape(label)
        );
        for (competitor, s) in group {
            let colour = COLOURS[competitor % COLOURS.len()];
            let _ = writeln!(
                svg,
                r#"<rect x="{LABEL_W}" y="{y}" width="{:.1}" height="{:.1}" fill="{colour}"/>"#,
                x(s.median) - LABEL_W,
                BAR_H - 2.0
            );
            let mid = y + (BAR_H - 2.0) / 2.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{mid:.1}" y2="{mid:.1}" stroke="black"/>"#,
                x(s.min),
                x(s.max)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="9">{}</text>"#,
                x(s.max) + 4.0,
                y + BAR_H - 3.0,
                short(s.median)
            );
            y += BAR_H;
        }
        y += GROUP_GAP;
    }
    let _ = writeln!(
        svg,
        r#"<line x1="{LABEL_W}" x2="{}" y1="{y}" y2="{y}" stroke="grey"/>"#,
        LABEL_W + PLOT_W
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LABEL_W}" y="{}">{}</text><text x="{}" y="{}" text-anchor="end">{}</text>"#,
        y + 14.0,
        short(floor),
        LABEL_W + PLOT_W,
        y + 14.0,
        short(ceiling)
    );
    y += 30.0;
    for (index, name) in legend.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let _ = writeln!(
            svg,
            r#"<rect x="{LABEL_W}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            y - 9.0,
            LABEL_W + 14.0,
            y,
            escape(name)
        );
        y += 16.0;
    }
    svg.push_str("</svg>\n");
    svg
}

fn short(value: f64) -> String {
    if value >= 100.0 || value == 0.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Checks the parts of a `results.json` that readers rely on; `Err` names the first problem.
pub fn validate(json: &Value) -> Result<(), String> {
    if json["schema_version"].as_u64() != Some(u64::from(SCHEMA_VERSION)) {
        return Err(format!(
            "schema_version {} != {SCHEMA_VERSION}",
            json["schema_version"]
        ));
    }
    let ids = |key: &str| -> Result<Vec<String>, String> {
        json[key]
            .as_array()
            .ok_or(format!("{key} is not an array"))?
            .iter()
            .map(|e| {
                e["id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or(format!("{key} entry without id"))
            })
            .collect()
    };
    let scenarios = ids("scenarios")?;
    let competitors = ids("competitors")?;
    for sample in json["samples"]
        .as_array()
        .ok_or("samples is not an array")?
    {
        let name = |key: &str| sample[key].as_str().ok_or(format!("sample without {key}"));
        let (scenario, competitor) = (name("scenario")?, name("competitor")?);
        if !scenarios.iter().any(|s| s == scenario) {
            return Err(format!("sample of unknown scenario {}", sample["scenario"]));
        }
        if !competitors.iter().any(|c| c == competitor) {
            return Err(format!(
                "sample of unknown competitor {}",
                sample["competitor"]
            ));
        }
        if !sample["ok"].is_boolean() || !sample["rep"].is_u64() || !sample["wall_s"].is_number() {
            return Err(format!(
                "sample fields ok/rep/wall_s missing or mistyped: {sample}"
            ));
        }
        let metrics = sample["metrics"]
            .as_object()
            .ok_or("sample metrics is not an object")?;
        if let Some((key, value)) = metrics.iter().find(|(_, v)| !v.is_number()) {
            return Err(format!("metric {key} is not a number: {value}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(scenario: &str, competitor: &str, rate: f64, ok: bool) -> Sample {
        Sample {
            scenario: scenario.into(),
            competitor: competitor.into(),
            rep: 1,
            seq: 1,
            ok,
            error: None,
            wall_s: 1.0,
            loadavg_1min: None,
            metrics: BTreeMap::from([(metric::RATE.to_owned(), rate)]),
            processes: Vec::new(),
            command: Vec::new(),
        }
    }

    #[test]
    fn summaries_skip_failed_samples() {
        let samples = [
            sample("s", "sluice", 100.0, true),
            sample("s", "sluice", 300.0, true),
            sample("s", "sluice", 1e9, false),
            sample("s", "sluice", 200.0, true),
        ];

        let rows = summarize(&samples);

        assert_eq!(rows.len(), 1);
        assert_eq!(
            (
                rows[0].summary.median,
                rows[0].summary.max,
                rows[0].summary.n
            ),
            (200.0, 300.0, 3)
        );
    }

    #[test]
    fn ratios_compare_sluice_variants_with_others_and_in_process_sluice() {
        let pairs = ratio_pairs(&["sluice", "sluice-vhost-serve", "qemu", "fio"]);

        assert_eq!(
            pairs,
            [
                ("sluice", "qemu"),
                ("sluice", "fio"),
                ("sluice-vhost-serve", "sluice"),
                ("sluice-vhost-serve", "qemu"),
                ("sluice-vhost-serve", "fio"),
            ]
        );
    }

    #[test]
    fn ratio_rows_divide_medians() {
        let samples = [
            sample("s", "sluice", 300.0, true),
            sample("s", "qemu", 100.0, true),
            sample("s", "qemu", 200.0, true),
        ];
        let summary = summarize(&samples);

        let rows = ratios(&summary, &["sluice", "qemu"]);

        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].numerator.as_str(), rows[0].denominator.as_str()),
            ("sluice", "qemu")
        );
        assert_eq!(rows[0].value, 2.0);
    }

    #[test]
    fn validate_rejects_samples_of_unknown_competitors() {
        let good = serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "scenarios": [{"id": "s"}],
            "competitors": [{"id": "sluice"}],
            "samples": [{"scenario": "s", "competitor": "sluice", "ok": true, "rep": 1,
                         "wall_s": 1.0, "metrics": {"rate": 5.0}}],
        });
        let mut bad = good.clone();
        bad["samples"][0]["competitor"] = "vmware".into();

        assert_eq!(validate(&good), Ok(()));
        assert!(validate(&bad).is_err());
    }

    #[test]
    fn chart_has_one_bar_per_entry_and_escapes_labels() {
        let s = Summary::of(&[10.0, 20.0]).expect("values");
        let groups = vec![
            ("a<b".to_owned(), vec![(0, s), (1, s)]),
            ("c".to_owned(), vec![(0, s)]),
        ];

        let svg = bar_chart("t", "ops/s", &groups, &["x", "y"], true);

        assert_eq!(
            svg.matches("<line x1").count(),
            3 + 1,
            "3 whiskers and the axis"
        );
        assert!(svg.contains("a&lt;b"));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }
}
