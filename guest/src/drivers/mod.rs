//! Device drivers. One module per device family (virtio, nvme, e1000; vtd can sit beside).

pub mod e1000;
pub mod nvme;
pub mod virtio;
pub mod vtd;
