//! `sluice serve`: sluice's device models served to other VMMs over vhost-user.
//!
//! Each listens on `--socket PATH` until SIGTERM or SIGINT, which remove the socket and exit 0;
//! the protocol side is `sluice_vhost`. `PATH` must be free or a stale socket: an existing
//! file, directory or live server's socket is refused, never replaced. Up to
//! `--max-connections` frontends are served at once, one of them driving the device (see
//! `sluice_vhost::server`). Packed virtqueues are offered unless `--packed off`.
//! * `sluice serve blk --socket PATH --image FILE [--queues N] [--readonly] [--direct]
//!   [--block-size N]`: the virtio-blk model over a raw image (QEMU's `vhost-user-blk-pci`).
//! * `sluice serve net --socket PATH --tap NAME [--queues N] [--mac MAC]`: the virtio-net model
//!   over a tap with N queue pairs, created if missing (QEMU's `-netdev vhost-user`). The tap is
//!   brought up; its addresses are the host's business.
//! * `sluice serve rng --socket PATH`: the virtio-rng model (QEMU's `vhost-user-rng-pci`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use sluice_devices::block::{Block, BlockConfig};
use sluice_devices::net::{parse_mac, Net, NetConfig, Tap};
use sluice_devices::rng::Rng;
use sluice_vhost::{Limits, Server};

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
    /// Frontend connections served at once (one drives the device; the others may query it).
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

impl ListenArgs {
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
    listen: ListenArgs,
    /// Tap interface (created if missing; needs CAP_NET_ADMIN).
    #[arg(long)]
    tap: String,
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

#[derive(Args)]
struct BlkArgs {
    #[command(flatten)]
    listen: ListenArgs,
    /// Disk image (regular file or block device; raw format).
    #[arg(long)]
    image: PathBuf,
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
    let tap = Tap::open(Some(&args.tap), args.queues)
        .with_context(|| format!("cannot open tap {}", args.tap))?;
    tap.set_up()
        .with_context(|| format!("cannot bring tap {} up", tap.name()))?;
    let config = NetConfig::new(args.mac.unwrap_or(DEFAULT_MAC));
    serve(
        &args.listen,
        Net::new(tap, config),
        "vhost-user-net",
        stop_signals,
    )
}

fn serve_blk(args: BlkArgs, stop_signals: StopSignals) -> anyhow::Result<u8> {
    let mut config = BlockConfig::new(&args.image);
    config.queues = args.queues;
    config.read_only = args.readonly;
    config.direct = args.direct;
    config.logical_block_size = args.block_size;
    let block = Block::new(config).context("cannot open the disk")?;
    serve(&args.listen, block, "vhost-user-blk", stop_signals)
}
