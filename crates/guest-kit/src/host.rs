//! Host capability checks: is QEMU installed, can this process open `/dev/kvm`.
//!
//! Tests use these to fail with an install hint (QEMU missing is a setup error) or to print
//! `SKIP <test>: <reason>` and return (no KVM is a property of the machine).

use std::env;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use crate::Error;

/// Name of the QEMU binary the runner starts.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How to install QEMU on the Debian machines this project runs on.
pub const QEMU_INSTALL_HINT: &str = "apt-get install -y --no-install-recommends qemu-system-x86";

/// Finds `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Result<PathBuf, Error> {
    find_in_path(QEMU_BINARY).ok_or(Error::QemuMissing)
}

/// `None` when `/dev/kvm` opens read-write, otherwise why not (for a SKIP line).
pub fn kvm_unavailable_reason() -> Option<String> {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(error) => Some(format!("/dev/kvm cannot be opened: {error}")),
    }
}

/// Prints `SKIP <test>: <reason>` and returns true when KVM is missing; tests `return` on true.
pub fn skip_without_kvm(test: &str) -> bool {
    match kvm_unavailable_reason() {
        Some(reason) => {
            println!("SKIP {test}: {reason}");
            true
        }
        None => false,
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
