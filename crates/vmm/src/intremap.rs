//! Interrupt remapping on the delivery path (`--iommu vtd`, interrupt remapping on): every
//! interrupt the guest programs goes through the VT-d's interrupt remapping table before KVM
//! sees it, since KVM only understands compatibility-format messages.
//!
//! * MSI/MSI-X: each device gets an [`MsiRouter`] and [`MsiSink`] that know its requester id.
//!   A route translates when the guest programs the vector (`MsiRoute::update`), hands the
//!   translated message to the VM's KVM route (GSI table + irqfd), and translates again when
//!   the unit says a translation may have changed (IEC invalidation, SIRTP, IRE/CFI toggled:
//!   [`RemapClient`]). A signal on a translated route stays one eventfd write. A vector whose
//!   translation fails is blocked; only when the device really signals it is the request
//!   translated once more with fault recording, so the guest sees the fault (in the fault
//!   recording registers, with the fault event) for a real interrupt, never for a stale entry
//!   of a vector it already tore down. The sink (masked-then-unmasked vectors, devices without
//!   routes) translates each message as it is sent.
//!
//! * IOAPIC: with remapping on, Linux writes the IOAPIC's redirection entries in remappable
//!   format (an IRTE index instead of vector and destination), which KVM's in-kernel IOAPIC
//!   cannot read. QEMU answers this with `kernel-irqchip=split` and a userspace IOAPIC. sluice
//!   keeps the whole in-kernel irqchip (PIC, IOAPIC, PIT, the resampled INTx irqfds) and puts
//!   a [`RemappingIoapic`] in front of it instead: the MADT names the front's page
//!   (`layout::REMAPPING_IOAPIC_START`) as the IOAPIC, the guest programs it, and the front
//!   writes each translated entry (vector, destination, delivery mode from the IRTE; mask,
//!   trigger mode and polarity from the guest's entry) into the in-kernel IOAPIC with
//!   KVM_GET/SET_IRQCHIP. The pins, their irqfds, the PIT on pin 2, level-triggered EOI and
//!   remote IRR all stay in the kernel, so nothing about interrupt injection changes and the
//!   default VM (no vIOMMU) is untouched. The cost: a redirection-entry write is two ioctls
//!   (rare: setup, affinity changes, mask/unmask), and one that races an edge the kernel is
//!   injecting on that same pin can rewrite its status bits (remote IRR, delivery status) from
//!   the copy read just before (the kernel re-injects pending IRR bits on SET_IRQCHIP; a level
//!   pin whose remote IRR is lost gets delivered again at its next assertion). A split irqchip
//!   would avoid the race but moves the IOAPIC, the PIC and the PIT to userspace (KVM refuses
//!   the in-kernel PIT without the in-kernel PIC, and resample irqfds need the full in-kernel
//!   irqchip) — a much larger change to every VM than one page of register emulation.
//!
//! Only xAPIC destinations (the unit has no ECAP.EIM): up to 255 vCPUs behind the vIOMMU.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::VmFd;
use sluice_bus::irq::{MsiMessage, MsiRoute, MsiRouter, MsiSink};
use sluice_bus::BusDevice;
use sluice_iommu::intremap::{ioapic_entry, ioapic_request, RemapClient, RTE_LEVEL, RTE_MASKED};
use sluice_iommu::Vtd;

use crate::layout;

/// Hands out routes that translate through the unit for one requester.
pub struct RemappedMsiRouter {
    inner: Arc<dyn MsiRouter>,
    vtd: Vtd,
    requester: u16,
}

impl RemappedMsiRouter {
    pub fn new(inner: Arc<dyn MsiRouter>, vtd: Vtd, requester: u16) -> Self {
        Self {
            inner,
            vtd,
            requester,
        }
    }
}

impl MsiRouter for RemappedMsiRouter {
    fn allocate(&self) -> io::Result<Arc<dyn MsiRoute>> {
        let route = Arc::new(RemappedRoute {
            inner: self.inner.allocate()?,
            vtd: self.vtd.clone(),
            requester: self.requester,
            programmed: Mutex::new(None),
            blocked: AtomicBool::new(false),
            remapped: AtomicBool::new(false),
        });
        let client: Arc<dyn RemapClient> = route.clone();
        self.vtd.add_remap_client(Arc::downgrade(&client));
        Ok(route)
    }
}

/// One vector: the guest's (remappable) message, and a KVM route holding its translation.
struct RemappedRoute {
    inner: Arc<dyn MsiRoute>,
    vtd: Vtd,
    requester: u16,
    /// What the guest programmed, and what the KVM route was last pointed at.
    programmed: Mutex<Option<(MsiMessage, Option<MsiMessage>)>>,
    /// The programmed message does not translate: signals are refused (and then recorded).
    blocked: AtomicBool,
    /// The translation went through an IRTE (counted per delivery).
    remapped: AtomicBool,
}

impl RemappedRoute {
    /// Translates the programmed message again and points the KVM route at the result.
    fn retranslate(&self) -> io::Result<()> {
        let mut programmed = self
            .programmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some((message, routed)) = programmed.as_mut() else {
            return Ok(());
        };
        match self.vtd.translate_interrupt(self.requester, *message) {
            Ok(translated) => {
                if *routed != Some(translated) {
                    *routed = None;
                    self.inner.update(translated)?;
                    *routed = Some(translated);
                }
                self.remapped
                    .store(translated != *message, Ordering::Release);
                self.blocked.store(false, Ordering::Release);
            }
            Err(fault) => {
                tracing::debug!(
                    "vt-d: vector of {:#06x} blocked: {:?}",
                    self.requester,
                    fault.reason
                );
                self.blocked.store(true, Ordering::Release);
            }
        }
        Ok(())
    }
}

impl MsiRoute for RemappedRoute {
    fn update(&self, msg: MsiMessage) -> io::Result<()> {
        {
            let mut programmed = self
                .programmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let routed = programmed.and_then(|(_, routed)| routed);
            *programmed = Some((msg, routed));
        }
        self.retranslate()
    }

    fn trigger(&self) -> io::Result<()> {
        if self.blocked.load(Ordering::Acquire) {
            let programmed = *self
                .programmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some((message, _)) = programmed else {
                return Ok(());
            };
            // Records the fault. An entry the guest made valid without invalidating the
            // interrupt entry cache stays blocked until it does (what a caching unit may do):
            // reprogramming here would be a GSI-table ioctl on a queue worker thread, which
            // its seccomp filter refuses.
            let _ = self.vtd.remap_interrupt(self.requester, message);
            return Ok(());
        } else if self.remapped.load(Ordering::Acquire) {
            self.vtd.count_remapped_delivery();
        }
        self.inner.trigger()
    }

    /// The KVM route's eventfd (for a producer outside sluice); it delivers the last good
    /// translation even while the vector is blocked. `--iommu` refuses VFIO devices for now,
    /// the only users of this fd.
    fn trigger_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner.trigger_fd()
    }
}

impl RemapClient for RemappedRoute {
    fn remapping_changed(&self) {
        if let Err(e) = self.retranslate() {
            tracing::warn!("vt-d: cannot reprogram a remapped MSI route: {e}");
        }
    }
}

/// A device's MSI sink that translates each message as it is sent.
pub struct RemappedMsiSink {
    inner: Arc<dyn MsiSink>,
    vtd: Vtd,
    requester: u16,
}

impl RemappedMsiSink {
    pub fn new(inner: Arc<dyn MsiSink>, vtd: Vtd, requester: u16) -> Self {
        Self {
            inner,
            vtd,
            requester,
        }
    }
}

impl MsiSink for RemappedMsiSink {
    fn send(&self, msg: MsiMessage) -> io::Result<()> {
        match self.vtd.remap_interrupt(self.requester, msg) {
            Some(translated) => self.inner.send(translated),
            // Refused: recorded as a fault (or suppressed by FPD); nothing reaches the guest.
            None => Ok(()),
        }
    }
}

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPIC_ID_REGISTER: u32 = 0;
const IOAPIC_VERSION_REGISTER: u32 = 1;
const IOAPIC_ARBITRATION_REGISTER: u32 = 2;
const IOAPIC_FIRST_ENTRY: u32 = 0x10;
/// Version 0x11 (as KVM's, so Linux EOIs level pins through the LAPIC broadcast the kernel
/// IOAPIC sees), maximum redirection entry 23.
const IOAPIC_VERSION: u32 = 0x11 | ((layout::IOAPIC_PINS - 1) << 16);
const PINS: usize = layout::IOAPIC_PINS as usize;

const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;

/// The IOAPIC the guest programs when interrupt remapping is offered: translates its
/// redirection entries into KVM's in-kernel IOAPIC (see the module docs).
pub struct RemappingIoapic {
    shared: Arc<IoapicFront>,
}

struct IoapicFront {
    vm: Arc<VmFd>,
    vtd: Vtd,
    registers: Mutex<IoapicRegisters>,
}

struct IoapicRegisters {
    select: u32,
    id: u32,
    /// The entries as the guest wrote them.
    entries: [u64; PINS],
    /// What each pin of the kernel IOAPIC was last given: a pin is rewritten only when its
    /// translation changed, which keeps the GET/SET window (module docs) to real changes.
    pushed: [Option<u64>; PINS],
}

impl RemappingIoapic {
    /// A front of `vm`'s in-kernel IOAPIC translating through `vtd`; it re-translates its pins
    /// when the unit's remapping changes.
    pub fn new(vm: Arc<VmFd>, vtd: Vtd) -> Self {
        let shared = Arc::new(IoapicFront {
            vm,
            vtd: vtd.clone(),
            registers: Mutex::new(IoapicRegisters {
                select: 0,
                id: u32::from(layout::IOAPIC_ID),
                entries: [RTE_MASKED; PINS],
                pushed: [None; PINS],
            }),
        });
        let client: Arc<dyn RemapClient> = shared.clone();
        vtd.add_remap_client(Arc::downgrade(&client));
        Self { shared }
    }
}

impl IoapicFront {
    fn registers(&self) -> std::sync::MutexGuard<'_, IoapicRegisters> {
        self.registers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read_window(&self, registers: &IoapicRegisters) -> u32 {
        match registers.select {
            IOAPIC_ID_REGISTER | IOAPIC_ARBITRATION_REGISTER => (registers.id & 0xf) << 24,
            IOAPIC_VERSION_REGISTER => IOAPIC_VERSION,
            select => {
                let Some(pin) = entry_pin(select) else {
                    return 0;
                };
                let mut entry = registers.entries[pin];
                // Delivery status and remote IRR are the kernel IOAPIC's.
                let status = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;
                entry = (entry & !status) | (self.kernel_entry(pin).unwrap_or(0) & status);
                if select & 1 == 0 {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
        }
    }

    fn write_window(&self, registers: &mut IoapicRegisters, value: u32) {
        match registers.select {
            IOAPIC_ID_REGISTER => registers.id = (value >> 24) & 0xf,
            select => {
                let Some(pin) = entry_pin(select) else {
                    return;
                };
                let entry = &mut registers.entries[pin];
                *entry = if select & 1 == 0 {
                    (*entry & !0xffff_ffff)
                        | u64::from(value & !(RTE_DELIVERY_STATUS | RTE_REMOTE_IRR) as u32)
                } else {
                    (*entry & 0xffff_ffff) | (u64::from(value) << 32)
                };
                self.program(registers, pin);
            }
        }
    }

    /// What the kernel IOAPIC gets for the guest's `entry`: its translation (remappable or
    /// compatibility format, as the unit decides), or a masked entry when the guest masked it
    /// or it does not translate.
    fn translate(&self, pin: usize, entry: u64) -> u64 {
        if entry & RTE_MASKED != 0 {
            return RTE_MASKED | (entry & RTE_LEVEL);
        }
        let request = ioapic_request(entry);
        match self
            .vtd
            .translate_interrupt(layout::IOAPIC_REQUESTER_ID, request)
        {
            Ok(message) => ioapic_entry(entry, message),
            Err(fault) => {
                tracing::debug!("vt-d: IOAPIC pin {pin} blocked: {:?}", fault.reason);
                RTE_MASKED | (entry & RTE_LEVEL)
            }
        }
    }

    /// Writes the translation of the guest's entry for `pin` into the kernel IOAPIC's pin if it
    /// changed, keeping its status bits (remote IRR cleared for an edge entry, as the IOAPIC
    /// does).
    fn program(&self, registers: &mut IoapicRegisters, pin: usize) {
        let translated = self.translate(pin, registers.entries[pin]);
        if registers.pushed[pin] == Some(translated) {
            return;
        }
        registers.pushed[pin] = None;
        let result = self.update_kernel(|chip| {
            let status = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;
            let mut kept = read_entry(chip, pin) & status;
            if translated & RTE_LEVEL == 0 {
                kept &= !RTE_REMOTE_IRR;
            }
            write_entry(chip, pin, translated | kept);
        });
        match result {
            Ok(()) => registers.pushed[pin] = Some(translated),
            Err(e) => tracing::warn!("IOAPIC pin {pin}: cannot program the in-kernel IOAPIC: {e}"),
        }
    }

    fn kernel_entry(&self, pin: usize) -> Option<u64> {
        let mut chip = ioapic_chip();
        self.vm.get_irqchip(&mut chip).ok()?;
        Some(read_entry(&chip, pin))
    }

    fn update_kernel(&self, change: impl FnOnce(&mut kvm_irqchip)) -> io::Result<()> {
        let mut chip = ioapic_chip();
        self.vm.get_irqchip(&mut chip).map_err(io::Error::from)?;
        change(&mut chip);
        self.vm.set_irqchip(&chip).map_err(io::Error::from)
    }
}

impl RemapClient for IoapicFront {
    fn remapping_changed(&self) {
        let mut registers = self.registers();
        for pin in 0..PINS {
            self.program(&mut registers, pin);
        }
    }
}

impl BusDevice for RemappingIoapic {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let registers = self.shared.registers();
        let value = match offset {
            IOREGSEL => registers.select,
            IOWIN => self.shared.read_window(&registers),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(4);
        data[..len].copy_from_slice(&bytes[..len]);
        data[len..].fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 4];
        let len = data.len().min(4);
        raw[..len].copy_from_slice(&data[..len]);
        let value = u32::from_le_bytes(raw);
        let mut registers = self.shared.registers();
        match offset {
            IOREGSEL => registers.select = value & 0xff,
            IOWIN => self.shared.write_window(&mut registers, value),
            // The EOI register (version 0x20) does not exist in version 0x11.
            _ => {}
        }
    }
}

/// The pin a redirection-entry register index names, if any.
fn entry_pin(select: u32) -> Option<usize> {
    let pin = usize::try_from(select.checked_sub(IOAPIC_FIRST_ENTRY)? / 2).ok()?;
    (pin < PINS).then_some(pin)
}

fn ioapic_chip() -> kvm_irqchip {
    kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    }
}

fn read_entry(chip: &kvm_irqchip, pin: usize) -> u64 {
    // SAFETY: `chip` came from KVM_GET_IRQCHIP for the IOAPIC, so `ioapic` is the live union
    // member; every bit pattern of the plain-integer entry is valid.
    unsafe { chip.chip.ioapic.redirtbl[pin].bits }
}

fn write_entry(chip: &mut kvm_irqchip, pin: usize, entry: u64) {
    // SAFETY: as in `read_entry`; writing a u64 member of a plain-data union.
    unsafe { chip.chip.ioapic.redirtbl[pin].bits = entry }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;
    use sluice_iommu::intremap::{remappable_msi, IRTA, RTE_REMAPPABLE};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const TABLE: u64 = 0x8000;

    struct NoEvents;

    impl MsiSink for NoEvents {
        fn send(&self, _: MsiMessage) -> io::Result<()> {
            Ok(())
        }
    }

    /// A unit with remapping enabled on a 256-entry table at `TABLE`.
    fn remapping_unit() -> (Vtd, GuestMemoryMmap) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vtd = Vtd::with_interrupt_remapping(memory.clone(), 39, Arc::new(NoEvents));
        vtd.write_register(IRTA, &(TABLE | 7).to_le_bytes());
        vtd.write_register(0x18, &(1u32 << 24).to_le_bytes());
        vtd.write_register(0x18, &(1u32 << 25).to_le_bytes());
        (vtd, memory)
    }

    /// IRTE `index`: present, `vector`, xAPIC `destination`, source id `sid` (SVT 1, SQ 0),
    /// level-triggered when asked.
    fn set_irte(memory: &GuestMemoryMmap, index: u64, vector: u8, destination: u8, sid: u16) {
        let lo = 1 | (u64::from(vector) << 16) | (u64::from(destination) << 40);
        let hi = u64::from(sid) | (1 << 18);
        memory
            .write_obj(lo, GuestAddress(TABLE + index * 16))
            .unwrap();
        memory
            .write_obj(hi, GuestAddress(TABLE + index * 16 + 8))
            .unwrap();
    }

    /// Tells the unit's clients the way a guest does: a GCMD write re-latching the table.
    fn invalidate(vtd: &Vtd) {
        vtd.write_register(0x18, &((1u32 << 25) | (1 << 24)).to_le_bytes());
    }

    #[derive(Default)]
    struct RecordingRoute {
        updates: Mutex<Vec<MsiMessage>>,
        triggers: std::sync::atomic::AtomicUsize,
    }

    impl MsiRoute for RecordingRoute {
        fn update(&self, msg: MsiMessage) -> io::Result<()> {
            self.updates.lock().unwrap().push(msg);
            Ok(())
        }
        fn trigger(&self) -> io::Result<()> {
            self.triggers.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct OneRoute(Arc<RecordingRoute>);

    impl MsiRouter for OneRoute {
        fn allocate(&self) -> io::Result<Arc<dyn MsiRoute>> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn route_holds_the_translation_and_follows_the_irte_after_invalidation() {
        let (vtd, memory) = remapping_unit();
        set_irte(&memory, 2, 0x45, 0, 0x0018);
        let kvm_route = Arc::new(RecordingRoute::default());
        let router =
            RemappedMsiRouter::new(Arc::new(OneRoute(kvm_route.clone())), vtd.clone(), 0x18);
        let route = router.allocate().unwrap();

        route.update(remappable_msi(2)).unwrap();
        route.trigger().unwrap();
        set_irte(&memory, 2, 0x46, 1, 0x0018);
        invalidate(&vtd);

        let updates = kvm_route.updates.lock().unwrap().clone();
        assert_eq!(
            updates,
            [
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x45
                },
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x46
                }
            ]
        );
        assert_eq!(kvm_route.triggers.load(Ordering::SeqCst), 1);
        assert_eq!(vtd.metrics().counter("interrupts_remapped"), Some(1));
    }

    /// The MSI-X path a device really uses: the guest programs a remappable message in the
    /// table and enables MSI-X; the device's signal reaches the KVM route with the IRTE's
    /// translation.
    #[test]
    fn msix_vector_programmed_in_remappable_format_is_delivered_translated() {
        use sluice_pci::{MsixTable, MsixVectors, MSIX_ENABLE};
        let (vtd, memory) = remapping_unit();
        set_irte(&memory, 0x92, 0x61, 1, 0x0010);
        let kvm_route = Arc::new(RecordingRoute::default());
        let router =
            RemappedMsiRouter::new(Arc::new(OneRoute(kvm_route.clone())), vtd.clone(), 0x10);
        let sink = Arc::new(RemappedMsiSink::new(Arc::new(NoEvents), vtd.clone(), 0x10));
        let vectors = MsixVectors::new(MsixTable::new(1, sink).unwrap(), Some(&router)).unwrap();
        let message = remappable_msi(0x92);

        vectors.write_table(0, &message.address.to_le_bytes());
        vectors.write_table(8, &message.data.to_le_bytes());
        vectors.write_table(12, &0u32.to_le_bytes());
        vectors.set_message_control(MSIX_ENABLE);
        vectors.signal(0);

        assert_eq!(
            kvm_route.updates.lock().unwrap().clone(),
            [MsiMessage {
                address: 0xfee0_1000,
                data: 0x61
            }]
        );
        assert_eq!(kvm_route.triggers.load(Ordering::SeqCst), 1);
        assert_eq!(vtd.metrics().counter("interrupts_remapped"), Some(1));
    }

    #[test]
    fn blocked_route_drops_signals_and_records_a_fault_per_signal() {
        let (vtd, _memory) = remapping_unit();
        let kvm_route = Arc::new(RecordingRoute::default());
        let router =
            RemappedMsiRouter::new(Arc::new(OneRoute(kvm_route.clone())), vtd.clone(), 0x18);
        let route = router.allocate().unwrap();

        route.update(remappable_msi(3)).unwrap();
        let faults_after_programming = vtd.metrics().counter("interrupt_faults");
        route.trigger().unwrap();

        assert_eq!(
            faults_after_programming,
            Some(0),
            "programming does not fault"
        );
        assert_eq!(vtd.metrics().counter("interrupt_faults"), Some(1));
        assert_eq!(kvm_route.triggers.load(Ordering::SeqCst), 0);
        assert!(kvm_route.updates.lock().unwrap().is_empty());
    }

    #[test]
    fn sink_translates_each_message() {
        #[derive(Default)]
        struct Sent(Mutex<Vec<MsiMessage>>);
        impl MsiSink for Sent {
            fn send(&self, msg: MsiMessage) -> io::Result<()> {
                self.0.lock().unwrap().push(msg);
                Ok(())
            }
        }
        let (vtd, memory) = remapping_unit();
        set_irte(&memory, 0, 0x50, 0, 0x0020);
        let sent = Arc::new(Sent::default());
        let sink = RemappedMsiSink::new(sent.clone(), vtd.clone(), 0x20);

        sink.send(remappable_msi(0)).unwrap();
        sink.send(remappable_msi(1)).unwrap();

        let messages = sent.0.lock().unwrap().clone();
        assert_eq!(
            messages.len(),
            1,
            "the request for the absent IRTE 1 is refused"
        );
        assert_eq!(messages[0].data, 0x50);
        assert_eq!(vtd.metrics().counter("interrupt_faults"), Some(1));
    }

    #[test]
    fn ioapic_front_writes_translated_entries_into_the_kernel_ioapic() {
        let Ok(kvm) = Kvm::new() else {
            println!("SKIP remapping IOAPIC test: /dev/kvm unusable");
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let (vtd, memory) = remapping_unit();
        set_irte(&memory, 7, 0x33, 0, layout::IOAPIC_REQUESTER_ID);
        let mut ioapic = RemappingIoapic::new(vm.clone(), vtd.clone());
        // Pin 4, remappable (index 7), edge, unmasked; the vector field holds the pin (Linux).
        let entry: u64 = (7 << 49) | RTE_REMAPPABLE | 4;
        let write = |ioapic: &mut RemappingIoapic, register: u32, value: u32| {
            ioapic.write(0, IOREGSEL, &register.to_le_bytes());
            ioapic.write(0, IOWIN, &value.to_le_bytes());
        };

        write(&mut ioapic, 0x19, (entry >> 32) as u32);
        write(&mut ioapic, 0x18, entry as u32);

        let kernel = ioapic.shared.kernel_entry(4).unwrap();
        assert_eq!(kernel & 0xff, 0x33, "the IRTE's vector");
        assert_eq!(kernel & RTE_MASKED, 0);
        assert_eq!(kernel >> 56, 0, "destination APIC 0");
        let mut raw = [0u8; 4];
        ioapic.write(0, IOREGSEL, &0x19u32.to_le_bytes());
        ioapic.read(0, IOWIN, &mut raw);
        assert_eq!(
            u32::from_le_bytes(raw),
            (entry >> 32) as u32,
            "reads back as written"
        );

        // The IRTE goes away and the guest invalidates: the pin is masked in the kernel.
        memory
            .write_obj(0u64, GuestAddress(TABLE + 7 * 16))
            .unwrap();
        invalidate(&vtd);
        assert_ne!(ioapic.shared.kernel_entry(4).unwrap() & RTE_MASKED, 0);
    }
}
