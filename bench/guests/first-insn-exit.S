/* Startup probe: the very first guest instruction writes the debug-exit port, so the time from
 * spawning sluice to its exit bounds "process start -> first guest instruction" from above. */
    .section .note.Xen, "a", @note
    .align 4
    .long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start
    .text
    .code32
    .globl _start
_start:
    out %al, $0xf4          /* al is 0 at PVH entry: exit status 0 */
1:  hlt
    jmp 1b
