//! `smp`: brings every CPU of the MADT online and has each add 1 to a shared counter `iters`
//! times with a locked read-modify-write, all at once (they meet at a barrier first). Passes
//! when every listed CPU came up, each reported a distinct APIC id, and the counter holds
//! exactly cpus × iters.

use super::Outcome;
use crate::smp;
use crate::time::{now_ns, Deadline};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

const NO_ID: u32 = u32::MAX;

/// What the CPUs share while they count.
struct Shared {
    counter: AtomicU64,
    arrived: AtomicUsize,
    apic_ids: Vec<AtomicU32>,
    /// The privilege level each CPU counted at.
    rings: Vec<AtomicU8>,
}

/// Waits (bounded) until all `cpus` arrived, so the increments really overlap.
fn meet(shared: &Shared, cpus: usize, timeout_ms: u64) {
    shared.arrived.fetch_add(1, Ordering::AcqRel);
    let deadline = Deadline::after_ms(timeout_ms);
    while shared.arrived.load(Ordering::Acquire) < cpus && !deadline.expired() {
        crate::arch::pause();
    }
}

fn count(shared: &Shared, cpu: usize, cpus: usize, iters: u64, timeout_ms: u64) {
    shared.apic_ids[cpu].store(crate::interrupts::apic_id(), Ordering::Release);
    shared.rings[cpu].store(crate::arch::ring3::current_ring(), Ordering::Release);
    meet(shared, cpus, timeout_ms);
    for _ in 0..iters {
        shared.counter.fetch_add(1, Ordering::AcqRel);
    }
}

fn json_list(values: impl Iterator<Item = u32>) -> String {
    let mut text = String::from("[");
    for (i, value) in values.enumerate() {
        let _ = write!(text, "{}{}", if i == 0 { "" } else { "," }, value);
    }
    text.push(']');
    text
}

fn distinct_and_seen(ids: &[u32]) -> bool {
    ids.iter()
        .enumerate()
        .all(|(i, id)| *id != NO_ID && !ids[..i].contains(id))
}

pub fn run(iters: u64, timeout_ms: u64) -> Outcome {
    let listed = crate::acpi::info().map_or(0, |info| info.lapic_ids.len());
    let bringup_start = now_ns();
    let cpus = smp::start_application_processors(timeout_ms);
    let bringup_ns = now_ns() - bringup_start;
    let shared = Shared {
        counter: AtomicU64::new(0),
        arrived: AtomicUsize::new(0),
        apic_ids: (0..cpus).map(|_| AtomicU32::new(NO_ID)).collect(),
        rings: (0..cpus).map(|_| AtomicU8::new(0)).collect(),
    };
    let start = now_ns();
    smp::run_on_cpus(cpus, timeout_ms, &|cpu| {
        count(&shared, cpu, cpus, iters, timeout_ms)
    });
    let elapsed_ns = now_ns() - start;
    let ids: Vec<u32> = shared
        .apic_ids
        .iter()
        .map(|id| id.load(Ordering::Acquire))
        .collect();
    let counter = shared.counter.load(Ordering::Acquire);
    // The lowest ring any CPU counted at: 3 only if all of them ran in ring 3.
    let ring = shared
        .rings
        .iter()
        .map(|ring| ring.load(Ordering::Acquire))
        .min()
        .unwrap_or(0);
    let expected = cpus as u64 * iters;
    let offline = smp::offline_apic_ids();
    let pass = cpus == listed.max(1) && counter == expected && distinct_and_seen(&ids);
    crate::println!(
        "RESULT {{\"workload\":\"smp\",\"ring\":{},\"cpus\":{},\"cpus_listed\":{},\"apic_ids\":{},\"offline_apic_ids\":{},\"iters\":{},\"counter\":{},\"expected\":{},\"bringup_ns\":{},\"elapsed_ns\":{},\"pass\":{}}}",
        ring,
        cpus,
        listed,
        json_list(ids.iter().copied()),
        json_list(offline.iter().copied()),
        iters,
        counter,
        expected,
        bringup_ns,
        elapsed_ns,
        pass
    );
    if pass {
        Outcome::Pass
    } else {
        Outcome::Fail
    }
}
