//! Device drivers. One folder per device family (virtio today; nvme, e1000, vtd can sit beside).

pub mod e1000;
pub mod virtio;
