//! KVM implementations of the traits devices use to reach the guest and be reached without
//! exits: irqfd pin lines (edge, and level with a resample fd for PCI INTx), MSI
//! (KVM_SIGNAL_MSI or GSI route + irqfd) and ioeventfd doorbells.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, kvm_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use sluice_bus::irq::{
    IrqLine, LevelIrqLine, LevelIrqRouter, MsiMessage, MsiRoute, MsiRouter, MsiSink,
};
use sluice_bus::IoEventRegistrar;
use vmm_sys_util::eventfd::EventFd;

use crate::layout;

/// An IOAPIC/PIC pin driven through an irqfd: a trigger is one eventfd write, no ioctl.
pub struct IrqfdLine {
    event: EventFd,
}

impl IrqfdLine {
    pub fn new(vm: &VmFd, gsi: u32) -> io::Result<Self> {
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&event, gsi).map_err(io::Error::from)?;
        Ok(Self { event })
    }
}

impl IrqLine for IrqfdLine {
    fn trigger(&self) -> io::Result<()> {
        self.event.write(1)
    }
}

/// A level-triggered source on an IOAPIC pin (a PCI INTx pin): an irqfd registered with
/// KVM_IRQFD_FLAG_RESAMPLE. Writing the irqfd raises the pin and KVM keeps it high; when the
/// guest EOIs the interrupt KVM lowers it and signals the resample fd, and the resampler thread
/// raises it again if the device still asserts. An interrupt still pending after the EOI is
/// never lost. A deassert takes effect at the next EOI; since KVM injects irqfd writes
/// asynchronously, a re-assert decided just before a deassert can land after it and cause one
/// stray interrupt, whose ISR read returns 0 (shared-IRQ drivers expect that). The resample fd
/// may also fire without an EOI of ours (seen on kvm_pvm); the level check makes that harmless.
pub struct KvmLevelLine {
    vm: Arc<VmFd>,
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
    shared: Arc<LevelShared>,
    resampler: Option<JoinHandle<()>>,
}

/// What the resampler thread shares with the line.
struct LevelShared {
    asserted: AtomicBool,
    stop: AtomicBool,
}

impl KvmLevelLine {
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> io::Result<Self> {
        let trigger = EventFd::new(libc::EFD_NONBLOCK)?;
        // Blocking: the resampler thread sleeps in read() until an EOI.
        let resample = EventFd::new(0)?;
        vm.register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(io::Error::from)?;
        let shared = Arc::new(LevelShared {
            asserted: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let resampler = Self::spawn_resampler(gsi, &trigger, &resample, &shared);
        let resampler = match resampler {
            Ok(handle) => handle,
            Err(e) => {
                let _ = vm.unregister_irqfd(&trigger, gsi);
                return Err(e);
            }
        };
        Ok(Self {
            vm,
            gsi,
            trigger,
            resample,
            shared,
            resampler: Some(resampler),
        })
    }

    fn spawn_resampler(
        gsi: u32,
        trigger: &EventFd,
        resample: &EventFd,
        shared: &Arc<LevelShared>,
    ) -> io::Result<JoinHandle<()>> {
        let trigger = trigger.try_clone()?;
        let resample = resample.try_clone()?;
        let shared = shared.clone();
        let kind = sluice_sandbox::ThreadKind::IrqResampler;
        sluice_sandbox::spawn(kind, format!("intx-gsi{gsi}"), move || {
            Self::resample_loop(gsi, &trigger, &resample, &shared)
        })
    }

    /// Re-raises the pin after each EOI while the device still asserts it.
    fn resample_loop(gsi: u32, trigger: &EventFd, resample: &EventFd, shared: &LevelShared) {
        loop {
            if let Err(e) = resample.read() {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!("INTx GSI {gsi}: resample fd failed: {e}; line stops re-asserting");
                return;
            }
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            if shared.asserted.load(Ordering::Acquire) {
                if let Err(e) = trigger.write(1) {
                    tracing::warn!("INTx GSI {gsi}: re-assert failed: {e}");
                }
            }
        }
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl LevelIrqLine for KvmLevelLine {
    fn set_level(&self, asserted: bool) -> io::Result<()> {
        self.shared.asserted.store(asserted, Ordering::Release);
        if asserted {
            self.trigger.write(1)?;
        }
        Ok(())
    }
}

impl Drop for KvmLevelLine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wakes the resampler, which sees `stop` and returns.
        if self.resample.write(1).is_ok() {
            if let Some(handle) = self.resampler.take() {
                let _ = handle.join();
            }
        }
        if let Err(e) = self.vm.unregister_irqfd(&self.trigger, self.gsi) {
            tracing::debug!("INTx GSI {}: unregistering the irqfd: {e}", self.gsi);
        }
    }
}

/// Connects PCI INTx pins to IOAPIC pins with [`KvmLevelLine`]s.
pub struct KvmIntxRouter {
    vm: Arc<VmFd>,
}

impl KvmIntxRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl LevelIrqRouter for KvmIntxRouter {
    fn connect(&self, gsi: u32) -> io::Result<Arc<dyn LevelIrqLine>> {
        Ok(Arc::new(KvmLevelLine::new(self.vm.clone(), gsi)?))
    }
}

/// MSI delivery with KVM_SIGNAL_MSI.
pub struct KvmMsi {
    vm: Arc<VmFd>,
}

impl KvmMsi {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl MsiSink for KvmMsi {
    fn send(&self, msg: MsiMessage) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            // 0 means the guest blocked it (e.g. LAPIC disabled): not an error of ours.
            Ok(_) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

/// ioeventfd registration on the VM: guest writes to a doorbell become eventfd signals in the
/// kernel, with no exit to sluice.
pub struct KvmIoEvents {
    vm: Arc<VmFd>,
}

impl KvmIoEvents {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

fn ioevent_result(r: Result<(), kvm_ioctls::Error>) -> io::Result<()> {
    r.map_err(io::Error::from)
}

impl IoEventRegistrar for KvmIoEvents {
    fn register(
        &self,
        event: &EventFd,
        addr: u64,
        len: u32,
        datamatch: Option<u64>,
    ) -> io::Result<()> {
        let at = IoEventAddress::Mmio(addr);
        ioevent_result(match (datamatch, len) {
            (None, _) => self.vm.register_ioevent(event, &at, NoDatamatch),
            (Some(v), 1) => self.vm.register_ioevent(event, &at, v as u8),
            (Some(v), 2) => self.vm.register_ioevent(event, &at, v as u16),
            (Some(v), 4) => self.vm.register_ioevent(event, &at, v as u32),
            (Some(v), 8) => self.vm.register_ioevent(event, &at, v),
            (Some(_), _) => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        })
    }

    fn unregister(
        &self,
        event: &EventFd,
        addr: u64,
        len: u32,
        datamatch: Option<u64>,
    ) -> io::Result<()> {
        let at = IoEventAddress::Mmio(addr);
        ioevent_result(match (datamatch, len) {
            (None, _) => self.vm.unregister_ioevent(event, &at, NoDatamatch),
            (Some(v), 1) => self.vm.unregister_ioevent(event, &at, v as u8),
            (Some(v), 2) => self.vm.unregister_ioevent(event, &at, v as u16),
            (Some(v), 4) => self.vm.unregister_ioevent(event, &at, v as u32),
            (Some(v), 8) => self.vm.unregister_ioevent(event, &at, v),
            (Some(_), _) => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        })
    }
}

/// First GSI handed to MSI routes; 0..24 stay routed to the PIC/IOAPIC pins.
const FIRST_MSI_GSI: u32 = layout::IOAPIC_PINS;

/// Hands out MSI routes backed by irqfds on GSIs above the IOAPIC pins.
///
/// KVM_SET_GSI_ROUTING replaces the whole table, so a VM has exactly one router (in
/// [`VmInterrupts`]), shared by every device: two routers would hand out the same GSIs and
/// each update would drop the other's routes — the guest then loses interrupts (found with
/// NVMe next to virtio devices: Linux's nvme driver timed out I/O whose completions were
/// posted, "completion polled").
pub struct KvmMsiRouter {
    table: Arc<GsiTable>,
}

impl KvmMsiRouter {
    /// The router of `vm`; create one per VM (see [`VmInterrupts`]).
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            table: Arc::new(GsiTable {
                vm,
                msi_routes: Mutex::new(BTreeMap::new()),
                next_gsi: AtomicU32::new(FIRST_MSI_GSI),
            }),
        }
    }
}

/// The interrupt plumbing every PCI device of one VM shares: MSI injection, the VM's one MSI
/// router (its GSI routing table) and ioeventfd registration. Built once per VM and handed to
/// each wiring module (and, cloned, to hot-plug).
#[derive(Clone)]
pub struct VmInterrupts {
    pub msi_sink: Arc<KvmMsi>,
    pub msi_router: Arc<KvmMsiRouter>,
    pub ioevents: Arc<KvmIoEvents>,
    /// With interrupt remapping: the unit every device's MSI is translated through.
    pub remapper: Option<sluice_iommu::Vtd>,
}

impl VmInterrupts {
    pub fn new(vm: &Arc<VmFd>) -> Self {
        Self {
            msi_sink: Arc::new(KvmMsi::new(vm.clone())),
            msi_router: Arc::new(KvmMsiRouter::new(vm.clone())),
            ioevents: Arc::new(KvmIoEvents::new(vm.clone())),
            remapper: None,
        }
    }

    /// The MSI sink and router of the device with `requester` id: the VM's own, or with
    /// interrupt remapping ones that translate through the unit (crate::intremap).
    pub fn msi_for(&self, requester: u16) -> (Arc<dyn MsiSink>, Arc<dyn MsiRouter>) {
        match &self.remapper {
            Some(vtd) => (
                Arc::new(crate::intremap::RemappedMsiSink::new(
                    self.msi_sink.clone(),
                    vtd.clone(),
                    requester,
                )),
                Arc::new(crate::intremap::RemappedMsiRouter::new(
                    self.msi_router.clone(),
                    vtd.clone(),
                    requester,
                )),
            ),
            None => (self.msi_sink.clone(), self.msi_router.clone()),
        }
    }
}

/// The VM's GSI routing table: KVM's default pin routes plus one MSI route per programmed vector.
/// KVM_SET_GSI_ROUTING replaces the whole table, so every update rewrites all of it.
struct GsiTable {
    vm: Arc<VmFd>,
    msi_routes: Mutex<BTreeMap<u32, MsiMessage>>,
    next_gsi: AtomicU32,
}

impl GsiTable {
    fn set_route(&self, gsi: u32, msg: MsiMessage) -> io::Result<()> {
        let mut routes = self
            .msi_routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        routes.insert(gsi, msg);
        self.write(&routes)
    }

    /// Drops `gsi`'s route (its device went away: hot-unplug).
    fn remove_route(&self, gsi: u32) -> io::Result<()> {
        let mut routes = self
            .msi_routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if routes.remove(&gsi).is_none() {
            return Ok(());
        }
        self.write(&routes)
    }

    fn write(&self, routes: &BTreeMap<u32, MsiMessage>) -> io::Result<()> {
        let mut entries = default_pin_routes();
        entries.extend(routes.iter().map(|(gsi, msg)| msi_route_entry(*gsi, *msg)));
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| io::Error::other("too many GSI routes"))?;
        self.vm.set_gsi_routing(&table).map_err(io::Error::from)
    }
}

/// KVM's default routing with an in-kernel irqchip: GSI n → IOAPIC pin n, and GSIs 0..16 also to
/// the PIC pins.
fn default_pin_routes() -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    for gsi in 0..layout::IOAPIC_PINS {
        if gsi < 16 {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(irqchip_route_entry(gsi, chip, pin));
        }
        entries.push(irqchip_route_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    entries
}

fn irqchip_route_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    entry
}

fn msi_route_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi = kvm_irq_routing_msi {
        address_lo: msg.address as u32,
        address_hi: (msg.address >> 32) as u32,
        data: msg.data,
        ..Default::default()
    };
    entry
}

impl MsiRouter for KvmMsiRouter {
    fn allocate(&self) -> io::Result<Arc<dyn MsiRoute>> {
        let gsi = self.table.next_gsi.fetch_add(1, Ordering::Relaxed);
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        self.table
            .vm
            .register_irqfd(&event, gsi)
            .map_err(io::Error::from)?;
        Ok(Arc::new(KvmMsiRoute {
            table: self.table.clone(),
            gsi,
            event,
        }))
    }
}

/// One vector: a GSI whose MSI route follows the guest's MSI-X entry, injected through an irqfd.
struct KvmMsiRoute {
    table: Arc<GsiTable>,
    gsi: u32,
    event: EventFd,
}

impl MsiRoute for KvmMsiRoute {
    fn update(&self, msg: MsiMessage) -> io::Result<()> {
        self.table.set_route(self.gsi, msg)
    }

    fn trigger(&self) -> io::Result<()> {
        self.event.write(1)
    }

    fn trigger_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsRawFd;
        // SAFETY: the fd belongs to `self.event`, which lives as long as the borrow of `self`.
        Some(unsafe { std::os::fd::BorrowedFd::borrow_raw(self.event.as_raw_fd()) })
    }
}

/// A vector whose device went away (hot-unplug) gives its irqfd and route back to KVM.
impl Drop for KvmMsiRoute {
    fn drop(&mut self) {
        if let Err(e) = self.table.vm.unregister_irqfd(&self.event, self.gsi) {
            tracing::debug!("MSI GSI {}: unregistering the irqfd: {e}", self.gsi);
        }
        if let Err(e) = self.table.remove_route(self.gsi) {
            tracing::debug!("MSI GSI {}: removing the route: {e}", self.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::{ExitDispatch, ExitStats, RunControl, VcpuThread, VmOutcome};
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuFd};
    use sluice_bus::Bus;
    use sluice_devices::{ExitSink, GuestExit};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    struct ExitPort(Arc<RunControl>);

    impl sluice_bus::BusDevice for ExitPort {
        fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _: u64, _: u64, data: &[u8]) {
            self.0.request_exit(GuestExit::DebugExit(data[0]));
        }
    }

    fn vm_with_low_ram(kvm: &Kvm, code: &[u8]) -> (Arc<VmFd>, GuestMemoryMmap) {
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let region = mem.iter().next().unwrap();
        // SAFETY: the mapping lives in `mem`, returned to the caller and kept for the VM's life.
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            })
            .unwrap()
        };
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        (vm, mem)
    }

    /// vCPU 0 in real mode at 0:0x1000; `segments` adjusts the other segment registers.
    fn real_mode_vcpu(vm: &VmFd, segments: impl FnOnce(&mut kvm_bindings::kvm_sregs)) -> VcpuFd {
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        segments(&mut sregs);
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rsp = 0x8000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        vcpu
    }

    /// Empty buses with the debug-exit port (0xf4) ending the run.
    fn dispatch_with_exit_port() -> ExitDispatch {
        let dispatch = ExitDispatch {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            control: Arc::new(RunControl::default()),
            stats: Arc::new(ExitStats::default()),
            hook: None,
        };
        let port = ExitPort(dispatch.control.clone());
        dispatch
            .pio
            .insert("exit", Arc::new(Mutex::new(port)), 0xf4, 1)
            .unwrap();
        dispatch
    }

    #[test]
    fn ioeventfd_doorbell_signals_without_a_userspace_exit() {
        let Ok(kvm) = Kvm::new() else {
            println!("SKIP ioeventfd test: /dev/kvm unusable");
            return;
        };
        // mov ax, 0xb000; mov ds, ax; mov word [0], 1; mov al, 0; out 0xf4, al
        let code = [
            0xb8, 0x00, 0xb0, 0x8e, 0xd8, 0xc7, 0x06, 0x00, 0x00, 0x01, 0x00, 0xb0, 0x00, 0xe6,
            0xf4,
        ];
        let (vm, _mem) = vm_with_low_ram(&kvm, &code);
        let doorbell = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        KvmIoEvents::new(vm.clone())
            .register(&doorbell, 0xb0000, 2, None)
            .unwrap();
        let vcpu = real_mode_vcpu(&vm, |_| {});
        let dispatch = dispatch_with_exit_port();

        let thread = VcpuThread::spawn(0, vcpu, dispatch.clone()).unwrap();
        let outcome = dispatch.control.wait();
        thread.stop();

        assert_eq!(outcome, VmOutcome::DebugExit(0));
        assert_eq!(
            doorbell.read().unwrap(),
            1,
            "the doorbell write reached the eventfd"
        );
        assert_eq!(
            dispatch.stats.mmio.load(Ordering::Relaxed),
            0,
            "no MMIO exit"
        );
    }

    /// Port 0x50: the guest is ready (the line is asserted); port 0x51: deassert; port 0x52
    /// reads 0 until 100 ms after its first read, then 1 (the guest polls it with interrupts
    /// on, so stray interrupts have time to arrive).
    struct IntxProbe {
        line: Arc<dyn LevelIrqLine>,
        quiet_since: Option<std::time::Instant>,
    }

    impl sluice_bus::BusDevice for IntxProbe {
        fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
            let since = *self.quiet_since.get_or_insert_with(std::time::Instant::now);
            let done = since.elapsed() >= std::time::Duration::from_millis(100);
            data.fill(u8::from(done));
        }
        fn write(&mut self, _: u64, offset: u64, _: &[u8]) {
            self.line.set_level(offset == 0).unwrap();
        }
    }

    /// Real mode at 0x1000 (DS = IOAPIC, ES = LAPIC, FS = RAM, set by the test): enable the
    /// LAPIC, route IOAPIC pin 16 level-triggered to vector 0x40 on APIC 0, report ready on port
    /// 0x50, `sti`, halt until two interrupts were counted, poll port 0x52 until it reads
    /// nonzero, then exit with the count (port 0xf4). Assembled from:
    ///   movl $0x1ff,%es:0xf0; movl $0x30,0x0; movl $0x8040,0x10; movl $0x31,0x0; movl $0,0x10
    ///   mov $0,%al; out %al,$0x50; sti; 1: hlt; cmpb $2,%fs:0x2000; jb 1b
    ///   2: in $0x52,%al; test %al,%al; jz 2b; mov %fs:0x2000,%al; out %al,$0xf4; 3: hlt; jmp 3b
    const INTX_GUEST_MAIN: [u8; 75] = [
        0x26, 0x66, 0xc7, 0x06, 0xf0, 0x00, 0xff, 0x01, 0x00, 0x00, 0x66, 0xc7, 0x06, 0x00, 0x00,
        0x30, 0x00, 0x00, 0x00, 0x66, 0xc7, 0x06, 0x10, 0x00, 0x40, 0x80, 0x00, 0x00, 0x66, 0xc7,
        0x06, 0x00, 0x00, 0x31, 0x00, 0x00, 0x00, 0x66, 0xc7, 0x06, 0x10, 0x00, 0x00, 0x00, 0x00,
        0x00, 0xb0, 0x00, 0xe6, 0x50, 0xfb, 0xf4, 0x64, 0x80, 0x3e, 0x00, 0x20, 0x02, 0x72, 0xf7,
        0xe4, 0x52, 0x84, 0xc0, 0x74, 0xfa, 0x64, 0xa0, 0x00, 0x20, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd,
    ];
    /// The vector 0x40 handler at 0x1100: counts interrupts in FS:0x2000; from the second one
    /// on it deasserts (port 0x51); EOIs the LAPIC:
    ///   push %ax; incb %fs:0x2000; cmpb $2,%fs:0x2000; jb 2f; mov $1,%al; out %al,$0x51
    ///   2: movl $0,%es:0xb0; pop %ax; iret
    const INTX_GUEST_HANDLER: [u8; 30] = [
        0x50, 0x64, 0xfe, 0x06, 0x00, 0x20, 0x64, 0x80, 0x3e, 0x00, 0x20, 0x02, 0x72, 0x04, 0xb0,
        0x01, 0xe6, 0x51, 0x26, 0x66, 0xc7, 0x06, 0xb0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x58, 0xcf,
    ];

    /// An INTx line that stays asserted across the guest's EOI is delivered again (the resample
    /// fd path); the guest's deassert then quiets it. Without resampling the guest would see
    /// one interrupt and never exit (the watchdog then fails the test).
    #[test]
    fn level_intx_reaches_the_guest_and_reasserts_after_eoi() {
        let Ok(kvm) = Kvm::new() else {
            println!("SKIP intx test: /dev/kvm unusable");
            return;
        };
        let (vm, mem) = vm_with_low_ram(&kvm, &INTX_GUEST_MAIN);
        mem.write_slice(&INTX_GUEST_HANDLER, GuestAddress(0x1100))
            .unwrap();
        // IVT entry 0x40: offset 0x1100, segment 0.
        mem.write_obj(0x1100u32, GuestAddress(0x40 * 4)).unwrap();
        let router = KvmIntxRouter::new(vm.clone());
        let line = router.connect(layout::PCI_INTX_FIRST_GSI).unwrap();
        let vcpu = real_mode_vcpu(&vm, |sregs| {
            sregs.ds.base = layout::IOAPIC_START;
            sregs.es.base = layout::LAPIC_START;
            sregs.fs.base = 0;
            sregs.ss.base = 0;
        });
        let dispatch = dispatch_with_exit_port();
        let probe = IntxProbe {
            line: line.clone(),
            quiet_since: None,
        };
        dispatch
            .pio
            .insert("intx", Arc::new(Mutex::new(probe)), 0x50, 3)
            .unwrap();
        let watchdog_control = dispatch.control.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(20));
            watchdog_control.request_exit(GuestExit::DebugExit(0xee));
        });

        let thread = VcpuThread::spawn(0, vcpu, dispatch.clone()).unwrap();
        let outcome = dispatch.control.wait();
        thread.stop();

        // Two deliveries while asserted; after the deassert at most one stray (a re-assert that
        // KVM injected asynchronously just before it), then quiet for 100 ms.
        let VmOutcome::DebugExit(count) = outcome else {
            panic!("unexpected outcome {outcome:?}");
        };
        assert_ne!(
            count, 0xee,
            "timed out: the line was not re-asserted after EOI"
        );
        assert!((2..=3).contains(&count), "{count} interrupts");
        let counted: u8 = mem.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(
            counted, count,
            "no interrupt after the exit value was taken"
        );
    }

    #[test]
    fn msi_routes_coexist_with_default_pin_routes() {
        let Ok(kvm) = Kvm::new() else {
            println!("SKIP msi route test: /dev/kvm unusable");
            return;
        };
        let (vm, _mem) = vm_with_low_ram(&kvm, &[0xf4]);
        let router = KvmMsiRouter::new(vm.clone());

        let a = router.allocate().unwrap();
        let b = router.allocate().unwrap();
        a.update(MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        })
        .unwrap();
        b.update(MsiMessage {
            address: 0xfee0_1000,
            data: 0x42,
        })
        .unwrap();
        a.trigger().unwrap();

        let table = router.table.msi_routes.lock().unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(table.keys().copied().collect::<Vec<_>>(), vec![24, 25]);
        // A pin line still works after the table was replaced.
        IrqfdLine::new(&vm, 4).unwrap().trigger().unwrap();
    }

    #[test]
    fn devices_of_one_vm_share_its_one_router_and_gsi_table() {
        let Ok(kvm) = Kvm::new() else {
            println!("SKIP shared GSI table test: /dev/kvm unusable");
            return;
        };
        let (vm, _mem) = vm_with_low_ram(&kvm, &[0xf4]);
        let (other_vm, _other_mem) = vm_with_low_ram(&kvm, &[0xf4]);
        let interrupts = VmInterrupts::new(&vm);
        let (virtio, nvme) = (interrupts.msi_router.clone(), interrupts.msi_router.clone());
        let elsewhere = VmInterrupts::new(&other_vm).msi_router;
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };

        let a = virtio.allocate().unwrap();
        let b = nvme.allocate().unwrap();
        let c = elsewhere.allocate().unwrap();
        a.update(message).unwrap();
        b.update(message).unwrap();
        c.update(message).unwrap();

        let routes = interrupts.msi_router.table.msi_routes.lock().unwrap();
        assert_eq!(
            routes.keys().copied().collect::<Vec<_>>(),
            vec![24, 25],
            "one table: distinct GSIs, and the second update kept the first route"
        );
        let other = elsewhere.table.msi_routes.lock().unwrap();
        assert_eq!(other.keys().copied().collect::<Vec<_>>(), vec![24]);
    }
}
