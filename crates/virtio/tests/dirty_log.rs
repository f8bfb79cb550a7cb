//! The live migration's device dirty log (sluice_dma::dirty) sees what a virtio device writes:
//! popping a chain marks its device-writable buffers (and only those), answering it marks the
//! used ring. Its own test binary: the log is process-wide.

use std::sync::Arc;

use sluice_dma::dirty::{PageLog, RamRegion};
use sluice_virtio::ring::VirtQueue;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const RAM: u64 = 0x10_0000;
const RING: u64 = 0x1000;

#[test]
fn popping_marks_writable_buffers_and_answering_marks_the_used_ring() {
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let mem = sluice_dma::identity(ram);
    let driver = MockSplitQueue::create(&mem, GuestAddress(RING), 16);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    driver
        .add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x8_0000, 0x200, next, 1)),
                RawDescriptor::from(Descriptor::new(0x9_0ff0, 0x20, next | write, 2)),
                RawDescriptor::from(Descriptor::new(0xa_0000, 1, write, 0)),
            ],
            0,
        )
        .unwrap();
    let mut queue = VirtQueue::from(driver.create_queue::<Queue>().unwrap());
    let log = Arc::new(PageLog::new(
        vec![RamRegion {
            gpa: 0,
            len: RAM,
            file_offset: 0,
        }],
        RAM,
    ));
    sluice_dma::dirty::start(log.clone());

    let chain = queue.pop(&mem).unwrap().expect("a chain");
    let popped = log.take_round();
    queue.add_used(&mem, chain.head_index(), 1).unwrap();
    let answered = log.take_round();
    sluice_dma::dirty::stop();
    queue.add_used(&mem, chain.head_index(), 1).unwrap();

    // 0x9_0ff0 + 0x20 straddles pages 0x90 and 0x91; the readable 0x8_0000 is not marked.
    assert_eq!(popped, vec![0x90, 0x91, 0xa0]);
    let used_page = driver.used_addr().0 >> 12;
    assert_eq!(answered, vec![used_page]);
    assert!(
        log.take_round().is_empty(),
        "nothing is marked once stopped"
    );
    let mut everything = vec![0x90, 0x91, 0xa0, used_page];
    everything.sort_unstable();
    assert_eq!(log.take_sticky(), everything);
}
