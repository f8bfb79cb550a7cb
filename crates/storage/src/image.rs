//! The disk image: open (read-write or read-only, page cache or O_DIRECT), lock the way QEMU
//! does ([`crate::lock`]), and learn its size and the block size the host needs.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::lock::{lock_image, LockError};

/// Bytes per sector in the block protocols sluice serves (virtio-blk; NVMe formats too).
pub const SECTOR_SIZE: u64 = 512;
/// Largest logical block size a device advertises.
pub const MAX_BLOCK_SIZE: u32 = 4096;

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "disk image {path} is in use by another process (QEMU, qemu-storage-daemon, qemu-img \
         or another sluice): {reason}"
    )]
    Locked { path: PathBuf, reason: LockError },
    #[error("cannot lock disk image {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot read the size of disk image {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("disk image {path} is empty (0 bytes): a disk needs at least one sector")]
    Empty { path: PathBuf },
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    UnalignedSize { path: PathBuf, size: u64 },
    #[error("cannot learn the block size {path} needs: {source}")]
    BlockSize { path: PathBuf, source: io::Error },
}

/// What O_DIRECT asks of each transfer: its file offset and length must be multiples of
/// `offset`, and each memory buffer must start on a multiple of `memory` (and, to be safe on
/// every kernel, be a multiple of `offset` long). Both are 1 without O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlignment {
    pub memory: usize,
    pub offset: usize,
}

impl DirectAlignment {
    const NONE: DirectAlignment = DirectAlignment {
        memory: 1,
        offset: 1,
    };
}

/// An open, locked disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    /// Its entry among the process's held image locks (see `lock::release_all`).
    lock_id: Option<u64>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    direct: bool,
    block_size: u32,
    alignment: DirectAlignment,
}

impl DiskImage {
    /// Opens `path` (read-write unless `read_only`, O_DIRECT if `direct`), locks it against
    /// other writers (QEMU's way, see [`crate::lock`]), and reads its size and block size.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, ImageError> {
        let file = open_file(path, read_only, direct)?;
        match lock_image(&file, read_only) {
            Ok(()) => {}
            Err(LockError::Io(source)) => {
                return Err(ImageError::Lock {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Err(reason) => {
                return Err(ImageError::Locked {
                    path: path.to_path_buf(),
                    reason,
                })
            }
        }
        let size = image_size(&file).map_err(|source| ImageError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        check_size(path, size)?;
        let probe_error = |source| ImageError::BlockSize {
            path: path.to_path_buf(),
            source,
        };
        let block_size = host_block_size(&file, direct).map_err(probe_error)?;
        let alignment = if direct {
            direct_alignment(&file, block_size).map_err(probe_error)?
        } else {
            DirectAlignment::NONE
        };
        let lock_id = crate::lock::remember_held(&file, read_only);
        Ok(DiskImage {
            file,
            lock_id,
            path: path.to_path_buf(),
            size,
            read_only,
            direct,
            block_size,
            alignment,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes (a positive multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The logical block size the host has: a block device's sector size (BLKSSZGET), or for a
    /// file opened with O_DIRECT the file system's direct-I/O alignment (statx
    /// STATX_DIOALIGN, 512 where the kernel cannot say); 512 for a file in the page cache.
    /// Devices advertise this unless told otherwise, and never less with O_DIRECT.
    pub fn host_block_size(&self) -> u32 {
        self.block_size
    }

    /// What O_DIRECT needs of a transfer (all 1 without O_DIRECT).
    pub fn alignment(&self) -> DirectAlignment {
        self.alignment
    }
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        if let Some(id) = self.lock_id {
            crate::lock::forget_held(id);
        }
    }
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<File, ImageError> {
    let mut options = OpenOptions::new();
    options.read(true).write(!read_only);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path).map_err(|source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    })
}

fn check_size(path: &Path, size: u64) -> Result<(), ImageError> {
    if size == 0 {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
        });
    }
    if !size.is_multiple_of(SECTOR_SIZE) {
        return Err(ImageError::UnalignedSize {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(())
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

fn is_block_device(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.file_type().is_block_device())
}

fn host_block_size(file: &File, direct: bool) -> io::Result<u32> {
    if is_block_device(file)? {
        return logical_sector_size(file);
    }
    if !direct {
        return Ok(SECTOR_SIZE as u32);
    }
    Ok(statx_dio_alignment(file)?
        .map_or(SECTOR_SIZE as u32, |(_, offset)| offset)
        .max(SECTOR_SIZE as u32))
}

/// BLKSSZGET: a block device's logical sector size.
fn logical_sector_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer, which points at a live local.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

fn direct_alignment(file: &File, block_size: u32) -> io::Result<DirectAlignment> {
    let offset = block_size as usize;
    // Without STATX_DIOALIGN, assume memory needs what the offset needs (always sufficient).
    let memory = statx_dio_alignment(file)?.map_or(offset, |(memory, _)| memory as usize);
    Ok(DirectAlignment {
        memory: memory.max(1),
        offset,
    })
}

/// (memory, offset) direct-I/O alignment from statx, if the kernel and file system report it
/// (Linux 6.1+); `None` also when direct I/O is unsupported, which the open has shown it is not.
fn statx_dio_alignment(file: &File) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty C string with AT_EMPTY_PATH names the fd itself; `buf` is a live,
    // writable statx the kernel fills in.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &raw mut buf,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(None),
            _ => Err(err),
        };
    }
    let known = buf.stx_mask & libc::STATX_DIOALIGN != 0
        && buf.stx_dio_mem_align != 0
        && buf.stx_dio_offset_align != 0;
    Ok(known.then_some((buf.stx_dio_mem_align, buf.stx_dio_offset_align)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn image(size: u64) -> TempFile {
        let file = TempFile::new_with_prefix("/tmp/sluice-storage-").unwrap();
        file.as_file().set_len(size).unwrap();
        file
    }

    #[test]
    fn opens_a_file_and_reads_its_geometry() {
        let img = image(1 << 20);

        let disk = DiskImage::open(img.as_path(), false, false).unwrap();

        assert_eq!(disk.size(), 1 << 20);
        assert_eq!(disk.host_block_size(), 512);
        assert_eq!(disk.alignment(), DirectAlignment::NONE);
        assert!(!disk.is_read_only() && !disk.is_direct());
    }

    #[test]
    fn direct_open_reports_what_the_file_system_needs() {
        let img = image(1 << 20);
        let Ok(disk) = DiskImage::open(img.as_path(), false, true) else {
            eprintln!("SKIP: O_DIRECT unsupported on /tmp");
            return;
        };

        let block = disk.host_block_size();
        let alignment = disk.alignment();

        assert!(block.is_power_of_two() && block >= 512, "{block}");
        assert_eq!(alignment.offset, block as usize);
        assert!(alignment.memory.is_power_of_two(), "{alignment:?}");
    }

    #[test]
    fn refuses_empty_unaligned_missing_and_locked_images() {
        let empty = image(0);
        let odd = image(1000);
        let held = image(4096);
        let _holder = DiskImage::open(held.as_path(), false, false).unwrap();

        let errors = [
            DiskImage::open(empty.as_path(), false, false).unwrap_err(),
            DiskImage::open(odd.as_path(), false, false).unwrap_err(),
            DiskImage::open(Path::new("/nonexistent/disk.img"), true, false).unwrap_err(),
            DiskImage::open(held.as_path(), true, false).unwrap_err(),
        ];

        assert!(
            matches!(errors[0], ImageError::Empty { .. }),
            "{}",
            errors[0]
        );
        assert!(matches!(
            errors[1],
            ImageError::UnalignedSize { size: 1000, .. }
        ));
        assert!(matches!(errors[2], ImageError::Open { .. }));
        assert!(
            matches!(errors[3], ImageError::Locked { .. }),
            "{}",
            errors[3]
        );
        let text = errors[3].to_string();
        assert!(text.contains(&held.as_path().display().to_string()) && text.contains("QEMU"));
    }
}
