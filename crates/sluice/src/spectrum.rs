//! The main job: `sluice run` with no kernel, command line or device shows the I/O spectrum.
//! The embedded guest kit runs the same short verify and random-read workloads on a
//! paravirtual virtio-blk disk and on the emulated NVMe controller (with shadow doorbells,
//! and with a doorbell write per command), each of the first two also behind sluice's VT-d
//! with the kit mapping only its DMA buffers (what translation costs), one VM per device
//! class on its own temporary image, and one table compares IOPS, latency and the userspace
//! exits each I/O cost.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sluice_bus::DeviceExits;
use sluice_devices::platform::CaptureBuffer;
use sluice_guest_kit::{ExitKind, GuestKitReport, WorkloadResult};
use sluice_vmm::config::{DiskSpec, NvmeSpec};
use sluice_vmm::iommu::IommuKind;
use sluice_vmm::machine::{self, SerialTarget, VmConfig};
use sluice_vmm::vcpu::VmOutcome;

/// Size of each temporary image; the workloads touch the first `SPAN_MB` MiB.
const IMAGE_BYTES: u64 = 64 << 20;
const SPAN_MB: u32 = 16;

/// A device class of the table: how sluice offers it, the guest kit workload that drives it,
/// and the substring of its exit-counter name on sluice's buses.
pub struct DeviceClass {
    label: &'static str,
    device: Device,
    workload: &'static str,
    exit_name: &'static str,
    /// Behind sluice's VT-d (`--iommu vtd`), the kit mapping only its DMA buffers
    /// (`iommu=vtd`): the row then shows what translation costs.
    behind_vtd: bool,
}

#[derive(Clone, Copy)]
enum Device {
    VirtioBlk,
    /// The emulated controller; `dbbuf: false` hides Doorbell Buffer Config, so every
    /// doorbell write traps (trap-and-emulate in full).
    Nvme {
        dbbuf: bool,
    },
}

pub const CLASSES: [DeviceClass; 5] = [
    DeviceClass {
        label: "virtio-blk (paravirtual)",
        device: Device::VirtioBlk,
        workload: "blk",
        exit_name: "virtio-blk",
        behind_vtd: false,
    },
    DeviceClass {
        label: "virtio-blk, vIOMMU",
        device: Device::VirtioBlk,
        workload: "blk",
        exit_name: "virtio-blk",
        behind_vtd: true,
    },
    DeviceClass {
        label: "NVMe, shadow doorbells",
        device: Device::Nvme { dbbuf: true },
        workload: "nvme",
        exit_name: "nvme",
        behind_vtd: false,
    },
    DeviceClass {
        label: "NVMe, shadow, vIOMMU",
        device: Device::Nvme { dbbuf: true },
        workload: "nvme",
        exit_name: "nvme",
        behind_vtd: true,
    },
    DeviceClass {
        label: "NVMe, MMIO doorbells",
        device: Device::Nvme { dbbuf: false },
        workload: "nvme",
        exit_name: "nvme",
        behind_vtd: false,
    },
];

impl DeviceClass {
    /// The guest kit command line: a verify pass, then random 4K reads.
    fn cmdline(&self) -> String {
        let w = self.workload;
        let iommu = if self.behind_vtd { " iommu=vtd" } else { "" };
        format!(
            "quiet{iommu} w={w}:op=verify:bs=4096:qd=16:span_mb={SPAN_MB}:seed=7 \
             w={w}:op=randread:bs=4096:qd=32:ops=20000:span_mb={SPAN_MB}"
        )
    }

    /// `config` with this class's one device on `image`.
    fn attach(&self, config: &mut VmConfig, image: &Path) -> anyhow::Result<()> {
        let path = image.display();
        if self.behind_vtd {
            config.iommu = Some(IommuKind::Vtd {
                interrupt_remapping: true,
            });
        }
        match self.device {
            Device::VirtioBlk => config
                .disks
                .push(DiskSpec::parse(&format!("path={path}")).map_err(anyhow::Error::msg)?),
            Device::Nvme { dbbuf } => {
                let dbbuf = if dbbuf { "on" } else { "off" };
                config.nvmes.push(
                    NvmeSpec::parse(&format!("path={path},dbbuf={dbbuf}"))
                        .map_err(anyhow::Error::msg)?,
                )
            }
        }
        Ok(())
    }
}

/// A private temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("sluice-spectrum-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// A fresh sparse image of `IMAGE_BYTES` in the directory.
    fn image(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        file.set_len(IMAGE_BYTES)
            .with_context(|| format!("cannot size {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one class's VM produced.
pub struct ClassRun<'a> {
    class: &'a DeviceClass,
    report: GuestKitReport,
    exits: Vec<DeviceExits>,
}

/// Runs every class in its own VM booting `kernel` (the guest kit) with `cpus` and `memory`,
/// prints each console and then the table; the status is the first failing run's, else 0.
pub fn run(kernel: &Path, cpus: u8, memory: u64) -> anyhow::Result<u8> {
    let scratch = ScratchDir::create()?;
    let mut runs = Vec::new();
    let mut status = 0;
    for (index, class) in CLASSES.iter().enumerate() {
        let console = CaptureBuffer::new();
        let mut config = VmConfig {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: class.cmdline(),
            cpus,
            memory,
            serial: SerialTarget::Buffer(console.clone()),
            test_device: false,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: None,
            e1000s: Vec::new(),
            nvmes: Vec::new(),
            numa: Default::default(),
            placement: Default::default(),
            tpm: None,
            vfio: Vec::new(),
            iommu: None,
        };
        class.attach(&mut config, &scratch.image(&format!("class{index}.img"))?)?;
        let report = machine::run(config)?;
        let exit = match report.outcome {
            VmOutcome::DebugExit(byte) => ExitKind::from_guest_byte(byte),
            VmOutcome::PowerOff => ExitKind::Pass,
            _ => ExitKind::Other(-1),
        };
        let kit = GuestKitReport::parse(&console.text(), exit);
        if status == 0 && !kit.passed() {
            status = crate::exit_status(&report.outcome).max(1);
        }
        print_console(class, &kit.console);
        runs.push(ClassRun {
            class,
            report: kit,
            exits: report.device_exits,
        });
    }
    print_out(&format!("\n{}", table(&runs)));
    Ok(status)
}

fn print_console(class: &DeviceClass, console: &str) {
    print_out(&format!("== {}\n{console}", class.label));
}

/// Writes to stdout, ignoring errors (a closed pipe must not fail the run).
fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    op: String,
    iops: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    verify: String,
}

fn row(result: &WorkloadResult) -> Row {
    let iops = match (result.ops, result.elapsed_ns) {
        (Some(ops), Some(ns)) if ns > 0 => Some(ops as f64 * 1e9 / ns as f64),
        _ => None,
    };
    let latency = result.lat_ns.as_ref().filter(|l| l.p50 > 0);
    Row {
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

/// Userspace exits of every device whose exit-counter name contains `name` (setup included:
/// a few dozen config and BAR accesses, small next to thousands of I/Os).
fn exits_of(exits: &[DeviceExits], name: &str) -> u64 {
    exits
        .iter()
        .filter(|d| d.name.contains(name))
        .map(|d| d.reads + d.writes)
        .sum()
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// The table: one line per workload of each class, with that class's exits per I/O.
fn table(runs: &[ClassRun<'_>]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<26} {:<9} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "device", "workload", "IOPS", "p50 µs", "p99 µs", "exits/IO", "verify"
    );
    for run in runs {
        let class = run.class;
        let results: Vec<&WorkloadResult> = run.report.results_for(class.workload).collect();
        if results.is_empty() {
            let _ = writeln!(out, "{:<26} (no result)", class.label);
            continue;
        }
        let ios: u64 = results.iter().filter_map(|r| r.ops).sum();
        let exits_per_io =
            (ios > 0).then(|| exits_of(&run.exits, class.exit_name) as f64 / ios as f64);
        for result in results {
            let row = row(result);
            let _ = writeln!(
                out,
                "{:<26} {:<9} {:>9} {:>9} {:>9} {:>10} {:>7}",
                class.label,
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

#[cfg(test)]
mod tests {
    use super::*;

    const BLK_CONSOLE: &str = concat!(
        "RESULT {\"workload\":\"blk\",\"pass\":true,\"op\":\"verify\",\"ops\":8192,",
        "\"elapsed_ns\":1000000000,\"verify\":\"ok\"}\n",
        "RESULT {\"workload\":\"blk\",\"pass\":true,\"op\":\"randread\",\"ops\":20000,",
        "\"elapsed_ns\":500000000,\"lat_ns\":{\"p50\":40000,\"p90\":50000,\"p99\":90000,\"max\":1}}\n",
        "GUEST-KIT PASS\n"
    );
    const NVME_CONSOLE: &str = concat!(
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

    fn class_run<'a>(
        class: &'a DeviceClass,
        console: &str,
        exits: Vec<DeviceExits>,
    ) -> ClassRun<'a> {
        ClassRun {
            class,
            report: GuestKitReport::parse(console, ExitKind::Pass),
            exits,
        }
    }

    #[test]
    fn table_has_a_line_per_workload_with_its_class_exits_per_io() {
        let runs = [
            class_run(
                &CLASSES[0],
                BLK_CONSOLE,
                vec![exits("00:01.0 virtio-blk0", 20, 8), exits("com1", 0, 500)],
            ),
            class_run(
                &CLASSES[4],
                NVME_CONSOLE,
                vec![exits("00:01.0 nvme0", 30, 30)],
            ),
        ];

        let text = table(&runs);

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
            lines[3].starts_with("NVMe, MMIO") && lines[3].contains("6.000"),
            "{text}"
        );
        assert!(lines[3].trim_end().ends_with("mismatch"), "{text}");
    }

    #[test]
    fn a_class_without_results_says_so() {
        let runs = [class_run(&CLASSES[2], "GUEST-KIT PASS\n", Vec::new())];

        let text = table(&runs);

        assert!(
            text.contains("NVMe, shadow doorbells     (no result)"),
            "{text}"
        );
    }

    #[test]
    fn each_class_runs_verify_and_randread_with_its_own_driver() {
        let blk = CLASSES[0].cmdline();
        let nvme = CLASSES[2].cmdline();
        let translated = CLASSES[3].cmdline();

        assert!(blk.contains("w=blk:op=verify") && blk.contains("w=blk:op=randread"));
        assert!(nvme.contains("w=nvme:op=randread:bs=4096:qd=32:ops=20000:span_mb=16"));
        assert!(!nvme.contains("iommu=vtd") && translated.contains("iommu=vtd"));
    }

    #[test]
    fn scratch_images_are_sparse_and_removed_with_their_directory() {
        let scratch = ScratchDir::create().unwrap();
        let dir = scratch.0.clone();

        let image = scratch.image("a.img").unwrap();

        assert_eq!(std::fs::metadata(image).unwrap().len(), IMAGE_BYTES);
        drop(scratch);
        assert!(!dir.exists());
    }
}
