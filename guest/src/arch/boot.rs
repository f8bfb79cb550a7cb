//! PVH boot: the Xen ELF note that names the 32-bit entry point, and the entry code that builds
//! a GDT (kernel and user segments) and identity page tables (first 4 GiB in 2 MiB pages,
//! user-accessible), turns on long mode and SSE
//! (CR0/CR4 only: no XSAVE, which kvm_pvm cannot run), and calls `rust_main(start_info)`.
//!
//! Written by hand because no crate offers a PVH entry for a freestanding ELF.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz */
    .long 8                 /* descsz: QEMU reads a pointer-sized value, linux-loader a u32 */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi          /* hvm_start_info physical address; kept in esi */
    lgdt boot_gdt_ptr
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs

    /* Zero .bss (page tables and stacks live there). */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov $boot_stack_top, %esp

    /* PML4[0] -> PDPT; PDPT[0..4] -> 4 page directories. */
    mov $boot_pdpt, %eax
    or $0x7, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $0x7, %eax
    mov %eax, boot_pdpt
    add $0x1000, %eax
    mov %eax, boot_pdpt + 8
    add $0x1000, %eax
    mov %eax, boot_pdpt + 16
    add $0x1000, %eax
    mov %eax, boot_pdpt + 24

    /* 2048 2 MiB pages; 3..4 GiB (MMIO, ECAM, APICs) uncached. Every level is user-accessible
       (U/S): the workloads' data paths run at CPL3 (arch::ring3) on this same map. */
    xor %ecx, %ecx
1:
    mov %ecx, %eax
    shl $21, %eax
    or $0x87, %eax
    cmp $1536, %ecx
    jb 2f
    or $0x18, %eax
2:
    mov %eax, boot_pd(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 1b

"#,
    enter_long_mode_asm!("long_mode_entry"),
    r#"

    .code64
long_mode_entry:
"#,
    load_data_segments_asm!(),
    r#"
    clts
    mov $boot_stack_top, %rsp
    xor %ebp, %ebp
    mov %esi, %edi
    call rust_main
3:
    cli
    hlt
    jmp 3b

    .section .data.boot_gdt, "aw"
    .balign 16
    .global boot_gdt
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0                     /* 0x18: TSS (low), filled in by idt::init */
    .quad 0                     /* 0x20: TSS (high) */
    .quad 0x00cff2000000ffff    /* 0x28: user data (DPL 3) */
    .quad 0x00affa000000ffff    /* 0x30: user 64-bit code (DPL 3) */
boot_gdt_end:
    .balign 4
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
boot_stack:
    .skip 262144
boot_stack_top:
    .code64
    .text
"#,
    options(att_syntax)
);
