/*
 * crash: loads an empty IDT and executes UD2. With nowhere to deliver #UD the CPU escalates
 * to a triple fault (shutdown); sluice must report a crash (exit 121), not hang or exit 0.
 */
#include "common.inc"

main:
    PRINT "crash: ud2 with an empty IDT\n"
    lidt empty_idt_descriptor
    ud2
    /* Not reached; if it is, say so through the debug-exit port. */
    PRINT "crash: survived ud2\n"
    mov $EXIT_IGNORED, %eax
    ret

    .section .rodata
    .balign 8
empty_idt_descriptor:
    .word 0
    .long 0
    .text
