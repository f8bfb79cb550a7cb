//! Application-processor entry: the real-mode trampoline a STARTUP IPI points at, and the 64-bit
//! landing code that puts the AP on its own stack and calls `crate::smp::ap_main`.
//!
//! The trampoline is assembled into `.rodata` (it is only ever executed from its copy below
//! 1 MiB, and keeping it out of `.text` stops the 64-bit disassembly check from decoding 16-bit
//! code as garbage) and copied to `TRAMPOLINE_ADDR` by `install_trampoline`. It is position
//! dependent on that address: every absolute address inside it is `TRAMPOLINE_ADDR + offset`.
//!
//! Path: real mode (CS:IP = vector*0x100:0) → lgdt of the trampoline's own GDT → protected mode
//! (32-bit code at 0x18) → PAE, the BSP's `boot_pml4`, EFER.LME, paging → long mode (64-bit code
//! at 0x08, the same selector the per-CPU GDT uses, so CS stays valid after `ap_main` loads it)
//! → `ap_long_mode_entry` in the kernel image. No `int n`, no 32-bit `iret`, no SSE: kvm_pvm runs
//! all of this in KVM's instruction emulator.

use core::ptr::addr_of;
use core::sync::atomic::AtomicU64;

/// Where the trampoline runs: a 4 KiB page below 1 MiB that sluice's memory map leaves free
/// (boot GDT 0x500, PVH info 0x6000, zero page 0x7000, boot stack below 0x9000, page tables
/// 0x9000..0xc000, command line 0x20000) and QEMU's PVH loader has finished with by the time
/// the kit runs (the start info and command line are copied out at boot). `smp` checks that the
/// loader's memory map calls it RAM before using it.
pub const TRAMPOLINE_ADDR: u64 = 0x10000;
/// The STARTUP IPI's vector field: the page number of the trampoline.
pub const TRAMPOLINE_VECTOR: u8 = (TRAMPOLINE_ADDR >> 12) as u8;

const _: () = assert!(TRAMPOLINE_ADDR.is_multiple_of(4096) && TRAMPOLINE_ADDR < 0x10_0000);

/// Stack top for the AP being started; read once by `ap_long_mode_entry`.
#[export_name = "ap_boot_stack_top"]
pub static AP_BOOT_STACK_TOP: AtomicU64 = AtomicU64::new(0);
/// Index (in `smp`'s CPU table) of the AP being started; handed to `ap_main`.
#[export_name = "ap_boot_cpu_index"]
pub static AP_BOOT_CPU_INDEX: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

core::arch::global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_trampoline_start
    .global ap_trampoline_end
    .code16
ap_trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_tramp_gdt_ptr - ap_trampoline_start)
    mov %cr0, %eax
    or $0x1, %eax
    mov %eax, %cr0
    ljmpl $0x18, $({base} + ap_tramp_32 - ap_trampoline_start)

    .code32
ap_tramp_32:
"#,
    load_data_segments_asm!(),
    enter_long_mode_asm!("ap_long_mode_entry"),
    r#"

    .balign 8
ap_tramp_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code (as boot_gdt and the per-CPU GDTs) */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0x00cf9a000000ffff    /* 0x18: 32-bit code, for the step through protected mode */
ap_tramp_gdt_end:
    .balign 4
ap_tramp_gdt_ptr:
    .word ap_tramp_gdt_end - ap_tramp_gdt - 1
    .long {base} + ap_tramp_gdt - ap_trampoline_start
ap_trampoline_end:

    .text
    .code64
    .global ap_long_mode_entry
ap_long_mode_entry:
"#,
    load_data_segments_asm!(),
    r#"
    clts
    mov ap_boot_stack_top(%rip), %rsp
    xor %ebp, %ebp
    mov ap_boot_cpu_index(%rip), %rdi
    call ap_main
1:
    cli
    hlt
    jmp 1b
"#,
    base = const TRAMPOLINE_ADDR,
    options(att_syntax)
);

/// Copies the trampoline to `TRAMPOLINE_ADDR`.
///
/// # Safety
/// The page at `TRAMPOLINE_ADDR` must be RAM that nothing else uses (the caller checked the
/// memory map), and no AP may be executing it.
pub unsafe fn install_trampoline() {
    // Only addresses of the linker symbols are taken.
    let start = addr_of!(ap_trampoline_start);
    let len = addr_of!(ap_trampoline_end) as usize - start as usize;
    debug_assert!(len <= 4096);
    // SAFETY: the source is the trampoline's bytes in the kernel image; the destination page is
    // identity mapped RAM reserved for it (caller's contract); the two do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDR as *mut u8, len) };
}
