//! Bodies of the e1000 fuzz targets (fuzz/fuzz_targets/e1000_*.rs), replayed by
//! `tests/fuzz_corpus.rs`.
//!
//! * `e1000_tx`: `[ring, head, tail_and_vme, guest memory...]`. The transmit ring sits at
//!   guest address 0 in 64 KiB of memory holding the input from byte 3 on; it has
//!   `(ring % 32 + 1) * 8` descriptors, TDH = `head`, CTRL.VME = bit 0 of byte 2, and TDT =
//!   byte 2 >> 1 is written twice (the second kick must find nothing new). Must hold: no panic;
//!   TDH stays inside the ring; every packet handed to the tap has a header the virtio-net
//!   parser accepts and at most 64 KiB + headers.
//! * `e1000_registers`: a script of 7-byte operations `[op, offset/4 (u16 LE), value (u32 LE)]`
//!   against a fresh device over 64 KiB of zeroed memory: op % 6 = 0 BAR0 read, 1 BAR0 write,
//!   2 I/O BAR read, 3 I/O BAR write (offset % 16), 4 a received frame of `value % 16384`
//!   bytes (bit 16 of value: broadcast, else to the device's MAC), 5 bus mastering on/off
//!   (value bit 0). Must hold: no panic or hang; the interrupt line equals ICR & IMS != 0 after
//!   every operation (read through the registers at the end).
//! * `e1000_state`: a JSON object merged over a real NIC's saved state (snapshot file or
//!   migration peer; keys replace recursively, so an input can be a whole state or one field),
//!   restored into a fresh NIC over 64 KiB of zeroed memory. Must hold: no panic; an accepted
//!   state's interrupt line equals ICR & IMS; the NIC then transmits what its ring holds
//!   (within TDH/TDT, headers valid) and takes a received frame without panicking.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use sluice_pci::{InterruptPin, PciIntx};
use sluice_virtio::DeviceMetrics;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::core::E1000Core;
use super::eeprom::Eeprom;
use super::regs::*;
use crate::net::header::MAX_PACKET_LEN;
use crate::net::{NetBackend, NetHeader, TxOffloads, NET_HDR_LEN};

const MEMORY: usize = 64 << 10;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A tap that records what is written and never has anything to read.
#[derive(Default)]
pub struct RecordingBackend {
    pub packets: Mutex<Vec<Vec<u8>>>,
}

impl NetBackend for RecordingBackend {
    fn read_packet(&self, _pair: usize, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }
    fn write_packet(&self, _pair: usize, packet: &[u8]) -> io::Result<()> {
        self.packets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(packet.to_vec());
        Ok(())
    }
    fn queue_fd(&self, _pair: usize) -> Option<RawFd> {
        None
    }
    fn set_active_pairs(&self, _pairs: u16) -> io::Result<()> {
        Ok(())
    }
    fn set_offload(&self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// A device over `memory` with a recording backend, bus mastering on.
pub fn test_core(memory: GuestMemoryMmap) -> (E1000Core, Arc<RecordingBackend>, Arc<PciIntx>) {
    let backend = Arc::new(RecordingBackend::default());
    let intx = Arc::new(PciIntx::new(InterruptPin::IntA));
    let metrics = Arc::new(DeviceMetrics::with_counters("e1000", 2, COUNTER_NAMES));
    let mut core = E1000Core::new(
        MAC,
        Eeprom::new(MAC, 0x8086, 0x100e, 0x001e),
        intx.clone(),
        sluice_dma::identity(memory),
        backend.clone(),
        metrics,
    );
    core.set_bus_master(true);
    (core, backend, intx)
}

fn memory_with(image: &[u8]) -> GuestMemoryMmap {
    let memory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("64 KiB of guest memory");
    let len = image.len().min(MEMORY);
    memory
        .write_slice(&image[..len], GuestAddress(0))
        .expect("image fits");
    memory
}

pub fn e1000_tx(data: &[u8]) {
    run_tx(data);
}

/// The `e1000_tx` body; returns the packets the tap got (header + frame).
pub fn run_tx(data: &[u8]) -> Vec<Vec<u8>> {
    let [ring, head, tail_and_vme, image @ ..] = data else {
        return Vec::new();
    };
    let (mut core, backend, _intx) = test_core(memory_with(image));
    let descriptors = (u32::from(*ring) % 32 + 1) * 8;
    core.write(TDBAL, 0);
    core.write(TDBAH, 0);
    core.write(TDLEN, descriptors * DESCRIPTOR_LEN as u32);
    core.write(TDH, u32::from(*head));
    if tail_and_vme & 1 != 0 {
        core.write(CTRL, CTRL_SLU | CTRL_VME);
    }
    core.write(TCTL, TCTL_EN);
    core.write(TDT, u32::from(tail_and_vme >> 1));
    let sent = backend.packets.lock().map(|p| p.len()).unwrap_or(0);
    core.write(TDT, u32::from(tail_and_vme >> 1));

    let tdh = core.read(TDH);
    assert!(
        tdh < descriptors || tdh == u32::from(*head),
        "TDH {tdh} left the ring"
    );
    let packets = backend.packets.lock().unwrap_or_else(|e| e.into_inner());
    if u32::from(*head) < descriptors {
        assert_eq!(
            packets.len(),
            sent,
            "a second kick with the same TDT sent more"
        );
    }
    assert_valid_for_the_tap(&packets);
    packets.clone()
}

/// Every packet is an Ethernet frame of at most 64 KiB + headers whose vnet header the
/// virtio-net parser accepts.
fn assert_valid_for_the_tap(packets: &[Vec<u8>]) {
    for packet in packets {
        assert!(packet.len() <= MAX_PACKET_LEN && packet.len() >= NET_HDR_LEN + 14);
        let header = NetHeader::from_bytes(packet).expect("header");
        header
            .validate_tx(packet.len() - NET_HDR_LEN, TxOffloads::ALL)
            .expect("the tap gets only valid headers");
    }
}

pub fn e1000_state(data: &[u8]) {
    use sluice_pci::PciDevice;
    let Ok(patch) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let nic = |memory: GuestMemoryMmap| {
        let backend = Arc::new(RecordingBackend::default());
        let device = super::E1000::new("e1000", MAC, backend.clone(), sluice_dma::identity(memory))
            .expect("a NIC");
        (device, backend)
    };
    let (mut source, _) = nic(memory_with(&[]));
    let Some(Ok(mut state)) = source.save_state() else {
        panic!("an e1000 saves its state");
    };
    merge(&mut state, patch);
    let (mut device, backend) = nic(memory_with(&[]));
    if device.restore_state(&state).is_err() {
        return;
    }
    device.resume_after_save();
    let core = device.core();
    let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
    let intx = device.intx().expect("INTA");
    assert_eq!(
        core.interrupt_pending(),
        intx.causes() != 0,
        "the pin follows the state"
    );
    let tail = core.read(TDT);
    core.write(TDT, tail);
    core.receive(&[0xff; 64]);
    assert_valid_for_the_tap(&backend.packets.lock().unwrap_or_else(|e| e.into_inner()));
}

/// Replaces `target`'s keys by `patch`'s, recursing into objects; a non-object patch replaces
/// the whole value.
fn merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key).or_insert(serde_json::Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}

pub fn e1000_registers(data: &[u8]) {
    let (mut core, _backend, intx) = test_core(memory_with(&[]));
    for op in data.chunks_exact(7) {
        let offset = u32::from(u16::from_le_bytes([op[1], op[2]])) * 4;
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        match op[0] % 6 {
            0 => {
                core.read(offset);
            }
            1 => core.write(offset, value),
            2 => {
                core.io_read(u64::from(offset % 16));
            }
            3 => core.io_write(u64::from(offset % 16), value),
            4 => {
                let len = (value % 16384) as usize;
                let mut frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let destination = if value & (1 << 16) != 0 {
                    [0xff; 6]
                } else {
                    MAC
                };
                let n = frame.len().min(6);
                frame[..n].copy_from_slice(&destination[..n]);
                core.receive(&frame);
            }
            _ => core.set_bus_master(value & 1 != 0),
        }
        assert_eq!(
            core.interrupt_pending(),
            intx.causes() != 0,
            "the pin follows the device's view"
        );
    }
    let ims = core.read(IMS);
    let pending = core.interrupt_pending();
    let icr = core.read(ICR);
    assert_eq!(pending, icr & ims != 0, "line high iff ICR & IMS");
    assert!(!core.interrupt_pending(), "reading ICR clears the line");
}
