//! Drives a [`VirtioPciDevice`] from a byte script, for fuzz targets and randomized tests.
//!
//! Script format: a sequence of operations, each
//! `[op, offset_lo, offset_hi, value bytes (access width)...]` where `op`:
//! * bits 0..=2 choose the target: 0 common cfg, 1 ISR, 2 device cfg, 3 notify, 4 MSI-X table,
//!   5 MSI-X PBA, 6 PCI config space, 7 anywhere in BAR0 (offset taken modulo the BAR size);
//! * bits 3..=4 the width: 1, 2, 4 or 8 bytes;
//! * bit 5: write (value bytes follow) or read;
//! * bit 6: the offset is first forced into the target's interesting range (common cfg: below
//!   0x40; config space: the capability area), so short scripts reach the register decoders.
//!
//! A truncated operation ends the script. Nothing here may panic whatever the bytes.

use std::io;
use std::sync::Arc;

use sluice_bus::irq::{MsiMessage, MsiSink};
use sluice_dma::DmaSpace;
use sluice_pci::PciDevice;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{
    VirtioPciDevice, VirtioPciOptions, COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, ISR_CFG_OFFSET,
    MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_OFFSET, VIRTIO_PCI_BAR, VIRTIO_PCI_BAR_SIZE,
};
use crate::device::{ActivateError, ExternalQueues, QueueBinding, VirtioDevice, VirtioInterrupt};
use crate::metrics::DeviceMetrics;

/// Guest RAM of the self-contained fuzz setup.
const FUZZ_RAM_SIZE: usize = 0x1_0000;

/// Runs `script` against `device` (see the module documentation for the format).
pub fn run_register_script(device: &mut VirtioPciDevice, script: &[u8]) {
    let mut rest = script;
    while let Some((&op, tail)) = rest.split_first() {
        let Some((offset_bytes, tail)) = tail.split_first_chunk::<2>() else {
            return;
        };
        let width = 1usize << ((op >> 3) & 3);
        let raw_offset = u64::from(u16::from_le_bytes(*offset_bytes));
        let focused = op & 0x40 != 0;
        if op & 0x20 != 0 {
            let Some((value, tail)) = tail.split_at_checked(width) else {
                return;
            };
            apply_write(device, op & 7, raw_offset, focused, value);
            rest = tail;
        } else {
            let mut value = [0u8; 8];
            apply_read(device, op & 7, raw_offset, focused, &mut value[..width]);
            rest = tail;
        }
    }
}

/// The BAR0 offset (or config space offset for target 6) an operation addresses.
fn target_offset(target: u8, raw: u64, focused: bool) -> u64 {
    let region = |base: u64, span: u64| base + raw % span;
    match target {
        0 if focused => region(COMMON_CFG_OFFSET, 0x40),
        0 => region(COMMON_CFG_OFFSET, 0x1000),
        1 => region(ISR_CFG_OFFSET, 0x1000),
        2 => region(DEVICE_CFG_OFFSET, 0x1000),
        3 => region(NOTIFY_OFFSET, 0x1000),
        4 => region(MSIX_TABLE_OFFSET, 0x1000),
        5 => region(MSIX_PBA_OFFSET, 0x1000),
        6 if focused => 0x40 + raw % 0xc0,
        6 => raw % 0x1000,
        _ => raw % VIRTIO_PCI_BAR_SIZE,
    }
}

fn apply_write(device: &mut VirtioPciDevice, target: u8, raw: u64, focused: bool, value: &[u8]) {
    let offset = target_offset(target, raw, focused);
    if target == 6 {
        device.config_write(offset as usize, value);
    } else {
        device.bar_write(VIRTIO_PCI_BAR, offset, value);
    }
}

fn apply_read(device: &mut VirtioPciDevice, target: u8, raw: u64, focused: bool, out: &mut [u8]) {
    let offset = target_offset(target, raw, focused);
    if target == 6 {
        device.config_read(offset as usize, out);
    } else {
        device.bar_read(VIRTIO_PCI_BAR, offset, out);
    }
}

/// A device model that accepts everything and does nothing: two queues of 8, VERSION_1 and
/// EVENT_IDX, 16 bytes of writable config.
pub struct NullDevice {
    config: [u8; 16],
    metrics: Arc<DeviceMetrics>,
    /// Queues handed over by the last activation (kept so their kick fds stay open).
    pub bindings: Vec<QueueBinding>,
}

impl Default for NullDevice {
    fn default() -> Self {
        Self {
            config: [0; 16],
            metrics: Arc::new(DeviceMetrics::new("null", 2)),
            bindings: Vec::new(),
        }
    }
}

impl VirtioDevice for NullDevice {
    fn device_type(&self) -> u32 {
        crate::device::DEVICE_TYPE_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![8, 8]
    }

    fn device_features(&self) -> u64 {
        (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
            | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let slot = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get_mut(o));
            if let Some(slot) = slot {
                *slot = byte;
            }
        }
    }

    fn queue_count_range(&self) -> std::ops::RangeInclusive<usize> {
        0..=2
    }

    fn queue_handler(
        &mut self,
        index: u16,
        _size: u16,
    ) -> Result<Box<dyn crate::QueueHandler>, ActivateError> {
        Err(ActivateError::NoSuchQueue(index))
    }

    /// Keeps the queues instead of running them.
    fn external_queues(&mut self) -> Option<&mut dyn ExternalQueues> {
        Some(self)
    }

    fn reset(&mut self) {
        self.bindings.clear();
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}

impl ExternalQueues for NullDevice {
    fn start(
        &mut self,
        _features: u64,
        _mem: DmaSpace,
        queues: Vec<QueueBinding>,
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.bindings = queues;
        Ok(())
    }

    fn stop(&mut self) {
        self.bindings.clear();
    }
}

/// Drops every message.
struct NullSink;

impl MsiSink for NullSink {
    fn send(&self, _msg: MsiMessage) -> io::Result<()> {
        Ok(())
    }
}

/// A fresh transport over [`NullDevice`] and 64 KiB of guest RAM.
pub fn null_transport() -> io::Result<VirtioPciDevice> {
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_RAM_SIZE)])
        .map_err(|e| io::Error::other(e.to_string()))?;
    let options = VirtioPciOptions::new(Arc::new(NullSink));
    VirtioPciDevice::new(
        Box::new(NullDevice::default()),
        sluice_dma::identity(ram),
        options,
    )
    .map_err(|e| io::Error::other(e.to_string()))
}

/// The fuzz entry point: a fresh [`null_transport`] driven by `script`.
pub fn fuzz_register_script(script: &[u8]) {
    if let Ok(mut device) = null_transport() {
        run_register_script(&mut device, script);
    }
}
