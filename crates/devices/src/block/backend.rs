//! The disk image and the host I/O on it: opening and locking the file, synchronous
//! `preadv`/`pwritev`/`fdatasync`/`fallocate` helpers (the fallback path, and the slow path for
//! short transfers and unaligned O_DIRECT buffers), and the io_uring ring with its eventfd.
//!
//! io_uring comes from the `io-uring` crate; the few syscall wrappers here are thin `libc` calls
//! because no well-kept crate offers vectored positional I/O on raw host pointers into guest RAM.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use io_uring::IoUring;
use sluice_dma::DmaSpace;
use vm_memory::{GuestMemory, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::BlockError;
use super::request::{GuestBuffer, Segment, SECTOR_SIZE};

/// An open, locked disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    direct: bool,
}

impl DiskImage {
    /// Opens `path` (read-write unless `read_only`, O_DIRECT if `direct`), takes an exclusive
    /// `flock` (shared when read-only) so two VMs cannot write one image, and reads its size.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, BlockError> {
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        lock_image(&file, path, read_only)?;
        let size = image_size(&file).map_err(|source| BlockError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedSize {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(DiskImage {
            file,
            path: path.to_path_buf(),
            size,
            direct,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

fn lock_image(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let kind = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let ret = unsafe { libc::flock(file.as_raw_fd(), kind | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(BlockError::Locked {
            path: path.to_path_buf(),
        })
    } else {
        Err(BlockError::Lock {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// The size of a regular file or of a block device.
fn image_size(file: &File) -> io::Result<u64> {
    let metadata = file.metadata()?;
    if metadata.is_file() {
        return Ok(metadata.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at a live local.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &raw mut size) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Host iovecs pointing into guest memory for one request's data.
#[derive(Debug)]
pub struct HostIovecs {
    iovecs: Vec<libc::iovec>,
    len: usize,
}

// SAFETY: the pointers refer to guest RAM, a shared mapping that every queue worker thread
// already accesses; the handler keeps the mapping alive (see `BlockQueueHandler`) while these
// exist, and the pointers are only dereferenced by the kernel or by the copy helpers below.
unsafe impl Send for HostIovecs {}

impl HostIovecs {
    /// Resolves guest buffers through the DmaSpace; `None` if any part is not accessible with
    /// `access` (the guest gave a bad address, or the IOMMU refuses it).
    pub fn resolve(
        mem: &DmaSpace,
        buffers: &[GuestBuffer],
        access: Permissions,
    ) -> Option<HostIovecs> {
        let mut iovecs = Vec::with_capacity(buffers.len());
        let mut len = 0usize;
        for buffer in buffers {
            let slices = mem
                .get_slices(buffer.addr, buffer.len as usize, access)
                .ok()?;
            for slice in slices {
                let slice = slice.ok()?;
                let ptr = match access {
                    Permissions::Write => slice.ptr_guard_mut().as_ptr(),
                    _ => slice.ptr_guard().as_ptr() as *mut u8,
                };
                iovecs.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: slice.len(),
                });
                len = len.checked_add(slice.len())?;
            }
        }
        Some(HostIovecs { iovecs, len })
    }

    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether O_DIRECT can use the guest buffers as they are.
    pub fn is_aligned(&self, align: usize) -> bool {
        self.iovecs
            .iter()
            .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(align))
    }

    /// The iovecs left after the first `skip` bytes.
    fn tail(&self, mut skip: usize) -> Vec<libc::iovec> {
        let mut rest = Vec::with_capacity(self.iovecs.len());
        for v in &self.iovecs {
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
}

/// Direction of a data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// File → guest (IN).
    Read,
    /// Guest → file (OUT).
    Write,
}

/// Most iovecs one `preadv`/`pwritev` accepts (UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;
/// Alignment used for O_DIRECT bounce buffers (covers 512- and 4096-byte block devices).
const DIRECT_ALIGN: usize = 4096;

/// Transfers the whole of `iov` at `offset`, resuming after `done` bytes already moved (a short
/// transfer from io_uring). Retries short transfers; end of file is an error, never success.
pub fn transfer_rest(
    image: &DiskImage,
    direction: Direction,
    iov: &HostIovecs,
    offset: u64,
    done: usize,
) -> io::Result<()> {
    if image.is_direct() && (done != 0 || !iov.is_aligned(SECTOR_SIZE as usize)) {
        return bounce_transfer(image.fd(), direction, iov, offset);
    }
    let result = vectored_loop(image.fd(), direction, iov.tail(done), offset, done);
    match result {
        Err(e) if image.is_direct() && e.raw_os_error() == Some(libc::EINVAL) => {
            bounce_transfer(image.fd(), direction, iov, offset)
        }
        other => other,
    }
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
        // (or a bounce buffer) of the given length; the kernel only accesses those bytes.
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
    fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), DIRECT_ALIGN)
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

/// O_DIRECT transfer through an aligned bounce buffer, for guest buffers the device cannot
/// hand to the kernel directly. The whole request is redone: rewriting bytes already moved is
/// harmless, and the request range itself is sector aligned.
fn bounce_transfer(
    fd: RawFd,
    direction: Direction,
    iov: &HostIovecs,
    offset: u64,
) -> io::Result<()> {
    let len = iov.len();
    let bounce = AlignedBuffer::new(len)?;
    if direction == Direction::Write {
        copy_between(iov, bounce.ptr, Direction::Write);
    }
    vectored_loop(fd, direction, vec![bounce.iovec(len)], offset, 0)?;
    if direction == Direction::Read {
        copy_between(iov, bounce.ptr, Direction::Read);
    }
    Ok(())
}

/// Copies guest iovecs into `buffer` (Write) or `buffer` into guest iovecs (Read).
fn copy_between(iov: &HostIovecs, buffer: *mut u8, direction: Direction) {
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

/// Makes written data durable (FLUSH).
pub fn flush(image: &DiskImage) -> io::Result<()> {
    // SAFETY: fdatasync on an fd we own.
    let ret = unsafe { libc::fdatasync(image.fd()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// fallocate mode for DISCARD: deallocate, keep the file size.
pub const DISCARD_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// fallocate mode for WRITE_ZEROES (with UNMAP the range may be deallocated: a hole reads zero).
pub fn write_zeroes_mode(segment: &Segment) -> i32 {
    if segment.unmap {
        DISCARD_MODE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

fn fallocate(fd: RawFd, mode: i32, segment: &Segment) -> io::Result<()> {
    let offset = libc::off_t::try_from(segment.offset())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = libc::off_t::try_from(segment.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let ret = unsafe { libc::fallocate(fd, mode, offset, len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// DISCARD one segment. Discard is a hint, so a file system without hole punching is fine.
pub fn discard(image: &DiskImage, segment: &Segment) -> io::Result<()> {
    if segment.is_empty() {
        return Ok(());
    }
    discard_result(fallocate(image.fd(), DISCARD_MODE, segment))
}

/// Maps a discard's outcome: "not supported" is success.
pub fn discard_result(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        other => other,
    }
}

/// WRITE_ZEROES one segment; falls back to writing zero blocks where fallocate cannot.
pub fn write_zeroes(image: &DiskImage, segment: &Segment) -> io::Result<()> {
    if segment.is_empty() {
        return Ok(());
    }
    match fallocate(image.fd(), write_zeroes_mode(segment), segment) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zero_blocks(image, segment),
        other => other,
    }
}

/// The slow path for write zeroes: plain writes of an aligned zero buffer.
pub fn write_zero_blocks(image: &DiskImage, segment: &Segment) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = AlignedBuffer::new(CHUNK as usize)?;
    let mut offset = segment.offset();
    let end = offset + segment.len();
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

/// One io_uring ring with an eventfd that is signalled on every completion.
pub struct Uring {
    pub ring: IoUring,
    eventfd: EventFd,
}

impl Uring {
    /// Sets up a ring of `entries` submission slots (rounded up to a power of two) with a
    /// completion queue twice that size, and registers the eventfd.
    pub fn new(entries: u32) -> io::Result<Self> {
        let entries = entries.clamp(1, 4096).next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Uring { ring, eventfd })
    }

    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Clears the eventfd before reaping, so a completion posted afterwards wakes us again.
    pub fn clear_eventfd(&self) {
        // EAGAIN just means nothing was signalled.
        let _ = self.eventfd.read();
    }

    /// Completion queue capacity: the most operations that may be in flight.
    pub fn max_in_flight(&mut self) -> usize {
        self.ring.completion().capacity()
    }
}

/// Whether io_uring can be set up here (not blocked by seccomp, an old kernel, or a sysctl).
pub fn io_uring_available() -> bool {
    Uring::new(2).is_ok()
}
