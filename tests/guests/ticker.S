/* ticker: prints "tick N" for N = 1..12, about 200 ms apart by the ACPI PM timer, then "done"
   and exits 0. Nothing but CPU state, memory and COM1 carries it from tick to tick, so a VM
   snapshotted between two ticks and restored goes on counting where it stopped. */
#include "common.inc"

#define TICKS 12

main:
    mov $1, %ebx
1:  PRINT "tick "
    mov %ebx, %eax
    call put_dec
    PRINT "\n"
    mov $200, %eax
    call delay_ms
    inc %ebx
    cmp $TICKS, %ebx
    jbe 1b
    PRINT "done\n"
    xor %eax, %eax
    ret
