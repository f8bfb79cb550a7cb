//! PCI configuration access (ECAM from MCFG, else the 0xCF8/0xCFC ports), enumeration that
//! follows bridges, BAR sizing and capability lists. Prints one `PCI:` line per function.

use crate::arch::{inl, outl};
use crate::phys;
use alloc::vec::Vec;

// Copies (guest/ is its own no_std workspace) of `CONFIG_ADDRESS_PORT` in
// crates/pci/src/access.rs; CONFIG_DATA is 4 ports above it.
const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
pub const COMMAND: u16 = 0x04;
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const MAX_BUSES_VISITED: usize = 64;

/// Bus/device/function.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// How configuration space is reached.
#[derive(Clone, Copy)]
pub enum ConfigAccess {
    Ecam {
        base: u64,
        start_bus: u8,
        end_bus: u8,
    },
    Ports,
}

static ACCESS: crate::global::Global<ConfigAccess> = crate::global::Global::new();

fn access() -> ConfigAccess {
    ACCESS.get().copied().unwrap_or(ConfigAccess::Ports)
}

fn ecam_address(base: u64, start_bus: u8, bdf: Bdf, offset: u16) -> u64 {
    base + ((u64::from(bdf.bus - start_bus)) << 20)
        + (u64::from(bdf.device) << 15)
        + (u64::from(bdf.function) << 12)
        + u64::from(offset & 0xffc)
}

fn port_address(bdf: Bdf, offset: u16) -> u32 {
    0x8000_0000
        | (u32::from(bdf.bus) << 16)
        | (u32::from(bdf.device) << 11)
        | (u32::from(bdf.function) << 8)
        | u32::from(offset & 0xfc)
}

/// Reads the aligned dword containing `offset`.
pub fn read32(bdf: Bdf, offset: u16) -> u32 {
    match access() {
        ConfigAccess::Ecam {
            base,
            start_bus,
            end_bus,
        } => {
            if bdf.bus < start_bus || bdf.bus > end_bus {
                return u32::MAX;
            }
            phys::mmio_read32(ecam_address(base, start_bus, bdf, offset))
        }
        ConfigAccess::Ports => {
            if offset >= 256 {
                return u32::MAX;
            }
            outl(CONFIG_ADDRESS, port_address(bdf, offset));
            inl(CONFIG_DATA)
        }
    }
}

/// Writes the aligned dword containing `offset`.
pub fn write32(bdf: Bdf, offset: u16, value: u32) {
    match access() {
        ConfigAccess::Ecam {
            base,
            start_bus,
            end_bus,
        } => {
            if bdf.bus >= start_bus && bdf.bus <= end_bus {
                phys::mmio_write32(ecam_address(base, start_bus, bdf, offset), value);
            }
        }
        ConfigAccess::Ports => {
            if offset < 256 {
                outl(CONFIG_ADDRESS, port_address(bdf, offset));
                outl(CONFIG_DATA, value);
            }
        }
    }
}

pub fn read16(bdf: Bdf, offset: u16) -> u16 {
    (read32(bdf, offset) >> ((offset & 2) * 8)) as u16
}

pub fn read8(bdf: Bdf, offset: u16) -> u8 {
    (read32(bdf, offset) >> ((offset & 3) * 8)) as u8
}

/// 16-bit write as read-modify-write of the dword. Only used for registers (command, MSI-X
/// control) whose neighbouring half is read-only or write-1-to-clear-free in the dword.
pub fn write16(bdf: Bdf, offset: u16, value: u16) {
    let shift = (offset & 2) * 8;
    let old = read32(bdf, offset & !3);
    let mask = 0xffffu32 << shift;
    let new = (old & !mask) | (u32::from(value) << shift);
    write32(bdf, offset & !3, new);
}

/// A sized BAR.
#[derive(Clone, Copy, Default, Debug)]
pub struct Bar {
    pub addr: u64,
    pub size: u64,
    pub is_io: bool,
}

/// One enumerated function.
#[derive(Clone, Debug)]
pub struct Device {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub bars: [Bar; 6],
}

impl Device {
    /// Offsets of capabilities with id `id`.
    pub fn capabilities(&self, id: u8) -> Vec<u16> {
        let mut found = Vec::new();
        if read16(self.bdf, 0x06) & STATUS_CAPABILITIES == 0 {
            return found;
        }
        let mut pointer = u16::from(read8(self.bdf, 0x34) & 0xfc);
        let mut hops = 0;
        while pointer >= 0x40 && hops < 48 {
            if read8(self.bdf, pointer) == id {
                found.push(pointer);
            }
            pointer = u16::from(read8(self.bdf, pointer + 1) & 0xfc);
            hops += 1;
        }
        found
    }

    pub fn set_command_bits(&self, set: u16) {
        let command = read16(self.bdf, COMMAND);
        write16(self.bdf, COMMAND, command | set);
    }
}

/// Sizes BAR `index`; returns the BAR and how many BAR slots it used (2 for 64-bit memory).
fn size_bar(bdf: Bdf, index: u16) -> (Bar, u16) {
    let offset = 0x10 + index * 4;
    let low = read32(bdf, offset);
    if low & 1 == 1 {
        write32(bdf, offset, u32::MAX);
        let mask = read32(bdf, offset) & !3;
        write32(bdf, offset, low);
        let size = u64::from((!mask).wrapping_add(1) & 0xffff);
        return (
            Bar {
                addr: u64::from(low & !3),
                size: if mask == 0 { 0 } else { size },
                is_io: true,
            },
            1,
        );
    }
    let is_64 = (low >> 1) & 3 == 2 && index < 5;
    let high = if is_64 { read32(bdf, offset + 4) } else { 0 };
    write32(bdf, offset, u32::MAX);
    let mut mask = u64::from(read32(bdf, offset) & !0xf);
    write32(bdf, offset, low);
    if is_64 {
        write32(bdf, offset + 4, u32::MAX);
        mask |= u64::from(read32(bdf, offset + 4)) << 32;
        write32(bdf, offset + 4, high);
    } else if mask != 0 {
        mask |= 0xffff_ffff_0000_0000;
    }
    let size = if mask == 0 {
        0
    } else {
        (!mask).wrapping_add(1)
    };
    let addr = (u64::from(high) << 32) | u64::from(low & !0xf);
    (
        Bar {
            addr,
            size,
            is_io: false,
        },
        if is_64 { 2 } else { 1 },
    )
}

fn size_bars(bdf: Bdf) -> [Bar; 6] {
    let mut bars = [Bar::default(); 6];
    let command = read16(bdf, COMMAND);
    write16(bdf, COMMAND, command & !(COMMAND_IO | COMMAND_MEMORY));
    let mut index = 0;
    while index < 6 {
        let (bar, used) = size_bar(bdf, index);
        bars[index as usize] = bar;
        index += used;
    }
    write16(bdf, COMMAND, command);
    bars
}

fn probe(bdf: Bdf, found: &mut Vec<Device>, buses: &mut Vec<u8>) {
    let id = read32(bdf, 0);
    let vendor = id as u16;
    if vendor == 0xffff || vendor == 0 {
        return;
    }
    let header_type = read8(bdf, 0x0e) & 0x7f;
    let class = read32(bdf, 0x08) >> 8;
    let bars = if header_type == 0 {
        size_bars(bdf)
    } else {
        [Bar::default(); 6]
    };
    found.push(Device {
        bdf,
        vendor,
        device: (id >> 16) as u16,
        class,
        bars,
    });
    if header_type == 1 {
        let secondary = read8(bdf, 0x19);
        if secondary > bdf.bus && !buses.contains(&secondary) && buses.len() < MAX_BUSES_VISITED {
            buses.push(secondary);
        }
    }
}

fn scan_bus(bus: u8, found: &mut Vec<Device>, buses: &mut Vec<u8>) {
    for device in 0..32 {
        let first = Bdf {
            bus,
            device,
            function: 0,
        };
        if read32(first, 0) as u16 == 0xffff {
            continue;
        }
        let functions = if read8(first, 0x0e) & 0x80 != 0 { 8 } else { 1 };
        for function in 0..functions {
            probe(
                Bdf {
                    bus,
                    device,
                    function,
                },
                found,
                buses,
            );
        }
    }
}

fn print_device(device: &Device) {
    crate::console::write_fmt(format_args!(
        "PCI: {} {:04x}:{:04x} class={:06x}",
        device.bdf, device.vendor, device.device, device.class
    ));
    for (i, bar) in device.bars.iter().enumerate().filter(|(_, b)| b.size != 0) {
        crate::console::write_fmt(format_args!(" bar{}={:#x}/{:#x}", i, bar.addr, bar.size));
    }
    crate::println!("");
}

static DEVICES: crate::global::Global<Vec<Device>> = crate::global::Global::new();

/// Chooses ECAM or ports, enumerates every function reachable from the ECAM's first bus.
pub fn init(ecam: Option<crate::acpi::Ecam>, print: bool) {
    let first_bus = match ecam {
        Some(e) => {
            let size = (u64::from(e.end_bus - e.start_bus) + 1) << 20;
            if e.base + size > phys::IDENTITY_LIMIT
                && crate::arch::paging::map_identity(e.base, size).is_err()
            {
                crate::say!("ECAM at {:#x} cannot be mapped; using ports", e.base);
                0
            } else {
                ACCESS.set(ConfigAccess::Ecam {
                    base: e.base,
                    start_bus: e.start_bus,
                    end_bus: e.end_bus,
                });
                e.start_bus
            }
        }
        None => 0,
    };
    let mut found = Vec::new();
    let mut buses = alloc::vec![first_bus];
    let mut next = 0;
    while let Some(&bus) = buses.get(next) {
        scan_bus(bus, &mut found, &mut buses);
        next += 1;
    }
    if print {
        found.iter().for_each(print_device);
    }
    DEVICES.set(found);
}

/// All enumerated functions.
pub fn devices() -> &'static [Device] {
    DEVICES.get().map(|d| d.as_slice()).unwrap_or(&[])
}
