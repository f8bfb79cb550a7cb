//! Block storage for sluice's disk devices, shared by virtio-blk and (next) NVMe: the device
//! models keep only their protocol (parsing, status codes), this crate does the host side.
//!
//! * [`image`] — [`DiskImage`]: open read-write or read-only, page cache or O_DIRECT; lock it
//!   so that neither QEMU nor another sluice can write it meanwhile ([`lock`], QEMU's own OFD
//!   byte-range protocol); its size; the logical block size the host needs.
//! * [`queue`] — [`IoQueue`], the per-queue I/O engine: tagged reads and writes straight into
//!   guest memory ([`sluice_dma::GuestIovecs`]), flush, discard and write zeroes (fallocate),
//!   on an io_uring ring per queue with an eventfd for the device's event loop, or
//!   synchronously where io_uring is unavailable. Every operation completes exactly once.
//! * [`sync_io`] — the synchronous calls (the fallback engine, and the slow path for short
//!   transfers, buffers O_DIRECT refuses, file systems without fallocate modes).
//!
//! Hand-written on the `io-uring` crate and `libc`: async runtimes built on io_uring own their
//! thread and buffers, while each device queue here runs in its own worker loop on guest
//! memory; and nothing maintained speaks QEMU's image-locking protocol.

pub mod image;
pub mod lock;
pub mod queue;
pub mod sync_io;

pub use image::{DirectAlignment, DiskImage, ImageError, MAX_BLOCK_SIZE, SECTOR_SIZE};
pub use lock::{LockError, Permission};
pub use queue::{io_uring_available, Extent, IoCompletion, IoEngine, IoOp, IoQueue};
