//! virtio-net (§5.1) without offloads: queue 0 receives, queue 1 transmits, every buffer
//! carries the 12-byte `virtio_net_hdr` (VERSION_1 layout, all zero on transmit). Frames are
//! broadcast with EtherType 0x88b5 (local experimental) and a payload of sequence number plus
//! a pattern, so `echo` can check what the peer sent back (MAC addresses may be swapped).

use super::pci::{self as vpci, VirtioError, VirtioPci};
use super::queue::{Queue, Segment};
use super::{idle, report_error};
use crate::arch::ring3;
use crate::cmdline::{Mode, NetDir, NetParams};
use crate::mem;
use crate::time::{now_ns, Deadline};
use crate::workloads::stats::Histogram;
use crate::workloads::Outcome;
use alloc::vec::Vec;

const F_MAC: u64 = 1 << 5;
const HDR_LEN: u64 = 12;
const BUF_LEN: u64 = 2048;
const ETH_HDR: usize = 14;
const ETHERTYPE: u16 = 0x88b5;
const RX_BUFFERS: u16 = 64;
const TX_BUFFERS: u16 = 32;

struct Net {
    device: VirtioPci,
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    rx_buffers: Vec<u64>,
    tx_buffers: Vec<u64>,
    tx_free: Vec<usize>,
    tx_by_head: Vec<Option<usize>>,
    rx_by_head: Vec<Option<usize>>,
    mode: Mode,
    timeout_ms: u64,
}

fn write_bytes(addr: u64, data: &[u8]) {
    // SAFETY: `addr` is a DMA buffer of BUF_LEN bytes we own and data fits (checked by callers).
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) }
}

fn read_bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: `addr..addr+len` lies in an rx buffer the device has returned (len ≤ BUF_LEN).
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// The frame for sequence number `seq` with `size` payload bytes.
fn build_frame(mac: &[u8; 6], seq: u64, size: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HDR + size);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(mac);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(&seq.to_le_bytes());
    frame.extend((8..size).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8)));
    frame
}

impl Net {
    fn open(p: &NetParams, timeout_ms: u64) -> Result<Self, VirtioError> {
        let pci = vpci::find(vpci::TYPE_NET, p.dev).ok_or(VirtioError::NotFound)?;
        let mut device = VirtioPci::open(pci, F_MAC | vpci::F_EVENT_IDX, timeout_ms)?;
        let interrupts = p.mode != Mode::Poll;
        let rx = device.setup_queue(0, RX_BUFFERS, interrupts)?;
        let tx = device.setup_queue(1, TX_BUFFERS, interrupts)?;
        let mut mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        if device.has(F_MAC) {
            for (i, byte) in mac.iter_mut().enumerate() {
                *byte = device.config_read8(i as u64);
            }
        }
        let rx_count = usize::from(rx.size());
        let tx_count = usize::from(tx.size());
        let alloc = |n: usize| {
            (0..n)
                .map(|_| mem::alloc_dma(BUF_LEN))
                .collect::<Option<Vec<u64>>>()
        };
        let mut net = Net {
            rx_buffers: alloc(rx_count).ok_or(VirtioError::NoMemory)?,
            tx_buffers: alloc(tx_count).ok_or(VirtioError::NoMemory)?,
            tx_free: (0..tx_count).rev().collect(),
            tx_by_head: alloc::vec![None; tx_count],
            rx_by_head: alloc::vec![None; rx_count],
            device,
            rx,
            tx,
            mac,
            mode: p.mode,
            timeout_ms,
        };
        for index in 0..rx_count {
            net.post_rx(index)?;
        }
        net.device.driver_ok()?;
        net.rx.kick();
        Ok(net)
    }

    fn post_rx(&mut self, index: usize) -> Result<(), VirtioError> {
        let segment = Segment {
            addr: self.rx_buffers[index],
            len: BUF_LEN as u32,
            device_writes: true,
        };
        let head = self.rx.add(&[segment]).ok_or(VirtioError::NoMemory)?;
        self.rx_by_head[usize::from(head)] = Some(index);
        Ok(())
    }

    /// Reclaims finished transmissions; returns how many.
    fn reap_tx(&mut self) -> Result<u64, VirtioError> {
        let mut done = 0;
        while let Some((head, _)) = self
            .tx
            .pop_used()
            .map_err(|bad| VirtioError::BadUsed(bad.id))?
        {
            let index = self
                .tx_by_head
                .get_mut(usize::from(head))
                .and_then(Option::take)
                .ok_or(VirtioError::BadUsed(u32::from(head)))?;
            self.tx_free.push(index);
            done += 1;
        }
        Ok(done)
    }

    /// Sends one frame, waiting for a free tx buffer if needed.
    fn send(&mut self, frame: &[u8]) -> Result<(), VirtioError> {
        let deadline = Deadline::after_ms(self.timeout_ms);
        while self.tx_free.is_empty() {
            if self.reap_tx()? == 0 {
                if deadline.expired() {
                    return Err(VirtioError::Timeout("net tx"));
                }
                let tx = &self.tx;
                idle(self.mode, || tx.has_used());
            }
        }
        let Some(index) = self.tx_free.pop() else {
            return Err(VirtioError::NoMemory);
        };
        let addr = self.tx_buffers[index];
        write_bytes(addr, &[0; HDR_LEN as usize]);
        write_bytes(addr + HDR_LEN, frame);
        let segment = Segment {
            addr,
            len: (HDR_LEN as usize + frame.len()) as u32,
            device_writes: false,
        };
        let head = self.tx.add(&[segment]).ok_or(VirtioError::NoMemory)?;
        self.tx_by_head[usize::from(head)] = Some(index);
        self.tx.kick();
        Ok(())
    }

    /// Waits for one received frame and hands its bytes (without the virtio header) to `f`.
    fn receive<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Result<T, VirtioError> {
        let deadline = Deadline::after_ms(self.timeout_ms);
        loop {
            self.reap_tx()?;
            if let Some((head, len)) = self
                .rx
                .pop_used()
                .map_err(|bad| VirtioError::BadUsed(bad.id))?
            {
                let index = self
                    .rx_by_head
                    .get_mut(usize::from(head))
                    .and_then(Option::take)
                    .ok_or(VirtioError::BadUsed(u32::from(head)))?;
                let len = u64::from(len).min(BUF_LEN);
                let frame = read_bytes(
                    self.rx_buffers[index] + HDR_LEN,
                    len.saturating_sub(HDR_LEN) as usize,
                );
                let result = f(frame);
                self.post_rx(index)?;
                self.rx.kick();
                return Ok(result);
            }
            if deadline.expired() {
                return Err(if self.device.needs_reset() {
                    VirtioError::NeedsReset
                } else {
                    VirtioError::Timeout("net rx")
                });
            }
            let (rx, tx) = (&self.rx, &self.tx);
            idle(self.mode, || rx.has_used() || tx.has_used());
        }
    }

    fn drain_tx(&mut self) -> Result<(), VirtioError> {
        let deadline = Deadline::after_ms(self.timeout_ms);
        while self.tx_free.len() < self.tx_buffers.len() {
            if self.reap_tx()? == 0 {
                if deadline.expired() {
                    return Err(VirtioError::Timeout("net tx drain"));
                }
                let tx = &self.tx;
                idle(self.mode, || tx.has_used());
            }
        }
        Ok(())
    }
}

/// Whether `frame` is our echo of `expected` (MAC addresses ignored).
fn echo_matches(frame: &[u8], expected: &[u8]) -> bool {
    frame.len() >= expected.len() && frame[12..expected.len()] == expected[12..]
}

fn is_ours(frame: &[u8]) -> bool {
    frame.len() >= ETH_HDR + 8 && frame[12..14] == ETHERTYPE.to_be_bytes()
}

struct Counts {
    frames: u64,
    bytes: u64,
    errors: u64,
}

fn run_echo(net: &mut Net, p: &NetParams, hist: &mut Histogram) -> Result<Counts, VirtioError> {
    let mut counts = Counts {
        frames: 0,
        bytes: 0,
        errors: 0,
    };
    for seq in 0..p.frames {
        let frame = build_frame(&net.mac, seq, p.size as usize);
        let sent = now_ns();
        net.send(&frame)?;
        let deadline = Deadline::after_ms(net.timeout_ms);
        loop {
            let (ours, matches, seq_seen) = net.receive(|got| {
                let seq_seen = got
                    .get(ETH_HDR..ETH_HDR + 8)
                    .map(|b| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)));
                (is_ours(got), echo_matches(got, &frame), seq_seen)
            })?;
            if ours && seq_seen == Some(seq) {
                hist.record(now_ns() - sent);
                counts.frames += 1;
                counts.bytes += frame.len() as u64;
                counts.errors += u64::from(!matches);
                break;
            }
            if deadline.expired() {
                return Err(VirtioError::Timeout("net echo"));
            }
        }
    }
    Ok(counts)
}

fn run_tx(net: &mut Net, p: &NetParams) -> Result<Counts, VirtioError> {
    let mut counts = Counts {
        frames: 0,
        bytes: 0,
        errors: 0,
    };
    for seq in 0..p.frames {
        let frame = build_frame(&net.mac, seq, p.size as usize);
        net.send(&frame)?;
        counts.frames += 1;
        counts.bytes += frame.len() as u64;
    }
    net.drain_tx()?;
    Ok(counts)
}

fn run_rx(net: &mut Net, p: &NetParams) -> Result<Counts, VirtioError> {
    let mut counts = Counts {
        frames: 0,
        bytes: 0,
        errors: 0,
    };
    while counts.frames < p.frames {
        let len = net.receive(|got| got.len())?;
        counts.frames += 1;
        counts.bytes += len as u64;
    }
    Ok(counts)
}

fn run(p: &NetParams, timeout_ms: u64) -> Result<Outcome, VirtioError> {
    let mut net = Net::open(p, timeout_ms)?;
    let m = net.mac;
    crate::chatter!(
        "virtio-net {}: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        net.device.pci.bdf,
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5]
    );
    let mut hist = Histogram::new();
    let interrupts_before = net.device.interrupt_count();
    let start = now_ns();
    let (ring, counts) = ring3::run_workload_code(|| {
        let counts = match p.dir {
            NetDir::Echo => run_echo(&mut net, p, &mut hist),
            NetDir::Tx => run_tx(&mut net, p),
            NetDir::Rx => run_rx(&mut net, p),
        };
        (ring3::current_ring(), counts)
    });
    let counts = counts?;
    let elapsed_ns = now_ns() - start;
    let pass = counts.errors == 0 && counts.frames == p.frames;
    let verify = match p.dir {
        NetDir::Echo if counts.errors == 0 => "ok",
        NetDir::Echo => "fail",
        _ => "n/a",
    };
    crate::println!(
        "RESULT {{\"workload\":\"net\",\"ring\":{},\"dir\":\"{}\",\"size\":{},\"mode\":\"{}\",\"vq\":\"{}\",\"frames\":{},\"ops\":{},\"bytes\":{},\"elapsed_ns\":{},\"lat_ns\":{},\"notifies\":{},\"interrupts\":{},\"errors\":{},\"verify\":\"{}\",\"pass\":{}}}",
        ring, p.dir.name(), p.size, p.mode.name(), net.device.layout().name(), counts.frames, counts.frames, counts.bytes, elapsed_ns, hist.json(),
        net.rx.notifies + net.tx.notifies, net.device.interrupt_count() - interrupts_before, counts.errors, verify, pass
    );
    Ok(if pass { Outcome::Pass } else { Outcome::Fail })
}

/// The `net` workload.
pub fn run_workload(p: &NetParams, timeout_ms: u64) -> Outcome {
    run(p, timeout_ms).unwrap_or_else(|error| report_error("net", &error))
}
