//! Image locking that QEMU understands: OFD byte-range locks at QEMU's offsets.
//!
//! QEMU's file-posix driver (and so qemu-img, qemu-io, qemu-storage-daemon and every QEMU
//! guest) does not use `flock`. It turns the block-layer permissions a user holds into shared
//! (F_RDLCK) open-file-description locks on single bytes: byte 100 + i while it *holds*
//! permission i, byte 200 + i while it *refuses to share* permission i. Before it goes ahead it
//! tests, for every permission it wants, that nobody holds the "refuse" byte, and for every
//! permission it refuses to share, that nobody holds the "holds" byte. Taking the same bytes
//! with the same meaning makes sluice and QEMU refuse each other exactly as two QEMUs do.
//!
//! Permission bits (QEMU's `BLK_PERM_*`): 0 consistent read, 1 write, 2 write-unchanged,
//! 3 resize. sluice is a guest device: it reads consistently, writes unless read-only, and
//! shares neither writes nor resizes (its guest caches data and capacity), like a QEMU device
//! with `share-rw=off`. The locks belong to the open file description, so they also keep two
//! sluice devices in one process apart, and they go away when the file is closed.
//!
//! Hand-written: no maintained crate speaks QEMU's lock protocol; it is a handful of `fcntl`s.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// QEMU's `RAW_LOCK_PERM_BASE`: byte `100 + i` is locked while permission `i` is held.
const PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte `200 + i` is locked while permission `i` is not shared.
const SHARED_BASE: i64 = 200;

/// A block-layer permission (QEMU's `BLK_PERM_*`, as a bit number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

impl Permission {
    fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    fn bit(self) -> i64 {
        self as i64
    }
}

/// Why the image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another process does not share the {} permission", .0.name())]
    NotShared(Permission),
    #[error("another process holds the {} permission", .0.name())]
    Held(Permission),
    #[error("cannot lock: {0}")]
    Io(io::Error),
}

/// The permissions sluice holds, and those it refuses to share, for an image.
fn permissions(read_only: bool) -> (Vec<Permission>, Vec<Permission>) {
    let held = if read_only {
        vec![Permission::ConsistentRead]
    } else {
        vec![Permission::ConsistentRead, Permission::Write]
    };
    (held, vec![Permission::Write, Permission::Resize])
}

/// Takes QEMU's locks on `file` for a read-write (or read-only) guest device, then checks that
/// no other user conflicts. On error some bytes may be locked; closing `file` drops them.
pub fn lock_image(file: &File, read_only: bool) -> Result<(), LockError> {
    let (held, unshared) = permissions(read_only);
    for p in &held {
        set_read_lock(file, PERM_BASE + p.bit()).map_err(LockError::Io)?;
    }
    for p in &unshared {
        set_read_lock(file, SHARED_BASE + p.bit()).map_err(LockError::Io)?;
    }
    for &p in &held {
        if locked_by_others(file, SHARED_BASE + p.bit()).map_err(LockError::Io)? {
            return Err(LockError::NotShared(p));
        }
    }
    for &p in &unshared {
        if locked_by_others(file, PERM_BASE + p.bit()).map_err(LockError::Io)? {
            return Err(LockError::Held(p));
        }
    }
    Ok(())
}

fn one_byte(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        // OFD locks require 0 here.
        l_pid: 0,
    }
}

/// A shared OFD lock on one byte; EAGAIN/EACCES mean someone holds it exclusively.
fn set_read_lock(file: &File, byte: i64) -> io::Result<()> {
    let lock = one_byte(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads one struct flock, which lives on the stack.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds any lock on `byte` (an exclusive lock there
/// would conflict: the test QEMU's `qemu_lock_fd_test` makes).
fn locked_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut lock = one_byte(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and rewrites one struct flock, which lives on the stack.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

/// The images this process holds locks on, so that a live migration can hand them to the
/// destination: QEMU drops its image locks ("inactivates" the block devices) once the source
/// has stopped writing, and the destination takes them before it resumes. Each entry is a
/// duplicate of the image's descriptor, so it names the same open file description.
static HELD: std::sync::Mutex<Vec<(u64, File, bool)>> = std::sync::Mutex::new(Vec::new());
static NEXT_HOLD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Records that `file` holds the image locks (an id for [`forget_held`]).
pub(crate) fn remember_held(file: &File, read_only: bool) -> Option<u64> {
    let copy = file.try_clone().ok()?;
    let id = NEXT_HOLD.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((id, copy, read_only));
    Some(id)
}

/// The image with this id was closed.
pub(crate) fn forget_held(id: u64) {
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|(held, _, _)| *held != id);
}

/// Drops every image lock this process holds (its devices must have stopped writing): another
/// process may then open the images, as a migration destination does. Returns how many.
pub fn release_all() -> io::Result<usize> {
    let held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (_, file, _) in held.iter() {
        // Every lock of this open file description, whatever the byte.
        let unlock = libc::flock {
            l_type: libc::F_UNLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        // SAFETY: F_OFD_SETLK reads one struct flock, which lives on the stack.
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &unlock) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(held.len())
}

/// Takes back the locks [`release_all`] dropped (a migration failed and the VM runs on here).
pub fn reacquire_all() -> Result<(), LockError> {
    let held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (_, file, read_only) in held.iter() {
        lock_image(file, *read_only)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use vmm_sys_util::tempfile::TempFile;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    /// The byte ranges this process's OFD locks cover on `file`, from /proc/locks.
    fn locked_bytes(file: &File) -> Vec<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let ino = file.metadata().unwrap().ino();
        let text = std::fs::read_to_string("/proc/locks").unwrap();
        let mut ranges: Vec<(u64, u64)> = text
            .lines()
            .filter(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} ")))
            .filter_map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                let n = fields.len();
                Some((fields[n - 2].parse().ok()?, fields[n - 1].parse().ok()?))
            })
            .collect();
        ranges.sort();
        ranges
    }

    #[test]
    fn takes_the_bytes_qemu_takes_for_a_writer() {
        let img = TempFile::new().unwrap();
        let file = open(img.as_path());

        lock_image(&file, false).unwrap();

        // Holds consistent read + write (100, 101); shares neither write nor resize (201, 203).
        let bytes = locked_bytes(&file);
        let covered = |b: u64| bytes.iter().any(|&(s, e)| s <= b && b <= e);
        assert!(
            [100, 101, 201, 203].iter().all(|&b| covered(b)),
            "{bytes:?}"
        );
        assert!(
            ![102, 103, 200, 202].iter().any(|&b| covered(b)),
            "{bytes:?}"
        );
    }

    #[test]
    fn writers_exclude_each_other_and_readers_but_readers_share() {
        let img = TempFile::new().unwrap();
        let writer = open(img.as_path());
        lock_image(&writer, false).unwrap();

        let second_writer = lock_image(&open(img.as_path()), false);
        let reader = lock_image(&open(img.as_path()), true);
        drop(writer);
        let reader_a = open(img.as_path());
        let reader_b = open(img.as_path());
        let readers = (lock_image(&reader_a, true), lock_image(&reader_b, true));
        let writer_after_readers = lock_image(&open(img.as_path()), false);

        assert!(matches!(
            second_writer,
            Err(LockError::NotShared(Permission::Write))
        ));
        assert!(matches!(reader, Err(LockError::Held(Permission::Write))));
        assert!(readers.0.is_ok() && readers.1.is_ok());
        assert!(
            matches!(
                writer_after_readers,
                Err(LockError::NotShared(Permission::Write))
            ),
            "{writer_after_readers:?}"
        );
    }
}
