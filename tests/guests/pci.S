/*
 * pci: reads the vendor/device ID of 00:00.0 through configuration mechanism #1 (CF8/CFC) and
 * through ECAM, and of the absent function 00:1f.0, which must read as all ones. Prints
 *   cf8 id=VVVVDDDD / ecam id=VVVVDDDD / missing 00:1f.0 cf8=XXXXXXXX ecam=XXXXXXXX
 * and exits 0 when both paths agree on a present 00:00.0 and both read all ones for 00:1f.0.
 */
#include "common.inc"

#define CF8_ENABLE 0x80000000
#define MISSING_DEVICE 0x1f
#define CF8_MISSING (CF8_ENABLE | (MISSING_DEVICE << 11))
#define ECAM_MISSING (PCI_ECAM_BASE + (MISSING_DEVICE << 15))

/* cf8_read: EAX = CONFIG_ADDRESS value; returns the dword at CONFIG_DATA. */
cf8_read:
    push %edx
    mov $PCI_CONFIG_ADDRESS, %dx
    out %eax, %dx
    mov $PCI_CONFIG_DATA, %dx
    in %dx, %eax
    pop %edx
    ret

/* put_id: EAX = dword 0 of config space, printed as vendor then device (VVVVDDDD). */
put_id:
    push %eax
    call put_hex16
    shr $16, %eax
    call put_hex16
    pop %eax
    ret

main:
    mov $CF8_ENABLE, %eax
    call cf8_read
    mov %eax, %ebx
    PRINT "cf8 id="
    call put_id
    PRINT "\n"

    mov $PCI_ECAM_BASE, %esi
    mov (%esi), %ecx
    PRINT "ecam id="
    mov %ecx, %eax
    call put_id
    PRINT "\n"

    mov $CF8_MISSING, %eax
    call cf8_read
    mov %eax, %edx
    mov $ECAM_MISSING, %esi
    mov (%esi), %edi
    PRINT "missing 00:1f.0 cf8="
    mov %edx, %eax
    call put_hex32
    PRINT " ecam="
    mov %edi, %eax
    call put_hex32
    PRINT "\n"

    cmp $0xffffffff, %ebx
    je 1f
    cmp %ebx, %ecx
    jne 1f
    cmp $0xffffffff, %edx
    jne 1f
    cmp $0xffffffff, %edi
    jne 1f
    PRINT "pci: ok\n"
    xor %eax, %eax
    ret
1:  PRINT "pci: unexpected configuration values\n"
    mov $EXIT_BAD_VALUE, %eax
    ret
