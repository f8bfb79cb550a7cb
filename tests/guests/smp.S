/*
 * smp (run with --cpus 2): the BSP copies a real-mode trampoline to 0x10000, wakes APIC id 1
 * with INIT, SIPI, SIPI (vector 0x10 -> CS:IP 1000:0000) and waits up to 3 s for the AP to
 * report in a low-memory mailbox. The AP writes its initial APIC id (CPUID.1:EBX[31:24]) and then
 * a magic value. Prints "smp: ap apic id N up" and exits 0; exits 3 on timeout.
 */
#include "common.inc"

#define TRAMPOLINE_BASE 0x10000
#define SIPI_VECTOR (TRAMPOLINE_BASE >> 12)
/* Mailbox inside the trampoline page: segment 0x1000, offsets below. */
#define MAILBOX_OFFSET 0x800
#define MAILBOX_APIC_ID (TRAMPOLINE_BASE + MAILBOX_OFFSET)
#define MAILBOX_MAGIC (TRAMPOLINE_BASE + MAILBOX_OFFSET + 4)
#define AP_MAGIC 0x5a4d5055
#define AP_APIC_ID 1

#define ICR_DELIVERY_INIT 0x0500
#define ICR_DELIVERY_STARTUP 0x0600
#define ICR_LEVEL_ASSERT 0x4000
#define ICR_SEND_PENDING 0x1000
#define SVR_APIC_ENABLE 0x100
#define SVR_SPURIOUS_VECTOR 0xff
#define AP_WAIT_MS 3000

/* send_ipi: EAX = ICR low value, for APIC id AP_APIC_ID; waits (bounded) until it is sent. */
send_ipi:
    push %ecx
    push %edi
    mov $LAPIC_BASE, %edi
    movl $(AP_APIC_ID << 24), LAPIC_ICR_HIGH(%edi)
    mov %eax, LAPIC_ICR_LOW(%edi)
    mov $100000, %ecx
1:  testl $ICR_SEND_PENDING, LAPIC_ICR_LOW(%edi)
    jz 2f
    pause
    loop 1b
2:  pop %edi
    pop %ecx
    ret

main:
    /* A software-enabled local APIC, as an OS would have before starting APs. */
    mov $LAPIC_BASE, %edi
    mov LAPIC_SVR(%edi), %eax
    or $(SVR_APIC_ENABLE | SVR_SPURIOUS_VECTOR), %eax
    mov %eax, LAPIC_SVR(%edi)

    mov $ap_trampoline, %esi
    mov $TRAMPOLINE_BASE, %edi
    mov $(ap_trampoline_end - ap_trampoline), %ecx
    rep movsb
    mov $MAILBOX_APIC_ID, %edi
    movl $0xffffffff, (%edi)
    movl $0, 4(%edi)

    PRINT "smp: sending INIT-SIPI-SIPI\n"
    mov $(ICR_DELIVERY_INIT | ICR_LEVEL_ASSERT), %eax
    call send_ipi
    mov $10, %eax
    call delay_ms
    mov $(ICR_DELIVERY_STARTUP | ICR_LEVEL_ASSERT | SIPI_VECTOR), %eax
    call send_ipi
    mov $1, %eax
    call delay_ms
    mov $(ICR_DELIVERY_STARTUP | ICR_LEVEL_ASSERT | SIPI_VECTOR), %eax
    call send_ipi

    mov $MAILBOX_APIC_ID, %edi
    call deadline_start
1:  cmpl $AP_MAGIC, 4(%edi)
    je 2f
    pause
    mov $AP_WAIT_MS, %eax
    call deadline_passed
    test %eax, %eax
    jz 1b
    PRINT "smp: timeout waiting for the AP\n"
    mov $EXIT_TIMEOUT, %eax
    ret

2:  PRINT "smp: ap apic id "
    mov (%edi), %eax
    call put_dec
    PRINT " up\n"
    xor %eax, %eax
    ret

/* The AP starts here in real mode at 1000:0000 (copied; position independent). */
    .code16
ap_trampoline:
    cli
    mov %cs, %ax
    mov %ax, %ds
    mov $1, %eax
    cpuid
    shr $24, %ebx
    movl %ebx, MAILBOX_OFFSET
    movl $AP_MAGIC, MAILBOX_OFFSET + 4
1:  hlt
    jmp 1b
ap_trampoline_end:
    .code32
