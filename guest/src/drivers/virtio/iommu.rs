//! virtio-iommu (§5.13), the `viommu` workload: PROBEs every other PCI function for its
//! reserved regions, ATTACHes it to one domain and MAPs that domain identically over the low
//! 4 GiB below the first reserved region (the MSI window), so the workloads that follow do
//! their DMA through the IOMMU's translations with unchanged addresses. Without it, a device
//! behind sluice's virtio-iommu has its DMA refused.

use super::pci::{self as vpci, VirtioError, VirtioPci};
use super::queue::{Queue, Segment};
use super::{idle, report_error};
use crate::cmdline::Mode;
use crate::mem;
use crate::pci::Bdf;
use crate::time::Deadline;
use crate::workloads::Outcome;

pub const TYPE_IOMMU: u16 = 23;
const F_MAP_UNMAP: u64 = 1 << 2;
const F_PROBE: u64 = 1 << 4;
const T_ATTACH: u8 = 1;
const T_MAP: u8 = 3;
const T_PROBE: u8 = 5;
const MAP_READ_WRITE: u32 = 3;
const PROBE_T_RESV_MEM: u16 = 1;
const DOMAIN: u32 = 1;
/// Config space: probe_size.
const CONFIG_PROBE_SIZE: u64 = 32;
/// Where a request's device-writable part starts in its buffer.
const REPLY: u64 = 0x100;
/// The most property bytes the driver accepts (one page of buffer).
const MAX_PROBE_SIZE: u32 = 0xe00;
/// Mapped when PROBE reports no reserved region below it.
const LOW_4G_END: u64 = 1 << 32;

fn endpoint_id(bdf: Bdf) -> u32 {
    (u32::from(bdf.bus) << 8) | (u32::from(bdf.device) << 3) | u32::from(bdf.function)
}

fn write_bytes(addr: u64, bytes: &[u8]) {
    // SAFETY: `addr` is the request buffer allocated by `run` (one page), and every request is
    // shorter than `REPLY`.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
}

fn read_u8(addr: u64) -> u8 {
    // SAFETY: `addr` lies in the request buffer allocated by `run`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn read_le(addr: u64, len: usize) -> u64 {
    (0..len).fold(0, |value, i| {
        value | (u64::from(read_u8(addr + i as u64)) << (8 * i))
    })
}

/// Sends one request (`bytes` device-readable, `writable` bytes device-writable, the tail last)
/// and returns its status.
fn send(
    queue: &mut Queue,
    buffer: u64,
    bytes: &[u8],
    writable: u32,
    timeout_ms: u64,
) -> Result<u8, VirtioError> {
    write_bytes(buffer, bytes);
    let segments = [
        Segment {
            addr: buffer,
            len: bytes.len() as u32,
            device_writes: false,
        },
        Segment {
            addr: buffer + REPLY,
            len: writable,
            device_writes: true,
        },
    ];
    queue.add(&segments).ok_or(VirtioError::NoMemory)?;
    queue.kick();
    let deadline = Deadline::after_ms(timeout_ms);
    loop {
        if queue
            .pop_used()
            .map_err(|bad| VirtioError::BadUsed(bad.id))?
            .is_some()
        {
            break;
        }
        if deadline.expired() {
            return Err(VirtioError::Timeout("virtio-iommu request"));
        }
        idle(Mode::Irq, || queue.has_used());
    }
    Ok(read_u8(buffer + REPLY + u64::from(writable) - 4))
}

fn request(kind: u8, body: &[&[u8]]) -> alloc::vec::Vec<u8> {
    let mut bytes = alloc::vec![kind, 0, 0, 0];
    for field in body {
        bytes.extend_from_slice(field);
    }
    bytes
}

/// The start of the first RESV_MEM region in the PROBE reply at `properties`.
fn first_reserved(properties: u64, probe_size: u32) -> Option<u64> {
    let mut at = 0u64;
    while at + 4 <= u64::from(probe_size) {
        let kind = read_le(properties + at, 2) as u16 & 0xfff;
        let len = read_le(properties + at + 2, 2);
        if kind == 0 {
            return None;
        }
        if kind == PROBE_T_RESV_MEM && len >= 20 {
            return Some(read_le(properties + at + 8, 8));
        }
        at += 4 + len;
    }
    None
}

fn run(timeout_ms: u64) -> Result<Outcome, VirtioError> {
    let pci = vpci::find(TYPE_IOMMU, 0).ok_or(VirtioError::NotFound)?;
    let mut device = VirtioPci::open(pci, F_MAP_UNMAP | F_PROBE, timeout_ms)?;
    if !device.has(F_MAP_UNMAP) || !device.has(F_PROBE) {
        return Err(VirtioError::FeaturesRejected);
    }
    let probe_size = device.config_read32(CONFIG_PROBE_SIZE).min(MAX_PROBE_SIZE);
    let mut queue = device.setup_queue(0, 16, true)?;
    device.driver_ok()?;
    let buffer = mem::alloc_dma(0x1000).ok_or(VirtioError::NoMemory)?;
    let own = endpoint_id(pci.bdf);
    let mut failures = 0u32;
    let mut endpoints = 0u32;
    let mut map_end = LOW_4G_END;
    for function in crate::pci::devices() {
        let endpoint = endpoint_id(function.bdf);
        if endpoint == 0 || endpoint == own {
            continue;
        }
        let probe = request(T_PROBE, &[&endpoint.to_le_bytes(), &[0; 64]]);
        let status = send(&mut queue, buffer, &probe, probe_size + 4, timeout_ms)?;
        match first_reserved(buffer + REPLY, probe_size) {
            Some(start) if status == 0 => map_end = map_end.min(start),
            _ => failures += 1,
        }
        let attach = request(
            T_ATTACH,
            &[&DOMAIN.to_le_bytes(), &endpoint.to_le_bytes(), &[0; 8]],
        );
        if send(&mut queue, buffer, &attach, 4, timeout_ms)? != 0 {
            failures += 1;
        }
        endpoints += 1;
    }
    let map = request(
        T_MAP,
        &[
            &DOMAIN.to_le_bytes(),
            &0u64.to_le_bytes(),
            &(map_end - 1).to_le_bytes(),
            &0u64.to_le_bytes(),
            &MAP_READ_WRITE.to_le_bytes(),
        ],
    );
    if endpoints > 0 && send(&mut queue, buffer, &map, 4, timeout_ms)? != 0 {
        failures += 1;
    }
    // Dropping the transport resets the device, which detaches everything: the IOMMU stays
    // configured for the workloads that follow (its queue memory is never freed anyway).
    let _configured = core::mem::ManuallyDrop::new(device);
    let pass = failures == 0 && endpoints > 0;
    crate::println!(
        "RESULT {{\"workload\":\"viommu\",\"endpoints\":{},\"map_end\":\"{:#x}\",\"errors\":{},\"pass\":{}}}",
        endpoints,
        map_end,
        failures,
        pass
    );
    Ok(if pass { Outcome::Pass } else { Outcome::Fail })
}

/// The `viommu` workload.
pub fn run_workload(timeout_ms: u64) -> Outcome {
    run(timeout_ms).unwrap_or_else(|error| report_error("viommu", &error))
}
