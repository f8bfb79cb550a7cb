/* hello: prints a greeting and leaves through the debug-exit port with code 0. */
#include "common.inc"

main:
    PRINT "hello from the guest\n"
    xor %eax, %eax
    ret
