//! The vhost-user dirty log: a bitmap in memory shared between a frontend and its backend
//! (VHOST_USER_SET_LOG_BASE with VHOST_USER_PROTOCOL_F_LOG_SHMFD). Bit `n` of byte `n / 8`
//! (bit `n % 8`) stands for the 4 KiB page of guest physical memory at `n * 4096`; the
//! backend sets bits with byte-wide atomic ORs (vhost-user spec, "Migration"), the frontend
//! reads and clears whole words with atomic swaps. x86 makes the mixed widths coherent, and
//! QEMU's frontend and libvhost-user use the same widths.
//!
//! Both ends are here because the layout is one fact: sluice's vhost-user-blk frontend
//! creates a log ([`SharedLog::create`]), `sluice serve` maps the one it is sent
//! ([`SharedLog::map`]) and installs it on its queues' spaces as their
//! [`DeviceWriteLog`](crate::dirty::DeviceWriteLog). Hand-written: the bitmap is a few lines and
//! no crate shares one across processes.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion};

use crate::dirty::DeviceWriteLog;

const PAGE_SHIFT: u32 = 12;
/// Guest bytes one byte of the log covers (8 pages).
const BYTE_SPAN: u64 = 8 << PAGE_SHIFT;

/// Bytes of log covering guest physical addresses `0..end` (rounded up to whole 64-bit
/// words, as QEMU sizes its log).
pub fn log_bytes_for(end: u64) -> u64 {
    end.div_ceil(BYTE_SPAN).div_ceil(8) * 8
}

/// A mapped log.
#[derive(Debug)]
pub struct SharedLog {
    mapping: MmapRegion,
}

impl SharedLog {
    /// A new zeroed log of `bytes` (a multiple of 8) in a sealed memfd, and the file to send.
    pub fn create(bytes: u64) -> io::Result<(Self, File)> {
        usize::try_from(bytes)
            .ok()
            .filter(|&s| s > 0 && s % 8 == 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad log size"))?;
        // SAFETY: the name is a NUL-terminated literal; the return value is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"sluice-dirty-log".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes)?;
        // A backend mapping a shrinkable file could be made to fault (SIGBUS) by shrinking it.
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own; the return value is checked.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let log = Self::map(&file, bytes, 0)?;
        Ok((log, file))
    }

    /// Maps `size` bytes of `file` at `offset`. The caller has checked them against the file
    /// (a mapping past its end faults on first touch); `offset` must be page-aligned.
    pub fn map(file: &File, size: u64, offset: u64) -> io::Result<Self> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(|| invalid("empty log"))?;
        if !offset.is_multiple_of(1 << PAGE_SHIFT) {
            return Err(invalid("log offset not page-aligned"));
        }
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file.try_clone()?, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { mapping })
    }

    /// Where the mapping is and how long (for a SIGBUS watch).
    pub fn host_range(&self) -> (usize, usize) {
        (self.mapping.as_ptr() as usize, self.mapping.size())
    }

    /// Log bytes.
    pub fn len(&self) -> usize {
        self.mapping.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Highest guest physical address (exclusive) the log covers.
    pub fn covers(&self) -> u64 {
        (self.len() as u64).saturating_mul(BYTE_SPAN)
    }

    fn byte(&self, index: usize) -> Option<&AtomicU8> {
        if index >= self.len() {
            return None;
        }
        // SAFETY: `index` is inside the mapping, which lives as long as `self`; AtomicU8 has
        // the layout of u8 and every access to the shared bytes is atomic.
        Some(unsafe { AtomicU8::from_ptr(self.mapping.as_ptr().add(index)) })
    }

    fn word(&self, index: usize) -> Option<&AtomicU64> {
        let at = index.checked_mul(8)?;
        if at.checked_add(8)? > self.len() {
            return None;
        }
        // SAFETY: the eight bytes are inside the mapping (page-aligned, so the word is
        // aligned), which lives as long as `self`; every access to them is atomic.
        Some(unsafe { AtomicU64::from_ptr(self.mapping.as_ptr().add(at).cast()) })
    }

    /// Sets the bits of every page of `gpa..gpa+len`; pages past the log are ignored.
    pub fn mark_range(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> PAGE_SHIFT;
        let last = (gpa.saturating_add(len - 1) >> PAGE_SHIFT)
            .min((self.covers() >> PAGE_SHIFT).saturating_sub(1));
        let mut page = first;
        while page <= last {
            let byte = (page / 8) as usize;
            let bit = page % 8;
            let count = (8 - bit).min(last - page + 1);
            let mask = (((1u16 << count) - 1) << bit) as u8;
            match self.byte(byte) {
                Some(b) => {
                    b.fetch_or(mask, Ordering::Release);
                }
                None => return,
            }
            page += count;
        }
    }

    /// The pages whose bits are set (guest physical page numbers, ascending), clearing them.
    pub fn take(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        let mut index = 0;
        while let Some(word) = self.word(index) {
            // The log is little-endian: byte k of the word is bits 8k..8k+7.
            let mut bits = u64::from_le(word.swap(0, Ordering::AcqRel));
            while bits != 0 {
                pages.push(index as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
            index += 1;
        }
        pages
    }
}

impl DeviceWriteLog for SharedLog {
    fn mark(&self, gpa: u64, len: u64) {
        self.mark_range(gpa, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_pages_of_guest_physical_memory_and_take_clears() {
        let (log, _file) = SharedLog::create(log_bytes_for(1 << 20)).unwrap();
        assert_eq!(log.len(), 32);

        log.mark_range(0x1ff0, 0x20); // pages 1, 2
        log.mark_range(0x3f000, 0x3000); // pages 63..=65: across a word
        log.mark_range(0xff000, 1); // the last page
        let first = log.take();
        log.mark_range(0x5000, 1);

        assert_eq!(first, vec![1, 2, 63, 64, 65, 255]);
        assert_eq!(log.take(), vec![5]);
        assert!(log.take().is_empty());
    }

    #[test]
    fn marks_past_the_log_or_wrapping_are_ignored() {
        let (log, _file) = SharedLog::create(8).unwrap();

        log.mark_range(u64::MAX - 2, 100);
        log.mark_range(64 << 12, 1 << 12);
        log.mark_range(63 << 12, u64::MAX);
        log.mark_range(0, 0);

        assert_eq!(log.take(), vec![63]);
    }

    #[test]
    fn two_mappings_of_one_file_see_each_others_bits() {
        let (frontend, file) = SharedLog::create(16).unwrap();
        let backend = SharedLog::map(&file, 16, 0).unwrap();

        backend.mark_range(0x7_0000, 0x2000); // pages 112, 113

        assert_eq!(frontend.take(), vec![112, 113]);
        assert!(backend.take().is_empty());
    }
}
