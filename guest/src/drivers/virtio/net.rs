//! virtio-net (§5.1) without offloads: queue 0 receives, queue 1 transmits, every buffer
//! carries the 12-byte `virtio_net_hdr` (VERSION_1 layout, all zero on transmit). The workload
//! itself (frames, tx / rx / echo, RESULT) is shared with the e1000 driver: workloads/net.rs.

use super::pci::{self as vpci, VirtioError, VirtioPci};
use super::queue::{Queue, Segment};
use super::{idle, report_error};
use crate::cmdline::{Mode, NetParams};
use crate::mem;
use crate::time::Deadline;
use crate::workloads::net::{self as workload, NetPort};
use crate::workloads::Outcome;
use alloc::vec::Vec;

const F_MAC: u64 = 1 << 5;
const HDR_LEN: u64 = 12;
const BUF_LEN: u64 = 2048;
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
            if crate::time::is_virtual() {
                // A deterministic VMM (record and replay, docs/replay.md) lets frames in only
                // at an exit the guest makes: ring the RX doorbell so it looks at its backend.
                self.rx.notify();
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

impl NetPort for Net {
    type Error = VirtioError;

    fn mac(&self) -> [u8; 6] {
        self.mac
    }
    fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }
    fn send(&mut self, frame: &[u8]) -> Result<(), VirtioError> {
        Net::send(self, frame)
    }
    fn receive<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Result<T, VirtioError> {
        Net::receive(self, f)
    }
    fn drain_tx(&mut self) -> Result<(), VirtioError> {
        Net::drain_tx(self)
    }
    fn timeout(what: &'static str) -> VirtioError {
        VirtioError::Timeout(what)
    }
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
    let interrupts_before = net.device.interrupt_count();
    let measured = workload::run(&mut net, p)?;
    let transport = alloc::format!("\"vq\":\"{}\"", net.device.layout().name());
    Ok(workload::report(
        "net",
        p,
        &measured,
        &transport,
        net.rx.notifies + net.tx.notifies,
        net.device.interrupt_count() - interrupts_before,
    ))
}

/// The `net` workload.
pub fn run_workload(p: &NetParams, timeout_ms: u64) -> Outcome {
    run(p, timeout_ms).unwrap_or_else(|error| report_error("net", &error))
}
