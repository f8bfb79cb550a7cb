//! Wiring of the emulated NVMe controllers (`--nvme`): each becomes a `sluice_devices::nvme`
//! PCI function on the root, with MSI-X through GSI routes + irqfds per vector (the same KVM
//! plumbing as virtio-pci) and INTA through the root's INTx routing. SQ doorbells become KVM
//! ioeventfds once the driver configured shadow doorbells (the device's module doc says why
//! only then). DMA goes through the DMA space of the function's
//! requester id (translated by the vIOMMU with `--iommu`, identity otherwise).

use std::sync::{Arc, Mutex};

use sluice_devices::nvme::{Nvme, NvmeConfig, NvmeError, NvmeInterrupts};
use sluice_dma::DmaSpaces;
use sluice_pci::{PciRoot, SharedPciDevice};
use sluice_virtio::DeviceMetrics;

use crate::config::NvmeSpec;
use crate::interrupts::VmInterrupts;
use crate::machine::{device_err, VmConfig, VmError};

/// Adds every configured NVMe controller to `root`; returns their metrics handles.
pub fn attach_nvme_devices(
    root: &PciRoot,
    config: &VmConfig,
    dma: &DmaSpaces,
    vm_interrupts: &VmInterrupts,
) -> Result<Vec<Arc<DeviceMetrics>>, VmError> {
    if config.nvmes.is_empty() {
        return Ok(Vec::new());
    }
    let interrupts = NvmeInterrupts {
        msi_sink: vm_interrupts.msi_sink.clone(),
        msi_router: Some(vm_interrupts.msi_router.clone()),
        ioevents: Some(vm_interrupts.ioevents.clone()),
    };
    let mut metrics = Vec::new();
    for (i, spec) in config.nvmes.iter().enumerate() {
        if spec.requests.is_some() && config.iommu.is_some() {
            return Err(device_err(
                "nvme",
                "requests= cannot be combined with --iommu: logging a command walks its data \
                 pointer again and reads a read's data back, and each failed translation would \
                 be a fault record the guest sees",
            ));
        }
        let name = format!("nvme{i}");
        let nvme_config = nvme_config(spec, i);
        let mut device_metrics = None;
        let address = root
            .add_device_with(|address| {
                let space = dma.space(address.bdf());
                let (msi_sink, msi_router) = vm_interrupts.msi_for(address.bdf());
                let interrupts = NvmeInterrupts {
                    msi_sink,
                    msi_router: Some(msi_router),
                    ..interrupts.clone()
                };
                let nvme = Nvme::new(&nvme_config, space, interrupts, &name)?;
                if let Some(path) = &spec.requests {
                    nvme.log_requests(path).map_err(|source| AttachError::Log {
                        path: path.display().to_string(),
                        source,
                    })?;
                }
                device_metrics = Some(nvme.metrics());
                Ok::<SharedPciDevice, AttachError>(Arc::new(Mutex::new(nvme)))
            })
            .map_err(|e| device_err("nvme", e))?;
        tracing::info!("{name} at PCI {address} ({})", spec.path.display());
        metrics.extend(device_metrics);
    }
    Ok(metrics)
}

fn nvme_config(spec: &NvmeSpec, index: usize) -> NvmeConfig {
    let mut config = NvmeConfig::new(&spec.path);
    config.queues = spec.queues;
    config.direct = spec.direct;
    config.shadow_doorbells = spec.dbbuf;
    config.serial = spec
        .serial
        .clone()
        .unwrap_or_else(|| format!("sluice-nvme{index}"));
    config
}

/// Why a controller could not be put on the bus.
#[derive(Debug, thiserror::Error)]
enum AttachError {
    #[error(transparent)]
    Pci(#[from] sluice_pci::PciError),
    #[error(transparent)]
    Nvme(#[from] NvmeError),
    #[error("request log {path}: {source}")]
    Log {
        path: String,
        source: std::io::Error,
    },
}
