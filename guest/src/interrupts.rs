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
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_16: u32 = 0x3;

/// Vector of the periodic wake-up timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// Spurious-interrupt vector (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// First vector handed out to devices.
const FIRST_DEVICE_VECTOR: u8 = 0x40;
const LAST_DEVICE_VECTOR: u8 = 0xef;

static X2APIC: AtomicBool = AtomicBool::new(false);
static XAPIC_BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);
static NEXT_VECTOR: AtomicU8 = AtomicU8::new(FIRST_DEVICE_VECTOR);
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

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
    write_reg(REG_TPR, 0);
    write_reg(REG_LVT_TIMER, LVT_MASKED);
    write_reg(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    crate::chatter!(
        "LAPIC id={} mode={}",
        apic_id(),
        if has_x2apic { "x2apic" } else { "xapic" }
    );
}

/// This CPU's APIC id.
pub fn apic_id() -> u32 {
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

/// MSI address/data for `vector` delivered to this CPU (fixed, edge, physical destination).
pub fn msi_message(vector: u8) -> (u64, u32) {
    let dest = apic_id() & 0xff;
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

/// Starts the periodic wake-up timer (`period_us` microseconds).
pub fn start_wakeup_timer(period_us: u32) {
    let per_ms = calibrate_timer();
    let initial = (u64::from(per_ms) * u64::from(period_us) / 1000).clamp(1, u64::from(u32::MAX));
    write_reg(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write_reg(REG_LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
    write_reg(REG_TIMER_INITIAL, initial as u32);
    crate::chatter!("LAPIC timer {} ticks/ms, period {} us", per_ms, period_us);
}
