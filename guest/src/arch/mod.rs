//! x86_64 CPU primitives: port I/O, MSRs, CPUID, control registers, boot entry, IDT/GDT/TSS and
//! page tables. Everything that needs inline assembly lives here so the rest of the kernel is
//! plain Rust.

/// AT&T assembly shared by the boot CPU's entry (`boot`) and the APs' trampoline (`ap_boot`):
/// loads the flat data selector 0x10 into every data segment register.
macro_rules! load_data_segments_asm {
    () => {
        concat!(
            "    mov $0x10, %eax\n",
            "    mov %eax, %ds\n",
            "    mov %eax, %es\n",
            "    mov %eax, %ss\n",
            "    mov %eax, %fs\n",
            "    mov %eax, %gs\n",
        )
    };
}

/// AT&T assembly shared by `boot` and `ap_boot`: from 32-bit protected mode with paging off to
/// long mode on the boot page tables (`boot_pml4`), with SSE allowed through CR4 only (no
/// XSAVE, which kvm_pvm cannot run), then a far jump to `$target` in the 64-bit code selector.
macro_rules! enter_long_mode_asm {
    ($target:literal) => {
        concat!(
            "    mov $boot_pml4, %eax\n",
            "    mov %eax, %cr3\n",
            "    mov %cr4, %eax\n",
            "    or $0x620, %eax\n", // PAE | OSFXSR | OSXMMEXCPT
            "    mov %eax, %cr4\n",
            "    mov $0xC0000080, %ecx\n", // EFER
            "    rdmsr\n",
            "    or $0x100, %eax\n", // LME
            "    wrmsr\n",
            "    mov %cr0, %eax\n",
            "    and $0x9ffffffb, %eax\n", // clear EM, CD, NW
            "    or $0x80000023, %eax\n",  // PG | NE | MP | PE
            "    mov %eax, %cr0\n",
            "    ljmp $0x08, $",
            $target,
            "\n",
        )
    };
}

pub mod ap_boot;
pub mod boot;
pub mod idt;
pub mod paging;
pub mod ring3;

use core::arch::asm;

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; callers pick ports of devices they own.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: see `outb`.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: see `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: see `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: see `outb`.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// CPUID leaf/subleaf result (eax, ebx, ecx, edx).
#[allow(
    unused_unsafe,
    reason = "__cpuid_count is safe in newer Rust, unsafe at our MSRV"
)]
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // SAFETY: CPUID is always available in long mode and only reads CPU state.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: callers only read architectural MSRs whose presence CPUID reported.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: callers only write architectural MSRs (APIC base, x2APIC registers) they own.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// Time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter (CR4.TSD is clear: we run at CPL0).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Enables interrupts.
pub fn enable_interrupts() {
    // SAFETY: the IDT is installed before anyone calls this.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Disables interrupts.
pub fn disable_interrupts() {
    // SAFETY: masking interrupts cannot break memory safety.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Halts until the next interrupt unless `ready()` says there is no need. Interrupts stay
/// enabled throughout. The classic `cli; check; sti; hlt` is not used on purpose: under
/// kvm_pvm the emulated HLT in an STI shadow was seen to sleep through an already pending
/// interrupt until the next timer tick. The remaining race (an interrupt between the check and
/// HLT) costs at most one wake-up timer period.
///
/// At CPL3 (where IF is always set) the HLT is the ring-0 service call `Halt`.
///
/// With `clock=virtual` there is no wake-up timer to bound the sleep: this returns at once and
/// the caller's loop spins until its (virtual) deadline instead.
pub fn wait_for_interrupt_unless(ready: impl FnOnce() -> bool) {
    if crate::time::is_virtual() {
        return;
    }
    if ring3::in_ring3() {
        if !ready() {
            ring3::call(ring3::Service::Halt, 0, 0);
        }
        return;
    }
    enable_interrupts();
    if ready() {
        return;
    }
    // SAFETY: HLT resumes after any interrupt; the wake-up timer bounds the sleep.
    unsafe { asm!("hlt", options(nomem, nostack)) }
}

/// Hints the CPU that we are spinning.
pub fn pause() {
    core::hint::spin_loop();
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CLI/HLT stop the CPU; nothing else runs afterwards.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Reads CR2 (faulting address of the last #PF).
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads CR3.
pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Flushes the whole TLB by reloading CR3 (no global pages are used).
pub fn flush_tlb() {
    let cr3 = read_cr3();
    // SAFETY: writing back the current CR3 only flushes non-global TLB entries.
    unsafe { asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags)) }
}

/// Full memory barrier (store→load ordering) without MFENCE, which KVM's instruction
/// emulator (all guest code runs there under kvm_pvm) does not implement. A locked
/// read-modify-write of the stack top orders like MFENCE for ordinary memory.
pub fn full_barrier() {
    // SAFETY: OR-ing zero into the qword at [rsp] leaves it unchanged; the stack top is mapped.
    unsafe { asm!("lock or qword ptr [rsp], 0", options(nostack)) }
}
