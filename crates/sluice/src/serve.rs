//! `sluice serve`: sluice's device models served to other VMMs over vhost-user.
//!
//! `sluice serve blk --socket PATH --image FILE [--queues N] [--readonly] [--direct]` listens on
//! PATH and serves the virtio-blk model over the image to one frontend at a time (QEMU's
//! `vhost-user-blk-pci`), until killed. The protocol side is `sluice_vhost`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use sluice_devices::block::{Block, BlockConfig};
use sluice_vhost::Server;

#[derive(Args)]
pub struct ServeArgs {
    #[command(subcommand)]
    device: ServedDeviceArgs,
}

#[derive(Subcommand)]
enum ServedDeviceArgs {
    /// A virtio-blk disk (vhost-user-blk).
    Blk(BlkArgs),
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
}

/// Runs `sluice serve ...`; returns only on error.
pub fn run(args: ServeArgs) -> anyhow::Result<u8> {
    match args.device {
        ServedDeviceArgs::Blk(blk) => serve_blk(blk),
    }
}

fn serve_blk(args: BlkArgs) -> anyhow::Result<u8> {
    let mut config = BlockConfig::new(&args.image);
    config.queues = args.queues;
    config.read_only = args.readonly;
    config.direct = args.direct;
    let block = Block::new(config).context("cannot open the disk")?;
    let server = Server::bind(&args.socket, block)
        .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
    tracing::info!("vhost-user-blk: listening on {}", args.socket.display());
    server.run().context("vhost-user server failed")?;
    Ok(0)
}
