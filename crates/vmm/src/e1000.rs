//! Wiring of `--e1000`: each spec becomes an emulated 82540EM ([`sluice_devices::e1000`]) on its
//! own tap, at the next free PCI slot, with INTA routed by the root (DSDT `_PRT`) and DMA through
//! the DMA space of its requester id.

use std::sync::{Arc, Mutex};

use sluice_devices::e1000::E1000;
use sluice_devices::net::{NetBackend, Tap};
use sluice_dma::DmaSpaces;
use sluice_pci::{PciError, PciRoot, SharedPciDevice};
use sluice_virtio::DeviceMetrics;

use crate::config::E1000Spec;
use crate::machine::{device_err, VmConfig, VmError};

/// Adds every `--e1000` NIC to `root`; returns their metrics handles.
pub fn attach_e1000_devices(
    root: &PciRoot,
    config: &VmConfig,
    dma: &DmaSpaces,
) -> Result<Vec<Arc<DeviceMetrics>>, VmError> {
    let mut metrics = Vec::new();
    for (i, spec) in config.e1000s.iter().enumerate() {
        metrics.push(attach(root, dma, spec, format!("e1000-{i}"))?);
    }
    Ok(metrics)
}

/// Why a NIC could not be put on the bus.
#[derive(Debug, thiserror::Error)]
enum AttachError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("cannot start the receive worker: {0}")]
    Worker(#[from] std::io::Error),
}

fn attach(
    root: &PciRoot,
    dma: &DmaSpaces,
    spec: &E1000Spec,
    name: String,
) -> Result<Arc<DeviceMetrics>, VmError> {
    let tap = Tap::open(Some(&spec.tap), 1).map_err(|e| device_err("e1000", e))?;
    tap.set_up()
        .map_err(|e| device_err("e1000", format!("cannot bring {} up: {e}", spec.tap)))?;
    let backend: Arc<dyn NetBackend> = Arc::new(tap);
    let mac = match spec.mac {
        Some(mac) => mac,
        None => crate::virtio::random_local_mac().map_err(|e| device_err("e1000", e))?,
    };
    let mut metrics = None;
    let address = root
        .add_device_with(|address| {
            let mut nic = E1000::new(&name, mac, backend.clone(), dma.space(address.bdf()))?;
            nic.start_receiving(backend.clone())?;
            metrics = Some(nic.metrics());
            Ok::<SharedPciDevice, AttachError>(Arc::new(Mutex::new(nic)))
        })
        .map_err(|e| device_err("e1000", e))?;
    tracing::info!("{name} ({}) at PCI {address}", spec.tap);
    metrics.ok_or_else(|| device_err("e1000", "the device was not built"))
}
