//! `sluice serve`: sluice's device models served to other VMMs over vhost-user.
//!
//! Each listens on `--socket PATH` and serves one frontend at a time, until killed; the protocol
//! side is `sluice_vhost`.
//! * `sluice serve blk --socket PATH --image FILE [--queues N] [--readonly] [--direct]
//!   [--block-size N]`: the virtio-blk model over a raw image (QEMU's `vhost-user-blk-pci`).
//! * `sluice serve net --socket PATH --tap NAME [--queues N] [--mac MAC]`: the virtio-net model
//!   over a tap with N queue pairs, created if missing (QEMU's `-netdev vhost-user`). The tap is
//!   brought up; its addresses are the host's business.
//! * `sluice serve rng --socket PATH`: the virtio-rng model (QEMU's `vhost-user-rng-pci`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use sluice_devices::block::{Block, BlockConfig};
use sluice_devices::net::{parse_mac, Net, NetConfig, Tap};
use sluice_devices::rng::Rng;
use sluice_vhost::Server;
use sluice_virtio::VirtioDevice;

/// The MAC the backend reports when `--mac` is not given (QEMU uses its own `mac=` anyway).
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

#[derive(Args)]
pub struct ServeArgs {
    #[command(subcommand)]
    device: ServedDeviceArgs,
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
    /// The vhost-user socket to listen on (replaced if it exists).
    #[arg(long)]
    socket: PathBuf,
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
    /// The vhost-user socket to listen on (replaced if it exists).
    #[arg(long)]
    socket: PathBuf,
}

#[derive(Args)]
struct BlkArgs {
    /// The vhost-user socket to listen on (replaced if it exists).
    #[arg(long)]
    socket: PathBuf,
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

/// Runs `sluice serve ...`; returns only on error.
pub fn run(args: ServeArgs) -> anyhow::Result<u8> {
    match args.device {
        ServedDeviceArgs::Blk(blk) => serve_blk(blk),
        ServedDeviceArgs::Net(net) => serve_net(net),
        ServedDeviceArgs::Rng(rng) => serve(&rng.socket, Rng::new(), "vhost-user-rng"),
    }
}

/// Listens on `socket` and serves `device` until killed.
fn serve<D: VirtioDevice>(socket: &Path, device: D, what: &str) -> anyhow::Result<u8> {
    let server = Server::bind(socket, device)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    tracing::info!("{what}: listening on {}", socket.display());
    server.run().context("vhost-user server failed")?;
    Ok(0)
}

fn serve_net(args: NetArgs) -> anyhow::Result<u8> {
    let tap = Tap::open(Some(&args.tap), args.queues)
        .with_context(|| format!("cannot open tap {}", args.tap))?;
    tap.set_up()
        .with_context(|| format!("cannot bring tap {} up", tap.name()))?;
    let config = NetConfig {
        mac: args.mac.unwrap_or(DEFAULT_MAC),
        mtu: None,
    };
    serve(&args.socket, Net::new(tap, config), "vhost-user-net")
}

fn serve_blk(args: BlkArgs) -> anyhow::Result<u8> {
    let mut config = BlockConfig::new(&args.image);
    config.queues = args.queues;
    config.read_only = args.readonly;
    config.direct = args.direct;
    config.logical_block_size = args.block_size;
    let block = Block::new(config).context("cannot open the disk")?;
    serve(&args.socket, block, "vhost-user-blk")
}
