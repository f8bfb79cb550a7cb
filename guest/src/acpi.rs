//! ACPI discovery: RSDP (from PVH start info, else the legacy 0xE0000..0xFFFFF scan), XSDT or
//! RSDT, and the tables the kit needs: FADT (PM timer, PM1a control, DSDT), MADT (LAPIC ids,
//! IOAPIC), MCFG (ECAM), DSDT `\_S5` (sleep type for power-off). Every table is printed as
//! `ACPI: <SIG> @<addr> len=<n>`. Lengths and addresses are bounds-checked; a bad table is
//! reported and skipped, never trusted.

use crate::global::Global;
use crate::phys::{self, le_u32, le_u64, le_u8};
use alloc::vec::Vec;

const HEADER_LEN: usize = 36;
const MAX_TABLE_LEN: usize = 4 << 20;
const MAX_TABLES: usize = 64;

/// One ECAM window from MCFG.
#[derive(Clone, Copy, Debug)]
pub struct Ecam {
    pub base: u64,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// What the rest of the kernel needs from ACPI.
#[derive(Default)]
pub struct AcpiInfo {
    pub lapic_ids: Vec<u32>,
    pub ioapic_addr: Option<u64>,
    pub ecam: Vec<Ecam>,
    /// PM timer port and whether it counts 32 bits (else 24).
    pub pm_timer: Option<(u16, bool)>,
    pub pm1a_control: Option<u16>,
    /// SLP_TYPa of `\_S5`.
    pub s5_sleep_type: Option<u8>,
    pub tables: Vec<([u8; 4], u64, u32)>,
}

static ACPI: Global<AcpiInfo> = Global::new();

/// The parsed ACPI information (empty before `init`).
pub fn info() -> Option<&'static AcpiInfo> {
    ACPI.get()
}

/// PM1a control port and S5 sleep type for the power-off fallback.
pub fn s5_control() -> Option<(u16, u8)> {
    let info = ACPI.get()?;
    Some((info.pm1a_control?, info.s5_sleep_type?))
}

fn checksum_ok(data: &[u8]) -> bool {
    data.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

fn find_rsdp(hint: u64) -> Option<u64> {
    let valid =
        |addr: u64| phys::bytes(addr, 20).is_some_and(|d| &d[..8] == b"RSD PTR " && checksum_ok(d));
    if hint != 0 && valid(hint) {
        return Some(hint);
    }
    (0xe0000u64..0x100000).step_by(16).find(|&addr| valid(addr))
}

/// A whole table at `addr`, checked for a sane length.
fn table(addr: u64) -> Option<&'static [u8]> {
    let header = phys::bytes(addr, HEADER_LEN)?;
    let len = le_u32(header, 4) as usize;
    if !(HEADER_LEN..=MAX_TABLE_LEN).contains(&len) {
        return None;
    }
    phys::bytes(addr, len)
}

fn signature(data: &[u8]) -> [u8; 4] {
    [
        le_u8(data, 0),
        le_u8(data, 1),
        le_u8(data, 2),
        le_u8(data, 3),
    ]
}

fn print_table(info: &mut AcpiInfo, sig: [u8; 4], addr: u64, len: u32) {
    let text = core::str::from_utf8(&sig).unwrap_or("????");
    crate::println!("ACPI: {} @{:#x} len={}", text, addr, len);
    info.tables.push((sig, addr, len));
}

fn root_entries(rsdp: &[u8], info: &mut AcpiInfo) -> Vec<u64> {
    let revision = le_u8(rsdp, 15);
    let xsdt = le_u64(rsdp, 24);
    let (root, entry_size) = if revision >= 2 && xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(le_u32(rsdp, 16)), 4)
    };
    let Some(data) = table(root) else {
        crate::say!("ACPI: root table at {:#x} unreadable", root);
        return Vec::new();
    };
    print_table(info, signature(data), root, data.len() as u32);
    (HEADER_LEN..data.len())
        .step_by(entry_size)
        .take(MAX_TABLES)
        .map(|off| {
            if entry_size == 8 {
                le_u64(data, off)
            } else {
                u64::from(le_u32(data, off))
            }
        })
        .collect()
}

fn parse_madt(data: &[u8], info: &mut AcpiInfo) {
    let mut off = 44;
    while off + 2 <= data.len() {
        let kind = le_u8(data, off);
        let len = le_u8(data, off + 1) as usize;
        if len < 2 || off + len > data.len() {
            break;
        }
        match kind {
            0 if le_u32(data, off + 4) & 1 != 0 => {
                info.lapic_ids.push(u32::from(le_u8(data, off + 3)))
            }
            1 => info.ioapic_addr = Some(u64::from(le_u32(data, off + 4))),
            9 if le_u32(data, off + 8) & 1 != 0 => info.lapic_ids.push(le_u32(data, off + 4)),
            _ => {}
        }
        off += len;
    }
}

fn parse_mcfg(data: &[u8], info: &mut AcpiInfo) {
    for off in (44..data.len()).step_by(16) {
        if off + 16 > data.len() {
            break;
        }
        let ecam = Ecam {
            base: le_u64(data, off),
            start_bus: le_u8(data, off + 10),
            end_bus: le_u8(data, off + 11),
        };
        if ecam.base != 0 && ecam.end_bus >= ecam.start_bus {
            info.ecam.push(ecam);
        }
    }
}

/// Generic-address-structure I/O port, if the GAS names system I/O space.
fn gas_port(data: &[u8], off: usize) -> Option<u16> {
    let address = le_u64(data, off + 4);
    (data.len() >= off + 12 && le_u8(data, off) == 1 && address != 0 && address <= 0xffff)
        .then_some(address as u16)
}

fn port_or_gas(legacy: u32, data: &[u8], gas_off: usize) -> Option<u16> {
    if legacy != 0 && legacy <= 0xffff {
        Some(legacy as u16)
    } else {
        gas_port(data, gas_off)
    }
}

/// Returns the DSDT address.
fn parse_fadt(data: &[u8], info: &mut AcpiInfo) -> Option<u64> {
    info.pm1a_control = port_or_gas(le_u32(data, 64), data, 172);
    let timer_32bit = le_u32(data, 112) & (1 << 8) != 0;
    info.pm_timer = port_or_gas(le_u32(data, 76), data, 208).map(|port| (port, timer_32bit));
    let facs = u64::from(le_u32(data, 36));
    if let Some(facs_data) = phys::bytes(facs, 8).filter(|d| &d[..4] == b"FACS") {
        print_table(info, *b"FACS", facs, le_u32(facs_data, 4));
    }
    let x_dsdt = if data.len() >= 148 {
        le_u64(data, 140)
    } else {
        0
    };
    let dsdt = if x_dsdt != 0 {
        x_dsdt
    } else {
        u64::from(le_u32(data, 40))
    };
    (dsdt != 0).then_some(dsdt)
}

/// Value of an AML integer data object (Zero/One/Byte/Word...) at `data[off..]`.
fn aml_small_integer(data: &[u8], off: usize) -> Option<u8> {
    match le_u8(data, off) {
        0x00 => Some(0),
        0x01 => Some(1),
        0x0a..=0x0c => Some(le_u8(data, off + 1)),
        _ => None,
    }
}

/// Finds `Name(_S5, Package(){ SLP_TYPa, ... })` by pattern: "_S5_", PackageOp, PkgLength,
/// NumElements, first element. Enough for the DSDTs of QEMU and sluice; no AML interpreter.
fn find_s5(dsdt: &[u8]) -> Option<u8> {
    let pos = dsdt.windows(4).position(|w| w == b"_S5_")?;
    let mut off = pos + 4;
    if le_u8(dsdt, off) != 0x12 {
        return None;
    }
    off += 1;
    let lead = le_u8(dsdt, off);
    off += 1 + (lead >> 6) as usize;
    off += 1;
    aml_small_integer(dsdt, off)
}

fn parse_table(addr: u64, info: &mut AcpiInfo) {
    let Some(data) = table(addr) else {
        crate::say!("ACPI: table at {:#x} unreadable", addr);
        return;
    };
    let sig = signature(data);
    print_table(info, sig, addr, data.len() as u32);
    if !checksum_ok(data) {
        crate::chatter!("ACPI: {:?} bad checksum", sig);
    }
    match &sig {
        b"APIC" => parse_madt(data, info),
        b"MCFG" => parse_mcfg(data, info),
        b"FACP" => {
            if let Some(dsdt_addr) = parse_fadt(data, info) {
                if let Some(dsdt) = table(dsdt_addr) {
                    print_table(info, signature(dsdt), dsdt_addr, dsdt.len() as u32);
                    info.s5_sleep_type = find_s5(dsdt);
                }
            }
        }
        _ => {}
    }
}

/// Finds and parses the ACPI tables; prints one line per table.
pub fn init(rsdp_hint: u64) {
    let mut info = AcpiInfo::default();
    match find_rsdp(rsdp_hint).and_then(|addr| Some((addr, phys::bytes(addr, 36)?))) {
        Some((addr, rsdp)) => {
            let len = if le_u8(rsdp, 15) >= 2 {
                le_u32(rsdp, 20)
            } else {
                20
            };
            print_table(&mut info, *b"RSDP", addr, len);
            for entry in root_entries(rsdp, &mut info) {
                parse_table(entry, &mut info);
            }
        }
        None => crate::say!("no ACPI RSDP found"),
    }
    ACPI.set(info);
}
