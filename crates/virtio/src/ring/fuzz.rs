//! Fuzz body of the `packed_ring` target: the device side of a packed ring over guest memory
//! that is entirely the input.
//!
//! Input: `[size, mode, memory...]`. The queue has `(size & 63) + 1` entries; `mode` bit 0
//! negotiates EVENT_IDX, bit 1 pops every available buffer before answering them in reverse
//! order (otherwise each is answered as it is popped). The rest becomes the first 64 KiB of
//! guest memory: descriptor ring at 0x0, driver event area at 0x2000, device event area at
//! 0x2004; everything else (descriptors, indirect tables, buffer contents) is where the input's
//! descriptors point.
//!
//! Checked beyond "never panics or hangs": no popped buffer has more buffers than the ring or an
//! indirect table may hold, ids are below the queue size and never in flight twice, the device
//! writes guest memory only in the descriptor ring and its own event area (buffers are read,
//! never written, here), and once every popped buffer is answered the used position has caught
//! up with the avail position (every ring descriptor the device took was handed back).

use std::collections::BTreeSet;
use std::io::Read;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::packed::{PackedQueue, DESCRIPTOR_SIZE, EVENT_SIZE, MAX_INDIRECT_DESCRIPTORS};
use super::Chain;

const MEMORY_SIZE: usize = 0x1_0000;
const DRIVER_EVENT: u64 = 0x2000;
const DEVICE_EVENT: u64 = 0x2004;
/// Bytes read per buffer at most (keeps one input fast).
const READ_LIMIT: usize = 4096;

/// Runs one input (see the module documentation).
pub fn packed_ring(data: &[u8]) {
    let Some((&[size_byte, mode], image)) = data.split_first_chunk::<2>() else {
        return;
    };
    let size = u16::from(size_byte & 63) + 1;
    let Ok(ram) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
        return;
    };
    let len = image.len().min(MEMORY_SIZE);
    ram.write_slice(&image[..len], GuestAddress(0))
        .expect("the image fits the memory");
    let before = snapshot(&ram);
    let mem = sluice_dma::identity(ram.clone());
    let mut queue = PackedQueue::new(
        size,
        GuestAddress(0),
        GuestAddress(DRIVER_EVENT),
        GuestAddress(DEVICE_EVENT),
    );
    queue.set_event_idx(mode & 1 != 0);
    assert!(queue.is_valid(&mem));
    let broken = if mode & 2 != 0 {
        run_batched(&mut queue, &mem)
    } else {
        run_one_by_one(&mut queue, &mem)
    };
    if !broken {
        assert_eq!(
            queue.used_off_wrap(),
            queue.avail_off_wrap(),
            "every ring descriptor taken was handed back"
        );
    }
    check_writes(&before, &snapshot(&ram), size);
}

/// Pops and answers each buffer in turn; true if the ring broke.
fn run_one_by_one(queue: &mut PackedQueue, mem: &sluice_dma::DmaSpace) -> bool {
    for _ in 0..=2 * usize::from(queue.size()) {
        let _ = queue.disable_notification(mem);
        let chain = match queue.pop(mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => break,
            Err(_) => return true,
        };
        let id = chain.id;
        let written = touch(mem, Chain::Packed(chain), queue.size());
        queue
            .add_used(mem, id, written)
            .expect("a popped buffer can be answered");
        let _ = queue.needs_notification(mem);
        let _ = queue.enable_notification(mem);
    }
    false
}

/// Pops everything, then answers in reverse order; true if the ring broke.
fn run_batched(queue: &mut PackedQueue, mem: &sluice_dma::DmaSpace) -> bool {
    let mut popped = Vec::new();
    let mut ids = BTreeSet::new();
    let mut broken = false;
    for _ in 0..=2 * usize::from(queue.size()) {
        match queue.pop(mem) {
            Ok(Some(chain)) => {
                assert!(ids.insert(chain.id), "id {} in flight twice", chain.id);
                popped.push(chain);
            }
            Ok(None) => break,
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    for chain in popped.into_iter().rev() {
        let id = chain.id;
        let written = touch(mem, Chain::Packed(chain), queue.size());
        queue
            .add_used(mem, id, written)
            .expect("a popped buffer can be answered");
    }
    let _ = queue.needs_notification(mem);
    broken
}

/// Checks the chain's shape, reads its readable bytes; returns its writable length (capped).
fn touch(mem: &sluice_dma::DmaSpace, chain: Chain<'_>, size: u16) -> u32 {
    let Chain::Packed(packed) = &chain else {
        unreachable!("only packed chains here");
    };
    assert!(packed.id < size);
    let limit = usize::from(size).max(MAX_INDIRECT_DESCRIPTORS as usize);
    assert!(packed.buffers.len() <= limit);
    if let Ok(mut reader) = chain.reader(mem) {
        let mut scratch = vec![0u8; READ_LIMIT];
        let _ = reader.read(&mut scratch);
    }
    chain.writer(mem).map_or(0, |w| {
        u32::try_from(w.available_bytes().min(READ_LIMIT)).unwrap_or(0)
    })
}

fn snapshot(ram: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = vec![0u8; MEMORY_SIZE];
    ram.read_slice(&mut bytes, GuestAddress(0))
        .expect("the memory is readable");
    bytes
}

/// The device may only have written the descriptor ring and the device event area.
fn check_writes(before: &[u8], after: &[u8], size: u16) {
    let ring_end = usize::from(size) * DESCRIPTOR_SIZE as usize;
    let device_event = DEVICE_EVENT as usize..DEVICE_EVENT as usize + EVENT_SIZE as usize;
    for (at, (old, new)) in before.iter().zip(after).enumerate() {
        if old != new {
            assert!(
                at < ring_end || device_event.contains(&at),
                "the device wrote {at:#x}, outside the ring and its event area"
            );
        }
    }
}
