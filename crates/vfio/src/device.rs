//! One assigned function through VFIO's legacy container/group API (VFIO_TYPE1v2_IOMMU).
//!
//! vfio-ioctls does the container, group and device setup, region and IRQ discovery, region
//! reads/writes and MSI-X eventfds. Written here by hand, because vfio-ioctls does not offer
//! them: the device's flags (`VfioDevice::reset` hides whether VFIO_DEVICE_RESET is supported and
//! whether it failed, and sluice must quarantine a device whose reset failed), the region mmaps
//! (vfio-ioctls leaves mapping to the VMM), VFIO_IOMMU_MAP_DMA with read-only or write-only
//! permissions (vfio-ioctls always maps read/write; `dma=on-demand` follows the guest's IOMMU
//! tables), and the bookkeeping of DMA mappings (to report mapped bytes and to unmap everything
//! on quarantine).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_iommu_type1_dma_map, VFIO_BASE, VFIO_DEVICE_FLAGS_RESET,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::ioctl_io_nr;

use crate::policy::DeviceConfig;

ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE.into(), VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE.into(), VFIO_BASE + 11);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE.into(), VFIO_BASE + 13);

/// Errors opening a function.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: cannot open the VFIO container: {source}")]
    Container {
        path: PathBuf,
        source: vfio_ioctls::VfioError,
    },
    #[error("{path}: cannot open the VFIO device: {source}")]
    Device {
        path: PathBuf,
        source: vfio_ioctls::VfioError,
    },
    #[error("{path}: VFIO_DEVICE_GET_INFO: {source}")]
    Info { path: PathBuf, source: io::Error },
}

/// A mapping of part of a VFIO region into this process (a BAR's data pages).
pub struct RegionMmap {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain device memory; the pointer is only handed to KVM as a memslot
// address and unmapped on drop, never dereferenced by sluice.
unsafe impl Send for RegionMmap {}
// SAFETY: as above, no shared access through the pointer.
unsafe impl Sync for RegionMmap {}

impl RegionMmap {
    pub fn host_addr(&self) -> u64 {
        self.addr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for RegionMmap {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` came from a successful mmap owned by this value.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// An assigned function: its VFIO device in a type1v2 container of its own.
pub struct AssignedFunction {
    path: PathBuf,
    container: Arc<VfioContainer>,
    device: Arc<VfioDevice>,
    flags: u32,
    /// DMA mappings made through [`Self::map_dma`]: (iova, size).
    dma: Mutex<Vec<(u64, u64)>>,
}

impl AssignedFunction {
    /// Opens the function at sysfs `path` (its group must be viable: every member bound to
    /// vfio-pci or a bridge; the kernel checks again). `kvm_device` is the VM's KVM VFIO
    /// pseudo-device, which tells KVM about the group (non-coherent DMA).
    pub fn open(path: &Path, kvm_device: Option<Arc<VfioDeviceFd>>) -> Result<Self, OpenError> {
        let container = VfioContainer::new(kvm_device).map_err(|source| OpenError::Container {
            path: path.to_path_buf(),
            source,
        })?;
        let container = Arc::new(container);
        let device = VfioDevice::new(path, container.clone(), false).map_err(|source| {
            OpenError::Device {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let flags = device_flags(&device).map_err(|source| OpenError::Info {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            container,
            device: Arc::new(device),
            flags,
            dma: Mutex::new(Vec::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device's config space through VFIO's config region.
    pub fn config(&self) -> VfioConfig {
        VfioConfig(self.device.clone())
    }

    /// Whether VFIO_DEVICE_RESET is offered (FLR, PM or bus reset the kernel can do alone).
    pub fn can_reset(&self) -> bool {
        self.flags & VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// VFIO_DEVICE_RESET.
    pub fn reset(&self) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is a VFIO device fd we own.
        let ret = unsafe { ioctl(self.device.as_ref(), VFIO_DEVICE_RESET()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn region_size(&self, index: u32) -> u64 {
        self.device.get_region_size(index)
    }

    /// The parts of region `index` that may be mmapped (`(offset, size)`, page aligned), from
    /// its MMAP flag and sparse-mmap capability.
    pub fn mappable_areas(&self, index: u32) -> Vec<(u64, u64)> {
        if self.device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Vec::new();
        }
        let sparse = self
            .device
            .get_region_caps(index)
            .into_iter()
            .find_map(|cap| match cap {
                VfioRegionInfoCap::SparseMmap(sparse) => Some(sparse.areas),
                _ => None,
            });
        match sparse {
            Some(areas) => areas.iter().map(|a| (a.offset, a.size)).collect(),
            None => vec![(0, self.region_size(index))],
        }
    }

    /// Maps `len` bytes at `offset` of region `index` shared, read/write.
    pub fn mmap(&self, index: u32, offset: u64, len: u64) -> io::Result<RegionMmap> {
        let file_offset = self.device.get_region_offset(index) + offset;
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let file_offset = libc::off_t::try_from(file_offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a new shared mapping chosen by the kernel (addr NULL) of the device fd; the
        // result is checked and owned by the returned RegionMmap.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                file_offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RegionMmap { addr, len })
    }

    /// Region read (BAR accesses that trap: I/O BARs, the MSI-X pages' other registers).
    pub fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.device.region_read(index, data, offset);
    }

    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) {
        self.device.region_write(index, data, offset);
    }

    /// Maps `[host_addr, host_addr + size)` at `iova` for device DMA (pins the pages).
    ///
    /// # Safety
    ///
    /// The range must stay mapped (guest RAM) until [`Self::unmap_all_dma`] or drop; the device
    /// may read and write it at any time, so no Rust reference to it may exist.
    pub unsafe fn map_dma(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        let len =
            usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: forwarded from this function's contract.
        unsafe { self.container.vfio_dma_map(iova, len, host_addr as *mut u8) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.dma
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((iova, size));
        Ok(())
    }

    /// As [`Self::map_dma`], with the permissions the device gets (vfio-ioctls always maps
    /// read/write: this is its ioctl by hand, for `dma=on-demand`, where the guest's IOMMU tables
    /// may grant read or write only).
    ///
    /// # Safety
    ///
    /// As [`Self::map_dma`]; the range must also stay mapped until [`Self::unmap_dma`].
    pub unsafe fn map_dma_with(
        &self,
        iova: u64,
        size: u64,
        host_addr: u64,
        read: bool,
        write: bool,
    ) -> io::Result<()> {
        let mut flags = 0;
        if read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        let request = vfio_iommu_type1_dma_map {
            argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr: host_addr,
            iova,
            size,
        };
        // SAFETY: the fd is this function's VFIO container and the argument a valid
        // vfio_iommu_type1_dma_map the kernel only reads; that the memory stays mapped is this
        // function's contract.
        let ret =
            unsafe { ioctl_with_ref(self.container.as_ref(), VFIO_IOMMU_MAP_DMA(), &request) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        self.dma
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((iova, size));
        Ok(())
    }

    /// Unmaps the mapping made at `iova` with `size` (VFIO type1v2 unmaps whole mappings only).
    pub fn unmap_dma(&self, iova: u64, size: u64) -> io::Result<()> {
        let len =
            usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.container
            .vfio_dma_unmap(iova, len)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut dma = self.dma.lock().unwrap_or_else(PoisonError::into_inner);
        dma.retain(|&mapping| mapping != (iova, size));
        Ok(())
    }

    /// Bytes mapped for DMA.
    pub fn mapped_bytes(&self) -> u64 {
        let dma = self.dma.lock().unwrap_or_else(PoisonError::into_inner);
        dma.iter().map(|(_, size)| size).sum()
    }

    /// Unmaps every DMA mapping (teardown and quarantine).
    pub fn unmap_all_dma(&self) {
        let mut dma = self.dma.lock().unwrap_or_else(PoisonError::into_inner);
        for (iova, size) in dma.drain(..) {
            // The size came from a usize in map_dma.
            if let Err(e) = self.container.vfio_dma_unmap(iova, size as usize) {
                tracing::warn!(
                    "vfio: {}: unmapping DMA {iova:#x}+{size:#x}: {e}",
                    self.path.display()
                );
            }
        }
    }

    /// MSI-X vectors supported by VFIO (0 without MSI-X).
    pub fn msix_vectors(&self) -> u32 {
        self.device
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_or(0, |irq| irq.count)
    }

    /// VFIO_DEVICE_SET_IRQS for MSI-X: vector i signals `fds[i]` (an irqfd's eventfd).
    pub fn enable_msix(&self, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let events = fds
            .iter()
            .map(|fd| {
                let duplicate = fd.try_clone_to_owned()?;
                // SAFETY: `duplicate` is a fresh fd of an eventfd that we own; EventFd takes it.
                Ok(unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(duplicate)) })
            })
            .collect::<io::Result<Vec<EventFd>>>()?;
        // VFIO takes its own reference to each eventfd: the duplicates may go after the call.
        self.device
            .enable_msix(events.iter().collect())
            .map_err(|e| io::Error::other(e.to_string()))
    }

    pub fn disable_msix(&self) -> io::Result<()> {
        self.device
            .disable_msix()
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

impl Drop for AssignedFunction {
    fn drop(&mut self) {
        self.unmap_all_dma();
    }
}

/// VFIO_DEVICE_GET_INFO's flags.
fn device_flags(device: &VfioDevice) -> io::Result<u32> {
    let mut info = vfio_device_info {
        argsz: size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most `argsz` bytes into `info`, which we own.
    let ret = unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.flags)
}

/// The function's config space through VFIO (the kernel virtualizes some of it too).
pub struct VfioConfig(Arc<VfioDevice>);

impl DeviceConfig for VfioConfig {
    fn read(&self, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        let size = self.0.get_region_size(VFIO_PCI_CONFIG_REGION_INDEX);
        // Reads in dwords at most: the config region serves up to 4 bytes per access.
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = (offset + i * 4) as u64;
            if at + chunk.len() as u64 <= size {
                self.0.region_read(VFIO_PCI_CONFIG_REGION_INDEX, chunk, at);
            }
        }
    }

    fn write(&self, offset: usize, data: &[u8]) {
        self.0
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, data, offset as u64);
    }
}
