//! Device drivers. One folder per device family (virtio, nvme; e1000, vtd can sit beside).

pub mod nvme;
pub mod virtio;
