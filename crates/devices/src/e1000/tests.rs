use std::io;
use std::sync::{Arc, Mutex};

use sluice_bus::irq::LevelIrqLine;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::core::{crc32, Rx};
use super::eeprom::CHECKSUM_TARGET;
use super::fuzz::test_core;
use super::regs::*;
use super::tx::internet_checksum;
use crate::net::{NetHeader, NET_HDR_LEN};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const TX_RING: u64 = 0x1000;
const RX_RING: u64 = 0x2000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

#[derive(Default)]
struct RecordingLine {
    levels: Mutex<Vec<bool>>,
}

impl LevelIrqLine for RecordingLine {
    fn set_level(&self, asserted: bool) -> io::Result<()> {
        self.levels.lock().unwrap().push(asserted);
        Ok(())
    }
}

fn legacy_tx(addr: u64, len: u16, cmd: u8) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..10].copy_from_slice(&len.to_le_bytes());
    d[11] = cmd;
    d
}

const EOP: u8 = 0x01;
const RS: u8 = 0x08;

fn frame(destination: [u8; 6], len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    f[..6].copy_from_slice(&destination);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

fn setup_tx(core: &mut super::E1000Core, descriptors: u32) {
    core.write(TDBAL, TX_RING as u32);
    core.write(TDBAH, 0);
    core.write(TDLEN, descriptors * 16);
    core.write(TDH, 0);
    core.write(TDT, 0);
    core.write(TCTL, TCTL_EN);
}

fn setup_rx(core: &mut super::E1000Core, mem: &GuestMemoryMmap, descriptors: u32, rctl: u32) {
    for i in 0..u64::from(descriptors) {
        let buffer = 0x10_0000 + i * 0x4000;
        mem.write_obj(buffer, GuestAddress(RX_RING + i * 16))
            .unwrap();
    }
    core.write(RDBAL, RX_RING as u32);
    core.write(RDLEN, descriptors * 16);
    core.write(RDH, 0);
    core.write(RDT, descriptors - 1);
    core.write(RCTL, RCTL_EN | rctl);
}

fn rx_descriptor(mem: &GuestMemoryMmap, index: u64) -> (u16, u8, u8) {
    let mut d = [0u8; 16];
    mem.read_slice(&mut d, GuestAddress(RX_RING + index * 16))
        .unwrap();
    (u16::from_le_bytes([d[8], d[9]]), d[12], d[13])
}

#[test]
fn eeprom_holds_the_mac_and_sums_to_0xbaba_through_eerd() {
    let (mut core, _, _) = test_core(memory());
    let mut sum = 0u16;
    let mut words = Vec::new();

    for address in 0..64u32 {
        core.write(EERD, (address << 8) | EERD_START);
        let value = core.read(EERD);
        assert_ne!(value & EERD_DONE, 0);
        words.push((value >> 16) as u16);
        sum = sum.wrapping_add((value >> 16) as u16);
    }

    assert_eq!(sum, CHECKSUM_TARGET);
    let mac: Vec<u8> = words[..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(mac, MAC);
    assert_eq!((words[0x0d], words[0x0e]), (0x100e, 0x8086));
}

/// Linux's e1000 reads the 82540EM's EEPROM by Microwire bit-banging; this is its sequence.
fn microwire_read(core: &mut super::E1000Core, address: u16) -> u16 {
    let write = |core: &mut super::E1000Core, eecd: u32| core.write(EECD, eecd);
    core.write(EECD, EECD_REQ);
    assert_ne!(core.read(EECD) & EECD_GNT, 0, "grant follows the request");
    let mut eecd = EECD_REQ | EECD_CS;
    write(core, eecd);
    let mut shift_out = |core: &mut super::E1000Core, data: u16, count: u32| {
        for bit in (0..count).rev() {
            eecd = if data >> bit & 1 != 0 {
                eecd | EECD_DI
            } else {
                eecd & !EECD_DI
            };
            write(core, eecd);
            write(core, eecd | EECD_SK);
            write(core, eecd);
        }
    };
    shift_out(core, 0b110, 3);
    shift_out(core, address, 6);
    let mut data = 0u16;
    for _ in 0..16 {
        write(core, eecd | EECD_SK);
        data = (data << 1) | u16::from(core.read(EECD) & EECD_DO != 0);
        write(core, eecd);
    }
    core.write(EECD, 0);
    data
}

#[test]
fn microwire_bit_banging_reads_the_same_words_as_eerd() {
    let (mut core, _, _) = test_core(memory());

    for address in [0u16, 1, 2, 0x0d, 0x3f] {
        core.write(EERD, (u32::from(address) << 8) | EERD_START);
        let expected = (core.read(EERD) >> 16) as u16;
        assert_eq!(
            microwire_read(&mut core, address),
            expected,
            "word {address:#x}"
        );
    }
}

fn mdic_read(core: &mut super::E1000Core, phy: u32, register: u32) -> u32 {
    core.write(MDIC, MDIC_OP_READ | (phy << 21) | (register << 16));
    core.read(MDIC)
}

#[test]
fn the_phy_reports_link_and_autonegotiation_and_only_answers_at_address_1() {
    let (mut core, _, _) = test_core(memory());

    let status = mdic_read(&mut core, 1, 1);
    let id = (mdic_read(&mut core, 1, 2) & 0xffff) << 16 | (mdic_read(&mut core, 1, 3) & 0xffff);
    let elsewhere = mdic_read(&mut core, 2, 1);
    core.write(MDIC, MDIC_OP_WRITE | (1 << 21) | (4 << 16) | 0x01e1);
    let advertised = mdic_read(&mut core, 1, 4);

    assert_ne!(status & MDIC_READY, 0);
    assert_eq!(status & 0x24, 0x24, "link up, autoneg complete");
    assert_eq!(id & 0xffff_fff0, 0x0141_0c20, "M88E1011");
    assert_ne!(elsewhere & MDIC_ERROR, 0);
    assert_eq!(advertised & 0xffff, 0x01e1);
    assert_ne!(core.read(STATUS) & STATUS_LU, 0);
}

#[test]
fn ctrl_reset_clears_itself_and_restores_the_registers() {
    let (mut core, _, _) = test_core(memory());
    core.write(IMS, ICR_RXT0);
    core.write(RAL0, 0);
    core.write(TDLEN, 1024);

    core.write(CTRL, CTRL_RST);

    assert_eq!(core.read(CTRL) & CTRL_RST, 0);
    assert_eq!(core.read(IMS), 0);
    assert_eq!(core.read(TDLEN), 0);
    assert_eq!(
        core.read(RAL0),
        u32::from_le_bytes([0x52, 0x54, 0x00, 0x12])
    );
    assert_eq!(core.read(RAH0), 0x5634 | RAH_AV);
}

#[test]
fn the_io_bar_reaches_the_registers_through_ioaddr_and_iodata() {
    let (mut core, _, _) = test_core(memory());
    core.write(IMS, ICR_TXDW);

    core.io_write(0, IMS);
    let ims = core.io_read(4);
    core.io_write(0, CTRL);
    core.io_write(4, CTRL_RST);

    assert_eq!(ims, ICR_TXDW);
    assert_eq!(core.read(IMS), 0, "reset through IODATA");
}

#[test]
fn icr_is_read_to_clear_and_ims_imc_gate_the_intx_line() {
    let (mut core, _, intx) = test_core(memory());
    let line = Arc::new(RecordingLine::default());
    intx.connect(line.clone()).unwrap();

    core.write(ICS, ICR_LSC);
    let masked = line.levels.lock().unwrap().clone();
    core.write(IMS, ICR_LSC | ICR_RXT0);
    let unmasked = line.levels.lock().unwrap().clone();
    let icr = core.read(ICR);
    let after_read = core.read(ICR);
    core.write(ICS, ICR_RXT0);
    core.write(IMC, ICR_RXT0);

    assert!(
        masked.is_empty(),
        "masked causes latch without an interrupt"
    );
    assert_eq!(unmasked, vec![true]);
    assert_eq!(icr, ICR_LSC);
    assert_eq!(after_read, 0);
    assert_eq!(*line.levels.lock().unwrap(), vec![true, false, true, false]);
    assert_eq!(core.metrics().counter("interrupts"), Some(2));
    let rx_interrupts = &core.metrics().queues[0].interrupts;
    assert_eq!(
        rx_interrupts.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the RXT0 one"
    );
}

#[test]
fn legacy_descriptors_send_frames_write_back_dd_and_raise_txdw() {
    let mem = memory();
    let (mut core, backend, _) = test_core(mem.clone());
    setup_tx(&mut core, 8);
    let first = frame([0xff; 6], 100);
    let second = frame(MAC, 1514);
    mem.write_slice(&first, GuestAddress(0x8000)).unwrap();
    mem.write_slice(&second, GuestAddress(0x9000)).unwrap();
    let descriptors = [
        legacy_tx(0x8000, 100, EOP | RS),
        legacy_tx(0x9000, 1000, 0),
        legacy_tx(0x9000 + 1000, 514, EOP | RS),
    ];
    for (i, d) in descriptors.iter().enumerate() {
        mem.write_slice(d, GuestAddress(TX_RING + 16 * i as u64))
            .unwrap();
    }

    core.write(TDT, 3);

    let packets = backend.packets.lock().unwrap().clone();
    assert_eq!(packets.len(), 2);
    assert_eq!(packets[0][..NET_HDR_LEN], [0; NET_HDR_LEN]);
    assert_eq!(packets[0][NET_HDR_LEN..], first[..]);
    assert_eq!(packets[1][NET_HDR_LEN..], second[..]);
    assert_eq!(core.read(TDH), 3);
    let dd = |i: u64| {
        mem.read_obj::<u8>(GuestAddress(TX_RING + 16 * i + 12))
            .unwrap()
    };
    assert_eq!((dd(0), dd(1), dd(2)), (1, 0, 1), "DD only where RS asked");
    assert_eq!(core.read(ICR) & (ICR_TXDW | ICR_TXQE), ICR_TXDW | ICR_TXQE);
    assert_eq!(core.read(GPTC), 2);
    assert_eq!(core.read(GPTC), 0, "statistics clear on read");
    assert_eq!(core.read(BPTC), 1);
    assert_eq!(core.read(GOTCL), (100 + 4 + 1514 + 4) as u32);
}

#[test]
fn hostile_transmit_rings_are_ignored_or_bounded() {
    let mem = memory();
    let (mut core, backend, _) = test_core(mem.clone());
    setup_tx(&mut core, 8);

    core.write(TDT, 200); // beyond the ring
    let beyond = core.read(TDH);
    core.write(TDLEN, 100); // not a multiple of 128: masked to 0, ring invalid
    core.write(TDT, 3);
    let invalid = core.read(TDH);
    // A frame with no EOP anywhere: the kick walks the ring once and stops.
    core.write(TDLEN, 128);
    for i in 0..8 {
        mem.write_slice(&legacy_tx(0x8000, 64, 0), GuestAddress(TX_RING + 16 * i))
            .unwrap();
    }
    core.write(TDH, 0);
    core.write(TDT, 7);
    // Buffers outside memory and an oversized frame are dropped, not sent.
    mem.write_slice(
        &legacy_tx(u64::MAX - 10, 64, EOP),
        GuestAddress(TX_RING + 16 * 7),
    )
    .unwrap();
    core.write(TDT, 0);

    assert_eq!((beyond, invalid), (0, 0));
    assert_eq!(core.read(TDH), 0);
    assert!(backend.packets.lock().unwrap().is_empty());
    assert_eq!(
        core.metrics().queues[1]
            .errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

fn context(
    ipcss: u8,
    ipcso: u8,
    tucss: u8,
    tucso: u8,
    tucmd: u8,
    hdrlen: u8,
    mss: u16,
) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0] = ipcss;
    d[1] = ipcso;
    // IPCSE: the last byte of the IPv4 header, as Linux sets it.
    d[2..4].copy_from_slice(&u16::from(tucss - 1).to_le_bytes());
    d[4] = tucss;
    d[5] = tucso;
    d[11] = tucmd | 0x20;
    d[13] = hdrlen;
    d[14..16].copy_from_slice(&mss.to_le_bytes());
    d
}

fn data_tx(addr: u64, len: u32, dcmd: u8, popts: u8) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[10] |= 0x10; // DTYP data
    d[11] = dcmd | 0x20;
    d[13] = popts;
    d
}

/// Ethernet + IPv4 (20 bytes) + TCP (20 bytes) + payload, with Linux's e1000 TSO preparation:
/// IP total length and checksum 0, TCP checksum = pseudo-header sum without the length.
fn tcp_frame(payload: usize) -> Vec<u8> {
    let mut f = frame(MAC, 14 + 40 + payload);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].fill(0);
    f[22] = 64;
    f[23] = 6;
    f[24..26].fill(0);
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[46] = 0x50;
    f[50..52].copy_from_slice(&0x1234u16.to_be_bytes());
    f
}

#[test]
fn checksum_and_segmentation_offloads_become_the_tap_header() {
    let mem = memory();
    let (mut core, backend, _) = test_core(mem.clone());
    setup_tx(&mut core, 8);
    let small = tcp_frame(100);
    let large = tcp_frame(4000);
    mem.write_slice(&small, GuestAddress(0x8000)).unwrap();
    mem.write_slice(&large, GuestAddress(0x10000)).unwrap();
    let ring = [
        context(14, 24, 34, 50, 0x03, 0, 0),
        data_tx(0x8000, small.len() as u32, EOP | RS, 0x03),
        context(14, 24, 34, 50, 0x03 | 0x04, 54, 1448),
        data_tx(0x10000, large.len() as u32, EOP | RS | 0x04, 0x03),
    ];
    for (i, d) in ring.iter().enumerate() {
        mem.write_slice(d, GuestAddress(TX_RING + 16 * i as u64))
            .unwrap();
    }

    core.write(TDT, 4);

    let packets = backend.packets.lock().unwrap().clone();
    assert_eq!(packets.len(), 2);
    assert_eq!(core.metrics().counter("tx_checksum_offload"), Some(2));
    assert_eq!(core.metrics().counter("tx_segmentation_offload"), Some(1));
    let csum = NetHeader::from_bytes(&packets[0]).unwrap();
    assert_eq!((csum.flags, csum.gso_type), (1, 0), "NEEDS_CSUM only");
    assert_eq!((csum.csum_start, csum.csum_offset), (34, 16));
    let ip = &packets[0][NET_HDR_LEN + 14..NET_HDR_LEN + 34];
    assert_eq!(
        internet_checksum(ip),
        0,
        "IXSM filled the IPv4 header checksum"
    );
    let gso = NetHeader::from_bytes(&packets[1]).unwrap();
    assert_eq!(gso.gso_type, 1, "TCPv4");
    assert_eq!((gso.gso_size, gso.hdr_len), (1448, 54));
    let frame = &packets[1][NET_HDR_LEN..];
    assert_eq!(
        u16::from_be_bytes([frame[16], frame[17]]),
        4040,
        "IP total length"
    );
    assert_eq!(
        u16::from_be_bytes([frame[50], frame[51]]),
        0x1234 + 4020,
        "the TCP length joined the pseudo-header sum"
    );
}

#[test]
fn received_frames_fill_descriptors_with_padding_and_fcs() {
    let mem = memory();
    let (mut core, _, _) = test_core(mem.clone());
    setup_rx(&mut core, &mem, 8, RCTL_BAM);
    let short = frame(MAC, 42);

    let outcome = core.receive(&short);

    assert_eq!(outcome, Rx::Delivered);
    let (len, status, errors) = rx_descriptor(&mem, 0);
    assert_eq!(len, 64, "padded to 60, plus FCS");
    assert_eq!(status, 0x07, "DD | EOP | IXSM");
    assert_eq!(errors, 0);
    let mut got = vec![0u8; 64];
    mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(got[..42], short[..]);
    assert_eq!(got[60..], crc32(&got[..60]).to_le_bytes());
    assert_eq!(core.read(RDH), 1);
    assert_eq!(core.read(ICR) & ICR_RXT0, ICR_RXT0);
    assert_eq!(core.read(GPRC), 1);
}

#[test]
fn a_frame_larger_than_one_buffer_spans_descriptors() {
    let mem = memory();
    let (mut core, _, _) = test_core(mem.clone());
    // BSIZE 11b without BSEX: 256-byte buffers; SECRC: no FCS.
    setup_rx(&mut core, &mem, 16, (3 << RCTL_BSIZE_SHIFT) | RCTL_SECRC);

    let outcome = core.receive(&frame(MAC, 600));

    assert_eq!(outcome, Rx::Delivered);
    let lengths: Vec<(u16, u8)> = (0..3)
        .map(|i| {
            let (len, status, _) = rx_descriptor(&mem, i);
            (len, status)
        })
        .collect();
    assert_eq!(lengths, vec![(256, 0x05), (256, 0x05), (88, 0x07)]);
    assert_eq!(core.read(RDH), 3);
}

#[test]
fn address_filters_follow_ral_rah_mta_and_the_promiscuous_bits() {
    let mem = memory();
    let (mut core, _, _) = test_core(mem.clone());
    setup_rx(&mut core, &mem, 64, 0);
    let other = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
    let multicast = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];

    let mine = core.receive(&frame(MAC, 60));
    let foreign = core.receive(&frame(other, 60));
    let broadcast_off = core.receive(&frame([0xff; 6], 60));
    let multicast_off = core.receive(&frame(multicast, 60));
    // MO = 0: hash = address bits 47:36.
    let hash = (u32::from(multicast[4]) >> 4) | (u32::from(multicast[5]) << 4);
    core.write(MTA + 4 * (hash >> 5), 1 << (hash & 31));
    let multicast_on = core.receive(&frame(multicast, 60));
    core.write(RCTL, RCTL_EN | RCTL_UPE | RCTL_BAM);
    let promiscuous = core.receive(&frame(other, 60));
    let broadcast_on = core.receive(&frame([0xff; 6], 60));
    let rah = core.read(RAH0);
    core.write(RAH0, rah & !RAH_AV);
    core.write(RCTL, RCTL_EN);
    let invalidated = core.receive(&frame(MAC, 60));

    assert_eq!(mine, Rx::Delivered);
    assert_eq!(foreign, Rx::Filtered);
    assert_eq!(broadcast_off, Rx::Filtered);
    assert_eq!(multicast_off, Rx::Filtered);
    assert_eq!(multicast_on, Rx::Delivered);
    assert_eq!(promiscuous, Rx::Delivered);
    assert_eq!(broadcast_on, Rx::Delivered);
    assert_eq!(invalidated, Rx::Filtered, "RAH without AV matches nothing");
}

#[test]
fn a_full_ring_keeps_the_frame_and_a_disabled_receiver_drops_it() {
    let mem = memory();
    let (mut core, _, _) = test_core(mem.clone());
    setup_rx(&mut core, &mem, 8, 0);
    core.write(RDT, 2); // two free descriptors

    let outcomes: Vec<Rx> = (0..3).map(|_| core.receive(&frame(MAC, 60))).collect();
    let can_receive = core.can_receive();
    core.write(RDT, 5);
    let after_refill = core.receive(&frame(MAC, 60));
    core.write(RDH, 100); // head outside the ring
    let bad_head = core.receive(&frame(MAC, 60));
    core.write(RCTL, 0);
    let disabled = core.receive(&frame(MAC, 60));

    assert_eq!(outcomes, vec![Rx::Delivered, Rx::Delivered, Rx::NoBuffers]);
    assert!(!can_receive);
    assert_eq!(after_refill, Rx::Delivered);
    assert_eq!(bad_head, Rx::NoBuffers);
    assert_eq!(disabled, Rx::Dropped);
    assert_eq!(core.read(RNBC), 1, "counted once for the full ring");
    assert_eq!(core.read(ICR) & ICR_RXDMT0, ICR_RXDMT0, "ring ran low");
}

#[test]
fn a_receive_buffer_outside_memory_completes_with_an_error() {
    let mem = memory();
    let (mut core, _, _) = test_core(mem.clone());
    setup_rx(&mut core, &mem, 8, 0);
    mem.write_obj(u64::MAX - 100, GuestAddress(RX_RING))
        .unwrap();

    let outcome = core.receive(&frame(MAC, 100));

    assert_eq!(outcome, Rx::Dropped);
    let (_, status, errors) = rx_descriptor(&mem, 0);
    assert_eq!((status & 0x03, errors), (0x03, 0x80), "DD | EOP with RXE");
    assert_eq!(core.read(RDH), 1);
}

#[test]
fn the_pci_function_has_the_82540em_identity_two_bars_and_inta() {
    use sluice_pci::PciDevice;
    let backend = Arc::new(super::fuzz::RecordingBackend::default());
    let device = super::E1000::new("e1000", MAC, backend, sluice_dma::identity(memory())).unwrap();

    let config = device.config();

    assert_eq!((config.vendor_id(), config.device_id()), (0x8086, 0x100e));
    assert_eq!(config.read_u32(sluice_pci::CLASS_CODE - 1) >> 8, 0x02_0000);
    assert_eq!(config.bar(0).map(|b| b.size), Some(0x2_0000));
    assert!(config.bar(1).is_some_and(|b| b.is_io() && b.size == 0x40));
    assert_eq!(config.read_u8(sluice_pci::INTERRUPT_PIN), 1);
    assert!(device.intx().is_some());
}

/// A tap whose queue fd is an eventfd, readable while packets wait.
struct QueuedBackend {
    packets: Mutex<std::collections::VecDeque<Vec<u8>>>,
    ready: vmm_sys_util::eventfd::EventFd,
}

impl QueuedBackend {
    fn push(&self, frame: &[u8]) {
        let mut packet = vec![0u8; NET_HDR_LEN];
        packet.extend_from_slice(frame);
        self.packets.lock().unwrap().push_back(packet);
        self.ready.write(1).unwrap();
    }
}

impl crate::net::NetBackend for QueuedBackend {
    fn read_packet(&self, _pair: usize, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut packets = self.packets.lock().unwrap();
        let Some(packet) = packets.pop_front() else {
            let _ = self.ready.read();
            return Ok(None);
        };
        buf[..packet.len()].copy_from_slice(&packet);
        Ok(Some(packet.len()))
    }
    fn write_packet(&self, _pair: usize, _packet: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn queue_fd(&self, _pair: usize) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.ready.as_raw_fd())
    }
    fn set_active_pairs(&self, _pairs: u16) -> io::Result<()> {
        Ok(())
    }
    fn set_offload(&self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A NIC with its receive worker on a [`QueuedBackend`], bus mastering on.
fn receiving_nic(mem: &GuestMemoryMmap) -> (super::E1000, Arc<QueuedBackend>) {
    let backend = Arc::new(QueuedBackend {
        packets: Mutex::new(Default::default()),
        ready: vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
    });
    let mut device = super::E1000::new(
        "e1000",
        MAC,
        backend.clone(),
        sluice_dma::identity(mem.clone()),
    )
    .unwrap();
    device.start_receiving(backend.clone()).unwrap();
    bus_master_on(&mut device);
    (device, backend)
}

fn bus_master_on(device: &mut super::E1000) {
    use sluice_pci::PciDevice;
    device.config_write(
        sluice_pci::COMMAND,
        &(sluice_pci::COMMAND_MEMORY_SPACE | sluice_pci::COMMAND_BUS_MASTER).to_le_bytes(),
    );
}

#[test]
fn the_receive_worker_fills_the_ring_and_holds_a_frame_until_rdt_moves() {
    use sluice_pci::PciDevice;
    let mem = memory();
    let (mut device, backend) = receiving_nic(&mem);
    let core = device.core();
    setup_rx(&mut core.lock().unwrap(), &mem, 8, 0);
    core.lock().unwrap().write(RDT, 2); // room for two frames
    let rdh = || core.lock().unwrap().read(RDH);

    for i in 0..3 {
        backend.push(&frame(MAC, 60 + i));
    }
    wait_for("two frames", || rdh() == 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let held = rdh();
    device.bar_write(0, u64::from(RDT), &5u32.to_le_bytes());
    wait_for("the held frame", || rdh() == 3);

    assert_eq!(held, 2, "no descriptor for the third frame: it waits");
    assert_eq!(
        rx_descriptor(&mem, 2).0,
        62 + 4,
        "the third frame, with its FCS"
    );
    assert!(backend.packets.lock().unwrap().is_empty());
    drop(device); // stops and joins the worker
}

// ---- snapshot state -------------------------------------------------------------------------

const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn nic(mem: &GuestMemoryMmap, mac: [u8; 6]) -> (super::E1000, Arc<super::fuzz::RecordingBackend>) {
    let backend = Arc::new(super::fuzz::RecordingBackend::default());
    let mut device = super::E1000::new(
        "e1000",
        mac,
        backend.clone(),
        sluice_dma::identity(mem.clone()),
    )
    .unwrap();
    bus_master_on(&mut device);
    (device, backend)
}

fn eerd_mac(core: &mut super::E1000Core) -> Vec<u8> {
    (0..3u32)
        .flat_map(|address| {
            core.write(EERD, (address << 8) | EERD_START);
            ((core.read(EERD) >> 16) as u16).to_le_bytes()
        })
        .collect()
}

#[test]
fn a_saved_nic_restores_its_mac_rings_interrupt_and_half_sent_frame() {
    use sluice_pci::PciDevice;
    let mem = memory();
    let (mut saved_nic, _) = nic(&mem, MAC);
    let whole = frame([0xff; 6], 300);
    mem.write_slice(&whole, GuestAddress(0x8000)).unwrap();
    mem.write_slice(&legacy_tx(0x8000, 100, 0), GuestAddress(TX_RING))
        .unwrap();
    mem.write_slice(
        &legacy_tx(0x8000 + 100, 200, EOP),
        GuestAddress(TX_RING + 16),
    )
    .unwrap();
    {
        let core = saved_nic.core();
        let mut core = core.lock().unwrap();
        setup_tx(&mut core, 8);
        setup_rx(&mut core, &mem, 8, 0);
        core.write(IMS, ICR_LSC);
        core.write(ICS, ICR_LSC);
        core.write(TDT, 1); // the driver handed over the frame's first descriptor only
    }
    let state = saved_nic.save_state().unwrap().unwrap();
    let (mut restored, backend) = nic(&mem, OTHER_MAC);

    restored.restore_state(&state).unwrap();

    let core = restored.core();
    let mut core = core.lock().unwrap();
    assert_eq!(core.mac(), MAC, "the NIC keeps its address");
    assert_eq!(eerd_mac(&mut core), MAC, "and its EEPROM says so");
    assert_eq!((core.read(RDLEN), core.read(RDT)), (8 * 16, 7));
    assert!(core.interrupt_pending(), "ICR & IMS still assert the line");
    assert_eq!(core.read(TDH), 1);
    core.write(TDT, 2);
    let packets = backend.packets.lock().unwrap().clone();
    assert_eq!(
        packets.len(),
        1,
        "the frame begun before the save is finished after it"
    );
    assert_eq!(packets[0][NET_HDR_LEN..], whole[..]);
}

#[test]
fn a_saved_nic_holds_received_frames_until_the_vm_runs_on() {
    use sluice_pci::PciDevice;
    let mem = memory();
    let (mut device, backend) = receiving_nic(&mem);
    let core = device.core();
    setup_rx(&mut core.lock().unwrap(), &mem, 8, 0);
    let rdh = || core.lock().unwrap().read(RDH);

    device.save_state().unwrap().unwrap();
    backend.push(&frame(MAC, 80));
    std::thread::sleep(std::time::Duration::from_millis(50));
    let while_saved = rdh();
    device.resume_after_save();
    wait_for("the held frame", || rdh() == 1);

    assert_eq!(
        while_saved, 0,
        "guest memory does not change under a snapshot"
    );
    assert_eq!(rx_descriptor(&mem, 0).0, 80 + 4);
    drop(device);
}

#[test]
fn a_saved_nic_state_that_no_nic_could_be_in_is_refused_and_changes_nothing() {
    use sluice_pci::PciDevice;
    let mem = memory();
    let (mut saved_nic, _) = nic(&mem, MAC);
    let state = saved_nic.save_state().unwrap().unwrap();
    let options = serde_json::json!({"extended": false, "tse": false, "ixsm": false,
        "txsm": false, "legacy_checksum": null, "vlan": null});
    let long_frame = serde_json::json!({"context": state["core"]["tx"]["context"],
        "frame": {"options": options, "bytes": vec![0u8; 70_000], "failed": null}});
    let wire = |wire: serde_json::Value| serde_json::json!({"wire": wire, "last_eecd": 0, "data_out": true});
    let hostile = [
        ("regs", serde_json::json!([0, 1, 2]), "3 registers saved"),
        ("phy", serde_json::json!(vec![0u16; 31]), "31 PHY registers"),
        ("tx", long_frame, "TX frame of 70000 bytes"),
        (
            "eeprom",
            wire(serde_json::json!({"Reading": {"address": 64, "bit": 0}})),
            "impossible EEPROM state",
        ),
        (
            "eeprom",
            wire(serde_json::json!({"Command": {"bits": 2, "value": 9}})),
            "impossible EEPROM state",
        ),
    ];

    for (field, value, why) in hostile {
        let mut bad = state.clone();
        bad["core"][field] = value;
        let (mut target, _) = nic(&mem, OTHER_MAC);

        let refused = target.restore_state(&bad);

        assert!(
            refused.as_ref().is_err_and(|e| e.contains(why)),
            "{field}: {refused:?}"
        );
        assert_eq!(target.core().lock().unwrap().mac(), OTHER_MAC, "{field}");
    }
}
