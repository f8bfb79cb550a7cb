//! Guest memory as a vhost-user frontend shares it.
//!
//! Each region arrives as {guest physical address, size, frontend user address, mmap offset}
//! plus an fd (SET_MEM_TABLE replaces the table, ADD_MEM_REG / REM_MEM_REG edit it). Regions
//! are mapped MAP_SHARED into a vm-memory `GuestMemoryMmap` keyed by guest physical address;
//! the frontend user addresses are kept only to translate ring addresses (SET_VRING_ADDR
//! carries frontend virtual addresses).
//!
//! Validation (the frontend is not trusted): zero or overflowing sizes, overlapping guest
//! ranges (vm-memory refuses them) or overlapping user ranges (translation would be
//! ambiguous), regions that reach past the end of their file, and tables that map more than
//! the connection's byte limit are refused. The end-of-file check matters: touching a
//! MAP_SHARED page past end-of-file raises SIGBUS in this process. A frontend that shrinks
//! the file *after* sending it can still do that: unless the file is sealed against
//! shrinking, each mapping is watched by [`crate::sigbus`], which turns such a fault into a
//! dropped connection.
//!
//! ADD_MEM_REG of a region identical (address, size, user address, and the same file at the
//! same offset) to one already mapped is counted, not mapped again: QEMU's multiqueue
//! vhost-user-net keeps one table per queue pair on the same connection, so every pair adds
//! (and later removes) the same regions. The same region backed by *another* file replaces
//! the old mapping (the frontend's latest word on what that memory is); it is counted too.
//! A region goes away with its last REM_MEM_REG.

use std::any::Any;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::sigbus::{self, Tripwire};

/// Most regions the backend accepts (GET_MAX_MEM_SLOTS).
pub const MAX_MEM_SLOTS: usize = 32;

/// Why a memory table change was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("the memory table is empty")]
    Empty,
    #[error("{0} memory regions, at most {MAX_MEM_SLOTS} are supported")]
    TooManyRegions(usize),
    #[error("{regions} regions but {fds} fds")]
    FdCount { regions: usize, fds: usize },
    #[error("region at {gpa:#x}: size {size:#x} is zero or overflows")]
    BadSize { gpa: u64, size: u64 },
    #[error("region at {gpa:#x}: cannot stat its fd: {source}")]
    Stat { gpa: u64, source: io::Error },
    #[error("region at {gpa:#x}: offset {offset:#x} + size {size:#x} is past the end of a {file_size:#x}-byte file")]
    PastEndOfFile {
        gpa: u64,
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("region at {gpa:#x}: mmap failed: {reason}")]
    Map { gpa: u64, reason: String },
    #[error("regions overlap: {0}")]
    Overlap(String),
    #[error("no region at {gpa:#x} with size {size:#x} to remove")]
    NoSuchRegion { gpa: u64, size: u64 },
    #[error(
        "the regions add up to {total:#x} bytes, more than the {limit:#x} allowed per connection"
    )]
    TooMuchMemory { total: u64, limit: u64 },
    #[error("region at {gpa:#x}: cannot watch the mapping: {source}")]
    Watch { gpa: u64, source: io::Error },
}

/// One mapped region with the frontend's view of it.
#[derive(Debug, Clone)]
struct SharedRegion {
    gpa: u64,
    size: u64,
    user_addr: u64,
    /// The backing file (device, inode) and the offset mapped from it.
    backing: (u64, u64, u64),
    mapping: Arc<GuestRegionMmap>,
    /// ADD_MEM_REG messages that added this region and were not removed yet.
    users: u32,
}

impl SharedRegion {
    fn same_place(&self, region: &VhostUserMemoryRegion) -> bool {
        self.gpa == region.guest_phys_addr
            && self.size == region.memory_size
            && self.user_addr == region.user_addr
    }
}

/// The frontend's memory table, mapped.
#[derive(Debug)]
pub struct MemoryTable {
    regions: Vec<SharedRegion>,
    memory: Option<GuestMemoryMmap>,
    /// Tripped when a mapping of this table faults (see [`crate::sigbus`]).
    tripwire: Arc<Tripwire>,
    /// Most bytes the regions may add up to.
    max_bytes: u64,
}

impl MemoryTable {
    /// An empty table whose mappings trip `tripwire` on SIGBUS and may map `max_bytes`.
    pub fn new(tripwire: Arc<Tripwire>, max_bytes: u64) -> Self {
        MemoryTable {
            regions: Vec::new(),
            memory: None,
            tripwire,
            max_bytes,
        }
    }

    /// Replaces the whole table (SET_MEM_TABLE). On error the old table stays.
    pub fn set(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        if regions.is_empty() {
            return Err(MemoryError::Empty);
        }
        if regions.len() > MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions(regions.len()));
        }
        if regions.len() != files.len() {
            return Err(MemoryError::FdCount {
                regions: regions.len(),
                fds: files.len(),
            });
        }
        let mapped = regions
            .iter()
            .zip(files)
            .map(|(region, file)| self.map_region(region, file))
            .collect::<Result<Vec<_>, _>>()?;
        self.install(mapped)
    }

    /// Adds one region (ADD_MEM_REG); returns false if it was already mapped from the same
    /// file (counted only). The same region from another file replaces the old mapping.
    pub fn add(&mut self, region: &VhostUserMemoryRegion, file: File) -> Result<bool, MemoryError> {
        let gpa = region.guest_phys_addr;
        let backing = backing_of(&file, region.mmap_offset)
            .map_err(|source| MemoryError::Stat { gpa, source })?;
        let mut regions = self.regions.clone();
        if let Some(index) = regions.iter().position(|r| r.same_place(region)) {
            let users = regions[index].users.saturating_add(1);
            if regions[index].backing == backing {
                self.regions[index].users = users;
                return Ok(false);
            }
            regions[index] = SharedRegion {
                users,
                ..self.map_region(region, file)?
            };
            return self.install(regions).map(|()| true);
        }
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions(self.regions.len() + 1));
        }
        regions.push(self.map_region(region, file)?);
        self.install(regions).map(|()| true)
    }

    /// Removes the region with this guest address and size (REM_MEM_REG); returns false if
    /// other ADD_MEM_REGs still hold it.
    pub fn remove(&mut self, region: &VhostUserMemoryRegion) -> Result<bool, MemoryError> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let index = self
            .regions
            .iter()
            .position(|r| r.gpa == gpa && r.size == size)
            .ok_or(MemoryError::NoSuchRegion { gpa, size })?;
        if let Some(held) = self.regions.get_mut(index).filter(|r| r.users > 1) {
            held.users -= 1;
            return Ok(false);
        }
        let mut regions = self.regions.clone();
        regions.remove(index);
        if regions.is_empty() {
            self.regions.clear();
            self.memory = None;
            return Ok(true);
        }
        self.install(regions).map(|()| true)
    }

    /// The mapped guest memory, if any region is present.
    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.memory.as_ref()
    }

    /// The regions as the frontend addresses them (for the IOTLB, [`crate::iotlb`]).
    pub fn user_ranges(&self) -> Vec<crate::iotlb::UserRange> {
        self.regions
            .iter()
            .map(|r| crate::iotlb::UserRange {
                user_addr: r.user_addr,
                size: r.size,
                gpa: r.gpa,
            })
            .collect()
    }

    /// Translates a frontend user address of an object of `len` bytes into a guest physical
    /// address; the object must lie inside one region.
    pub fn va_to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        let end = va.checked_add(len)?;
        self.regions.iter().find_map(|r| {
            let region_end = r.user_addr + r.size; // checked when mapped
            (r.user_addr <= va && end <= region_end).then(|| r.gpa + (va - r.user_addr))
        })
    }

    /// Checks the new set of regions and makes it current.
    fn install(&mut self, mut regions: Vec<SharedRegion>) -> Result<(), MemoryError> {
        let total = regions
            .iter()
            .fold(0u64, |total, r| total.saturating_add(r.size));
        if total > self.max_bytes {
            return Err(MemoryError::TooMuchMemory {
                total,
                limit: self.max_bytes,
            });
        }
        regions.sort_by_key(|r| r.user_addr);
        for pair in regions.windows(2) {
            if pair[0].user_addr + pair[0].size > pair[1].user_addr {
                return Err(MemoryError::Overlap(format!(
                    "user addresses {:#x} and {:#x}",
                    pair[0].user_addr, pair[1].user_addr
                )));
            }
        }
        regions.sort_by_key(|r| r.gpa);
        let memory =
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|r| r.mapping.clone()).collect())
                .map_err(|e| MemoryError::Overlap(e.to_string()))?;
        self.regions = regions;
        self.memory = Some(memory);
        Ok(())
    }

    /// Validates one region against its file and maps it (watched unless sealed).
    fn map_region(
        &self,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> Result<SharedRegion, MemoryError> {
        let (gpa, size, user_addr, offset) = (
            region.guest_phys_addr,
            region.memory_size,
            region.user_addr,
            region.mmap_offset,
        );
        let bad_size = MemoryError::BadSize { gpa, size };
        let length = usize::try_from(size).map_err(|_| MemoryError::BadSize { gpa, size })?;
        let fits = size != 0
            && size <= self.max_bytes
            && gpa.checked_add(size).is_some()
            && user_addr.checked_add(size).is_some()
            && offset.checked_add(size).is_some();
        if !fits {
            return Err(if size > self.max_bytes && size != 0 {
                MemoryError::TooMuchMemory {
                    total: size,
                    limit: self.max_bytes,
                }
            } else {
                bad_size
            });
        }
        let backing =
            backing_of(&file, offset).map_err(|source| MemoryError::Stat { gpa, source })?;
        let file_size = file
            .metadata()
            .map_err(|source| MemoryError::Stat { gpa, source })?
            .len();
        if offset + size > file_size {
            return Err(MemoryError::PastEndOfFile {
                gpa,
                offset,
                size,
                file_size,
            });
        }
        let sealed = sigbus::shrink_sealed(file.as_raw_fd());
        let map_error = |reason: String| MemoryError::Map { gpa, reason };
        let mapping = MmapRegionBuilder::new(length)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_error(e.to_string()))?;
        let mapping = GuestRegionMmap::new(mapping, GuestAddress(gpa))
            .ok_or_else(|| map_error("guest address overflows".into()))?;
        let mapping = Arc::new(mapping);
        if !sealed {
            let host = mapping.as_ptr() as usize;
            let owner: Arc<dyn Any + Send + Sync> = mapping.clone();
            sigbus::watch(host, length, Arc::downgrade(&owner), &self.tripwire)
                .map_err(|source| MemoryError::Watch { gpa, source })?;
        }
        Ok(SharedRegion {
            gpa,
            size,
            user_addr,
            backing,
            mapping,
            users: 1,
        })
    }
}

/// Which file (device, inode) and offset a region maps: the same memory whatever the fd.
fn backing_of(file: &File, offset: u64) -> io::Result<(u64, u64, u64)> {
    let metadata = file.metadata()?;
    Ok((metadata.dev(), metadata.ino(), offset))
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const SIZE: u64 = 0x10000;

    fn memfd(size: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked below.
        let fd = unsafe { libc::memfd_create(c"vhost-memory-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).expect("size the memfd");
        file
    }

    fn region(gpa: u64, user_addr: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, SIZE, user_addr, 0)
    }

    fn table() -> MemoryTable {
        MemoryTable::new(Arc::new(Tripwire::new().unwrap()), u64::MAX)
    }

    fn write_and_read_back(table: &MemoryTable, value: u32) -> u32 {
        let memory = table.memory().unwrap();
        memory.write_obj(value, GuestAddress(0x100)).unwrap();
        memory.read_obj(GuestAddress(0x100)).unwrap()
    }

    #[test]
    fn a_region_added_twice_from_one_file_is_mapped_once_and_kept_until_removed_twice() {
        let mut table = table();
        let file = memfd(SIZE);
        assert!(table
            .add(&region(0, 0x7000_0000), file.try_clone().unwrap())
            .unwrap());
        write_and_read_back(&table, 0xabcd);

        let added_again = table
            .add(&region(0, 0x7000_0000), file.try_clone().unwrap())
            .unwrap();
        let first_removal = table.remove(&region(0, 0x7000_0000)).unwrap();

        assert!(!added_again, "a duplicate must not remap");
        assert!(!first_removal, "the region is still held by the other add");
        let kept = table.memory().unwrap().read_obj::<u32>(GuestAddress(0x100));
        assert_eq!(kept.unwrap(), 0xabcd, "still the first mapping");
        assert!(table.remove(&region(0, 0x7000_0000)).unwrap());
        assert!(table.memory().is_none());
    }

    #[test]
    fn a_region_re_added_from_another_file_is_remapped() {
        let mut table = table();
        table.add(&region(0, 0x7000_0000), memfd(SIZE)).unwrap();
        write_and_read_back(&table, 0xabcd);
        let second = memfd(SIZE);

        let remapped = table
            .add(&region(0, 0x7000_0000), second.try_clone().unwrap())
            .unwrap();

        assert!(remapped, "another file is new memory");
        let now = table.memory().unwrap().read_obj::<u32>(GuestAddress(0x100));
        assert_eq!(now.unwrap(), 0, "the second file's (zeroed) contents");
        assert!(!table.remove(&region(0, 0x7000_0000)).unwrap(), "counted");
    }

    #[test]
    fn a_region_at_the_same_address_with_another_user_address_is_refused() {
        let mut table = table();
        table.add(&region(0, 0x7000_0000), memfd(SIZE)).unwrap();

        let clash = table.add(&region(0, 0x7100_0000), memfd(SIZE));

        assert!(clash.is_err(), "overlapping guest ranges: {clash:?}");
    }

    #[test]
    fn regions_past_the_byte_limit_are_refused() {
        let mut table = MemoryTable::new(Arc::new(Tripwire::new().unwrap()), SIZE);
        table.add(&region(0, 0x7000_0000), memfd(SIZE)).unwrap();

        let second = table.add(&region(SIZE, 0x7100_0000), memfd(SIZE));

        assert!(
            matches!(second, Err(MemoryError::TooMuchMemory { .. })),
            "{second:?}"
        );
    }
}
