//! The entropy source: `getrandom(2)` with EINTR and short-read handling.

use std::io;

/// Fills `buf` entirely with random bytes from the kernel.
///
/// `getrandom` may return fewer bytes than asked (large requests, signals), so it loops until the
/// buffer is full; EINTR is retried.
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes that lives for the call;
        // the kernel writes at most that many bytes into it.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // `ret` is non-negative and at most `rest.len()`.
        filled += ret as usize;
    }
    Ok(())
}
