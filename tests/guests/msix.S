/*
 * msix (run with --test-device): finds sluice's PCI test device (1234:5c1e) on bus 0 through
 * ECAM, enables memory decoding, bus mastering and MSI-X, points table entry 0 at the boot LAPIC
 * with vector 0x41, rings the doorbell (BAR0 + 4 = vector number 0) twice and waits up to 2 s each for the
 * interrupt handler to run. Prints "msix: interrupt received" and exits 0; exits 3 on timeout,
 * 4 when the device is missing, 5 on a bad BAR/capability, 6 on any other interrupt.
 */
#include "common.inc"

#define TEST_DEVICE_ID 0x5c1e1234
#define CFG_ID 0x00
#define CFG_COMMAND 0x04
#define CFG_STATUS 0x06
#define CFG_BAR0 0x10
#define CFG_BAR1 0x14
#define CFG_CAPABILITIES 0x34
#define COMMAND_MEMORY 0x0002
#define COMMAND_BUS_MASTER 0x0004
#define STATUS_CAPABILITIES 0x0010
#define CAP_ID_MSIX 0x11
#define MSIX_CONTROL 2
#define MSIX_TABLE 4
#define MSIX_ENABLE 0x8000
#define MSIX_FUNCTION_MASK 0x4000
#define BAR_MEMORY_MASK 0xfffffff0
#define TEST_VECTOR 0x41
#define DOORBELL 0x04
#define COUNT 0x08
#define RESULT 0x0c
#define SVR_APIC_ENABLE 0x100
#define SVR_SPURIOUS_VECTOR 0xff
#define IDT_ENTRIES 256
#define GATE_INTERRUPT_32 0x8e00
#define WAIT_MS 2000
#define EFLAGS_IF 0x200

/* find_test_device: returns in ESI the ECAM base of 00:dd.0 holding the test device, or 0. */
find_test_device:
    push %ecx
    mov $PCI_ECAM_BASE, %esi
    mov $32, %ecx
1:  cmpl $TEST_DEVICE_ID, CFG_ID(%esi)
    je 2f
    add $(1 << 15), %esi
    loop 1b
    xor %esi, %esi
2:  pop %ecx
    ret

/* find_msix_capability: ESI = function; returns the MSI-X capability offset in EBX, or 0. */
find_msix_capability:
    push %ecx
    xor %ebx, %ebx
    testw $STATUS_CAPABILITIES, CFG_STATUS(%esi)
    jz 3f
    movzbl CFG_CAPABILITIES(%esi), %ebx
    /* At most 48 capabilities fit in 256 bytes; a longer chain is a loop. */
    mov $48, %ecx
1:  and $0xfc, %ebx
    jz 3f
    cmpb $CAP_ID_MSIX, (%esi,%ebx)
    je 3f
    movzbl 1(%esi,%ebx), %ebx
    loop 1b
    xor %ebx, %ebx
3:  pop %ecx
    ret

/* set_gate: EAX = handler, ECX = vector; writes a 32-bit interrupt gate. */
set_gate:
    push %eax
    push %edx
    lea idt(,%ecx,8), %edx
    movw %ax, (%edx)
    movw $CODE_SELECTOR, 2(%edx)
    movw $GATE_INTERRUPT_32, 4(%edx)
    shr $16, %eax
    movw %ax, 6(%edx)
    pop %edx
    pop %eax
    ret

/* setup_idt: every vector reports itself as unexpected except TEST_VECTOR. */
setup_idt:
    push %eax
    push %ecx
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $4, %eax
    add $unexpected_stubs, %eax
    call set_gate
    inc %ecx
    cmp $IDT_ENTRIES, %ecx
    jb 1b
    mov $msix_handler, %eax
    mov $TEST_VECTOR, %ecx
    call set_gate
    lidt idt_descriptor
    pop %ecx
    pop %eax
    ret

/*
 * The handler returns without IRET: on kvm_pvm a 32-bit protected-mode IRET fails emulation
 * (KVM_EXIT_INTERNAL_ERROR). The same-privilege frame is EIP, CS, EFLAGS; it is rewritten to
 * EFLAGS-without-IF, EIP, so POPF restores the flags, STI re-enables interrupts (they were on,
 * or this interrupt could not have arrived; its one-instruction shadow covers the RET) and
 * RET pops EIP and drops the leftover slot.
 */
msix_handler:
    push %eax
    incl msix_interrupts
    mov $LAPIC_BASE, %eax
    movl $0, LAPIC_EOI(%eax)
    mov 4(%esp), %eax
    mov %eax, 8(%esp)
    mov 12(%esp), %eax
    and $~EFLAGS_IF, %eax
    mov %eax, 4(%esp)
    pop %eax
    popfl
    sti
    ret $4

/* One 16-byte stub per vector: push the vector number, report it, exit. */
    .balign 16
unexpected_stubs:
    .set vector, 0
    .rept IDT_ENTRIES
    .balign 16
    push $vector
    jmp unexpected_interrupt
    .set vector, vector + 1
    .endr

unexpected_interrupt:
    pop %ebx
    PRINT "msix: unexpected interrupt, vector "
    mov %ebx, %eax
    call put_hex8
    PRINT "\n"
    mov $EXIT_UNEXPECTED_INTERRUPT, %eax
    jmp exit_guest

main:
    call setup_idt
    call find_test_device
    test %esi, %esi
    jnz 1f
    PRINT "msix: test device not found on bus 0\n"
    mov $EXIT_NOT_FOUND, %eax
    ret

1:  mov CFG_BAR0(%esi), %eax
    and $BAR_MEMORY_MASK, %eax
    mov %eax, bar_addresses
    mov CFG_BAR1(%esi), %eax
    and $BAR_MEMORY_MASK, %eax
    mov %eax, bar_addresses + 4
    PRINT "msix: test device bar0="
    mov bar_addresses, %eax
    call put_hex32
    PRINT " bar1="
    mov bar_addresses + 4, %eax
    call put_hex32
    PRINT "\n"
    cmpl $0, bar_addresses
    je bad_device
    cmpl $0, bar_addresses + 4
    je bad_device

    movw CFG_COMMAND(%esi), %ax
    or $(COMMAND_MEMORY | COMMAND_BUS_MASTER), %ax
    movw %ax, CFG_COMMAND(%esi)

    call find_msix_capability
    test %ebx, %ebx
    jz bad_device
    /* Table address: BAR named by the BIR (bits 2:0) plus the offset (bits 31:3). */
    mov MSIX_TABLE(%esi,%ebx), %eax
    mov %eax, %edx
    and $7, %edx
    cmp $1, %edx
    ja bad_device
    and $~7, %eax
    add bar_addresses(,%edx,4), %eax
    mov %eax, %edi
    PRINT "msix: table at "
    mov %edi, %eax
    call put_hex32
    PRINT "\n"

    /* Entry 0: fixed delivery to APIC id 0, vector TEST_VECTOR, unmasked. */
    movl $LAPIC_BASE, 0(%edi)
    movl $0, 4(%edi)
    movl $TEST_VECTOR, 8(%edi)
    movl $0, 12(%edi)
    movw MSIX_CONTROL(%esi,%ebx), %ax
    or $MSIX_ENABLE, %ax
    and $~MSIX_FUNCTION_MASK, %ax
    movw %ax, MSIX_CONTROL(%esi,%ebx)

    mov $LAPIC_BASE, %edi
    mov LAPIC_SVR(%edi), %eax
    or $(SVR_APIC_ENABLE | SVR_SPURIOUS_VECTOR), %eax
    mov %eax, LAPIC_SVR(%edi)
    sti

    /* Twice: the second interrupt proves the handler returns to the interrupted code. */
    mov $1, %eax
    call ring_and_wait
    test %eax, %eax
    jnz 3f
    PRINT "msix: interrupt received\n"
    mov $2, %eax
    call ring_and_wait
    test %eax, %eax
    jnz 3f
    PRINT "msix: second interrupt received\n"
3:  cli
    ret

/* ring_and_wait: rings the doorbell for vector 0 and waits until EAX interrupts have arrived
   in total. Returns 0, or EXIT_TIMEOUT after printing the device state. */
ring_and_wait:
    push %ecx
    push %edi
    mov %eax, %ecx
    mov bar_addresses, %edi
    movl $0, DOORBELL(%edi)
    call deadline_start
1:  cmp %ecx, msix_interrupts
    jae 2f
    mov $WAIT_MS, %eax
    call deadline_passed
    test %eax, %eax
    jz 1b
    PRINT "msix: timeout; device result="
    mov RESULT(%edi), %eax
    call put_hex32
    PRINT " count="
    mov COUNT(%edi), %eax
    call put_hex32
    PRINT "\n"
    mov $EXIT_TIMEOUT, %eax
    jmp 3f
2:  xor %eax, %eax
3:  pop %edi
    pop %ecx
    ret

bad_device:
    PRINT "msix: test device BARs or MSI-X capability unusable\n"
    mov $EXIT_BAD_VALUE, %eax
    ret

    .section .rodata
    .balign 8
idt_descriptor:
    .word IDT_ENTRIES * 8 - 1
    .long idt

    .bss
    .balign 8
idt:
    .skip IDT_ENTRIES * 8
bar_addresses:
    .long 0, 0
msix_interrupts:
    .long 0
    .text
