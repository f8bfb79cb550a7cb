//! Interrupt remapping driven through the registers the way Linux's intel_irq_remapping does:
//! IRTA, SIRTP, IRE (CFI left clear), IRTEs in guest memory, IEC invalidations on the queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sluice_bus::irq::{MsiMessage, MsiSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::intremap::{
    remappable_msi, RemapClient, ECAP_IR, GSTS_CFIS, GSTS_IRES, GSTS_IRTPS, IRTA,
};
use crate::regs::*;
use crate::Vtd;

const TABLE: u64 = 0x8000;
const QUEUE: u64 = 0x3000;
/// Requester 00:04.0.
const DEVICE: u16 = 4 << 3;
const FAULT_ADDRESS: u32 = 0xfee0_0000;
const FAULT_DATA: u32 = 0x42;

#[derive(Default)]
struct Recorded(Mutex<Vec<MsiMessage>>);

impl MsiSink for Recorded {
    fn send(&self, msg: MsiMessage) -> std::io::Result<()> {
        self.0.lock().unwrap().push(msg);
        Ok(())
    }
}

#[derive(Default)]
struct CountingClient(AtomicUsize);

impl RemapClient for CountingClient {
    fn remapping_changed(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Rig {
    memory: GuestMemoryMmap,
    vtd: Vtd,
    events: Arc<Recorded>,
}

impl Rig {
    fn new() -> Self {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let events = Arc::new(Recorded::default());
        let vtd = Vtd::with_interrupt_remapping(memory.clone(), 39, events.clone());
        let rig = Self {
            memory,
            vtd,
            events,
        };
        rig.write32(FEDATA, FAULT_DATA);
        rig.write32(FEADDR, FAULT_ADDRESS);
        rig
    }

    fn read32(&self, offset: u64) -> u32 {
        let mut raw = [0u8; 4];
        self.vtd.read_register(offset, &mut raw);
        u32::from_le_bytes(raw)
    }

    fn read64(&self, offset: u64) -> u64 {
        let mut raw = [0u8; 8];
        self.vtd.read_register(offset, &mut raw);
        u64::from_le_bytes(raw)
    }

    fn write32(&self, offset: u64, value: u32) {
        self.vtd.write_register(offset, &value.to_le_bytes());
    }

    fn write64(&self, offset: u64, value: u64) {
        self.vtd.write_register(offset, &value.to_le_bytes());
    }

    /// Linux's order: table address (256 entries), SIRTP, then IRE with CFI clear.
    fn enable_remapping(&self) {
        self.write64(IRTA, TABLE | 7);
        self.write32(GCMD, GCMD_SIRTP);
        self.write32(GCMD, GCMD_IRE);
    }

    fn set_irte(&self, index: u64, vector: u8, destination: u8, sid: u16) {
        let lo = 1 | (u64::from(vector) << 16) | (u64::from(destination) << 40);
        let hi = u64::from(sid) | (1 << 18);
        let at = TABLE + index * 16;
        self.memory.write_obj(lo, GuestAddress(at)).unwrap();
        self.memory.write_obj(hi, GuestAddress(at + 8)).unwrap();
    }

    fn counter(&self, name: &str) -> u64 {
        self.vtd.metrics().counter(name).unwrap()
    }
}

#[test]
fn remapping_is_advertised_and_enabled_the_way_linux_does_it() {
    let rig = Rig::new();

    rig.enable_remapping();

    assert_ne!(rig.read64(ECAP) & ECAP_IR, 0);
    assert_eq!(rig.read64(IRTA), TABLE | 7);
    let gsts = rig.read32(GSTS);
    assert_eq!(gsts & (GSTS_IRES | GSTS_IRTPS), GSTS_IRES | GSTS_IRTPS);
    assert_eq!(gsts & GSTS_CFIS, 0, "compatibility format blocked");
    rig.write32(GCMD, GCMD_IRE | GCMD_CFI);
    assert_ne!(rig.read32(GSTS) & GSTS_CFIS, 0);
    rig.write32(GCMD, 0);
    assert_eq!(rig.read32(GSTS) & (GSTS_IRES | GSTS_CFIS), 0, "both off");
}

#[test]
fn a_unit_without_remapping_keeps_ecap_ir_and_its_status_bits_clear() {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vtd = Vtd::new(memory, 39, Arc::new(Recorded::default()));
    let mut raw = [0u8; 8];

    vtd.write_register(IRTA, &(TABLE | 7).to_le_bytes());
    vtd.write_register(GCMD, &(GCMD_SIRTP | GCMD_IRE).to_le_bytes()[..4]);

    vtd.read_register(ECAP, &mut raw);
    assert_eq!(u64::from_le_bytes(raw) & ECAP_IR, 0);
    vtd.read_register(IRTA, &mut raw);
    assert_eq!(u64::from_le_bytes(raw), 0);
    vtd.read_register(GSTS, &mut raw[..4]);
    assert_eq!(u32::from_le_bytes(raw[..4].try_into().unwrap()), 0);
}

#[test]
fn a_remapped_interrupt_is_delivered_with_the_irte_vector_and_destination() {
    let rig = Rig::new();
    rig.enable_remapping();
    rig.set_irte(9, 0x61, 1, DEVICE);

    let delivered = rig.vtd.remap_interrupt(DEVICE, remappable_msi(9));

    assert_eq!(
        delivered,
        Some(MsiMessage {
            address: 0xfee0_1000,
            data: 0x61
        })
    );
    assert_eq!(rig.counter("interrupts_remapped"), 1);
    assert_eq!(rig.counter("interrupt_faults"), 0);
}

#[test]
fn a_refused_interrupt_is_recorded_with_its_index_and_raises_the_fault_event() {
    let rig = Rig::new();
    rig.enable_remapping();
    rig.set_irte(3, 0x61, 1, DEVICE);

    let wrong_requester = rig.vtd.remap_interrupt(DEVICE + 1, remappable_msi(3));
    let compatibility = rig.vtd.remap_interrupt(
        DEVICE,
        MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        },
    );

    assert_eq!(wrong_requester, None);
    assert_eq!(compatibility, None);
    let (lo, hi) = (rig.read64(FRCD), rig.read64(FRCD + 8));
    assert_eq!(lo >> 48, 3, "fault info: the interrupt index");
    assert_eq!((hi >> 32) & 0xff, 0x26, "source id invalid");
    assert_eq!(hi & 0xffff, u64::from(DEVICE + 1));
    assert_ne!(hi & (1 << 63), 0, "F");
    assert_eq!((rig.read64(FRCD + 24) >> 32) & 0xff, 0x25, "compat blocked");
    assert_ne!(rig.read32(FSTS) & FSTS_PPF, 0);
    let events = rig.events.0.lock().unwrap().clone();
    assert_eq!(
        events.len(),
        1,
        "one fault event for the new fault condition"
    );
    assert_eq!(
        events[0].data, FAULT_DATA,
        "the fault event itself is not remapped"
    );
    assert_eq!(rig.counter("interrupt_faults"), 2);
}

#[test]
fn program_time_translation_does_not_record_faults() {
    let rig = Rig::new();
    rig.enable_remapping();

    let refused = rig.vtd.translate_interrupt(DEVICE, remappable_msi(4));

    assert!(refused.is_err(), "IRTE 4 is not present");
    assert_eq!(rig.read32(FSTS) & FSTS_PPF, 0, "nothing recorded");
    assert!(rig.events.0.lock().unwrap().is_empty());
}

#[test]
fn iec_invalidation_and_remapping_commands_tell_the_clients() {
    let rig = Rig::new();
    let client = Arc::new(CountingClient::default());
    let weak: std::sync::Weak<CountingClient> = Arc::downgrade(&client);
    rig.vtd.add_remap_client(weak);
    rig.enable_remapping();
    let after_enable = client.0.load(Ordering::SeqCst);
    rig.write64(IQA, QUEUE);
    rig.write64(IQT, 0);
    rig.write32(GCMD, GCMD_IRE | GCMD_QIE);

    // Index-selective (IIDX 9, mask 0) and global IEC descriptors.
    let descriptors: [(u64, u64); 2] = [(4 | 0x10 | (9 << 32), 0), (4, 0)];
    for (i, (lo, hi)) in descriptors.iter().enumerate() {
        let at = QUEUE + i as u64 * 16;
        rig.memory.write_obj(*lo, GuestAddress(at)).unwrap();
        rig.memory.write_obj(*hi, GuestAddress(at + 8)).unwrap();
    }
    rig.write64(IQT, 2 << 4);

    assert_eq!(after_enable, 2, "SIRTP, then IRE");
    assert_eq!(
        client.0.load(Ordering::SeqCst),
        3,
        "one notice per queue run"
    );
    assert_eq!(rig.read64(IQH) >> 4, 2, "both descriptors done");
    assert_eq!(rig.read32(FSTS) & FSTS_IQE, 0);
    assert_eq!(rig.counter("interrupt_entry_invalidations"), 2);
}

#[test]
fn fpd_entries_fault_without_a_record() {
    let rig = Rig::new();
    rig.enable_remapping();
    // Not present, FPD set.
    rig.memory.write_obj(2u64, GuestAddress(TABLE)).unwrap();

    assert_eq!(rig.vtd.remap_interrupt(DEVICE, remappable_msi(0)), None);
    assert_eq!(rig.read32(FSTS) & FSTS_PPF, 0);
    assert_eq!(rig.counter("interrupt_faults"), 1);
    assert_eq!(rig.counter("faults_not_recorded"), 1);
}
