//! Synchronous host I/O on a [`DiskImage`]: the fallback engine, and the slow path the
//! io_uring engine takes for what a ring cannot do whole (short transfers, buffers O_DIRECT
//! will not take, file systems without `fallocate` modes).
//!
//! Thin `libc` calls: no well-kept crate offers vectored positional I/O on raw host pointers
//! into guest RAM.

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::RawFd;

use sluice_dma::GuestIovecs;

use crate::image::DiskImage;
use crate::Extent;

/// Direction of a data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// File → guest memory.
    Read,
    /// Guest memory → file.
    Write,
}

/// Most iovecs one `preadv`/`pwritev` accepts (UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;
/// Smallest alignment of O_DIRECT bounce buffers (covers 512- and 4096-byte devices).
const BOUNCE_ALIGN: usize = 4096;

/// Whether `iov` at `offset` can go to the kernel as it is.
pub fn kernel_ready(image: &DiskImage, iov: &GuestIovecs, offset: u64) -> bool {
    let align = image.alignment();
    iov.as_slice().len() <= MAX_IOVECS
        && iov.is_aligned(align.memory, align.offset)
        && range_aligned(image, offset, iov.len() as u64)
}

/// Whether a byte range starts and ends on the host's direct-I/O boundaries.
fn range_aligned(image: &DiskImage, offset: u64, len: u64) -> bool {
    let block = image.alignment().offset as u64;
    offset.is_multiple_of(block) && len.is_multiple_of(block)
}

/// Transfers the whole of `iov` at `offset`, resuming after `done` bytes already moved (a short
/// transfer from io_uring). Retries short transfers; end of file is an error, never success.
pub fn transfer(
    image: &DiskImage,
    direction: Direction,
    iov: &GuestIovecs,
    offset: u64,
    done: usize,
) -> io::Result<()> {
    if image.is_direct() && !range_aligned(image, offset, iov.len() as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} bytes at {offset} is not aligned to the host's {}-byte blocks (O_DIRECT)",
                iov.len(),
                image.alignment().offset
            ),
        ));
    }
    let align = image.alignment();
    if image.is_direct() && (done != 0 || !iov.is_aligned(align.memory, align.offset)) {
        return bounce_transfer(image, direction, iov, offset);
    }
    let result = vectored_loop(image.fd(), direction, tail(iov, done), offset, done);
    match result {
        Err(e) if image.is_direct() && e.raw_os_error() == Some(libc::EINVAL) => {
            bounce_transfer(image, direction, iov, offset)
        }
        other => other,
    }
}

/// The iovecs left after the first `skip` bytes.
fn tail(iov: &GuestIovecs, mut skip: usize) -> Vec<libc::iovec> {
    let mut rest = Vec::with_capacity(iov.as_slice().len());
    for v in iov.as_slice() {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        rest.push(libc::iovec {
            // SAFETY: skip < iov_len, so the result stays inside this iovec's buffer.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(skip) }.cast(),
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    rest
}

fn vectored_loop(
    fd: RawFd,
    direction: Direction,
    mut iov: Vec<libc::iovec>,
    offset: u64,
    done: usize,
) -> io::Result<()> {
    let mut position = offset
        .checked_add(done as u64)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut first = 0;
    while first < iov.len() {
        let batch = &iov[first..iov.len().min(first + MAX_IOVECS)];
        let moved = positional_vectored(fd, direction, batch, position)?;
        if moved == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short transfer at the end of the image",
            ));
        }
        position += moved as u64;
        advance(&mut iov, &mut first, moved);
    }
    Ok(())
}

fn positional_vectored(
    fd: RawFd,
    direction: Direction,
    iov: &[libc::iovec],
    position: u64,
) -> io::Result<usize> {
    let offset = libc::off_t::try_from(position)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: `iov` holds at most MAX_IOVECS entries, each a live buffer in guest memory
        // (kept mapped by its GuestIovecs) or a bounce buffer of the given length; the kernel
        // only accesses those bytes.
        let ret = unsafe {
            match direction {
                Direction::Read => libc::preadv(fd, iov.as_ptr(), iov.len() as i32, offset),
                Direction::Write => libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, offset),
            }
        };
        if ret >= 0 {
            return Ok(ret as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Consumes `moved` bytes from the front of `iov[*first..]`.
fn advance(iov: &mut [libc::iovec], first: &mut usize, mut moved: usize) {
    while moved > 0 && *first < iov.len() {
        let v = &mut iov[*first];
        if moved >= v.iov_len {
            moved -= v.iov_len;
            *first += 1;
        } else {
            // SAFETY: moved < iov_len, the pointer stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(moved) }.cast();
            v.iov_len -= moved;
            moved = 0;
        }
    }
}

/// A zeroed heap buffer aligned for O_DIRECT.
struct AlignedBuffer {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuffer {
    fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(BOUNCE_ALIGN))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(AlignedBuffer { ptr, layout })
    }

    fn iovec(&self, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: len.min(self.layout.size()),
        }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}

/// O_DIRECT transfer through an aligned bounce buffer, for guest buffers the kernel will not
/// take directly. The whole request is redone: rewriting bytes already moved is harmless, and
/// the range itself is aligned (checked by `transfer`).
fn bounce_transfer(
    image: &DiskImage,
    direction: Direction,
    iov: &GuestIovecs,
    offset: u64,
) -> io::Result<()> {
    let len = iov.len();
    let bounce = AlignedBuffer::new(len, image.alignment().memory)?;
    if direction == Direction::Write {
        copy_between(iov, bounce.ptr, Direction::Write);
    }
    vectored_loop(image.fd(), direction, vec![bounce.iovec(len)], offset, 0)?;
    if direction == Direction::Read {
        copy_between(iov, bounce.ptr, Direction::Read);
    }
    Ok(())
}

/// Copies guest iovecs into `buffer` (Write) or `buffer` into guest iovecs (Read).
fn copy_between(iov: &GuestIovecs, buffer: *mut u8, direction: Direction) {
    let mut at = 0usize;
    for v in iov.as_slice() {
        // SAFETY: `buffer` holds iov.len() bytes and `at + iov_len <= iov.len()`; each iovec is
        // a live guest buffer; the bounce buffer and guest memory never overlap.
        unsafe {
            let bounce = buffer.add(at);
            let guest = v.iov_base.cast::<u8>();
            match direction {
                Direction::Write => std::ptr::copy_nonoverlapping(guest, bounce, v.iov_len),
                Direction::Read => std::ptr::copy_nonoverlapping(bounce, guest, v.iov_len),
            }
        }
        at += v.iov_len;
    }
}

/// Makes written data durable.
pub fn flush(image: &DiskImage) -> io::Result<()> {
    // SAFETY: fdatasync on an fd the image owns.
    let ret = unsafe { libc::fdatasync(image.fd()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// fallocate mode for a discard: deallocate, keep the file size.
pub const DISCARD_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// fallocate mode for write zeroes (with `may_unmap` the range may be deallocated: a hole
/// reads zero).
pub fn write_zeroes_mode(extent: &Extent) -> i32 {
    if extent.may_unmap {
        DISCARD_MODE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

fn fallocate(fd: RawFd, mode: i32, extent: &Extent) -> io::Result<()> {
    let offset = libc::off_t::try_from(extent.offset)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = libc::off_t::try_from(extent.len)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate on an fd the image owns; no memory is passed.
    let ret = unsafe { libc::fallocate(fd, mode, offset, len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Discards one extent. Discard is a hint, so a file system without hole punching is fine.
pub fn discard(image: &DiskImage, extent: &Extent) -> io::Result<()> {
    if extent.len == 0 {
        return Ok(());
    }
    discard_result(fallocate(image.fd(), DISCARD_MODE, extent))
}

/// Maps a discard's outcome: "not supported" is success.
pub fn discard_result(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        other => other,
    }
}

/// Zeroes one extent; falls back to writing zero blocks where fallocate cannot.
pub fn write_zeroes(image: &DiskImage, extent: &Extent) -> io::Result<()> {
    if extent.len == 0 {
        return Ok(());
    }
    match fallocate(image.fd(), write_zeroes_mode(extent), extent) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zero_blocks(image, extent),
        other => other,
    }
}

/// The slow path of write zeroes: plain writes of an aligned zero buffer.
pub fn write_zero_blocks(image: &DiskImage, extent: &Extent) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = AlignedBuffer::new(CHUNK as usize, image.alignment().memory)?;
    let mut offset = extent.offset;
    let end = offset.saturating_add(extent.len);
    while offset < end {
        let len = (end - offset).min(CHUNK) as usize;
        vectored_loop(
            image.fd(),
            Direction::Write,
            vec![zeros.iovec(len)],
            offset,
            0,
        )?;
        offset += len as u64;
    }
    Ok(())
}
