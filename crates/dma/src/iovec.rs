//! Guest buffers as host iovecs, so the kernel (io_uring, `preadv`/`pwritev`) can move data
//! straight between a host file and guest memory with no copy.
//!
//! Hand-written because vm-memory gives volatile slices, not iovecs, and because an iovec handed
//! to the kernel must stay valid until the I/O completes: a [`GuestIovecs`] holds a reference to
//! the guest memory regions it points into, so the mappings cannot go away underneath an
//! in-flight request whoever drops what first.

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::DmaSpace;

/// Why guest buffers could not be turned into iovecs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IovecError {
    /// Unmapped, outside guest RAM, or refused by the IOMMU for this access.
    #[error("guest buffer {addr:#x}+{len:#x} is not accessible to the device")]
    Inaccessible { addr: u64, len: usize },
    #[error("guest buffers add up to more than the address space")]
    TooLong,
}

/// Host iovecs for a list of guest buffers, valid for as long as this value lives.
pub struct GuestIovecs {
    iovecs: Vec<libc::iovec>,
    len: usize,
    /// Keeps every region mapped while the kernel may still use the pointers.
    _memory: GuestMemoryMmap,
}

// SAFETY: the pointers refer to guest RAM, a shared mapping every device thread may access;
// `_memory` keeps that mapping alive as long as the pointers exist, and they are only
// dereferenced by the kernel or by code that knows the request's direction.
unsafe impl Send for GuestIovecs {}

impl std::fmt::Debug for GuestIovecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestIovecs")
            .field("iovecs", &self.iovecs.len())
            .field("len", &self.len)
            .finish()
    }
}

impl GuestIovecs {
    /// Resolves `(device address, length)` buffers through `mem` for `access`
    /// (`Permissions::Write`: the device writes guest memory, e.g. a disk read).
    pub fn resolve<I>(mem: &DmaSpace, buffers: I, access: Permissions) -> Result<Self, IovecError>
    where
        I: IntoIterator<Item = (GuestAddress, usize)>,
    {
        let mut iovecs = Vec::new();
        let mut len = 0usize;
        let writes = matches!(access, Permissions::Write | Permissions::ReadWrite);
        for (addr, buffer_len) in buffers {
            if writes {
                // A live migration must send these pages again (see crate::dirty).
                crate::dirty::mark_on(mem, addr.0, buffer_len as u64);
            }
            let inaccessible = IovecError::Inaccessible {
                addr: addr.0,
                len: buffer_len,
            };
            let slices = mem
                .get_slices(addr, buffer_len, access)
                .map_err(|_| inaccessible.clone())?;
            for slice in slices {
                let slice = slice.map_err(|_| inaccessible.clone())?;
                let ptr = match access {
                    Permissions::Write | Permissions::ReadWrite => slice.ptr_guard_mut().as_ptr(),
                    _ => slice.ptr_guard().as_ptr() as *mut u8,
                };
                iovecs.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: slice.len(),
                });
                len = len.checked_add(slice.len()).ok_or(IovecError::TooLong)?;
            }
        }
        Ok(GuestIovecs {
            iovecs,
            len,
            _memory: mem.get_backend().clone(),
        })
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

    /// Whether every iovec starts on a multiple of `memory` and is a multiple of `length`
    /// bytes long (what O_DIRECT asks of each buffer).
    pub fn is_aligned(&self, memory: usize, length: usize) -> bool {
        let (memory, length) = (memory.max(1), length.max(1));
        self.iovecs.iter().all(|v| {
            (v.iov_base as usize).is_multiple_of(memory) && v.iov_len.is_multiple_of(length)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// Two adjacent regions, so one buffer can span both.
    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x4000)])
            .unwrap()
    }

    #[test]
    fn buffers_become_iovecs_over_the_same_bytes() {
        let mem = ram();
        mem.write_slice(b"abcdefgh", GuestAddress(0x3ffc)).unwrap();
        let space = crate::identity(mem);

        let iov = GuestIovecs::resolve(
            &space,
            [(GuestAddress(0x3ffc), 8), (GuestAddress(0x100), 4)],
            Permissions::Read,
        )
        .unwrap();

        assert_eq!(iov.len(), 12);
        assert_eq!(
            iov.as_slice().len(),
            3,
            "the first buffer spans two regions"
        );
        let mut bytes = Vec::new();
        for v in iov.as_slice() {
            // SAFETY: the iovecs point into `space`'s memory, alive while `iov` is.
            bytes.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
            });
        }
        assert_eq!(&bytes[..8], b"abcdefgh");
    }

    #[test]
    fn inaccessible_buffers_are_errors() {
        let space = crate::identity(ram());

        let outside =
            GuestIovecs::resolve(&space, [(GuestAddress(0x7f00), 0x200)], Permissions::Read);

        assert_eq!(
            outside.unwrap_err(),
            IovecError::Inaccessible {
                addr: 0x7f00,
                len: 0x200
            }
        );
    }

    #[test]
    fn iovecs_keep_guest_memory_mapped_after_the_space_is_gone() {
        let mem = ram();
        mem.write_slice(b"still here", GuestAddress(0x200)).unwrap();
        let space = crate::identity(mem.clone());
        let iov =
            GuestIovecs::resolve(&space, [(GuestAddress(0x200), 10)], Permissions::Read).unwrap();

        drop(space);
        drop(mem);

        let v = iov.as_slice()[0];
        // SAFETY: `iov` keeps the region mapped (the point of this test).
        let bytes = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
        assert_eq!(bytes, b"still here");
    }

    #[test]
    fn alignment_checks_every_buffer() {
        let space = crate::identity(ram());
        let aligned =
            GuestIovecs::resolve(&space, [(GuestAddress(0x1000), 0x1000)], Permissions::Write)
                .unwrap();
        let offset =
            GuestIovecs::resolve(&space, [(GuestAddress(0x1200), 0x1000)], Permissions::Write)
                .unwrap();

        assert!(aligned.is_aligned(4096, 4096));
        assert!(offset.is_aligned(512, 512));
        assert!(!offset.is_aligned(4096, 512));
        assert!(!aligned.is_aligned(1, 8192));
    }
}
