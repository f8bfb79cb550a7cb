//! Fuzz body of `fuzz/fuzz_targets/virtio_iommu_request.rs` (re-exported as
//! `sluice_iommu::fuzz::virtio_iommu_request`): a stream of guest requests to one virtio-iommu
//! that is the provider of a VM's `DmaSpaces`, with DMA by the endpoints after each request.
//!
//! Input: `[features][ops...]`; features bit 0 MAP_UNMAP, bit 1 PROBE, bit 2 BYPASS_CONFIG
//! negotiated; an op is `[len][len bytes]`: the request's device-readable bytes as the driver
//! wrote them (cut short if the input ends). Endpoints 0x10 and 0x18 exist; at most 8 domains
//! and 64 mappings; 64 KiB of guest RAM.
//!
//! Must hold besides "no panic": the mapping count stays under its cap; after a MAP that
//! succeeded with READ into RAM, every endpoint of the domain reads its first byte; after an
//! UNMAP or DETACH that succeeded, the endpoints it concerns can no longer read the unmapped
//! IOVA (their cached translations were dropped), since bypass stays off.

use std::sync::Arc;

use sluice_dma::DmaSpaces;
use sluice_virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{F_BYPASS_CONFIG, F_MAP_UNMAP, F_PROBE, PROBE_SIZE};
use super::domains::Limits;
use super::request::{parse, Request, Status, MAP_F_READ};
use super::VirtioIommu;

const MEMORY_SIZE: u64 = 64 << 10;
const ENDPOINTS: [u16; 2] = [0x10, 0x18];
const MAX_MAPPINGS: usize = 64;

/// The fuzz target body.
pub fn virtio_iommu_request(data: &[u8]) {
    run_requests(data);
}

/// Plays the input; returns each request's status (for the corpus checks).
pub fn run_requests(data: &[u8]) -> Vec<Status> {
    let mut statuses = Vec::new();
    let Some((&features, mut rest)) = data.split_first() else {
        return statuses;
    };
    let Ok(memory) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)])
    else {
        return statuses;
    };
    let limits = Limits {
        max_domains: 8,
        max_mappings: MAX_MAPPINGS,
        ..Limits::default()
    };
    let mut iommu = VirtioIommu::new(limits, false);
    let spaces = Arc::new(DmaSpaces::with_iommu(
        memory.clone(),
        Arc::new(iommu.clone()),
    ));
    iommu.attach_spaces(&spaces);
    iommu.set_endpoints(ENDPOINTS);
    let mut negotiated = 0u64;
    for (bit, feature) in [F_MAP_UNMAP, F_PROBE, F_BYPASS_CONFIG]
        .into_iter()
        .enumerate()
    {
        if features & (1 << bit) != 0 {
            negotiated |= 1 << feature;
        }
    }
    if iommu.ack_features(negotiated).is_err() {
        return statuses;
    }

    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        let (status, _) = iommu.handle_request(bytes, PROBE_SIZE as usize);
        statuses.push(status);
        assert!(iommu.mapping_count() <= MAX_MAPPINGS, "mapping cap broken");
        if status == Status::Ok {
            if let Ok(request) = parse(bytes) {
                check_effect(&iommu, &spaces, &request);
            }
        }
    }
    statuses
}

/// A one-byte DMA read by `endpoint` at `iova`.
fn reads(spaces: &DmaSpaces, endpoint: u16, iova: u64) -> bool {
    spaces
        .space(endpoint)
        .read_obj::<u8>(GuestAddress(iova))
        .is_ok()
}

fn check_effect(iommu: &VirtioIommu, spaces: &DmaSpaces, request: &Request) {
    let in_domain = |domain: u32| {
        ENDPOINTS
            .into_iter()
            .filter(move |&e| iommu.domain_of(u32::from(e)) == Some(domain))
    };
    match *request {
        Request::Map {
            domain,
            virt_start,
            phys_start,
            flags,
            ..
        } if flags & MAP_F_READ != 0 && phys_start < MEMORY_SIZE => {
            for endpoint in in_domain(domain) {
                assert!(
                    reads(spaces, endpoint, virt_start),
                    "{endpoint:#x} cannot read a fresh mapping at {virt_start:#x}"
                );
            }
        }
        Request::Unmap {
            domain, virt_start, ..
        } => {
            for endpoint in in_domain(domain) {
                assert!(
                    !reads(spaces, endpoint, virt_start),
                    "{endpoint:#x} still reads {virt_start:#x} after UNMAP"
                );
            }
        }
        Request::Detach { endpoint, .. } => {
            let endpoint = endpoint as u16;
            for iova in [0, 0x1000, MEMORY_SIZE - 1] {
                assert!(
                    !reads(spaces, endpoint, iova),
                    "{endpoint:#x} still reads {iova:#x} after DETACH"
                );
            }
        }
        _ => {}
    }
}
