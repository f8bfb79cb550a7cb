//! `sluice serve`: sluice's device models served to other VMMs over vhost-user.
//!
//! Each listens on `--socket PATH` until SIGTERM or SIGINT, which remove the socket and exit 0;
//! the protocol side is `sluice_vhost`. `PATH` must be free or a stale socket: an existing
//! file, directory or live server's socket is refused, never replaced. Up to
//! `--max-connections` frontends are served at once, one of them driving the device (see
//! `sluice_vhost::server`). Packed virtqueues are offered unless `--packed off`.
//! * `sluice serve blk --socket PATH --image FILE [--queues N] [--readonly] [--direct]
//!   [--block-size N] [--qos SPEC]`: the virtio-blk model over a raw image (QEMU's
//!   `vhost-user-blk-pci`).
//! * `sluice serve blk --disk socket=PATH,image=FILE[,readonly=on][,name=N][,notify=P][,QOS...]`:
//!   several disks from one process, each on its own socket for its own frontend (one guest
//!   per socket), all behind one sluice-qos scheduler (`--qos-device SPEC`, or `off` to serve
//!   them unscheduled): weights, IOPS / bandwidth buckets, ioprio classes. The same image
//!   given read-only to several disks is a shared read-only base. `--queues`, `--direct` and
//!   `--block-size` apply to every disk. `--metrics FILE` writes every disk's queue metrics
//!   and the scheduler's per-guest stats (queueing delay, share, throttled time) when a stop
//!   signal ends the server.
//! * `sluice serve net --socket PATH --tap NAME [--queues N] [--mac MAC]`: the virtio-net model
//!   over a tap with N queue pairs, created if missing (QEMU's `-netdev vhost-user`). The tap is
//!   brought up; its addresses are the host's business.
//! * `sluice serve net --net socket=PATH,tap=NAME[,name=N][,mac=M][,queues=N][,notify=P]
//!   [,queue_prio=P:C][,weight=N,pps=N,bps=SIZE..]`: several NICs, each on its own socket and tap for its own
//!   frontend, their transmit queues behind one sluice-qos scheduler (`--qos-device`, or
//!   `off`): weighted fair order of frames across guests, frames/s and bytes/s buckets, a
//!   queue pair's class inside its guest. `--metrics` and `--api-socket` as for `serve blk`.
//! * `sluice serve rng --socket PATH`: the virtio-rng model (QEMU's `vhost-user-rng-pci`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use sluice_api::{ApiError, DeviceRequest, VmApi};
use sluice_devices::block::{Block, BlockConfig};
use sluice_devices::net::{parse_mac, Net, NetConfig, Tap};
use sluice_devices::rng::Rng;
use sluice_qos::Qos;
use sluice_vhost::{Limits, Server, SocketRemover};
use sluice_virtio::DeviceMetrics;
use sluice_vmm::qos::{QosDisks, ScheduledGuest};

use crate::signals::StopSignals;
use sluice_virtio::VirtioDevice;

/// The MAC the backend reports when `--mac` is not given (QEMU uses its own `mac=` anyway).
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

#[derive(Args)]
pub struct ServeArgs {
    #[command(subcommand)]
    device: ServedDeviceArgs,
}

/// Options every served device takes.
#[derive(Args)]
struct ListenArgs {
    /// The vhost-user socket to listen on (must not exist, or be a stale socket).
    #[arg(long)]
    socket: PathBuf,
    #[command(flatten)]
    connections: ConnectionArgs,
}

impl ListenArgs {
    fn limits(&self) -> Limits {
        self.connections.limits()
    }
}

/// How many frontends a socket serves, how long they have to claim it, and the rings offered.
#[derive(Args)]
struct ConnectionArgs {
    /// Frontend connections served at once per socket (one drives its device; the others may
    /// query it).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_connections: u32,
    /// Seconds a new connection has to claim the device (SET_OWNER).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    handshake_timeout: u64,
    /// Offer packed virtqueues (VIRTIO_F_RING_PACKED); `off` serves split rings only.
    #[arg(long, default_value = "on", value_name = "on|off", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    packed: bool,
}

impl ConnectionArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections as usize,
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
            offer_packed: self.packed,
            ..Limits::default()
        }
    }
}

#[derive(Subcommand)]
enum ServedDeviceArgs {
    /// A virtio-blk disk (vhost-user-blk).
    Blk(BlkArgs),
    /// A virtio-net NIC on a tap (vhost-user-net).
    Net(NetArgs),
    /// A virtio-rng entropy source fed by getrandom(2) (vhost-user-rng).
    Rng(RngArgs),
}

#[derive(Args)]
struct NetArgs {
    #[command(flatten)]
    listen: MultiListenArgs,
    /// Tap interface (created if missing; needs CAP_NET_ADMIN).
    #[arg(long, required_unless_present = "specs", conflicts_with = "specs")]
    tap: Option<String>,
    /// One of several NICs, each served on its own socket to its own frontend, on its own tap:
    /// `socket=PATH,tap=NAME[,name=N][,mac=MAC][,queues=N][,notify=irq|poll|sched..]
    /// [,queue_prio=PAIR:high|normal|bulk]..`
    /// plus the scheduler keys `weight=N,pps=N,pps_burst=N,bps=SIZE,bps_burst=SIZE,queue=N`
    /// (transmitted frames per second, bytes per second). Repeatable.
    #[arg(long = "net", id = "specs", value_name = "SPEC")]
    nets: Vec<String>,
    /// The shared transmit scheduler of several `--net`s: `depth=N`, `pps`/`iops`, `bps`
    /// (and their `_burst`) for the server as a whole; `off` serves them unscheduled.
    #[arg(long, value_name = "SPEC|off", requires = "specs")]
    qos_device: Option<String>,
    /// Write the NICs' metrics and the scheduler's per-guest stats here (JSON) when a stop
    /// signal ends the server.
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// Serve the control API here (`vm.qos` over the scheduled NICs by name, `vm.counters`).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Queue pairs (tap queues) offered; the frontend may use fewer.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    queues: u16,
    /// MAC address in the config space, `xx:xx:xx:xx:xx:xx` (unicast).
    #[arg(long, value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
}

#[derive(Args)]
struct RngArgs {
    #[command(flatten)]
    listen: ListenArgs,
}

/// `--socket` made optional for `serve blk` / `serve net`, which may take `--disk` / `--net`
/// (argument id `specs`) instead.
#[derive(Args)]
struct MultiListenArgs {
    /// The vhost-user socket to listen on (must not exist, or be a stale socket).
    #[arg(long, required_unless_present = "specs", conflicts_with = "specs")]
    socket: Option<PathBuf>,
    #[command(flatten)]
    connections: ConnectionArgs,
}

impl MultiListenArgs {
    fn limits(&self) -> Limits {
        self.connections.limits()
    }
}

#[derive(Args)]
struct BlkArgs {
    #[command(flatten)]
    listen: MultiListenArgs,
    /// Disk image (regular file or block device; raw format).
    #[arg(long, required_unless_present = "specs", conflicts_with = "specs")]
    image: Option<PathBuf>,
    /// One of several disks, each served on its own socket to its own frontend:
    /// `socket=PATH,image=FILE[,readonly=on|off][,name=NAME][,notify=irq|poll[:US]|sched[:US]|batch..]`
    /// (the rings' policy: a latency-sensitive guest's disk may poll; `sched` polls it while
    /// the scheduler sees a backlog, up to `--qos-device poll_guests=`) plus the `--qos` keys
    /// (`weight=N,iops=N,iops_burst=N,bps=SIZE,bps_burst=SIZE,queue=N`). Repeatable.
    #[arg(long = "disk", id = "specs", value_name = "SPEC")]
    disks: Vec<String>,
    /// Scheduling of the single `--image` disk: the `--disk` qos keys (puts it behind the
    /// scheduler; its buckets then hold it to its limits).
    #[arg(long, value_name = "SPEC", conflicts_with = "specs")]
    qos: Option<String>,
    /// The shared scheduler: `depth=N` (requests on the backend at once, default 4),
    /// `idle_depth=N`, `poll_guests=N` (guests polled at once under `notify=sched`, default
    /// 1), `iops`, `iops_burst`, `bps`, `bps_burst` for the device as a whole;
    /// `off` serves several `--disk`s unscheduled.
    #[arg(long, value_name = "SPEC|off")]
    qos_device: Option<String>,
    /// Write the disks' metrics and the scheduler's per-guest stats here (JSON) when a stop
    /// signal ends the server.
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// Also rewrite the `--metrics` file every this many milliseconds while serving (replaced
    /// whole: written beside it, then renamed), for shares over a window.
    #[arg(long, value_name = "MS", requires = "metrics",
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    metrics_every: Option<u64>,
    /// Serve the control API here (`vm.qos`: each scheduled disk's settings and stats by
    /// name, changed live with a PUT; `vm.counters`, `/metrics`; `sluice ctl` talks to it).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Number of request queues offered (the frontend may use fewer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    queues: u16,
    /// Serve the image read-only.
    #[arg(long)]
    readonly: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,
    /// Logical block size the guest sees (512, 1024, 2048 or 4096); default: the host's.
    /// With --direct it may not be smaller than the host's.
    #[arg(long, value_parser = sluice_vmm::config::block_size)]
    block_size: Option<u32>,
}

/// Runs `sluice serve ...`; returns on error or after SIGTERM / SIGINT (status 0).
pub fn run(args: ServeArgs) -> anyhow::Result<u8> {
    // Before any thread exists, so that every thread inherits the mask and only the
    // signal thread ever takes these signals.
    let stop_signals = StopSignals::block().context("cannot set up signal handling")?;
    match args.device {
        ServedDeviceArgs::Blk(blk) => serve_blk(blk, stop_signals),
        ServedDeviceArgs::Net(net) => serve_net(net, stop_signals),
        ServedDeviceArgs::Rng(rng) => {
            serve(&rng.listen, Rng::new(), "vhost-user-rng", stop_signals)
        }
    }
}

/// Listens on `listen.socket` and serves `device` until a stop signal.
fn serve<D: VirtioDevice + 'static>(
    listen: &ListenArgs,
    device: D,
    what: &str,
    stop_signals: StopSignals,
) -> anyhow::Result<u8> {
    let socket = &listen.socket;
    let server = Server::bind_with(socket, device, listen.limits())
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let remover = server.socket_remover();
    let name = what.to_owned();
    stop_signals.on_signal(move |signal| {
        tracing::info!("{name}: signal {signal}: removing the socket and exiting");
        remover.remove();
        std::process::exit(0);
    })?;
    tracing::info!("{what}: listening on {}", socket.display());
    // The accept loop starts the connection threads, which inherit (and repeat) this filter.
    sluice_sandbox::confine_current_thread(sluice_sandbox::ThreadKind::Connection)?;
    server.run().context("vhost-user server failed")?;
    Ok(0)
}

fn serve_net(args: NetArgs, stop_signals: StopSignals) -> anyhow::Result<u8> {
    let (Some(socket), Some(tap)) = (&args.listen.socket, &args.tap) else {
        return serve_nets(args, stop_signals);
    };
    let tap =
        Tap::open(Some(tap), args.queues).with_context(|| format!("cannot open tap {tap}"))?;
    tap.set_up()
        .with_context(|| format!("cannot bring tap {} up", tap.name()))?;
    let config = NetConfig::new(args.mac.unwrap_or(DEFAULT_MAC));
    let net = Net::new(tap, config);
    let metrics = vec![VirtioDevice::metrics(&net)];
    let server = Server::bind_with(socket, net, args.listen.limits())
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    tracing::info!("vhost-user-net: listening on {}", socket.display());
    let served = Served {
        what: "vhost-user-net",
        servers: vec![server],
        metrics,
        scheduled: Arc::new(QosDisks::default()),
        qos: None,
        net_keys: true,
    };
    run_served(served, args.reporting(), stop_signals)
}

impl NetArgs {
    fn reporting(&self) -> ServedOptions {
        ServedOptions {
            api_socket: self.api_socket.clone(),
            metrics: self.metrics.clone(),
            metrics_every: None,
        }
    }
}

/// One NIC of `serve net --net`.
#[derive(Debug)]
struct NicSpec {
    socket: PathBuf,
    tap: String,
    name: String,
    mac: Option<[u8; 6]>,
    queues: Option<u16>,
    /// `queue_prio=PAIR:CLASS` entries.
    prios: Vec<(u16, sluice_qos::Class)>,
    /// The rings' notification policy (`notify=`; default interrupt; `sched`: the transmit
    /// queues polled while the scheduler sees the guest's backlog).
    notify: Option<sluice_virtio::NotifyPolicy>,
    /// The scheduler keys, in the scheduler's spelling (`pps` → `iops`).
    qos: String,
}

impl NicSpec {
    /// Each queue pair's class (`Normal` unless `queue_prio=` said otherwise).
    fn classes(&self, queues: u16) -> Vec<sluice_qos::Class> {
        let mut classes = vec![sluice_qos::Class::Normal; usize::from(queues)];
        for &(pair, class) in &self.prios {
            if let Some(slot) = classes.get_mut(usize::from(pair)) {
                *slot = class;
            }
        }
        classes
    }
}

/// The scheduler's name for a net rate key: frames are its requests, so `pps` is its
/// request bucket; the disk spellings are refused so a typo cannot pass for a limit.
fn net_qos_key(key: &str) -> Result<&str, String> {
    match key {
        "pps" => Ok("iops"),
        "pps_burst" => Ok("iops_burst"),
        "iops" | "iops_burst" => Err(format!("{key} is a disk key: a NIC takes pps")),
        other => Ok(other),
    }
}

/// [`net_qos_key`] over a request's options.
fn net_qos_keys(options: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
    options
        .iter()
        .map(|(key, value)| Ok((net_qos_key(key)?.to_owned(), value.clone())))
        .collect()
}

fn parse_class(value: &str) -> Option<sluice_qos::Class> {
    match value {
        "high" => Some(sluice_qos::Class::High),
        "normal" => Some(sluice_qos::Class::Normal),
        "bulk" | "idle" => Some(sluice_qos::Class::Idle),
        _ => None,
    }
}

/// Parses a `--net` value: its own keys, the rest are scheduler keys (checked here, so a bad
/// one is refused before any tap is touched).
fn parse_nic(spec: &str, default_queues: u16) -> anyhow::Result<NicSpec> {
    let bad = |why: String| anyhow::anyhow!("--net {spec:?}: {why}");
    let (mut socket, mut tap, mut name, mut mac, mut queues) = (None, None, None, None, None);
    let (mut prios, mut qos, mut notify) = (Vec::new(), Vec::new(), None);
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("{pair:?} is not key=value")))?;
        match key {
            "socket" => socket = Some(PathBuf::from(value)),
            "tap" => tap = Some(value.to_owned()),
            "name" => name = Some(value.to_owned()),
            "mac" => mac = Some(parse_mac(value).map_err(|e| bad(e.to_string()))?),
            "queues" => {
                let n = value.parse::<u16>().ok().filter(|n| (1..=256).contains(n));
                queues = Some(n.ok_or_else(|| bad("queues must be in 1..=256".into()))?);
            }
            "notify" => notify = Some(sluice_vmm::config::parse_notify(value).map_err(bad)?),
            "queue_prio" => {
                let parsed = value.split_once(':').and_then(|(pair, class)| {
                    Some((pair.parse::<u16>().ok()?, parse_class(class)?))
                });
                let why = "queue_prio must be PAIR:high|normal|bulk";
                prios.push(parsed.ok_or_else(|| bad(why.into()))?);
            }
            _ => qos.push(format!("{}={value}", net_qos_key(key).map_err(bad)?)),
        }
    }
    let socket = socket.ok_or_else(|| bad("socket= is required".into()))?;
    let tap = tap.ok_or_else(|| bad("tap= is required".into()))?;
    let pairs = queues.unwrap_or(default_queues);
    if let Some((pair, _)) = prios.iter().find(|(pair, _)| *pair >= pairs) {
        return Err(bad(format!(
            "queue_prio names pair {pair}, the NIC has {pairs}"
        )));
    }
    let name = name.unwrap_or_else(|| socket_name(&socket));
    refuse_device_id(&name).map_err(bad)?;
    let qos = qos.join(",");
    // The scheduler names the frame bucket iops; the user wrote pps.
    sluice_qos::parse_guest(&name, &qos).map_err(|e| bad(e.replace("iops", "pps")))?;
    Ok(NicSpec {
        socket,
        tap,
        name,
        mac,
        queues,
        prios,
        notify,
        qos,
    })
}

/// Refuses two NICs on one socket, tap or name (each guest has its own).
fn check_distinct(nics: &[NicSpec]) -> anyhow::Result<()> {
    for (index, nic) in nics.iter().enumerate() {
        for other in &nics[..index] {
            if other.socket == nic.socket || other.tap == nic.tap || other.name == nic.name {
                anyhow::bail!(
                    "--net {} and {}: each NIC needs its own socket, tap and name",
                    other.name,
                    nic.name
                );
            }
        }
    }
    Ok(())
}

/// `serve net --net ...`: several NICs, their transmit queues behind one scheduler.
fn serve_nets(args: NetArgs, stop_signals: StopSignals) -> anyhow::Result<u8> {
    let nics = args
        .nets
        .iter()
        .map(|spec| parse_nic(spec, args.queues))
        .collect::<anyhow::Result<Vec<_>>>()?;
    check_distinct(&nics)?;
    let qos = match args.qos_device.as_deref() {
        Some("off") => None,
        spec => {
            let spec = spec.unwrap_or("");
            let keys: Vec<String> = spec
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((key, value)) => {
                        Ok(format!("{}={value}", net_qos_key(key).unwrap_or(key)))
                    }
                    None => Ok(pair.to_owned()),
                })
                .collect::<anyhow::Result<_>>()?;
            let device = sluice_qos::parse_device(&keys.join(","))
                .map_err(|e| anyhow::anyhow!("--qos-device {spec:?}: {e}"))?;
            Some(Qos::new(device))
        }
    };
    let scheduled = Arc::new(QosDisks::default());
    let (mut servers, mut metrics) = (Vec::new(), Vec::new());
    for nic in &nics {
        let queues = nic.queues.unwrap_or(args.queues);
        let tap = Tap::open(Some(&nic.tap), queues)
            .with_context(|| format!("cannot open tap {}", nic.tap))?;
        tap.set_up()
            .with_context(|| format!("cannot bring tap {} up", tap.name()))?;
        let config = NetConfig::new(nic.mac.or(args.mac).unwrap_or(DEFAULT_MAC));
        let mut net = Net::new(tap, config);
        if let Some(qos) = &qos {
            let guest = sluice_qos::parse_guest(&nic.name, &nic.qos)
                .map_err(|e| anyhow::anyhow!("NIC {}: {e}", nic.name))?;
            let guest = qos.add_guest(guest);
            net.join_scheduler(Arc::clone(qos), guest, nic.classes(queues));
            let scheduled_guest = ScheduledGuest {
                qos: Arc::clone(qos),
                guest,
            };
            scheduled.add(nic.name.clone(), scheduled_guest);
        }
        metrics.push(VirtioDevice::metrics(&net));
        let mut limits = args.listen.limits();
        if let Some(notify) = nic.notify {
            if qos.is_none() && matches!(notify, sluice_virtio::NotifyPolicy::Scheduled { .. }) {
                anyhow::bail!(
                    "NIC {}: notify=sched needs the scheduler (not --qos-device off)",
                    nic.name
                );
            }
            limits.notify = notify;
        }
        let server = Server::bind_with(&nic.socket, net, limits)
            .with_context(|| format!("cannot listen on {}", nic.socket.display()))?;
        tracing::info!(
            "vhost-user-net: {} (tap {}) listening on {}",
            nic.name,
            nic.tap,
            nic.socket.display()
        );
        servers.push(server);
    }
    let served = Served {
        what: "vhost-user-net",
        servers,
        metrics,
        scheduled,
        qos,
        net_keys: true,
    };
    run_served(served, args.reporting(), stop_signals)
}

/// One disk of `serve blk`.
struct DiskSpec {
    socket: PathBuf,
    image: PathBuf,
    read_only: bool,
    name: String,
    /// The rings' notification policy (`notify=`; default interrupt).
    notify: Option<sluice_virtio::NotifyPolicy>,
    /// The qos keys, for `sluice_qos::parse_guest` (None: not scheduled).
    qos: Option<String>,
}

/// Parses a `--disk` value: its own keys, the rest are qos keys.
fn parse_disk(spec: &str) -> anyhow::Result<DiskSpec> {
    let (mut socket, mut image, mut read_only, mut name) = (None, None, false, None);
    let mut notify = None;
    let mut qos = Vec::new();
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--disk {spec:?}: {pair:?} is not key=value"))?;
        match key {
            "socket" => socket = Some(PathBuf::from(value)),
            "image" => image = Some(PathBuf::from(value)),
            "name" => name = Some(value.to_owned()),
            "notify" => {
                let policy = sluice_vmm::config::parse_notify(value)
                    .map_err(|e| anyhow::anyhow!("--disk {spec:?}: {e}"))?;
                notify = Some(policy);
            }
            "readonly" => {
                read_only = match value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => anyhow::bail!("--disk {spec:?}: readonly must be on or off"),
                }
            }
            _ => qos.push(pair),
        }
    }
    let socket = socket.with_context(|| format!("--disk {spec:?}: socket= is required"))?;
    let image = image.with_context(|| format!("--disk {spec:?}: image= is required"))?;
    let name = name.unwrap_or_else(|| socket_name(&socket));
    refuse_device_id(&name).map_err(|e| anyhow::anyhow!("--disk {spec:?}: {e}"))?;
    Ok(DiskSpec {
        socket,
        image,
        read_only,
        name,
        notify,
        qos: Some(qos.join(",")),
    })
}

/// `vm.qos` names the scheduler itself `device`: no disk or NIC may be called that.
fn refuse_device_id(name: &str) -> Result<(), String> {
    if name == sluice_vmm::qos::DEVICE_ID {
        return Err(format!(
            "the name {name:?} is the scheduler's own in vm.qos (name= another)"
        ));
    }
    Ok(())
}

fn socket_name(socket: &Path) -> String {
    socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| socket.display().to_string())
}

fn serve_blk(args: BlkArgs, stop_signals: StopSignals) -> anyhow::Result<u8> {
    let disks = match (&args.listen.socket, &args.image) {
        (Some(socket), Some(image)) => vec![DiskSpec {
            socket: socket.clone(),
            image: image.clone(),
            read_only: args.readonly,
            name: socket_name(socket),
            notify: None,
            qos: args.qos.clone(),
        }],
        _ => args
            .disks
            .iter()
            .map(|spec| parse_disk(spec))
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    let scheduled = match args.qos_device.as_deref() {
        Some("off") => false,
        Some(_) => true,
        None => disks.iter().any(|d| d.qos.is_some()),
    };
    if !scheduled {
        if let Some(disk) = disks.iter().find(|d| {
            matches!(
                d.notify,
                Some(sluice_virtio::NotifyPolicy::Scheduled { .. })
            )
        }) {
            anyhow::bail!(
                "disk {}: notify=sched needs the scheduler (not --qos-device off)",
                disk.name
            );
        }
    }
    let qos = if scheduled {
        let spec = args.qos_device.as_deref().unwrap_or("");
        let device = sluice_qos::parse_device(spec)
            .map_err(|e| anyhow::anyhow!("--qos-device {spec:?}: {e}"))?;
        Some(Qos::new(device))
    } else {
        None
    };
    let limits = args.listen.limits();
    let mut servers = Vec::new();
    let mut metrics = Vec::new();
    let scheduled_disks = Arc::new(QosDisks::default());
    for disk in &disks {
        let mut config = BlockConfig::new(&disk.image);
        config.queues = args.queues;
        config.read_only = disk.read_only;
        config.direct = args.direct;
        config.logical_block_size = args.block_size;
        let mut block = Block::new(config)
            .with_context(|| format!("cannot open the disk {}", disk.image.display()))?;
        if let Some(qos) = &qos {
            let spec = disk.qos.as_deref().unwrap_or("");
            let guest = sluice_qos::parse_guest(&disk.name, spec)
                .map_err(|e| anyhow::anyhow!("disk {}: {e}", disk.name))?;
            let guest = qos.add_guest(guest);
            block.join_scheduler(Arc::clone(qos), guest);
            scheduled_disks.add(
                disk.name.clone(),
                ScheduledGuest {
                    qos: Arc::clone(qos),
                    guest,
                },
            );
        }
        metrics.push(VirtioDevice::metrics(&block));
        let mut limits = limits.clone();
        if let Some(notify) = disk.notify {
            limits.notify = notify;
        }
        let server = Server::bind_with(&disk.socket, block, limits)
            .with_context(|| format!("cannot listen on {}", disk.socket.display()))?;
        tracing::info!(
            "vhost-user-blk: {} listening on {}",
            disk.name,
            disk.socket.display()
        );
        servers.push(server);
    }
    let served = Served {
        what: "vhost-user-blk",
        servers,
        metrics,
        scheduled: scheduled_disks,
        qos,
        net_keys: false,
    };
    let options = ServedOptions {
        api_socket: args.api_socket.clone(),
        metrics: args.metrics.clone(),
        metrics_every: args.metrics_every,
    };
    run_served(served, options, stop_signals)
}

/// The devices of a multi-socket `serve blk` / `serve net`, ready to run.
struct Served<D: VirtioDevice> {
    what: &'static str,
    servers: Vec<Server<D>>,
    metrics: Vec<Arc<DeviceMetrics>>,
    scheduled: Arc<QosDisks>,
    qos: Option<Arc<Qos>>,
    /// The API takes the net spellings of the rate keys (`pps` for the request bucket).
    net_keys: bool,
}

/// The reporting options both take.
struct ServedOptions {
    api_socket: Option<PathBuf>,
    metrics: Option<PathBuf>,
    metrics_every: Option<u64>,
}

/// Starts the API, the metrics writer, the stop-signal handling and the scheduler's ticker,
/// then runs every server until a stop signal.
fn run_served<D: VirtioDevice + 'static>(
    served: Served<D>,
    options: ServedOptions,
    stop_signals: StopSignals,
) -> anyhow::Result<u8> {
    let Served {
        what,
        servers,
        metrics,
        scheduled,
        qos,
        net_keys,
    } = served;
    let removers: Vec<SocketRemover> = servers.iter().map(Server::socket_remover).collect();
    // Like the signal thread: started before this thread takes the connection filter. Kept
    // until the process exits (the stop signal ends it with `exit`).
    let _api = match &options.api_socket {
        Some(path) => {
            let api = ServeApi {
                what,
                disks: scheduled,
                metrics: metrics.clone(),
                net_keys,
            };
            Some(
                sluice_api::ApiServer::start(path, Arc::new(api))
                    .context("cannot serve the control API")?,
            )
        }
        None => None,
    };
    let api_socket = options.api_socket.clone();
    let report = Arc::new(StopReport {
        path: options.metrics.clone(),
        metrics,
        qos: qos.clone(),
    });
    if let Some(every) = options.metrics_every {
        // Like the signal thread: started before this thread takes the connection filter,
        // since it creates and renames files.
        let report = Arc::clone(&report);
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(every));
                report.write();
            })
            .context("cannot start the metrics thread")?;
    }
    stop_signals.on_signal(move |signal| {
        tracing::info!("{what}: signal {signal}: removing the sockets and exiting");
        for remover in &removers {
            remover.remove();
        }
        if let Some(path) = &api_socket {
            let _ = std::fs::remove_file(path);
        }
        report.write();
        std::process::exit(0);
    })?;
    if let Some(qos) = &qos {
        qos.start_ticker().context("cannot start the qos ticker")?;
    }
    run_servers(servers)
}

/// Runs every server's accept loop, the last one on this thread.
fn run_servers<D: VirtioDevice + 'static>(mut servers: Vec<Server<D>>) -> anyhow::Result<u8> {
    let last = servers.pop().context("nothing to serve")?;
    for (index, server) in servers.into_iter().enumerate() {
        sluice_sandbox::spawn(
            sluice_sandbox::ThreadKind::Connection,
            format!("accept{index}"),
            move || {
                if let Err(e) = server.run() {
                    tracing::error!("vhost-user server failed: {e}");
                    std::process::exit(1);
                }
            },
        )
        .context("cannot start an accept thread")?;
    }
    sluice_sandbox::confine_current_thread(sluice_sandbox::ThreadKind::Connection)?;
    last.run().context("vhost-user server failed")?;
    Ok(0)
}

/// `serve blk --api-socket`: the control API of a server with no VM — `vm.qos` over its
/// scheduled disks (by name), their counters; the VM actions are refused with 409.
struct ServeApi {
    what: &'static str,
    disks: Arc<QosDisks>,
    metrics: Vec<Arc<DeviceMetrics>>,
    net_keys: bool,
}

impl ServeApi {
    fn no_vm(&self, action: &str) -> ApiError {
        ApiError::Conflict(format!(
            "{} has no VM to {action} (stop the server with SIGTERM)",
            self.what
        ))
    }
}

impl VmApi for ServeApi {
    fn info(&self) -> serde_json::Value {
        serde_json::json!({ "state": "Serving", "qos": self.disks.status()["disks"] })
    }
    fn pause(&self) -> Result<(), ApiError> {
        Err(self.no_vm("pause"))
    }
    fn resume(&self) -> Result<(), ApiError> {
        Err(self.no_vm("resume"))
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        Err(self.no_vm("shut down"))
    }
    fn snapshot(&self, _destination: &Path) -> Result<(), ApiError> {
        Err(self.no_vm("snapshot"))
    }
    fn counters(&self) -> serde_json::Value {
        let devices: Vec<_> = self.metrics.iter().map(|m| m.to_json()).collect();
        serde_json::json!({ "devices": devices, "qos": self.disks.status()["disks"] })
    }
    fn prometheus(&self) -> String {
        let devices: String = self.metrics.iter().map(|m| m.to_prometheus()).collect();
        devices + &self.disks.prometheus()
    }
    fn qos(&self) -> Result<serde_json::Value, ApiError> {
        Ok(self.disks.status())
    }
    fn set_qos(&self, request: &DeviceRequest) -> Result<serde_json::Value, ApiError> {
        let id = request.id.as_deref().unwrap_or_default();
        let options = if self.net_keys {
            net_qos_keys(&request.options).map_err(ApiError::BadRequest)?
        } else {
            request.options.clone()
        };
        let answer = self.disks.reconfigure(id, &options);
        answer.map_err(|e| match crate::api::qos_error(e) {
            // The scheduler names the frame bucket iops; a NIC's client wrote pps.
            ApiError::BadRequest(why) if self.net_keys => {
                ApiError::BadRequest(why.replace("iops", "pps"))
            }
            other => other,
        })
    }
}

/// What `serve blk --metrics` writes when a stop signal ends the server.
struct StopReport {
    path: Option<PathBuf>,
    metrics: Vec<Arc<DeviceMetrics>>,
    qos: Option<Arc<Qos>>,
}

impl StopReport {
    fn write(&self) {
        let Some(path) = &self.path else {
            return;
        };
        let devices: Vec<_> = self.metrics.iter().map(|m| m.to_json()).collect();
        let json = serde_json::json!({
            "unix_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            "devices": devices,
            "qos": self.qos.as_ref().map(|q| q.stats_json()),
        });
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        let mut partial = path.clone().into_os_string();
        partial.push(".partial");
        let written = std::fs::write(&partial, text).and_then(|()| std::fs::rename(&partial, path));
        if let Err(e) = written {
            tracing::error!("cannot write metrics to {}: {e}", path.display());
        }
    }
}
