//! The few C runtime symbols the compiler expects (`memcpy`, `memmove`, `memset`, `memcmp`,
//! `bcmp`). The linux-gnu `compiler_builtins` leaves them to libc, which a freestanding kernel
//! does not link. Implemented with `rep movsq/stosq` (+ a byte tail) or plain byte loops that LLVM cannot turn
//! back into calls to themselves (the loops go through volatile reads).

use core::arch::asm;

/// # Safety
/// Standard C `memcpy` contract: valid, non-overlapping regions of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the regions are valid; DF is clear (SysV ABI). Quadwords
    // first, then the tail bytes: KVM's emulator (CPL0 on kvm_pvm) pays per iteration.
    unsafe {
        asm!("rep movsq", "mov ecx, {tail:e}", "rep movsb", tail = in(reg) n % 8,
             inout("rcx") n / 8 => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard C `memmove` contract: valid regions of `n` bytes, possibly overlapping.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dest is below src or the regions do not overlap.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: backward copy with DF set, restored before returning; regions valid per caller.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dest
}

/// # Safety
/// Standard C `memset` contract: `n` writable bytes at `dest`.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    let byte = u64::from(value as u8);
    // SAFETY: the caller guarantees the region is valid; DF is clear. Quadwords first, then
    // the tail bytes (as in `memcpy`); the low byte of rax is `value` for both.
    unsafe {
        asm!("rep stosq", "mov ecx, {tail:e}", "rep stosb", tail = in(reg) n % 8,
             inout("rcx") n / 8 => _, inout("rdi") dest => _,
             in("rax") byte.wrapping_mul(0x0101_0101_0101_0101),
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard C `memcmp` contract: `n` readable bytes at both pointers.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees n readable bytes; volatile keeps LLVM from
        // recognising this loop as memcmp and calling us recursively.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Same as `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}
