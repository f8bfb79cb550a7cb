//! The guest's two doors into config space, as bus devices sharing one [`PciRoot`]:
//!
//! * [`PciConfigIo`]: configuration mechanism #1 on ports 0xcf8..0xd00. A dword write to 0xcf8
//!   latches CONFIG_ADDRESS (bit 31 enable, bus 23:16, device 15:11, function 10:8, register
//!   7:2); accesses of any width at 0xcfc..0xd00 reach that register plus the byte offset.
//! * [`PciConfigMmio`]: ECAM, where the offset in the window is
//!   `bus << 20 | device << 15 | function << 12 | register`.
//!
//! Neither holds a lock while the root runs a config access, so a BAR move triggered by the
//! access can change the buses freely.

use std::sync::Arc;

use sluice_bus::{read_le, write_le, BusDevice};

use crate::config::{CONFIG_SPACE_SIZE, CONVENTIONAL_CONFIG_SIZE};
use crate::device::PciAddress;
use crate::root::PciRoot;

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc, 8 ports in all.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_PORT_LEN: u16 = 8;
/// CONFIG_ADDRESS bit 31: the data port performs config cycles.
pub const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of CONFIG_ADDRESS that hold state: enable, bus, device, function, dword register.
/// Bits 30:24 and 1:0 are reserved and read as zero.
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;
/// Port offsets inside the 8-port range.
const CONFIG_ADDRESS_LEN: u64 = 4;
const CONFIG_DATA_OFFSET: u64 = 4;
const CONFIG_DATA_LEN: u64 = 4;
/// ECAM bytes per bus.
const ECAM_BUS_SHIFT: u64 = 20;

fn address_from_parts(bus: u64, device: u64, function: u64) -> Option<PciAddress> {
    PciAddress::new(
        u8::try_from(bus).ok()?,
        u8::try_from(device).ok()?,
        u8::try_from(function).ok()?,
    )
    .ok()
}

/// Ports 0xcf8..0xd00: CONFIG_ADDRESS and CONFIG_DATA.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    config_address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self {
            root,
            config_address: 0,
        }
    }

    /// The function and register selected by CONFIG_ADDRESS plus `byte` (0..4), if enabled.
    fn target(&self, byte: u64) -> Option<(PciAddress, usize)> {
        if self.config_address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let a = u64::from(self.config_address);
        let address = address_from_parts((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 0x7)?;
        let register = ((a & 0xfc) + byte) as usize;
        (register < CONVENTIONAL_CONFIG_SIZE).then_some((address, register))
    }

    /// The byte offset into CONFIG_DATA of an access, if it stays inside the data dword.
    fn data_byte(offset: u64, len: usize) -> Option<u64> {
        let byte = offset.checked_sub(CONFIG_DATA_OFFSET)?;
        (byte + len as u64 <= CONFIG_DATA_LEN).then_some(byte)
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset < CONFIG_ADDRESS_LEN {
            let value = u64::from(self.config_address) >> (8 * offset);
            let fits = offset + data.len() as u64 <= CONFIG_ADDRESS_LEN;
            if fits {
                write_le(data, value);
            } else {
                data.fill(0xff);
            }
            return;
        }
        let target = Self::data_byte(offset, data.len()).and_then(|b| self.target(b));
        match target {
            Some((address, register)) => self.root.config_read(address, register, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset < CONFIG_ADDRESS_LEN {
            // Only a full dword write latches the address, like the chipsets this models.
            if offset == 0 && data.len() == 4 {
                self.config_address = (read_le(data) as u32) & CONFIG_ADDRESS_MASK;
            }
            return;
        }
        let target = Self::data_byte(offset, data.len()).and_then(|b| self.target(b));
        if let Some((address, register)) = target {
            self.root.config_write(address, register, data);
        }
    }
}

/// ECAM (memory-mapped enhanced configuration) window covering buses `0..bus_count`.
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
    bus_count: u16,
}

impl PciConfigMmio {
    /// `bus_count` (1..=256) must match the window size mapped on the bus (1 MiB per bus).
    pub fn new(root: Arc<PciRoot>, bus_count: u16) -> Self {
        Self {
            root,
            bus_count: bus_count.clamp(1, 256),
        }
    }

    /// Bytes the window spans.
    pub fn window_len(&self) -> u64 {
        u64::from(self.bus_count) << ECAM_BUS_SHIFT
    }

    fn target(&self, offset: u64, len: usize) -> Option<(PciAddress, usize)> {
        if offset >= self.window_len() {
            return None;
        }
        let register = (offset & 0xfff) as usize;
        if register + len > CONFIG_SPACE_SIZE {
            return None;
        }
        let address = address_from_parts(
            offset >> ECAM_BUS_SHIFT,
            (offset >> 15) & 0x1f,
            (offset >> 12) & 0x7,
        )?;
        Some((address, register))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match self.target(offset, data.len()) {
            Some((address, register)) => self.root.config_read(address, register, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some((address, register)) = self.target(offset, data.len()) {
            self.root.config_write(address, register, data);
        }
    }
}
