//! Runs the command line's workloads in order and turns their outcomes into the exit status.
//! Each workload prints one `RESULT {json}` line.

pub mod blk;
mod eject;
mod info;
mod jitter;
pub mod net;
mod smp;
pub mod stats;

use crate::cmdline::{Config, Workload};
use crate::exit::Status;

/// How a workload ended.
pub enum Outcome {
    Pass,
    Fail,
    /// A device did not answer in time: the run ends with status 4.
    Timeout,
}

fn run_one(workload: &Workload, config: &Config) -> Outcome {
    match workload {
        Workload::Info => info::run(),
        Workload::Blk(params) => {
            crate::drivers::virtio::blk::run_workload(params, config.timeout_ms)
        }
        Workload::Nvme(params) => crate::drivers::nvme::run_workload(params, config.timeout_ms),
        Workload::Rng { bytes, dev } => {
            crate::drivers::virtio::rng::run_workload(*bytes, *dev, config.timeout_ms)
        }
        Workload::Net(params) => {
            crate::drivers::virtio::net::run_workload(params, config.timeout_ms)
        }
        Workload::E1000(params) => crate::drivers::e1000::run_workload(params, config.timeout_ms),
        Workload::Smp { iters } => smp::run(*iters, config.timeout_ms),
        Workload::Viommu => crate::drivers::virtio::iommu::run_workload(config.timeout_ms),
        Workload::Tpm { hold_ms } => crate::drivers::tpm::run_workload(config.timeout_ms, *hold_ms),
        Workload::Jitter { ms } => jitter::run(*ms),
        Workload::Eject { wait_ms } => eject::run(*wait_ms),
    }
}

fn print_interrupt_counts() {
    crate::console::write_fmt(format_args!("sluice-guest: interrupts by vector:"));
    for vector in 32..=255u8 {
        let count = crate::interrupts::count(vector);
        if count != 0 {
            crate::console::write_fmt(format_args!(" {:#x}={}", vector, count));
        }
    }
    crate::println!("");
}

/// Runs everything; the first timeout stops the run.
pub fn run_all(config: &Config) -> Status {
    let mut status = Status::Pass;
    for workload in &config.workloads {
        match run_one(workload, config) {
            Outcome::Pass => {}
            Outcome::Fail => status = Status::WorkloadFailed,
            Outcome::Timeout => return Status::Timeout,
        }
    }
    print_interrupt_counts();
    status
}
