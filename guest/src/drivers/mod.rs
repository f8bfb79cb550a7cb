//! Device drivers. One module per device family (virtio, nvme, e1000, the TPM's CRB; vtd can sit beside).

pub mod e1000;
pub mod nvme;
pub mod tpm;
pub mod virtio;
pub mod vtd;
