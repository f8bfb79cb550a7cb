//! Running the workloads' data paths at CPL3, and the service calls ring 3 makes into ring 0.
//!
//! Why: on kvm_pvm hosts guest code at CPL0 runs in KVM's instruction emulator (~4 M instr/s)
//! while CPL3 code runs natively (thousands of times faster). Boot and device setup stay at
//! CPL0; `run` executes a closure at CPL3 on the same stack (every page of the identity map is
//! user-accessible, see boot.rs and paging.rs) and comes back when it returns.
//!
//! What was measured on kvm_pvm (the choices below follow from it):
//! - entering ring 3 with `iretq` to the user code selector works;
//! - `syscall` from CPL3 arrives at LSTAR but KVM keeps treating the vCPU as CPL3 there (a
//!   `mov %cr3` in the handler raises #GP) and `sysretq` raises #GP: unusable;
//! - `int $0x80` through a DPL-3 gate reaches the handler, but CPL0 code after it faulted on
//!   port I/O as if still at CPL3; `int n` is also one of the instructions the kit never emits;
//! - `ud2` at CPL3 raises #UD through the guest's IDT onto a real CPL0 handler (CR3 reads and
//!   port I/O work there): that is the service call. A round trip costs ~60-130 µs, so the
//!   data paths never make one (they poll); only printing, waiting in HLT, the APIC id and
//!   leaving ring 3 do;
//! - port I/O from CPL3 with IOPL=3 in RFLAGS raised #GP on `in`: ring 3 keeps IOPL 0 and
//!   prints through the service call;
//! - `rdtsc` at CPL3 is native (~9 ns), so deadlines and latencies need no service.
//!
//! The service call: `ud2` with the service number in rax and arguments in rdi, rsi, rdx; the
//! result comes back in rax. The #UD gate has no IST stack, so a service from CPL3 runs on this
//! CPU's TSS.rsp0 kernel stack and may enable interrupts (which take their own IST stack) to
//! HLT. A `ud2` at CPL0 is still a CPU exception that ends the run.

use super::idt::TrapFrame;
use core::arch::asm;
use core::sync::atomic::{AtomicU8, Ordering};

/// User data (SS) and 64-bit code selectors, RPL 3 (GDT entries 5 and 6, see boot.rs).
const USER_DATA_SELECTOR: u64 = 0x28 | 3;
const USER_CODE_SELECTOR: u64 = 0x30 | 3;
const KERNEL_CODE_SELECTOR: u64 = 0x08;
const KERNEL_DATA_SELECTOR: u64 = 0x10;
const RFLAGS_RESERVED: u64 = 0x2;
const RFLAGS_IF: u64 = 0x200;
/// Length of `ud2`: the service handler resumes after it.
const UD2_LEN: u64 = 2;

/// What ring 3 asks of ring 0.
#[repr(u64)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Service {
    /// Leave ring 3: back to `run`'s caller at CPL0 (rdi: the saved kernel stack pointer).
    Return = 0,
    /// Write `len` (rsi) bytes at `ptr` (rdi) to the console.
    Write = 1,
    /// Halt until the next interrupt.
    Halt = 2,
    /// End the run with status rdi.
    Exit = 3,
    /// This CPU's APIC id.
    ApicId = 4,
}

impl Service {
    fn from_number(number: u64) -> Option<Service> {
        Some(match number {
            0 => Service::Return,
            1 => Service::Write,
            2 => Service::Halt,
            3 => Service::Exit,
            4 => Service::ApicId,
            _ => return None,
        })
    }
}

/// The ring the workloads run in (the `ring=` command-line token).
static WORKLOAD_RING: AtomicU8 = AtomicU8::new(3);

core::arch::global_asm!(
    r#"
    .text
    .global ring3_enter
ring3_enter:
    /* rdi = argument, rsi = entry, rdx = where to save the kernel rsp, rcx = user rflags */
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    pushfq
    mov %rsp, (%rdx)
    mov %rdx, %r12
    mov %rsp, %rax
    and $-16, %rax
    pushq ${user_data}
    push %rax
    push %rcx
    pushq ${user_code}
    lea ring3_trampoline(%rip), %rax
    push %rax
    iretq
ring3_trampoline:
    /* CPL3, rsp 16-byte aligned, r12 (callee-saved) = where the kernel rsp was saved */
    call *%rsi
    mov (%r12), %rdi
    xor %eax, %eax          /* Service::Return */
    ud2

    .global ring3_exit_landing
ring3_exit_landing:
    /* CPL0 again, on the stack ring3_enter saved (the Return service's IRETQ frame) */
    popfq
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret
"#,
    user_data = const USER_DATA_SELECTOR,
    user_code = const USER_CODE_SELECTOR,
    options(att_syntax)
);

extern "C" {
    fn ring3_enter(arg: *mut u8, entry: extern "C" fn(*mut u8), saved_rsp: *mut u64, rflags: u64);
    static ring3_exit_landing: u8;
}

/// Sets the ring `run_workload_code` uses (0 or 3).
pub fn set_workload_ring(ring: u8) {
    WORKLOAD_RING.store(ring, Ordering::Relaxed);
}

/// The ring `run_workload_code` uses.
pub fn workload_ring() -> u8 {
    WORKLOAD_RING.load(Ordering::Relaxed)
}

/// The privilege level this code runs at: the RPL of CS.
pub fn current_ring() -> u8 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    (cs & 3) as u8
}

/// Whether this code runs at CPL3.
pub fn in_ring3() -> bool {
    current_ring() == 3
}

extern "C" fn call_closure<F: FnMut()>(arg: *mut u8) {
    // SAFETY: `run` passes a pointer to its live `F` and waits until this returns.
    let f = unsafe { &mut *arg.cast::<F>() };
    f();
}

fn entry_for<F: FnMut()>(_: &F) -> extern "C" fn(*mut u8) {
    call_closure::<F>
}

/// Runs `f` at CPL3 on this stack and returns its result at CPL0 (at CPL3 already: calls it).
/// Interrupts are enabled in ring 3; they arrive through the IDT and return there.
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    if in_ring3() {
        return f();
    }
    let mut f = Some(f);
    let mut result = None;
    let mut closure = || {
        if let Some(f) = f.take() {
            result = Some(f());
        }
    };
    let entry = entry_for(&closure);
    let mut saved_rsp = 0u64;
    // SAFETY: ring3_enter saves the callee-saved registers and RFLAGS on this stack, runs the
    // closure at CPL3 below them (all pages are user-accessible; the closure only borrows from
    // this frame, which outlives it), and the Return service restores them and returns here.
    unsafe {
        ring3_enter(
            (&raw mut closure).cast(),
            entry,
            &raw mut saved_rsp,
            RFLAGS_RESERVED | RFLAGS_IF,
        )
    };
    match result {
        Some(result) => result,
        // The closure always runs once before Return; this cannot happen.
        None => crate::exit::fail(
            crate::exit::Status::Panic,
            format_args!("ring 3 returned without a result"),
        ),
    }
}

/// Runs a workload's data path in the ring the command line chose.
pub fn run_workload_code<R>(f: impl FnOnce() -> R) -> R {
    if workload_ring() == 3 {
        run(f)
    } else {
        f()
    }
}

/// A service call from ring 3 (see the module doc).
pub fn call(service: Service, a0: u64, a1: u64) -> u64 {
    let result: u64;
    // SAFETY: the #UD handler performs the service and resumes after `ud2`; it may clobber
    // whatever the C ABI lets a call clobber. Not `nostack`: the CPU switches to TSS.rsp0, but
    // keeping the red zone free costs nothing here.
    unsafe {
        asm!("ud2", inlateout("rax") service as u64 => result, in("rdi") a0, in("rsi") a1,
             clobber_abi("C"))
    };
    result
}

fn exit_landing() -> u64 {
    // Only the address of the label is taken.
    core::ptr::addr_of!(ring3_exit_landing) as u64
}

/// Handles a #UD raised at CPL3: the service call. Returns false for a `ud2` that is not one
/// (an unknown number), which then ends the run as a CPU exception.
pub fn handle_service(frame: &mut TrapFrame) -> bool {
    let Some(service) = Service::from_number(frame.rax) else {
        return false;
    };
    frame.rip += UD2_LEN;
    match service {
        Service::Return => {
            // IRETQ to the kernel stack `ring3_enter` saved, at CPL0.
            frame.cs = KERNEL_CODE_SELECTOR;
            frame.ss = KERNEL_DATA_SELECTOR;
            frame.rsp = frame.rdi;
            frame.rip = exit_landing();
        }
        Service::Write => {
            let len = frame.rsi.min(64 * 1024) as usize;
            if let Some(bytes) = crate::phys::bytes(frame.rdi, len) {
                crate::console::write_bytes(bytes);
            }
        }
        Service::Halt => {
            // IF was set in ring 3; the interrupt that ends the HLT takes its IST stack.
            super::enable_interrupts();
            // SAFETY: HLT resumes after any interrupt; the wake-up timer bounds the sleep.
            unsafe { asm!("hlt", options(nomem, nostack)) };
        }
        Service::Exit => {
            let status = crate::exit::Status::from_byte(frame.rdi as u8);
            crate::exit::exit(status)
        }
        Service::ApicId => frame.rax = u64::from(crate::interrupts::apic_id()),
    }
    true
}
