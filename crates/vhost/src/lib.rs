//! vhost-user backend serving any `sluice_virtio::VirtioDevice` to QEMU and other frontends
//! (the models themselves live in `sluice-devices`, which this crate does not depend on).
//!
//! * [`server`] — [`Server`]: the listening socket, a thread per connection with limits and
//!   timeouts, one owner of the device at a time; a refused message drops only that
//!   connection.
//! * [`backend`] — [`Backend`]: the device side of the protocol (features, memory table, rings,
//!   config space, inflight area) as a `vhost` crate `VhostUserBackendReqHandlerMut`; each ring
//!   runs on a `sluice_virtio::QueueWorker` with the model's own `queue_handler`, over a
//!   `sluice_dma::DmaSpace` built from the frontend's memory — the model does not know it runs
//!   behind vhost-user.
//! * [`iotlb`] — the device IOTLB for frontends with a vIOMMU (VIRTIO_F_ACCESS_PLATFORM):
//!   IOTLB_MSG updates and invalidations, MISS on the backend request channel.
//! * [`dirty_log`] — VHOST_USER_SET_LOG_BASE: the frontend's migration dirty log, validated,
//!   mapped, and fed by the queues' device writes while VHOST_F_LOG_ALL is negotiated.
//! * [`memory`] — the frontend's regions, mapped and validated; user address → GPA.
//! * [`inflight`] — the INFLIGHT_SHMFD area and crash recovery (split rings);
//!   [`inflight_packed`] — its packed-ring form.
//! * [`tracking`] — the handler wrapper that keeps the inflight area up to date.
//! * [`sigbus`] — survives a frontend shrinking the memory it shared (SIGBUS → zero page and
//!   a dropped connection).
//!
//! Built on the `vhost` crate for the wire protocol (message parsing, fd passing, replies).
//! The `vhost-user-backend` crate is not used: it has no inflight tracking and its ring
//! threads would replace sluice's queue workers and notification policies. Written here: the
//! device state machine, memory mapping, and inflight tracking/recovery.

pub mod backend;
pub mod dirty_log;
pub mod fuzz;
pub mod inflight;
pub mod inflight_packed;
pub mod iotlb;
pub mod memory;
pub mod server;
pub mod sigbus;
pub mod tracking;

pub use backend::{
    offered_protocol_features, Backend, ConnectionResources, DeviceClaim, FEATURE_RING_PACKED,
    VHOST_USER_F_PROTOCOL_FEATURES,
};
pub use inflight::{queue_region_size, InflightArea, QueueInflight, Recovery, RingLayout};
pub use memory::{MemoryError, MemoryTable, MAX_MEM_SLOTS};
pub use server::{ConnectionEnd, Limits, Server, SocketRemover};
