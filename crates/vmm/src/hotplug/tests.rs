//! The controller on a real KVM VM and PCI root, without a guest: the guest's side is played
//! by writes to the register block, as its `_EJ0` AML would do them.

use std::sync::{Arc, Mutex};

use sluice_bus::{Bus, BusDevice};
use sluice_dma::DmaSpaces;
use sluice_pci::{BarAllocator, PciRoot};

use super::registers::{PCEJ_OFFSET, PCIU_OFFSET, PCPR_OFFSET};
use super::*;
use crate::interrupts::IrqfdLine;
use crate::memory::GuestRam;

struct Rig {
    hotplug: Arc<Hotplug>,
    port: HotplugPort,
    root: Arc<PciRoot>,
    metrics: Arc<Mutex<Vec<Arc<DeviceMetrics>>>>,
    qos: Arc<crate::qos::QosDisks>,
    _vm: Arc<kvm_ioctls::VmFd>,
}

fn rig() -> Option<Rig> {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        println!("SKIP hotplug controller test: /dev/kvm unusable");
        return None;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let ram = GuestRam::new(32 << 20).unwrap();
    let allocator = BarAllocator::new(
        sluice_pci::AddressWindow::new(0xc000_0000, 0x2000_0000).unwrap(),
        sluice_pci::AddressWindow::new(0x10_0000_0000, 0x4_0000_0000).unwrap(),
        sluice_pci::AddressWindow::new(0xc000, 0x4000).unwrap(),
    )
    .unwrap();
    let root = Arc::new(PciRoot::new(
        Arc::new(Bus::new()),
        Arc::new(Bus::new()),
        allocator,
    ));
    let irq = Arc::new(IrqfdLine::new(&vm, crate::layout::HOTPLUG_GED_IRQ).unwrap());
    let metrics = Arc::new(Mutex::new(Vec::new()));
    let qos = Arc::new(crate::qos::QosDisks::default());
    let hotplug = Hotplug::new(
        root.clone(),
        irq,
        Wiring {
            dma: Arc::new(DmaSpaces::identity(ram.memory.clone())),
            interrupts: VmInterrupts::new(&vm),
            qos: qos.clone(),
            vfio: None,
        },
        metrics.clone(),
        &[],
        Vec::new(),
    );
    let port = hotplug.port();
    Some(Rig {
        hotplug,
        port,
        root,
        metrics,
        qos,
        _vm: vm,
    })
}

fn read32(port: &mut HotplugPort, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    port.read(0, offset, &mut data);
    u32::from_le_bytes(data)
}

fn disk(path: &std::path::Path) -> DiskSpec {
    DiskSpec::parse(&format!("path={}", path.display())).unwrap()
}

/// A plugged disk holds its image's lock, is announced in PCIU and listed; an eject request
/// leaves it in place; the guest's PCEJ write takes it off the bus and out of the list and
/// counters, and closes the image (its lock is free again).
#[test]
fn a_plugged_disk_is_announced_and_the_guests_eject_removes_it_and_frees_its_image() {
    let Some(mut rig) = rig() else { return };
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().set_len(1 << 20).unwrap();

    let info = rig
        .hotplug
        .add_disk(&disk(image.as_path()), Some("hot0".into()))
        .unwrap();
    let locked = sluice_storage::DiskImage::open(image.as_path(), false, false);
    let announced = read32(&mut rig.port, PCIU_OFFSET);
    let requested = rig.hotplug.remove("hot0").unwrap();
    let still_there = rig.root.functions().len();
    rig.port.write(0, PCEJ_OFFSET, &(1u32 << 1).to_le_bytes());

    assert_eq!(info.bdf, "00:01.0");
    assert!(locked.is_err(), "the plugged disk holds the image lock");
    assert_eq!(announced, 1 << 1);
    assert_eq!(requested.state, DeviceState::EjectRequested);
    assert_eq!(still_there, 1, "an eject request alone removes nothing");
    assert!(rig.root.functions().is_empty());
    assert!(rig.hotplug.devices().is_empty());
    assert!(rig.metrics.lock().unwrap().is_empty());
    assert_eq!(read32(&mut rig.port, PCPR_OFFSET), 0);
    assert_eq!(rig.hotplug.counters().ejects, 1);
    assert!(rig.hotplug.changed());
    assert!(
        sluice_storage::DiskImage::open(image.as_path(), false, false).is_ok(),
        "the removed disk's image is closed and unlocked"
    );
}

/// A migration waits for a requested eject to complete: while the guest has not run `_EJ0`
/// the blocker names the device; once it has, nothing blocks (the VM's devices changed, but a
/// destination with its current devices can take it). A VM without VFIO wiring refuses
/// `vm.add-device` as a conflict.
#[test]
fn a_pending_eject_blocks_a_migration_until_the_guest_completes_it() {
    let Some(mut rig) = rig() else { return };
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().set_len(1 << 20).unwrap();
    rig.hotplug
        .add_disk(&disk(image.as_path()), Some("hot0".into()))
        .unwrap();

    let with_the_disk = rig.hotplug.migration_blocker();
    rig.hotplug.remove("hot0").unwrap();
    let pending = rig.hotplug.migration_blocker();
    rig.port.write(0, PCEJ_OFFSET, &(1u32 << 1).to_le_bytes());
    let after = rig.hotplug.migration_blocker();
    let vfio = crate::config::parse_device("vfio=0000:01:00.0").unwrap();
    let refused = rig.hotplug.add_vfio(&vfio, None);

    assert_eq!(with_the_disk, None, "a plugged virtio disk can migrate");
    let pending = pending.expect("an eject pending blocks");
    assert!(
        pending.contains("hot0") && pending.contains("eject pending"),
        "{pending}"
    );
    assert_eq!(after, None);
    assert!(
        matches!(refused, Err(HotplugError::Conflict(_))),
        "{refused:?}"
    );
}

/// Ids: taken ones, bad ones and `device` (the scheduler's in vm.qos) are refused, unknown ones are 404s, a request log on a
/// hot-plugged disk is refused (400), and a guest eject of an empty slot is counted and
/// changes nothing.
#[test]
fn ids_are_checked_and_an_eject_of_an_empty_slot_is_ignored() {
    let Some(mut rig) = rig() else { return };
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().set_len(1 << 20).unwrap();
    let other = vmm_sys_util::tempfile::TempFile::new().unwrap();
    other.as_file().set_len(1 << 20).unwrap();
    let first = rig.hotplug.add_disk(&disk(image.as_path()), None).unwrap();

    let taken = rig
        .hotplug
        .add_disk(&disk(other.as_path()), Some("disk0".into()));
    let bad = rig
        .hotplug
        .add_disk(&disk(other.as_path()), Some("a b".into()));
    let scheduler = rig
        .hotplug
        .add_disk(&disk(other.as_path()), Some("device".into()));
    let unknown = rig.hotplug.remove("disk7");
    let logged = DiskSpec::parse(&format!(
        "path={},requests={}.requests",
        other.as_path().display(),
        other.as_path().display()
    ))
    .unwrap();
    let with_request_log = rig.hotplug.add_disk(&logged, None);
    rig.port.write(0, PCEJ_OFFSET, &(1u32 << 9).to_le_bytes());

    assert_eq!(first.id, "disk0");
    assert!(
        matches!(&with_request_log, Err(HotplugError::BadRequest(e)) if e.contains("requests=")),
        "{with_request_log:?}"
    );
    assert!(matches!(taken, Err(HotplugError::Conflict(_))), "{taken:?}");
    assert!(matches!(bad, Err(HotplugError::BadRequest(_))), "{bad:?}");
    assert!(
        matches!(&scheduler, Err(HotplugError::BadRequest(e)) if e.contains("I/O scheduler")),
        "{scheduler:?}"
    );
    assert_eq!(unknown, Err(HotplugError::NotFound("disk7".into())));
    assert_eq!(rig.hotplug.counters().ejects_ignored, 1);
    assert_eq!(rig.hotplug.devices().len(), 1);
}

/// A hot-plugged disk behind the I/O scheduler (`weight=`) is listed by `vm.qos` while
/// plugged; once the guest ejects it, it leaves the list and the scheduler's own stats.
#[test]
fn an_ejected_scheduled_disk_leaves_the_scheduler() {
    let Some(mut rig) = rig() else { return };
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().set_len(1 << 20).unwrap();
    let spec = DiskSpec::parse(&format!("path={},weight=2", image.as_path().display())).unwrap();
    let name = image
        .as_path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();

    rig.hotplug.add_disk(&spec, Some("hot0".into())).unwrap();
    let scheduler = rig.qos.scheduler().expect("the disk joined a scheduler");
    let guest_names = || -> Vec<String> {
        let stats = scheduler.stats_json();
        let guests = stats["guests"].as_array().cloned().unwrap_or_default();
        guests
            .iter()
            .filter_map(|g| g["name"].as_str().map(String::from))
            .collect()
    };
    let listed = rig.qos.status()["disks"][0]["id"].clone();
    let scheduled_before = guest_names().contains(&name);
    rig.hotplug.remove("hot0").unwrap();
    rig.port.write(0, PCEJ_OFFSET, &(1u32 << 1).to_le_bytes());

    assert_eq!(listed, "hot0");
    assert!(scheduled_before, "{name} in {:?}", guest_names());
    assert!(rig.qos.is_empty());
    assert!(!guest_names().contains(&name), "{:?}", guest_names());
}
