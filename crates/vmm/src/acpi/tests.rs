//! End-to-end tests: tables are written into real guest memory, then found and checked the way a
//! guest finds them (RSDP -> XSDT -> tables) with a small parser that shares no code with the
//! builders.

use super::*;
use vm_memory::Bytes;

const MIB: usize = 1 << 20;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB)]).unwrap()
}

fn config(num_cpus: u8) -> AcpiConfig {
    AcpiConfig {
        num_cpus,
        ram_size: 16 * MIB as u64,
        ioapic_address: DEFAULT_IOAPIC_ADDRESS,
    }
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
}

fn in_window(addr: u64, len: u64) -> bool {
    addr >= layout::ACPI_START && addr + len <= layout::ACPI_START + layout::ACPI_SIZE
}

/// A system description table read back from guest memory, checked for length and checksum.
fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    assert_eq!(addr % 8, 0, "table at {addr:#x} is not 8-byte aligned");
    let header = read(mem, addr, 36);
    let len = u32_at(&header, 4);
    assert!(len >= 36, "table at {addr:#x} claims {len} bytes");
    assert!(
        in_window(addr, u64::from(len)),
        "table at {addr:#x}+{len} leaves the window"
    );
    let table = read(mem, addr, len as usize);
    assert_eq!(byte_sum(&table), 0, "bad checksum in {:?}", &table[..4]);
    table
}

/// What a guest learns from the tables.
struct Parsed {
    rsdp_addr: u64,
    xsdt_signatures: Vec<[u8; 4]>,
    tables: Vec<Vec<u8>>,
}

impl Parsed {
    fn table(&self, signature: &[u8; 4]) -> &[u8] {
        self.tables
            .iter()
            .find(|t| &t[..4] == signature)
            .unwrap_or_else(|| panic!("no {:?} table", signature))
    }
}

fn parse(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Parsed {
    let rsdp = read(mem, rsdp_addr.0, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(byte_sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
    assert_eq!(byte_sum(&rsdp), 0, "RSDP extended checksum");

    let xsdt = read_table(mem, u64_at(&rsdp, 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut tables = Vec::new();
    let mut xsdt_signatures = Vec::new();
    for entry in xsdt[36..].chunks_exact(8) {
        let table = read_table(mem, u64::from_le_bytes(entry.try_into().unwrap()));
        xsdt_signatures.push(table[..4].try_into().unwrap());
        tables.push(table);
    }
    Parsed {
        rsdp_addr: rsdp_addr.0,
        xsdt_signatures,
        tables,
    }
}

fn create(num_cpus: u8) -> (GuestMemoryMmap, Parsed) {
    let mem = guest_memory();
    let rsdp = create_acpi_tables(&mem, &config(num_cpus)).unwrap();
    let parsed = parse(&mem, rsdp);
    (mem, parsed)
}

/// The DSDT that the FADT points at, through both DSDT and X_DSDT.
fn dsdt_of(mem: &GuestMemoryMmap, fadt: &[u8]) -> Vec<u8> {
    let dsdt32 = u64::from(u32_at(fadt, 40));
    let x_dsdt = u64_at(fadt, 140);
    assert_eq!(dsdt32, x_dsdt);
    let dsdt = read_table(mem, x_dsdt);
    assert_eq!(&dsdt[..4], b"DSDT");
    dsdt
}

/// MADT entries as (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut entries = Vec::new();
    let mut offset = 44;
    while offset < madt.len() {
        let len = usize::from(madt[offset + 1]);
        assert!(len >= 2 && offset + len <= madt.len(), "bad MADT entry");
        entries.push((madt[offset], &madt[offset..offset + len]));
        offset += len;
    }
    entries
}

/// A generic address structure: (space, bit width, address).
fn gas_at(bytes: &[u8], offset: usize) -> (u8, u8, u64) {
    (bytes[offset], bytes[offset + 1], u64_at(bytes, offset + 4))
}

/// The compressed EISA id in AML: DWordPrefix, then the id in big-endian byte order.
fn eisa_id_aml(id: &str) -> [u8; 5] {
    let b = id.as_bytes();
    let letters =
        (u32::from(b[0] - b'@') << 10) | (u32::from(b[1] - b'@') << 5) | u32::from(b[2] - b'@');
    let product = u32::from_str_radix(&id[3..], 16).unwrap();
    let value = (letters << 16) | product;
    let be = value.to_be_bytes();
    [0x0c, be[0], be[1], be[2], be[3]]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn rsdp_is_at_the_start_of_the_bios_area_window() {
    let (_, parsed) = create(1);

    assert_eq!(parsed.rsdp_addr, layout::ACPI_START);
    assert_eq!(parsed.rsdp_addr % 16, 0);
    assert!((0xe_0000..0x10_0000).contains(&parsed.rsdp_addr));
}

#[test]
fn xsdt_lists_fadt_madt_mcfg() {
    let (_, parsed) = create(2);

    assert_eq!(parsed.xsdt_signatures, vec![*b"FACP", *b"APIC", *b"MCFG"]);
}

#[test]
fn fadt_points_at_dsdt_and_facs() {
    let (mem, parsed) = create(1);
    let fadt = parsed.table(b"FACP");

    let dsdt = dsdt_of(&mem, fadt);
    let facs_addr = u64::from(u32_at(fadt, 36));

    assert!(dsdt.len() > 36);
    assert_eq!(facs_addr % 64, 0);
    let facs = read(&mem, facs_addr, 64);
    assert_eq!(&facs[..4], b"FACS");
    assert_eq!(u32_at(&facs, 4), 64);
}

#[test]
fn fadt_describes_pm_block_sci_and_reset() {
    let (_, parsed) = create(1);
    let fadt = parsed.table(b"FACP");

    assert_eq!(fadt[8], 6, "FADT major revision");
    assert_eq!(u16_at(fadt, 46), layout::SCI_IRQ as u16, "SCI_INT");
    assert_eq!(u32_at(fadt, 48), 0, "SMI_CMD: always in ACPI mode");
    assert_eq!(u32_at(fadt, 56), u32::from(layout::PM1A_EVT_PORT));
    assert_eq!(u32_at(fadt, 64), u32::from(layout::PM1A_CNT_PORT));
    assert_eq!(u32_at(fadt, 76), u32::from(layout::PM_TMR_PORT));
    assert_eq!(fadt[88], 4, "PM1_EVT_LEN");
    assert_eq!(fadt[89], 2, "PM1_CNT_LEN");
    assert_eq!(fadt[91], 4, "PM_TMR_LEN");
    assert_eq!(gas_at(fadt, 148), (1, 32, u64::from(layout::PM1A_EVT_PORT)));
    assert_eq!(gas_at(fadt, 172), (1, 16, u64::from(layout::PM1A_CNT_PORT)));
    assert_eq!(gas_at(fadt, 208), (1, 32, u64::from(layout::PM_TMR_PORT)));
    assert_eq!(
        gas_at(fadt, 116),
        (1, 8, u64::from(layout::ACPI_RESET_PORT))
    );
    assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);

    let iapc_boot_arch = u16_at(fadt, 109);
    assert_ne!(iapc_boot_arch & (1 << 1), 0, "8042 present");
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED_ACPI");
}

#[test]
fn madt_has_one_enabled_local_apic_per_cpu() {
    let (_, parsed) = create(4);
    let madt = parsed.table(b"APIC");

    let ids: Vec<(u8, u8, u32)> = madt_entries(madt)
        .into_iter()
        .filter(|(kind, _)| *kind == 0)
        .map(|(_, e)| (e[2], e[3], u32_at(e, 4)))
        .collect();

    assert_eq!(u32_at(madt, 36), layout::LAPIC_START as u32);
    assert_eq!(u32_at(madt, 40) & 1, 1, "PCAT_COMPAT");
    assert_eq!(ids, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
}

#[test]
fn madt_has_ioapic_overrides_and_nmi() {
    let (_, parsed) = create(2);
    let entries = madt_entries(parsed.table(b"APIC"));

    let ioapics: Vec<_> = entries.iter().filter(|(k, _)| *k == 1).collect();
    let overrides: Vec<(u8, u8, u32, u16)> = entries
        .iter()
        .filter(|(k, _)| *k == 2)
        .map(|(_, e)| (e[2], e[3], u32_at(e, 4), u16_at(e, 8)))
        .collect();
    let nmis: Vec<_> = entries.iter().filter(|(k, _)| *k == 4).collect();

    assert_eq!(ioapics.len(), 1);
    let ioapic = ioapics[0].1;
    assert_eq!(ioapic[2], layout::IOAPIC_ID);
    assert_eq!(u32_at(ioapic, 4), layout::IOAPIC_START as u32);
    assert_eq!(u32_at(ioapic, 8), 0, "GSI base");
    // (bus, source, gsi, flags): IRQ0 -> GSI2 edge/high; SCI level/high.
    assert_eq!(
        overrides,
        vec![
            (0, 0, 2, 0x5),
            (0, layout::SCI_IRQ as u8, layout::SCI_IRQ, 0xd)
        ]
    );
    assert_eq!(nmis.len(), 1);
    assert_eq!(nmis[0].1, &[4, 6, 0xff, 0, 0, 1]);
}

#[test]
fn mcfg_names_the_ecam_window() {
    let (_, parsed) = create(1);
    let mcfg = parsed.table(b"MCFG");

    assert_eq!(mcfg.len(), 44 + 16, "one allocation");
    assert_eq!(u64_at(mcfg, 44), layout::PCI_ECAM_START);
    assert_eq!(u16_at(mcfg, 52), 0, "segment");
    assert_eq!(mcfg[54], 0, "start bus");
    assert_eq!(mcfg[55], layout::PCI_ECAM_LAST_BUS, "end bus");
}

#[test]
fn dsdt_declares_host_bridge_devices_and_s5() {
    let (mem, parsed) = create(1);
    let dsdt = dsdt_of(&mem, parsed.table(b"FACP"));
    let aml = &dsdt[36..];

    for id in [
        "PNP0A08", "PNP0A03", "PNP0C02", "PNP0501", "PNP0B00", "PNP0303",
    ] {
        assert!(contains(aml, &eisa_id_aml(id)), "{id} missing");
    }
    assert!(contains(aml, b"_S5_"));
    // Name(_S5_, Package(4) { S5_SLEEP_TYPE, 0, 0, 0 }): PackageOp, PkgLength, count, elements.
    let sleep_type = match layout::S5_SLEEP_TYPE {
        value @ (0 | 1) => vec![value],
        value => vec![0x0a, value],
    };
    let pkg_length = u8::try_from(1 + 1 + sleep_type.len() + 3).unwrap();
    let mut s5 = vec![0x12, pkg_length, 0x04];
    s5.extend_from_slice(&sleep_type);
    s5.extend_from_slice(&[0, 0, 0]);
    assert!(contains(aml, &s5));
}

/// The `_PRT` entry `Package { slot << 16 | 0xFFFF, pin, Zero, gsi }` as AML bytes (slot ≥ 1,
/// so the address needs a DWord; pin 0 and source 0 are ZeroOp; the GSI fits a BytePrefix).
fn prt_entry_aml(slot: u8, pin: u8, gsi: u8) -> Vec<u8> {
    let pin = if pin <= 1 { vec![pin] } else { vec![0x0a, pin] };
    let mut body = vec![0x04, 0x0c, 0xff, 0xff, slot, 0x00];
    body.extend_from_slice(&pin);
    body.extend_from_slice(&[0x00, 0x0a, gsi]);
    let mut entry = vec![0x12, u8::try_from(body.len() + 1).unwrap()];
    entry.extend_from_slice(&body);
    entry
}

#[test]
fn dsdt_prt_routes_every_slot_pin_to_a_swizzled_ioapic_gsi() {
    let (mem, parsed) = create(1);
    let aml = dsdt_of(&mem, parsed.table(b"FACP"));
    let first = layout::PCI_INTX_FIRST_GSI;
    let gsis = layout::PCI_INTX_GSIS;

    assert!(contains(&aml, b"_PRT"));
    for slot in 1..32u8 {
        for pin in 0..4u8 {
            let gsi = first + (u32::from(slot) + u32::from(pin)) % gsis;
            let entry = prt_entry_aml(slot, pin, u8::try_from(gsi).unwrap());
            assert!(contains(&aml, &entry), "slot {slot} pin {pin}");
        }
    }
    // The same mapping the root wires (one definition of the swizzle).
    let routing = sluice_pci::IntxRouting::new(first, gsis).unwrap();
    assert_eq!(routing.gsi(3, sluice_pci::InterruptPin::IntC), first + 5);
    assert!(gsis > 0 && first + gsis <= layout::IOAPIC_PINS);
    assert!(first >= 16, "PCI interrupts stay off the ISA IRQs");
}

#[test]
fn dsdt_reserves_ecam_and_routes_windows() {
    let (mem, parsed) = create(1);
    let aml = dsdt_of(&mem, parsed.table(b"FACP"));

    // Memory32Fixed(ReadWrite, ECAM base, ECAM size).
    let mut ecam = vec![0x86, 9, 0, 1];
    ecam.extend_from_slice(&(layout::PCI_ECAM_START as u32).to_le_bytes());
    ecam.extend_from_slice(&(layout::PCI_ECAM_SIZE as u32).to_le_bytes());
    assert!(contains(&aml, &ecam));
    // The QWord window minimum and the DWord window minimum appear as descriptor fields.
    let mmio64 = layout::mmio64_start(16 * MIB as u64);
    assert!(contains(&aml, &mmio64.to_le_bytes()));
    assert!(contains(&aml, &(layout::MMIO32_START as u32).to_le_bytes()));
}

#[test]
fn maximum_cpu_count_fits() {
    let (_, parsed) = create(u8::MAX);
    let madt = parsed.table(b"APIC");

    let ids: Vec<u8> = madt_entries(madt)
        .into_iter()
        .filter(|(kind, _)| *kind == 0)
        .map(|(_, e)| e[3])
        .collect();

    assert_eq!(ids, (0..=254).collect::<Vec<u8>>());
}

#[test]
fn zero_cpus_is_an_error() {
    let mem = guest_memory();

    let result = create_acpi_tables(&mem, &config(0));

    assert!(matches!(result, Err(AcpiError::NoCpus)));
}

#[test]
fn tables_beyond_the_window_are_an_error() {
    let mem = guest_memory();
    let huge = acpi_tables::sdt::Sdt::new(
        *b"HUGE",
        layout::ACPI_SIZE as u32,
        1,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );

    let result = create_acpi_tables_with(&mem, &config(1), &[&huge]);

    assert!(matches!(result, Err(AcpiError::WindowFull { .. })));
}

#[test]
fn extra_tables_are_listed_in_the_xsdt() {
    let mem = guest_memory();
    let extra = acpi_tables::sdt::Sdt::new(*b"TEST", 40, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);

    let rsdp = create_acpi_tables_with(&mem, &config(1), &[&extra]).unwrap();
    let parsed = parse(&mem, rsdp);

    assert_eq!(
        parsed.xsdt_signatures,
        vec![*b"FACP", *b"APIC", *b"MCFG", *b"TEST"]
    );
}

#[test]
fn memory_without_the_acpi_window_is_an_error() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();

    let result = create_acpi_tables(&mem, &config(1));

    assert!(matches!(result, Err(AcpiError::NotInGuestMemory { .. })));
}

#[test]
fn absurd_ram_size_is_an_error() {
    let mem = guest_memory();
    let config = AcpiConfig {
        num_cpus: 1,
        ram_size: u64::MAX - 1,
        ioapic_address: DEFAULT_IOAPIC_ADDRESS,
    };

    let result = create_acpi_tables(&mem, &config);

    assert!(matches!(result, Err(AcpiError::RamTooLarge(_))));
}

#[test]
fn large_ram_moves_the_64bit_window() {
    let windows = pci_windows(8 << 30).unwrap();

    // 8 GiB RAM: 3 GiB low + 5 GiB from 4 GiB up to 9 GiB, so the window starts at 9 GiB.
    assert_eq!(windows.mmio64_start, 9 << 30);
    assert_eq!(windows.mmio64_last, (9 << 30) + layout::MMIO64_SIZE - 1);
}

/// Runs `iasl -d` on `table` in `dir` and returns the disassembly.
fn iasl_disassemble(dir: &std::path::Path, name: &str, table: &[u8]) -> String {
    let input = dir.join(format!("{name}.dat"));
    std::fs::write(&input, table).unwrap();
    let result = std::process::Command::new("iasl")
        .current_dir(dir)
        .arg("-d")
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "iasl -d {name} failed: {}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
}

/// The `_PRT` entries of an iasl disassembly as (address, pin, source, gsi).
fn iasl_prt_entries(dsl: &str) -> Vec<(u32, u32, u32, u32)> {
    let Some(start) = dsl.find("Name (_PRT") else {
        return Vec::new();
    };
    let number = |text: &str| -> Option<u32> {
        let text = text.trim().trim_end_matches(',');
        match text {
            "Zero" => Some(0),
            "One" => Some(1),
            hex => u32::from_str_radix(hex.strip_prefix("0x")?, 16).ok(),
        }
    };
    let mut entries = Vec::new();
    let mut fields = Vec::new();
    for line in dsl[start..].lines().skip(2) {
        let line = line.trim();
        if let Some(value) = number(line) {
            fields.push(value);
            if fields.len() == 4 {
                entries.push((fields[0], fields[1], fields[2], fields[3]));
                fields.clear();
            }
        } else if line.starts_with("})") {
            break;
        }
    }
    entries
}

/// Disassembles the DSDT and every XSDT table with ACPICA's `iasl` when it is installed.
#[test]
fn iasl_disassembles_the_tables() {
    if std::process::Command::new("iasl")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("skipped: iasl not installed (apt-get install acpica-tools)");
        return;
    }
    let (mem, parsed) = create(2);
    let dsdt = dsdt_of(&mem, parsed.table(b"FACP"));
    let dir = std::env::temp_dir().join(format!("sluice-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let dsl = iasl_disassemble(&dir, "dsdt", &dsdt);
    let madt = iasl_disassemble(&dir, "apic", parsed.table(b"APIC"));
    let fadt = iasl_disassemble(&dir, "facp", parsed.table(b"FACP"));
    let mcfg = iasl_disassemble(&dir, "mcfg", parsed.table(b"MCFG"));
    std::fs::remove_dir_all(&dir).ok();

    for expected in ["PNP0A08", "PNP0C02", "PNP0501", "_S5_", "QWordMemory"] {
        assert!(dsl.contains(expected), "{expected} not in DSDT:\n{dsl}");
    }
    let prt = iasl_prt_entries(&dsl);
    assert_eq!(prt.len(), 32 * 4, "one _PRT entry per slot and pin:\n{dsl}");
    assert!(prt.contains(&(0x0001_ffff, 0, 0, 17)), "{prt:?}");
    assert!(
        prt.contains(&(0x001f_ffff, 3, 0, 16 + (31 + 3) % 8)),
        "{prt:?}"
    );
    assert!(madt.contains("PC-AT Compatibility : 1"), "{madt}");
    assert!(fadt.contains("Reset Register Supported (V2) : 1"), "{fadt}");
    assert!(mcfg.contains("Base Address : 00000000E0000000"), "{mcfg}");
}

/// The hot-plug AML (acpi::hotplug) disassembles with `iasl -d`: the register fields, one slot
/// device per slot with `_ADR`, `_SUN` and an `_EJ0` that writes the slot's bit, the notify
/// method with both notifications, and the GED calling it on its interrupt.
#[test]
fn iasl_disassembles_the_hotplug_slots_and_methods() {
    if std::process::Command::new("iasl")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("skipped: iasl not installed (apt-get install acpica-tools)");
        return;
    }
    let (mem, parsed) = create(1);
    let dsdt = dsdt_of(&mem, parsed.table(b"FACP"));
    let dir = std::env::temp_dir().join(format!("sluice-acpi-hp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dsl = iasl_disassemble(&dir, "dsdt", &dsdt);
    std::fs::remove_dir_all(&dir).ok();

    let expected = [
        "OperationRegion (PCST, SystemIO, 0x0620, 0x10)",
        "PCIU,   32",
        "PCEJ,   32",
        "Device (S01)",
        "Device (S1F)",
        "Name (_SUN, 0x1F)",
        "Name (_ADR, 0x001F0000)",
        "Method (_EJ0, 1, NotSerialized)",
        "\\_SB.PCI0.PCEJ = 0x80000000",
        "Method (PCNT, 0, Serialized)",
        "Local0 = PCIU",
        "Local1 = PCID",
        "If ((Local0 & 0x02))",
        "Notify (S01, One) // Device Check",
        "If ((Local1 & 0x80000000))",
        "Notify (S1F, 0x03) // Eject Request",
        "\"ACPI0013\"",
        "Method (_EVT, 1, Serialized)",
        "\\_SB.PCI0.PCNT ()",
    ];
    for expected in expected {
        assert!(dsl.contains(expected), "{expected} not in DSDT:\n{dsl}");
    }
    assert!(
        !dsl.contains("Device (S00)"),
        "no slot object for the host bridge"
    );
    assert_eq!(dsl.matches("Method (_EJ0").count(), 31);
}

/// The TPM's tables (`--tpm`) disassemble with ACPICA's `iasl`: the SSDT's device has HID
/// MSFT0101 and a Memory32Fixed over the CRB pages; the TPM2 table's start method is CRB.
#[test]
fn iasl_disassembles_the_tpm_tables() {
    if std::process::Command::new("iasl")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("SKIP iasl_disassembles_the_tpm_tables: iasl not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("sluice-iasl-tpm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let ssdt = iasl_disassemble(&dir, "ssdt", tpm::build_tpm_ssdt().as_slice());
    let tpm2 = iasl_disassemble(&dir, "tpm2", tpm::build_tpm2().as_slice());

    assert!(ssdt.contains("Device (TPM)"), "{ssdt}");
    assert!(ssdt.contains("\"MSFT0101\""), "{ssdt}");
    assert!(ssdt.contains("Memory32Fixed (ReadWrite"), "{ssdt}");
    assert!(ssdt.contains("0xFED40000"), "{ssdt}");
    assert!(ssdt.contains("0x00005000"), "{ssdt}");
    assert!(tpm2.contains("Start Method : 07"), "{tpm2}");
    assert!(tpm2.contains("00000000FED40040"), "{tpm2}");
    let _ = std::fs::remove_dir_all(dir);
}
