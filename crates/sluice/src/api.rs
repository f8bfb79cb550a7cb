//! `sluice run --api-socket PATH` (the VM's control API, served by sluice-api over the VM's
//! [`VmHandle`]) and `sluice ctl` (its command-line client).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use sluice_api::{ApiError, VmApi};
use sluice_vmm::handle::{HandleError, VmHandle};
use sluice_vmm::machine::VmConfig;

/// The control API's view of a VM.
pub struct ApiVm(pub Arc<VmHandle>);

impl VmApi for ApiVm {
    fn info(&self) -> Value {
        json!({
            "state": format!("{:?}", self.0.state()),
            "config": config_json(self.0.config()),
        })
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.0.pause().map_err(api_error)
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.0.resume().map_err(api_error)
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.0.shutdown();
        Ok(())
    }

    fn snapshot(&self, destination: &std::path::Path) -> Result<(), ApiError> {
        self.0.snapshot(destination).map_err(api_error)
    }

    fn send_migration(&self, destination_url: &str) -> Result<Value, ApiError> {
        let report = self.0.send_migration(destination_url).map_err(api_error)?;
        serde_json::to_value(report).map_err(|e| ApiError::Failed(e.to_string()))
    }

    fn counters(&self) -> Value {
        let devices: Vec<Value> = self
            .0
            .device_metrics()
            .iter()
            .map(|d| d.to_json())
            .collect();
        json!({ "devices": devices })
    }

    fn prometheus(&self) -> String {
        self.0
            .device_metrics()
            .iter()
            .map(|d| d.to_prometheus())
            .collect()
    }
}

fn api_error(e: HandleError) -> ApiError {
    match e {
        HandleError::NotRunning(_) | HandleError::NotPaused => ApiError::Conflict(e.to_string()),
        HandleError::Pause(_) | HandleError::Snapshot(_) | HandleError::Migration(_) => {
            ApiError::Failed(e.to_string())
        }
    }
}

/// What `vm.info` says of the configuration.
fn config_json(config: &VmConfig) -> Value {
    json!({
        "cpus": config.cpus,
        "memory_bytes": config.memory,
        "kernel": config.kernel.display().to_string(),
        "cmdline": config.cmdline,
        "disks": config.disks.iter().map(|d| d.path.display().to_string()).collect::<Vec<_>>(),
        "nets": config.nets.len(),
        "nvme": config.nvmes.len(),
        "e1000": config.e1000s.len(),
        "vfio": config.vfio.iter().map(|v| v.host.as_str().to_string()).collect::<Vec<_>>(),
        "iommu": config.iommu.map(|i| format!("{i:?}")),
    })
}

#[derive(Args)]
pub struct CtlArgs {
    /// The API socket of a `sluice run --api-socket PATH`.
    #[arg(long)]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Clone)]
enum CtlCommand {
    /// Is the VMM there (version, pid).
    Ping,
    /// The VM's state and configuration.
    Info,
    /// Park every vCPU.
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// End the VM (its metrics are written as at any end).
    Shutdown,
    /// Write a snapshot of the paused VM into DIR (`sluice run --restore DIR` resumes it).
    Snapshot { dir: PathBuf },
    /// Live-migrate the VM to a `sluice run --migrate-from URL` waiting at URL (`unix:PATH`
    /// or `tcp:HOST:PORT`); answers when done with total and downtime, rounds and pages.
    Migrate { url: String },
    /// Per-device counters, JSON.
    Counters,
    /// Per-device counters, Prometheus text.
    Metrics,
}

const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const MIGRATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// `sluice ctl`: one request, the answer on stdout; status 0 on 2xx, 1 otherwise.
pub fn ctl(args: CtlArgs) -> anyhow::Result<u8> {
    let mut body = String::new();
    let (method, path) = match &args.command {
        CtlCommand::Snapshot { dir } => {
            let dir = std::path::absolute(dir)
                .with_context(|| format!("cannot resolve {}", dir.display()))?;
            body = json!({ "destination_url": format!("file://{}", dir.display()) }).to_string();
            ("PUT", "/api/v1/vm.snapshot")
        }
        CtlCommand::Migrate { url } => {
            body = json!({ "destination_url": url }).to_string();
            ("PUT", "/api/v1/vm.send-migration")
        }
        CtlCommand::Ping => ("GET", "/api/v1/vmm.ping"),
        CtlCommand::Info => ("GET", "/api/v1/vm.info"),
        CtlCommand::Pause => ("PUT", "/api/v1/vm.pause"),
        CtlCommand::Resume => ("PUT", "/api/v1/vm.resume"),
        CtlCommand::Shutdown => ("PUT", "/api/v1/vm.shutdown"),
        CtlCommand::Counters => ("GET", "/api/v1/vm.counters"),
        CtlCommand::Metrics => ("GET", "/metrics"),
    };
    // A migration answers when it is done.
    let timeout = if matches!(args.command, CtlCommand::Migrate { .. }) {
        MIGRATE_TIMEOUT
    } else {
        REQUEST_TIMEOUT
    };
    let (status, body) =
        sluice_api::request_with_timeout(&args.api_socket, method, path, &body, timeout)
            .with_context(|| format!("{method} {path}"))?;
    if !body.is_empty() {
        println!("{}", body.trim_end());
    }
    Ok(u8::from(!(200..300).contains(&status)))
}
