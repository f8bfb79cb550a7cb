//! Packed ring tests: a driver ([`PackedDriver`]) publishing into real guest memory, the device
//! side popping and answering, and hostile rings.

use std::io::{Read, Write};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::ring::mock::{PackedDriver, F_INDIRECT, F_NEXT, F_WRITE};
use crate::ring::{Chain, VirtQueue};

const RAM_SIZE: u64 = 0x10_0000;
const RING: u64 = 0x1000;
const DATA: u64 = 0x8_0000;

fn memory() -> DmaSpace {
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).unwrap();
    sluice_dma::identity(ram)
}

fn pop(queue: &mut PackedQueue, mem: &DmaSpace) -> PackedChain {
    queue.pop(mem).unwrap().expect("a chain")
}

#[test]
fn empty_ring_has_nothing_available() {
    let mem = memory();
    let driver = PackedDriver::new(&mem, RING, 8);
    let mut queue = driver.queue();

    assert!(queue.is_valid(&mem));
    assert!(!queue.has_available(&mem).unwrap());
    assert_eq!(queue.pop(&mem).unwrap(), None);
}

#[test]
fn chain_is_popped_read_written_and_used() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 8);
    let mut queue = driver.queue();
    mem.write_slice(b"request!", GuestAddress(DATA)).unwrap();
    driver.add_chain(5, &[(DATA, 8, false), (DATA + 0x100, 16, true)]);

    let chain = Chain::Packed(pop(&mut queue, &mem));
    let mut request = [0u8; 8];
    chain
        .reader(&mem)
        .unwrap()
        .read_exact(&mut request)
        .unwrap();
    let mut writer = chain.writer(&mem).unwrap();
    let free = writer.available_bytes();
    writer.write_all(b"answer").unwrap();
    queue.add_used(&mem, chain.head_index(), 6).unwrap();

    assert_eq!(&request, b"request!");
    assert_eq!(free, 16);
    assert_eq!(driver.used(), Some((5, 6)));
    let mut answer = [0u8; 6];
    mem.read_slice(&mut answer, GuestAddress(DATA + 0x100))
        .unwrap();
    assert_eq!(&answer, b"answer");
    assert_eq!(queue.used_count(), 1);
}

#[test]
fn wrap_counters_flip_over_many_laps_with_out_of_order_completion() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 5);
    let mut queue = driver.queue();
    let mut answered = Vec::new();

    // Two buffers of 2 descriptors each per round, completed in reverse order: 4 of 5 slots
    // per round, so positions and wrap counters drift through every offset.
    for round in 0..20u16 {
        let (a, b) = (round % 5, (round + 1) % 5);
        let a = if a == b { (a + 2) % 5 } else { a };
        driver.add_chain(a, &[(DATA, 4, false), (DATA + 0x10, 4, true)]);
        driver.add_chain(b, &[(DATA + 0x20, 4, false), (DATA + 0x30, 8, true)]);
        let first = pop(&mut queue, &mem);
        let second = pop(&mut queue, &mem);
        assert_eq!(queue.pop(&mem).unwrap(), None, "round {round}");
        queue.add_used(&mem, second.id, 8).unwrap();
        queue.add_used(&mem, first.id, 4).unwrap();
        answered.push(driver.used().unwrap());
        answered.push(driver.used().unwrap());
        assert_eq!(driver.used(), None);
        assert_eq!((first.id, second.id), (a, b));
        assert_eq!(answered[answered.len() - 2..], [(b, 8), (a, 4)]);
    }
    assert_eq!(queue.avail_off_wrap(), driver.avail_off_wrap());
    assert_eq!(queue.used_off_wrap(), driver.used_off_wrap());
}

#[test]
fn indirect_table_is_read_as_the_chain() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();
    let table = DATA + 0x1000;
    driver.add_indirect(
        2,
        table,
        &[
            (DATA, 16, false),
            (DATA + 0x40, 512, true),
            (DATA + 0x400, 1, true),
        ],
    );

    let chain = pop(&mut queue, &mem);
    queue.add_used(&mem, chain.id, 513).unwrap();

    assert_eq!(chain.id, 2);
    assert_eq!(chain.buffers.len(), 3);
    assert!(!chain.buffers[0].writable && chain.buffers[1].writable);
    assert_eq!(chain.buffers[1].len, 512);
    assert_eq!(driver.used(), Some((2, 513)));
    // An indirect buffer occupies one ring slot.
    assert_eq!(queue.used_off_wrap(), 1 | 1 << 15);
}

#[test]
fn undo_pop_gives_buffers_back_in_order() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 8);
    let mut queue = driver.queue();
    driver.add_chain(0, &[(DATA, 64, true)]);
    driver.add_chain(1, &[(DATA + 0x100, 64, true), (DATA + 0x200, 64, true)]);

    let _ = pop(&mut queue, &mem);
    let _ = pop(&mut queue, &mem);
    queue.undo_pop();
    queue.undo_pop();
    let again = pop(&mut queue, &mem);

    assert_eq!(again.id, 0);
    assert_eq!(pop(&mut queue, &mem).id, 1);
}

// Hostile rings.

#[test]
fn chain_longer_than_the_ring_is_refused() {
    let mem = memory();
    let driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();
    // Every slot available and chained: the walk would go round for ever.
    for index in 0..4 {
        driver.write_descriptor(index, DATA, 8, 0, driver.available(F_NEXT));
    }

    assert_eq!(queue.pop(&mem), Err(PackedError::ChainTooLong(4)));
}

#[test]
fn chained_or_nested_indirect_descriptors_are_refused() {
    let mem = memory();
    let table = DATA + 0x1000;
    let chained = PackedDriver::new(&mem, RING, 4);
    chained.write_descriptor(0, table, 32, 0, chained.available(F_INDIRECT | F_NEXT));
    let mut queue = chained.queue();
    assert_eq!(queue.pop(&mem), Err(PackedError::BadIndirect));

    let after_buffer = PackedDriver::new(&mem, RING, 4);
    after_buffer.write_descriptor(1, table, 32, 0, after_buffer.available(F_INDIRECT));
    after_buffer.write_descriptor(0, DATA, 8, 0, after_buffer.available(F_NEXT));
    let mut queue = after_buffer.queue();
    assert_eq!(queue.pop(&mem), Err(PackedError::BadIndirect));

    let nested = PackedDriver::new(&mem, RING, 4);
    mem.write_obj(DATA, GuestAddress(table)).unwrap();
    mem.write_obj(16u32, GuestAddress(table + 8)).unwrap();
    mem.write_obj(F_INDIRECT, GuestAddress(table + 14)).unwrap();
    nested.write_descriptor(0, table, 16, 0, nested.available(F_INDIRECT));
    let mut queue = nested.queue();
    assert_eq!(queue.pop(&mem), Err(PackedError::BadIndirect));
}

#[test]
fn bad_indirect_tables_are_refused() {
    let mem = memory();
    let too_many = (MAX_INDIRECT_DESCRIPTORS + 1) * DESCRIPTOR_SIZE as u32;
    let cases = [
        (DATA, 0, PackedError::BadIndirectTable(0)),
        (DATA, 17, PackedError::BadIndirectTable(17)),
        (DATA, too_many, PackedError::BadIndirectTable(too_many)),
        (RAM_SIZE - 16, 32, PackedError::Memory(RAM_SIZE - 16)),
        (u64::MAX - 15, 32, PackedError::Memory(u64::MAX - 15)),
    ];
    for (addr, len, expected) in cases {
        let driver = PackedDriver::new(&mem, RING, 4);
        driver.write_descriptor(0, addr, len, 0, driver.available(F_INDIRECT));
        let mut queue = driver.queue();

        assert_eq!(queue.pop(&mem), Err(expected), "table {addr:#x}+{len}");
    }
}

#[test]
fn ids_out_of_range_or_in_flight_are_refused() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();
    driver.add_chain(4, &[(DATA, 8, true)]);
    assert_eq!(queue.pop(&mem), Err(PackedError::BadId(4)));

    let mut driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();
    driver.add_chain(1, &[(DATA, 8, true)]);
    driver.add_chain(1, &[(DATA, 8, true)]);
    assert_eq!(pop(&mut queue, &mem).id, 1);
    assert_eq!(queue.pop(&mem), Err(PackedError::IdInFlight(1)));
}

#[test]
fn used_entry_for_a_buffer_not_in_flight_is_refused() {
    let mem = memory();
    let driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();

    assert_eq!(queue.add_used(&mem, 2, 0), Err(PackedError::NotInFlight(2)));
    assert_eq!(queue.add_used(&mem, 9, 0), Err(PackedError::BadId(9)));
}

#[test]
fn rings_outside_memory_or_misaligned_are_invalid() {
    let mem = memory();
    let at = |ring: u64, driver: u64, device: u64| {
        PackedQueue::new(
            8,
            GuestAddress(ring),
            GuestAddress(driver),
            GuestAddress(device),
        )
        .is_valid(&mem)
    };

    assert!(at(RING, 0x2000, 0x2004));
    assert!(!at(RAM_SIZE - 64, 0x2000, 0x2004), "ring past the end");
    assert!(!at(RING + 8, 0x2000, 0x2004), "ring misaligned");
    assert!(!at(RING, RAM_SIZE, 0x2004), "driver event outside");
    assert!(!at(RING, 0x2000, 0x2002), "device event misaligned");
    assert!(!at(u64::MAX - 15, 0x2000, 0x2004), "ring address overflows");
    let zero = PackedQueue::new(0, GuestAddress(RING), GuestAddress(0), GuestAddress(4));
    assert!(!zero.is_valid(&mem));
}

#[test]
fn buffers_outside_memory_pop_but_fail_to_map() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();
    driver.add_chain(0, &[(RAM_SIZE - 8, 64, true)]);

    let chain = Chain::Packed(pop(&mut queue, &mem));

    assert!(chain.writer(&mem).is_err());
    assert!(chain.reader(&mem).is_ok(), "no readable buffers");
}

// Event suppression.

#[test]
fn driver_flags_enable_and_disable_interrupts() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 8);
    let mut queue = driver.queue();
    driver.add_chain(0, &[(DATA, 8, true)]);
    let chain = pop(&mut queue, &mem);
    queue.add_used(&mem, chain.id, 0).unwrap();

    driver.set_driver_event(0, 1); // DISABLE
    let disabled = queue.needs_notification(&mem).unwrap();
    driver.set_driver_event(0, 0); // ENABLE
    let enabled = queue.needs_notification(&mem).unwrap();

    assert!(!disabled);
    assert!(enabled);
}

#[test]
fn event_idx_interrupts_only_when_the_event_position_is_crossed() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();
    queue.set_event_idx(true);
    let answer = |queue: &mut PackedQueue, driver: &mut PackedDriver<'_>, id: u16| {
        driver.add_chain(id, &[(DATA, 8, true)]);
        let chain = pop(queue, &mem);
        queue.add_used(&mem, chain.id, 8).unwrap();
        driver.used().unwrap();
    };
    let wrap = 1 << 15;

    // The first call always interrupts (nothing signalled yet).
    answer(&mut queue, &mut driver, 0);
    driver.set_driver_event(wrap | 3, 2);
    let first = queue.needs_notification(&mem).unwrap();
    // Used position 1 -> 2: event at 3 not reached.
    answer(&mut queue, &mut driver, 1);
    let before = queue.needs_notification(&mem).unwrap();
    // 2 -> 3 -> 0 (wrap flips): position 3 of the first lap is written.
    answer(&mut queue, &mut driver, 2);
    answer(&mut queue, &mut driver, 3);
    let crossed = queue.needs_notification(&mem).unwrap();
    // Event at 1 in the second lap (wrap counter 0); used moves 0 -> 1: not yet.
    driver.set_driver_event(1, 2);
    answer(&mut queue, &mut driver, 0);
    let second_lap_before = queue.needs_notification(&mem).unwrap();
    answer(&mut queue, &mut driver, 1);
    let second_lap_at = queue.needs_notification(&mem).unwrap();
    // An event from the wrong lap (wrap counter 1 at position 3, long passed).
    driver.set_driver_event(wrap | 3, 2);
    answer(&mut queue, &mut driver, 2);
    let stale = queue.needs_notification(&mem).unwrap();

    assert!(first);
    assert!(!before);
    assert!(crossed);
    assert!(!second_lap_before);
    assert!(second_lap_at);
    assert!(!stale);
}

#[test]
fn a_whole_lap_since_the_last_signal_always_interrupts() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 2);
    let mut queue = driver.queue();
    queue.set_event_idx(true);
    queue.needs_notification(&mem).unwrap();
    // Event far from anything the device will write, then two laps of used entries.
    driver.set_driver_event(1, 2);
    for id in [0, 1, 0, 1] {
        driver.add_chain(id, &[(DATA, 8, true)]);
        let chain = pop(&mut queue, &mem);
        queue.add_used(&mem, chain.id, 8).unwrap();
        driver.used().unwrap();
    }

    assert!(queue.needs_notification(&mem).unwrap());
}

#[test]
fn device_event_asks_for_kicks_at_the_next_avail_position() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();
    queue.set_event_idx(true);
    for id in 0..3 {
        driver.add_chain(id, &[(DATA, 8, true)]);
    }
    for _ in 0..3 {
        pop(&mut queue, &mem);
    }

    queue.disable_notification(&mem).unwrap();
    let disabled = driver.device_event();
    let raced = queue.enable_notification(&mem).unwrap();
    let enabled = driver.device_event();
    driver.add_chain(3, &[(DATA, 8, true)]);
    let published = queue.enable_notification(&mem).unwrap();

    assert_eq!(disabled.1, 1);
    assert!(!raced);
    assert_eq!(enabled, (3 | 1 << 15, 2));
    assert!(published, "a buffer made available meanwhile is reported");
}

#[test]
fn without_event_idx_enable_asks_for_every_kick() {
    let mem = memory();
    let driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();

    queue.enable_notification(&mem).unwrap();

    assert_eq!(driver.device_event().1, 0);
}

#[test]
fn virtqueue_enum_drives_a_packed_ring() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = VirtQueue::from(driver.queue());
    driver.add_chain(3, &[(DATA, 8, false), (DATA + 8, 8, true)]);
    driver.add_chain(0, &[(DATA + 16, 8, true)]);

    let available = queue.has_available(&mem).unwrap();
    let chains = queue.pop_all(&mem).unwrap();
    for chain in &chains {
        queue.add_used(&mem, chain.head_index(), 1).unwrap();
    }

    assert!(available);
    assert_eq!(
        chains.iter().map(Chain::head_index).collect::<Vec<_>>(),
        [3, 0]
    );
    assert_eq!(queue.used_progress(), 2);
    assert_eq!(driver.used(), Some((3, 1)));
    assert_eq!(driver.used(), Some((0, 1)));
    assert!(queue.is_packed());
}

#[test]
fn writer_split_at_keeps_the_head_and_returns_the_tail() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();
    driver.add_chain(0, &[(DATA, 4, true), (DATA + 0x10, 8, true)]);
    let chain = Chain::Packed(pop(&mut queue, &mem));

    let mut head = chain.writer(&mem).unwrap();
    let mut tail = head.split_at(6).unwrap();
    let too_far = chain.writer(&mem).unwrap().split_at(13);
    tail.write_all(b"TAIL!!").unwrap();
    head.write_all(b"headHD").unwrap();

    assert!(too_far.is_err());
    let mut bytes = [0u8; 4];
    mem.read_slice(&mut bytes, GuestAddress(DATA)).unwrap();
    assert_eq!(&bytes, b"head");
    let mut bytes = [0u8; 8];
    mem.read_slice(&mut bytes, GuestAddress(DATA + 0x10))
        .unwrap();
    assert_eq!(&bytes, b"HDTAIL!!");
}

#[test]
fn used_descriptor_flags_are_written_last_with_the_wrap_bits() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 1);
    let mut queue = driver.queue();
    driver.add_chain(0, &[(DATA, 8, true)]);
    let chain = pop(&mut queue, &mem);
    queue.add_used(&mem, chain.id, 0).unwrap();
    let flags_first_lap: u16 = mem.read_obj(GuestAddress(RING + 14)).unwrap();
    driver.used().unwrap();
    driver.add_chain(0, &[(DATA, 8, true)]);
    let chain = pop(&mut queue, &mem);
    queue.add_used(&mem, chain.id, 8).unwrap();
    let flags_second_lap: u16 = mem.read_obj(GuestAddress(RING + 14)).unwrap();

    assert_eq!(flags_first_lap, 1 << 7 | 1 << 15);
    assert_eq!(flags_second_lap, F_WRITE);
    assert_eq!(driver.used(), Some((0, 8)));
}

#[test]
fn avail_marker_changes_only_when_the_driver_publishes() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 8);
    let mut queue = VirtQueue::Packed(driver.queue());
    driver.add_chain(0, &[(DATA, 16, true)]);
    driver.add_chain(1, &[(DATA + 0x100, 16, true), (DATA + 0x200, 16, true)]);
    let before = queue.avail_marker(&mem).unwrap();
    let position = queue.avail_position();

    // A handler that takes a chain and gives it back (RX without a frame) leaves the marker.
    let _ = queue.pop(&mem).unwrap().expect("a chain");
    queue.undo_pop();
    let declined = queue.avail_marker(&mem).unwrap();
    driver.add_chain(2, &[(DATA + 0x300, 16, true)]);
    let published = queue.avail_marker(&mem).unwrap();

    assert_eq!(before, 3 | 1 << 15, "three available slots, first lap");
    assert_eq!(declined, before);
    assert_eq!(queue.avail_position(), position);
    assert_ne!(published, declined);
}

/// The worker reads the marker, its pass takes a chain, and meanwhile the driver publishes a
/// chain of the same length (with kicks off): the marker must still change, or the worker
/// sleeps on a published chain that no kick will announce.
#[test]
fn avail_marker_changes_when_a_pass_takes_as_many_slots_as_the_driver_publishes() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 8);
    let mut queue = VirtQueue::Packed(driver.queue());
    driver.add_chain(0, &[(DATA, 16, true)]);
    let offered = queue.avail_marker(&mem).unwrap();

    let _ = queue.pop(&mem).unwrap().expect("a chain");
    let taken = queue.avail_marker(&mem).unwrap();
    driver.add_chain(1, &[(DATA + 0x100, 16, true)]);
    let published = queue.avail_marker(&mem).unwrap();

    assert_eq!(taken, offered, "taking buffers is not publishing");
    assert_ne!(published, offered);
}

/// In poll mode a worker whose handler declines the chains reads the marker on every spin: the
/// scan must resume where the last one stopped, not walk the whole run again. Shown by
/// changing a slot the first scan already passed: a rescan from the start would stop there.
#[test]
fn available_end_resumes_where_the_last_scan_stopped() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 8);
    let queue = driver.queue();
    driver.add_chain(0, &[(DATA, 16, true)]);
    driver.add_chain(1, &[(DATA + 0x100, 16, true)]);
    driver.add_chain(2, &[(DATA + 0x200, 16, true)]);
    let first = queue.available_end(&mem).unwrap();
    // Slot 1's flags turn unavailable behind the device's back (no driver does this; only
    // a rescan would look at the slot again).
    driver.write_descriptor(1, DATA + 0x100, 16, 1, 0);

    let second = queue.available_end(&mem).unwrap();
    driver.add_chain(3, &[(DATA + 0x300, 16, true)]);
    let after_publish = queue.available_end(&mem).unwrap();

    assert_eq!(first, 3 | 1 << 15);
    assert_eq!(second, first, "the scan resumed at slot 3");
    assert_eq!(after_publish, 4 | 1 << 15, "new slots are still found");
}

/// The remembered run follows pops and given-back pops: the end stays the driver's frontier.
#[test]
fn available_end_stays_right_across_pops_undos_and_laps() {
    let mem = memory();
    let mut driver = PackedDriver::new(&mem, RING, 4);
    let mut queue = driver.queue();
    driver.add_chain(0, &[(DATA, 16, true), (DATA + 0x100, 16, true)]);
    driver.add_chain(1, &[(DATA + 0x200, 16, true)]);
    let published = queue.available_end(&mem).unwrap();

    let chain = pop(&mut queue, &mem);
    let after_pop = queue.available_end(&mem).unwrap();
    let _ = pop(&mut queue, &mem);
    queue.undo_pop();
    let after_undo = queue.available_end(&mem).unwrap();
    let _ = pop(&mut queue, &mem);
    queue.add_used(&mem, chain.id, 0).unwrap();
    queue.add_used(&mem, 1, 0).unwrap();
    driver.used().unwrap();
    driver.used().unwrap();
    let drained = queue.available_end(&mem).unwrap();
    // The next chain wraps: slot 3, then slot 0 on the second lap.
    driver.add_chain(2, &[(DATA, 16, true), (DATA + 0x100, 16, true)]);
    let wrapped = queue.available_end(&mem).unwrap();

    assert_eq!(published, 3 | 1 << 15);
    assert_eq!(after_pop, published);
    assert_eq!(after_undo, published);
    assert_eq!(drained, 3 | 1 << 15, "nothing available past the last pop");
    assert_eq!(wrapped, 1, "slot 1 of the second lap (wrap counter clear)");
}
