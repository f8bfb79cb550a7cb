//! Wiring of paravirtual devices: each `--disk`, `--net` and `--rng` becomes a device
//! model behind the virtio-pci transport, on the PCI root, with exitless doorbells (ioeventfd)
//! and interrupts (GSI route + irqfd per MSI-X vector; INTA through the root's INTx routing).
//! Each device does DMA through its own space, keyed by its requester id (identity until a
//! vIOMMU provides domains).

use std::sync::{Arc, Mutex};

use sluice_devices::block::{Block, BlockConfig};
use sluice_devices::net::{Net, NetConfig, Tap};
use sluice_devices::rng::{fill_random, Rng};
use sluice_devices::vhost_user_blk::{SharedMemoryRegion, VhostUserBlk, VhostUserBlkConfig};
use sluice_dma::DmaSpaces;
use sluice_pci::{PciError, PciRoot, SharedPciDevice};
use sluice_virtio::{
    DeviceMetrics, VirtioDevice, VirtioPciDevice, VirtioPciError, VirtioPciOptions,
};

use crate::config::{DiskSpec, NetSpec, NotifyPolicy};
use crate::interrupts::{KvmIoEvents, VmInterrupts};
use crate::machine::{device_err, VmConfig, VmError};
use crate::memory::GuestRam;

/// What every virtio-pci device of one VM shares.
struct Plumbing<'a> {
    interrupts: &'a VmInterrupts,
    ioevents: Arc<KvmIoEvents>,
    dma: Arc<DmaSpaces>,
    /// For devices whose rings another process runs: it sees guest physical addresses.
    identity_dma: DmaSpaces,
}

impl Plumbing<'_> {
    /// The transport options; `attach` puts in the MSI sink and router of the device's
    /// requester id once its slot is known.
    fn options(&self, name: String, policy: NotifyPolicy, packed: bool) -> VirtioPciOptions {
        let mut options = VirtioPciOptions::new(self.interrupts.msi_sink.clone());
        options.name = Some(name);
        options.policy = policy;
        options.packed_ring = packed;
        options.msi_router = Some(self.interrupts.msi_router.clone());
        options.ioevents = Some(self.ioevents.clone());
        options
    }
}

/// Adds every configured virtio device to `root`; returns their metrics handles.
pub fn attach_virtio_devices(
    root: &PciRoot,
    config: &VmConfig,
    ram: &GuestRam,
    dma: &Arc<DmaSpaces>,
    interrupts: &VmInterrupts,
) -> Result<Vec<Arc<DeviceMetrics>>, VmError> {
    let plumbing = Plumbing {
        interrupts,
        ioevents: interrupts.ioevents.clone(),
        dma: dma.clone(),
        identity_dma: DmaSpaces::identity(ram.memory.clone()),
    };
    let mut metrics = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let block = disk_device(disk, ram)?;
        let name = format!("virtio-blk{i}");
        let dma = if disk.vhost_user && disk.socket.is_some() {
            &plumbing.identity_dma
        } else {
            &plumbing.dma
        };
        metrics.push(attach(
            root,
            dma,
            interrupts,
            block,
            plumbing.options(name, disk.notify, disk.packed),
        )?);
    }
    for (i, net) in config.nets.iter().enumerate() {
        let device = net_device(net)?;
        let name = format!("virtio-net{i}");
        metrics.push(attach(
            root,
            &plumbing.dma,
            interrupts,
            Box::new(device),
            plumbing.options(name, net.notify, net.packed),
        )?);
    }
    if let Some(rng) = &config.rng {
        let options = plumbing.options("virtio-rng".into(), NotifyPolicy::Interrupt, rng.packed);
        metrics.push(attach(
            root,
            &plumbing.dma,
            interrupts,
            Box::new(Rng::new()),
            options,
        )?);
    }
    Ok(metrics)
}

fn net_device(net: &NetSpec) -> Result<Net, VmError> {
    let tap = Tap::open(Some(&net.tap), net.queues).map_err(|e| device_err("virtio-net", e))?;
    tap.set_up()
        .map_err(|e| device_err("virtio-net", format!("cannot bring {} up: {e}", net.tap)))?;
    let mac = match net.mac {
        Some(mac) => mac,
        None => random_local_mac().map_err(|e| device_err("virtio-net", e))?,
    };
    Ok(Net::new(tap, NetConfig { mac, mtu: None }))
}

/// A locally administered unicast MAC in QEMU's 52:54:00 range.
pub(crate) fn random_local_mac() -> std::io::Result<[u8; 6]> {
    let mut tail = [0u8; 3];
    fill_random(&mut tail)?;
    Ok([0x52, 0x54, 0x00, tail[0], tail[1], tail[2]])
}

/// The in-process virtio-blk model, or a vhost-user frontend with `vhost_user=on`.
fn disk_device(disk: &DiskSpec, ram: &GuestRam) -> Result<Box<dyn VirtioDevice>, VmError> {
    let Some(socket) = disk.socket.as_ref().filter(|_| disk.vhost_user) else {
        let block = Block::new(block_config(disk)).map_err(|e| device_err("virtio-blk", e))?;
        return Ok(Box::new(block));
    };
    let mut config = VhostUserBlkConfig::new(socket);
    config.queues = disk.queues;
    config.queue_size = disk.queue_size;
    if let Some(timeout) = disk.timeout {
        config.timeout = timeout;
    }
    let regions = SharedMemoryRegion::from_guest_memory(&ram.memory)
        .map_err(|e| device_err("vhost-user-blk", e))?;
    let device = VhostUserBlk::new(config, regions).map_err(|e| device_err("vhost-user-blk", e))?;
    Ok(Box::new(device))
}

fn block_config(disk: &DiskSpec) -> BlockConfig {
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
/// requester id and that requester's MSI sink and router.
fn attach(
    root: &PciRoot,
    dma: &DmaSpaces,
    interrupts: &VmInterrupts,
    device: Box<dyn VirtioDevice>,
    mut options: VirtioPciOptions,
) -> Result<Arc<DeviceMetrics>, VmError> {
    let metrics = device.metrics();
    let name = options.name.clone().unwrap_or_default();
    let address = root
        .add_device_with(|address| {
            let space = dma.space(address.bdf());
            let (sink, router) = interrupts.msi_for(address.bdf());
            options.msi_sink = sink;
            options.msi_router = Some(router);
            let pci = VirtioPciDevice::new(device, space, options)?;
            Ok::<SharedPciDevice, AttachError>(Arc::new(Mutex::new(pci)))
        })
        .map_err(|e| device_err("virtio-pci", e))?;
    tracing::info!("{name} at PCI {address}");
    Ok(metrics)
}
