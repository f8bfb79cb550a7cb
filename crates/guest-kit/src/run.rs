//! Runs the guest kit under a VMM (QEMU or sluice) with a hard timeout and returns a
//! [`GuestKitReport`].
//!
//! Hand-written on `std::process` because the job is small: spawn, drain stdout/stderr on
//! threads, poll for exit until a deadline, kill on expiry. The console is the VMM's stdout
//! (`-serial stdio` for QEMU; sluice writes COM1 to stdout).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::host::find_qemu;
use crate::report::{ExitKind, GuestKitReport};
use crate::{Error, GUEST_KIT_ELF};

/// How often the runner checks whether the VMM has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// QEMU stderr text after which the VM is paused for good (QEMU stops the vCPUs and waits for a
/// monitor that this runner does not attach); the runner stops the VMM instead of waiting for
/// the hard timeout.
const VMM_FATAL_MARKERS: &[&str] = &["KVM internal error"];
/// Time allowed after a fatal marker for the register dump that follows it to be printed.
const FATAL_DUMP_GRACE: Duration = Duration::from_millis(200);
/// How long to wait for the console pipes to drain after the VMM is gone (a grandchild holding
/// the pipe must not hang the runner).
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

/// QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    Q35,
    Pc,
}

impl Machine {
    fn qemu_name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
        }
    }
}

/// QEMU firmware that runs before the PVH entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU's default; assigns PCI BARs. Its real-mode start takes about 4 s under kvm_pvm.
    SeaBios,
    /// qboot (ships with QEMU): about 0.4 s under kvm_pvm, same fw_cfg ACPI tables, but it
    /// leaves PCI BARs unassigned, so the guest kit must assign them itself.
    Qboot,
}

/// Which VMM runs the guest kit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vmm {
    Qemu {
        accel: Accel,
        machine: Machine,
    },
    /// `binary run --kernel K --cmdline C --cpus N --memory <M>M <extra_args...>`.
    Sluice {
        binary: PathBuf,
        extra_args: Vec<String>,
    },
}

/// A device attached to the guest (QEMU only for now; sluice devices go in `extra_args`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// virtio-blk-pci backed by a raw image file.
    VirtioBlk {
        image: PathBuf,
        queues: u16,
        read_only: bool,
    },
    /// virtio-blk-pci whose every read fails with EIO (QEMU blkdebug over a null disk of
    /// `size_bytes`): the guest must fail the workload cleanly.
    VirtioBlkReadErrors { size_bytes: u64 },
    /// virtio-blk-pci that completes each request only after `latency` (QEMU null-co disk): with
    /// a latency above the guest's `timeout_ms` it stands in for a device that never answers.
    /// Keep it a few seconds at most: QEMU drains in-flight requests on device reset and exit.
    VirtioBlkSlow { size_bytes: u64, latency: Duration },
    /// virtio-rng-pci fed by the host's /dev/urandom.
    VirtioRng,
    /// QEMU's NVMe controller (`nvme`) with one namespace on a raw image, offering up to
    /// `queues` I/O queue pairs (`max_ioqpairs`).
    Nvme { image: PathBuf, queues: u16 },
    /// QEMU's NVMe controller whose every read fails with EIO (blkdebug over a null disk of
    /// `size_bytes`): the guest must count the errors and fail the workload cleanly.
    NvmeReadErrors { size_bytes: u64 },
    /// virtio-net-pci whose frames travel as UDP datagrams on 127.0.0.1: QEMU sends each frame
    /// to `host_port` and receives frames sent to `vmm_port`.
    VirtioNet { host_port: u16, vmm_port: u16 },
    /// vhost-user-blk-pci served by the backend listening on `socket` (`sluice serve blk`,
    /// qemu-storage-daemon); with `reconnect`, QEMU redials a backend that went away. Guest
    /// RAM is then a shared memfd, so the backend can map it.
    VhostUserBlk {
        socket: PathBuf,
        queues: u16,
        reconnect: bool,
    },
    /// vhost-user-rng-pci served by the backend on `socket` (`sluice serve rng`).
    VhostUserRng { socket: PathBuf },
    /// virtio-net-pci on a vhost-user netdev served by the backend on `socket`
    /// (`sluice serve net`).
    VhostUserNet { socket: PathBuf },
    /// QEMU's e1000 (82540EM) with the same UDP transport as [`Device::VirtioNet`].
    E1000 { host_port: u16, vmm_port: u16 },
    /// QEMU's Intel VT-d (`intel-iommu`, q35 only) in caching mode, DMA remapping only; it
    /// must come before the devices it translates.
    IntelIommu,
    /// [`Device::IntelIommu`] with interrupt remapping (`intremap=on`); the machine then gets
    /// `kernel-irqchip=split`, which QEMU requires for it under KVM.
    IntelIommuIntremap,
    /// QEMU's TPM 2.0 CRB device (`tpm-crb`) on an external swtpm whose control socket is
    /// `socket` (`-tpmdev emulator`).
    TpmCrb { socket: PathBuf },
}

impl Device {
    fn is_vhost_user(&self) -> bool {
        matches!(
            self,
            Device::VhostUserBlk { .. } | Device::VhostUserRng { .. } | Device::VhostUserNet { .. }
        )
    }
}

/// One run of the guest kit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKitRun {
    pub vmm: Vmm,
    pub cmdline: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub devices: Vec<Device>,
    /// Hard limit on the whole run; the VMM is killed when it expires.
    pub timeout: Duration,
    /// Firmware under QEMU (ignored by sluice, which boots PVH directly).
    pub firmware: Firmware,
    /// QEMU's virtio devices also offer packed virtqueues (`packed=on`); the kit uses them
    /// with `vq=packed` on its command line. (sluice: `packed=on` goes in `extra_args`.)
    pub packed_virtqueues: bool,
    /// QEMU's human monitor on this unix socket (a test stops and continues the VM there).
    pub monitor: Option<PathBuf>,
}

impl GuestKitRun {
    /// A QEMU run with 64 MiB, one CPU, no devices and a 90 s hard timeout: the bound for a
    /// guest that hangs, far above a normal run (on kvm_pvm, QEMU's KVM variant boots through
    /// SeaBIOS in the instruction emulator: ~4 s alone, beyond 30 s with two vCPUs on a
    /// loaded 2-core host).
    pub fn qemu(accel: Accel, machine: Machine, cmdline: &str) -> GuestKitRun {
        GuestKitRun {
            vmm: Vmm::Qemu { accel, machine },
            cmdline: cmdline.to_owned(),
            memory_mib: 64,
            cpus: 1,
            devices: Vec::new(),
            timeout: Duration::from_secs(90),
            firmware: Firmware::SeaBios,
            packed_virtqueues: false,
            monitor: None,
        }
    }

    /// A sluice run (`binary run ...`) with 64 MiB, one CPU and a 90 s hard timeout.
    pub fn sluice(binary: &Path, cmdline: &str) -> GuestKitRun {
        GuestKitRun {
            vmm: Vmm::Sluice {
                binary: binary.to_path_buf(),
                extra_args: Vec::new(),
            },
            ..GuestKitRun::qemu(Accel::Kvm, Machine::Q35, cmdline)
        }
    }

    /// Adds a device.
    /// Has QEMU's virtio devices offer packed virtqueues (see `packed_virtqueues`).
    pub fn with_packed_virtqueues(mut self) -> GuestKitRun {
        self.packed_virtqueues = true;
        self
    }

    pub fn with_device(mut self, device: Device) -> GuestKitRun {
        self.devices.push(device);
        self
    }

    /// Sets the hard timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> GuestKitRun {
        self.timeout = timeout;
        self
    }

    /// Sets the QEMU firmware.
    pub fn with_firmware(mut self, firmware: Firmware) -> GuestKitRun {
        self.firmware = firmware;
        self
    }

    /// Runs the embedded guest kit.
    pub fn run(&self) -> Result<GuestKitReport, Error> {
        self.run_kernel(GUEST_KIT_ELF)
    }

    /// Runs another kernel image the same way (tests of the runner itself use this).
    pub fn run_kernel(&self, kernel: &[u8]) -> Result<GuestKitReport, Error> {
        let kernel_file = TempKernel::write(kernel)?;
        let command = self.command(kernel_file.path())?;
        run_with_timeout(command, self.timeout, |status| self.exit_kind(status))
    }

    /// The VMM command line for a kernel at `kernel`.
    pub fn command(&self, kernel: &Path) -> Result<Command, Error> {
        match &self.vmm {
            Vmm::Qemu { accel, machine } => {
                let mut command = Command::new(find_qemu()?);
                command.args(self.qemu_args(*accel, *machine, kernel));
                Ok(command)
            }
            Vmm::Sluice { binary, extra_args } => {
                if !self.devices.is_empty() {
                    return Err(Error::DevicesNeedQemu);
                }
                let mut command = Command::new(binary);
                command
                    .arg("run")
                    .arg("--kernel")
                    .arg(kernel)
                    .args(["--cmdline", &self.cmdline])
                    .args(["--cpus", &self.cpus.to_string()])
                    .args(["--memory", &format!("{}M", self.memory_mib)])
                    .args(extra_args);
                Ok(command)
            }
        }
    }

    /// Arguments for qemu-system-x86_64: no default devices, console on stdio, the contract's
    /// exit port, and no reboot (a triple fault ends the run instead of looping).
    pub fn qemu_args(&self, accel: Accel, machine: Machine, kernel: &Path) -> Vec<String> {
        // Under KVM: `host` minus arch-capabilities, because kvm_pvm refuses MSR 0x10a and
        // QEMU 7.2 aborts on that (as it does with `max`).
        let (accel, cpu) = match accel {
            Accel::Tcg => ("tcg", "max"),
            Accel::Kvm => ("kvm", "host,-arch-capabilities"),
        };
        let shared_memory = self.devices.iter().any(Device::is_vhost_user);
        let mut machine = if shared_memory {
            // vhost-user backends map guest RAM: it must be a shared memfd.
            format!("{},memory-backend=ram0", machine.qemu_name())
        } else {
            machine.qemu_name().into()
        };
        if self.devices.contains(&Device::IntelIommuIntremap) {
            machine.push_str(",kernel-irqchip=split");
        }
        let mut args: Vec<String> = vec![
            "-machine".into(),
            machine,
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-no-reboot".into(),
            "-device".into(),
            // The guest kit's exit port (guest/src/exit.rs; sluice's is DEBUG_EXIT_PORT in
            // crates/devices/src/platform/debug_exit.rs, at the same place).
            "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-append".into(),
            self.cmdline.clone(),
        ];
        if self.firmware == Firmware::Qboot {
            args.extend(["-bios".into(), "qboot.rom".into()]);
        }
        if shared_memory {
            args.extend([
                "-object".into(),
                format!(
                    "memory-backend-memfd,id=ram0,size={}M,share=on",
                    self.memory_mib
                ),
            ]);
        }
        if let Some(monitor) = &self.monitor {
            args.extend([
                "-monitor".into(),
                format!(
                    "unix:{},server=on,wait=off",
                    qemu_escape(&monitor.display().to_string())
                ),
            ]);
        }
        for (index, device) in self.devices.iter().enumerate() {
            let mut device_args = qemu_device_args(index, device);
            if self.packed_virtqueues {
                offer_packed_virtqueues(&mut device_args);
            }
            args.extend(device_args);
        }
        args
    }

    fn exit_kind(&self, status: ExitStatus) -> ExitKind {
        match (status.code(), &self.vmm) {
            (Some(code), Vmm::Qemu { .. }) => ExitKind::from_qemu_status(code),
            (Some(code), Vmm::Sluice { .. }) => ExitKind::from_sluice_status(code),
            (None, _) => ExitKind::Killed,
        }
    }
}

fn qemu_device_args(index: usize, device: &Device) -> Vec<String> {
    match device {
        Device::VirtioBlk {
            image,
            queues,
            read_only,
        } => {
            let read_only = if *read_only { ",readonly=on" } else { "" };
            vec![
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=blk{index},cache=writeback{read_only}",
                    qemu_escape(&image.display().to_string())
                ),
                "-device".into(),
                format!("virtio-blk-pci,drive=blk{index},num-queues={queues}"),
            ]
        }
        Device::VirtioBlkReadErrors { size_bytes } => {
            let blockdev = serde_json::json!({
                "driver": "raw",
                "node-name": format!("blk{index}"),
                "file": {
                    "driver": "blkdebug",
                    "inject-error": [{ "event": "read_aio", "errno": libc::EIO }],
                    "image": { "driver": "null-co", "size": size_bytes },
                },
            });
            vec![
                "-blockdev".into(),
                blockdev.to_string(),
                "-device".into(),
                format!("virtio-blk-pci,drive=blk{index}"),
            ]
        }
        Device::VirtioBlkSlow {
            size_bytes,
            latency,
        } => vec![
            "-blockdev".into(),
            format!(
                "driver=null-co,node-name=blk{index},size={size_bytes},latency-ns={}",
                latency.as_nanos()
            ),
            "-device".into(),
            format!("virtio-blk-pci,drive=blk{index}"),
        ],
        Device::IntelIommu => vec!["-device".into(), "intel-iommu,caching-mode=on".into()],
        Device::IntelIommuIntremap => vec![
            "-device".into(),
            "intel-iommu,caching-mode=on,intremap=on".into(),
        ],
        Device::TpmCrb { socket } => vec![
            "-chardev".into(),
            format!(
                "socket,id=tpmchr{index},path={}",
                qemu_escape(&socket.display().to_string())
            ),
            "-tpmdev".into(),
            format!("emulator,id=tpm{index},chardev=tpmchr{index}"),
            "-device".into(),
            format!("tpm-crb,tpmdev=tpm{index}"),
        ],
        Device::Nvme { image, queues } => vec![
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=nvme{index},cache=writeback",
                qemu_escape(&image.display().to_string())
            ),
            "-device".into(),
            format!("nvme,drive=nvme{index},serial=sluice-nvme{index},max_ioqpairs={queues}"),
        ],
        Device::NvmeReadErrors { size_bytes } => {
            let blockdev = serde_json::json!({
                "driver": "raw",
                "node-name": format!("nvme{index}"),
                "file": {
                    "driver": "blkdebug",
                    "inject-error": [{ "event": "read_aio", "errno": libc::EIO }],
                    "image": { "driver": "null-co", "size": size_bytes },
                },
            });
            vec![
                "-blockdev".into(),
                blockdev.to_string(),
                "-device".into(),
                format!("nvme,drive=nvme{index},serial=sluice-nvme{index}"),
            ]
        }
        Device::VirtioRng => vec![
            "-object".into(),
            format!("rng-random,id=rng{index},filename=/dev/urandom"),
            "-device".into(),
            format!("virtio-rng-pci,rng=rng{index}"),
        ],
        Device::VirtioNet {
            host_port,
            vmm_port,
        } => vec![
            "-netdev".into(),
            format!(
                "socket,id=net{index},udp=127.0.0.1:{host_port},localaddr=127.0.0.1:{vmm_port}"
            ),
            "-device".into(),
            // romfile= : no option ROM; the guest kit boots by -kernel and the ROM package may
            // not be installed.
            format!("virtio-net-pci,netdev=net{index},romfile="),
        ],
        Device::VhostUserBlk {
            socket,
            queues,
            reconnect,
        } => vec![
            "-chardev".into(),
            vhost_user_chardev(index, socket, *reconnect),
            "-device".into(),
            format!("vhost-user-blk-pci,chardev=vu{index},num-queues={queues}"),
        ],
        Device::VhostUserRng { socket } => vec![
            "-chardev".into(),
            vhost_user_chardev(index, socket, false),
            "-device".into(),
            format!("vhost-user-rng-pci,chardev=vu{index}"),
        ],
        Device::VhostUserNet { socket } => vec![
            "-chardev".into(),
            vhost_user_chardev(index, socket, false),
            "-netdev".into(),
            format!("vhost-user,id=net{index},chardev=vu{index}"),
            "-device".into(),
            format!("virtio-net-pci,netdev=net{index},romfile="),
        ],
        Device::E1000 {
            host_port,
            vmm_port,
        } => vec![
            "-netdev".into(),
            format!(
                "socket,id=net{index},udp=127.0.0.1:{host_port},localaddr=127.0.0.1:{vmm_port}"
            ),
            "-device".into(),
            format!("e1000,netdev=net{index},romfile="),
        ],
    }
}

/// Adds `packed=on` to every virtio `-device` in `args`, vhost-user ones included (NVMe and
/// the e1000 have no such property).
fn offer_packed_virtqueues(args: &mut [String]) {
    for index in 1..args.len() {
        let device = &args[index];
        if args[index - 1] == "-device"
            && (device.starts_with("virtio-") || device.starts_with("vhost-user-"))
        {
            args[index].push_str(",packed=on");
        }
    }
}

/// The `-chardev` value of vhost-user device `index` on `socket` (id `vu<index>`); with
/// `reconnect`, QEMU redials a backend that went away.
fn vhost_user_chardev(index: usize, socket: &Path, reconnect: bool) -> String {
    format!(
        "socket,id=vu{index},path={}{}",
        qemu_escape(&socket.display().to_string()),
        if reconnect { ",reconnect=1" } else { "" }
    )
}

/// QEMU option values escape a comma by doubling it.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The kernel image written to a unique temporary file, removed on drop.
struct TempKernel {
    path: PathBuf,
}

impl TempKernel {
    fn write(bytes: &[u8]) -> Result<TempKernel, Error> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "sluice-guest-kit-{}-{unique}.elf",
            std::process::id()
        ));
        fs::write(&path, bytes).map_err(|source| Error::WriteKernel {
            path: path.clone(),
            source,
        })?;
        Ok(TempKernel { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempKernel {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Kills the child if the runner unwinds or returns early, so no VMM outlives its run.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Bytes read from a pipe so far, and whether the pipe reached end of file.
#[derive(Default)]
struct Drained {
    bytes: Vec<u8>,
    finished: bool,
}

fn drain<R: Read + Send + 'static>(mut pipe: R) -> Arc<Mutex<Drained>> {
    let shared = Arc::new(Mutex::new(Drained::default()));
    let writer = Arc::clone(&shared);
    thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        loop {
            let read = pipe.read(&mut buffer);
            let Ok(mut drained) = writer.lock() else {
                return;
            };
            match read {
                Ok(0) | Err(_) => {
                    drained.finished = true;
                    return;
                }
                Ok(n) => drained
                    .bytes
                    .extend_from_slice(buffer.get(..n).unwrap_or_default()),
            }
        }
    });
    shared
}

/// Waits for both pipes to finish (bounded by [`DRAIN_GRACE`]) and returns their text.
fn collect(pipes: [&Arc<Mutex<Drained>>; 2]) -> [String; 2] {
    let deadline = Instant::now() + DRAIN_GRACE;
    while Instant::now() < deadline
        && !pipes
            .iter()
            .all(|p| p.lock().map(|d| d.finished).unwrap_or(true))
    {
        thread::sleep(POLL_INTERVAL);
    }
    pipes.map(|p| {
        p.lock()
            .map(|d| String::from_utf8_lossy(&d.bytes).into_owned())
            .unwrap_or_default()
    })
}

/// Why the wait for the VMM ended.
#[derive(PartialEq, Eq)]
enum Ending {
    Exited,
    TimedOut,
    VmmFailed,
}

fn has_fatal_marker(stderr: &Mutex<Drained>) -> bool {
    stderr.lock().is_ok_and(|drained| {
        let text = String::from_utf8_lossy(&drained.bytes);
        VMM_FATAL_MARKERS.iter().any(|marker| text.contains(marker))
    })
}

fn run_with_timeout(
    mut command: Command,
    timeout: Duration,
    exit_kind: impl Fn(ExitStatus) -> ExitKind,
) -> Result<GuestKitReport, Error> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = ChildGuard(
        command
            .spawn()
            .map_err(|source| Error::Spawn { program, source })?,
    );
    let stdout: Option<ChildStdout> = child.0.stdout.take();
    let stderr: Option<ChildStderr> = child.0.stderr.take();
    let console = stdout.map(drain).unwrap_or_default();
    let vmm_stderr = stderr.map(drain).unwrap_or_default();

    let deadline = Instant::now() + timeout;
    let (status, ending) = loop {
        if let Some(status) = child.0.try_wait().map_err(Error::Wait)? {
            break (status, Ending::Exited);
        }
        let fatal = has_fatal_marker(&vmm_stderr);
        if fatal || Instant::now() >= deadline {
            if fatal {
                thread::sleep(FATAL_DUMP_GRACE);
            }
            // The child may exit between the check and the kill; the wait below reaps either way.
            let _ = child.0.kill();
            let status = child.0.wait().map_err(Error::Wait)?;
            break (
                status,
                if fatal {
                    Ending::VmmFailed
                } else {
                    Ending::TimedOut
                },
            );
        }
        thread::sleep(POLL_INTERVAL);
    };

    let [console, vmm_stderr] = collect([&console, &vmm_stderr]);
    let host_timed_out = ending == Ending::TimedOut;
    let exit = match ending {
        Ending::Exited => exit_kind(status),
        Ending::TimedOut => ExitKind::Timeout,
        Ending::VmmFailed => ExitKind::VmmFailed,
    };
    let mut report = GuestKitReport::parse(&console, exit);
    report.host_timed_out = host_timed_out;
    report.vmm_stderr = vmm_stderr;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_args_put_console_on_stdio_and_exit_port_at_f4() {
        let run = GuestKitRun::qemu(Accel::Tcg, Machine::Q35, "w=info quiet");

        let args = run.qemu_args(Accel::Tcg, Machine::Q35, Path::new("/k.elf"));

        let joined = args.join(" ");
        assert!(joined.contains("-machine q35 -accel tcg"), "{joined}");
        assert!(joined.contains("-serial stdio"), "{joined}");
        assert!(
            joined.contains("isa-debug-exit,iobase=0xf4,iosize=0x04"),
            "{joined}"
        );
        assert!(
            joined.contains("-kernel /k.elf -append w=info quiet"),
            "{joined}"
        );
    }

    #[test]
    fn qemu_args_describe_each_device() {
        let run = GuestKitRun::qemu(Accel::Kvm, Machine::Pc, "")
            .with_device(Device::VirtioBlk {
                image: PathBuf::from("/tmp/a,b.img"),
                queues: 2,
                read_only: true,
            })
            .with_device(Device::VirtioNet {
                host_port: 4000,
                vmm_port: 4001,
            });

        let args = run.qemu_args(Accel::Kvm, Machine::Pc, Path::new("/k"));

        let joined = args.join(" ");
        assert!(joined.contains("-accel kvm"), "{joined}");
        assert!(
            joined.contains(
                "file=/tmp/a,,b.img,format=raw,if=none,id=blk0,cache=writeback,readonly=on"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("virtio-blk-pci,drive=blk0,num-queues=2"),
            "{joined}"
        );
        assert!(
            joined.contains("socket,id=net1,udp=127.0.0.1:4000,localaddr=127.0.0.1:4001"),
            "{joined}"
        );
    }

    #[test]
    fn intel_iommu_with_interrupt_remapping_splits_the_irqchip() {
        let plain = GuestKitRun::qemu(Accel::Kvm, Machine::Q35, "").with_device(Device::IntelIommu);
        let remapping =
            GuestKitRun::qemu(Accel::Kvm, Machine::Q35, "").with_device(Device::IntelIommuIntremap);

        let plain = plain
            .qemu_args(Accel::Kvm, Machine::Q35, Path::new("/k"))
            .join(" ");
        let remapping = remapping
            .qemu_args(Accel::Kvm, Machine::Q35, Path::new("/k"))
            .join(" ");

        assert!(plain.contains("-machine q35 -accel"), "{plain}");
        assert!(
            remapping.contains("-machine q35,kernel-irqchip=split -accel"),
            "{remapping}"
        );
        assert!(
            remapping.contains("-device intel-iommu,caching-mode=on,intremap=on"),
            "{remapping}"
        );
    }

    #[test]
    fn nvme_devices_get_a_drive_serial_and_queue_pairs_but_no_packed_property() {
        let run = GuestKitRun::qemu(Accel::Tcg, Machine::Q35, "")
            .with_packed_virtqueues()
            .with_device(Device::VirtioRng)
            .with_device(Device::Nvme {
                image: PathBuf::from("/tmp/n,1.img"),
                queues: 4,
            });

        let args = run.qemu_args(Accel::Tcg, Machine::Q35, Path::new("/k"));

        let joined = args.join(" ");
        assert!(
            joined
                .contains("-drive file=/tmp/n,,1.img,format=raw,if=none,id=nvme1,cache=writeback"),
            "{joined}"
        );
        assert!(
            args.iter()
                .any(|arg| arg == "nvme,drive=nvme1,serial=sluice-nvme1,max_ioqpairs=4"),
            "the nvme device has no packed property: {joined}"
        );
        assert!(
            joined.contains("virtio-rng-pci,rng=rng0,packed=on"),
            "{joined}"
        );
    }

    #[test]
    fn packed_virtqueues_are_offered_on_every_qemu_device() {
        let run = GuestKitRun::qemu(Accel::Tcg, Machine::Q35, "vq=packed")
            .with_packed_virtqueues()
            .with_device(Device::VirtioRng)
            .with_device(Device::VirtioNet {
                host_port: 4000,
                vmm_port: 4001,
            })
            .with_device(Device::VhostUserBlk {
                socket: PathBuf::from("/tmp/vu.sock"),
                queues: 1,
                reconnect: false,
            });

        let args = run.qemu_args(Accel::Tcg, Machine::Q35, Path::new("/k"));

        let devices: Vec<&str> = args
            .windows(2)
            .filter(|pair| pair[0] == "-device" && !pair[1].starts_with("isa-debug-exit"))
            .map(|pair| pair[1].as_str())
            .collect();
        assert_eq!(devices.len(), 3, "{args:?}");
        assert!(
            devices.iter().all(|device| device.ends_with(",packed=on")),
            "{args:?}"
        );
        let plain = GuestKitRun::qemu(Accel::Tcg, Machine::Q35, "").with_device(Device::VirtioRng);
        let plain_args = plain.qemu_args(Accel::Tcg, Machine::Q35, Path::new("/k"));
        assert!(
            !plain_args.iter().any(|arg| arg.contains("packed")),
            "{plain_args:?}"
        );
    }

    #[test]
    fn sluice_command_uses_megabyte_memory_flag_and_passes_extra_args() {
        let run = GuestKitRun {
            vmm: Vmm::Sluice {
                binary: PathBuf::from("/bin/sluice"),
                extra_args: vec!["--disk".into(), "path=x".into()],
            },
            cmdline: "w=info".into(),
            memory_mib: 256,
            cpus: 2,
            devices: Vec::new(),
            timeout: Duration::from_secs(1),
            firmware: Firmware::SeaBios,
            packed_virtqueues: false,
            monitor: None,
        };

        let command = run.command(Path::new("/k")).expect("sluice command");

        let args: Vec<_> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "run",
                "--kernel",
                "/k",
                "--cmdline",
                "w=info",
                "--cpus",
                "2",
                "--memory",
                "256M",
                "--disk",
                "path=x"
            ]
        );
    }

    #[test]
    fn sluice_rejects_runner_devices() {
        let run = GuestKitRun {
            vmm: Vmm::Sluice {
                binary: PathBuf::from("/bin/sluice"),
                extra_args: Vec::new(),
            },
            cmdline: String::new(),
            memory_mib: 64,
            cpus: 1,
            devices: vec![Device::VirtioRng],
            timeout: Duration::from_secs(1),
            firmware: Firmware::SeaBios,
            packed_virtqueues: false,
            monitor: None,
        };

        let result = run.command(Path::new("/k"));

        assert!(matches!(result, Err(Error::DevicesNeedQemu)));
    }
}
