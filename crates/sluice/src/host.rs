//! `sluice host-check` and `sluice vf create|reset|quarantine`: the host side of passthrough,
//! on top of `sluice_host`.
//!
//! sysfs, procfs and /dev are read under `SLUICE_HOST_ROOT` when it is set (a directory holding
//! `sys/`, `proc/` and `dev/`), so the tests drive the binary against fake trees.

use std::io::Write;

use clap::{Args, Subcommand};
use sluice_host::check::{host_check, Request};
use sluice_host::pci::Bdf;
use sluice_host::HostRoot;

/// Exit status of `host-check` when the host is not ready.
pub const EXIT_NOT_READY: u8 = 1;

#[derive(Args)]
pub struct HostCheckArgs {
    /// PCI functions to check for assignment (`0000:01:00.1` or `01:00.1`).
    #[arg(value_parser = parse_bdf)]
    devices: Vec<Bdf>,
    /// Guest RAM the limits are checked against (memlock, memory cgroup), e.g. `2G`.
    #[arg(long, default_value = "128M", value_parser = crate::size::parse_memory_size)]
    memory: u64,
    /// Print JSON for tools instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct VfArgs {
    #[command(subcommand)]
    action: VfAction,
}

#[derive(Subcommand)]
enum VfAction {
    /// Enable SR-IOV VFs on a PF (writes sriov_numvfs; NVMe PFs: prints the nvme-cli steps).
    Create {
        /// The physical function.
        #[arg(long, value_parser = parse_bdf)]
        pf: Bdf,
        /// How many VFs (1..=sriov_totalvfs).
        #[arg(long)]
        count: u32,
    },
    /// Reset a function through the kernel (its `reset` file) and name the reset methods.
    Reset {
        #[arg(value_parser = parse_bdf)]
        bdf: Bdf,
    },
    /// Unbind a function, clear its Bus Master bit and keep every driver off it.
    Quarantine {
        #[arg(value_parser = parse_bdf)]
        bdf: Bdf,
    },
}

fn parse_bdf(text: &str) -> Result<Bdf, String> {
    Bdf::parse(text).map_err(|e| e.to_string())
}

fn root() -> HostRoot {
    match std::env::var_os("SLUICE_HOST_ROOT") {
        Some(dir) => HostRoot::at(std::path::Path::new(&dir)),
        None => HostRoot::real(),
    }
}

/// stdout; a closed pipe must not panic (`println!` would).
fn print(text: &str) {
    let _ = std::io::stdout().write_all(text.as_bytes());
}

pub fn check(args: HostCheckArgs) -> anyhow::Result<u8> {
    let report = host_check(
        &root(),
        &Request {
            devices: args.devices,
            memory: args.memory,
        },
    );
    if args.json {
        print(&format!("{}\n", report.json()));
    } else {
        print(&report.table());
    }
    Ok(if report.ready { 0 } else { EXIT_NOT_READY })
}

pub fn vf(args: VfArgs) -> anyhow::Result<u8> {
    let root = root();
    let lines = match args.action {
        VfAction::Create { pf, count } => sluice_host::vf::create(&root, pf, count)?,
        VfAction::Reset { bdf } => sluice_host::vf::reset(&root, bdf)?,
        VfAction::Quarantine { bdf } => sluice_host::vf::quarantine(&root, bdf)?,
    };
    for line in lines {
        print(&format!("{line}\n"));
    }
    Ok(0)
}
