//! Symmetric multiprocessing: starting the application processors (APs) the MADT lists and
//! running work on them.
//!
//! APs are started only when a workload asks for them (`w=smp`, `w=blk:...:cpus=N`), so runs
//! that do not are exactly the single-CPU kit. Each AP is started alone with INIT, STARTUP
//! (and a second STARTUP if it has not answered within 200 µs) through the BSP's LAPIC; it runs
//! the real-mode trampoline (arch::ap_boot) on the BSP's page tables, loads its own GDT/TSS/IST
//! stacks and the shared IDT, enables its LAPIC with the BSP's wake-up timer period, reports
//! itself online and then waits (HLT) for work. An AP that does not come up within the timeout
//! is reported, sent INIT again so that it can never run late on a stack handed to the next
//! one, and left out.
//!
//! Work is handed over by pointer: `run_on_cpus` publishes a `Job` in each AP's slot, wakes it
//! with an IPI and waits until every AP has cleared its slot again.

use crate::arch::ap_boot::{self, AP_BOOT_CPU_INDEX, AP_BOOT_STACK_TOP, TRAMPOLINE_ADDR};
use crate::arch::{self, idt::CpuTables};
use crate::exit::{self, Status};
use crate::global::SpinLock;
use crate::interrupts;
use crate::mem;
use crate::time::Deadline;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// CPUs the kit drives at most (index 0 is the BSP).
pub const MAX_CPUS: usize = 16;
const AP_STACK_SIZE: u64 = 64 * 1024;
/// INIT to STARTUP: the architectural 10 ms.
const INIT_SETTLE_MS: u64 = 10;
/// How long to wait before sending the second STARTUP IPI.
const SECOND_STARTUP_AFTER_US: u64 = 200;

/// One CPU the kit started (or the BSP at index 0).
struct Cpu {
    apic_id: AtomicU32,
    online: AtomicBool,
    /// Address of the `Job` this CPU is to run, 0 while it has none.
    job: AtomicUsize,
}

static CPUS: [Cpu; MAX_CPUS] = [const {
    Cpu {
        apic_id: AtomicU32::new(0),
        online: AtomicBool::new(false),
        job: AtomicUsize::new(0),
    }
}; MAX_CPUS];
/// Whether the trampoline page lies in RAM according to the loader's memory map.
static TRAMPOLINE_IS_RAM: AtomicBool = AtomicBool::new(false);
/// Set once the bring-up ran (it runs once per boot).
static STARTED: AtomicBool = AtomicBool::new(false);
/// CPUs online, the BSP included.
static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// APIC ids the MADT lists that did not come up.
static OFFLINE: SpinLock<Vec<u32>> = SpinLock::new(Vec::new());

/// Work for every CPU of a `run_on_cpus` call; lives on the caller's stack.
struct Job<'a> {
    work: &'a (dyn Fn(usize) + Sync),
}

/// Records whether the trampoline page is RAM (`ram`: the loader's RAM regions). Boot only.
pub fn init(ram: &[(u64, u64)]) {
    let page_end = TRAMPOLINE_ADDR + mem::PAGE_SIZE;
    let is_ram = ram
        .iter()
        .any(|&(start, len)| start <= TRAMPOLINE_ADDR && page_end <= start.saturating_add(len));
    TRAMPOLINE_IS_RAM.store(is_ram, Ordering::Relaxed);
}

/// CPUs online (the BSP included).
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// APIC id of CPU `index` (< `online()`).
pub fn apic_id_of(index: usize) -> u32 {
    CPUS[index].apic_id.load(Ordering::Acquire)
}

/// APIC ids the MADT lists that did not come up.
pub fn offline_apic_ids() -> Vec<u32> {
    OFFLINE.lock().clone()
}

/// Starts every AP the MADT lists (once per boot; later calls return at once). Returns the
/// number of CPUs online, the BSP included.
pub fn start_application_processors(timeout_ms: u64) -> usize {
    if STARTED.swap(true, Ordering::AcqRel) {
        return online();
    }
    let bsp = interrupts::apic_id();
    CPUS[0].apic_id.store(bsp, Ordering::Release);
    CPUS[0].online.store(true, Ordering::Release);
    let listed: Vec<u32> = crate::acpi::info()
        .map(|info| info.lapic_ids.clone())
        .unwrap_or_default();
    let aps: Vec<u32> = listed.into_iter().filter(|&id| id != bsp).collect();
    if aps.is_empty() {
        return 1;
    }
    if !TRAMPOLINE_IS_RAM.load(Ordering::Relaxed) {
        crate::say!(
            "smp: trampoline page {:#x} is not RAM in the memory map; APs stay parked",
            TRAMPOLINE_ADDR
        );
        OFFLINE.lock().extend(aps);
        return 1;
    }
    // SAFETY: init checked that the page is RAM; nothing of the kit lives below 1 MiB and the
    // loader's data there was copied out at boot; no AP runs yet.
    unsafe { ap_boot::install_trampoline() };
    for apic_id in aps {
        let index = online();
        if index < MAX_CPUS && start_one(index, apic_id, timeout_ms) {
            ONLINE.store(index + 1, Ordering::Release);
            crate::chatter!("smp: CPU {} (APIC id {}) online", index, apic_id);
        } else {
            crate::say!("smp: CPU with APIC id {} did not come up", apic_id);
            OFFLINE.lock().push(apic_id);
        }
    }
    online()
}

/// Starts the AP `apic_id` as CPU `index`; true once it reported itself online.
fn start_one(index: usize, apic_id: u32, timeout_ms: u64) -> bool {
    let cpu = &CPUS[index];
    cpu.online.store(false, Ordering::Release);
    cpu.job.store(0, Ordering::Release);
    cpu.apic_id.store(apic_id, Ordering::Release);
    let Some(stack) = mem::alloc_private(AP_STACK_SIZE) else {
        return false;
    };
    AP_BOOT_STACK_TOP.store(stack + AP_STACK_SIZE, Ordering::Release);
    AP_BOOT_CPU_INDEX.store(index as u64, Ordering::Release);
    interrupts::send_init(apic_id);
    spin_until(Deadline::after_ms(INIT_SETTLE_MS), || false);
    interrupts::send_startup(apic_id, ap_boot::TRAMPOLINE_VECTOR);
    let is_online = || cpu.online.load(Ordering::Acquire);
    if !spin_until(Deadline::after_us(SECOND_STARTUP_AFTER_US), is_online) {
        interrupts::send_startup(apic_id, ap_boot::TRAMPOLINE_VECTOR);
    }
    if halt_until(Deadline::after_ms(timeout_ms), is_online) {
        return true;
    }
    // Back to wait-for-SIPI: a late AP must not run on the stack the next one is given.
    interrupts::send_init(apic_id);
    false
}

/// Spins until `done()` or the deadline; returns `done()`.
fn spin_until(deadline: Deadline, done: impl Fn() -> bool) -> bool {
    while !done() && !deadline.expired() {
        arch::pause();
    }
    done()
}

/// Halts (woken by IPIs and the wake-up timer) until `done()` or the deadline; returns
/// `done()`. Used where the other CPU needs the host core more than this one does.
fn halt_until(deadline: Deadline, done: impl Fn() -> bool) -> bool {
    while !done() && !deadline.expired() {
        arch::wait_for_interrupt_unless(&done);
    }
    done()
}

/// First Rust code on an AP (from `ap_long_mode_entry`, interrupts off, on its own stack).
#[no_mangle]
extern "C" fn ap_main(index: u64) -> ! {
    let index = index as usize;
    let Some(tables) = CpuTables::allocate() else {
        arch::halt_forever();
    };
    arch::idt::load_on_this_cpu(tables);
    interrupts::init_this_ap();
    let cpu = &CPUS[index];
    cpu.apic_id.store(interrupts::apic_id(), Ordering::Release);
    cpu.online.store(true, Ordering::Release);
    arch::enable_interrupts();
    serve_jobs(cpu, index)
}

/// An AP's life after bring-up: run each job handed over, then sleep until the next.
fn serve_jobs(cpu: &Cpu, index: usize) -> ! {
    loop {
        let job = cpu.job.load(Ordering::Acquire);
        if job == 0 {
            arch::wait_for_interrupt_unless(|| cpu.job.load(Ordering::Acquire) != 0);
            continue;
        }
        // SAFETY: run_on_cpus published a pointer to a live Job and keeps it alive (it does not
        // return) until this CPU stores 0 below.
        let job = unsafe { &*(job as *const Job<'_>) };
        arch::ring3::run_workload_code(|| (job.work)(index));
        cpu.job.store(0, Ordering::Release);
        interrupts::send_ipi(apic_id_of(0), interrupts::WAKE_VECTOR);
    }
}

/// Runs `work(cpu)` on CPUs `0..count` at the same time (0 is the calling BSP), each in the
/// workloads' ring (arch::ring3), and returns when all have finished. `count` must not exceed `online()`. An AP still busy `timeout_ms` after
/// the BSP finished its own share ends the run with status 4: its work borrows from the
/// caller, so returning without it is not an option.
pub fn run_on_cpus(count: usize, timeout_ms: u64, work: &(dyn Fn(usize) + Sync)) {
    let count = count.clamp(1, online());
    let job = Job { work };
    let job_address = &raw const job as usize;
    for cpu in &CPUS[1..count] {
        cpu.job.store(job_address, Ordering::Release);
        interrupts::send_ipi(cpu.apic_id.load(Ordering::Acquire), interrupts::WAKE_VECTOR);
    }
    arch::ring3::run_workload_code(|| work(0));
    let all_done = || {
        CPUS[1..count]
            .iter()
            .all(|cpu| cpu.job.load(Ordering::Acquire) == 0)
    };
    if !halt_until(Deadline::after_ms(timeout_ms), all_done) {
        exit::fail(
            Status::Timeout,
            format_args!("an application processor did not finish its work"),
        );
    }
}
