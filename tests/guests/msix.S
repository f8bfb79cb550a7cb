/*
 * msix (run with --test-device): finds sluice's PCI test device (1234:5c1e) on bus 0 through
 * ECAM, enables memory decoding, bus mastering and MSI-X, points table entry 0 at the boot LAPIC
 * with vector 0x41, rings the doorbell (BAR0 + 4 = vector number 0) twice and waits up to 2 s each for the
 * interrupt handler to run. Prints "msix: interrupt received" and exits 0; exits 3 on timeout,
 * 4 when the device is missing, 5 on a bad BAR/capability, 6 on any other interrupt.
 */
#include "common.inc"

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
#define WAIT_MS 2000

#include "interrupts.inc"

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

/* Counts the interrupt and EOIs. */
msix_handler:
    push %eax
    incl msix_interrupts
    call lapic_eoi
    IRQ_RETURN

main:
    mov $msix_handler, %eax
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

    call enable_lapic
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
guest_name:
    .asciz "msix"

    .bss
    .balign 4
bar_addresses:
    .long 0, 0
msix_interrupts:
    .long 0
    .text
