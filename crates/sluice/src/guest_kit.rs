//! The embedded guest kit: what `sluice run` boots when no --kernel is given.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use anyhow::Context;

/// The guest kit ELF in an in-memory file, and a path the kernel loader can open.
pub struct EmbeddedKernel {
    // Keeps the memfd (and so the path) alive while the VM loads it.
    _file: File,
    pub path: PathBuf,
}

/// Writes the embedded guest kit into a memfd.
pub fn embedded_guest_kit() -> anyhow::Result<EmbeddedKernel> {
    let name = CString::new("sluice-guest-kit").expect("static name has no NUL");
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot create a memfd for the guest kit");
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(sluice_guest_kit::GUEST_KIT_ELF)
        .context("cannot write the guest kit into its memfd")?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Ok(EmbeddedKernel { _file: file, path })
}
