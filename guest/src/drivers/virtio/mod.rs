//! virtio 1.x over PCI (modern interface only): transport, split and packed virtqueues, and
//! the block, network and entropy drivers with their workloads, and the virtio-iommu setup.

pub mod blk;
pub mod iommu;
pub mod net;
mod packed;
pub mod pci;
pub mod queue;
pub mod rng;
mod split;

use crate::cmdline::{Mode, VqLayout};
use crate::workloads::Outcome;
use core::sync::atomic::{AtomicBool, Ordering};
use pci::VirtioError;

/// Whether `vq=packed` asked for packed rings (offered to devices that support them).
static PACKED_WANTED: AtomicBool = AtomicBool::new(false);

/// Sets the ring layout the drivers ask devices for (`vq=`); called once at boot.
pub fn set_wanted_layout(layout: VqLayout) {
    PACKED_WANTED.store(layout == VqLayout::Packed, Ordering::Relaxed);
}

/// The ring layout the drivers ask for; a device that does not offer it gets split rings.
pub fn wanted_layout() -> VqLayout {
    if PACKED_WANTED.load(Ordering::Relaxed) {
        VqLayout::Packed
    } else {
        VqLayout::Split
    }
}

/// Prints the failure and maps it to an outcome (timeouts end the run with status 4).
pub fn report_error(workload: &str, error: &VirtioError) -> Outcome {
    let text = alloc::format!("{:?}", error).replace('"', "'");
    crate::say!("{}: device error {}", workload, text);
    crate::println!(
        "RESULT {{\"workload\":\"{}\",\"error\":\"{}\",\"pass\":false}}",
        workload,
        text
    );
    match error {
        VirtioError::Timeout(_) => Outcome::Timeout,
        _ => Outcome::Fail,
    }
}

/// Sleeps until an interrupt (irq/batch modes) unless `ready()`, or spins briefly (poll mode).
pub fn idle(mode: Mode, ready: impl FnOnce() -> bool) {
    match mode {
        Mode::Poll => crate::arch::pause(),
        Mode::Irq | Mode::Batch => crate::arch::wait_for_interrupt_unless(ready),
    }
}

/// SplitMix64: fast, good enough for LBAs and data patterns.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
