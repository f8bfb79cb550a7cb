//! Host capability checks: is QEMU installed, can this process open `/dev/kvm`.
//!
//! Tests use these to fail with an install hint (QEMU missing is a setup error) or to print
//! `SKIP <test>: <reason>` and return (no KVM is a property of the machine).

use std::env;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use crate::Error;

/// Name of the QEMU binary the runner starts.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How to install QEMU on the Debian machines this project runs on.
pub const QEMU_INSTALL_HINT: &str = "apt-get install -y --no-install-recommends qemu-system-x86";

/// Finds `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Result<PathBuf, Error> {
    find_qemu_in(&env::var_os("PATH").unwrap_or_default())
}

/// Finds `qemu-system-x86_64` in a `PATH`-style list of directories.
pub fn find_qemu_in(search_path: &OsStr) -> Result<PathBuf, Error> {
    find_in_path(search_path, QEMU_BINARY).ok_or(Error::QemuMissing)
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

fn find_in_path(search_path: &OsStr, name: &str) -> Option<PathBuf> {
    env::split_paths(search_path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_qemu_error_carries_the_install_hint() {
        let empty_dir = env::temp_dir().join(format!("sluice-no-qemu-{}", std::process::id()));
        std::fs::create_dir_all(&empty_dir).expect("create dir");

        let result = find_qemu_in(empty_dir.as_os_str());

        let message = result.expect_err("no qemu in an empty dir").to_string();
        assert!(message.contains(QEMU_BINARY), "{message}");
        assert!(message.contains(QEMU_INSTALL_HINT), "{message}");
        let _ = std::fs::remove_dir(&empty_dir);
    }

    #[test]
    fn qemu_is_found_in_a_directory_holding_an_executable_of_that_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = env::temp_dir().join(format!("sluice-fake-qemu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create dir");
        let fake = dir.join(QEMU_BINARY);
        std::fs::write(&fake, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        let found = find_qemu_in(dir.as_os_str());

        assert_eq!(found.ok(), Some(fake.clone()));
        let _ = std::fs::remove_file(&fake);
        let _ = std::fs::remove_dir(&dir);
    }
}
