//! The packed inflight region: journal steps, crashes at each point, and hostile contents.

use super::*;
use crate::inflight::{InflightArea, RingLayout};

const RING: u16 = 8;
const START: u16 = WRAP_BIT; // index 0, wrap counter set
/// Ring flags of a slot the driver made available on the first lap / the device used.
const AVAILABLE_FIRST_LAP: u16 = 1 << 7;
const USED_FIRST_LAP: u16 = 1 << 7 | 1 << 15;

fn area() -> InflightArea {
    InflightArea::allocate_for(1, RING, RingLayout::Packed)
        .unwrap()
        .0
}

/// `count` descriptors of buffer `id` (the last one carries the id the driver answers by).
fn chain(id: u16, count: u16) -> Vec<RingDescriptor> {
    (0..count)
        .map(|i| RingDescriptor {
            addr: 0x1000 * u64::from(id) + 0x100 * u64::from(i),
            len: 512,
            id,
            flags: if i + 1 < count { 1 } else { 2 },
        })
        .collect()
}

fn no_ring(_: u16) -> Option<u16> {
    Some(AVAILABLE_FIRST_LAP)
}

#[test]
fn a_fresh_region_takes_the_frontend_base() {
    let area = area();
    let queue = area.packed_queue(0).unwrap();

    let recovery = queue.recover(RING, (3 | WRAP_BIT, 3 | WRAP_BIT), no_ring);

    assert_eq!(recovery.avail, 3 | WRAP_BIT);
    assert_eq!(recovery.used, 3 | WRAP_BIT);
    assert!(recovery.chains.is_empty());
    assert_eq!(queue.version(), INFLIGHT_VERSION);
}

/// Three buffers popped, the middle one answered out of order, then the backend dies: the
/// next one gets the other two back in pop order with their descriptors, the used position
/// past the answered one, and the avail position past everything popped.
#[test]
fn buffers_in_flight_come_back_in_pop_order_after_a_crash() {
    let area = area();
    let queue = area.packed_queue(0).unwrap();
    queue.recover(RING, (START, START), no_ring);
    queue.popped(4, &chain(4, 2)).unwrap();
    queue.popped(1, &chain(1, 3)).unwrap();
    queue.popped(6, &chain(6, 1)).unwrap();
    queue.using(1, 3 | WRAP_BIT);
    queue.used(1);

    let reborn = area.packed_queue(0).unwrap();
    let recovery = reborn.recover(RING, (START, START), no_ring);

    assert_eq!(recovery.chains, vec![chain(4, 2), chain(6, 1)]);
    assert_eq!(recovery.used, 3 | WRAP_BIT, "past buffer 1's three slots");
    assert_eq!(recovery.avail, 6 | WRAP_BIT, "used + 2 + 1 still in flight");
}

/// The backend dies after moving `used_idx` but before the used descriptor's flags: the step
/// is rolled back and the buffer is resubmitted.
#[test]
fn a_used_step_that_did_not_reach_the_ring_is_rolled_back() {
    let area = area();
    let queue = area.packed_queue(0).unwrap();
    queue.recover(RING, (START, START), no_ring);
    queue.popped(2, &chain(2, 2)).unwrap();
    queue.using(2, 2 | WRAP_BIT);

    let reborn = area.packed_queue(0).unwrap();
    let recovery = reborn.recover(RING, (START, START), |_| Some(AVAILABLE_FIRST_LAP));

    assert_eq!(recovery.chains, vec![chain(2, 2)]);
    assert_eq!(recovery.used, START);
    assert_eq!(recovery.avail, 2 | WRAP_BIT);
}

/// The backend dies after the used descriptor's flags reached the ring but before the step
/// was committed: the step is committed, the buffer is not resubmitted.
#[test]
fn a_used_step_that_reached_the_ring_is_committed() {
    let area = area();
    let queue = area.packed_queue(0).unwrap();
    queue.recover(RING, (START, START), no_ring);
    queue.popped(2, &chain(2, 2)).unwrap();
    queue.popped(5, &chain(5, 1)).unwrap();
    queue.using(2, 2 | WRAP_BIT);

    let reborn = area.packed_queue(0).unwrap();
    let recovery = reborn.recover(RING, (START, START), |slot| {
        Some(if slot == 0 {
            USED_FIRST_LAP
        } else {
            AVAILABLE_FIRST_LAP
        })
    });

    assert_eq!(recovery.chains, vec![chain(5, 1)]);
    assert_eq!(recovery.used, 2 | WRAP_BIT);
    assert_eq!(recovery.avail, 3 | WRAP_BIT);
}

/// A pop that did not commit (the backend died while copying the descriptors) leaves its
/// entries on the free list: not resubmitted, and the ring position stays before it.
#[test]
fn a_pop_that_did_not_commit_is_not_resubmitted() {
    let area = area();
    let queue = area.packed_queue(0).unwrap();
    queue.recover(RING, (START, START), no_ring);
    queue.popped(0, &chain(0, 1)).unwrap();
    let committed_free_head = queue.load::<u16>(FREE_HEAD);
    queue.popped(3, &chain(3, 2)).unwrap();
    // Undo the commit of the second pop only, as if the process died just before it.
    queue.store(FREE_HEAD, committed_free_head);
    queue.store(OLD_FREE_HEAD, committed_free_head);

    let reborn = area.packed_queue(0).unwrap();
    let recovery = reborn.recover(RING, (START, START), no_ring);

    assert_eq!(recovery.chains, vec![chain(0, 1)]);
    assert_eq!(recovery.avail, 1 | WRAP_BIT);
}

/// Positions wrap: buffers popped across the end of the ring put the avail position on the
/// next lap.
#[test]
fn the_avail_position_wraps_with_the_buffers_in_flight() {
    let area = area();
    let queue = area.packed_queue(0).unwrap();
    queue.recover(RING, (6 | WRAP_BIT, 6 | WRAP_BIT), no_ring);
    queue.popped(7, &chain(7, 3)).unwrap();

    let reborn = area.packed_queue(0).unwrap();
    let recovery = reborn.recover(RING, (0, 0), no_ring);

    assert_eq!(recovery.used, 6 | WRAP_BIT);
    assert_eq!(recovery.avail, 1, "slot 1, second lap (wrap counter clear)");
}

/// A given-back pop and completed buffers return their entries: a whole ring's worth of
/// buffers can be in flight again and again without running out of entries.
#[test]
fn entries_are_reused_without_leaking() {
    let area = area();
    let queue = area.packed_queue(0).unwrap();
    queue.recover(RING, (START, START), no_ring);
    for round in 0..10u16 {
        queue.popped(0, &chain(0, 4)).unwrap();
        queue.popped(1, &chain(1, 4)).unwrap();
        queue.unpopped(1);
        queue.popped(1, &chain(1, 4)).unwrap();
        queue.using(0, round);
        queue.used(0);
        queue.using(1, round);
        queue.used(1);
    }

    let reborn = area.packed_queue(0).unwrap();
    let recovery = reborn.recover(RING, (START, START), no_ring);

    assert!(recovery.chains.is_empty());
    assert!(queue.popped(2, &chain(2, 8)).is_ok(), "all 8 entries free");
}

/// More descriptors than the region has entries cannot be journaled: the pop fails (and the
/// ring with it) instead of going untracked.
#[test]
fn a_pop_the_region_cannot_hold_is_refused() {
    let area = area();
    let queue = area.packed_queue(0).unwrap();
    queue.recover(RING, (START, START), no_ring);
    queue.popped(0, &chain(0, 6)).unwrap();

    assert_eq!(queue.popped(1, &chain(1, 3)), Err(PackedError::Journal(1)));
    assert_eq!(
        queue.popped(0, &chain(0, 1)),
        Err(PackedError::Journal(0)),
        "0 in flight"
    );
    assert_eq!(
        queue.popped(9, &chain(9, 1)),
        Err(PackedError::Journal(9)),
        "id past the area"
    );
}

/// Whatever the frontend writes into the region, recovery neither panics nor hands back more
/// descriptors than the ring holds.
#[test]
fn hostile_region_contents_are_survived() {
    let area = area();
    let queue = area.packed_queue(0).unwrap();
    let size = queue_region_size(RING);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..200 {
        for offset in 0..size {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            queue.store(offset, state as u8);
        }
        queue.store(VERSION, INFLIGHT_VERSION);

        let recovery = queue.recover(RING, (START, START), |slot| Some(slot.wrapping_mul(31)));

        let slots: usize = recovery.chains.iter().map(Vec::len).sum();
        assert!(slots <= usize::from(RING));
        assert!(index_of(recovery.used) < RING && index_of(recovery.avail) < RING);
    }
}
