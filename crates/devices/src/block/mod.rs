//! virtio-blk (virtio 1.2 §5.2): a disk image served to the guest over virtqueues.
//!
//! * [`device`] — [`Block`]: configuration, feature bits, `virtio_blk_config`, activation of
//!   one queue worker per queue (`sluice_virtio::QueueWorker`).
//! * [`request`] — the guest-facing parser: one descriptor chain → a validated [`Request`] or a
//!   [`Rejection`] (error status, or a zero-length used entry when no status byte is usable). A
//!   pure function, with [`parse_request_for_fuzz`] as the fuzz entry point and [`fuzz`] the
//!   body of the `blk_request` target.
//! * [`handler`] — [`BlockQueueHandler`], the per-queue `QueueHandler`: requests become
//!   operations on a `sluice_storage::IoQueue` (io_uring or synchronous) and chains are
//!   answered (status byte, used entry) as the operations complete.
//! * [`trace`] — the request log (`requests=`): every answered chain as the device read it,
//!   with its answer; [`rerun`] re-runs such a log against the device model alone and turns
//!   it into `blk_request` fuzz seeds.
//!
//! The disk image (open, locking, size, block size) and the host I/O are `sluice-storage`'s,
//! shared with NVMe. Ring handling (chains, indirect tables, used ring, EVENT_IDX) is
//! virtio-queue's; guest memory is reached only through the `DmaSpace`, so the model runs
//! unchanged behind vhost-user or an IOMMU. Written here: request validation and the mapping
//! between virtio-blk requests and storage operations.

pub mod device;
pub mod fuzz;
pub mod handler;
pub mod request;
pub mod rerun;
mod scheduled;
pub mod trace;

#[cfg(test)]
mod tests;

pub use device::{Block, BlockConfig, BlockError};
pub use handler::BlockQueueHandler;
pub use request::{
    parse_request, parse_request_for_fuzz, DiskLimits, FuzzOutcome, ParseError, Rejection, Request,
    RequestKind, Status,
};
pub use sluice_storage::{ImageError, IoEngine};
