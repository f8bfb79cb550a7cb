/* exit_code: leaves through the debug-exit port with code 42 (sluice must exit with 42). */
#include "common.inc"

main:
    PRINT "exit_code: leaving with 42\n"
    mov $42, %eax
    ret
