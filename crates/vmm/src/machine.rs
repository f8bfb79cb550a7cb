//! A whole VM: KVM setup, guest RAM, platform devices, PCI, ACPI, kernel loading and vCPU
//! threads. `run` builds it from a [`VmConfig`], runs it until the guest stops and reports how
//! it ended with exit counts.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use sluice_bus::{Bus, DeviceExits};
use sluice_devices::platform::{CaptureBuffer, SerialOutput};
use sluice_virtio::DeviceMetrics;

use crate::handle::VmHandle;
use crate::memory::{GuestRam, MemoryError};
use crate::rss::RssKib;
use crate::vcpu::setup::{self, HostKvm, SetupError};
use crate::vcpu::{ExitDispatch, ExitStats, VcpuThread, VmOutcome};

/// Where the COM1 console goes.
#[derive(Clone)]
pub enum SerialTarget {
    Stdout,
    File(PathBuf),
    /// In-memory capture (tests, the benchmark harness).
    Buffer(CaptureBuffer),
    Off,
}

impl std::fmt::Debug for SerialTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialTarget::Stdout => write!(f, "stdout"),
            SerialTarget::File(p) => write!(f, "file={}", p.display()),
            SerialTarget::Buffer(_) => write!(f, "buffer"),
            SerialTarget::Off => write!(f, "off"),
        }
    }
}

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub serial: SerialTarget,
    /// Adds the PCI test device (MSI-X doorbell) used by sluice's own tests.
    pub test_device: bool,
    /// virtio-blk disks.
    pub disks: Vec<crate::config::DiskSpec>,
    /// virtio-net devices on taps.
    pub nets: Vec<crate::config::NetSpec>,
    /// A virtio-rng device.
    pub rng: Option<crate::config::RngSpec>,
    /// NUMA placement of guest RAM and sluice's threads (`--numa`).
    pub numa: crate::numa::NumaPolicy,
    /// Host CPUs of each vCPU and of the device workers, and `--isolate` (`--cpus N,...`).
    pub placement: crate::cpu_placement::CpuPlacement,
    /// Emulated e1000 NICs on taps.
    pub e1000s: Vec<crate::config::E1000Spec>,
    /// A virtual IOMMU in front of every device (`--iommu`).
    pub iommu: Option<crate::iommu::IommuKind>,
    /// Emulated NVMe controllers.
    pub nvmes: Vec<crate::config::NvmeSpec>,
    /// Host PCI functions assigned with VFIO (`--device vfio=`).
    pub vfio: Vec<crate::config::VfioSpec>,
    /// A TPM 2.0 CRB device backed by swtpm (`--tpm`).
    pub tpm: Option<crate::config::TpmSpec>,
}

/// How a run ended, with what it cost.
#[derive(Debug)]
pub struct VmReport {
    pub outcome: VmOutcome,
    pub exits_total: u64,
    pub exits_pio: u64,
    pub exits_mmio: u64,
    /// Exit counts per device on the PIO and MMIO buses.
    pub device_exits: Vec<DeviceExits>,
    /// Time from `run` being called to the vCPUs starting.
    pub setup_time: std::time::Duration,
    /// Per-device, per-queue virtio counters.
    pub device_metrics: Vec<Arc<DeviceMetrics>>,
    /// Wall-clock time of the first userspace exit (ns since the Unix epoch), if any.
    pub first_exit_unix_ns: Option<u64>,
    /// The VMM's resident memory when the VM stopped (guest RAM is `shmem`).
    pub rss: RssKib,
    /// Assigned devices: their DMA mode, the guest RAM mapped for their DMA, quarantine.
    pub vfio: Vec<crate::vfio::VfioReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot use /dev/kvm: {0} (is KVM available and are you allowed to open /dev/kvm?)")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM setup failed ({what}): {source}")]
    KvmSetup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    VcpuSetup(#[from] SetupError),
    #[error("--cpus must be between 1 and 254, got {0}")]
    Cpus(u8),
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up device {what}: {reason}")]
    Device { what: &'static str, reason: String },
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Numa(#[from] crate::numa::NumaError),
    #[error(transparent)]
    Placement(#[from] crate::cpu_placement::PlacementError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("incoming migration: {0}")]
    Migration(#[from] crate::migration::MigrationError),
}

fn kvm_step<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::KvmSetup { what, source })
}

impl From<sluice_pci::PciError> for VmError {
    fn from(e: sluice_pci::PciError) -> Self {
        device_err("pci", e)
    }
}

pub(crate) fn device_err(what: &'static str, reason: impl ToString) -> VmError {
    VmError::Device {
        what,
        reason: reason.to_string(),
    }
}

/// Builds the VM described by `config`, runs it to the end and reports.
pub fn run(config: VmConfig) -> Result<VmReport, VmError> {
    run_handle(&VmHandle::new(config))
}

/// [`run`] for a VM whose [`VmHandle`] the caller keeps, to end it from outside the guest
/// (SIGTERM), pause and resume it, or read its counters (the control API) meanwhile.
/// Resolves `--numa` (`auto` follows the first assigned device) and pins the calling thread,
/// and so every thread it starts later, to the node's CPUs; then claims the CPUs of `--cpus
/// ...,affinity=` (crate::cpu_placement). [`run_handle`] does it before the
/// VM's threads start; a caller that starts threads of its own first (signals, the API) calls
/// it before them — pinning twice is harmless.
pub fn place_threads(config: &VmConfig) -> Result<Option<crate::numa::Placement>, VmError> {
    let assigned: Vec<sluice_host::pci::Bdf> = config
        .vfio
        .iter()
        .filter_map(|spec| sluice_host::pci::Bdf::parse(spec.host.as_str()).ok())
        .collect();
    let placement = crate::numa::resolve(&sluice_host::HostRoot::real(), config.numa, &assigned)?;
    if let Some(placement) = &placement {
        placement.pin_threads()?;
    }
    config.placement.apply(
        &sluice_host::HostRoot::real(),
        config.cpus,
        std::path::Path::new(crate::cpu_placement::LOCK_DIR),
    )?;
    Ok(placement)
}

pub fn run_handle(handle: &VmHandle) -> Result<VmReport, VmError> {
    run_handle_with(handle, None).map(|(report, _)| report)
}

/// [`run_handle`], recording the run's device I/O into the log at `record` when given
/// (crate::replay: refused for what cannot be made deterministic).
pub fn run_handle_with(
    handle: &VmHandle,
    record: Option<&std::path::Path>,
) -> Result<(VmReport, Option<crate::replay::RecordSummary>), VmError> {
    // Owned: the handle keeps its own copy for the API's `vm.info`.
    let config = handle.config().clone();
    let control = handle.control().clone();
    let started = Instant::now();
    if config.cpus == 0 || config.cpus > 254 {
        return Err(VmError::Cpus(config.cpus));
    }
    if let Some(why) = record.and_then(|_| crate::replay::refusal(&config)) {
        return Err(device_err("record", why));
    }
    check_vfio_dma(&config)?;
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm = Arc::new(create_vm(&kvm)?);
    // Before any VM thread starts and before guest RAM is touched (crate::numa says why).
    let placement = place_threads(&config)?;
    let ram = GuestRam::new(config.memory)?;
    if let Some(placement) = &placement {
        placement.bind_memory(&ram)?;
    }
    ram.register(&vm)?;
    let recorder = match record {
        Some(path) => Some(crate::replay::Recorder::create(path, &config, &ram)?),
        None => None,
    };
    // A restored VM's RAM comes from the snapshot; its vCPUs and irqchip from its state.
    // A migrated-in VM's RAM and state come from the stream (crate::migration).
    let mut incoming = handle.take_incoming();
    let restored = match (handle.restore_source(), incoming.as_mut()) {
        (Some(dir), _) => Some(crate::snapshot::load(dir, &config, &ram)?),
        (None, Some(incoming)) => Some(incoming.receive(&ram)?),
        (None, None) => None,
    };

    let dispatch = ExitDispatch {
        pio: Arc::new(Bus::new()),
        mmio: Arc::new(Bus::new()),
        control,
        stats: Arc::new(ExitStats::default()),
        hook: recorder
            .clone()
            .map(|r| r as Arc<dyn crate::vcpu::ExitHook>),
    };
    let mut platform = crate::platform::attach_platform_devices(&vm, &dispatch, &config, &ram)?;
    platform.tpm = crate::tpm::attach_tpm(&dispatch, config.tpm.as_ref())?;
    let pci_root = crate::platform::attach_pci(&vm, &dispatch, &config)?;
    let mut iommu = crate::iommu::attach_iommu(&vm, &dispatch, config.iommu, &ram, config.memory)?;
    // One per VM: its MSI router owns the VM's whole GSI routing table.
    let mut interrupts = crate::interrupts::VmInterrupts::new(&vm);
    interrupts.remapper = iommu.interrupt_remapper();
    // The virtio-iommu (if any) first, so the endpoints' BDFs follow it.
    let mut device_metrics: Vec<_> = iommu
        .attach_virtio_iommu(&pci_root, &ram, &interrupts)?
        .into_iter()
        .collect();
    let wired = crate::virtio::attach_virtio_devices(
        &pci_root,
        &config,
        &ram,
        &iommu.dma,
        &interrupts,
        iommu.vtd(),
        recorder.as_ref(),
    )?;
    device_metrics.extend(wired.iter().map(|w| w.metrics.clone()));
    for device in &wired {
        if let Some(scheduled) = &device.qos {
            handle.qos_disks().add(device.id.clone(), scheduled.clone());
        }
    }
    device_metrics.extend(crate::e1000::attach_e1000_devices(
        &pci_root, &config, &iommu.dma,
    )?);
    device_metrics.extend(crate::nvme::attach_nvme_devices(
        &pci_root,
        &config,
        &iommu.dma,
        &interrupts,
    )?);
    let vfio_wiring = crate::vfio::VfioWiring::new(&vm, &ram, &interrupts, iommu.vtd());
    let vfio = crate::vfio::attach_vfio_devices(&vfio_wiring, &pci_root, &config.vfio)?;
    device_metrics.extend(iommu.metrics());
    iommu.finish(&pci_root);

    let boot_info = if restored.is_some() {
        None
    } else {
        Some(load_guest(&config, &ram, &iommu)?)
    };
    handle.attach_machine(crate::handle::MachineParts {
        vm: vm.clone(),
        ram: ram.clone(),
        pci: pci_root.clone(),
        platform: platform.clone(),
    });
    handle.devices_attached(&device_metrics);
    let hotplug = crate::hotplug::Hotplug::new(
        pci_root.clone(),
        crate::platform::hotplug_irq(&vm)?,
        crate::hotplug::Wiring {
            dma: iommu.dma.clone(),
            interrupts: interrupts.clone(),
            qos: handle.qos_disks().clone(),
            vfio: Some(vfio_wiring),
        },
        handle.metrics_list(),
        &wired,
        vfio,
    );
    crate::platform::attach_hotplug_port(&dispatch, &hotplug)?;
    handle.attach_hotplug(hotplug.clone());
    if let Some(state) = &restored {
        state.irqchip.restore(&vm)?;
        pci_root
            .restore_states(&state.devices)
            .map_err(|e| device_err("snapshot", e))?;
        if let Some(saved) = &state.platform {
            platform
                .restore(saved)
                .map_err(|e| device_err("snapshot", e))?;
        }
    }
    if let (Some(recorder), Some(boot)) = (&recorder, &boot_info) {
        recorder.begin(boot, &ram)?;
    }
    let vcpu_states = restored.as_ref().map(|state| state.vcpus.as_slice());
    let threads = start_vcpus(
        &kvm,
        &vm,
        &ram,
        &config,
        boot_info.as_ref(),
        vcpu_states,
        &dispatch,
    )?;
    handle.vcpus_started();
    if restored.is_some() {
        // Restored devices start now, so their interrupts (queues, virtio-net's announce)
        // reach restored LAPICs.
        pci_root.resume_after_save();
    }
    if let Some(incoming) = incoming {
        let resumed_unix_ns = crate::migration::unix_ns();
        tracing::info!("migration: vCPUs resumed at {resumed_unix_ns} ns (CLOCK_REALTIME)");
        if let Err(e) = incoming.acknowledge(resumed_unix_ns) {
            // The source resumes the VM when it hears nothing: only one copy may run.
            dispatch.control.finish(VmOutcome::Crash(format!(
                "migration: cannot acknowledge to the source, stopping here: {e}"
            )));
        }
    }
    let setup_time = started.elapsed();
    tracing::info!("VM set up in {setup_time:?}; running");
    let outcome = dispatch.control.wait();
    for thread in threads {
        thread.stop();
    }
    // The assigned functions the VM holds now (some may have been plugged or removed).
    let vfio = hotplug.vfio_handles();
    vfio.iter().for_each(crate::vfio::VfioHandle::stop);
    let summary = match &recorder {
        Some(recorder) => Some(recorder.finish(&outcome)?),
        None => None,
    };
    let mut report = report(outcome, &dispatch, setup_time, device_metrics);
    report.vfio = vfio.iter().map(crate::vfio::VfioHandle::report).collect();
    Ok((report, summary))
}

/// ACPI tables and the kernel (and initrd) into the fresh VM's RAM.
fn load_guest(
    config: &VmConfig,
    ram: &GuestRam,
    iommu: &crate::iommu::VmIommu,
) -> Result<crate::boot::BootInfo, VmError> {
    let tpm_tables = crate::tpm::acpi_tables(config.tpm.is_some());
    let rsdp = crate::acpi::create_acpi_tables_with(
        &ram.memory,
        &crate::acpi::AcpiConfig {
            num_cpus: config.cpus,
            ram_size: config.memory,
            ioapic_address: iommu.ioapic_address(),
        },
        &guest_acpi_tables(iommu, &tpm_tables),
    )?;
    let boot_info = crate::boot::load_kernel(
        &ram.memory,
        &crate::boot::BootParams {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: config.cmdline.clone(),
            ram_size: config.memory,
            rsdp,
        },
    )?;
    Ok(boot_info)
}

/// The tables beyond the fixed set: the IOMMU's, the TPM's.
fn guest_acpi_tables<'a>(
    iommu: &'a crate::iommu::VmIommu,
    tpm: &'a [acpi_tables::sdt::Sdt],
) -> Vec<&'a dyn acpi_tables::Aml> {
    let mut tables = iommu.acpi_tables();
    tables.extend(tpm.iter().map(|table| table as &dyn acpi_tables::Aml));
    tables
}

/// Behind the vIOMMU an assigned function's DMA mappings must follow the guest's tables
/// (`dma=on-demand`, implied there): `dma=all` would let it DMA to every guest physical address
/// whatever the guest's IOMMU says, as if its IOVAs were guest addresses. Without a vIOMMU
/// there are no tables to follow. Checked before anything is opened.
fn check_vfio_dma(config: &VmConfig) -> Result<(), VmError> {
    use crate::config::VfioDma;
    for spec in &config.vfio {
        match (config.iommu.is_some(), spec.dma) {
            (true, Some(VfioDma::All)) => {
                return Err(device_err(
                    "vfio",
                    format!(
                        "{}: dma=all behind --iommu would map all guest RAM at guest-physical \
                         addresses, bypassing the guest's IOMMU tables; use dma=on-demand (the \
                         default behind --iommu)",
                        spec.host
                    ),
                ))
            }
            (false, Some(VfioDma::OnDemand)) => {
                return Err(device_err(
                    "vfio",
                    format!(
                        "{}: dma=on-demand maps what the guest's virtual IOMMU maps: it needs \
                         --iommu vtd",
                        spec.host
                    ),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm_step("create VM", kvm.create_vm())?;
    // Addresses just below the BIOS area at 4 GiB, as every x86 VMM uses: outside our RAM and
    // outside the 32-bit PCI hole's windows.
    kvm_step("set TSS address", vm.set_tss_address(0xfffb_d000))?;
    kvm_step(
        "set identity map address",
        vm.set_identity_map_address(0xfffb_c000),
    )?;
    kvm_step("create in-kernel irqchip", vm.create_irq_chip())?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    kvm_step("create PIT", vm.create_pit2(pit))?;
    Ok(vm)
}

/// Creates and starts the vCPUs: vCPU 0 with `boot`'s entry state, or every vCPU with its
/// restored state.
fn start_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    ram: &GuestRam,
    config: &VmConfig,
    boot: Option<&crate::boot::BootInfo>,
    restored: Option<&[crate::vcpu::state::VcpuState]>,
    dispatch: &ExitDispatch,
) -> Result<Vec<VcpuThread>, VmError> {
    let host = HostKvm::detect();
    let base_cpuid = setup::base_cpuid(kvm, host)?;
    // Every vCPU exists before any runs: the boot CPU's INIT/SIPI to an AP that KVM has not
    // created yet would be lost.
    let mut vcpus = Vec::with_capacity(config.cpus as usize);
    for index in 0..config.cpus {
        let vcpu = kvm_step("create vCPU", vm.create_vcpu(u64::from(index)))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        let cpuid = setup::vcpu_cpuid(&base_cpuid, index, config.cpus, tsc_khz);
        setup::configure_vcpu(&vcpu, &cpuid)?;
        // Application processors wait for INIT/SIPI in the in-kernel LAPIC.
        match (restored, boot) {
            (Some(states), _) => {
                let state = states
                    .get(usize::from(index))
                    .ok_or(VmError::Cpus(config.cpus))?;
                state.restore(&vcpu).map_err(|e| device_err("vcpu", e))?;
            }
            (None, Some(boot)) if index == 0 => {
                crate::boot::setup_boot_vcpu(&vcpu, &ram.memory, boot)?
            }
            _ => {}
        }
        vcpus.push(vcpu);
    }
    let mut threads = Vec::with_capacity(vcpus.len());
    for (index, vcpu) in (0u8..).zip(vcpus) {
        let cpus = config.placement.vcpu_cpus(index);
        threads.push(
            VcpuThread::spawn_on(index, vcpu, dispatch.clone(), cpus).map_err(VmError::Thread)?,
        );
    }
    Ok(threads)
}

fn report(
    outcome: VmOutcome,
    dispatch: &ExitDispatch,
    setup_time: std::time::Duration,
    device_metrics: Vec<Arc<DeviceMetrics>>,
) -> VmReport {
    let mut device_exits = dispatch.pio.exit_counts();
    device_exits.extend(dispatch.mmio.exit_counts());
    device_exits.retain(|d| d.reads + d.writes > 0);
    VmReport {
        outcome,
        exits_total: dispatch.stats.total(),
        exits_pio: dispatch.stats.pio.load(Ordering::Relaxed),
        exits_mmio: dispatch.stats.mmio.load(Ordering::Relaxed),
        device_exits,
        setup_time,
        rss: RssKib::current(),
        device_metrics,
        vfio: Vec::new(),
        first_exit_unix_ns: Some(dispatch.stats.first_exit_unix_ns.load(Ordering::Relaxed))
            .filter(|&ns| ns != 0),
    }
}

/// Opens the serial output chosen on the command line.
pub(crate) fn serial_output(target: &SerialTarget) -> Result<SerialOutput, VmError> {
    Ok(match target {
        SerialTarget::Stdout => SerialOutput::stdout(),
        SerialTarget::File(path) => SerialOutput::new(Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        )),
        SerialTarget::Buffer(capture) => SerialOutput::capture_only(capture.clone()),
        SerialTarget::Off => SerialOutput::new(Box::new(std::io::sink())),
    })
}
