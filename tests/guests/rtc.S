/*
 * rtc: reads the MC146818 clock through ports 0x70/0x71 and prints it as
 *   rtc CCYY-MM-DD HH:MM:SS
 * decoding BCD or binary and 12- or 24-hour mode as status register B says. The fields are read
 * until two passes agree, so a read that straddles an update is not reported.
 */
#include "common.inc"

#define RTC_INDEX_PORT 0x70
#define RTC_DATA_PORT 0x71
#define RTC_STATUS_A 0x0a
#define RTC_STATUS_B 0x0b
#define STATUS_A_UPDATE_IN_PROGRESS 0x80
#define STATUS_B_24_HOUR 0x02
#define STATUS_B_BINARY 0x04
#define HOUR_PM 0x80
#define FIELD_COUNT 7
#define READ_ATTEMPTS 5

/* Field order in the buffers: seconds, minutes, hours, day, month, year, century. */
#define F_SEC 0
#define F_MIN 1
#define F_HOUR 2
#define F_DAY 3
#define F_MONTH 4
#define F_YEAR 5
#define F_CENTURY 6

/* rtc_read: AL = register index; returns its value zero-extended in EAX. */
rtc_read:
    out %al, $RTC_INDEX_PORT
    in $RTC_DATA_PORT, %al
    movzbl %al, %eax
    ret

/* wait_no_update: waits (at most 20 ms) while the clock says an update is in progress. */
wait_no_update:
    call deadline_start
1:  mov $RTC_STATUS_A, %al
    call rtc_read
    test $STATUS_A_UPDATE_IN_PROGRESS, %al
    jz 2f
    mov $20, %eax
    call deadline_passed
    test %eax, %eax
    jz 1b
2:  ret

/* read_fields: EDI = FIELD_COUNT-byte buffer, filled from the registers in field_registers. */
read_fields:
    push %ecx
    push %esi
    push %edi
    mov $field_registers, %esi
    mov $FIELD_COUNT, %ecx
1:  lodsb
    call rtc_read
    stosb
    loop 1b
    pop %edi
    pop %esi
    pop %ecx
    ret

/* to_binary: AL = field value; converted from BCD unless status B says binary. */
to_binary:
    testb $STATUS_B_BINARY, status_b
    jnz 1f
    push %ecx
    movzbl %al, %eax
    mov %eax, %ecx
    shr $4, %eax
    imul $10, %eax, %eax
    and $0xf, %ecx
    add %ecx, %eax
    pop %ecx
1:  movzbl %al, %eax
    ret

/* put_field: ESI = index into current; prints the decoded value as two digits. */
put_field:
    movzbl current(%esi), %eax
    call to_binary
    call put_dec2
    ret

main:
    mov $READ_ATTEMPTS, %ecx
1:  call wait_no_update
    mov $RTC_STATUS_B, %al
    call rtc_read
    mov %al, status_b
    mov $current, %edi
    call read_fields
    mov $previous, %edi
    call read_fields
    mov $current, %esi
    mov $previous, %edi
    push %ecx
    mov $FIELD_COUNT, %ecx
    repe cmpsb
    pop %ecx
    je 2f
    loop 1b
    PRINT "rtc: the clock never held still\n"
    mov $EXIT_BAD_VALUE, %eax
    ret

2:  PRINT "rtc: status B="
    movzbl status_b, %eax
    call put_hex8
    PRINT "\nrtc "
    mov $F_CENTURY, %esi
    call put_field
    mov $F_YEAR, %esi
    call put_field
    PRINT "-"
    mov $F_MONTH, %esi
    call put_field
    PRINT "-"
    mov $F_DAY, %esi
    call put_field
    PRINT " "
    call put_hour
    PRINT ":"
    mov $F_MIN, %esi
    call put_field
    PRINT ":"
    mov $F_SEC, %esi
    call put_field
    PRINT "\n"
    xor %eax, %eax
    ret

/* put_hour: prints the hour in 24-hour form whatever mode the clock runs in. */
put_hour:
    push %ebx
    movzbl current + F_HOUR, %ebx
    mov %ebx, %eax
    and $~HOUR_PM, %eax
    call to_binary
    testb $STATUS_B_24_HOUR, status_b
    jnz 2f
    /* 12-hour mode: 12 AM is 00, 12 PM is 12, other PM hours add 12. */
    cmp $12, %eax
    jne 1f
    xor %eax, %eax
1:  test $HOUR_PM, %ebx
    jz 2f
    add $12, %eax
2:  call put_dec2
    pop %ebx
    ret

    .section .rodata
field_registers:
    .byte 0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32

    .bss
status_b:
    .byte 0
current:
    .skip FIELD_COUNT
previous:
    .skip FIELD_COUNT
    .text
