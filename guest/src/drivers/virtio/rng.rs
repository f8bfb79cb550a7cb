//! virtio-rng (§5.4): one request queue; buffers are posted device-writable until `bytes`
//! bytes arrived. The data must be neither all zero nor one repeated byte.

use super::pci::{self as vpci, VirtioError, VirtioPci};
use super::queue::{Queue, Segment};
use super::{idle, report_error};
use crate::arch::ring3;
use crate::cmdline::Mode;
use crate::mem;
use crate::time::{now_ns, Deadline};
use crate::workloads::Outcome;

const CHUNK: u64 = 4096;

fn byte_at(addr: u64) -> u8 {
    // SAFETY: `addr` lies in the DMA buffer allocated by `run`, which the device has filled.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn run(bytes: u64, dev: usize, timeout_ms: u64) -> Result<Outcome, VirtioError> {
    let pci = vpci::find(vpci::TYPE_RNG, dev).ok_or(VirtioError::NotFound)?;
    let mut device = VirtioPci::open(pci, 0, timeout_ms)?;
    let mut queue = device.setup_queue(0, 16, true)?;
    device.driver_ok()?;
    let buffer = mem::alloc_dma(bytes).ok_or(VirtioError::NoMemory)?;
    let interrupts_before = device.interrupt_count();
    let start = now_ns();
    let (ring, received) = ring3::run_workload_code(|| {
        (
            ring3::current_ring(),
            receive(&mut queue, buffer, bytes, timeout_ms),
        )
    });
    let received = received?;
    let elapsed_ns = now_ns() - start;
    let first = byte_at(buffer);
    let constant = (0..bytes).all(|i| byte_at(buffer + i) == first);
    let pass = !constant;
    crate::println!(
        "RESULT {{\"workload\":\"rng\",\"ring\":{},\"vq\":\"{}\",\"bytes\":{},\"elapsed_ns\":{},\"notifies\":{},\"interrupts\":{},\"errors\":{},\"verify\":\"{}\",\"pass\":{}}}",
        ring,
        device.layout().name(),
        received,
        elapsed_ns,
        queue.notifies,
        device.interrupt_count() - interrupts_before,
        u64::from(constant),
        if constant { "fail" } else { "ok" },
        pass
    );
    Ok(if pass { Outcome::Pass } else { Outcome::Fail })
}

/// Fills `buffer` with `bytes` bytes from the device, one chunk per request.
fn receive(
    queue: &mut Queue,
    buffer: u64,
    bytes: u64,
    timeout_ms: u64,
) -> Result<u64, VirtioError> {
    let mut received = 0u64;
    while received < bytes {
        let len = (bytes - received).min(CHUNK);
        let segment = Segment {
            addr: buffer + received,
            len: len as u32,
            device_writes: true,
        };
        queue.add(&[segment]).ok_or(VirtioError::NoMemory)?;
        queue.kick();
        let deadline = Deadline::after_ms(timeout_ms);
        let written = loop {
            if let Some((_, written)) = queue
                .pop_used()
                .map_err(|bad| VirtioError::BadUsed(bad.id))?
            {
                break written;
            }
            if deadline.expired() {
                return Err(VirtioError::Timeout("rng request"));
            }
            idle(Mode::Irq, || queue.has_used());
        };
        received += u64::from(written).min(len);
    }
    Ok(received)
}

/// The `rng` workload.
pub fn run_workload(bytes: u64, dev: usize, timeout_ms: u64) -> Outcome {
    run(bytes, dev, timeout_ms).unwrap_or_else(|error| report_error("rng", &error))
}
