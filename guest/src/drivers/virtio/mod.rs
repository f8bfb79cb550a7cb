//! virtio 1.x over PCI (modern interface only).
pub mod blk;
pub mod net;
pub mod rng;
