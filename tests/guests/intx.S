/*
 * intx (run with --test-device): proves a level-triggered PCI INTx reaches the guest the way
 * firmware tables describe it. Finds sluice's PCI test device (1234:5c1e) through ECAM, checks
 * it declares INTA and that its interrupt line register names a PCI GSI (16..23), programs that
 * IOAPIC input level-triggered, active-low (what Linux does from the DSDT's _PRT) to vector
 * 0x42 on the boot LAPIC, and raises cause 1 (BAR0 + 0x10). The handler leaves the cause
 * pending the first time and EOIs: the still-asserted line must interrupt again (KVM's resample
 * fd path). From the second time on it reads INTX_ISR (BAR0 + 0x14), which clears the cause
 * and deasserts, then EOIs. After the read that returned the cause, the line must go quiet:
 * at most one stray interrupt (a re-assert KVM injected asynchronously just before the
 * deassert; its ISR read returns 0, as a shared-IRQ driver expects) and none after it.
 * Prints "intx: interrupt received", "intx: re-asserted after EOI", "intx: quiet after the ISR
 * read" and exits 0; exits 3 on a timeout, 4 when the device is missing, 5 on a bad device or
 * an interrupt storm, 6 on any other vector.
 */
#include "common.inc"

#define CFG_COMMAND 0x04
#define CFG_BAR0 0x10
#define CFG_INTERRUPT_LINE 0x3c
#define CFG_INTERRUPT_PIN 0x3d
#define COMMAND_MEMORY 0x0002
#define COMMAND_INTX_DISABLE 0x0400
#define BAR_MEMORY_MASK 0xfffffff0
#define INTX 0x10
#define INTX_ISR 0x14
#define FIRST_PCI_GSI 16
#define IOAPIC_PINS 24
#define IOAPIC_BASE 0xfec00000
#define IOAPIC_WINDOW 0x10
#define IOAPIC_REDIRECTION 0x10
#define REDIRECTION_ACTIVE_LOW 0x2000
#define REDIRECTION_LEVEL 0x8000
#define TEST_VECTOR 0x42
#define WAIT_MS 2000
#define QUIET_MS 100
#define MAX_STRAY_INTERRUPTS 1

#include "interrupts.inc"

/*
 * Counts the interrupt; from the second one on, reads (and so clears) the device's ISR, which
 * deasserts the line; then EOIs.
 */
intx_handler:
    push %eax
    incl intx_interrupts
    cmpl $2, intx_interrupts
    jb 1f
    mov bar0, %eax
    mov INTX_ISR(%eax), %eax
    test %eax, %eax
    jz 1f
    mov %eax, isr_value
    mov intx_interrupts, %eax
    mov %eax, interrupts_at_clear
1:  call lapic_eoi
    IRQ_RETURN

/* ioapic_write: EAX = register index, EDX = value. */
ioapic_write:
    push %edi
    mov $IOAPIC_BASE, %edi
    mov %eax, (%edi)
    mov %edx, IOAPIC_WINDOW(%edi)
    pop %edi
    ret

main:
    mov $intx_handler, %eax
    call setup_idt
    call find_test_device
    test %esi, %esi
    jnz 1f
    PRINT "intx: test device not found on bus 0\n"
    mov $EXIT_NOT_FOUND, %eax
    ret

1:  mov CFG_BAR0(%esi), %eax
    and $BAR_MEMORY_MASK, %eax
    mov %eax, bar0
    test %eax, %eax
    jz bad_device
    movzbl CFG_INTERRUPT_PIN(%esi), %eax
    movzbl CFG_INTERRUPT_LINE(%esi), %ebx
    PRINT "intx: pin "
    call put_hex8
    PRINT " line "
    mov %ebx, %eax
    call put_hex8
    PRINT "\n"
    cmpb $1, CFG_INTERRUPT_PIN(%esi)
    jne bad_device
    cmp $FIRST_PCI_GSI, %ebx
    jb bad_device
    cmp $IOAPIC_PINS, %ebx
    jae bad_device

    movw CFG_COMMAND(%esi), %ax
    or $COMMAND_MEMORY, %ax
    and $~COMMAND_INTX_DISABLE, %ax
    movw %ax, CFG_COMMAND(%esi)

    /* Redirection entry for GSI EBX: APIC id 0, then vector, level, active-low, unmasked. */
    lea (IOAPIC_REDIRECTION + 1)(,%ebx,2), %eax
    xor %edx, %edx
    call ioapic_write
    lea IOAPIC_REDIRECTION(,%ebx,2), %eax
    mov $(TEST_VECTOR | REDIRECTION_LEVEL | REDIRECTION_ACTIVE_LOW), %edx
    call ioapic_write

    call enable_lapic
    sti

    mov bar0, %edi
    movl $1, INTX(%edi)
    mov $1, %eax
    call wait_for_interrupts
    test %eax, %eax
    jnz 3f
    PRINT "intx: interrupt received\n"
    mov $2, %eax
    call wait_for_interrupts
    test %eax, %eax
    jnz 3f
    PRINT "intx: re-asserted after EOI\n"
    cmpl $1, isr_value
    jne bad_isr
    mov $QUIET_MS, %eax
    call delay_ms
    mov intx_interrupts, %eax
    sub interrupts_at_clear, %eax
    cmp $MAX_STRAY_INTERRUPTS, %eax
    ja storm
    PRINT "intx: quiet after the ISR read ("
    call put_dec
    PRINT " stray)\n"
    xor %eax, %eax
3:  cli
    ret

storm:
    cli
    PRINT "intx: interrupts after the ISR read deasserted the line: "
    mov intx_interrupts, %eax
    call put_hex32
    PRINT "\n"
    mov $EXIT_BAD_VALUE, %eax
    ret

/* wait_for_interrupts: waits until EAX interrupts have arrived in total. Returns 0, or
   EXIT_TIMEOUT after printing the count. */
wait_for_interrupts:
    push %ecx
    mov %eax, %ecx
    call deadline_start
1:  cmp %ecx, intx_interrupts
    jae 2f
    mov $WAIT_MS, %eax
    call deadline_passed
    test %eax, %eax
    jz 1b
    PRINT "intx: timeout; interrupts="
    mov intx_interrupts, %eax
    call put_hex32
    PRINT "\n"
    mov $EXIT_TIMEOUT, %eax
    jmp 3f
2:  xor %eax, %eax
3:  pop %ecx
    ret

bad_isr:
    cli
    PRINT "intx: the ISR read returned "
    mov isr_value, %eax
    call put_hex32
    PRINT " after "
    mov intx_interrupts, %eax
    call put_hex32
    PRINT " interrupts\n"
    mov $EXIT_BAD_VALUE, %eax
    ret

bad_device:
    cli
    PRINT "intx: test device INTx unusable\n"
    mov $EXIT_BAD_VALUE, %eax
    ret

    .section .rodata
guest_name:
    .asciz "intx"

    .bss
    .balign 4
bar0:
    .long 0
intx_interrupts:
    .long 0
isr_value:
    .long 0
interrupts_at_clear:
    .long 0
    .text
