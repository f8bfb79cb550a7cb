//! Tests: header parsing, config layout, handlers over a mock queue with a fake backend, and
//! (when `/dev/net/tun` can be opened) frames through a real tap.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use sluice_virtio::VirtQueue;
use sluice_virtio::{QueueContext, QueueHandler, QueueMetrics, VirtioDevice};
use virtio_bindings::virtio_net::*;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::header::{ETH_HLEN, MAX_PACKET_LEN};
use super::*;
use crate::mock_queue::{add_chain, used};

// ---------------------------------------------------------------------------------------------
// Header parser

fn packet(header: NetHeader, frame_len: usize) -> Vec<u8> {
    let mut p = header.to_bytes().to_vec();
    p.extend((0..frame_len).map(|i| i as u8));
    p
}

fn gso_header(gso_type: u32) -> NetHeader {
    NetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: gso_type as u8,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    }
}

#[test]
fn header_round_trips_through_bytes() {
    let bytes = [1, 4, 0x36, 0, 0xa8, 0x05, 0x22, 0, 0x10, 0, 7, 0];

    let header = NetHeader::from_bytes(&bytes).unwrap();

    assert_eq!(header.gso_size, 1448);
    assert_eq!(header.csum_start, 34);
    assert_eq!(header.num_buffers, 7);
    assert_eq!(header.to_bytes(), bytes);
}

#[test]
fn header_needs_twelve_bytes() {
    assert_eq!(NetHeader::from_bytes(&[0; 11]), None);
}

#[test]
fn plain_packet_is_accepted_and_num_buffers_cleared() {
    let header = NetHeader {
        num_buffers: 9,
        ..NetHeader::default()
    };

    let parsed = parse_tx_packet(&packet(header, 60), TxOffloads::default()).unwrap();

    assert_eq!(parsed, NetHeader::default());
}

#[test]
fn tso_packet_is_accepted_when_negotiated() {
    let p = packet(gso_header(VIRTIO_NET_HDR_GSO_TCPV4), 3000);

    assert!(parse_tx_packet(&p, TxOffloads::ALL).is_ok());
}

#[test]
fn bad_headers_are_rejected() {
    let csum_only = TxOffloads {
        csum: true,
        ..TxOffloads::default()
    };
    let cases: Vec<(NetHeader, usize, TxOffloads, HeaderError)> = vec![
        (
            NetHeader {
                flags: 0x80,
                ..NetHeader::default()
            },
            60,
            TxOffloads::ALL,
            HeaderError::UnknownFlags(0x80),
        ),
        (
            NetHeader {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                csum_start: 34,
                csum_offset: 6,
                ..NetHeader::default()
            },
            60,
            TxOffloads::default(),
            HeaderError::ChecksumNotNegotiated,
        ),
        (
            NetHeader {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                csum_start: 50,
                csum_offset: 9,
                ..NetHeader::default()
            },
            60,
            TxOffloads::ALL,
            HeaderError::ChecksumOutOfFrame,
        ),
        (
            NetHeader {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                csum_start: u16::MAX,
                csum_offset: u16::MAX,
                ..NetHeader::default()
            },
            60,
            TxOffloads::ALL,
            HeaderError::ChecksumOutOfFrame,
        ),
        (
            gso_header(VIRTIO_NET_HDR_GSO_TCPV4),
            3000,
            csum_only,
            HeaderError::GsoNotNegotiated(VIRTIO_NET_HDR_GSO_TCPV4 as u8),
        ),
        (
            gso_header(VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN),
            3000,
            TxOffloads::ALL,
            HeaderError::GsoNotNegotiated((VIRTIO_NET_HDR_GSO_TCPV6 | 0x80) as u8),
        ),
        (
            gso_header(VIRTIO_NET_HDR_GSO_UDP),
            3000,
            TxOffloads::ALL,
            HeaderError::GsoNotNegotiated(VIRTIO_NET_HDR_GSO_UDP as u8),
        ),
        (
            NetHeader {
                flags: 0,
                ..gso_header(VIRTIO_NET_HDR_GSO_TCPV4)
            },
            3000,
            TxOffloads::ALL,
            HeaderError::GsoWithoutChecksum,
        ),
        (
            NetHeader {
                gso_size: 0,
                ..gso_header(VIRTIO_NET_HDR_GSO_TCPV4)
            },
            3000,
            TxOffloads::ALL,
            HeaderError::GsoSizeZero,
        ),
        (
            NetHeader {
                hdr_len: 61,
                ..NetHeader::default()
            },
            60,
            TxOffloads::ALL,
            HeaderError::HdrLenOutOfFrame,
        ),
    ];
    for (header, frame_len, offloads, expected) in cases {
        let result = parse_tx_packet(&packet(header, frame_len), offloads);

        assert_eq!(result, Err(expected), "{header:?}");
    }
}

#[test]
fn parser_survives_arbitrary_bytes() {
    let mut noise = vec![0u8; 4096];
    crate::rng::fill_random(&mut noise).unwrap();

    for start in 0..noise.len() - 200 {
        let len = usize::from(noise[start]) % 200;
        let packet = &noise[start..start + len];
        if let Ok(header) = parse_tx_packet(packet, TxOffloads::ALL) {
            let frame_len = packet.len() - 12;
            let csum_end = usize::from(header.csum_start) + usize::from(header.csum_offset) + 2;
            assert!(header.flags == 0 || csum_end <= frame_len);
            assert!(usize::from(header.hdr_len) <= frame_len);
        }
    }
}

#[test]
fn packet_length_limits() {
    let short = packet(NetHeader::default(), ETH_HLEN - 1);
    let long = vec![0u8; MAX_PACKET_LEN + 1];

    assert_eq!(
        parse_tx_packet(&short, TxOffloads::ALL),
        Err(HeaderError::TooShort(short.len()))
    );
    assert_eq!(
        parse_tx_packet(&long, TxOffloads::ALL),
        Err(HeaderError::TooLong(long.len()))
    );
    assert_eq!(
        parse_tx_packet(&[], TxOffloads::ALL),
        Err(HeaderError::TooShort(0))
    );
}

#[test]
fn tso_offloads_require_checksum_offload() {
    let tso_only = (1u64 << VIRTIO_NET_F_HOST_TSO4) | (1 << VIRTIO_NET_F_HOST_TSO6);

    assert_eq!(TxOffloads::from_features(tso_only), TxOffloads::default());
    assert_eq!(
        TxOffloads::from_features(tso_only | (1 << VIRTIO_NET_F_CSUM)),
        TxOffloads::ALL
    );
}

#[test]
fn tun_offloads_follow_guest_features() {
    let guest_tso = (1u64 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6);

    assert_eq!(tun_offload_flags(guest_tso), 0);
    assert_eq!(
        tun_offload_flags(guest_tso | (1 << VIRTIO_NET_F_GUEST_CSUM)),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}

// ---------------------------------------------------------------------------------------------
// Device identity, features, config space

/// A backend recording what the handlers do.
#[derive(Default)]
struct FakeBackend {
    written: Mutex<Vec<Vec<u8>>>,
    inbound: Mutex<VecDeque<Vec<u8>>>,
    active_pairs: Mutex<Vec<u16>>,
}

impl NetBackend for FakeBackend {
    fn read_packet(&self, _pair: usize, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(p) = self.inbound.lock().unwrap().pop_front() else {
            return Ok(None);
        };
        buf[..p.len()].copy_from_slice(&p);
        Ok(Some(p.len()))
    }
    fn write_packet(&self, _pair: usize, packet: &[u8]) -> io::Result<()> {
        self.written.lock().unwrap().push(packet.to_vec());
        Ok(())
    }
    fn queue_fd(&self, _pair: usize) -> Option<RawFd> {
        None
    }
    fn set_active_pairs(&self, pairs: u16) -> io::Result<()> {
        self.active_pairs.lock().unwrap().push(pairs);
        Ok(())
    }
    fn set_offload(&self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn net(pairs: u16, mtu: Option<u16>) -> Net {
    Net::with_backend(
        Arc::new(FakeBackend::default()),
        pairs,
        NetConfig {
            mtu,
            ..NetConfig::new(MAC)
        },
    )
}

#[test]
fn config_space_layout() {
    let device = net(4, Some(1500));
    let mut cfg = [0xffu8; 16];

    device.read_config(0, &mut cfg);

    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(
        u16::from_le_bytes([cfg[6], cfg[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 4);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
    assert_eq!(&cfg[12..], &[0; 4]);
}

#[test]
fn config_reads_at_odd_offsets() {
    let device = net(1, None);
    let mut two = [0u8; 2];
    let mut far = [0xffu8; 4];

    device.read_config(4, &mut two);
    device.read_config(u64::MAX, &mut far);

    assert_eq!(two, [0x34, 0x56]);
    assert_eq!(far, [0; 4]);
}

#[test]
fn features_depend_on_queue_pairs_and_mtu() {
    let single = net(1, None).device_features();
    let multi = net(2, Some(9000)).device_features();
    let has = |f: u64, bit: u32| f & (1 << bit) != 0;

    assert!(has(single, 32) && has(single, 29));
    assert!(has(single, VIRTIO_NET_F_MAC) && has(single, VIRTIO_NET_F_MRG_RXBUF));
    assert!(has(single, VIRTIO_NET_F_CSUM) && has(single, VIRTIO_NET_F_HOST_TSO4));
    assert!(!has(single, VIRTIO_NET_F_MQ) && !has(single, VIRTIO_NET_F_CTRL_VQ));
    assert!(!has(single, VIRTIO_NET_F_MTU));
    assert!(has(multi, VIRTIO_NET_F_MQ) && has(multi, VIRTIO_NET_F_CTRL_VQ));
    assert!(has(multi, VIRTIO_NET_F_MTU));
}

#[test]
fn queue_layout_is_rx_tx_pairs_then_ctrl() {
    let device = net(2, None);

    assert_eq!(device.device_type(), 1);
    assert_eq!(device.queue_max_sizes(), vec![NET_QUEUE_SIZE; 5]);
    assert_eq!(QueueRole::of(0, 2, true), Some(QueueRole::Rx(0)));
    assert_eq!(QueueRole::of(3, 2, true), Some(QueueRole::Tx(1)));
    assert_eq!(QueueRole::of(4, 2, true), Some(QueueRole::Ctrl));
    assert_eq!(QueueRole::of(4, 2, false), None);
    assert_eq!(QueueRole::of(5, 2, true), None);
    assert_eq!(net(1, None).queue_max_sizes().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Handlers over a mock queue

const MEM_SIZE: usize = 0x40_0000;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

/// Runs `process` (or `complete`) once; returns (added used entries?, metrics).
fn run(
    handler: &mut dyn QueueHandler,
    queue: &mut VirtQueue,
    mem: &GuestMemoryMmap,
    complete: bool,
) -> (bool, QueueMetrics) {
    let dma = sluice_dma::identity(mem.clone());
    let metrics = QueueMetrics::default();
    let mut ctx = QueueContext {
        queue,
        mem: &dma,
        metrics: &metrics,
    };
    let used = if complete {
        handler.complete(&mut ctx).unwrap()
    } else {
        handler.process(&mut ctx).unwrap()
    };
    (used, metrics)
}

/// A broadcast Ethernet frame with the local experimental EtherType and a marker payload.
fn test_frame(len: usize, marker: u8) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend((frame.len()..len).map(|i| marker ^ (i as u8)));
    frame
}

#[test]
fn tx_writes_header_and_frame_to_backend() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    let frame = test_frame(100, 1);
    mem.write_slice(&[0; 12], GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&frame, GuestAddress(0x11_0000)).unwrap();
    add_chain(&vq, 0, &[(0x10_0000, 12, false), (0x11_0000, 100, false)]);
    let backend = Arc::new(FakeBackend::default());
    let mut tx = TxHandler::new(backend.clone(), 0, TxOffloads::default());

    let (used_any, metrics) = run(&mut tx, &mut queue, &mem, false);

    assert!(used_any);
    assert_eq!(used(&vq, 0), (0, 0));
    let written = backend.written.lock().unwrap();
    assert_eq!(written.len(), 1);
    assert_eq!(&written[0][..12], &[0; 12]);
    assert_eq!(&written[0][12..], frame.as_slice());
    assert_eq!(metrics.bytes.load(Ordering::Relaxed), 100);
}

#[test]
fn tx_drops_packet_with_bad_header() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    let bad = gso_header(VIRTIO_NET_HDR_GSO_TCPV4).to_bytes();
    mem.write_slice(&bad, GuestAddress(0x10_0000)).unwrap();
    add_chain(&vq, 0, &[(0x10_0000, 12, false), (0x11_0000, 3000, false)]);
    add_chain(&vq, 2, &[(0x10_0000, 4, false)]);
    let backend = Arc::new(FakeBackend::default());
    let mut tx = TxHandler::new(backend.clone(), 0, TxOffloads::default());

    let (_, metrics) = run(&mut tx, &mut queue, &mem, false);

    assert!(backend.written.lock().unwrap().is_empty());
    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(used(&vq, 1), (2, 0));
    assert_eq!(metrics.errors.load(Ordering::Relaxed), 2);
}

#[test]
fn rx_fills_one_buffer_without_mergeable() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 2048, true)]);
    let header = NetHeader {
        flags: VIRTIO_NET_HDR_F_DATA_VALID as u8,
        ..NetHeader::default()
    };
    let packet = packet(header, 200);
    let backend = Arc::new(FakeBackend::default());
    backend.inbound.lock().unwrap().push_back(packet.clone());
    let mut rx = RxHandler::new(backend, 0, 1 << VIRTIO_NET_F_GUEST_CSUM).unwrap();

    let (used_any, _) = run(&mut rx, &mut queue, &mem, true);

    assert!(used_any);
    assert_eq!(used(&vq, 0), (0, 212));
    let got = read(&mem, 0x10_0000, 212);
    let got_header = NetHeader::from_bytes(&got).unwrap();
    assert_eq!(got_header.flags, VIRTIO_NET_HDR_F_DATA_VALID as u8);
    assert_eq!(got_header.num_buffers, 1);
    assert_eq!(&got[12..], &packet[12..]);
}

#[test]
fn rx_clears_header_flags_without_guest_csum() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 2048, true)]);
    let header = NetHeader {
        flags: VIRTIO_NET_HDR_F_DATA_VALID as u8,
        ..NetHeader::default()
    };
    let backend = Arc::new(FakeBackend::default());
    backend
        .inbound
        .lock()
        .unwrap()
        .push_back(packet(header, 60));
    let mut rx = RxHandler::new(backend, 0, 0).unwrap();

    run(&mut rx, &mut queue, &mem, true);

    let got = NetHeader::from_bytes(&read(&mem, 0x10_0000, 12)).unwrap();
    assert_eq!(got.flags, 0);
    assert_eq!(got.num_buffers, 1);
}

#[test]
fn rx_spreads_packet_over_mergeable_buffers() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    for i in 0..6u16 {
        add_chain(&vq, i, &[(0x10_0000 + u64::from(i) * 0x1000, 256, true)]);
    }
    let packet = packet(NetHeader::default(), 1000);
    let backend = Arc::new(FakeBackend::default());
    backend.inbound.lock().unwrap().push_back(packet.clone());
    let mut rx = RxHandler::new(backend, 0, 1 << VIRTIO_NET_F_MRG_RXBUF).unwrap();

    run(&mut rx, &mut queue, &mem, true);

    assert_eq!(vq.used().idx().load(), 4);
    let mut got = Vec::new();
    for slot in 0..4u16 {
        let (id, len) = used(&vq, slot);
        assert_eq!(id, u32::from(slot));
        got.extend(read(
            &mem,
            0x10_0000 + u64::from(slot) * 0x1000,
            len as usize,
        ));
    }
    assert_eq!(got.len(), 1012);
    assert_eq!(NetHeader::from_bytes(&got).unwrap().num_buffers, 4);
    assert_eq!(&got[12..], &packet[12..]);
}

#[test]
fn rx_without_buffers_keeps_packet_until_kick() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    let backend = Arc::new(FakeBackend::default());
    backend
        .inbound
        .lock()
        .unwrap()
        .push_back(packet(NetHeader::default(), 60));
    let mut rx = RxHandler::new(backend, 0, 1 << VIRTIO_NET_F_MRG_RXBUF).unwrap();

    let (first, _) = run(&mut rx, &mut queue, &mem, true);
    add_chain(&vq, 0, &[(0x10_0000, 2048, true)]);
    let (second, _) = run(&mut rx, &mut queue, &mem, false);

    assert!(!first);
    assert!(second);
    assert_eq!(used(&vq, 0), (0, 72));
}

#[test]
fn rx_partial_mergeable_buffers_roll_back() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 256, true)]);
    let backend = Arc::new(FakeBackend::default());
    backend
        .inbound
        .lock()
        .unwrap()
        .push_back(packet(NetHeader::default(), 400));
    let mut rx = RxHandler::new(backend, 0, 1 << VIRTIO_NET_F_MRG_RXBUF).unwrap();

    let (first, _) = run(&mut rx, &mut queue, &mem, true);
    add_chain(&vq, 1, &[(0x11_0000, 256, true)]);
    let (second, _) = run(&mut rx, &mut queue, &mem, false);

    assert!(!first);
    assert!(second);
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(used(&vq, 0), (0, 256));
    assert_eq!(used(&vq, 1), (1, 156));
}

#[test]
fn rx_too_small_buffer_drops_packet() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 64, true)]);
    add_chain(&vq, 1, &[(0x11_0000, 8, false)]);
    add_chain(&vq, 2, &[(0x12_0000, 2048, true)]);
    let backend = Arc::new(FakeBackend::default());
    for len in [100, 60, 60] {
        backend
            .inbound
            .lock()
            .unwrap()
            .push_back(packet(NetHeader::default(), len));
    }
    let mut rx = RxHandler::new(backend, 0, 0).unwrap();

    let (_, metrics) = run(&mut rx, &mut queue, &mem, true);

    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(used(&vq, 1), (1, 0));
    assert_eq!(used(&vq, 2), (2, 72));
    assert_eq!(metrics.errors.load(Ordering::Relaxed), 2);
}

/// Publishes a control command `class, cmd, data` with a one-byte ack buffer at `0x20_0000`.
fn ctrl_command(vq: &MockSplitQueue<'_, GuestMemoryMmap>, mem: &GuestMemoryMmap, cmd: &[u8]) {
    mem.write_slice(cmd, GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&[0xee], GuestAddress(0x20_0000)).unwrap();
    add_chain(
        vq,
        0,
        &[(0x10_0000, cmd.len() as u32, false), (0x20_0000, 1, true)],
    );
}

fn ctrl_ack(cmd: &[u8], max_pairs: u16) -> (u8, Vec<u16>) {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    ctrl_command(&vq, &mem, cmd);
    let backend = Arc::new(FakeBackend::default());
    let mut ctrl = CtrlHandler::new(backend.clone(), max_pairs);

    run(&mut ctrl, &mut queue, &mem, false);

    assert_eq!(used(&vq, 0), (0, 1));
    let pairs = backend.active_pairs.lock().unwrap().clone();
    (read(&mem, 0x20_0000, 1)[0], pairs)
}

const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;

#[test]
fn ctrl_vq_pairs_set_is_validated() {
    let mq = |n: u16| {
        let mut cmd = vec![VIRTIO_NET_CTRL_MQ as u8, 0];
        cmd.extend_from_slice(&n.to_le_bytes());
        cmd
    };

    assert_eq!(ctrl_ack(&mq(0), 4), (ERR, vec![]));
    assert_eq!(ctrl_ack(&mq(1), 4), (OK, vec![1]));
    assert_eq!(ctrl_ack(&mq(4), 4), (OK, vec![4]));
    assert_eq!(ctrl_ack(&mq(5), 4), (ERR, vec![]));
    assert_eq!(
        ctrl_ack(&[VIRTIO_NET_CTRL_MQ as u8, 0, 2], 4),
        (ERR, vec![])
    );
}

#[test]
fn ctrl_rx_mode_and_mac_commands() {
    let rx = VIRTIO_NET_CTRL_RX as u8;
    let mac = VIRTIO_NET_CTRL_MAC as u8;
    let mut table = vec![mac, VIRTIO_NET_CTRL_MAC_TABLE_SET as u8];
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&MAC);
    table.extend_from_slice(&0u32.to_le_bytes());
    let truncated = &table[..table.len() - 1];
    let mut huge = vec![mac, VIRTIO_NET_CTRL_MAC_TABLE_SET as u8];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());

    assert_eq!(ctrl_ack(&[rx, 0, 1], 1).0, OK);
    assert_eq!(ctrl_ack(&[rx, 1, 0], 1).0, OK);
    assert_eq!(ctrl_ack(&[rx, 9, 0], 1).0, ERR);
    assert_eq!(ctrl_ack(&table, 1).0, OK);
    assert_eq!(ctrl_ack(truncated, 1).0, ERR);
    assert_eq!(ctrl_ack(&huge, 1).0, ERR);
    assert_eq!(ctrl_ack(&[42, 0], 1).0, ERR);
    assert_eq!(ctrl_ack(&[42], 1).0, ERR);
}

#[test]
fn ctrl_chain_without_ack_buffer_gets_zero_length() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 4, false)]);
    let mut ctrl = CtrlHandler::new(Arc::new(FakeBackend::default()), 2);

    let (_, metrics) = run(&mut ctrl, &mut queue, &mem, false);

    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(metrics.errors.load(Ordering::Relaxed), 1);
}

// ---------------------------------------------------------------------------------------------
// Real tap

#[test]
fn tap_rejects_bad_arguments() {
    assert!(matches!(
        Tap::open(Some("a-name-longer-than-15"), 1),
        Err(TapError::Name(_))
    ));
    assert!(matches!(Tap::open(None, 0), Err(TapError::QueueCount(0))));
}

/// Opens a tap named after the test, or prints `SKIP` and returns `None` where taps cannot be
/// created (no /dev/net/tun, no CAP_NET_ADMIN).
fn test_tap(test: &str, suffix: &str, queues: u16) -> Option<Tap> {
    let name = format!("slt{}{suffix}", std::process::id() % 100_000);
    match Tap::open(Some(&name), queues) {
        Ok(tap) => Some(tap),
        Err(e) => {
            println!("SKIP {test}: {e}");
            None
        }
    }
}

fn bring_up(tap: &Tap) {
    // Keep IPv6 from sending its own frames (router solicitations) through the test tap.
    let knob = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name());
    let _ = std::fs::write(knob, "1");
    tap.set_up().unwrap();
}

/// Waits until `fd` is readable; false after `timeout_ms`.
fn readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of length 1 for the duration of the call.
    let ret = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
    ret > 0 && pfd.revents & libc::POLLIN != 0
}

/// An AF_PACKET socket on the tap interface: sees frames the tap injects, sends frames out of
/// the interface (into the tap fd).
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn bind(ifname: &str) -> Self {
        use std::os::fd::FromRawFd;
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0);
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a valid sockaddr_ll and the length matches it.
        let ret = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        Self(fd)
    }

    fn raw(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length during the call.
        let ret = unsafe { libc::send(self.raw(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(ret, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// The first received frame equal in length and EtherType to `like`, within two seconds.
    fn recv_like(&self, like: &[u8]) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut buf = vec![0u8; 65536];
        while std::time::Instant::now() < deadline {
            if !readable(self.raw(), 100) {
                continue;
            }
            // SAFETY: `buf` is valid for writes of its length during the call.
            let n = unsafe { libc::recv(self.raw(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                continue;
            };
            if n == like.len() && buf[12..14] == like[12..14] {
                return Some(buf[..n].to_vec());
            }
        }
        None
    }
}

#[test]
fn tap_tx_frame_reaches_the_interface() {
    let Some(tap) = test_tap("tap_tx_frame_reaches_the_interface", "t", 1) else {
        return;
    };
    bring_up(&tap);
    let sniffer = PacketSocket::bind(tap.name());
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    let frame = test_frame(100, 0x5a);
    mem.write_slice(&[0; 12], GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&frame, GuestAddress(0x11_0000)).unwrap();
    add_chain(&vq, 0, &[(0x10_0000, 12, false), (0x11_0000, 100, false)]);
    let mut tx = TxHandler::new(Arc::new(tap), 0, TxOffloads::default());

    let (_, metrics) = run(&mut tx, &mut queue, &mem, false);

    assert_eq!(metrics.errors.load(Ordering::Relaxed), 0);
    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(sniffer.recv_like(&frame), Some(frame));
}

#[test]
fn tap_rx_frame_lands_in_buffer_with_header() {
    let Some(tap) = test_tap("tap_rx_frame_lands_in_buffer_with_header", "r", 1) else {
        return;
    };
    bring_up(&tap);
    let sender = PacketSocket::bind(tap.name());
    let tap = Arc::new(tap);
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 2048, true)]);
    let mut rx = RxHandler::new(tap.clone(), 0, 1 << VIRTIO_NET_F_MRG_RXBUF).unwrap();
    let frame = test_frame(120, 0x33);

    sender.send(&frame);
    assert!(readable(rx.completion_fd().unwrap(), 2000));
    let (used_any, _) = run(&mut rx, &mut queue, &mem, true);

    assert!(used_any);
    assert_eq!(used(&vq, 0), (0, 132));
    let got = read(&mem, 0x10_0000, 132);
    let header = NetHeader::from_bytes(&got).unwrap();
    assert_eq!(
        header,
        NetHeader {
            num_buffers: 1,
            ..NetHeader::default()
        }
    );
    assert_eq!(&got[12..], frame.as_slice());
}

#[test]
fn tap_rx_without_buffers_leaves_frames_in_tap() {
    let Some(tap) = test_tap("tap_rx_without_buffers_leaves_frames_in_tap", "w", 1) else {
        return;
    };
    bring_up(&tap);
    let sender = PacketSocket::bind(tap.name());
    let tap = Arc::new(tap);
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    let mut rx = RxHandler::new(tap.clone(), 0, 0).unwrap();
    let wakeup = rx.completion_fd().unwrap();
    let frame = test_frame(80, 0x11);

    sender.send(&frame);
    assert!(readable(wakeup, 2000));
    let (first, _) = run(&mut rx, &mut queue, &mem, true);
    let rearmed = readable(wakeup, 100);
    let still_in_tap = readable(tap.queue_fd(0).unwrap(), 0);
    add_chain(&vq, 0, &[(0x10_0000, 2048, true)]);
    let (after_kick, _) = run(&mut rx, &mut queue, &mem, false);

    assert!(!first);
    assert!(!rearmed, "the worker would spin on a tap it cannot drain");
    assert!(still_in_tap);
    assert!(after_kick);
    assert_eq!(used(&vq, 0), (0, 92));
    assert_eq!(read(&mem, 0x10_0000 + 12, 80), frame);
}

#[test]
fn tap_multiqueue_attaches_and_detaches_queues() {
    let Some(tap) = test_tap("tap_multiqueue_attaches_and_detaches_queues", "m", 2) else {
        return;
    };

    let one = tap.set_active_queues(1);
    let two = tap.set_active_queues(2);

    assert_eq!(tap.queue_count(), 2);
    assert!(one.is_ok() && two.is_ok(), "{one:?} {two:?}");
    assert!(tap.queue_fd(1).is_some() && tap.queue_fd(2).is_none());
}

#[test]
fn tap_rx_on_detached_queue_stays_quiet_until_attached() {
    let test = "tap_rx_on_detached_queue_stays_quiet_until_attached";
    let Some(tap) = test_tap(test, "d", 2) else {
        return;
    };
    let tap = Arc::new(tap);
    tap.set_active_queues(1).unwrap();
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    add_chain(&vq, 0, &[(0x10_0000, 2048, true)]);
    let mut rx = RxHandler::new(tap.clone(), 1, 0).unwrap();
    let wakeup = rx.completion_fd().unwrap();

    let (kicked, _) = run(&mut rx, &mut queue, &mem, false);
    run(&mut rx, &mut queue, &mem, true);
    let quiet_while_detached = !readable(wakeup, 50);
    tap.set_active_queues(2).unwrap();
    let woken_by_attach = readable(wakeup, 1000);
    run(&mut rx, &mut queue, &mem, true);
    let quiet_when_empty = !readable(wakeup, 50);

    assert!(!kicked);
    assert!(
        quiet_while_detached,
        "a detached queue would spin the worker"
    );
    assert!(woken_by_attach);
    assert!(quiet_when_empty);
}

// ---------------------------------------------------------------------------------------------
// Activation through the real queue worker

struct CountingInterrupt(std::sync::atomic::AtomicU64);

impl sluice_virtio::VirtioInterrupt for CountingInterrupt {
    fn notify_queue(&self, _queue: u16) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn notify_config(&self) -> io::Result<()> {
        Ok(())
    }
    fn needs_reset(&self) {}
}

#[test]
fn activated_device_transmits_on_kick() {
    use sluice_virtio::{NotifyPolicy, QueueBinding};
    use vmm_sys_util::eventfd::EventFd;
    let mem = guest_memory();
    let rx_vq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    let tx_vq = MockSplitQueue::new(&mem, 16);
    let frame = test_frame(64, 9);
    mem.write_slice(&[0; 12], GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&frame, GuestAddress(0x10_000c)).unwrap();
    add_chain(&tx_vq, 0, &[(0x10_0000, 76, false)]);
    let backend = Arc::new(FakeBackend::default());
    let mut device = Net::with_backend(backend.clone(), 1, NetConfig::new(MAC));
    let tx_kick = EventFd::new(0).unwrap();
    let binding = |index, vq: &MockSplitQueue<'_, GuestMemoryMmap>, kick: EventFd| QueueBinding {
        index,
        queue: vq.create_queue::<Queue>().unwrap().into(),
        kick,
        policy: NotifyPolicy::Interrupt,
    };
    let queues = vec![
        binding(0, &rx_vq, EventFd::new(0).unwrap()),
        binding(1, &tx_vq, tx_kick.try_clone().unwrap()),
    ];
    let interrupt = Arc::new(CountingInterrupt(Default::default()));

    let features = device.device_features();
    let active = sluice_virtio::ActiveQueues::start(
        &mut device,
        "net",
        features,
        sluice_dma::identity(mem.clone()),
        queues,
        interrupt.clone(),
    )
    .unwrap();
    tx_kick.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while backend.written.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    active.reset(&mut device);

    let written = backend.written.lock().unwrap();
    assert_eq!(written.len(), 1);
    assert_eq!(&written[0][12..], frame.as_slice());
    assert_eq!(tx_vq.used().idx().load(), 1);
    assert_eq!(
        device.metrics().queues[1].requests.load(Ordering::Relaxed),
        1
    );
}

#[test]
fn activation_needs_both_queues_of_the_first_pair() {
    use sluice_virtio::{ActivateError, NotifyPolicy, QueueBinding};
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut device = net(1, None);
    let only_rx = vec![QueueBinding {
        index: 0,
        queue: vq.create_queue::<Queue>().unwrap().into(),
        kick: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        policy: NotifyPolicy::Interrupt,
    }];

    let result = sluice_virtio::ActiveQueues::start(
        &mut device,
        "net",
        0,
        sluice_dma::identity(mem.clone()),
        only_rx,
        Arc::new(CountingInterrupt(Default::default())),
    );

    assert!(matches!(
        result,
        Err(ActivateError::QueueCount {
            got: 1,
            min: 2,
            max: 2
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Tap queue attachment (the same handlers serve virtio-pci and vhost-user)

fn attached_after(backend: &FakeBackend) -> Option<u16> {
    backend.active_pairs.lock().unwrap().last().copied()
}

#[test]
fn tap_queues_follow_the_highest_running_rx_ring() {
    let backend = Arc::new(FakeBackend::default());
    let config = NetConfig::new(MAC);
    let mut device = Net::with_backend(backend.clone(), 3, config);
    let features = device.device_features() & !(1 << VIRTIO_NET_F_CTRL_VQ);
    device.ack_features(features).unwrap();

    let rx2 = device.queue_handler(4, 16).unwrap();
    let with_rx2 = attached_after(&backend);
    let rx0 = device.queue_handler(0, 16).unwrap();
    drop(rx2);
    let after_rx2_stopped = attached_after(&backend);
    drop(rx0);

    assert_eq!(with_rx2, Some(3), "rx2 runs: tap queues 0..=2");
    assert_eq!(after_rx2_stopped, Some(1));
    assert_eq!(attached_after(&backend), Some(1), "never fewer than one");
}

#[test]
fn a_control_queue_limits_tap_queues_to_the_pairs_the_driver_chose() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    let backend = Arc::new(FakeBackend::default());
    let config = NetConfig::new(MAC);
    let mut device = Net::with_backend(backend.clone(), 3, config);
    device.ack_features(device.device_features()).unwrap();
    let _rings: Vec<_> = (0..6)
        .map(|index| device.queue_handler(index, 16).unwrap())
        .collect();
    let mut ctrl = device.queue_handler(6, 16).unwrap();
    let before_pairs_set = attached_after(&backend);
    let mut cmd = vec![VIRTIO_NET_CTRL_MQ as u8, 0];
    cmd.extend_from_slice(&2u16.to_le_bytes());
    ctrl_command(&vq, &mem, &cmd);

    run(ctrl.as_mut(), &mut queue, &mem, false);

    assert_eq!(
        before_pairs_set,
        Some(1),
        "first pair only until VQ_PAIRS_SET"
    );
    assert_eq!(read(&mem, 0x20_0000, 1)[0], OK);
    assert_eq!(attached_after(&backend), Some(2));
    drop(ctrl);
    assert_eq!(
        attached_after(&backend),
        Some(3),
        "no control queue: the rings decide"
    );
}

// The same handlers over packed rings.

mod packed {
    use super::*;
    use sluice_virtio::ring::mock::PackedDriver;

    #[test]
    fn tx_sends_a_packed_chain() {
        let mem = guest_memory();
        let dma = sluice_dma::identity(mem.clone());
        let mut driver = PackedDriver::new(&dma, 0x1000, 8);
        let mut queue = VirtQueue::from(driver.queue());
        let frame = test_frame(100, 7);
        mem.write_slice(&[0; 12], GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&frame, GuestAddress(0x11_0000)).unwrap();
        driver.add_indirect(
            5,
            0x2000,
            &[(0x10_0000, 12, false), (0x11_0000, 100, false)],
        );
        let backend = Arc::new(FakeBackend::default());
        let mut tx = TxHandler::new(backend.clone(), 0, TxOffloads::default());

        let (used_any, metrics) = run(&mut tx, &mut queue, &mem, false);

        assert!(used_any);
        assert_eq!(driver.used(), Some((5, 0)));
        let written = backend.written.lock().unwrap();
        assert_eq!(written.len(), 1);
        assert_eq!(&written[0][12..], frame.as_slice());
        assert_eq!(metrics.bytes.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn rx_mergeable_spreads_over_packed_buffers_and_rolls_back_a_shortage() {
        let mem = guest_memory();
        let dma = sluice_dma::identity(mem.clone());
        let mut driver = PackedDriver::new(&dma, 0x1000, 8);
        let mut queue = VirtQueue::from(driver.queue());
        driver.add_chain(6, &[(0x10_0000, 256, true)]);
        let backend = Arc::new(FakeBackend::default());
        let inbound = packet(NetHeader::default(), 400);
        backend.inbound.lock().unwrap().push_back(inbound.clone());
        let mut rx = RxHandler::new(backend, 0, 1 << VIRTIO_NET_F_MRG_RXBUF).unwrap();

        let (first, _) = run(&mut rx, &mut queue, &mem, true);
        let nothing_used = driver.used();
        driver.add_chain(2, &[(0x11_0000, 128, true), (0x12_0000, 128, true)]);
        let (second, _) = run(&mut rx, &mut queue, &mem, false);

        assert!(!first);
        assert_eq!(nothing_used, None, "a shortage gives the buffer back");
        assert!(second);
        assert_eq!(driver.used(), Some((6, 256)));
        assert_eq!(driver.used(), Some((2, 156)));
        let mut got = read(&mem, 0x10_0000, 256);
        got.extend(read(&mem, 0x11_0000, 128));
        got.extend(read(&mem, 0x12_0000, 28));
        assert_eq!(NetHeader::from_bytes(&got).unwrap().num_buffers, 2);
        assert_eq!(&got[12..], &inbound[12..]);
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshot state, announce, standby

fn net_on(backend: &Arc<FakeBackend>, pairs: u16, config: NetConfig) -> Net {
    Net::with_backend(backend.clone(), pairs, config)
}

fn announcing() -> NetConfig {
    NetConfig {
        announce: true,
        ..NetConfig::new(MAC)
    }
}

fn config_status(device: &Net) -> u16 {
    let mut status = [0u8; 2];
    device.read_config(6, &mut status);
    u16::from_le_bytes(status)
}

#[test]
fn a_frame_read_but_not_delivered_is_saved_restored_and_delivered_first() {
    let mem = guest_memory();
    let backend = Arc::new(FakeBackend::default());
    let (first, second) = (
        packet(NetHeader::default(), 60),
        packet(NetHeader::default(), 90),
    );
    backend.inbound.lock().unwrap().push_back(first.clone());
    backend.inbound.lock().unwrap().push_back(second.clone());
    let mut device = net_on(&backend, 1, NetConfig::new(MAC));
    let features = device.device_features();
    device.ack_features(features).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    // No buffers posted: the handler holds the first frame; the second waits in the tap.
    let mut rx = device.queue_handler(0, 16).unwrap();
    let (delivered, _) = run(rx.as_mut(), &mut queue, &mem, true);
    drop(rx);

    let saved = device.save_state().unwrap().expect("virtio-net has state");
    let mut restored = net_on(&Arc::new(FakeBackend::default()), 1, NetConfig::new(MAC));
    restored.restore_state(&saved).unwrap();
    restored.ack_features(features).unwrap();
    let mut rx = restored.queue_handler(0, 16).unwrap();
    add_chain(&vq, 0, &[(0x10_0000, 2048, true)]);
    add_chain(&vq, 1, &[(0x11_0000, 2048, true)]);
    run(rx.as_mut(), &mut queue, &mem, false);

    assert!(!delivered);
    let frames = SavedNet::deserialize(&saved).unwrap().rx_frames;
    assert_eq!(frames, vec![(0, first.clone()), (0, second.clone())]);
    assert!(
        backend.inbound.lock().unwrap().is_empty(),
        "the tap was drained"
    );
    assert_eq!(used(&vq, 0), (0, first.len() as u32));
    assert_eq!(used(&vq, 1), (1, second.len() as u32));
    assert_eq!(read(&mem, 0x10_000c, 60), first[12..].to_vec());
    assert_eq!(read(&mem, 0x11_000c, 90), second[12..].to_vec());
}

#[test]
fn the_pairs_and_rx_mode_the_control_queue_chose_survive_save_and_restore() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    let backend = Arc::new(FakeBackend::default());
    let mut device = net_on(&backend, 3, NetConfig::new(MAC));
    device.ack_features(device.device_features()).unwrap();
    let mut ctrl = device.queue_handler(6, 16).unwrap();
    let mut cmd = vec![VIRTIO_NET_CTRL_MQ as u8, 0];
    cmd.extend_from_slice(&2u16.to_le_bytes());
    ctrl_command(&vq, &mem, &cmd);
    run(ctrl.as_mut(), &mut queue, &mem, false);
    drop(ctrl);

    let saved = device.save_state().unwrap().unwrap();
    // Resumed in place: the next control handler keeps the driver's choice.
    let _rings: Vec<_> = (0..6)
        .map(|index| device.queue_handler(index, 16).unwrap())
        .collect();
    let _resumed = device.queue_handler(6, 16).unwrap();
    let in_place = attached_after(&backend);
    let other = Arc::new(FakeBackend::default());
    let mut restored = net_on(&other, 3, NetConfig::new([2, 0, 0, 0, 0, 9]));
    restored.restore_state(&saved).unwrap();
    restored.ack_features(restored.device_features()).unwrap();
    let _rings: Vec<_> = (0..6)
        .map(|index| restored.queue_handler(index, 16).unwrap())
        .collect();
    let _ctrl = restored.queue_handler(6, 16).unwrap();
    let mut mac = [0u8; 6];
    restored.read_config(0, &mut mac);

    assert_eq!(SavedNet::deserialize(&saved).unwrap().ctrl_pairs, 2);
    assert_eq!(in_place, Some(2));
    assert_eq!(attached_after(&other), Some(2), "not the first pair only");
    assert_eq!(mac, MAC, "the guest's MAC, not the new command line's");
}

#[test]
fn a_restore_refuses_another_shape_and_bad_frames() {
    let mut device = net(2, None);
    let saved = device.save_state().unwrap().unwrap();
    let with = |change: &dyn Fn(&mut SavedNet)| {
        let mut state = SavedNet::deserialize(&saved).unwrap();
        change(&mut state);
        net(2, None).restore_state(&serde_json::to_value(state).unwrap())
    };

    assert!(net(1, None).restore_state(&saved).is_err(), "pairs differ");
    assert!(with(&|s| s.ctrl_pairs = 0).is_err());
    assert!(with(&|s| s.ctrl_pairs = 3).is_err());
    assert!(with(&|s| s.rx_frames = vec![(0, vec![0; 4])]).is_err());
    assert!(with(&|s| s.rx_frames = vec![(0, vec![0; MAX_PACKET_LEN + 1])]).is_err());
    assert!(with(&|s| s.rx_frames = vec![(2, vec![0; 60])]).is_err());
    assert!(with(&|s| s.rx_frames = vec![(1, vec![0; 60]); 300]).is_err());
    assert!(net(2, None)
        .restore_state(&serde_json::json!({"pairs": "two"}))
        .is_err());
    assert!(with(&|s| s.rx_frames = vec![(1, vec![0; 60])]).is_ok());
}

#[test]
fn a_restored_device_asks_its_driver_to_announce_until_acked() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    let backend = Arc::new(FakeBackend::default());
    let mut without = net_on(&backend, 1, announcing());
    without
        .ack_features(without.device_features() & !(1 << VIRTIO_NET_F_GUEST_ANNOUNCE))
        .unwrap();
    let mut device = net_on(&backend, 1, announcing());
    device.ack_features(device.device_features()).unwrap();

    let changed_without = without.restored();
    let changed = device.restored();
    let announcing_status = config_status(&device);
    let mut ctrl = device.queue_handler(2, 16).unwrap();
    ctrl_command(
        &vq,
        &mem,
        &[
            VIRTIO_NET_CTRL_ANNOUNCE as u8,
            VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8,
        ],
    );
    run(ctrl.as_mut(), &mut queue, &mem, false);

    assert!(!changed_without, "no announce without GUEST_ANNOUNCE");
    assert!(changed);
    assert_eq!(
        announcing_status,
        (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16
    );
    assert_eq!(read(&mem, 0x20_0000, 1)[0], OK);
    assert_eq!(config_status(&device), VIRTIO_NET_S_LINK_UP as u16);
    let metrics = device.metrics();
    assert_eq!(metrics.counter("announce_requests"), Some(1));
    assert_eq!(metrics.counter("announce_acks"), Some(1));
    assert_eq!(without.metrics().counter("announce_requests"), Some(0));
}

#[test]
fn announce_brings_a_control_queue_to_a_single_pair_and_standby_is_offered_when_asked() {
    let has = |f: u64, bit: u32| f & (1 << bit) != 0;
    let plain = net(1, None);
    let announcing = net_on(&Arc::default(), 1, announcing());
    let standby = net_on(
        &Arc::default(),
        1,
        NetConfig {
            standby: true,
            ..NetConfig::new(MAC)
        },
    );

    assert!(!has(plain.device_features(), VIRTIO_NET_F_GUEST_ANNOUNCE));
    assert!(!has(plain.device_features(), VIRTIO_NET_F_STANDBY));
    assert_eq!(plain.queue_max_sizes().len(), 2);
    let features = announcing.device_features();
    assert!(has(features, VIRTIO_NET_F_GUEST_ANNOUNCE) && has(features, VIRTIO_NET_F_CTRL_VQ));
    assert!(!has(features, VIRTIO_NET_F_MQ));
    assert_eq!(announcing.queue_max_sizes().len(), 3);
    assert!(has(standby.device_features(), VIRTIO_NET_F_STANDBY));
}

// ---------------------------------------------------------------------------------------------
// Transmit behind a shared scheduler (issue 16)

/// Puts `count` one-descriptor chains (header + a 64-byte frame marked `marker + i`) at
/// `base` into `vq`.
fn queue_frames(
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    base: u64,
    markers: std::ops::Range<u8>,
) {
    for (slot, marker) in markers.enumerate() {
        let addr = base + slot as u64 * 0x1000;
        let mut packet = vec![0; NET_HDR_LEN];
        packet.extend(test_frame(64, marker));
        mem.write_slice(&packet, GuestAddress(addr)).unwrap();
        add_chain(vq, slot as u16, &[(addr, packet.len() as u32, false)]);
    }
}

/// The markers of the frames the backend got, in order.
fn written_markers(backend: &FakeBackend) -> Vec<u8> {
    let written = backend.written.lock().unwrap();
    written
        .iter()
        .map(|p| p[NET_HDR_LEN + ETH_HLEN] ^ ETH_HLEN as u8)
        .collect()
}

fn limited_guest(qos: &sluice_qos::Qos, pps: u64, burst: u64, queue: usize) -> sluice_qos::GuestId {
    let mut guest = sluice_qos::GuestConfig::new("g");
    guest.iops = Some(sluice_qos::Rate {
        per_sec: pps,
        burst,
    });
    guest.queue_limit = queue;
    qos.add_guest(guest)
}

#[test]
fn scheduled_tx_leaves_frames_past_its_bucket_in_the_ring_and_drops_none() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    queue_frames(&vq, &mem, 0x10_0000, 0..8);
    let qos = sluice_qos::Qos::new(sluice_qos::DeviceConfig::default());
    // 2 frames at once, then one a second; at most 4 held by the server.
    let guest = limited_guest(&qos, 1, 2, 4);
    let backend = Arc::new(FakeBackend::default());
    let mut tx = TxHandler::new(backend.clone(), 0, TxOffloads::default())
        .with_scheduler(qos.port(guest).unwrap(), sluice_qos::Class::Normal);

    let (used_any, metrics) = run(&mut tx, &mut queue, &mem, false);

    let sent = written_markers(&backend);
    assert!(used_any);
    assert!(sent.len() >= 2 && sent.len() < 8, "{sent:?}");
    assert!(
        tx.in_flight() <= 4,
        "held {} past the queue bound",
        tx.in_flight()
    );
    assert!(tx.has_in_flight());
    assert_eq!(metrics.errors.load(Ordering::Relaxed), 0);
    assert_eq!(
        vq.used().idx().load() as usize,
        sent.len(),
        "only sent frames returned"
    );

    // The limit lifted: everything left (held and still in the ring) goes, in order.
    let unlimited = sluice_qos::GuestConfig {
        iops: None,
        ..qos.guest_config(guest).unwrap()
    };
    assert!(qos.reconfigure(guest, unlimited));
    run(&mut tx, &mut queue, &mem, true);
    assert_eq!(written_markers(&backend), (0..8).collect::<Vec<u8>>());
    assert_eq!(vq.used().idx().load(), 8);
    assert!(!tx.has_in_flight());
}

#[test]
fn scheduled_tx_sends_a_high_priority_pair_before_a_bulk_pair_of_the_same_guest() {
    let mem = guest_memory();
    let bulk_vq = MockSplitQueue::new(&mem, 16);
    let high_vq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    let mut bulk_queue = VirtQueue::from(bulk_vq.create_queue::<Queue>().unwrap());
    let mut high_queue = VirtQueue::from(high_vq.create_queue::<Queue>().unwrap());
    queue_frames(&bulk_vq, &mem, 0x10_0000, 0..3);
    queue_frames(&high_vq, &mem, 0x20_0000, 10..13);
    let qos = sluice_qos::Qos::new(sluice_qos::DeviceConfig::default());
    // One frame, then (for the test's duration) nothing.
    let guest = limited_guest(&qos, 1, 1, 8);
    let backend = Arc::new(FakeBackend::default());
    let mut bulk = TxHandler::new(backend.clone(), 0, TxOffloads::default())
        .with_scheduler(qos.port(guest).unwrap(), sluice_qos::Class::Idle);
    let mut high = TxHandler::new(backend.clone(), 1, TxOffloads::default())
        .with_scheduler(qos.port(guest).unwrap(), sluice_qos::Class::High);

    // The bulk pair queues first and spends the bucket; then the high pair queues behind it.
    run(&mut bulk, &mut bulk_queue, &mem, false);
    run(&mut high, &mut high_queue, &mem, false);
    assert_eq!(written_markers(&backend), vec![0]);
    let unlimited = sluice_qos::GuestConfig {
        iops: None,
        ..qos.guest_config(guest).unwrap()
    };
    qos.reconfigure(guest, unlimited);
    run(&mut high, &mut high_queue, &mem, true);
    run(&mut bulk, &mut bulk_queue, &mem, true);

    // Every high frame went before the bulk frames that were waiting longer.
    assert_eq!(written_markers(&backend), vec![0, 10, 11, 12, 1, 2]);
}

/// `vm.qos` id `device` on `serve net`: the device-wide frame bucket holds every guest's
/// frames in their rings, and a live change of it lets them go (counted in frames written,
/// not timed).
#[test]
fn scheduled_tx_frames_held_by_the_device_bucket_go_when_it_is_changed_live() {
    let mem = guest_memory();
    let a_vq = MockSplitQueue::new(&mem, 16);
    let b_vq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    let mut a_queue = VirtQueue::from(a_vq.create_queue::<Queue>().unwrap());
    let mut b_queue = VirtQueue::from(b_vq.create_queue::<Queue>().unwrap());
    queue_frames(&a_vq, &mem, 0x10_0000, 0..8);
    queue_frames(&b_vq, &mem, 0x20_0000, 20..28);
    // One frame at once for the whole device, then one a second.
    let limited = sluice_qos::DeviceConfig {
        iops: Some(sluice_qos::Rate {
            per_sec: 1,
            burst: 1,
        }),
        ..sluice_qos::DeviceConfig::default()
    };
    let qos = sluice_qos::Qos::new(limited.clone());
    let a_guest = qos.add_guest(sluice_qos::GuestConfig::new("a"));
    let b_guest = qos.add_guest(sluice_qos::GuestConfig::new("b"));
    let (a_backend, b_backend) = (
        Arc::new(FakeBackend::default()),
        Arc::new(FakeBackend::default()),
    );
    let mut a = TxHandler::new(a_backend.clone(), 0, TxOffloads::default())
        .with_scheduler(qos.port(a_guest).unwrap(), sluice_qos::Class::Normal);
    let mut b = TxHandler::new(b_backend.clone(), 0, TxOffloads::default())
        .with_scheduler(qos.port(b_guest).unwrap(), sluice_qos::Class::Normal);

    run(&mut a, &mut a_queue, &mem, false);
    run(&mut b, &mut b_queue, &mem, false);
    let before = written_markers(&a_backend).len() + written_markers(&b_backend).len();
    assert!(
        (1..8).contains(&before),
        "{before} frames passed a 1-frame bucket"
    );
    assert!(a.has_in_flight() && b.has_in_flight());

    qos.reconfigure_device(sluice_qos::DeviceConfig {
        iops: None,
        ..limited
    });
    assert_eq!(qos.device_config().iops, None);
    // Each grant's write completes at once, but a grant to the other guest waits for its
    // worker (woken through its eventfd in the server; run in turn here): the device's depth
    // of 4 frees as each worker runs.
    for _ in 0..4 {
        run(&mut a, &mut a_queue, &mem, true);
        run(&mut b, &mut b_queue, &mem, true);
    }
    assert_eq!(written_markers(&a_backend), (0..8).collect::<Vec<u8>>());
    assert_eq!(written_markers(&b_backend), (20..28).collect::<Vec<u8>>());
    assert_eq!((a_vq.used().idx().load(), b_vq.used().idx().load()), (8, 8));
}
