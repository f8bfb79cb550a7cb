//! Local APIC (x2APIC through MSRs when CPUID offers it, else xAPIC MMIO), EOI, a periodic
//! wake-up timer so that `hlt` never sleeps past a deadline, per-vector interrupt counters,
//! vector allocation for MSI-X and the MSI message format.

use crate::arch::{self, cpuid, rdmsr, wrmsr};
use crate::phys;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

const APIC_BASE_MSR: u32 = 0x1b;
const APIC_ENABLE: u64 = 1 << 11;
const X2APIC_ENABLE: u64 = 1 << 10;
const X2APIC_MSR_BASE: u32 = 0x800;
const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_ICR: u32 = 0x300;
/// xAPIC only: the ICR's destination half (x2APIC writes both halves with one MSR).
const REG_ICR_HIGH: u32 = 0x310;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 0x500;
const ICR_STARTUP: u32 = 0x600;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_16: u32 = 0x3;

/// Vector of the periodic wake-up timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Vector of the IPI that wakes a halted CPU to look at its work (counted, otherwise ignored).
pub const WAKE_VECTOR: u8 = 0x21;
/// Spurious-interrupt vector (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// First vector handed out to devices.
const FIRST_DEVICE_VECTOR: u8 = 0x40;
const LAST_DEVICE_VECTOR: u8 = 0xef;

static X2APIC: AtomicBool = AtomicBool::new(false);
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);
static NEXT_VECTOR: AtomicU8 = AtomicU8::new(FIRST_DEVICE_VECTOR);
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// Initial count of the periodic wake-up timer, measured once on the BSP and reused on APs.
static WAKEUP_INITIAL_COUNT: AtomicU32 = AtomicU32::new(0);

fn read_reg(reg: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        rdmsr(X2APIC_MSR_BASE + (reg >> 4)) as u32
    } else {
        phys::mmio_read32(XAPIC_BASE.load(Ordering::Relaxed) + u64::from(reg))
    }
}

fn write_reg(reg: u32, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        wrmsr(X2APIC_MSR_BASE + (reg >> 4), u64::from(value));
    } else {
        phys::mmio_write32(XAPIC_BASE.load(Ordering::Relaxed) + u64::from(reg), value);
    }
}

fn mask_legacy_pic() {
    arch::outb(0x21, 0xff);
    arch::outb(0xa1, 0xff);
}

/// Enables the local APIC (x2APIC if offered); interrupts stay disabled at the CPU.
pub fn init() {
    mask_legacy_pic();
    let has_x2apic = cpuid(1, 0)[2] & (1 << 21) != 0;
    let base = rdmsr(APIC_BASE_MSR);
    XAPIC_BASE.store(base & 0x000f_ffff_ffff_f000, Ordering::Relaxed);
    let mut new_base = base | APIC_ENABLE;
    if has_x2apic {
        new_base |= X2APIC_ENABLE;
    }
    wrmsr(APIC_BASE_MSR, new_base);
    X2APIC.store(has_x2apic, Ordering::Relaxed);
    accept_interrupts();
    crate::chatter!(
        "LAPIC id={} mode={}",
        apic_id(),
        if has_x2apic { "x2apic" } else { "xapic" }
    );
}

/// Priority 0, timer masked, software-enabled with the spurious vector.
fn accept_interrupts() {
    write_reg(REG_TPR, 0);
    write_reg(REG_LVT_TIMER, LVT_MASKED);
    write_reg(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
}

/// Enables an application processor's local APIC in the BSP's mode (x2APIC or xAPIC) and
/// starts its wake-up timer with the BSP's period. Interrupts stay disabled at the CPU.
pub fn init_this_ap() {
    let mut base = rdmsr(APIC_BASE_MSR) | APIC_ENABLE;
    if X2APIC.load(Ordering::Relaxed) {
        base |= X2APIC_ENABLE;
    }
    wrmsr(APIC_BASE_MSR, base);
    accept_interrupts();
    program_wakeup_timer(WAKEUP_INITIAL_COUNT.load(Ordering::Relaxed));
}

/// Writes the interrupt command register: `command` (vector, delivery mode, level) to the CPU
/// with APIC id `destination`. In xAPIC mode waits (bounded) until the APIC accepted it.
fn send_ipi_command(destination: u32, command: u32) {
    // An x2APIC ICR write is not serializing: without a fence the IPI could overtake the
    // stores (mailbox, job pointer) the target is about to read. MFENCE is not available in
    // KVM's emulator; a locked instruction orders the same way.
    arch::full_barrier();
    if X2APIC.load(Ordering::Relaxed) {
        wrmsr(
            X2APIC_MSR_BASE + (REG_ICR >> 4),
            (u64::from(destination) << 32) | u64::from(command),
        );
        return;
    }
    write_reg(REG_ICR_HIGH, destination << 24);
    write_reg(REG_ICR, command);
    let deadline = crate::time::Deadline::after_ms(10);
    while read_reg(REG_ICR) & ICR_DELIVERY_PENDING != 0 && !deadline.expired() {
        arch::pause();
    }
}

/// INIT (level assert) to `destination`: resets it into wait-for-SIPI.
pub fn send_init(destination: u32) {
    send_ipi_command(destination, ICR_INIT | ICR_LEVEL_ASSERT | ICR_TRIGGER_LEVEL);
}

/// STARTUP IPI: `destination` starts in real mode at `page_number * 4096`.
pub fn send_startup(destination: u32, page_number: u8) {
    send_ipi_command(destination, ICR_STARTUP | u32::from(page_number));
}

/// Fixed interrupt `vector` to the CPU with APIC id `destination`.
pub fn send_ipi(destination: u32, vector: u8) {
    send_ipi_command(destination, u32::from(vector));
}

/// This CPU's APIC id (from ring 3 through the `ApicId` service: x2APIC MSRs are CPL0 only).
pub fn apic_id() -> u32 {
    if arch::ring3::in_ring3() {
        return arch::ring3::call(arch::ring3::Service::ApicId, 0, 0) as u32;
    }
    if X2APIC.load(Ordering::Relaxed) {
        read_reg(REG_ID)
    } else {
        read_reg(REG_ID) >> 24
    }
}

/// Called by the IDT stub for vectors >= 32, interrupts disabled.
pub fn on_interrupt(vector: u8) {
    COUNTS[usize::from(vector)].fetch_add(1, Ordering::Relaxed);
    if vector != SPURIOUS_VECTOR {
        write_reg(REG_EOI, 0);
    }
}

/// How many times `vector` fired.
pub fn count(vector: u8) -> u64 {
    COUNTS[usize::from(vector)].load(Ordering::Relaxed)
}

/// Owner tag (+1, 0 = free) of each device vector.
static OWNERS: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];

/// The vector of `owner` (e.g. PCI function and MSI-X entry), allocating one the first time.
/// Reopening a device therefore reprograms the same MSI message: QEMU with KVM irqfd routes
/// was seen to keep delivering a changed entry's old message.
pub fn vector_for(owner: u32) -> Option<u8> {
    let tag = owner.wrapping_add(1);
    let known = (FIRST_DEVICE_VECTOR..NEXT_VECTOR.load(Ordering::Relaxed))
        .find(|&v| OWNERS[usize::from(v)].load(Ordering::Relaxed) == tag);
    if known.is_some() {
        return known;
    }
    let vector = NEXT_VECTOR.load(Ordering::Relaxed);
    if vector > LAST_DEVICE_VECTOR {
        return None;
    }
    NEXT_VECTOR.store(vector + 1, Ordering::Relaxed);
    OWNERS[usize::from(vector)].store(tag, Ordering::Relaxed);
    Some(vector)
}

/// MSI address/data for `vector` delivered to the CPU with APIC id `destination` (fixed, edge,
/// physical destination; ids above 255 would need remapping, which no configuration here has).
pub fn msi_message(vector: u8, destination: u32) -> (u64, u32) {
    let dest = destination & 0xff;
    (0xfee0_0000 | (u64::from(dest) << 12), u32::from(vector))
}

/// Measures LAPIC timer ticks (divide by 16) per millisecond against `time::now_ns`.
fn calibrate_timer() -> u32 {
    write_reg(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write_reg(REG_LVT_TIMER, LVT_MASKED);
    write_reg(REG_TIMER_INITIAL, u32::MAX);
    let start = crate::time::now_ns();
    while crate::time::now_ns() - start < 5_000_000 {
        arch::pause();
    }
    let elapsed = u32::MAX - read_reg(REG_TIMER_CURRENT);
    write_reg(REG_TIMER_INITIAL, 0);
    (elapsed / 5).max(1)
}

fn program_wakeup_timer(initial: u32) {
    write_reg(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write_reg(REG_LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
    write_reg(REG_TIMER_INITIAL, initial.max(1));
}

/// Starts the periodic wake-up timer (`period_us` microseconds).
pub fn start_wakeup_timer(period_us: u32) {
    let per_ms = calibrate_timer();
    let initial = (u64::from(per_ms) * u64::from(period_us) / 1000).clamp(1, u64::from(u32::MAX));
    WAKEUP_INITIAL_COUNT.store(initial as u32, Ordering::Relaxed);
    program_wakeup_timer(initial as u32);
    crate::chatter!("LAPIC timer {} ticks/ms, period {} us", per_ms, period_us);
}
