//! Test helpers shared by the virtio device models' tests: chains published on virtio-queue's
//! `MockSplitQueue` and used entries read back.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

/// Publishes one chain of `(address, length, device_writable)` buffers at descriptor `first`.
pub fn add_chain(
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    first: u16,
    buffers: &[(u64, u32, bool)],
) {
    let descriptors: Vec<RawDescriptor> = buffers
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = first + i as u16 + 1;
            RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
        })
        .collect();
    vq.add_desc_chains(&descriptors, first).unwrap();
}

/// The `(id, len)` of used ring slot `slot`.
pub fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, slot: u16) -> (u32, u32) {
    let elem = vq.used().ring().ref_at(slot.into()).unwrap().load();
    (elem.id(), elem.len())
}
