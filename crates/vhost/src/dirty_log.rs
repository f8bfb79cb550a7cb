//! VHOST_USER_SET_LOG_BASE: the frontend's dirty log during its live migration.
//!
//! With VHOST_USER_PROTOCOL_F_LOG_SHMFD negotiated, the frontend sends a shared-memory fd with
//! the log's size and offset (`VhostUserLog`); while VHOST_F_LOG_ALL is negotiated the backend
//! sets the bit of every guest page it writes (`sluice_dma::shared_log` has the layout). The
//! marks come from the same places sluice marks its own device writes during a migration
//! (sluice_dma::dirty: every device-writable buffer a ring pops, the used ring on every
//! answer, disk reads resolved for writing): the log is installed on the queues' `DmaSpace`
//! as its `DeviceWriteLog`.
//!
//! The frontend is not trusted: an empty log, an offset that is not page-aligned, a range that
//! wraps or reaches past the end of the fd's file, a log larger than [`MAX_LOG_BYTES`], or one
//! too small to cover the guest memory the table maps is refused. A frontend that shrinks the
//! file afterwards faults the mapping: it is watched by [`crate::sigbus`] like the memory
//! regions (unless the file is sealed against shrinking), which drops the connection.

use std::any::Any;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use sluice_dma::shared_log::{log_bytes_for, SharedLog};

use crate::sigbus::{self, Tripwire};

/// Largest log accepted: one covering 32 TiB of guest physical memory.
pub const MAX_LOG_BYTES: u64 = 1 << 30;
const PAGE_SIZE: u64 = 4096;

/// Why a SET_LOG_BASE was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("log size {0:#x} is zero or larger than {MAX_LOG_BYTES:#x}")]
    Size(u64),
    #[error("log offset {0:#x} is not page-aligned")]
    Offset(u64),
    #[error(
        "log at offset {offset:#x} + size {size:#x} is past the end of a {file_size:#x}-byte file"
    )]
    PastEndOfFile {
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("log of {size:#x} bytes covers guest memory up to {covers:#x}, the memory table reaches {needed:#x}")]
    TooSmall { size: u64, covers: u64, needed: u64 },
    #[error("cannot map the log: {0}")]
    Map(String),
}

/// Validates and maps a log. `memory_end`: the end of the highest guest memory region the
/// table maps (`None`: no table yet).
pub fn attach(
    file: &File,
    size: u64,
    offset: u64,
    memory_end: Option<u64>,
    tripwire: &Tripwire,
) -> Result<Arc<SharedLog>, LogError> {
    if size == 0 || size > MAX_LOG_BYTES {
        return Err(LogError::Size(size));
    }
    if !offset.is_multiple_of(PAGE_SIZE) {
        return Err(LogError::Offset(offset));
    }
    let file_size = file
        .metadata()
        .map_err(|e| LogError::Map(e.to_string()))?
        .len();
    let past_end = LogError::PastEndOfFile {
        offset,
        size,
        file_size,
    };
    if offset.checked_add(size).is_none_or(|end| end > file_size) {
        return Err(past_end);
    }
    if let Some(needed) = memory_end {
        if size < log_bytes_for(needed) {
            return Err(LogError::TooSmall {
                size,
                covers: size.saturating_mul(8 * PAGE_SIZE),
                needed,
            });
        }
    }
    let log =
        Arc::new(SharedLog::map(file, size, offset).map_err(|e| LogError::Map(e.to_string()))?);
    if !sigbus::shrink_sealed(file.as_raw_fd()) {
        let (host, len) = log.host_range();
        let owner: Arc<dyn Any + Send + Sync> = log.clone();
        sigbus::watch(host, len, Arc::downgrade(&owner), tripwire)
            .map_err(|e| LogError::Map(format!("cannot watch the mapping: {e}")))?;
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: u64) -> File {
        let file = tempfile_in_memory();
        file.set_len(len).unwrap();
        file
    }

    fn tempfile_in_memory() -> File {
        use std::os::fd::FromRawFd;
        // SAFETY: a literal name; the descriptor is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(c"log-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn hostile_logs_are_refused() {
        let tripwire = Tripwire::new().unwrap();
        let f = file(0x2000);
        let attach = |size, offset, end| attach(&f, size, offset, end, &tripwire).map(|_| ());

        assert_eq!(attach(0, 0, None), Err(LogError::Size(0)));
        assert_eq!(
            attach(MAX_LOG_BYTES + 8, 0, None),
            Err(LogError::Size(MAX_LOG_BYTES + 8))
        );
        assert_eq!(attach(8, 0x10, None), Err(LogError::Offset(0x10)));
        assert!(matches!(
            attach(0x2000, 0x1000, None),
            Err(LogError::PastEndOfFile { .. })
        ));
        assert!(matches!(
            attach(8, !0xfff_u64, None),
            Err(LogError::PastEndOfFile { .. })
        ));
        // 8 bytes cover 64 pages = 256 KiB; a table reaching 1 MiB needs 32 bytes.
        assert!(matches!(
            attach(8, 0, Some(1 << 20)),
            Err(LogError::TooSmall { .. })
        ));
        assert_eq!(attach(32, 0x1000, Some(1 << 20)), Ok(()));
    }
}
