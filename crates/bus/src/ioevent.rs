//! Exitless doorbells: guest writes turned into eventfd signals by the kernel.

/// Registers guest writes to an address as eventfd signals handled inside the kernel
/// (KVM ioeventfd), so a virtqueue kick costs no userspace exit.
pub trait IoEventRegistrar: Send + Sync {
    /// Signals `event` on a guest write of any value (`datamatch: None`) or of exactly `datamatch`
    /// to MMIO `addr` of `len` bytes.
    fn register(
        &self,
        event: &vmm_sys_util::eventfd::EventFd,
        addr: u64,
        len: u32,
        datamatch: Option<u64>,
    ) -> std::io::Result<()>;
    /// Undoes a registration made with the same arguments.
    fn unregister(
        &self,
        event: &vmm_sys_util::eventfd::EventFd,
        addr: u64,
        len: u32,
        datamatch: Option<u64>,
    ) -> std::io::Result<()>;
}
