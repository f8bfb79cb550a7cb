//! Guest RAM: one memfd, mapped MAP_SHARED region by region, registered with KVM.
//!
//! A memfd (not anonymous memory) so that vhost-user backends can map the very same pages
//! later: the fd and each region's offset are kept for that.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;

/// Smallest RAM a guest may have: boot structures, ACPI and a small kernel must fit.
pub const MIN_RAM_SIZE: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("--memory {0} MiB is too small: at least {min} MiB is needed", min = MIN_RAM_SIZE >> 20)]
    TooSmall(u64),
    #[error("--memory must be a multiple of 4 KiB")]
    Unaligned,
    #[error("cannot create the guest memory file (memfd): {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Resize { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    #[error("KVM refused a guest memory region: {0}")]
    Register(kvm_ioctls::Error),
}

/// Guest RAM plus the file backing it.
#[derive(Clone)]
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub file: Arc<File>,
    pub size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM laid out per [`layout::ram_regions`].
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_RAM_SIZE {
            return Err(MemoryError::TooSmall(size >> 20));
        }
        if !size.is_multiple_of(4096) {
            return Err(MemoryError::Unaligned);
        }
        let file = Arc::new(create_memfd("sluice-guest-ram")?);
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        let mut offset = 0;
        let ranges: Vec<_> = layout::ram_regions(size)
            .into_iter()
            .map(|(start, len)| {
                let range = (
                    GuestAddress(start),
                    len as usize,
                    Some(FileOffset::from_arc(file.clone(), offset)),
                );
                offset += len;
                range
            })
            .collect();
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        Ok(Self { memory, file, size })
    }

    /// Registers every region with KVM as a memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let kvm_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `self.memory`,
            // which outlives the VM (the machine keeps both and drops the VM first).
            unsafe { vm.set_user_memory_region(kvm_region) }.map_err(MemoryError::Register)?;
        }
        Ok(())
    }
}

fn create_memfd(name: &str) -> Result<File, MemoryError> {
    let name = CString::new(name).expect("static name has no NUL");
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid memfd flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_is_shared_through_the_memfd() {
        let ram = GuestRam::new(32 << 20).unwrap();

        ram.memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();

        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.file, &mut word, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xdead_beef);
    }

    #[test]
    fn rejects_tiny_and_unaligned_sizes() {
        assert!(matches!(
            GuestRam::new(1 << 20),
            Err(MemoryError::TooSmall(1))
        ));
        assert!(matches!(
            GuestRam::new((32 << 20) + 1),
            Err(MemoryError::Unaligned)
        ));
    }
}
