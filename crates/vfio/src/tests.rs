//! The trap policy over a fake function, and the host checks over a fake sysfs tree.

use std::path::Path;
use std::sync::Mutex;

use sluice_pci::{BarSpec, COMMAND_BUS_MASTER, COMMAND_MEMORY_SPACE, NUM_BARS};
use vmm_sys_util::tempdir::TempDir;

use crate::host::*;
use crate::policy::*;

/// A function's config space in memory; the test keeps a handle to see what the device got.
struct FakeFunction {
    bytes: std::sync::Arc<Mutex<Vec<u8>>>,
}

impl DeviceConfig for FakeFunction {
    fn read(&self, offset: usize, data: &mut [u8]) {
        let bytes = self.bytes.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&self, offset: usize, data: &[u8]) {
        let mut bytes = self.bytes.lock().unwrap();
        bytes[offset..offset + data.len()].copy_from_slice(data);
    }
}

fn put(image: &mut [u8], offset: usize, value: u32, len: usize) {
    image[offset..offset + len].copy_from_slice(&value.to_le_bytes()[..len]);
}

/// An NVMe VF as QEMU builds it, plus an MSI and SR-IOV/ACS capabilities to hide:
/// PM 0x40 → MSI 0x50 → MSI-X 0x60 (2 vectors, table BAR0+0x2000, PBA BAR0+0x3000) → PCIe 0x70;
/// extended: SR-IOV 0x100 → AER 0x140 → ACS 0x180 → DSN 0x1a0.
fn nvme_vf_image() -> Vec<u8> {
    let mut c = vec![0u8; 4096];
    put(&mut c, 0x00, 0x0010_1b36, 4);
    put(&mut c, 0x04, 0x0010_0000, 4); // command 0, status: capability list
    put(&mut c, 0x08, 0x0108_0202, 4); // class 01 08 02, revision 2
    put(&mut c, 0x10, 0x0000_0004, 4); // 64-bit memory BAR
    put(&mut c, 0x2c, 0x1100_1af4, 4);
    c[0x34] = 0x40;
    c[0x3d] = 1; // the bogus INTx pin
    put(&mut c, 0x40, 0x0003_5001, 4); // PM, next 0x50
    put(&mut c, 0x44, 0x0000_0003, 4); // PMCSR: D3hot
    put(&mut c, 0x50, 0x0080_6005, 4); // MSI, next 0x60
    put(&mut c, 0x60, 0x0001_7011, 4); // MSI-X, next 0x70, 2 vectors
    put(&mut c, 0x64, 0x0000_2000, 4);
    put(&mut c, 0x68, 0x0000_3000, 4);
    put(&mut c, 0x70, 0x0002_0010, 4); // PCIe, last
    put(&mut c, 0x78, 0x0000_2810, 4); // device control
    put(&mut c, 0x100, 0x1401_0010, 4); // SR-IOV, next 0x140
    put(&mut c, 0x140, 0x1801_0001, 4); // AER, next 0x180
    put(&mut c, 0x144, 0x0000_0abc, 4);
    put(&mut c, 0x180, 0x1a01_000d, 4); // ACS, next 0x1a0
    put(&mut c, 0x1a0, 0x0001_0003, 4); // DSN, last
    c
}

fn bars() -> [Option<BarSpec>; NUM_BARS] {
    let mut bars = [None; NUM_BARS];
    bars[0] = Some(BarSpec::mem64(0x4000));
    bars
}

fn build(image: Vec<u8>) -> (VirtualConfig, std::sync::Arc<Mutex<Vec<u8>>>) {
    let bytes = std::sync::Arc::new(Mutex::new(image));
    let fake = FakeFunction {
        bytes: bytes.clone(),
    };
    (
        VirtualConfig::build(Box::new(fake), &bars()).unwrap(),
        bytes,
    )
}

fn read(config: &VirtualConfig, offset: usize, len: usize) -> u32 {
    let mut data = [0u8; 4];
    config.read(offset, &mut data[..len]);
    u32::from_le_bytes(data)
}

/// The capability ids the guest finds walking the list from 0x34.
fn guest_capabilities(config: &VirtualConfig) -> Vec<(usize, u8)> {
    let mut found = Vec::new();
    let mut offset = read(config, 0x34, 1) as usize;
    while offset != 0 && found.len() < 48 {
        found.push((offset, read(config, offset, 1) as u8));
        offset = read(config, offset + 1, 1) as usize;
    }
    found
}

fn guest_extended_capabilities(config: &VirtualConfig) -> Vec<(usize, u16)> {
    let mut found = Vec::new();
    let mut offset = 0x100;
    while offset != 0 && found.len() < 64 {
        let header = read(config, offset, 4);
        if header == 0 {
            break;
        }
        found.push((offset, (header & 0xffff) as u16));
        offset = (header >> 20) as usize;
    }
    found
}

#[test]
fn guest_sees_pm_msix_and_pcie_but_not_msi() {
    let (config, _) = build(nvme_vf_image());

    let caps = guest_capabilities(&config);

    assert_eq!(
        caps,
        vec![(0x40, CAP_ID_PM), (0x60, CAP_ID_MSIX), (0x70, CAP_ID_PCIE)]
    );
    assert_eq!(
        read(&config, 0x50, 4),
        0,
        "the hidden MSI capability reads zero"
    );
    assert_eq!(config.access_at(0x52), Access::Hidden);
}

#[test]
fn sriov_and_acs_are_unlinked_from_the_extended_list() {
    let (config, device) = build(nvme_vf_image());

    let ext = guest_extended_capabilities(&config);

    // 0x100 is a null header (id 0) standing in for SR-IOV, pointing on.
    assert_eq!(ext, vec![(0x100, 0), (0x140, 0x0001), (0x1a0, 0x0003)]);
    assert_eq!(read(&config, 0x104, 4), 0, "the SR-IOV body is hidden");
    assert_eq!(read(&config, 0x184, 4), 0, "the ACS body is hidden");
    // AER's body is read from the device, live.
    put(&mut device.lock().unwrap(), 0x144, 0x0000_0def, 4);
    assert_eq!(read(&config, 0x144, 4), 0xdef);
}

#[test]
fn bars_are_sized_and_placed_in_the_shadow_only() {
    let (mut config, device) = build(nvme_vf_image());

    config.write(0x10, &u32::MAX.to_le_bytes());
    config.write(0x14, &u32::MAX.to_le_bytes());
    let low = read(&config, 0x10, 4);
    let high = read(&config, 0x14, 4);
    config.write(0x10, &0xc000_0000u32.to_le_bytes());
    config.write(0x14, &0u32.to_le_bytes());

    assert_eq!(
        low,
        !(0x4000 - 1) | 0x4,
        "size mask with the 64-bit memory type"
    );
    assert_eq!(high, u32::MAX);
    assert_eq!(config.shadow().bar_address(0), Some(0xc000_0000));
    assert_eq!(device.lock().unwrap()[0x10..0x18], [4, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn command_decode_and_bus_master_reach_the_device_other_bits_do_not() {
    let image = nvme_vf_image();
    let (mut config, device) = build(image);
    // The device has INTx disabled (bit 10), as vfio-pci leaves it.
    put(&mut device.lock().unwrap(), 0x04, 0x0400, 2);

    config.write(
        0x04,
        &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | 0x0040).to_le_bytes(),
    );

    let on_device = {
        let bytes = device.lock().unwrap();
        u16::from_le_bytes([bytes[4], bytes[5]])
    };
    assert_eq!(
        on_device,
        0x0400 | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER
    );
    let seen = read(&config, 0x04, 4);
    assert_eq!(
        seen & 0xffff,
        u32::from(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | 0x0040)
    );
    assert_ne!(
        seen >> 16 & 0x10,
        0,
        "status shows the capability list in the same dword"
    );
}

#[test]
fn pcie_capability_reads_the_device_and_drops_writes() {
    let (mut config, device) = build(nvme_vf_image());

    config.write(0x78, &0x8000u16.to_le_bytes()); // Initiate FLR
    put(&mut device.lock().unwrap(), 0x7a, 0x0004, 2); // device status changes on the device

    assert_eq!(read(&config, 0x78, 2), 0x2810, "no FLR from the guest");
    assert_eq!(read(&config, 0x7a, 2), 0x0004);
}

#[test]
fn pm_reads_d0_and_drops_power_state_writes() {
    let (mut config, device) = build(nvme_vf_image());

    config.write(0x44, &3u16.to_le_bytes());

    assert_eq!(read(&config, 0x44, 2), 0);
    assert_eq!(device.lock().unwrap()[0x44], 3, "device untouched");
}

#[test]
fn msix_layout_comes_from_the_device_and_only_enable_and_mask_are_writable() {
    let (mut config, _) = build(nvme_vf_image());

    config.write(0x62, &0xffffu16.to_le_bytes());
    let layout = config.msix().unwrap();

    assert_eq!(layout.cap_offset, 0x60);
    assert_eq!(layout.capability.vectors, 2);
    assert_eq!(
        (layout.capability.table_bar, layout.capability.table_offset),
        (0, 0x2000)
    );
    assert_eq!(
        (layout.capability.pba_bar, layout.capability.pba_offset),
        (0, 0x3000)
    );
    assert_eq!(read(&config, 0x62, 2), 0xc001);
}

#[test]
fn rom_is_hidden_and_the_quirk_clears_the_bogus_pin() {
    let (mut config, _) = build(nvme_vf_image());

    config.write(0x30, &u32::MAX.to_le_bytes());

    assert_eq!(read(&config, 0x30, 4), 0);
    assert_eq!(read(&config, 0x3d, 1), 0);
    assert!(config
        .rules()
        .iter()
        .any(|r| r.offset == 0x3d && r.len == 1));
}

#[test]
fn quarantine_clears_bus_master_on_the_device() {
    let (mut config, device) = build(nvme_vf_image());
    config.write(
        0x04,
        &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
    );

    config.clear_bus_master();

    assert_eq!(device.lock().unwrap()[4], COMMAND_MEMORY_SPACE as u8);
    assert_eq!(read(&config, 0x04, 2), u32::from(COMMAND_MEMORY_SPACE));
}

#[test]
fn malformed_capability_lists_are_refused_or_bounded() {
    let mut looping = nvme_vf_image();
    put(&mut looping, 0x70, 0x0002_7010, 4); // PCIe points at itself
    let mut ext_loop = nvme_vf_image();
    put(&mut ext_loop, 0x1a0, 0x1a01_0003, 4); // DSN points at itself
    let mut gone = nvme_vf_image();
    gone.iter_mut().for_each(|b| *b = 0xff);

    let bytes = |image| FakeFunction {
        bytes: std::sync::Arc::new(Mutex::new(image)),
    };
    let looping = VirtualConfig::build(Box::new(bytes(looping)), &bars());
    let ext_loop = VirtualConfig::build(Box::new(bytes(ext_loop)), &bars()).unwrap();
    let gone = VirtualConfig::build(Box::new(bytes(gone)), &bars());

    assert!(matches!(looping, Err(PolicyError::BadCapabilityList(_))));
    assert_eq!(guest_extended_capabilities(&ext_loop).len(), 3);
    assert_eq!(gone.unwrap_err(), PolicyError::Unreadable);
}

#[test]
fn msix_table_outside_its_bar_is_refused() {
    let mut image = nvme_vf_image();
    put(&mut image, 0x64, 0x0000_4000, 4); // table at the BAR's end

    let fake = FakeFunction {
        bytes: std::sync::Arc::new(Mutex::new(image)),
    };

    assert!(matches!(
        VirtualConfig::build(Box::new(fake), &bars()),
        Err(PolicyError::Msix(_))
    ));
}

// ---- host checks over a fake sysfs tree ----

struct FakeHost {
    dir: TempDir,
}

impl FakeHost {
    fn new() -> Self {
        Self {
            dir: TempDir::new().unwrap(),
        }
    }

    fn root(&self) -> &Path {
        self.dir.as_path()
    }

    /// A function in `group` with `driver` (or none) and `class`.
    fn function(&self, bdf: &str, group: u32, driver: Option<&str>, class: u32) {
        let root = self.root();
        let device = root.join("sys/bus/pci/devices").join(bdf);
        std::fs::create_dir_all(&device).unwrap();
        let group_dir = root.join(format!("sys/kernel/iommu_groups/{group}/devices"));
        std::fs::create_dir_all(&group_dir).unwrap();
        std::os::unix::fs::symlink(&device, group_dir.join(bdf)).unwrap();
        std::os::unix::fs::symlink(
            root.join(format!("sys/kernel/iommu_groups/{group}")),
            device.join("iommu_group"),
        )
        .unwrap();
        if let Some(driver) = driver {
            let driver_dir = root.join("sys/bus/pci/drivers").join(driver);
            std::fs::create_dir_all(&driver_dir).unwrap();
            std::os::unix::fs::symlink(driver_dir, device.join("driver")).unwrap();
        }
        std::fs::write(device.join("class"), format!("{class:#08x}\n")).unwrap();
    }
}

fn bdf(s: &str) -> HostBdf {
    HostBdf::parse(s).unwrap()
}

const NVME_CLASS: u32 = 0x010802;
const BRIDGE_CLASS: u32 = 0x060400;

#[test]
fn a_function_alone_in_its_group_is_accepted() {
    let host = FakeHost::new();
    host.function("0000:01:00.1", 6, Some("vfio-pci"), NVME_CLASS);

    let group = check_group(host.root(), &bdf("01:00.1"), &[bdf("01:00.1")]);

    assert_eq!(group, Ok(6));
}

#[test]
fn group_members_on_other_drivers_are_named_in_one_refusal() {
    let host = FakeHost::new();
    host.function("0000:01:00.0", 5, Some("vfio-pci"), NVME_CLASS);
    host.function("0000:01:00.1", 5, Some("nvme"), NVME_CLASS);
    host.function("0000:01:00.2", 5, None, NVME_CLASS);
    host.function("0000:00:1c.0", 5, Some("pcieport"), BRIDGE_CLASS);

    let err = check_group(host.root(), &bdf("0000:01:00.0"), &[bdf("01:00.0")]).unwrap_err();

    let message = err.to_string();
    assert!(message.contains("IOMMU group 5"), "{message}");
    assert!(message.contains("0000:01:00.1 (driver nvme)"), "{message}");
    assert!(message.contains("0000:01:00.2 (no driver)"), "{message}");
    assert!(!message.contains("1c.0"), "bridges are exempt: {message}");
}

#[test]
fn a_vfio_member_must_be_given_to_this_vm_too() {
    let host = FakeHost::new();
    host.function("0000:02:00.0", 7, Some("vfio-pci"), NVME_CLASS);
    host.function("0000:02:00.1", 7, Some("vfio-pci"), NVME_CLASS);

    let alone = check_group(host.root(), &bdf("02:00.0"), &[bdf("02:00.0")]);
    let both = check_group(
        host.root(),
        &bdf("02:00.0"),
        &[bdf("02:00.0"), bdf("02:00.1")],
    );

    assert!(alone
        .unwrap_err()
        .to_string()
        .contains("0000:02:00.1 (vfio-pci, not given to this VM)"));
    assert_eq!(both, Ok(7));
}

#[test]
fn a_function_not_bound_to_vfio_pci_is_refused_with_its_driver() {
    let host = FakeHost::new();
    host.function("0000:01:00.2", 8, None, NVME_CLASS);
    host.function("0000:01:00.3", 9, Some("nvme"), NVME_CLASS);

    let unbound = check_group(host.root(), &bdf("01:00.2"), &[bdf("01:00.2")]).unwrap_err();
    let nvme = check_group(host.root(), &bdf("01:00.3"), &[bdf("01:00.3")]).unwrap_err();

    assert_eq!(
        unbound.to_string(),
        "0000:01:00.2 is not bound to vfio-pci (no driver); bind it first (driver_override + drivers_probe)"
    );
    assert!(nvme.to_string().contains("(driver nvme)"), "{nvme}");
}

#[test]
fn a_function_without_a_group_is_refused() {
    let host = FakeHost::new();

    let err = check_group(host.root(), &bdf("03:00.0"), &[]).unwrap_err();

    assert!(matches!(err, GroupError::NoGroup { .. }));
}

#[test]
fn bdfs_parse_from_short_long_and_sysfs_forms() {
    assert_eq!(bdf("01:00.1").as_str(), "0000:01:00.1");
    assert_eq!(
        bdf("/sys/bus/pci/devices/0000:01:00.1/").as_str(),
        "0000:01:00.1"
    );
    assert!(HostBdf::parse("01:20.0").is_err());
    assert!(HostBdf::parse("01:00.8").is_err());
    assert!(HostBdf::parse("../etc").is_err());
}

#[test]
fn interrupt_remapping_is_read_from_the_irqchip_names() {
    let host = FakeHost::new();
    let proc_dir = host.root().join("proc");
    std::fs::create_dir_all(&proc_dir).unwrap();
    std::fs::write(
        proc_dir.join("interrupts"),
        "  0:  12  IO-APIC  2-edge  timer\n",
    )
    .unwrap();
    let without = interrupt_remapping(host.root());
    std::fs::write(
        proc_dir.join("interrupts"),
        "  0:  12  IR-IO-APIC  2-edge  timer\n 24:  3  IR-PCI-MSI 512000-edge nvme0q0\n",
    )
    .unwrap();
    let with = interrupt_remapping(host.root());

    assert!(!without.enabled);
    assert!(with.enabled);
    let refusal = check_interrupt_remapping(without, false).unwrap_err();
    assert!(refusal.contains("allow_unsafe_interrupts=on"), "{refusal}");
    assert!(check_interrupt_remapping(without, true).is_ok());
    assert!(check_interrupt_remapping(with, false).is_ok());
}

#[test]
fn pinning_more_than_the_memlock_limit_is_refused_with_the_amounts() {
    let limits = PinLimits {
        memlock: Some(64 << 20),
        ipc_lock: false,
        cgroup_max: None,
        cgroup_path: None,
    };

    let refusal = check_pin_limits(&limits, 512 << 20).unwrap_err();

    assert!(
        refusal.contains("RLIMIT_MEMLOCK is 64 MiB, 512 MiB needed"),
        "{refusal}"
    );
    assert!(check_pin_limits(&limits, 64 << 20).is_ok());
    let privileged = PinLimits {
        ipc_lock: true,
        ..limits
    };
    assert!(
        check_pin_limits(&privileged, 512 << 20).is_ok(),
        "CAP_IPC_LOCK lifts the rlimit"
    );
}

#[test]
fn pinning_more_than_the_memory_cgroup_allows_is_refused() {
    let limits = PinLimits {
        memlock: None,
        ipc_lock: true,
        cgroup_max: Some(256 << 20),
        cgroup_path: Some("/sys/fs/cgroup/vm/memory.max".into()),
    };

    let refusal = check_pin_limits(&limits, 1 << 30).unwrap_err();

    assert!(
        refusal.contains("/sys/fs/cgroup/vm/memory.max is 256 MiB, 1024 MiB needed"),
        "{refusal}"
    );
}

#[test]
fn the_process_memlock_rlimit_is_what_the_check_reads() {
    let mut saved = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut saved) };
    assert_eq!(got, 0);
    let low = libc::rlimit {
        rlim_cur: (1 << 20).min(saved.rlim_max),
        rlim_max: saved.rlim_max,
    };
    // Lowering the soft limit is always allowed; nothing in this test binary locks memory.
    // SAFETY: setrlimit reads the struct.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const low) };
    assert_eq!(set, 0);

    let limits = current_pin_limits(Path::new("/"));

    // SAFETY: restores the limit read above.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const saved) };
    let limits = limits.unwrap();
    assert_eq!(limits.memlock, Some(low.rlim_cur));
    if !limits.ipc_lock {
        let refusal = check_pin_limits(&limits, 512 << 20).unwrap_err();
        assert!(refusal.contains("RLIMIT_MEMLOCK is 1 MiB"), "{refusal}");
    }
}
