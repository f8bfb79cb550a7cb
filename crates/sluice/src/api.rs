//! `sluice run --api-socket PATH` (the VM's control API, served by sluice-api over the VM's
//! [`VmHandle`]) and `sluice ctl` (its command-line client).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use sluice_api::{ApiError, DeviceRequest, VmApi};
use sluice_vmm::config::{DiskSpec, NetSpec};
use sluice_vmm::handle::{HandleError, VmHandle};
use sluice_vmm::hotplug::HotplugError;
use sluice_vmm::machine::VmConfig;
use sluice_vmm::qos::QosError;

/// The control API's view of a VM.
pub struct ApiVm(pub Arc<VmHandle>);

impl VmApi for ApiVm {
    fn info(&self) -> Value {
        let devices = self.0.hotplug().map(|h| h.devices()).unwrap_or_default();
        json!({
            "state": format!("{:?}", self.0.state()),
            "config": config_json(self.0.config()),
            "devices": devices,
        })
    }

    fn add_disk(&self, request: &DeviceRequest) -> Result<Value, ApiError> {
        let spec = DiskSpec::parse(&request.options_string())
            .map_err(|e| ApiError::BadRequest(format!("vm.add-disk: {e}")))?;
        let id = request.id.clone();
        let info = self
            .0
            .with_hotplug(|h| h.add_disk(&spec, id))
            .map_err(hotplug_error)?;
        Ok(json!(info))
    }

    fn add_net(&self, request: &DeviceRequest) -> Result<Value, ApiError> {
        let spec = NetSpec::parse(&request.options_string())
            .map_err(|e| ApiError::BadRequest(format!("vm.add-net: {e}")))?;
        let id = request.id.clone();
        let info = self
            .0
            .with_hotplug(|h| h.add_net(&spec, id))
            .map_err(hotplug_error)?;
        Ok(json!(info))
    }

    fn add_device(&self, request: &DeviceRequest) -> Result<Value, ApiError> {
        if let Some((key, _)) = request.options.iter().find(|(k, _)| k != "path") {
            return Err(ApiError::BadRequest(format!(
                "vm.add-device: unknown field `{key}` (path, id)"
            )));
        }
        let path = request
            .option("path")
            .ok_or_else(|| ApiError::BadRequest("vm.add-device needs path=BDF".into()))?;
        let spec = sluice_vmm::config::parse_device(&format!("vfio={path}"))
            .map_err(|e| ApiError::BadRequest(format!("vm.add-device: {e}")))?;
        let id = request.id.clone();
        let info = self
            .0
            .with_hotplug(|h| h.add_vfio(&spec, id))
            .map_err(hotplug_error)?;
        Ok(json!(info))
    }

    fn remove_device(&self, id: &str) -> Result<Value, ApiError> {
        let info = self
            .0
            .with_hotplug(|h| h.remove(id))
            .map_err(hotplug_error)?;
        Ok(json!(info))
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
        let hotplug = self.0.hotplug().map(|h| h.counters());
        json!({ "devices": devices, "hotplug": hotplug, "qos": qos_json(&self.0) })
    }

    fn prometheus(&self) -> String {
        let devices: String = self
            .0
            .device_metrics()
            .iter()
            .map(|d| d.to_prometheus())
            .collect();
        devices + &self.0.qos_disks().prometheus()
    }

    fn qos(&self) -> Result<Value, ApiError> {
        Ok(self.0.qos_disks().status())
    }

    fn set_qos(&self, request: &DeviceRequest) -> Result<Value, ApiError> {
        let id = request.id.as_deref().unwrap_or_default();
        self.0
            .qos_disks()
            .reconfigure(id, &request.options)
            .map_err(qos_error)
    }
}

/// The scheduled disks' settings and stats (`qos` in `vm.counters` and `--metrics`), or
/// null when no disk is scheduled.
pub fn qos_json(vm: &VmHandle) -> Value {
    let disks = vm.qos_disks();
    if disks.is_empty() {
        Value::Null
    } else {
        disks.status()["disks"].take()
    }
}

/// A refused `vm.qos` change as the API answers it.
pub fn qos_error(e: QosError) -> ApiError {
    match e {
        QosError::NotFound(_) | QosError::NoScheduler => ApiError::NotFound(e.to_string()),
        QosError::BadRequest(why) => ApiError::BadRequest(why),
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

fn hotplug_error(e: HotplugError) -> ApiError {
    match e {
        HotplugError::BadRequest(why) => ApiError::BadRequest(why),
        HotplugError::NotFound(_) => ApiError::NotFound(e.to_string()),
        HotplugError::Conflict(why) => ApiError::Conflict(why),
        HotplugError::Failed(why) => ApiError::Failed(why),
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
    /// The API socket of a `sluice run --api-socket PATH` (or `sluice serve blk
    /// --api-socket PATH`: `qos`, `counters`, `metrics`).
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
    /// Hot-plug a virtio-blk disk: `path=IMG[,readonly=on][,id=ID]` and the other `--disk`
    /// options; prints the new device's id and PCI address.
    AddDisk { spec: String },
    /// Hot-plug a virtio-net device: `tap=NAME[,mac=MAC][,id=ID]`.
    AddNet { spec: String },
    /// Hot-plug an assigned host PCI function: `path=BDF[,id=ID]`.
    AddDevice { spec: String },
    /// Ask the guest to eject device ID (`sluice ctl info` lists the ids).
    RemoveDevice { id: String },
    /// The disks behind the I/O scheduler: weight, limits, share, queueing delay, throttled
    /// time; with `ID SPEC` (`weight=N,iops=N,...` as `--disk` spells them) changes disk ID's;
    /// ID `device` is the scheduler itself (`depth=N,iops=N,...` as `--qos-device` spells them).
    Qos {
        /// A disk id (`disk0`), or `device`, to change.
        id: Option<String>,
        /// `key=value,...`: weight, iops, iops_burst, bps, bps_burst, qos_queue; for `device`
        /// depth, idle_depth, iops, iops_burst, bps, bps_burst (a `serve net`: pps for iops).
        spec: Option<String>,
    },
}

/// `key=value,key=value` as a JSON object of strings (the API's device request body).
fn spec_body(spec: &str) -> anyhow::Result<String> {
    let mut fields = serde_json::Map::new();
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("`{pair}`: expected key=value"))?;
        fields.insert(key.to_string(), Value::String(value.to_string()));
    }
    Ok(Value::Object(fields).to_string())
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
        CtlCommand::AddDisk { spec } => {
            body = spec_body(spec)?;
            ("PUT", "/api/v1/vm.add-disk")
        }
        CtlCommand::AddNet { spec } => {
            body = spec_body(spec)?;
            ("PUT", "/api/v1/vm.add-net")
        }
        CtlCommand::AddDevice { spec } => {
            body = spec_body(spec)?;
            ("PUT", "/api/v1/vm.add-device")
        }
        CtlCommand::RemoveDevice { id } => {
            body = json!({ "id": id }).to_string();
            ("PUT", "/api/v1/vm.remove-device")
        }
        CtlCommand::Qos { id: None, .. } => ("GET", "/api/v1/vm.qos"),
        CtlCommand::Qos { id: Some(id), spec } => {
            let spec = spec
                .as_deref()
                .context("sluice ctl qos ID needs SPEC (weight=N,iops=N,...)")?;
            let mut fields: serde_json::Map<String, Value> =
                serde_json::from_str(&spec_body(spec)?)?;
            fields.insert("id".into(), Value::String(id.clone()));
            body = Value::Object(fields).to_string();
            ("PUT", "/api/v1/vm.qos")
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
