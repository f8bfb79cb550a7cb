//! The main job: `sluice run` with no kernel, command line or device shows the I/O spectrum.
//! It boots the embedded guest kit with a paravirtual virtio-blk disk and an emulated NVMe
//! controller, each on its own temporary image, runs the same short verify and random-read
//! workloads on both, and prints one table: IOPS, latency, and the userspace exits each I/O
//! cost (the price of trap-and-emulate against ioeventfd/irqfd).

use std::fmt::Write as _;
use std::fs::File;
use std::path::PathBuf;

use anyhow::Context;
use sluice_bus::DeviceExits;
use sluice_guest_kit::{GuestKitReport, WorkloadResult};

/// Size of each temporary image; the workloads touch the first `SPAN_MB` MiB.
const IMAGE_BYTES: u64 = 64 << 20;
const SPAN_MB: u32 = 16;

/// A device class the table compares: the guest kit workload that drives it and the prefix of
/// its exit-counter name on sluice's buses.
struct DeviceClass {
    label: &'static str,
    workload: &'static str,
    exit_name_prefix: &'static str,
}

const CLASSES: [DeviceClass; 2] = [
    DeviceClass {
        label: "virtio-blk (paravirtual)",
        workload: "blk",
        exit_name_prefix: "virtio-blk",
    },
    DeviceClass {
        label: "NVMe (emulated)",
        workload: "nvme",
        exit_name_prefix: "nvme",
    },
];

/// The temporary images of one spectrum run, removed on drop.
pub struct SpectrumImages {
    dir: PathBuf,
    pub virtio_blk: PathBuf,
    pub nvme: PathBuf,
    pub console: PathBuf,
}

impl SpectrumImages {
    /// Creates a private directory under the system's temporary directory with two sparse images.
    pub fn create() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("sluice-spectrum-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let images = Self {
            virtio_blk: dir.join("virtio-blk.img"),
            nvme: dir.join("nvme.img"),
            console: dir.join("console.txt"),
            dir,
        };
        for image in [&images.virtio_blk, &images.nvme] {
            let file = File::create(image)
                .with_context(|| format!("cannot create {}", image.display()))?;
            file.set_len(IMAGE_BYTES)
                .with_context(|| format!("cannot size {}", image.display()))?;
        }
        Ok(images)
    }
}

impl Drop for SpectrumImages {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The guest kit command line: on each device class, a verify pass then random 4K reads.
pub fn cmdline() -> String {
    let mut line = String::from("quiet w=info");
    for class in &CLASSES {
        let w = class.workload;
        let _ = write!(
            line,
            " w={w}:op=verify:bs=4096:qd=16:span_mb={SPAN_MB}:seed=7 \
             w={w}:op=randread:bs=4096:qd=32:ops=20000:span_mb={SPAN_MB}"
        );
    }
    line
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    device: &'static str,
    op: String,
    iops: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    verify: String,
}

fn row(class: &DeviceClass, result: &WorkloadResult) -> Row {
    let iops = match (result.ops, result.elapsed_ns) {
        (Some(ops), Some(ns)) if ns > 0 => Some(ops as f64 * 1e9 / ns as f64),
        _ => None,
    };
    let latency = result.lat_ns.as_ref().filter(|l| l.p50 > 0);
    Row {
        device: class.label,
        op: result.op.clone().unwrap_or_else(|| "?".into()),
        iops,
        p50_us: latency.map(|l| l.p50 as f64 / 1e3),
        p99_us: latency.map(|l| l.p99 as f64 / 1e3),
        verify: match (&result.verify, result.pass) {
            (Some(v), _) => v.clone(),
            (None, true) => "-".into(),
            (None, false) => "FAIL".into(),
        },
    }
}

/// Userspace exits of every device whose name starts with `prefix` (setup included: a few
/// dozen config and BAR accesses, small next to thousands of I/Os).
fn exits_of(exits: &[DeviceExits], prefix: &str) -> u64 {
    exits
        .iter()
        .filter(|d| d.name.starts_with(prefix))
        .map(|d| d.reads + d.writes)
        .sum()
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// The table: one line per workload on each device class, with that class's exits per I/O.
pub fn table(report: &GuestKitReport, exits: &[DeviceExits]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<26} {:<9} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "device", "workload", "IOPS", "p50 µs", "p99 µs", "exits/IO", "verify"
    );
    for class in &CLASSES {
        let results: Vec<&WorkloadResult> = report.results_for(class.workload).collect();
        if results.is_empty() {
            let _ = writeln!(out, "{:<26} (no result)", class.label);
            continue;
        }
        let ios: u64 = results.iter().filter_map(|r| r.ops).sum();
        let exits_per_io =
            (ios > 0).then(|| exits_of(exits, class.exit_name_prefix) as f64 / ios as f64);
        for result in results {
            let row = row(class, result);
            let _ = writeln!(
                out,
                "{:<26} {:<9} {:>9} {:>9} {:>9} {:>10} {:>7}",
                row.device,
                row.op,
                cell(row.iops, 0),
                cell(row.p50_us, 1),
                cell(row.p99_us, 1),
                cell(exits_per_io, 3),
                row.verify
            );
        }
    }
    out
}

/// Prints the console the guest kit wrote, then the table (write errors ignored: a closed
/// pipe must not fail the run).
pub fn print(report: &GuestKitReport, exits: &[DeviceExits]) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(report.console.as_bytes());
    let _ = writeln!(stdout, "\n{}", table(report, exits));
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_guest_kit::ExitKind;

    const CONSOLE: &str = concat!(
        "RESULT {\"workload\":\"blk\",\"pass\":true,\"op\":\"verify\",\"ops\":8192,",
        "\"elapsed_ns\":1000000000,\"verify\":\"ok\"}\n",
        "RESULT {\"workload\":\"blk\",\"pass\":true,\"op\":\"randread\",\"ops\":20000,",
        "\"elapsed_ns\":500000000,\"lat_ns\":{\"p50\":40000,\"p90\":50000,\"p99\":90000,\"max\":1}}\n",
        "RESULT {\"workload\":\"nvme\",\"pass\":false,\"op\":\"verify\",\"ops\":10,",
        "\"elapsed_ns\":1000,\"verify\":\"mismatch\"}\n",
        "GUEST-KIT FAIL workload failed\n"
    );

    fn exits(name: &str, reads: u64, writes: u64) -> DeviceExits {
        DeviceExits {
            name: name.into(),
            reads,
            writes,
        }
    }

    #[test]
    fn table_has_a_line_per_workload_with_its_class_exits_per_io() {
        let report = GuestKitReport::parse(CONSOLE, ExitKind::WorkloadFailed);
        let bus = [
            exits("virtio-blk", 20, 8),
            exits("nvme", 30, 30),
            exits("com1", 0, 500),
        ];

        let text = table(&report, &bus);

        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        // 28 exits over 28192 I/Os of virtio-blk; 60 over 10 of NVMe.
        assert!(
            lines[1].contains("verify") && lines[1].contains("0.001"),
            "{text}"
        );
        assert!(lines[1].trim_end().ends_with("ok"), "{text}");
        assert!(
            lines[2].contains("40000") && lines[2].contains("40.0"),
            "{text}"
        );
        assert!(lines[2].contains("90.0"), "{text}");
        assert!(
            lines[3].starts_with("NVMe") && lines[3].contains("6.000"),
            "{text}"
        );
        assert!(lines[3].trim_end().ends_with("mismatch"), "{text}");
    }

    #[test]
    fn a_class_without_results_says_so() {
        let report = GuestKitReport::parse("GUEST-KIT PASS\n", ExitKind::Pass);

        let text = table(&report, &[]);

        assert_eq!(text.matches("(no result)").count(), 2, "{text}");
    }

    #[test]
    fn cmdline_runs_verify_and_randread_on_both_classes() {
        let line = cmdline();

        for w in ["w=blk:op=verify", "w=blk:op=randread", "w=nvme:op=verify"] {
            assert!(line.contains(w), "{line}");
        }
        assert!(line.contains("w=nvme:op=randread:bs=4096:qd=32:ops=20000:span_mb=16"));
    }

    #[test]
    fn images_are_created_sparse_and_removed() {
        let images = SpectrumImages::create().unwrap();
        let dir = images.dir.clone();

        let size = std::fs::metadata(&images.nvme).unwrap().len();

        assert_eq!(size, IMAGE_BYTES);
        drop(images);
        assert!(!dir.exists());
    }
}
