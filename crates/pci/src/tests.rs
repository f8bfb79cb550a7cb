//! Tests of the assembled root: config access through CF8/CFC and ECAM on real buses, BAR
//! mapping and relocation, MSI-X through the test device, and hostile guest input.

use std::sync::{Arc, Mutex};

use sluice_bus::irq::MsiMessage;
use sluice_bus::{read_le, Bus};

use crate::testing::RecordingSink;
use crate::*;

const MMIO32: (u64, u64) = (0xc000_0000, 0x2000_0000);
const MMIO64: (u64, u64) = (0x10_0000_0000, 0x4_0000_0000);
const ECAM_BASE: u64 = 0xe000_0000;
const ECAM_BUSES: u16 = 256;
const CONFIG_PORT: u64 = CONFIG_ADDRESS_PORT as u64;
const DATA_PORT: u64 = CONFIG_PORT + 4;

struct Rig {
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    root: Arc<PciRoot>,
    sink: Arc<RecordingSink>,
}

fn rig() -> Rig {
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let allocator = BarAllocator::new(
        AddressWindow::new(MMIO32.0, MMIO32.1).unwrap(),
        AddressWindow::new(MMIO64.0, MMIO64.1).unwrap(),
        AddressWindow::new(DEFAULT_IO_WINDOW.0, DEFAULT_IO_WINDOW.1).unwrap(),
    )
    .unwrap();
    let root = Arc::new(PciRoot::new(mmio.clone(), pio.clone(), allocator));
    let io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
    pio.insert("pci-config-io", io, CONFIG_PORT, CONFIG_PORT_LEN.into())
        .unwrap();
    let ecam = PciConfigMmio::new(root.clone(), ECAM_BUSES);
    let len = ecam.window_len();
    mmio.insert("pci-ecam", Arc::new(Mutex::new(ecam)), ECAM_BASE, len)
        .unwrap();
    Rig {
        mmio,
        pio,
        root,
        sink: Arc::new(RecordingSink::default()),
    }
}

fn addr(device: u8) -> PciAddress {
    PciAddress::new(0, device, 0).unwrap()
}

fn config_address(address: PciAddress, register: usize) -> u32 {
    CONFIG_ADDRESS_ENABLE | (u32::from(address.bdf()) << 8) | (register as u32 & 0xfc)
}

impl Rig {
    fn add_test_device(&self) -> (PciAddress, Arc<Mutex<PciTestDevice>>) {
        let device = Arc::new(Mutex::new(PciTestDevice::new(self.sink.clone()).unwrap()));
        let address = self.root.add_device(device.clone()).unwrap();
        (address, device)
    }

    fn cf8_read(&self, address: PciAddress, register: usize, len: usize) -> u64 {
        let select = config_address(address, register);
        self.pio.write(CONFIG_PORT, &select.to_le_bytes());
        let mut data = vec![0u8; len];
        self.pio.read(DATA_PORT + (register as u64 & 3), &mut data);
        read_le(&data)
    }

    fn cf8_write(&self, address: PciAddress, register: usize, data: &[u8]) {
        let select = config_address(address, register);
        self.pio.write(CONFIG_PORT, &select.to_le_bytes());
        self.pio.write(DATA_PORT + (register as u64 & 3), data);
    }

    fn ecam_offset(address: PciAddress, register: usize) -> u64 {
        ECAM_BASE + (u64::from(address.bdf()) << 12) + register as u64
    }

    fn ecam_read(&self, address: PciAddress, register: usize, len: usize) -> u64 {
        let mut data = vec![0u8; len];
        self.mmio
            .read(Self::ecam_offset(address, register), &mut data);
        read_le(&data)
    }

    fn ecam_write(&self, address: PciAddress, register: usize, data: &[u8]) {
        self.mmio.write(Self::ecam_offset(address, register), data);
    }

    fn mmio_read_u32(&self, gpa: u64) -> (bool, u32) {
        let mut data = [0u8; 4];
        let hit = self.mmio.read(gpa, &mut data);
        (hit, u32::from_le_bytes(data))
    }

    fn mmio_write_u32(&self, gpa: u64, value: u32) {
        self.mmio.write(gpa, &value.to_le_bytes());
    }
}

#[test]
fn cf8_and_ecam_read_host_bridge_ids_and_agree() {
    let rig = rig();
    let bridge = addr(0);

    let ids = rig.cf8_read(bridge, 0, 4);
    let class = rig.cf8_read(bridge, 0x08, 4) >> 8;

    assert_eq!(ids, 0x0008_1b36);
    assert_eq!(class, 0x06_0000);
    for register in (0..0x40).step_by(4) {
        assert_eq!(
            rig.cf8_read(bridge, register, 4),
            rig.ecam_read(bridge, register, 4),
            "register {register:#x}"
        );
    }
    assert_eq!(rig.cf8_read(bridge, 0x02, 2), 0x0008);
    assert_eq!(rig.ecam_read(bridge, 0x0b, 1), 0x06);
    assert_eq!(rig.cf8_read(bridge, 0x0b, 1), 0x06);
}

#[test]
fn config_address_register_reads_back_with_reserved_bits_clear() {
    let rig = rig();

    rig.pio.write(CONFIG_PORT, &0xffff_ffffu32.to_le_bytes());
    let mut data = [0u8; 4];
    rig.pio.read(CONFIG_PORT, &mut data);

    assert_eq!(u32::from_le_bytes(data), 0x80ff_fffc);
}

#[test]
fn missing_functions_read_all_ones() {
    let rig = rig();
    let (device, _) = rig.add_test_device();
    let empty = addr(device.device + 1);
    let function1 = PciAddress::new(0, device.device, 1).unwrap();
    let other_bus = PciAddress::new(1, 0, 0).unwrap();

    for missing in [empty, function1, other_bus, addr(31)] {
        assert_eq!(rig.cf8_read(missing, 0, 4), 0xffff_ffff, "{missing}");
        assert_eq!(rig.ecam_read(missing, 0, 4), 0xffff_ffff, "{missing}");
        assert_eq!(rig.ecam_read(missing, 0x100, 2), 0xffff, "{missing}");
    }
}

#[test]
fn disabled_config_address_reads_all_ones() {
    let rig = rig();

    rig.pio.write(CONFIG_PORT, &0u32.to_le_bytes());
    let mut data = [0u8; 4];
    rig.pio.read(DATA_PORT, &mut data);

    assert_eq!(data, [0xff; 4]);
}

#[test]
fn ecam_beyond_configured_buses_reads_all_ones() {
    let rig = rig();
    let ecam = PciConfigMmio::new(rig.root.clone(), 1);
    let mut ecam: Box<dyn sluice_bus::BusDevice> = Box::new(ecam);
    let mut data = [0u8; 4];

    ecam.read(0, 0, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x0008_1b36);
    ecam.read(0, 1 << 20, &mut data);
    assert_eq!(data, [0xff; 4]);
    ecam.read(0, u64::MAX - 1, &mut data);
    assert_eq!(data, [0xff; 4]);
}

#[test]
fn test_device_is_placed_at_slot_1_with_bars_mapped() {
    let rig = rig();

    let (address, _) = rig.add_test_device();

    assert_eq!(address, addr(1));
    assert_eq!(rig.cf8_read(address, 0, 4), 0x5c1e_1234);
    assert_eq!(rig.ecam_read(address, 0x08, 4) >> 8, 0xff_0000);
    let bar0 = rig.cf8_read(address, 0x10, 4);
    assert!((MMIO32.0..MMIO32.0 + MMIO32.1).contains(&bar0));
    assert_eq!(rig.root.bar_mapping(address, 0), Some(bar0));
    assert_eq!(
        rig.cf8_read(address, 0x04, 2) & 0x2,
        0x2,
        "memory decode on"
    );
    rig.mmio_write_u32(bar0, 0xdead_beef);
    assert_eq!(rig.mmio_read_u32(bar0), (true, 0xdead_beef));
    assert_eq!(rig.root.devices(), vec![addr(0), addr(1)]);
}

#[test]
fn guest_bar_write_moves_the_range_on_the_bus() {
    let rig = rig();
    let (address, _) = rig.add_test_device();
    let old = rig.cf8_read(address, 0x10, 4);
    rig.mmio_write_u32(old, 0x1234_5678);
    let new = 0xd000_0000u32;

    rig.cf8_write(address, 0x10, &new.to_le_bytes());

    assert_eq!(rig.mmio_read_u32(u64::from(new)), (true, 0x1234_5678));
    assert_eq!(rig.mmio_read_u32(old), (false, 0xffff_ffff));
    assert_eq!(rig.root.bar_mapping(address, 0), Some(u64::from(new)));
}

#[test]
fn overlapping_bar_address_is_refused_and_old_mapping_kept() {
    let rig = rig();
    let (first, _) = rig.add_test_device();
    let (second, _) = rig.add_test_device();
    let first_bar = rig.cf8_read(first, 0x10, 4);
    let second_bar = rig.cf8_read(second, 0x10, 4);
    rig.mmio_write_u32(first_bar, 1);
    rig.mmio_write_u32(second_bar, 2);

    rig.ecam_write(second, 0x10, &(first_bar as u32).to_le_bytes());

    assert_eq!(rig.root.bar_mapping(second, 0), Some(second_bar));
    assert_eq!(rig.mmio_read_u32(first_bar), (true, 1));
    assert_eq!(rig.mmio_read_u32(second_bar), (true, 2));
}

#[test]
fn memory_decode_toggle_unmaps_and_remaps() {
    let rig = rig();
    let (address, _) = rig.add_test_device();
    let bar0 = rig.cf8_read(address, 0x10, 4);
    let command = rig.cf8_read(address, 0x04, 2) as u16;

    rig.cf8_write(
        address,
        0x04,
        &(command & !COMMAND_MEMORY_SPACE).to_le_bytes(),
    );

    assert!(!rig.mmio_read_u32(bar0).0);
    assert_eq!(rig.root.bar_mapping(address, 0), None);
    rig.cf8_write(address, 0x04, &command.to_le_bytes());
    assert!(rig.mmio_read_u32(bar0).0);
}

#[test]
fn sizing_probe_reads_mask_and_leaves_mapping_in_place() {
    let rig = rig();
    let (address, _) = rig.add_test_device();
    let bar0 = rig.cf8_read(address, 0x10, 4);

    rig.cf8_write(address, 0x10, &u32::MAX.to_le_bytes());
    let mask = rig.cf8_read(address, 0x10, 4);
    rig.cf8_write(address, 0x10, &(bar0 as u32).to_le_bytes());

    assert_eq!(mask, 0xffff_f000);
    assert_eq!(rig.root.bar_mapping(address, 0), Some(bar0));
    assert!(rig.mmio_read_u32(bar0).0);
    assert!(!rig.mmio_read_u32(0xffff_f000).0);
}

/// Records BAR moves; has a 64-bit memory BAR and an I/O BAR.
struct MoveRecorder {
    config: ConfigSpace,
    moves: Vec<(usize, Option<u64>, Option<u64>)>,
    last_io_write: Option<(u64, u64)>,
}

impl MoveRecorder {
    fn new() -> Self {
        let mut config = ConfigSpace::new(&PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1000,
            ..PciIds::default()
        });
        config.add_bar(0, BarSpec::io(0x20)).unwrap();
        config
            .add_bar(2, BarSpec::mem64(0x4000).prefetchable())
            .unwrap();
        Self {
            config,
            moves: Vec::new(),
            last_io_write: None,
        }
    }
}

impl PciDevice for MoveRecorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        sluice_bus::write_le(data, ((bar as u64) << 32) | offset);
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.last_io_write = Some((offset, read_le(data)));
        }
    }
    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        self.moves.push((bar, old, new));
    }
}

#[test]
fn io_and_64bit_bars_are_mapped_on_their_buses_and_moves_reported() {
    let rig = rig();
    let device = Arc::new(Mutex::new(MoveRecorder::new()));

    let address = rig.root.add_device(device.clone()).unwrap();

    let io = rig.root.bar_mapping(address, 0).unwrap();
    let mem = rig.root.bar_mapping(address, 2).unwrap();
    assert!((0xc000..0x10000).contains(&io));
    assert!(mem >= MMIO64.0 && mem + 0x4000 <= MMIO64.0 + MMIO64.1);
    assert!(rig.pio.write(io + 4, &[7, 0]));
    assert_eq!(device.lock().unwrap().last_io_write, Some((4, 7)));
    let mut data = [0u8; 8];
    assert!(rig.mmio.read(mem + 8, &mut data));
    assert_eq!(u64::from_le_bytes(data), (2 << 32) | 8);
    assert_eq!(
        device.lock().unwrap().moves,
        vec![(0, None, Some(io)), (2, None, Some(mem))]
    );

    let new_mem = 0x20_0000_0000u64;
    rig.ecam_write(address, 0x18, &(new_mem as u32 | 0xc).to_le_bytes());
    rig.ecam_write(address, 0x1c, &((new_mem >> 32) as u32).to_le_bytes());

    assert_eq!(rig.root.bar_mapping(address, 2), Some(new_mem));
    assert!(rig.mmio.read(new_mem, &mut data));
    assert!(!rig.mmio.read(mem, &mut data));
    let moves = device.lock().unwrap().moves.clone();
    assert_eq!(moves.last(), Some(&(2, Some(mem), Some(new_mem))));
}

#[test]
fn io_bar_beyond_port_space_is_refused() {
    let rig = rig();
    let device = Arc::new(Mutex::new(MoveRecorder::new()));
    let address = rig.root.add_device(device).unwrap();
    let io = rig.root.bar_mapping(address, 0).unwrap();

    rig.cf8_write(address, 0x10, &0x1_0000u32.to_le_bytes());

    assert_eq!(rig.root.bar_mapping(address, 0), Some(io));
}

#[test]
fn bus_is_full_after_31_devices() {
    let rig = rig();
    for slot in 1..32 {
        assert_eq!(rig.add_test_device().0, addr(slot));
    }

    let device = Arc::new(Mutex::new(PciTestDevice::new(rig.sink.clone()).unwrap()));

    assert_eq!(rig.root.add_device(device), Err(PciError::NoFreeSlot));
}

#[test]
fn failed_mapping_adds_nothing() {
    let rig = rig();
    let (first, _) = rig.add_test_device();
    let bar0 = rig.root.bar_mapping(first, 0).unwrap();
    // Occupy where the next device's BARs would go: everything after the first device.
    let squatter = Arc::new(Mutex::new(PciConfigMmio::new(rig.root.clone(), 1)));
    rig.mmio
        .insert("squatter", squatter, bar0 + 0x2000, 0x1000)
        .unwrap();
    let device = Arc::new(Mutex::new(PciTestDevice::new(rig.sink.clone()).unwrap()));

    let result = rig.root.add_device(device);

    assert!(matches!(result, Err(PciError::Bus(_))));
    assert_eq!(rig.root.devices(), vec![addr(0), first]);
    assert!(!rig.mmio.read(bar0 + 0x3000, &mut [0u8; 4]));
}

fn program_vector(rig: &Rig, msix_bar: u64, vector: u64, message: MsiMessage, masked: bool) {
    let entry = msix_bar + vector * MSIX_TABLE_ENTRY_SIZE;
    rig.mmio.write(entry, &message.address.to_le_bytes());
    rig.mmio_write_u32(entry + 8, message.data);
    rig.mmio_write_u32(entry + 12, u32::from(masked));
}

fn enable_msix(rig: &Rig, address: PciAddress, control: u16) {
    // The MSI-X capability is the test device's only one, at 0x40.
    rig.cf8_write(address, 0x42, &control.to_le_bytes());
}

#[test]
fn doorbell_delivers_msix_through_the_buses() {
    let rig = rig();
    let (address, device) = rig.add_test_device();
    let bar0 = rig.root.bar_mapping(address, 0).unwrap();
    let bar1 = rig.root.bar_mapping(address, 1).unwrap();
    let message = MsiMessage {
        address: 0xfee0_0000,
        data: 0x4021,
    };
    program_vector(&rig, bar1, 2, message, false);
    enable_msix(&rig, address, MSIX_ENABLE);

    rig.mmio_write_u32(bar0 + 4, 2);

    assert_eq!(rig.sink.sent(), vec![message]);
    assert_eq!(rig.mmio_read_u32(bar0 + 8), (true, 1));
    assert_eq!(rig.mmio_read_u32(bar0 + 0xc), (true, 0));
    assert_eq!(device.lock().unwrap().trigger_count(), 1);
    rig.mmio_write_u32(bar0 + 4, 9);
    assert_eq!(rig.mmio_read_u32(bar0 + 0xc), (true, 3));
    assert_eq!(rig.mmio_read_u32(bar0 + 8), (true, 1));
}

#[test]
fn masked_doorbell_is_pending_until_unmasked() {
    let rig = rig();
    let (address, _) = rig.add_test_device();
    let bar0 = rig.root.bar_mapping(address, 0).unwrap();
    let bar1 = rig.root.bar_mapping(address, 1).unwrap();
    let message = MsiMessage {
        address: 0xfee0_1000,
        data: 0x31,
    };
    program_vector(&rig, bar1, 1, message, true);
    enable_msix(&rig, address, MSIX_ENABLE);

    rig.mmio_write_u32(bar0 + 4, 1);

    assert!(rig.sink.sent().is_empty());
    assert_eq!(rig.mmio_read_u32(bar0 + 0xc), (true, 1));
    assert_eq!(rig.mmio_read_u32(bar1 + 0x800), (true, 0b10));
    rig.mmio_write_u32(bar1 + 16 + 12, 0);
    assert_eq!(rig.sink.sent(), vec![message]);
    assert_eq!(rig.mmio_read_u32(bar1 + 0x800), (true, 0));
}

#[test]
fn function_mask_in_config_holds_then_releases() {
    let rig = rig();
    let (address, _) = rig.add_test_device();
    let bar0 = rig.root.bar_mapping(address, 0).unwrap();
    let bar1 = rig.root.bar_mapping(address, 1).unwrap();
    let message = MsiMessage {
        address: 0xfee0_0000,
        data: 0x22,
    };
    program_vector(&rig, bar1, 0, message, false);
    enable_msix(&rig, address, MSIX_ENABLE | MSIX_FUNCTION_MASK);

    rig.mmio_write_u32(bar0 + 4, 0);
    assert!(rig.sink.sent().is_empty());
    enable_msix(&rig, address, MSIX_ENABLE);

    assert_eq!(rig.sink.sent(), vec![message]);
}

#[test]
fn disabled_msix_doorbell_sends_nothing() {
    let rig = rig();
    let (address, _) = rig.add_test_device();
    let bar0 = rig.root.bar_mapping(address, 0).unwrap();
    let bar1 = rig.root.bar_mapping(address, 1).unwrap();
    program_vector(&rig, bar1, 0, MsiMessage::default(), false);

    rig.mmio_write_u32(bar0 + 4, 0);

    assert!(rig.sink.sent().is_empty());
    assert_eq!(rig.mmio_read_u32(bar0 + 0xc), (true, 2));
}

#[test]
fn hostile_widths_and_offsets_do_not_panic() {
    let rig = rig();
    let (address, _) = rig.add_test_device();
    let bar0 = rig.root.bar_mapping(address, 0).unwrap();
    let bar1 = rig.root.bar_mapping(address, 1).unwrap();
    let mut data = [0u8; 8];

    for len in [1usize, 2, 3, 4, 5, 8] {
        for offset in [0u64, 1, 2, 3, 5, 7] {
            let buf = &mut data[..len];
            rig.pio.read(CONFIG_PORT + offset, buf);
            rig.pio.write(DATA_PORT + (offset & 3), buf);
            rig.pio.read(DATA_PORT + (offset & 3), buf);
            rig.mmio
                .read(Rig::ecam_offset(address, 0xffc) + offset, buf);
            rig.mmio
                .write(Rig::ecam_offset(address, 0xffe) + offset, buf);
            rig.mmio.read(bar0 + 0xff8 + offset, buf);
            rig.mmio.write(bar0 + 3 + offset, buf);
            rig.mmio.read(bar1 + 0x3c + offset, buf);
            rig.mmio.write(bar1 + 0x7f8 + offset, buf);
            rig.mmio.read(bar1 + 0xff8 + offset, buf);
        }
    }
    let mut cross = [0u8; 4];
    rig.pio.read(DATA_PORT + 2, &mut cross);
    assert_eq!(cross, [0xff; 4], "access crossing CONFIG_DATA's end");
    rig.mmio.read(Rig::ecam_offset(address, 0xffe), &mut cross);
    assert_eq!(
        cross, [0xff; 4],
        "access crossing a function's config space"
    );

    assert_eq!(rig.cf8_read(address, 0, 4), 0x5c1e_1234);
}

/// xorshift64: deterministic pseudo-random numbers without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_config_writes_never_change_identity_or_panic() {
    let rig = rig();
    let (first, _) = rig.add_test_device();
    let recorder = Arc::new(Mutex::new(MoveRecorder::new()));
    let second = rig.root.add_device(recorder).unwrap();
    let targets = [addr(0), first, second, addr(7)];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);

    for _ in 0..20_000 {
        let target = targets[(rng.next() % 4) as usize];
        let len = [1usize, 2, 4, 8][(rng.next() % 4) as usize];
        // Mostly the header and capability area, sometimes anywhere.
        let register = if rng.next().is_multiple_of(4) {
            (rng.next() % 0x1000) as usize
        } else {
            (rng.next() % 0x50) as usize
        };
        let value = rng.next().to_le_bytes();
        if rng.next().is_multiple_of(2) {
            rig.ecam_write(target, register, &value[..len]);
        } else {
            rig.cf8_write(target, register, &value[..len.min(4)]);
        }
        // Bursts of bus traffic wherever the BARs currently are.
        if let Some(bar0) = rig.root.bar_mapping(first, 0) {
            let mut data = [0u8; 4];
            rig.mmio.read(bar0 + (rng.next() % 0x1000), &mut data);
        }
    }

    assert_eq!(rig.cf8_read(addr(0), 0, 4), 0x0008_1b36);
    assert_eq!(rig.ecam_read(first, 0, 4), 0x5c1e_1234);
    assert_eq!(rig.ecam_read(second, 0, 4), 0x1000_1af4);
    assert_eq!(rig.cf8_read(first, 0x08, 4) >> 8, 0xff_0000);
    assert_eq!(rig.cf8_read(first, 0x34, 1), 0x40);
}

#[test]
fn bar_moves_from_config_writes_race_bar_accesses_without_deadlock() {
    let rig = rig();
    let (address, _) = rig.add_test_device();
    let home = rig.root.bar_mapping(address, 0).unwrap();
    let away = 0xd000_0000u64;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Arc::new(std::sync::Barrier::new(2));
    let accessor = {
        let (mmio, stop, started) = (rig.mmio.clone(), stop.clone(), started.clone());
        std::thread::spawn(move || {
            started.wait();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for base in [home, away] {
                    let mut data = [0u8; 4];
                    mmio.read(base + 8, &mut data);
                    mmio.write(base, &[1, 2, 3, 4]);
                }
            }
        })
    };
    started.wait();

    for i in 0..2_000u64 {
        let target = if i % 2 == 0 { away } else { home };
        rig.ecam_write(address, 0x10, &(target as u32).to_le_bytes());
        let command = if i % 3 == 0 {
            0u16
        } else {
            COMMAND_MEMORY_SPACE
        };
        rig.cf8_write(address, 0x04, &command.to_le_bytes());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    accessor.join().unwrap();

    rig.cf8_write(address, 0x04, &COMMAND_MEMORY_SPACE.to_le_bytes());
    let final_bar = rig.cf8_read(address, 0x10, 4);
    assert_eq!(rig.root.bar_mapping(address, 0), Some(final_bar));
    rig.mmio_write_u32(final_bar, 0x0403_0201);
    assert_eq!(rig.mmio_read_u32(final_bar), (true, 0x0403_0201));
}

/// Hands out recording lines and remembers which GSI each was connected to.
#[derive(Default)]
struct RecordingIntxRouter {
    lines: Mutex<Vec<(u32, Arc<RecordingLevelLine>)>>,
}

#[derive(Default)]
struct RecordingLevelLine {
    levels: Mutex<Vec<bool>>,
}

impl sluice_bus::irq::LevelIrqLine for RecordingLevelLine {
    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        self.levels.lock().unwrap().push(asserted);
        Ok(())
    }
}

impl sluice_bus::irq::LevelIrqRouter for RecordingIntxRouter {
    fn connect(&self, gsi: u32) -> std::io::Result<Arc<dyn sluice_bus::irq::LevelIrqLine>> {
        let line = Arc::new(RecordingLevelLine::default());
        self.lines.lock().unwrap().push((gsi, line.clone()));
        Ok(line)
    }
}

#[test]
fn intx_pins_are_routed_swizzled_and_the_line_register_names_the_gsi() {
    let rig = rig();
    let router = Arc::new(RecordingIntxRouter::default());
    let routing = IntxRouting::new(16, 8).unwrap();
    rig.root.set_intx(router.clone(), routing);

    let (first, _) = rig.add_test_device();
    let (second, _) = rig.add_test_device();

    let gsis: Vec<u32> = router.lines.lock().unwrap().iter().map(|l| l.0).collect();
    assert_eq!(gsis, vec![17, 18], "slots 1 and 2, INTA, swizzled");
    assert_eq!(rig.cf8_read(first, INTERRUPT_PIN, 1), 1);
    assert_eq!(rig.cf8_read(first, INTERRUPT_LINE, 1), 17);
    assert_eq!(rig.cf8_read(second, INTERRUPT_LINE, 1), 18);
    assert_eq!(rig.root.intx_routing(), Some(routing));
}

#[test]
fn test_device_intx_asserts_reads_clear_and_respects_interrupt_disable() {
    let rig = rig();
    let router = Arc::new(RecordingIntxRouter::default());
    rig.root
        .set_intx(router.clone(), IntxRouting::new(16, 8).unwrap());
    let (address, _) = rig.add_test_device();
    let bar0 = rig.root.bar_mapping(address, 0).unwrap();
    let line = router.lines.lock().unwrap()[0].1.clone();
    let levels = || line.levels.lock().unwrap().clone();
    let status_interrupt = || rig.cf8_read(address, STATUS, 2) & u64::from(STATUS_INTERRUPT);

    rig.mmio.write(bar0 + 0x10, &5u32.to_le_bytes());
    assert_eq!(levels(), vec![true]);
    assert_ne!(status_interrupt(), 0);
    let mut isr = [0u8; 4];
    rig.mmio.read(bar0 + 0x14, &mut isr);
    assert_eq!(u32::from_le_bytes(isr), 5);
    assert_eq!(levels(), vec![true, false]);
    assert_eq!(status_interrupt(), 0);

    let command = rig.cf8_read(address, COMMAND, 2) as u16 | COMMAND_INTX_DISABLE;
    rig.cf8_write(address, COMMAND, &command.to_le_bytes());
    rig.mmio.write(bar0 + 0x10, &1u32.to_le_bytes());
    assert_eq!(
        levels(),
        vec![true, false],
        "Interrupt Disable holds the line"
    );
    rig.cf8_write(
        address,
        COMMAND,
        &(command & !COMMAND_INTX_DISABLE).to_le_bytes(),
    );
    assert_eq!(levels(), vec![true, false, true]);
}

#[test]
fn without_a_router_the_pin_stays_unconnected_and_the_line_unknown() {
    let rig = rig();

    let (address, _) = rig.add_test_device();

    assert_eq!(rig.cf8_read(address, INTERRUPT_PIN, 1), 1);
    assert_eq!(
        rig.cf8_read(address, INTERRUPT_LINE, 1),
        u64::from(INTERRUPT_LINE_UNKNOWN)
    );
}

#[test]
fn add_device_with_builds_the_device_for_its_address() {
    let rig = rig();
    let sink = rig.sink.clone();

    let address = rig
        .root
        .add_device_with(|address| {
            assert_eq!(address, addr(1));
            let dev = PciTestDevice::new(sink).unwrap();
            Ok::<SharedPciDevice, PciError>(Arc::new(Mutex::new(dev)))
        })
        .unwrap();
    let refused = rig
        .root
        .add_device_with(|_| Err::<SharedPciDevice, _>(PciError::NoFreeSlot));

    assert_eq!(address, addr(1));
    assert_eq!(refused, Err(PciError::NoFreeSlot));
    assert_eq!(rig.root.devices(), vec![addr(0), addr(1)]);
}

/// Hot-unplug: the function's config space reads all ones, its BAR leaves the bus, the slot is
/// free for the next device, and the host bridge or an empty slot cannot be removed.
#[test]
fn a_removed_function_leaves_config_space_and_the_bus_and_frees_its_slot() {
    let rig = rig();
    let (first, _) = rig.add_test_device();
    let (second, _) = rig.add_test_device();
    let bar0 = rig.cf8_read(first, 0x10, 4);

    let removed = rig.root.remove_device(first);

    assert!(removed.is_ok());
    assert_eq!(rig.cf8_read(first, 0, 4), 0xffff_ffff);
    assert_eq!(rig.root.bar_mapping(first, 0), None);
    assert!(!rig.mmio_read_u32(bar0).0, "nothing decodes the old BAR");
    assert_eq!(rig.root.devices(), vec![addr(0), second]);
    assert_eq!(rig.root.functions().len(), 1);
    assert_eq!(rig.add_test_device().0, first, "the freed slot is reused");
    assert_eq!(
        rig.root.remove_device(addr(0)).err(),
        Some(PciError::NoDevice(addr(0)))
    );
    assert_eq!(
        rig.root.remove_device(addr(9)).err(),
        Some(PciError::NoDevice(addr(9)))
    );
}

/// A function whose saved state is a number.
struct Saving(ConfigSpace, u64);

impl Saving {
    fn shared(value: u64) -> SharedPciDevice {
        let config = ConfigSpace::new(&PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1000,
            ..PciIds::default()
        });
        Arc::new(Mutex::new(Saving(config, value)))
    }
}

impl PciDevice for Saving {
    fn name(&self) -> &str {
        "saving"
    }
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.0
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, _data: &mut [u8]) {}
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn save_state(&mut self) -> Option<Result<serde_json::Value, String>> {
        Some(Ok(self.1.into()))
    }
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.1 = state.as_u64().ok_or("not a number")?;
        Ok(())
    }
}

/// A restore needs the saved functions, no fewer and no more: a root with an extra function
/// (a device removed at the source but given to the destination) or one short is refused
/// naming the addresses; the same shape restores.
#[test]
fn a_restore_into_other_functions_is_refused_naming_them() {
    let source = rig();
    source.root.add_device(Saving::shared(7)).unwrap();
    let states = source.root.save_states().unwrap();
    let extra = rig();
    extra.root.add_device(Saving::shared(0)).unwrap();
    extra.root.add_device(Saving::shared(0)).unwrap();
    let short = rig();
    let same = rig();
    let same_device = Saving::shared(0);
    same.root.add_device(same_device.clone()).unwrap();

    let extra_refusal = extra.root.restore_states(&states).unwrap_err();
    let short_refusal = short.root.restore_states(&states).unwrap_err();
    same.root.restore_states(&states).unwrap();

    assert!(extra_refusal.contains("not saved"), "{extra_refusal}");
    assert!(
        extra_refusal.contains("00:02.0 (saving)"),
        "{extra_refusal}"
    );
    assert!(
        short_refusal.contains("missing here: 00:01.0"),
        "{short_refusal}"
    );
    let restored = same_device.lock().unwrap().save_state();
    assert_eq!(restored, Some(Ok(7u64.into())));
}
