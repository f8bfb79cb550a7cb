//! The register file and the data paths of one 82540EM: what a register access does, the
//! interrupt logic, transmit on a TDT write and delivery of one received frame.
//!
//! The interrupt line is level-triggered: it is high while `ICR & IMS` is not zero (the
//! function's [`PciIntx`] carries one cause bit meaning exactly that). ICR latches causes
//! whether masked or not; reading ICR returns and clears them (82540EM semantics), writing
//! it clears the bits written. ITR (interrupt throttling) is stored and read back but not
//! enforced: sluice raises an interrupt per batch of work (one per TDT write, one per burst
//! of received frames), which is at most as often as the guest kicks or the tap delivers;
//! RDTR/RADV/TIDV/TADV (the delay timers) are treated the same way.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_dma::DmaSpace;
use sluice_pci::PciIntx;
use sluice_virtio::{DeviceMetrics, QueueMetrics};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::eeprom::{Eeprom, WireState};
use super::phy::{Phy, PHY_ADDRESS};
use super::regs::*;
use super::tx::{Descriptor, SavedTx, Step, TxAssembler, STATUS_OFFSET, STA_DD};
use crate::net::NetBackend;

/// Receive descriptor status / error bits.
const RXD_STA_DD: u8 = 1 << 0;
const RXD_STA_EOP: u8 = 1 << 1;
/// "Ignore checksum indication": sluice does not check received checksums.
const RXD_STA_IXSM: u8 = 1 << 2;
const RXD_ERR_RXE: u8 = 1 << 7;
/// Shortest frame on the wire without FCS (the hardware pads to it).
const MIN_FRAME: usize = 60;
const FCS_LEN: usize = 4;
/// Longest frame without LPE (with a VLAN tag), and with LPE (the 82540EM's 16 KiB).
const MAX_STANDARD_FRAME: usize = 1522;
const MAX_LONG_FRAME: usize = 16384;
/// Queue metrics indexes.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// A descriptor ring as the guest programmed it, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ring {
    base: u64,
    count: u32,
}

impl Ring {
    fn descriptor(&self, index: u32) -> Option<GuestAddress> {
        self.base
            .checked_add(u64::from(index) * DESCRIPTOR_LEN)
            .map(GuestAddress)
    }
}

/// What became of a frame offered to the receive path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rx {
    Delivered,
    /// The address filters refused it.
    Filtered,
    /// Not enough free descriptors: keep the frame and offer it again after RDT moves.
    NoBuffers,
    /// Receive is off, the frame is too long, or a buffer was outside guest memory.
    Dropped,
}

/// One 82540EM's state.
pub struct E1000Core {
    regs: Vec<u32>,
    eeprom: Eeprom,
    /// EECD bits the driver owns (request, write enable).
    eecd: u32,
    phy: Phy,
    mac: [u8; 6],
    io_addr: u32,
    bus_master: bool,
    tx: TxAssembler,
    intx: Arc<PciIntx>,
    dma: DmaSpace,
    backend: Arc<dyn NetBackend>,
    metrics: Arc<DeviceMetrics>,
    rx_wake: Option<Arc<EventFd>>,
    line_high: bool,
    /// Set while the VM is being saved or restored: received frames wait in the tap, so
    /// guest memory does not change under a snapshot.
    receive_held: bool,
}

/// What a snapshot keeps of the core: everything the guest programmed. The statistics
/// registers are in `regs` and carry on counting; the MAC goes with the NIC (a restoring
/// device takes the saved one, its EEPROM included).
#[derive(Serialize, Deserialize)]
pub struct SavedCore {
    regs: Vec<u32>,
    mac: [u8; 6],
    eecd: u32,
    eeprom: WireState,
    phy: Vec<u16>,
    io_addr: u32,
    tx: SavedTx,
}

impl std::fmt::Debug for E1000Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E1000Core")
            .field("mac", &self.mac)
            .field("icr", &self.reg(ICR))
            .field("ims", &self.reg(IMS))
            .finish_non_exhaustive()
    }
}

fn index(offset: u32) -> usize {
    (offset / 4) as usize
}

impl E1000Core {
    pub fn new(
        mac: [u8; 6],
        eeprom: Eeprom,
        intx: Arc<PciIntx>,
        dma: DmaSpace,
        backend: Arc<dyn NetBackend>,
        metrics: Arc<DeviceMetrics>,
    ) -> Self {
        let mut core = Self {
            regs: vec![0; index(MMIO_SIZE as u32)],
            eeprom,
            eecd: 0,
            phy: Phy::default(),
            mac,
            io_addr: 0,
            bus_master: false,
            tx: TxAssembler::default(),
            intx,
            dma,
            backend,
            metrics,
            rx_wake: None,
            line_high: false,
            receive_held: false,
        };
        core.reset();
        core
    }

    /// Signalled whenever receiving may have become possible (RDT, RCTL written, reset).
    pub fn set_rx_wake(&mut self, wake: Arc<EventFd>) {
        self.rx_wake = Some(wake);
    }

    /// The command register's Bus Master Enable: without it the function does no DMA.
    pub fn set_bus_master(&mut self, enabled: bool) {
        self.bus_master = enabled;
        if enabled {
            self.wake_rx();
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Holds received frames in the tap (`true`) or lets them in again.
    pub fn hold_receive(&mut self, held: bool) {
        self.receive_held = held;
        if !held {
            self.wake_rx();
        }
    }

    pub fn save(&self) -> SavedCore {
        SavedCore {
            regs: self.regs.clone(),
            mac: self.mac,
            eecd: self.eecd,
            eeprom: self.eeprom.wire_state(),
            phy: self.phy.registers(),
            io_addr: self.io_addr,
            tx: self.tx.save(),
        }
    }

    /// Puts back a [`SavedCore`]; `eeprom_for` builds the EEPROM image of the saved MAC.
    /// Registers keep the masks their writes apply, so a saved state holds nothing a driver
    /// could not have written.
    pub fn restore(
        &mut self,
        saved: &SavedCore,
        eeprom_for: impl FnOnce([u8; 6]) -> Eeprom,
        bus_master: bool,
    ) -> Result<(), String> {
        if saved.regs.len() != self.regs.len() {
            return Err(format!(
                "{} registers saved, not {}",
                saved.regs.len(),
                self.regs.len()
            ));
        }
        let phy = Phy::from_registers(&saved.phy)?;
        let tx = TxAssembler::restored(&saved.tx)?;
        let mut eeprom = eeprom_for(saved.mac);
        eeprom.set_wire_state(saved.eeprom)?;
        self.regs.copy_from_slice(&saved.regs);
        for (offset, mask) in [
            (RDBAL, !0xf),
            (TDBAL, !0xf),
            (RDLEN, RING_LEN_MASK),
            (TDLEN, RING_LEN_MASK),
            (RDH, 0xffff),
            (RDT, 0xffff),
            (TDH, 0xffff),
            (TDT, 0xffff),
            (ICR, ICR_VALID),
            (IMS, ICR_VALID),
        ] {
            self.set_reg(offset, self.reg(offset) & mask);
        }
        (self.mac, self.eeprom, self.phy, self.tx) = (saved.mac, eeprom, phy, tx);
        self.eecd = saved.eecd & (EECD_REQ | 0x30);
        self.io_addr = saved.io_addr & (MMIO_SIZE as u32 - 4);
        self.bus_master = bus_master;
        self.line_high = false;
        self.intx.take();
        self.update_interrupt();
        Ok(())
    }

    fn reg(&self, offset: u32) -> u32 {
        self.regs[index(offset)]
    }

    fn set_reg(&mut self, offset: u32, value: u32) {
        self.regs[index(offset)] = value;
    }

    /// Power-on / CTRL.RST state: registers at their defaults, the MAC in receive address 0.
    fn reset(&mut self) {
        self.regs.fill(0);
        self.set_reg(CTRL, CTRL_SLU | (1 << 9));
        let ral = u32::from_le_bytes([self.mac[0], self.mac[1], self.mac[2], self.mac[3]]);
        let rah = u32::from(u16::from_le_bytes([self.mac[4], self.mac[5]])) | RAH_AV;
        self.set_reg(RAL0, ral);
        self.set_reg(RAH0, rah);
        self.eecd = 0;
        self.eeprom.write_eecd(0);
        self.phy = Phy::default();
        self.tx.reset();
        self.update_interrupt();
        self.wake_rx();
    }

    fn wake_rx(&self) {
        if let Some(wake) = &self.rx_wake {
            if let Err(e) = wake.write(1) {
                tracing::warn!("e1000: waking the receive worker failed: {e}");
            }
        }
    }

    /// A 32-bit read of the register at `offset` (BAR0, or IODATA).
    pub fn read(&mut self, offset: u32) -> u32 {
        if !offset.is_multiple_of(4) || u64::from(offset) >= MMIO_SIZE {
            return u32::MAX;
        }
        match offset {
            STATUS => STATUS_FD | STATUS_LU | STATUS_SPEED_1000,
            EECD => {
                let grant = if self.eecd & EECD_REQ != 0 {
                    EECD_GNT
                } else {
                    0
                };
                self.eecd | grant | EECD_PRES | self.eeprom.eecd_bits()
            }
            ICR => {
                let causes = self.reg(ICR);
                self.set_reg(ICR, 0);
                self.update_interrupt();
                causes
            }
            ICS | IMC => 0,
            STATS_START..STATS_END => std::mem::take(&mut self.regs[index(offset)]),
            _ => self.reg(offset),
        }
    }

    /// A 32-bit write of `value` to the register at `offset`.
    pub fn write(&mut self, offset: u32, value: u32) {
        if !offset.is_multiple_of(4) || u64::from(offset) >= MMIO_SIZE {
            return;
        }
        match offset {
            CTRL => self.write_ctrl(value),
            STATUS | STATS_START..STATS_END => {}
            EECD => {
                self.eecd = value & (EECD_REQ | 0x30);
                self.eeprom.write_eecd(value);
            }
            EERD => self.write_eerd(value),
            MDIC => self.write_mdic(value),
            ICR => self.clear_causes(value),
            ICS => self.raise(value),
            IMS => {
                self.set_reg(IMS, self.reg(IMS) | (value & ICR_VALID));
                self.update_interrupt();
            }
            IMC => {
                self.set_reg(IMS, self.reg(IMS) & !value);
                self.update_interrupt();
            }
            RCTL => {
                self.set_reg(RCTL, value);
                self.wake_rx();
            }
            TCTL => {
                self.set_reg(TCTL, value);
                self.transmit();
            }
            RDBAL | TDBAL => self.set_reg(offset, value & !0xf),
            RDLEN | TDLEN => self.set_reg(offset, value & RING_LEN_MASK),
            RDH | TDH => self.set_reg(offset, value & 0xffff),
            RDT => {
                self.set_reg(RDT, value & 0xffff);
                QueueMetrics::add(&self.metrics.queues[RX_QUEUE].kicks, 1);
                self.wake_rx();
            }
            TDT => {
                self.set_reg(TDT, value & 0xffff);
                QueueMetrics::add(&self.metrics.queues[TX_QUEUE].kicks, 1);
                self.transmit();
            }
            _ => self.set_reg(offset, value),
        }
    }

    /// The I/O BAR: IOADDR at 0 selects a register, IODATA at 4 reads or writes it.
    pub fn io_read(&mut self, offset: u64) -> u32 {
        match offset {
            0 => self.io_addr,
            4 => self.read(self.io_addr),
            _ => u32::MAX,
        }
    }

    pub fn io_write(&mut self, offset: u64, value: u32) {
        match offset {
            0 => self.io_addr = value & (MMIO_SIZE as u32 - 4),
            4 => self.write(self.io_addr, value),
            _ => {}
        }
    }

    fn write_ctrl(&mut self, value: u32) {
        if value & CTRL_RST != 0 {
            self.reset();
            return;
        }
        if value & CTRL_PHY_RST != 0 {
            self.phy = Phy::default();
        }
        self.set_reg(CTRL, value);
    }

    fn write_eerd(&mut self, value: u32) {
        if value & EERD_START == 0 {
            return;
        }
        let address = (value >> 8) & 0xff;
        // An address past the 64 words reads as erased; DONE is always set so a driver that
        // waits for it never hangs.
        let data = self.eeprom.word(address as usize).unwrap_or(0xffff);
        self.set_reg(EERD, (u32::from(data) << 16) | (address << 8) | EERD_DONE);
    }

    fn write_mdic(&mut self, value: u32) {
        let register = ((value >> 16) & 0x1f) as usize;
        let phy_address = (value >> 21) & 0x1f;
        let op = value & (3 << 26);
        let mut result = value & !(MDIC_READY | MDIC_ERROR);
        if phy_address != PHY_ADDRESS || (op != MDIC_OP_READ && op != MDIC_OP_WRITE) {
            result |= MDIC_ERROR;
        } else if op == MDIC_OP_READ {
            result = (result & !0xffff) | u32::from(self.phy.read(register));
        } else {
            self.phy.write(register, value as u16);
        }
        self.set_reg(MDIC, result | MDIC_READY);
        if value & MDIC_INT_EN != 0 {
            self.raise(ICR_MDAC);
        }
    }

    /// Latches `causes` in ICR and updates the line.
    pub fn raise(&mut self, causes: u32) {
        self.set_reg(ICR, self.reg(ICR) | (causes & ICR_VALID));
        self.update_interrupt();
    }

    fn clear_causes(&mut self, causes: u32) {
        self.set_reg(ICR, self.reg(ICR) & !causes);
        self.update_interrupt();
    }

    fn update_interrupt(&mut self) {
        let high = self.reg(ICR) & self.reg(IMS) != 0;
        if high == self.line_high {
            return;
        }
        self.line_high = high;
        if high {
            self.intx.raise(1);
            self.metrics.count(COUNTER_INTERRUPTS, 1);
            // Also per direction, like a virtio queue's, by the causes that raised the line.
            let pending = self.reg(ICR) & self.reg(IMS);
            for (queue, causes) in [
                (RX_QUEUE, ICR_RXT0 | ICR_RXDMT0 | ICR_RXO),
                (TX_QUEUE, ICR_TXDW | ICR_TXQE),
            ] {
                if pending & causes != 0 {
                    QueueMetrics::add(&self.metrics.queues[queue].interrupts, 1);
                }
            }
        } else {
            self.intx.take();
        }
    }

    /// Whether the interrupt line is asserted (ICR & IMS != 0).
    pub fn interrupt_pending(&self) -> bool {
        self.line_high
    }

    fn ring(&self, bal: u32, bah: u32, len: u32) -> Option<Ring> {
        let len = self.reg(len);
        if len == 0 || !len.is_multiple_of(RING_LEN_ALIGN) {
            return None;
        }
        let base = (u64::from(self.reg(bah)) << 32) | u64::from(self.reg(bal));
        Some(Ring {
            base,
            count: len / DESCRIPTOR_LEN as u32,
        })
    }

    fn add_stat(&mut self, offset: u32, n: u64) {
        let low = &mut self.regs[index(offset)];
        let (sum, carry) = low.overflowing_add(n as u32);
        *low = sum;
        let is_pair = matches!(offset, GORCL | GOTCL | TORL | TOTL);
        if is_pair {
            let high = &mut self.regs[index(offset + 4)];
            *high = high
                .wrapping_add((n >> 32) as u32)
                .wrapping_add(u32::from(carry));
        }
    }

    // ---- transmit --------------------------------------------------------------------------

    /// Sends what lies between TDH and TDT. Each descriptor is looked at once per call, so a
    /// ring that never ends (or a TDT the driver keeps moving) cannot hold the vCPU longer
    /// than one pass over the ring.
    fn transmit(&mut self) {
        if self.reg(TCTL) & TCTL_EN == 0 || !self.bus_master {
            return;
        }
        let Some(ring) = self.ring(TDBAL, TDBAH, TDLEN) else {
            return;
        };
        let (mut head, tail) = (self.reg(TDH), self.reg(TDT));
        if head >= ring.count || tail >= ring.count {
            return;
        }
        let vlan = self.reg(CTRL) & CTRL_VME != 0;
        let mut processed = 0;
        while head != tail && processed < ring.count {
            let Some(addr) = ring.descriptor(head) else {
                break;
            };
            let mut raw = [0u8; DESCRIPTOR_LEN as usize];
            if self.dma.read_slice(&mut raw, addr).is_err() {
                tracing::debug!("e1000: TX descriptor {head} at {addr:#x?} is outside memory");
                break;
            }
            let descriptor = Descriptor::decode(&raw);
            let dma = &self.dma;
            let step = self.tx.push(&descriptor, vlan, &mut |at, buf| {
                dma.read_slice(buf, GuestAddress(at)).is_ok()
            });
            match step {
                Step::Continue => {}
                Step::Frame => self.send_frame(),
                Step::Dropped(why) => {
                    tracing::debug!("e1000: TX frame dropped: {why}");
                    QueueMetrics::add(&self.metrics.queues[TX_QUEUE].errors, 1);
                    self.tx.clear();
                }
            }
            if descriptor.report_status() {
                let status_addr = GuestAddress(addr.0 + STATUS_OFFSET);
                let status = self.dma.read_obj::<u8>(status_addr).unwrap_or(0);
                sluice_dma::dirty::mark_on(&self.dma, status_addr.0, 1);
                let _ = self.dma.write_obj(status | STA_DD, status_addr);
            }
            head = (head + 1) % ring.count;
            processed += 1;
        }
        self.set_reg(TDH, head);
        if processed > 0 {
            let empty = if head == tail { ICR_TXQE } else { 0 };
            self.raise(ICR_TXDW | empty);
        }
    }

    fn send_frame(&mut self) {
        let packet = self.tx.packet();
        let frame_len = self.tx.frame_len();
        let destination = packet.get(crate::net::NET_HDR_LEN);
        let metrics = &self.metrics.queues[TX_QUEUE];
        match self.backend.write_packet(0, packet) {
            Ok(()) => {
                if packet[0] != 0 {
                    self.metrics.count(COUNTER_TX_CSUM, 1);
                }
                if packet[1] != 0 {
                    self.metrics.count(COUNTER_TX_GSO, 1);
                }
                let multicast = destination.is_some_and(|b| b & 1 != 0);
                let broadcast = packet[crate::net::NET_HDR_LEN..].starts_with(&[0xff; 6]);
                QueueMetrics::add(&metrics.requests, 1);
                QueueMetrics::add(&metrics.bytes, frame_len as u64);
                let octets = (frame_len + FCS_LEN) as u64;
                self.add_stat(GPTC, 1);
                self.add_stat(TPT, 1);
                self.add_stat(GOTCL, octets);
                self.add_stat(TOTL, octets);
                if broadcast {
                    self.add_stat(BPTC, 1);
                } else if multicast {
                    self.add_stat(MPTC, 1);
                }
            }
            Err(e) => {
                tracing::debug!("e1000: tap write failed: {e}");
                QueueMetrics::add(&metrics.errors, 1);
            }
        }
        self.tx.clear();
    }

    // ---- receive ---------------------------------------------------------------------------

    fn receive_enabled(&self) -> bool {
        self.reg(RCTL) & RCTL_EN != 0 && self.bus_master
    }

    fn buffer_size(&self) -> usize {
        let rctl = self.reg(RCTL);
        let code = (rctl >> RCTL_BSIZE_SHIFT) & 3;
        match (rctl & RCTL_BSEX != 0, code) {
            (false, 0) => 2048,
            (false, 1) => 1024,
            (false, 2) => 512,
            (false, _) => 256,
            // BSEX with code 0 is reserved; treat it as the base size.
            (true, 0) => 2048,
            (true, 1) => 16384,
            (true, 2) => 8192,
            (true, _) => 4096,
        }
    }

    /// Descriptors the device owns (RDH up to, not including, RDT); `None` if the ring or
    /// its pointers are invalid.
    fn rx_free(&self, ring: &Ring) -> Option<u32> {
        let (head, tail) = (self.reg(RDH), self.reg(RDT));
        if head >= ring.count || tail >= ring.count {
            return None;
        }
        Some((tail + ring.count - head) % ring.count)
    }

    fn multicast_hash(&self, address: &[u8]) -> u32 {
        let (a4, a5) = (u32::from(address[4]), u32::from(address[5]));
        let hash = match (self.reg(RCTL) >> RCTL_MO_SHIFT) & 3 {
            0 => (a4 >> 4) | (a5 << 4),
            1 => (a4 >> 3) | (a5 << 5),
            2 => (a4 >> 2) | (a5 << 6),
            _ => a4 | (a5 << 8),
        };
        hash & 0xfff
    }

    fn matches_receive_address(&self, destination: &[u8]) -> bool {
        (0..RA_ENTRIES).any(|i| {
            let high = self.reg(RAH0 + 8 * i);
            if high & RAH_AV == 0 {
                return false;
            }
            let low = self.reg(RAL0 + 8 * i).to_le_bytes();
            let high = high.to_le_bytes();
            destination[..4] == low && destination[4..6] == high[..2]
        })
    }

    /// The address filters: exact matches in RAL/RAH, promiscuous modes, broadcast, the
    /// multicast table.
    fn accepts(&self, frame: &[u8]) -> bool {
        let rctl = self.reg(RCTL);
        let destination = &frame[..6];
        if self.matches_receive_address(destination) {
            return true;
        }
        if destination[0] & 1 == 0 {
            return rctl & RCTL_UPE != 0;
        }
        if rctl & RCTL_MPE != 0 {
            return true;
        }
        if destination == [0xff; 6] {
            return rctl & RCTL_BAM != 0;
        }
        let hash = self.multicast_hash(destination);
        self.reg(MTA + 4 * (hash >> 5)) & (1 << (hash & 31)) != 0
    }

    /// Whether a frame offered now could be placed (the worker uses it to decide whether to
    /// read the tap at all).
    pub fn can_receive(&self) -> bool {
        if self.receive_held {
            return false;
        }
        if !self.receive_enabled() {
            return true; // frames are read and dropped, as the wire would
        }
        self.ring(RDBAL, RDBAH, RDLEN)
            .and_then(|ring| self.rx_free(&ring))
            .is_some_and(|free| free > 0)
    }

    /// Offers one received frame (without FCS) to the guest.
    pub fn receive(&mut self, frame: &[u8]) -> Rx {
        if self.receive_held {
            return Rx::NoBuffers;
        }
        if !self.receive_enabled() || frame.len() < crate::net::header::ETH_HLEN {
            return Rx::Dropped;
        }
        if !self.accepts(frame) {
            return Rx::Filtered;
        }
        let rctl = self.reg(RCTL);
        let longest = if rctl & RCTL_LPE != 0 {
            MAX_LONG_FRAME
        } else {
            MAX_STANDARD_FRAME
        };
        if frame.len() > longest {
            self.add_stat(ROC, 1);
            return Rx::Dropped;
        }
        let Some(ring) = self.ring(RDBAL, RDBAH, RDLEN) else {
            return Rx::NoBuffers;
        };
        let Some(free) = self.rx_free(&ring) else {
            return Rx::NoBuffers;
        };
        // On the wire the frame is padded to 60 bytes and carries an FCS the driver strips
        // (Linux's e1000 always removes 4 bytes) unless SECRC asks the device to.
        let mut data = frame.to_vec();
        if data.len() < MIN_FRAME {
            data.resize(MIN_FRAME, 0);
        }
        if rctl & RCTL_SECRC == 0 {
            let fcs = crc32(&data);
            data.extend_from_slice(&fcs.to_le_bytes());
        }
        let buffer = self.buffer_size();
        let needed = data.len().div_ceil(buffer) as u32;
        if needed > free {
            self.add_stat(RNBC, 1);
            if needed >= ring.count {
                // Would never fit this ring: drop rather than wait forever.
                self.add_stat(MPC, 1);
                return Rx::Dropped;
            }
            return Rx::NoBuffers;
        }
        let delivered = self.write_rx_descriptors(&ring, &data, buffer);
        let left = free - needed;
        let threshold = ring.count >> (1 + ((rctl >> RCTL_RDMTS_SHIFT) & 3).min(2));
        let low = if left <= threshold { ICR_RXDMT0 } else { 0 };
        self.raise(ICR_RXT0 | low);
        if !delivered {
            QueueMetrics::add(&self.metrics.queues[RX_QUEUE].errors, 1);
            return Rx::Dropped;
        }
        self.count_received(frame, data.len());
        Rx::Delivered
    }

    /// Fills descriptors from RDH with `data`; false if a buffer was outside guest memory
    /// (that descriptor is completed with RXE and the rest of the frame is dropped).
    fn write_rx_descriptors(&mut self, ring: &Ring, data: &[u8], buffer: usize) -> bool {
        let mut head = self.reg(RDH);
        let mut ok = true;
        let chunks: Vec<&[u8]> = data.chunks(buffer).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let Some(descriptor) = ring.descriptor(head) else {
                ok = false;
                break;
            };
            let eop = i + 1 == chunks.len();
            let address = self.dma.read_obj::<u64>(descriptor).ok();
            let written = address.is_some_and(|a| {
                sluice_dma::dirty::mark_on(&self.dma, a, chunk.len() as u64);
                self.dma.write_slice(chunk, GuestAddress(a)).is_ok()
            });
            let mut status = RXD_STA_DD | RXD_STA_IXSM;
            if eop || !written {
                status |= RXD_STA_EOP;
            }
            let errors = if written { 0 } else { RXD_ERR_RXE };
            let mut upper = [0u8; 8];
            upper[..2].copy_from_slice(&(chunk.len() as u16).to_le_bytes());
            upper[4] = status;
            upper[5] = errors;
            sluice_dma::dirty::mark_on(&self.dma, descriptor.0 + 8, upper.len() as u64);
            let _ = self.dma.write_slice(&upper, GuestAddress(descriptor.0 + 8));
            head = (head + 1) % ring.count;
            if !written {
                ok = false;
                break;
            }
        }
        self.set_reg(RDH, head);
        ok
    }

    fn count_received(&mut self, frame: &[u8], octets: usize) {
        let metrics = &self.metrics.queues[RX_QUEUE];
        QueueMetrics::add(&metrics.requests, 1);
        QueueMetrics::add(&metrics.bytes, frame.len() as u64);
        self.add_stat(GPRC, 1);
        self.add_stat(TPR, 1);
        self.add_stat(GORCL, octets as u64);
        self.add_stat(TORL, octets as u64);
        if frame[..6] == [0xff; 6] {
            self.add_stat(BPRC, 1);
        } else if frame[0] & 1 != 0 {
            self.add_stat(MPRC, 1);
        }
    }

    /// Counts one register access for the per-register exit counters.
    pub fn count_exit(&self, counter: usize) {
        self.metrics.count(counter, 1);
    }

    pub fn metrics(&self) -> &Arc<DeviceMetrics> {
        &self.metrics
    }

    /// Frames sent so far (for tests).
    pub fn frames_sent(&self) -> u64 {
        self.metrics.queues[TX_QUEUE]
            .requests
            .load(Ordering::Relaxed)
    }
}

/// IEEE 802.3 CRC-32 (the FCS) lookup table, built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The FCS of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(u32::MAX, |crc, &byte| {
        CRC_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8)
    })
}
