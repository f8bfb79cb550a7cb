//! virtio-net (virtio 1.2 §5.1, device type 1) over a Linux tap device.
//!
//! Queue order is the spec's: `rx0, tx0, rx1, tx1, ..., ctrl` (ctrl only with multiqueue).
//! Each queue pair owns one tap queue file descriptor (`IFF_MULTI_QUEUE`).
//!
//! * [`header`] parses and serialises `virtio_net_hdr_v1`. It is the guest-facing parser: every
//!   TX header is validated against the negotiated offloads before the kernel sees it; it is a
//!   pure function ([`header::parse_tx_packet`]) so a fuzz target can call it on arbitrary bytes
//!   ([`fuzz`] is the body of the `net_header` target).
//! * [`backend`] opens the tap (`/dev/net/tun`, `IFF_VNET_HDR` so the header passes through to
//!   the kernel unchanged, non-blocking) — a handful of ioctls, written with libc directly.
//! * [`handlers`] has the TX, RX and control queue handlers: TX copies header + frame out of the
//!   chain and writes it to the tap; RX reads frames from the tap into posted buffers (spread over
//!   several chains with `MRG_RXBUF`) and leaves frames in the tap while no buffers are posted;
//!   its completion fd is a private one-shot epoll over the tap fd (re-armed only while it can
//!   take packets) so the level-triggered worker never spins on a tap it cannot drain. The
//!   control queue answers `MQ_VQ_PAIRS_SET` (attaching/detaching tap queues), `RX` mode and
//!   `MAC` table commands.
//! * [`device`] is the [`sluice_virtio::VirtioDevice`]: features, config space, a handler per
//!   queue role; [`tap_queues`] attaches tap queues only while their RX ring runs.
//!
//! Frames are copied once in each direction (chain ↔ a per-handler buffer) because virtio-queue's
//! `Reader`/`Writer` expose bounds-checked copies, not iovecs; a frame is at most 64 KiB.

pub mod backend;
pub mod device;
pub mod fuzz;
pub mod handlers;
pub mod header;
pub mod mac;
mod scheduled_tx;
pub mod tap_queues;

#[cfg(test)]
mod tests;

pub use backend::{Tap, TapError};
pub use device::{
    sanitize_features, tun_offload_flags, Net, NetConfig, QueueRole, SavedNet, NET_QUEUE_SIZE,
};
pub use handlers::{
    deliver_packet, CtrlHandler, CtrlState, Delivery, NetBackend, RxHandler, TxHandler,
};
pub use header::{parse_tx_packet, HeaderError, NetHeader, TxOffloads, NET_HDR_LEN};
pub use mac::parse_mac;
