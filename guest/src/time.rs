//! Monotonic time from the TSC. Its frequency comes from CPUID 0x15 (crystal ratio), the
//! hypervisor leaf 0x40000010, or is measured against the ACPI PM timer (3.579545 MHz), else
//! the PIT channel 2. Every wait in the kit uses `Deadline`.

use crate::arch::{cpuid, inb, inl, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

const PM_TIMER_HZ: u64 = 3_579_545;
const PIT_HZ: u64 = 1_193_182;
/// Fallback when nothing can be measured: a plausible modern TSC.
const DEFAULT_TSC_HZ: u64 = 2_000_000_000;

static TSC_START: AtomicU64 = AtomicU64::new(0);
/// ns per tick as a 32.32 fixed-point number.
static NS_PER_TICK_FP: AtomicU64 = AtomicU64::new(1 << 32);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// `clock=virtual`: nanoseconds of the virtual clock, advanced by [`VIRTUAL_STEP_NS`] on every
/// read instead of reading the TSC (u64::MAX = the TSC clock is in use).
static VIRTUAL_NOW: AtomicU64 = AtomicU64::new(u64::MAX);
/// How far one read of the virtual clock advances it: a 5 s deadline is 5 million reads.
const VIRTUAL_STEP_NS: u64 = 1_000;

fn from_cpuid_15() -> Option<u64> {
    if cpuid(0, 0)[0] < 0x15 {
        return None;
    }
    let [denominator, numerator, crystal, _] = cpuid(0x15, 0);
    (denominator != 0 && numerator != 0 && crystal != 0)
        .then(|| u64::from(crystal) * u64::from(numerator) / u64::from(denominator))
}

fn from_hypervisor_leaf() -> Option<u64> {
    if cpuid(1, 0)[2] & (1 << 31) == 0 {
        return None;
    }
    if cpuid(0x4000_0000, 0)[0] < 0x4000_0010 {
        return None;
    }
    let khz = cpuid(0x4000_0010, 0)[0];
    (khz != 0).then(|| u64::from(khz) * 1000)
}

fn read_pm_timer(port: u16, wide: bool) -> u64 {
    u64::from(inl(port)) & if wide { 0xffff_ffff } else { 0x00ff_ffff }
}

/// Counts TSC ticks over ~10 ms of PM timer.
fn from_pm_timer() -> Option<u64> {
    let (port, wide) = crate::acpi::info()?.pm_timer?;
    let mask = if wide { 0xffff_ffff } else { 0x00ff_ffff };
    let target = PM_TIMER_HZ / 100;
    let start = read_pm_timer(port, wide);
    let tsc_start = rdtsc();
    let mut spins = 0u64;
    loop {
        let now = read_pm_timer(port, wide);
        let elapsed = now.wrapping_sub(start) & mask;
        if elapsed >= target {
            let ticks = rdtsc() - tsc_start;
            return Some(ticks * PM_TIMER_HZ / elapsed);
        }
        spins += 1;
        if spins > 50_000_000 {
            return None;
        }
    }
}

/// Counts TSC ticks while PIT channel 2 counts down ~10 ms.
fn from_pit() -> Option<u64> {
    let count = (PIT_HZ / 100) as u16;
    let gate = inb(0x61);
    outb(0x61, (gate & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let tsc_start = rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 50_000_000 {
            return None;
        }
    }
    let ticks = rdtsc() - tsc_start;
    (ticks > 1000).then(|| ticks * PIT_HZ / u64::from(count))
}

/// Determines the TSC frequency; call after `acpi::init`.
pub fn init() {
    let (hz, source) = if let Some(hz) = from_cpuid_15() {
        (hz, "cpuid-15")
    } else if let Some(hz) = from_hypervisor_leaf() {
        (hz, "cpuid-40000010")
    } else if let Some(hz) = from_pm_timer() {
        (hz, "pm-timer")
    } else if let Some(hz) = from_pit() {
        (hz, "pit")
    } else {
        (DEFAULT_TSC_HZ, "guess")
    };
    let hz = hz.max(1_000_000);
    TSC_HZ.store(hz, Ordering::Relaxed);
    NS_PER_TICK_FP.store((1_000_000_000u64 << 32) / hz, Ordering::Relaxed);
    TSC_START.store(rdtsc(), Ordering::Relaxed);
    crate::chatter!("TSC {} kHz ({})", hz / 1000, source);
}

/// `clock=virtual` (record and replay, docs/replay.md): time no longer comes from the TSC, which
/// a VMM cannot replay on every host, but from a counter every read advances by a fixed step.
/// Deadlines still expire (after a fixed number of reads) and every printed time is a function
/// of the guest's own execution, so two runs given the same device inputs print the same.
pub fn init_virtual() {
    VIRTUAL_NOW.store(0, Ordering::Relaxed);
    TSC_HZ.store(1_000_000_000, Ordering::Relaxed);
    crate::chatter!("virtual clock: {} ns per read, no TSC", VIRTUAL_STEP_NS);
}

/// Whether `clock=virtual` is on.
pub fn is_virtual() -> bool {
    VIRTUAL_NOW.load(Ordering::Relaxed) != u64::MAX
}

/// Nanoseconds since `init`.
pub fn now_ns() -> u64 {
    if is_virtual() {
        return VIRTUAL_NOW.fetch_add(VIRTUAL_STEP_NS, Ordering::Relaxed);
    }
    let ticks = rdtsc().wrapping_sub(TSC_START.load(Ordering::Relaxed));
    ((u128::from(ticks) * u128::from(NS_PER_TICK_FP.load(Ordering::Relaxed))) >> 32) as u64
}

/// A point in time after which a wait gives up.
#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after_ms(ms: u64) -> Self {
        Self(now_ns().saturating_add(ms.saturating_mul(1_000_000)))
    }

    pub fn after_us(us: u64) -> Self {
        Self(now_ns().saturating_add(us.saturating_mul(1_000)))
    }

    pub fn expired(&self) -> bool {
        now_ns() >= self.0
    }
}
