//! Sharing one block backend between guests (issue 16): the scheduler that sits between the
//! virtqueues of every guest served by one `sluice serve blk` (or joined from `sluice run`)
//! and the storage.
//!
//! * [`scheduler`] — [`Scheduler`]: weighted fair queuing across guests, token buckets for
//!   IOPS and bandwidth per guest and per device (burst + sustained), ioprio classes inside a
//!   guest, the ordering virtio-blk needs (FLUSH after the writes it covers, overlapping
//!   writes in order), no head-of-line blocking, bounded queues; pure, on an injected clock.
//! * [`bucket`] — the token bucket.
//! * [`shared`] — [`Qos`] / [`QueuePort`]: the scheduler shared by queue worker threads,
//!   grants handed to other workers through eventfds, a ticker for bucket refills.
//! * [`config`] — the `--qos` / `--qos-device` option strings.
//!
//! Hand-written: the crates that rate-limit (`governor`, `leaky-bucket`, `ratelimit`) are
//! async or single-bucket limiters that sleep the caller; none queues requests from many
//! owners, picks by weight and priority, or knows that a FLUSH must wait for earlier writes.
//! Here a request that may not go stays queued and its worker goes on with others, and a
//! grant wakes exactly the worker that owns the request.

pub mod bucket;
pub mod config;
pub mod fuzz;
pub mod scheduler;
pub mod shared;

pub use bucket::{Rate, TokenBucket};
pub use config::{apply_device, apply_guest, parse_device, parse_guest};
pub use scheduler::{
    Access, Class, DeviceConfig, GuestConfig, GuestId, GuestStats, QueueFull, QueueId, Request,
    Scheduler, DELAY_BUCKETS,
};
pub use shared::{stats_json, Qos, QueuePort};

/// Time in nanoseconds from an arbitrary start (the scheduler only compares and subtracts).
pub type Nanos = u64;

#[cfg(test)]
mod tests;
