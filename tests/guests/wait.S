/* wait: says it is waiting, then halts with interrupts off until the VMM stops it. */
#include "common.inc"

main:
    PRINT "waiting\n"
    cli
1:  hlt
    jmp 1b
