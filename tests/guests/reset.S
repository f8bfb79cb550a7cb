/* reset: pulses the CPU reset line through the i8042 (command 0xfe); sluice must exit 120. */
#include "common.inc"

#define I8042_COMMAND_PORT 0x64
#define I8042_PULSE_RESET 0xfe

main:
    PRINT "reset: asking the i8042 for a reset\n"
    mov $I8042_PULSE_RESET, %al
    out %al, $I8042_COMMAND_PORT
    mov $1000, %eax
    call delay_ms
    PRINT "reset: still running\n"
    mov $EXIT_IGNORED, %eax
    ret
