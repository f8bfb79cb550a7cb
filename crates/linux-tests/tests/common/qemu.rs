//! Boots the test guest under QEMU 7.2 TCG with a vhost-user-blk-pci disk and collects its
//! serial console.
//!
//! The guest's /init (scripts/guest-image.py) runs the base64 command from `sluice.run=`,
//! prints `SLUICE-RUN-START` before it and `SLUICE-RUN-EXIT=<status>` after it, and powers off;
//! `-no-reboot` turns the power-off into a QEMU exit. QEMU is killed after a hard timeout.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::GuestImage;

pub const RUN_START: &str = "SLUICE-RUN-START";
const EXIT_MARKER: &str = "SLUICE-RUN-EXIT=";
/// Guest RAM; shared memfd so the vhost-user backend can map it.
const MEMORY_MIB: u32 = 512;

/// How the guest is wired to its disk.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub socket: PathBuf,
    pub queues: u16,
    /// `reconnect=1` on the chardev: QEMU redials a backend that went away.
    pub reconnect: bool,
    /// The shell command the guest runs.
    pub command: String,
    pub timeout: Duration,
    /// Behind QEMU's emulated VT-d (q35, `intel-iommu` with a device IOTLB, the disk with
    /// `iommu_platform=on,ats=on`, the guest booted with `intel_iommu=on`): the backend sees
    /// IOVAs and gets its translations as vhost-user IOTLB messages.
    pub iommu: bool,
}

/// A running QEMU whose console is being collected.
pub struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
    deadline: Instant,
}

/// What a finished boot left behind.
#[derive(Debug)]
pub struct GuestRun {
    pub console: String,
    pub qemu_stderr: String,
    /// The guest command's status from the `SLUICE-RUN-EXIT=` marker, if it got that far.
    pub exit: Option<i32>,
    pub timed_out: bool,
}

impl GuestRun {
    /// The console and QEMU's stderr, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- console{} ---\n{}\n--- qemu stderr ---\n{}",
            if self.timed_out { " (timed out)" } else { "" },
            self.console,
            self.qemu_stderr
        )
    }
}

/// The status printed by the guest's /init, if the console has the marker.
pub fn parse_exit_marker(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|line| {
        let status = line.trim().strip_prefix(EXIT_MARKER)?;
        status.trim().parse().ok()
    })
}

/// The kernel command line that runs `command` in the guest once /dev/vda exists.
pub fn kernel_cmdline(command: &str) -> String {
    kernel_cmdline_waiting_for("/dev/vda", command)
}

/// The kernel command line that waits for the device node `device`, then runs `command`.
pub fn kernel_cmdline_waiting_for(device: &str, command: &str) -> String {
    format!(
        "console=ttyS0 quiet panic=-1 sluice.wait={device} sluice.run={}",
        base64_encode(command.as_bytes())
    )
}

/// The kernel command line that runs `command` in the guest without waiting for a disk.
pub fn kernel_cmdline_diskless(command: &str) -> String {
    format!(
        "console=ttyS0 quiet panic=-1 sluice.run={}",
        base64_encode(command.as_bytes())
    )
}

/// Standard base64 (RFC 4648, with padding): what busybox `base64 -d` reads.
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let group = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(group >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn qemu_args(image: &GuestImage, config: &GuestConfig) -> Vec<String> {
    let chardev = format!(
        "socket,id=c0,path={}{}",
        config.socket.display(),
        if config.reconnect { ",reconnect=1" } else { "" }
    );
    let mut disk = format!("vhost-user-blk-pci,chardev=c0,num-queues={}", config.queues);
    let mut devices = Vec::new();
    let mut cmdline = kernel_cmdline(&config.command);
    if config.iommu {
        // The IOMMU must come before the devices it translates for. Split irqchip is what
        // interrupt remapping needs under KVM; TCG accepts it as is.
        devices.extend(
            [
                "-machine",
                "q35,kernel-irqchip=split",
                "-device",
                "intel-iommu,intremap=on,caching-mode=on,device-iotlb=on",
            ]
            .map(String::from),
        );
        disk.push_str(",iommu_platform=on,ats=on,disable-legacy=on");
        cmdline.push_str(" intel_iommu=on");
    }
    devices.extend(["-chardev".to_string(), chardev, "-device".to_string(), disk]);
    machine_args(image, &cmdline, &devices)
}

/// QEMU's arguments for the test machine (TCG, 2 vCPUs, shared memfd RAM, serial on stdout)
/// with `devices` added.
fn machine_args(image: &GuestImage, cmdline: &str, devices: &[String]) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let machine = [
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        &format!("{MEMORY_MIB}M"),
        "-object",
        &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
        "-numa",
        "node,memdev=mem",
    ]
    .map(String::from);
    let boot = [
        "-kernel",
        &path(&image.kernel),
        "-initrd",
        &path(&image.initramfs),
        "-append",
        cmdline,
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .map(String::from);
    machine
        .into_iter()
        .chain(devices.iter().cloned())
        .chain(boot)
        .collect()
}

/// A boot with any devices: their QEMU arguments, and the command the guest runs.
#[derive(Clone, Debug)]
pub struct CustomBoot {
    /// `-chardev ... -device ...` arguments.
    pub devices: Vec<String>,
    pub command: String,
    pub timeout: Duration,
}

fn collect(mut source: impl Read + Send + 'static, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = source.read(&mut buffer) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buffer[..n]).replace('\r', "");
            sink.lock().expect("console lock").push_str(&text);
        }
    })
}

impl Guest {
    /// Starts QEMU; the backend must already be listening on `config.socket`.
    pub fn boot(image: &GuestImage, config: &GuestConfig) -> Guest {
        Self::spawn(qemu_args(image, config), config.timeout)
    }

    /// Starts QEMU with `boot.devices` (no disk); their backends must already be listening.
    pub fn boot_custom(image: &GuestImage, boot: &CustomBoot) -> Guest {
        let cmdline = kernel_cmdline_diskless(&boot.command);
        Self::spawn(machine_args(image, &cmdline, &boot.devices), boot.timeout)
    }

    fn spawn(args: Vec<String>, timeout: Duration) -> Guest {
        let mut child = Command::new("qemu-system-x86_64")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-system-x86_64");
        let console = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped stdout"), console.clone()),
            collect(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        Guest {
            child,
            console,
            readers,
            stderr,
            deadline: Instant::now() + timeout,
        }
    }

    pub fn console(&self) -> String {
        self.console.lock().expect("console lock").clone()
    }

    /// Waits until the console shows `marker`; false if QEMU exits or the deadline passes first.
    pub fn wait_for(&mut self, marker: &str) -> bool {
        while Instant::now() < self.deadline {
            if self.console().contains(marker) {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return self.console().contains(marker);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits for QEMU to exit (killing it at the deadline) and returns the console.
    pub fn finish(mut self) -> GuestRun {
        let mut timed_out = false;
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > self.deadline {
                timed_out = true;
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let console = self.console();
        GuestRun {
            exit: parse_exit_marker(&console),
            qemu_stderr: self.stderr.lock().expect("stderr lock").clone(),
            console,
            timed_out,
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
