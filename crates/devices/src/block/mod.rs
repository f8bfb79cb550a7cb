//! virtio-blk (virtio 1.2 §5.2): a disk image served to the guest over virtqueues.
//!
//! * [`device`] — [`Block`]: configuration, feature bits, `virtio_blk_config`, activation of
//!   one queue worker per queue (`sluice_virtio::QueueWorker`).
//! * [`request`] — the guest-facing parser: one descriptor chain → a validated [`Request`] or a
//!   [`Rejection`] (error status, or a zero-length used entry when no status byte is usable). A
//!   pure function, with [`parse_request_for_fuzz`] as the fuzz entry point and [`fuzz`] the
//!   body of the `blk_request` target.
//! * [`handler`] — [`BlockQueueHandler`], the per-queue `QueueHandler`: batched io_uring
//!   submission with an eventfd for completions, or a synchronous fallback.
//! * [`backend`] — the image file (open, `flock`, size) and the host I/O calls.
//!
//! Ring handling (chains, indirect tables, used ring, EVENT_IDX) is virtio-queue's; guest memory
//! is reached only through the `DmaSpace`, so the model runs unchanged behind vhost-user or an
//! IOMMU. Written here: request validation, the io_uring submission/completion bookkeeping
//! (no maintained crate does virtio-blk over io_uring on a `DmaSpace`), and the file backend.

pub mod backend;
pub mod device;
pub mod fuzz;
pub mod handler;
pub mod request;

#[cfg(test)]
mod tests;

pub use device::{Block, BlockConfig, BlockError};
pub use handler::{BlockQueueHandler, IoEngine};
pub use request::{
    parse_request, parse_request_for_fuzz, DiskLimits, FuzzOutcome, ParseError, Rejection, Request,
    RequestKind, Status,
};
