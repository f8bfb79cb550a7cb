//! Wiring of paravirtual devices: each `--disk`, `--net` and `--rng` becomes a device
//! model behind the virtio-pci transport, on the PCI root, with exitless doorbells (ioeventfd)
//! and interrupts (GSI route + irqfd per MSI-X vector; INTA through the root's INTx routing).
//! Each device does DMA through its own space, keyed by its requester id (identity until a
//! vIOMMU provides domains). A vhost-user disk's rings are run by the backend: without a
//! vIOMMU it sees guest physical addresses (an identity space); behind `--iommu vtd` it gets
//! its translated space like any device and the backend translates through a device IOTLB
//! sluice fills from it, with the VT-d's invalidations forwarded (`vhost_user_blk::iotlb`).
//! `--iommu virtio` has no hook to forward invalidations, so vhost-user disks are refused there.

use std::sync::{Arc, Mutex};

use sluice_devices::block::{Block, BlockConfig};
use sluice_devices::net::{Net, NetConfig, Tap};
use sluice_devices::rng::{fill_random, Rng};
use sluice_devices::vhost_user_blk::iotlb::IotlbInvalidator;
use sluice_devices::vhost_user_blk::{SharedMemoryRegion, VhostUserBlk, VhostUserBlkConfig};
use sluice_dma::DmaSpaces;
use sluice_iommu::Vtd;
use sluice_pci::{PciError, PciRoot, SharedPciDevice};
use sluice_virtio::{
    DeviceMetrics, VirtioDevice, VirtioPciDevice, VirtioPciError, VirtioPciOptions,
};

use crate::config::{DiskSpec, NetSpec, NotifyPolicy};
use crate::interrupts::VmInterrupts;
use crate::iommu::IommuKind;
use crate::machine::{device_err, VmConfig, VmError};
use crate::memory::GuestRam;
use crate::qos::ScheduledGuest;
use crate::replay::Recorder;

/// What every virtio-pci device of one VM shares.
struct Plumbing<'a> {
    interrupts: &'a VmInterrupts,
    dma: Arc<DmaSpaces>,
    /// For devices whose rings another process runs: it sees guest physical addresses.
    identity_dma: DmaSpaces,
    /// Recording (crate::replay): deterministic device mode.
    recorder: Option<&'a Arc<Recorder>>,
}

impl Plumbing<'_> {
    fn options(&self, name: String, policy: NotifyPolicy, packed: bool) -> VirtioPciOptions {
        let mut options = transport_options(self.interrupts, name, policy, packed);
        if self.recorder.is_some() {
            // Every doorbell an exit, queues run inline in it, MSIs sent from it (logged).
            options.ioevents = None;
            options.inline_queues = true;
        }
        options
    }
}

/// The transport options; `attach` puts in the MSI sink and router of the device's requester
/// id once its slot is known.
pub(crate) fn transport_options(
    interrupts: &VmInterrupts,
    name: String,
    policy: NotifyPolicy,
    packed: bool,
) -> VirtioPciOptions {
    let mut options = VirtioPciOptions::new(interrupts.msi_sink.clone());
    options.name = Some(name);
    options.policy = policy;
    options.packed_ring = packed;
    options.msi_router = Some(interrupts.msi_router.clone());
    options.ioevents = Some(interrupts.ioevents.clone());
    options
}

/// A virtio device put on the bus: its control-API id (`disk0`, `net0`, `rng0`), requester
/// id and counters.
#[derive(Clone)]
pub struct WiredDevice {
    pub id: String,
    pub bdf: u16,
    pub metrics: Arc<DeviceMetrics>,
    /// A disk behind the I/O scheduler: its place there.
    pub qos: Option<ScheduledGuest>,
}

/// Adds every configured virtio device to `root`; returns their ids, addresses and metrics. `vtd` is the
/// VM's VT-d, if it has one (a vhost-user disk's invalidations come from it).
pub fn attach_virtio_devices(
    root: &PciRoot,
    config: &VmConfig,
    ram: &GuestRam,
    dma: &Arc<DmaSpaces>,
    interrupts: &VmInterrupts,
    vtd: Option<&Vtd>,
    recorder: Option<&Arc<Recorder>>,
) -> Result<Vec<WiredDevice>, VmError> {
    let plumbing = Plumbing {
        interrupts,
        dma: dma.clone(),
        identity_dma: DmaSpaces::identity(ram.memory.clone()),
        recorder,
    };
    let mut metrics = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        if disk.requests.is_some() && config.iommu.is_some() {
            return Err(device_err(
                "virtio-blk",
                "requests= cannot be combined with --iommu: logging a chain resolves buffers the \
                 device itself might not touch, and each failed translation would be a fault \
                 record the guest sees",
            ));
        }
        let vhost_user = disk.vhost_user && disk.socket.is_some();
        if vhost_user && config.iommu == Some(IommuKind::Virtio) {
            return Err(device_err(
                "vhost-user-blk",
                "a vhost-user disk cannot sit behind --iommu virtio: the virtio-iommu has no \
                 hook to forward its unmaps to the backend's IOTLB (use --iommu vtd)",
            ));
        }
        let (block, invalidator, qos) = disk_device(disk, ram, vtd.is_some())?;
        let name = format!("virtio-blk{i}");
        // Without a vIOMMU the backend sees guest physical addresses: an identity space.
        let dma = if vhost_user && vtd.is_none() {
            &plumbing.identity_dma
        } else {
            &plumbing.dma
        };
        let (device_metrics, bdf) = attach(
            root,
            dma,
            interrupts,
            recorder,
            block,
            plumbing.options(name, disk.notify, disk.packed),
        )?;
        if let (Some(vtd), Some(invalidator)) = (vtd, invalidator) {
            vtd.watch(bdf, invalidator);
        }
        metrics.push(WiredDevice {
            id: format!("disk{i}"),
            bdf,
            metrics: device_metrics,
            qos,
        });
    }
    for (i, net) in config.nets.iter().enumerate() {
        let device = net_device(net)?;
        let name = format!("virtio-net{i}");
        let (device_metrics, bdf) = attach(
            root,
            &plumbing.dma,
            interrupts,
            recorder,
            Box::new(device),
            plumbing.options(name, net.notify, net.packed),
        )?;
        metrics.push(WiredDevice {
            id: format!("net{i}"),
            bdf,
            metrics: device_metrics,
            qos: None,
        });
    }
    if let Some(rng) = &config.rng {
        let options = plumbing.options("virtio-rng".into(), NotifyPolicy::Interrupt, rng.packed);
        let (device_metrics, bdf) = attach(
            root,
            &plumbing.dma,
            interrupts,
            recorder,
            Box::new(Rng::new()),
            options,
        )?;
        metrics.push(WiredDevice {
            id: "rng0".into(),
            bdf,
            metrics: device_metrics,
            qos: None,
        });
    }
    Ok(metrics)
}

pub(crate) fn net_device(net: &NetSpec) -> Result<Net, VmError> {
    let tap = Tap::open(Some(&net.tap), net.queues).map_err(|e| device_err("virtio-net", e))?;
    tap.set_up()
        .map_err(|e| device_err("virtio-net", format!("cannot bring {} up: {e}", net.tap)))?;
    let mac = match net.mac {
        Some(mac) => mac,
        None => random_local_mac().map_err(|e| device_err("virtio-net", e))?,
    };
    let config = NetConfig {
        standby: net.standby,
        // sluice's NICs may be restored or migrated: the guest re-announces its MAC then.
        announce: true,
        ..NetConfig::new(mac)
    };
    Ok(Net::new(tap, config))
}

/// A locally administered unicast MAC in QEMU's 52:54:00 range.
pub(crate) fn random_local_mac() -> std::io::Result<[u8; 6]> {
    let mut tail = [0u8; 3];
    fill_random(&mut tail)?;
    Ok([0x52, 0x54, 0x00, tail[0], tail[1], tail[2]])
}

/// A disk device; for a vhost-user disk behind the VT-d, the observer that forwards the
/// VT-d's invalidations to its backend; for a disk behind the I/O scheduler, its place there.
type DiskDevice = (
    Box<dyn VirtioDevice>,
    Option<Arc<IotlbInvalidator>>,
    Option<ScheduledGuest>,
);

/// The in-process virtio-blk model, or a vhost-user frontend with `vhost_user=on` (with a
/// device IOTLB when `iommu`).
fn disk_device(disk: &DiskSpec, ram: &GuestRam, iommu: bool) -> Result<DiskDevice, VmError> {
    let Some(socket) = disk.socket.as_ref().filter(|_| disk.vhost_user) else {
        let (block, scheduled) = in_process_disk(disk)?;
        return Ok((Box::new(block), None, scheduled));
    };
    let mut config = VhostUserBlkConfig::new(socket);
    config.queues = disk.queues;
    config.queue_size = disk.queue_size;
    config.iommu = iommu;
    if let Some(timeout) = disk.timeout {
        config.timeout = timeout;
    }
    let regions = SharedMemoryRegion::from_guest_memory(&ram.memory)
        .map_err(|e| device_err("vhost-user-blk", e))?;
    let device = VhostUserBlk::new(config, regions).map_err(|e| device_err("vhost-user-blk", e))?;
    let invalidator = device.iotlb_observer();
    Ok((Box::new(device), invalidator, None))
}

/// The in-process virtio-blk model on `disk`'s image, behind the process's scheduler if
/// `disk` has a weight or limits (boot-time and hot-plugged disks alike).
pub(crate) fn in_process_disk(disk: &DiskSpec) -> Result<(Block, Option<ScheduledGuest>), VmError> {
    let mut block = Block::new(block_config(disk)).map_err(|e| device_err("virtio-blk", e))?;
    if let Some(path) = &disk.requests {
        let log = sluice_devices::block::trace::RequestLog::create(path, &block.trace_header())
            .map_err(|e| {
                device_err(
                    "virtio-blk",
                    format!("cannot create the request log {}: {e}", path.display()),
                )
            })?;
        block.log_requests(log);
    }
    let Some(guest) = &disk.qos else {
        return Ok((block, None));
    };
    let qos = process_scheduler().map_err(|e| device_err("virtio-blk qos", e))?;
    let guest = qos.add_guest(guest.clone());
    block.join_scheduler(Arc::clone(&qos), guest);
    Ok((block, Some(ScheduledGuest { qos, guest })))
}

/// The scheduler every in-process disk with a weight or limits shares (one per process, so
/// the disks of one VM compete on it; started on first use).
fn process_scheduler() -> std::io::Result<Arc<sluice_qos::Qos>> {
    static SCHEDULER: std::sync::OnceLock<Arc<sluice_qos::Qos>> = std::sync::OnceLock::new();
    if let Some(qos) = SCHEDULER.get() {
        return Ok(Arc::clone(qos));
    }
    let qos = sluice_qos::Qos::new(sluice_qos::DeviceConfig::default());
    qos.start_ticker()?;
    Ok(Arc::clone(SCHEDULER.get_or_init(|| qos)))
}

pub(crate) fn block_config(disk: &DiskSpec) -> BlockConfig {
    let mut config = BlockConfig::new(&disk.path);
    config.read_only = disk.read_only;
    config.direct = disk.direct;
    config.queues = disk.queues;
    config.queue_size = disk.queue_size;
    config.logical_block_size = disk.block_size;
    if let Some(serial) = &disk.serial {
        config.serial = serial.clone();
    }
    config
}

/// Why a virtio device could not be put on the bus.
#[derive(Debug, thiserror::Error)]
enum AttachError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Transport(#[from] VirtioPciError),
}

/// Puts `device` behind virtio-pci at the next free slot, with the DMA space of that slot's
/// requester id and that requester's MSI sink and router (with `recorder`, no irqfd route:
/// each MSI is sent and logged from the vCPU during the exit); returns its metrics and
/// requester id.
pub(crate) fn attach(
    root: &PciRoot,
    dma: &DmaSpaces,
    interrupts: &VmInterrupts,
    recorder: Option<&Arc<Recorder>>,
    device: Box<dyn VirtioDevice>,
    mut options: VirtioPciOptions,
) -> Result<(Arc<DeviceMetrics>, u16), VmError> {
    let metrics = device.metrics();
    let name = options.name.clone().unwrap_or_default();
    let address = root
        .add_device_with(|address| {
            let space = dma.space(address.bdf());
            let (sink, router) = interrupts.msi_for(address.bdf());
            match recorder {
                Some(recorder) => {
                    options.msi_sink = recorder.msi_sink(sink);
                    options.msi_router = None;
                }
                None => {
                    options.msi_sink = sink;
                    options.msi_router = Some(router);
                }
            }
            let pci = VirtioPciDevice::new(device, space, options)?;
            Ok::<SharedPciDevice, AttachError>(Arc::new(Mutex::new(pci)))
        })
        .map_err(|e| device_err("virtio-pci", e))?;
    tracing::info!("{name} at PCI {address}");
    Ok((metrics, address.bdf()))
}
