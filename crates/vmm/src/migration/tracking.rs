//! Dirty-page tracking for a migration: KVM's dirty log (KVM_MEM_LOG_DIRTY_PAGES on every
//! guest RAM slot, read and cleared with KVM_GET_DIRTY_LOG each round) for what the vCPUs
//! write, sluice-dma's device log for what device models write through the VMM's mapping,
//! which KVM never sees, and the vhost-user disks' backends' logs
//! (`sluice_devices::vhost_user_blk::migration`: VHOST_USER_SET_LOG_BASE) for what they write
//! from their own processes — read into the device log each round, so their pages are sticky
//! too. Pages are numbered by their offset in the guest RAM file.
//!
//! kvm_pvm (this host) logs dirty pages like hardware KVM: `kvm_dirty_log_sees_guest_writes`
//! in the tests runs a guest that writes one page and finds exactly that page in the log.

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use sluice_devices::vhost_user_blk;
use sluice_dma::dirty::{PageLog, RamRegion};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::MigrationError;
use crate::memory::GuestRam;

const PAGE_SHIFT: u32 = 12;

/// One KVM memory slot of guest RAM.
#[derive(Debug, Clone, Copy)]
struct Slot {
    index: u32,
    gpa: u64,
    len: u64,
    host: u64,
    file_offset: u64,
}

fn slots(ram: &GuestRam) -> Vec<Slot> {
    // The same numbering as GuestRam::register.
    ram.memory
        .iter()
        .enumerate()
        .map(|(index, region)| Slot {
            index: index as u32,
            gpa: region.start_addr().0,
            len: region.len(),
            host: region.as_ptr() as u64,
            file_offset: region.file_offset().map_or(0, |f| f.start()),
        })
        .collect()
}

/// Sets `flags` on every slot (KVM allows changing only the flags of an existing slot).
fn set_slot_flags(vm: &VmFd, slots: &[Slot], flags: u32) -> Result<(), MigrationError> {
    for slot in slots {
        let region = kvm_userspace_memory_region {
            slot: slot.index,
            flags,
            guest_phys_addr: slot.gpa,
            memory_size: slot.len,
            userspace_addr: slot.host,
        };
        // SAFETY: the same live mapping GuestRam::register gave KVM for this slot; only the
        // flags change.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| MigrationError::Tracking(format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
    }
    Ok(())
}

/// Dirty tracking while it lives: stops (both logs off) when dropped.
pub struct DirtyTracking {
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
    devices: Arc<PageLog>,
}

impl DirtyTracking {
    /// Turns on both logs. Pages written before this are sent by round 0, which reads all RAM
    /// after it.
    pub fn start(vm: Arc<VmFd>, ram: &GuestRam) -> Result<Self, MigrationError> {
        // First: a backend that cannot log refuses the migration before anything changed.
        vhost_user_blk::migration::start_logging().map_err(MigrationError::Vm)?;
        let slots = slots(ram);
        let regions = slots
            .iter()
            .map(|s| RamRegion {
                gpa: s.gpa,
                len: s.len,
                file_offset: s.file_offset,
            })
            .collect();
        let devices = Arc::new(PageLog::new(regions, ram.size));
        sluice_dma::dirty::start(devices.clone());
        let tracking = Self { vm, slots, devices };
        set_slot_flags(&tracking.vm, &tracking.slots, KVM_MEM_LOG_DIRTY_PAGES)?;
        Ok(tracking)
    }

    /// The pages dirtied since the last call (vCPU and device writes), ascending, clearing both
    /// logs' round bits.
    pub fn take_round(&self) -> Result<Vec<u64>, MigrationError> {
        for gpa_page in vhost_user_blk::migration::take_logged() {
            self.devices.mark(gpa_page << PAGE_SHIFT, 1 << PAGE_SHIFT);
        }
        let mut pages = self.devices.take_round();
        for slot in &self.slots {
            let bitmap = self
                .vm
                .get_dirty_log(slot.index, slot.len as usize)
                .map_err(|e| MigrationError::Tracking(format!("KVM_GET_DIRTY_LOG: {e}")))?;
            let first = slot.file_offset >> PAGE_SHIFT;
            push_set_bits(&bitmap, first, slot.len >> PAGE_SHIFT, &mut pages);
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }

    /// Every page a device acquired for writing since tracking started (the stop-and-copy sends
    /// them all: see sluice_dma::dirty).
    pub fn take_device_sticky(&self) -> Vec<u64> {
        self.devices.take_sticky()
    }
}

impl Drop for DirtyTracking {
    fn drop(&mut self) {
        sluice_dma::dirty::stop();
        vhost_user_blk::migration::stop_logging();
        if let Err(e) = set_slot_flags(&self.vm, &self.slots, 0) {
            tracing::warn!("cannot turn KVM dirty logging off: {e}");
        }
    }
}

/// Appends `first + i` for every set bit `i < count` of `bitmap`.
fn push_set_bits(bitmap: &[u64], first: u64, count: u64, pages: &mut Vec<u64>) {
    for (index, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = index as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if page < count {
                pages.push(first + page);
            }
        }
    }
}

/// Merges sorted, deduplicated page lists.
pub fn union(mut a: Vec<u64>, b: &[u64]) -> Vec<u64> {
    a.extend_from_slice(b);
    a.sort_unstable();
    a.dedup();
    a
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn set_bits_become_page_numbers_within_the_slot() {
        let mut pages = Vec::new();

        push_set_bits(&[0b1010, 1 << 63, 1], 100, 128, &mut pages);

        assert_eq!(pages, vec![101, 103, 100 + 127]);
    }

    /// A real-mode guest at 0x1000 that writes one byte at 0x3000 and then touches MMIO at
    /// 0x8000 (outside its slot, so KVM exits) — is that page, and only it, in the log?
    #[test]
    fn kvm_dirty_log_sees_guest_writes() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let size = 0x4000usize;
        // SAFETY: a fresh anonymous mapping, unmapped at the end of the test.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_SHARED,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let code = [
            0xc6, 0x06, 0x00, 0x30, 0x55, // mov byte [0x3000], 0x55
            0xc6, 0x06, 0x00, 0x80, 0x00, // mov byte [0x8000], 0 (MMIO exit)
        ];
        // SAFETY: `host` maps `size` bytes; the code fits at its start.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), host.cast::<u8>(), code.len()) };
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0x1000,
            memory_size: size as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping outlives the VM (unmapped after it is dropped).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();

        let exit = format!("{:?}", vcpu.run().unwrap());
        let bitmap = vm.get_dirty_log(0, size).unwrap();
        let mut pages = Vec::new();
        push_set_bits(&bitmap, 0, (size >> 12) as u64, &mut pages);
        let again = vm.get_dirty_log(0, size).unwrap();

        assert!(exit.starts_with("MmioWrite(32768"), "{exit}");
        // SAFETY: reading the byte the guest wrote, inside the mapping.
        assert_eq!(unsafe { *host.cast::<u8>().add(0x2000) }, 0x55);
        assert_eq!(pages, vec![2], "page 0x3000 (slot page 2) and only it");
        assert!(again.iter().all(|&w| w == 0), "reading the log cleared it");
        drop(vcpu);
        drop(vm);
        // SAFETY: nothing uses the mapping any more.
        unsafe { libc::munmap(host, size) };
    }
}
