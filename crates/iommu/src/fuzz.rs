//! Fuzz body of `fuzz/fuzz_targets/vtd_registers.rs`: register reads and writes and DMA
//! accesses through the unit, over guest memory taken from the input, so the table walks
//! (root, context, second level) and the invalidation queue read guest-chosen bytes.
//!
//! Input: `[op count n][n ops of 11 bytes][guest memory]`. An op is `[kind, a, b, value: u64 LE]`
//! with `offset = (a | b << 8) & 0xfff`:
//! - kind % 4 == 0: 4-byte read at `offset`; 1: 4-byte write of `value`; 2: 8-byte write;
//! - kind % 4 == 3: a 16-byte DMA by requester `a` (bus 0) at IOVA `value`, a write if kind
//!   bit 2 is set; with kind bit 3 set instead an interrupt request by requester `a`: address
//!   `0xfee0_0000 | value bits 19:0`, data `value >> 32` (remappable when bit 4 is set), so
//!   IRTEs read from guest memory are decoded and validated; with kind bits 2 and 3 set, an
//!   IOAPIC redirection entry `value` translated the way sluice-vmm's IOAPIC front does.
//!
//! The unit offers interrupt remapping (IRTA, SIRTP/IRE/CFI, IEC descriptors are live).
//! Guest memory is 64 KiB at 0, filled from the rest of the input. Must hold besides "no panic":
//! FSTS.FRI names a fault record; IQH stays inside its field; with translation off every DMA
//! inside RAM succeeds; after every invalidation a watcher of requesters 0 and 1 walks the
//! invalidated range (crate::watch), whose runs must be non-empty, in order, disjoint, inside the
//! range and grant some access. An interrupt that is let through comes out in compatibility format
//! inside the interrupt window, and program-time and delivery-time translations agree.

use std::sync::Arc;

use sluice_bus::irq::{MsiMessage, MsiSink};
use sluice_dma::DmaSpaces;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions};

use crate::regs::{FAULT_RECORDS, FSTS, GCMD_TE, GSTS, IQH, IQ_INDEX_MASK};
use crate::watch::{IovaRange, MappingObserver, MappingView};
use crate::Vtd;

/// Walks what each invalidation covers and checks the runs' shape.
struct WalkChecker;

impl MappingObserver for WalkChecker {
    fn invalidated(&self, view: &MappingView<'_>, range: IovaRange) {
        let Ok(runs) = view.runs(range) else { return };
        let mut next = range.start;
        for run in runs {
            assert!(run.len > 0 && (run.read || run.write), "{run:?}");
            assert!(run.iova >= next, "{run:?} overlaps or is out of order");
            next = run.iova + run.len;
            assert!(next <= range.end, "{run:?} beyond {range:?}");
        }
    }
}

const MEMORY_SIZE: usize = 64 << 10;
const OP_LEN: usize = 11;

struct NoInterrupts;

impl MsiSink for NoInterrupts {
    fn send(&self, _msg: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}

fn read32(vtd: &Vtd, offset: u64) -> u32 {
    let mut raw = [0u8; 4];
    vtd.read_register(offset, &mut raw);
    u32::from_le_bytes(raw)
}

fn read64(vtd: &Vtd, offset: u64) -> u64 {
    let mut raw = [0u8; 8];
    vtd.read_register(offset, &mut raw);
    u64::from_le_bytes(raw)
}

/// The fuzz target body.
pub fn vtd_registers(data: &[u8]) {
    run_script(data);
}

/// Plays the input; returns whether each DMA op succeeded (for the corpus checks).
pub fn run_script(data: &[u8]) -> Vec<bool> {
    let mut outcomes = Vec::new();
    let Some((&count, rest)) = data.split_first() else {
        return outcomes;
    };
    let ops_len = (usize::from(count) * OP_LEN).min(rest.len());
    let (ops, image) = rest.split_at(ops_len);
    let Ok(memory) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
        return outcomes;
    };
    let mut bytes = image.to_vec();
    bytes.resize(MEMORY_SIZE, 0);
    if vm_memory::Bytes::write_slice(&memory, &bytes, GuestAddress(0)).is_err() {
        return outcomes;
    }
    let vtd = Vtd::with_interrupt_remapping(memory.clone(), 39, Arc::new(NoInterrupts));
    let spaces = Arc::new(DmaSpaces::with_iommu(memory.clone(), Arc::new(vtd.clone())));
    vtd.attach_spaces(&spaces);
    vtd.watch(0, Arc::new(WalkChecker));
    vtd.watch(1, Arc::new(WalkChecker));

    for op in ops.chunks_exact(OP_LEN) {
        let offset = (u64::from(op[1]) | (u64::from(op[2]) << 8)) & 0xfff;
        let value = u64::from_le_bytes(op[3..11].try_into().unwrap_or_default());
        match op[0] % 4 {
            0 => {
                read32(&vtd, offset);
            }
            1 => vtd.write_register(offset, &(value as u32).to_le_bytes()),
            2 => vtd.write_register(offset, &value.to_le_bytes()),
            _ if op[0] & 12 == 12 => outcomes.push(ioapic_entry(&vtd, value)),
            _ if op[0] & 8 != 0 => outcomes.push(interrupt(&vtd, op[1], value)),
            _ => outcomes.push(dma(&vtd, &spaces, &memory, op[1], value, op[0] & 4 != 0)),
        }
        check_invariants(&vtd);
    }
    outcomes
}

fn dma(
    vtd: &Vtd,
    spaces: &DmaSpaces,
    memory: &GuestMemoryMmap,
    requester: u8,
    iova: u64,
    write: bool,
) -> bool {
    let space = spaces.space(u16::from(requester));
    let access = if write {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let ok = space.check_range(GuestAddress(iova), 16, access);
    let translation_off = read32(vtd, GSTS) & GCMD_TE == 0;
    let in_ram = iova
        .checked_add(16)
        .is_some_and(|end| memory.address_in_range(GuestAddress(end - 1)));
    assert!(
        !translation_off || !in_ram || ok,
        "identity DMA at {iova:#x} refused"
    );
    ok
}

fn interrupt(vtd: &Vtd, requester: u8, value: u64) -> bool {
    let message = MsiMessage {
        address: 0xfee0_0000 | (value & 0xf_ffff),
        data: (value >> 32) as u32,
    };
    let requester = u16::from(requester);
    let programmed = vtd.translate_interrupt(requester, message).ok();
    let delivered = vtd.remap_interrupt(requester, message);
    assert_eq!(programmed, delivered, "program and delivery time disagree");
    if let Some(out) = delivered {
        assert_eq!(out.address >> 20, 0xfee, "outside the interrupt window");
        let remapping = read32(vtd, GSTS) & crate::intremap::GSTS_IRES != 0;
        assert!(
            !remapping || out.address & 0x10 == 0,
            "a remappable message went out untranslated"
        );
    }
    delivered.is_some()
}

/// The IOAPIC front's translation of a guest redirection entry (requester ff:00.0).
fn ioapic_entry(vtd: &Vtd, entry: u64) -> bool {
    let request = crate::intremap::ioapic_request(entry);
    let Ok(message) = vtd.translate_interrupt(0xff00, request) else {
        return false;
    };
    let out = crate::intremap::ioapic_entry(entry, message);
    assert_eq!(
        out & crate::intremap::RTE_REMAPPABLE,
        0,
        "a remappable entry reached the kernel IOAPIC"
    );
    assert_eq!(
        out & 0x00ff_fffe_0000_4000,
        0,
        "reserved or status bits set"
    );
    true
}

fn check_invariants(vtd: &Vtd) {
    let fri = (read32(vtd, FSTS) >> 8) & 0xff;
    assert!((fri as usize) < FAULT_RECORDS, "FRI {fri} names no record");
    assert_eq!(
        read64(vtd, IQH) & !IQ_INDEX_MASK,
        0,
        "IQH outside its field"
    );
}

/// The virtio-iommu's fuzz body (`virtio_iommu_request`), kept next to the device.
pub use crate::virtio::fuzz::{run_requests, virtio_iommu_request};
