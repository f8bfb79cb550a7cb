//! Intel 82540EM ("e1000") driver: legacy descriptors, one transmit and one receive ring,
//! polled (interrupts stay masked: the kit routes no INTx, and in ring 3 polling the DD bits
//! in memory costs no exit while every register access is one). Setup follows the manual's
//! init sequence (CTRL.RST, MAC from the EEPROM via EERD, link up with CTRL.SLU, RAL/RAH, MTA,
//! rings, RCTL/TCTL). It runs the shared net workloads (workloads/net.rs) as `w=e1000`.

use crate::cmdline::NetParams;
use crate::mem;
use crate::pci::{self, Device, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::time::Deadline;
use crate::workloads::net::{self as workload, NetPort};
use crate::workloads::Outcome;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

const VENDOR_INTEL: u16 = 0x8086;
const DEVICE_82540EM: u16 = 0x100e;

const CTRL: u64 = 0x0000;
const STATUS: u64 = 0x0008;
const EERD: u64 = 0x0014;
const ICR: u64 = 0x00c0;
const IMC: u64 = 0x00d8;
const RCTL: u64 = 0x0100;
const TCTL: u64 = 0x0400;
const TIPG: u64 = 0x0410;
const RDBAL: u64 = 0x2800;
const RDBAH: u64 = 0x2804;
const RDLEN: u64 = 0x2808;
const RDH: u64 = 0x2810;
const RDT: u64 = 0x2818;
const TDBAL: u64 = 0x3800;
const TDBAH: u64 = 0x3804;
const TDLEN: u64 = 0x3808;
const TDH: u64 = 0x3810;
const TDT: u64 = 0x3818;
const MTA: u64 = 0x5200;
const RAL0: u64 = 0x5400;
const RAH0: u64 = 0x5404;

const CTRL_SLU: u32 = 1 << 6;
const CTRL_RST: u32 = 1 << 26;
const STATUS_LU: u32 = 1 << 1;
const EERD_START: u32 = 1 << 0;
const EERD_DONE: u32 = 1 << 4;
const RCTL_EN: u32 = 1 << 1;
const RCTL_BAM: u32 = 1 << 15;
/// Strip the FCS, so the descriptor length is the frame's.
const RCTL_SECRC: u32 = 1 << 26;
const TCTL_EN: u32 = 1 << 1;
const TCTL_PSP: u32 = 1 << 3;
const TCTL_CT: u32 = 0x10 << 4;
const TCTL_COLD: u32 = 0x40 << 12;
const RAH_AV: u32 = 1 << 31;

const CMD_EOP: u8 = 1 << 0;
const CMD_IFCS: u8 = 1 << 1;
const CMD_RS: u8 = 1 << 3;
const STA_DD: u8 = 1 << 0;

const TX_DESCRIPTORS: u32 = 32;
const RX_DESCRIPTORS: u32 = 64;
const DESCRIPTOR_LEN: u64 = 16;
const BUF_LEN: u64 = 2048;
/// Received descriptors handed back with one RDT write.
const RX_REFILL_BATCH: u32 = 8;

/// Why the NIC could not be used.
#[derive(Debug)]
#[allow(
    dead_code,
    reason = "the fields are read through Debug, in the workload's failure line"
)]
pub enum E1000Error {
    NotFound,
    BadBar,
    NoMemory,
    ResetTimeout,
    NoLink,
    Timeout(&'static str),
}

struct E1000 {
    pci: Device,
    regs: u64,
    mac: [u8; 6],
    tx_ring: u64,
    rx_ring: u64,
    tx_buffers: Vec<u64>,
    rx_buffers: Vec<u64>,
    tx_tail: u32,
    tx_clean: u32,
    rx_next: u32,
    rx_unreturned: u32,
    /// Register writes that start work (TDT, RDT): the e1000's doorbells.
    notifies: u64,
    timeout_ms: u64,
}

impl E1000 {
    fn read(&self, register: u64) -> u32 {
        // SAFETY: `regs` is BAR0 (128 KiB of registers, identity-mapped, user-accessible) and
        // every offset used is a register inside it.
        unsafe { core::ptr::read_volatile((self.regs + register) as *const u32) }
    }

    fn write(&self, register: u64, value: u32) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((self.regs + register) as *mut u32, value) }
    }

    fn open(p: &NetParams, timeout_ms: u64) -> Result<Self, E1000Error> {
        let pci = pci::devices()
            .iter()
            .filter(|d| d.vendor == VENDOR_INTEL && d.device == DEVICE_82540EM)
            .nth(p.dev)
            .ok_or(E1000Error::NotFound)?
            .clone();
        let bar = pci.bars[0];
        if bar.is_io || bar.addr == 0 || bar.size < 0x2_0000 {
            return Err(E1000Error::BadBar);
        }
        pci.set_command_bits(COMMAND_MEMORY | COMMAND_BUS_MASTER);
        let alloc = |n: u32| {
            (0..n)
                .map(|_| mem::alloc_dma(BUF_LEN))
                .collect::<Option<Vec<u64>>>()
        };
        let mut nic = E1000 {
            regs: bar.addr,
            mac: [0; 6],
            tx_ring: mem::alloc_dma(u64::from(TX_DESCRIPTORS) * DESCRIPTOR_LEN)
                .ok_or(E1000Error::NoMemory)?,
            rx_ring: mem::alloc_dma(u64::from(RX_DESCRIPTORS) * DESCRIPTOR_LEN)
                .ok_or(E1000Error::NoMemory)?,
            tx_buffers: alloc(TX_DESCRIPTORS).ok_or(E1000Error::NoMemory)?,
            rx_buffers: alloc(RX_DESCRIPTORS).ok_or(E1000Error::NoMemory)?,
            tx_tail: 0,
            tx_clean: 0,
            rx_next: 0,
            rx_unreturned: 0,
            notifies: 0,
            timeout_ms,
            pci,
        };
        nic.reset()?;
        nic.read_mac()?;
        nic.bring_link_up()?;
        nic.setup_filters();
        nic.setup_tx();
        nic.setup_rx();
        Ok(nic)
    }

    fn reset(&self) -> Result<(), E1000Error> {
        self.write(IMC, u32::MAX);
        self.write(CTRL, self.read(CTRL) | CTRL_RST);
        let deadline = Deadline::after_ms(self.timeout_ms);
        while self.read(CTRL) & CTRL_RST != 0 {
            if deadline.expired() {
                return Err(E1000Error::ResetTimeout);
            }
            crate::arch::pause();
        }
        // Masks are reset too; keep every cause masked (the driver polls) and clear ICR.
        self.write(IMC, u32::MAX);
        self.read(ICR);
        Ok(())
    }

    fn eeprom_word(&self, address: u32) -> Result<u16, E1000Error> {
        self.write(EERD, (address << 8) | EERD_START);
        let deadline = Deadline::after_ms(self.timeout_ms);
        loop {
            let value = self.read(EERD);
            if value & EERD_DONE != 0 {
                return Ok((value >> 16) as u16);
            }
            if deadline.expired() {
                return Err(E1000Error::Timeout("eeprom"));
            }
        }
    }

    fn read_mac(&mut self) -> Result<(), E1000Error> {
        for word in 0..3 {
            let bytes = self.eeprom_word(word)?.to_le_bytes();
            self.mac[2 * word as usize..2 * word as usize + 2].copy_from_slice(&bytes);
        }
        Ok(())
    }

    fn bring_link_up(&self) -> Result<(), E1000Error> {
        self.write(CTRL, self.read(CTRL) | CTRL_SLU);
        let deadline = Deadline::after_ms(self.timeout_ms);
        while self.read(STATUS) & STATUS_LU == 0 {
            if deadline.expired() {
                return Err(E1000Error::NoLink);
            }
            crate::arch::pause();
        }
        Ok(())
    }

    fn setup_filters(&self) {
        let m = self.mac;
        self.write(RAL0, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        self.write(RAH0, u32::from(u16::from_le_bytes([m[4], m[5]])) | RAH_AV);
        for i in 0..128 {
            self.write(MTA + 4 * i, 0);
        }
    }

    fn setup_tx(&self) {
        for i in 0..u64::from(TX_DESCRIPTORS) {
            write_descriptor(self.tx_ring + i * DESCRIPTOR_LEN, 0, 0, 0, STA_DD);
        }
        self.write(TDBAL, self.tx_ring as u32);
        self.write(TDBAH, (self.tx_ring >> 32) as u32);
        self.write(TDLEN, TX_DESCRIPTORS * DESCRIPTOR_LEN as u32);
        self.write(TDH, 0);
        self.write(TDT, 0);
        self.write(TIPG, 10 | (8 << 10) | (6 << 20));
        self.write(TCTL, TCTL_EN | TCTL_PSP | TCTL_CT | TCTL_COLD);
    }

    fn setup_rx(&self) {
        for (i, &buffer) in self.rx_buffers.iter().enumerate() {
            write_descriptor(self.rx_ring + i as u64 * DESCRIPTOR_LEN, buffer, 0, 0, 0);
        }
        self.write(RDBAL, self.rx_ring as u32);
        self.write(RDBAH, (self.rx_ring >> 32) as u32);
        self.write(RDLEN, RX_DESCRIPTORS * DESCRIPTOR_LEN as u32);
        self.write(RDH, 0);
        self.write(RDT, RX_DESCRIPTORS - 1);
        // BSIZE 00 (2048 bytes), no long packets, broadcast accepted.
        self.write(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC);
    }

    fn tx_descriptor(&self, index: u32) -> u64 {
        self.tx_ring + u64::from(index) * DESCRIPTOR_LEN
    }

    fn rx_descriptor(&self, index: u32) -> u64 {
        self.rx_ring + u64::from(index) * DESCRIPTOR_LEN
    }

    /// Reclaims sent descriptors; returns how many.
    fn reap_tx(&mut self) -> u32 {
        let mut done = 0;
        while self.tx_clean != self.tx_tail
            && status(self.tx_descriptor(self.tx_clean)) & STA_DD != 0
        {
            self.tx_clean = (self.tx_clean + 1) % TX_DESCRIPTORS;
            done += 1;
        }
        done
    }

    fn tx_full(&self) -> bool {
        (self.tx_tail + 1) % TX_DESCRIPTORS == self.tx_clean
    }
}

/// Writes a legacy descriptor (the buffer address, length, command, status).
fn write_descriptor(at: u64, buffer: u64, len: u16, cmd: u8, status: u8) {
    let upper = u64::from(len) | (u64::from(cmd) << 24) | (u64::from(status) << 32);
    // SAFETY: `at` is a 16-byte descriptor inside a ring this driver allocated.
    unsafe {
        core::ptr::write_volatile(at as *mut u64, buffer);
        core::ptr::write_volatile((at + 8) as *mut u64, upper);
    }
}

fn status(descriptor: u64) -> u8 {
    // SAFETY: a descriptor of one of our rings; the device writes the status byte.
    let status = unsafe { core::ptr::read_volatile((descriptor + 12) as *const u8) };
    fence(Ordering::Acquire);
    status
}

fn descriptor_length(descriptor: u64) -> u16 {
    // SAFETY: as in `status`.
    unsafe { core::ptr::read_volatile((descriptor + 8) as *const u16) }
}

impl NetPort for E1000 {
    type Error = E1000Error;

    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), E1000Error> {
        let deadline = Deadline::after_ms(self.timeout_ms);
        while self.tx_full() {
            if self.reap_tx() == 0 {
                if deadline.expired() {
                    return Err(E1000Error::Timeout("e1000 tx"));
                }
                crate::arch::pause();
            }
        }
        let len = frame.len().min(BUF_LEN as usize);
        let buffer = self.tx_buffers[self.tx_tail as usize];
        // SAFETY: the buffer is BUF_LEN bytes of DMA memory this driver owns and the device is
        // not reading it (its descriptor is past TDT).
        unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), buffer as *mut u8, len) };
        let descriptor = self.tx_descriptor(self.tx_tail);
        write_descriptor(
            descriptor,
            buffer,
            len as u16,
            CMD_EOP | CMD_IFCS | CMD_RS,
            0,
        );
        fence(Ordering::Release);
        self.tx_tail = (self.tx_tail + 1) % TX_DESCRIPTORS;
        self.write(TDT, self.tx_tail);
        self.notifies += 1;
        Ok(())
    }

    fn receive<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Result<T, E1000Error> {
        let deadline = Deadline::after_ms(self.timeout_ms);
        let descriptor = self.rx_descriptor(self.rx_next);
        while status(descriptor) & STA_DD == 0 {
            self.reap_tx();
            if deadline.expired() {
                return Err(E1000Error::Timeout("e1000 rx"));
            }
            crate::arch::pause();
        }
        let len = u64::from(descriptor_length(descriptor)).min(BUF_LEN) as usize;
        let buffer = self.rx_buffers[self.rx_next as usize];
        // SAFETY: the device completed this descriptor: `len` bytes of our buffer are a frame.
        let frame = unsafe { core::slice::from_raw_parts(buffer as *const u8, len) };
        let result = f(frame);
        write_descriptor(descriptor, buffer, 0, 0, 0);
        self.rx_unreturned += 1;
        if self.rx_unreturned >= RX_REFILL_BATCH {
            fence(Ordering::Release);
            self.write(RDT, self.rx_next);
            self.notifies += 1;
            self.rx_unreturned = 0;
        }
        self.rx_next = (self.rx_next + 1) % RX_DESCRIPTORS;
        Ok(result)
    }

    fn drain_tx(&mut self) -> Result<(), E1000Error> {
        let deadline = Deadline::after_ms(self.timeout_ms);
        while self.tx_clean != self.tx_tail {
            if self.reap_tx() == 0 {
                if deadline.expired() {
                    return Err(E1000Error::Timeout("e1000 tx drain"));
                }
                crate::arch::pause();
            }
        }
        Ok(())
    }

    fn timeout(what: &'static str) -> E1000Error {
        E1000Error::Timeout(what)
    }
}

fn run(p: &NetParams, timeout_ms: u64) -> Result<Outcome, E1000Error> {
    let mut nic = E1000::open(p, timeout_ms)?;
    let m = nic.mac;
    crate::chatter!(
        "e1000 {}: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        nic.pci.bdf,
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5]
    );
    let measured = workload::run(&mut nic, p)?;
    Ok(workload::report(
        "e1000",
        p,
        &measured,
        "\"nic\":\"e1000\"",
        nic.notifies,
        0,
    ))
}

/// The `e1000` workload: the net workload on an 82540EM.
pub fn run_workload(p: &NetParams, timeout_ms: u64) -> Outcome {
    run(p, timeout_ms).unwrap_or_else(|error| {
        let text = alloc::format!("{:?}", error).replace('"', "'");
        crate::say!("e1000: device error {}", text);
        crate::println!(
            "RESULT {{\"workload\":\"e1000\",\"error\":\"{}\",\"pass\":false}}",
            text
        );
        match error {
            E1000Error::Timeout(_) => Outcome::Timeout,
            _ => Outcome::Fail,
        }
    })
}
