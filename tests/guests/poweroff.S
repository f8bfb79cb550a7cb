/* poweroff: ACPI S5 through PM1a_CNT (SLP_TYP = 5, SLP_EN); sluice must exit 0. */
#include "common.inc"

#define PM1A_CNT_PORT 0x604
#define SLP_TYP_S5 5
#define SLP_EN (1 << 13)

main:
    PRINT "poweroff: entering S5\n"
    mov $PM1A_CNT_PORT, %dx
    mov $((SLP_TYP_S5 << 10) | SLP_EN), %ax
    out %ax, %dx
    /* Still running: the write was ignored. Say so through the debug-exit port. */
    mov $1000, %eax
    call delay_ms
    PRINT "poweroff: still running\n"
    mov $EXIT_IGNORED, %eax
    ret
