//! A hostile virtio driver against sluice's real virtio-pci transport and virtio-blk model,
//! reached exactly as a guest reaches them: config space through the PCI root, registers through
//! the MMIO bus, rings and buffers in guest memory. Every malformed input must end in an error
//! status, a zero-length used entry or DEVICE_NEEDS_RESET — never a panic — and a second device
//! must keep working throughout.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_bus::irq::{MsiMessage, MsiSink};
use sluice_bus::{read_le, write_le, Bus};
use sluice_devices::block::{Block, BlockConfig};
use sluice_dma::{
    DmaSpaces, DmaTranslator, DomainProvider, Mapping, RequesterId, TranslationSource,
};
use sluice_pci::{
    AddressWindow, BarAllocator, PciAddress, PciError, PciRoot, SharedPciDevice, COMMAND,
    COMMAND_BUS_MASTER, COMMAND_MEMORY_SPACE, DEFAULT_IO_WINDOW,
};
use sluice_virtio::{VirtioPciDevice, VirtioPciOptions};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap, Permissions};

const RAM: u64 = 16 << 20;
const STATUS_ACK: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_S_OK: u8 = 0;

struct NullMsi;

impl MsiSink for NullMsi {
    fn send(&self, _: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}

struct Disk {
    path: PathBuf,
}

impl Disk {
    fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("sluice-hostile-{tag}-{}-{n}", std::process::id());
        let path = std::env::temp_dir().join(name);
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        Self { path }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A minimal virtio-pci driver with no manners.
struct Driver {
    mmio: Arc<Bus>,
    bar0: u64,
    mem: GuestMemoryMmap,
    /// Guest-physical base of this driver's rings and buffers.
    base: u64,
    /// What the device's DMA space adds to a guest-physical address (its IOVA; 0 without an
    /// IOMMU). Register and descriptor addresses are device addresses.
    dma_offset: u64,
    size: u16,
    avail_idx: u16,
}

impl Driver {
    fn new(
        mmio: Arc<Bus>,
        root: &PciRoot,
        pci: PciAddress,
        mem: GuestMemoryMmap,
        base: u64,
    ) -> Self {
        let bar0 = root.bar_mapping(pci, 0).expect("BAR0 mapped");
        root.config_write(
            pci,
            COMMAND,
            &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        Self {
            mmio,
            bar0,
            mem,
            base,
            dma_offset: 0,
            size: 0,
            avail_idx: 0,
        }
    }

    fn write(&self, offset: u64, value: u64, width: usize) {
        let mut data = vec![0u8; width];
        write_le(&mut data, value);
        self.mmio.write(self.bar0 + offset, &data);
    }

    fn read(&self, offset: u64, width: usize) -> u64 {
        let mut data = vec![0u8; width];
        self.mmio.read(self.bar0 + offset, &mut data);
        read_le(&data)
    }

    fn status(&self) -> u8 {
        self.read(0x14, 1) as u8
    }

    fn desc_addr(&self) -> u64 {
        self.base
    }
    fn avail_addr(&self) -> u64 {
        self.base + 0x1000
    }
    fn used_addr(&self) -> u64 {
        self.base + 0x2000
    }
    /// Scratch area for request headers, data and status bytes.
    fn buf(&self, n: u64) -> u64 {
        self.base + 0x4000 + n * 0x1000
    }

    /// Negotiates VERSION_1 only and sets up queue 0 with `size`; returns whether it was enabled.
    /// The rings start zeroed: a driver reusing memory must not leave a previous activation's
    /// avail index for the new one to run stale descriptors from.
    fn setup(&mut self, size: u16) -> bool {
        self.setup_with_features(size, 0)
    }

    /// [`Driver::setup`] that also accepts the device feature bits `low` (bits 0..31).
    fn setup_with_features(&mut self, size: u16, low: u32) -> bool {
        self.write(0x14, 0, 1);
        if self.base < RAM {
            let rings = self.used_addr() + 0x1000 - self.base;
            self.mem
                .write_slice(&vec![0u8; rings as usize], GuestAddress(self.base))
                .unwrap();
        }
        self.write(0x14, u64::from(STATUS_ACK | STATUS_DRIVER), 1);
        self.write(0x08, 0, 4); // driver_feature_select = 0 (bits 0..31)
        self.write(0x0c, u64::from(low), 4);
        self.write(0x08, 1, 4); // driver_feature_select = 1 (bits 32..63)
        self.write(0x0c, 1, 4); // VERSION_1
        self.write(
            0x14,
            u64::from(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
        assert_ne!(
            self.status() & STATUS_FEATURES_OK,
            0,
            "FEATURES_OK accepted"
        );
        self.write(0x16, 0, 2);
        self.write(0x18, u64::from(size), 2);
        self.write(0x20, self.desc_addr() + self.dma_offset, 8);
        self.write(0x28, self.avail_addr() + self.dma_offset, 8);
        self.write(0x30, self.used_addr() + self.dma_offset, 8);
        self.write(0x1c, 1, 2);
        self.size = size;
        self.avail_idx = 0;
        self.read(0x1c, 2) == 1
    }

    fn driver_ok(&self) {
        self.write(
            0x14,
            u64::from(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            1,
        );
    }

    fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc_addr() + 16 * u64::from(index));
        self.mem
            .write_obj(addr.wrapping_add(self.dma_offset), at)
            .unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Publishes `head` in the avail ring and kicks queue 0.
    fn submit(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail_addr() + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
        self.write(0x3000, 0, 2);
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used_addr() + 2))
            .unwrap()
    }

    /// Waits until the used ring reaches `idx` (or the device gives up with NEEDS_RESET).
    fn wait_used(&self, idx: u16) -> Option<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.used_idx() == idx {
                let slot = u64::from(idx.wrapping_sub(1) % self.size);
                let at = GuestAddress(self.used_addr() + 4 + 8 * slot);
                let id: u32 = self.mem.read_obj(at).unwrap();
                let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
                return Some((id, len));
            }
            if self.status() & STATUS_NEEDS_RESET != 0 {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("device neither completed nor asked for reset");
    }

    /// A well-formed 3-descriptor block request at descriptors 0..3 using scratch buffer `n`.
    fn block_request(&self, kind: u32, sector: u64, data: &[u8], n: u64) -> u16 {
        let (hdr, payload, status) = (self.buf(n), self.buf(n) + 0x100, self.buf(n) + 0x800);
        self.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem.write_slice(data, GuestAddress(payload)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let data_flags = if kind == BLK_T_IN { DESC_F_WRITE } else { 0 };
        self.set_desc(0, hdr, 16, DESC_F_NEXT, 1);
        self.set_desc(1, payload, data.len() as u32, DESC_F_NEXT | data_flags, 2);
        self.set_desc(2, status, 1, DESC_F_WRITE, 0);
        0
    }

    fn status_byte(&self, n: u64) -> u8 {
        self.mem
            .read_obj(GuestAddress(self.buf(n) + 0x800))
            .unwrap()
    }
}

struct Machine {
    mmio: Arc<Bus>,
    root: Arc<PciRoot>,
    mem: GuestMemoryMmap,
    devices: Vec<PciAddress>,
    _disks: Vec<Disk>,
}

/// Guest RAM, an MMIO bus and a PCI root on it with the VMM's BAR windows.
fn ram_and_root() -> (GuestMemoryMmap, Arc<Bus>, Arc<PciRoot>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let mmio = Arc::new(Bus::new());
    let allocator = BarAllocator::new(
        AddressWindow::new(0xc000_0000, 0x2000_0000).unwrap(),
        AddressWindow::new(1 << 32, 1 << 32).unwrap(),
        AddressWindow::new(DEFAULT_IO_WINDOW.0, DEFAULT_IO_WINDOW.1).unwrap(),
    )
    .unwrap();
    let root = Arc::new(PciRoot::new(mmio.clone(), Arc::new(Bus::new()), allocator));
    (mem, mmio, root)
}

fn machine() -> Machine {
    let (mem, mmio, root) = ram_and_root();
    let mut devices = Vec::new();
    let mut disks = Vec::new();
    for tag in ["victim", "bystander"] {
        let disk = Disk::new(tag);
        let block = Block::new(BlockConfig::new(&disk.path)).unwrap();
        let options = VirtioPciOptions::new(Arc::new(NullMsi));
        let pci = VirtioPciDevice::new(Box::new(block), sluice_dma::identity(mem.clone()), options)
            .unwrap();
        devices.push(root.add_device(Arc::new(Mutex::new(pci))).unwrap());
        disks.push(disk);
    }
    Machine {
        mmio,
        root,
        mem,
        devices,
        _disks: disks,
    }
}

fn driver(m: &Machine, which: usize, base: u64) -> Driver {
    Driver::new(
        m.mmio.clone(),
        &m.root,
        m.devices[which],
        m.mem.clone(),
        base,
    )
}

/// The bystander disk still writes and reads back correctly.
fn assert_bystander_works(m: &Machine) {
    let mut d = driver(m, 1, 0x80_0000);
    assert!(d.setup(16));
    d.driver_ok();
    let data = [0x5au8; 512];
    d.submit(d.block_request(BLK_T_OUT, 3, &data, 0));
    d.wait_used(1).unwrap();
    assert_eq!(d.status_byte(0), BLK_S_OK);
    d.submit(d.block_request(BLK_T_IN, 3, &[0u8; 512], 1));
    d.wait_used(2).unwrap();
    let mut back = [0u8; 512];
    m.mem
        .read_slice(&mut back, GuestAddress(d.buf(1) + 0x100))
        .unwrap();
    assert_eq!(back, data);
}

#[test]
fn queue_size_not_a_power_of_two_is_refused() {
    let m = machine();
    let mut d = driver(&m, 0, 0x40_0000);

    assert!(!d.setup(100), "queue of 100 entries must not enable");

    assert!(d.setup(64));
    assert_bystander_works(&m);
}

#[test]
fn notify_before_driver_ok_is_harmless() {
    let m = machine();
    let mut d = driver(&m, 0, 0x40_0000);
    assert!(d.setup(16));
    let head = d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);

    d.submit(head);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(), 0, "nothing processed before DRIVER_OK");
    d.driver_ok();

    assert_eq!(d.wait_used(1).map(|(id, _)| id), Some(0));
    assert_eq!(d.status_byte(0), BLK_S_OK);
}

#[test]
fn malformed_chains_fail_the_request_not_the_vmm() {
    let m = machine();
    let mut d = driver(&m, 0, 0x40_0000);
    assert!(d.setup(16));
    d.driver_ok();
    let mut completed = 0;

    // Data buffer outside guest RAM.
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(1, RAM + 0x1000, 512, DESC_F_NEXT, 2);
    expect_refused(&mut d, &mut completed, "data outside RAM");
    // Zero-length data buffer.
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(1, d.buf(0) + 0x100, 0, DESC_F_NEXT, 2);
    expect_refused(&mut d, &mut completed, "zero-length buffer");
    // Oversized buffer (4 GiB - 1 bytes).
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(1, d.buf(0) + 0x100, u32::MAX, DESC_F_NEXT, 2);
    expect_refused(&mut d, &mut completed, "oversized buffer");
    // Read into a device-readable (guest read-only) buffer.
    d.block_request(BLK_T_IN, 0, &[0u8; 512], 0);
    d.set_desc(1, d.buf(0) + 0x100, 512, DESC_F_NEXT, 2);
    expect_refused(&mut d, &mut completed, "write into a read-only buffer");
    // Status byte not writable.
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(2, d.buf(0) + 0x800, 1, 0, 0);
    expect_refused(&mut d, &mut completed, "read-only status");

    assert_eq!(
        d.status() & STATUS_NEEDS_RESET,
        0,
        "per-request errors keep the device up"
    );
    assert_bystander_works(&m);
}

#[test]
fn looping_chain_and_ring_outside_ram_end_in_needs_reset_or_error() {
    let m = machine();
    let mut d = driver(&m, 0, 0x40_0000);
    assert!(d.setup(16));
    d.driver_ok();

    // A chain whose descriptors point at each other forever.
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(1, d.buf(0) + 0x100, 512, DESC_F_NEXT, 0);
    d.submit(0);
    let looped = d.wait_used(1);
    assert!(
        looped.is_none() || looped.is_some_and(|(_, len)| len <= 1),
        "a looping chain is refused: {looped:?}"
    );
    assert_bystander_works(&m);

    // Rings outside guest RAM.
    let mut far = driver(&m, 0, RAM + 0x10_0000);
    far.setup(16);
    far.driver_ok();
    let deadline = Instant::now() + Duration::from_secs(5);
    while far.status() & STATUS_NEEDS_RESET == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_ne!(
        far.status() & STATUS_NEEDS_RESET,
        0,
        "rings outside RAM need a reset"
    );
    assert_bystander_works(&m);
}

/// Where the IOMMU puts the victim's DMA: IOVA = GPA + this, in 4 KiB pages.
const IOVA_OFFSET: u64 = 1 << 40;
const PAGE: u64 = 0x1000;
/// Guest-physical range the victim's domain maps (its rings and scratch buffers).
const MAPPED: std::ops::Range<u64> = 0x40_0000..0x50_0000;

/// A static IOMMU domain: `MAPPED` read-write at IOVA_OFFSET, except one read-only page and one
/// unmapped hole.
#[derive(Debug)]
struct StaticDomain {
    read_only_page: u64,
    hole_page: u64,
}

impl TranslationSource for StaticDomain {
    fn lookup(&self, iova: u64, _access: Permissions) -> Option<Mapping> {
        let page = iova.checked_sub(IOVA_OFFSET)? & !(PAGE - 1);
        if !MAPPED.contains(&page) || page == self.hole_page {
            return None;
        }
        let permissions = if page == self.read_only_page {
            Permissions::Read
        } else {
            Permissions::ReadWrite
        };
        Some(Mapping {
            iova: page + IOVA_OFFSET,
            target: page,
            length: PAGE,
            permissions,
        })
    }
}

/// Gives every requester the same static domain.
struct StaticIommu {
    read_only_page: u64,
    hole_page: u64,
}

impl DomainProvider for StaticIommu {
    fn domain(&self, _requester: RequesterId) -> Option<Box<dyn TranslationSource>> {
        Some(Box::new(StaticDomain {
            read_only_page: self.read_only_page,
            hole_page: self.hole_page,
        }))
    }
}

/// One virtio-blk behind virtio-pci whose DMA space is IOMMU-translated, built with the
/// requester id of the slot the root gives it.
struct IommuMachine {
    mmio: Arc<Bus>,
    root: Arc<PciRoot>,
    mem: GuestMemoryMmap,
    device: PciAddress,
    spaces: DmaSpaces,
    _disk: Disk,
}

impl IommuMachine {
    fn driver(&self) -> Driver {
        let mut d = Driver::new(
            self.mmio.clone(),
            &self.root,
            self.device,
            self.mem.clone(),
            MAPPED.start,
        );
        d.dma_offset = IOVA_OFFSET;
        d
    }

    fn translator(&self) -> Arc<DmaTranslator> {
        self.spaces.translator(self.device.bdf()).unwrap()
    }
}

fn iommu_machine(read_only_page: u64, hole_page: u64) -> IommuMachine {
    let (mem, mmio, root) = ram_and_root();
    let iommu = Arc::new(StaticIommu {
        read_only_page,
        hole_page,
    });
    let spaces = DmaSpaces::with_iommu(mem.clone(), iommu);
    let disk = Disk::new("iommu");
    let block = Block::new(BlockConfig::new(&disk.path)).unwrap();
    let device = root
        .add_device_with(|address| {
            let space = spaces.space(address.bdf());
            let options = VirtioPciOptions::new(Arc::new(NullMsi));
            let pci = VirtioPciDevice::new(Box::new(block), space, options).unwrap();
            Ok::<SharedPciDevice, PciError>(Arc::new(Mutex::new(pci)))
        })
        .unwrap();
    IommuMachine {
        mmio,
        root,
        mem,
        device,
        spaces,
        _disk: disk,
    }
}

/// Scratch buffer `n`'s page of a driver based at `MAPPED.start`.
fn scratch_page(n: u64) -> u64 {
    MAPPED.start + 0x4000 + n * 0x1000
}

#[test]
fn iommu_mapped_iovas_carry_block_io_and_data_reads_back() {
    let m = iommu_machine(scratch_page(3), scratch_page(4));
    let mut d = m.driver();
    assert!(d.setup(16));
    d.driver_ok();
    let data: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();

    d.submit(d.block_request(BLK_T_OUT, 5, &data, 0));
    d.wait_used(1).expect("write through the IOMMU completes");
    d.submit(d.block_request(BLK_T_IN, 5, &[0u8; 512], 1));
    d.wait_used(2).expect("read through the IOMMU completes");

    assert_eq!(d.status_byte(0), BLK_S_OK);
    assert_eq!(d.status_byte(1), BLK_S_OK);
    let mut back = [0u8; 512];
    m.mem
        .read_slice(&mut back, GuestAddress(d.buf(1) + 0x100))
        .unwrap();
    assert_eq!(
        back.to_vec(),
        data,
        "the data read back equals the data written"
    );
    assert!(
        m.translator().faults().is_empty(),
        "{:?}",
        m.translator().faults()
    );
    assert_eq!(m.spaces.requesters(), vec![m.device.bdf()]);
}

/// Submits the request in descriptors 0..3 and expects it to complete with an error status or
/// a short used entry (a per-request error: the device stays up). `completed` counts the used
/// entries so far.
fn expect_refused(d: &mut Driver, completed: &mut u16, what: &str) {
    d.submit(0);
    *completed += 1;
    match d.wait_used(*completed) {
        Some((0, len)) => {
            let status = d.status_byte(0);
            assert!(
                len <= 1 && (len == 0 || status != BLK_S_OK),
                "{what}: len {len} status {status}"
            );
        }
        Some((id, _)) => panic!("{what}: wrong head {id}"),
        None => panic!("{what}: a bad request must fail the request, not the device"),
    }
}

#[test]
fn iommu_refuses_unmapped_and_read_only_iovas_with_a_fault_and_an_error() {
    let (read_only, hole) = (scratch_page(3), scratch_page(4));
    let m = iommu_machine(read_only, hole);
    let mut d = m.driver();
    assert!(d.setup(16));
    d.driver_ok();
    let mut completed = 0;
    let faulted = |iova: u64, access: Option<Permissions>| {
        m.translator()
            .faults()
            .iter()
            .any(|f| f.iova == iova + IOVA_OFFSET && access.is_none_or(|a| f.access == a))
    };

    // A read request whose data buffer is mapped read-only: the device may not write it.
    d.block_request(BLK_T_IN, 0, &[0u8; 512], 0);
    d.set_desc(1, read_only + 0x100, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
    expect_refused(&mut d, &mut completed, "read-only IOVA");
    assert!(
        faulted(read_only + 0x100, Some(Permissions::Write)),
        "the write to a read-only IOVA is in the fault log: {:?}",
        m.translator().faults()
    );
    let untouched: [u8; 4] = m.mem.read_obj(GuestAddress(read_only + 0x100)).unwrap();
    assert_eq!(
        untouched, [0; 4],
        "nothing was written through the read-only mapping"
    );

    // A write request whose data buffer is not mapped at all.
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(1, hole + 0x100, 512, DESC_F_NEXT, 2);
    expect_refused(&mut d, &mut completed, "unmapped IOVA");
    assert!(
        faulted(hole + 0x100, None),
        "the unmapped IOVA is in the fault log: {:?}",
        m.translator().faults()
    );

    // A status byte in the hole: the device cannot even report; the request is still retired.
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(2, hole + 0x800, 1, DESC_F_WRITE, 0);
    d.submit(0);
    completed += 1;
    assert_eq!(
        d.wait_used(completed),
        Some((0, 0)),
        "an unreportable request is retired with nothing written"
    );

    // Per-request refusals keep the device up, and mapped requests still work.
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0);
    d.submit(d.block_request(BLK_T_OUT, 1, &[0x33u8; 512], 0));
    completed += 1;
    d.wait_used(completed)
        .expect("a mapped request still completes");
    assert_eq!(d.status_byte(0), BLK_S_OK);
}

/// Records the levels of every INTx line the root connects, by GSI.
#[derive(Default)]
struct RecordingIntx {
    lines: Mutex<Vec<(u32, Arc<RecordingLine>)>>,
}

#[derive(Default)]
struct RecordingLine {
    levels: Mutex<Vec<bool>>,
}

impl sluice_bus::irq::LevelIrqLine for RecordingLine {
    fn set_level(&self, asserted: bool) -> std::io::Result<()> {
        self.levels.lock().unwrap().push(asserted);
        Ok(())
    }
}

impl sluice_bus::irq::LevelIrqRouter for RecordingIntx {
    fn connect(&self, gsi: u32) -> std::io::Result<Arc<dyn sluice_bus::irq::LevelIrqLine>> {
        let line = Arc::new(RecordingLine::default());
        self.lines.lock().unwrap().push((gsi, line.clone()));
        Ok(line)
    }
}

#[test]
fn without_msix_a_completion_asserts_inta_and_the_isr_read_deasserts_it() {
    let (mem, mmio, root) = ram_and_root();
    let intx = Arc::new(RecordingIntx::default());
    root.set_intx(intx.clone(), sluice_pci::IntxRouting::new(16, 8).unwrap());
    let disk = Disk::new("intx");
    let block = Block::new(BlockConfig::new(&disk.path)).unwrap();
    let options = VirtioPciOptions::new(Arc::new(NullMsi));
    let pci =
        VirtioPciDevice::new(Box::new(block), sluice_dma::identity(mem.clone()), options).unwrap();
    let address = root.add_device(Arc::new(Mutex::new(pci))).unwrap();
    let (gsi, line) = intx.lines.lock().unwrap()[0].clone();
    let mut line_register = [0u8; 1];
    root.config_read(address, sluice_pci::INTERRUPT_LINE, &mut line_register);
    let mut d = Driver::new(mmio, &root, address, mem, 0x40_0000);
    assert!(d.setup(16));
    d.driver_ok();

    d.submit(d.block_request(BLK_T_OUT, 2, &[7u8; 512], 0));
    d.wait_used(1).expect("completes without MSI-X");
    let deadline = Instant::now() + Duration::from_secs(5);
    while line.levels.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }

    assert_eq!(gsi, 16 + u32::from(address.device) % 8);
    assert_eq!(
        u32::from(line_register[0]),
        gsi,
        "the line register names the GSI"
    );
    assert_eq!(
        *line.levels.lock().unwrap(),
        vec![true],
        "INTA asserted once"
    );
    assert_eq!(d.read(0x1000, 1), 1, "ISR: queue interrupt");
    assert_eq!(
        *line.levels.lock().unwrap(),
        vec![true, false],
        "deasserted"
    );
    assert_eq!(d.read(0x1000, 1), 0, "read-to-clear");
}

// Packed rings (VIRTIO_F_RING_PACKED): the victim negotiates them, the bystander stays split.

mod packed {
    use super::*;
    use sluice_virtio::ring::mock::{PackedDriver, F_INDIRECT, F_NEXT};

    const VERSION_1: u64 = 1 << 32;
    const RING_PACKED: u64 = 1 << 34;
    const SIZE: u16 = 12;

    /// Two disks offering packed rings.
    fn packed_machine() -> Machine {
        let (mem, mmio, root) = ram_and_root();
        let mut devices = Vec::new();
        let mut disks = Vec::new();
        for tag in ["packed-victim", "packed-bystander"] {
            let disk = Disk::new(tag);
            let block = Block::new(BlockConfig::new(&disk.path)).unwrap();
            let mut options = VirtioPciOptions::new(Arc::new(NullMsi));
            options.packed_ring = true;
            let space = sluice_dma::identity(mem.clone());
            let pci = VirtioPciDevice::new(Box::new(block), space, options).unwrap();
            devices.push(root.add_device(Arc::new(Mutex::new(pci))).unwrap());
            disks.push(disk);
        }
        Machine {
            mmio,
            root,
            mem,
            devices,
            _disks: disks,
        }
    }

    /// Negotiates VERSION_1 + RING_PACKED and enables queue 0 as a packed ring of SIZE
    /// entries at `d.base` (event areas right after it, as `PackedDriver` lays them out).
    fn setup_packed(d: &Driver) -> bool {
        d.write(0x14, 0, 1);
        d.write(0x14, u64::from(STATUS_ACK | STATUS_DRIVER), 1);
        d.write(0x08, 1, 4);
        d.write(0x0c, (VERSION_1 | RING_PACKED) >> 32, 4);
        d.write(
            0x14,
            u64::from(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
        let ring_bytes = 16 * u64::from(SIZE);
        d.write(0x16, 0, 2);
        d.write(0x18, u64::from(SIZE), 2);
        d.write(0x20, d.base, 8);
        d.write(0x28, d.base + ring_bytes, 8);
        d.write(0x30, d.base + ring_bytes + 4, 8);
        d.write(0x1c, 1, 2);
        d.read(0x1c, 2) == 1 && d.status() & STATUS_FEATURES_OK != 0
    }

    fn wait_needs_reset(d: &Driver) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if d.status() & STATUS_NEEDS_RESET != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    fn wait_used(ring: &mut PackedDriver<'_>) -> Option<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(used) = ring.used() {
                return Some(used);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    #[test]
    fn packed_block_io_round_trips_and_a_looping_chain_needs_reset() {
        let m = packed_machine();
        let d = driver(&m, 0, 0x40_0000);
        let space = sluice_dma::identity(m.mem.clone());
        let mut ring = PackedDriver::new(&space, d.base, SIZE);
        assert!(setup_packed(&d));
        d.driver_ok();

        // A well-formed write, then a read of the same sector through an indirect table.
        let (hdr, data, status) = (d.buf(0), d.buf(0) + 0x100, d.buf(0) + 0x800);
        let payload = [0xa7u8; 512];
        m.mem.write_obj(BLK_T_OUT, GuestAddress(hdr)).unwrap();
        m.mem.write_obj(9u64, GuestAddress(hdr + 8)).unwrap();
        m.mem.write_slice(&payload, GuestAddress(data)).unwrap();
        ring.add_chain(
            7,
            &[(hdr, 16, false), (data, 512, false), (status, 1, true)],
        );
        d.write(0x3000, 0, 2);
        let written = wait_used(&mut ring);
        let (rhdr, back, rstatus) = (d.buf(1), d.buf(1) + 0x100, d.buf(1) + 0x800);
        m.mem.write_obj(BLK_T_IN, GuestAddress(rhdr)).unwrap();
        m.mem.write_obj(9u64, GuestAddress(rhdr + 8)).unwrap();
        let table = d.buf(2);
        ring.add_indirect(
            3,
            table,
            &[(rhdr, 16, false), (back, 512, true), (rstatus, 1, true)],
        );
        d.write(0x3000, 0, 2);
        let read = wait_used(&mut ring);
        let mut got = [0u8; 512];
        m.mem.read_slice(&mut got, GuestAddress(back)).unwrap();
        // Then every remaining slot chained to the next, round the ring: no end.
        for index in 0..SIZE {
            ring.write_descriptor(index, data, 8, 0, ring.available(F_NEXT));
        }
        d.write(0x3000, 0, 2);
        let reset = wait_needs_reset(&d);

        assert_eq!(written, Some((7, 1)));
        assert_eq!(read, Some((3, 513)));
        assert_eq!(got, payload);
        assert!(reset, "a chain round the whole ring needs a reset");
        assert_bystander_works(&m);
    }

    /// Writes a hostile head descriptor given the ring and a scratch buffer address.
    type Hostile = fn(&PackedDriver<'_>, u64);

    #[test]
    fn packed_indirect_table_outside_ram_and_bad_ids_need_reset() {
        let m = packed_machine();
        let space = sluice_dma::identity(m.mem.clone());
        let cases: [(&str, Hostile); 3] = [
            ("indirect table outside RAM", |ring, _| {
                ring.write_descriptor(0, RAM - 16, 64, 0, ring.available(F_INDIRECT));
            }),
            ("buffer id past the queue size", |ring, buf| {
                ring.write_descriptor(0, buf, 16, SIZE, ring.available(0));
            }),
            ("indirect descriptor chained", |ring, buf| {
                ring.write_descriptor(0, buf, 32, 0, ring.available(F_INDIRECT | F_NEXT));
            }),
        ];
        for (what, hostile) in cases {
            let d = driver(&m, 0, 0x40_0000);
            m.mem
                .write_slice(&[0u8; 0x1000], GuestAddress(d.base))
                .unwrap();
            let ring = PackedDriver::new(&space, d.base, SIZE);
            assert!(setup_packed(&d), "{what}");
            d.driver_ok();

            hostile(&ring, d.buf(0));
            d.write(0x3000, 0, 2);

            assert!(wait_needs_reset(&d), "{what}");
            assert_bystander_works(&m);
        }
    }

    #[test]
    fn split_driver_on_a_packed_capable_device_stays_split() {
        let m = packed_machine();

        assert_bystander_works(&m);
    }
}

/// Records the MSI messages sent (the VT-d's fault event).
#[derive(Default)]
struct RecordingMsi(Mutex<Vec<MsiMessage>>);

impl MsiSink for RecordingMsi {
    fn send(&self, msg: MsiMessage) -> std::io::Result<()> {
        self.0.lock().unwrap().push(msg);
        Ok(())
    }
}

/// Where the guest side of the VT-d test keeps its tables (outside `MAPPED`).
const VTD_ROOT: u64 = 0x80_0000;
const VTD_CONTEXT: u64 = 0x80_1000;
const VTD_TABLES: u64 = 0x80_2000;
const VTD_DOMAIN: u64 = 5;

/// Builds 4-level second-level tables mapping IOVA `IOVA_OFFSET + gpa` to `gpa` for every page
/// of `MAPPED` except `hole`, read-only at `read_only`, for requester `bdf`, as a guest driver
/// would; returns nothing but what it wrote to `mem`.
fn vtd_tables(mem: &GuestMemoryMmap, bdf: u16, read_only: u64, hole: u64) {
    let mut next = VTD_TABLES;
    let mut table_for = |table: u64, index: u64| -> u64 {
        let slot = GuestAddress(table + index * 8);
        let entry: u64 = mem.read_obj(slot).unwrap();
        if entry & 3 != 0 {
            return entry & !0xfff;
        }
        next += PAGE;
        mem.write_obj(next | 3, slot).unwrap();
        next
    };
    let pml4 = VTD_TABLES;
    for gpa in MAPPED.step_by(PAGE as usize).filter(|&gpa| gpa != hole) {
        let iova = IOVA_OFFSET + gpa;
        let pdpt = table_for(pml4, (iova >> 39) & 0x1ff);
        let pd = table_for(pdpt, (iova >> 30) & 0x1ff);
        let pt = table_for(pd, (iova >> 21) & 0x1ff);
        let flags = if gpa == read_only { 1 } else { 3 };
        mem.write_obj(gpa | flags, GuestAddress(pt + ((iova >> 12) & 0x1ff) * 8))
            .unwrap();
    }
    let bus = u64::from(bdf >> 8);
    let devfn = u64::from(bdf & 0xff);
    mem.write_obj(VTD_CONTEXT | 1, GuestAddress(VTD_ROOT + bus * 16))
        .unwrap();
    mem.write_obj(pml4 | 1, GuestAddress(VTD_CONTEXT + devfn * 16))
        .unwrap();
    mem.write_obj(
        (VTD_DOMAIN << 8) | 2,
        GuestAddress(VTD_CONTEXT + devfn * 16 + 8),
    )
    .unwrap();
}

fn vtd_write(vtd: &sluice_iommu::Vtd, offset: u64, value: u64, width: usize) {
    vtd.write_register(offset, &value.to_le_bytes()[..width]);
}

fn vtd_read(vtd: &sluice_iommu::Vtd, offset: u64, width: usize) -> u64 {
    let mut data = [0u8; 8];
    vtd.read_register(offset, &mut data[..width]);
    u64::from_le_bytes(data)
}

/// The real emulated VT-d in front of a virtio-blk: the guest's page tables carry block I/O
/// (data read back), a request whose buffer the tables leave unmapped fails that request, and
/// the guest reads the fault back from the fault recording registers (and got the fault event).
#[test]
fn vtd_translates_virtio_blk_dma_and_records_the_refused_access_in_its_fault_registers() {
    use sluice_iommu::regs::{FEADDR, FEDATA, FRCD, FSTS, GCMD, GCMD_SRTP, GCMD_TE, RTADDR};
    let (read_only, hole) = (scratch_page(3), scratch_page(4));
    let (mem, mmio, root) = ram_and_root();
    let events = Arc::new(RecordingMsi::default());
    let vtd = sluice_iommu::Vtd::new(mem.clone(), 39, events.clone());
    let spaces = Arc::new(DmaSpaces::with_iommu(mem.clone(), Arc::new(vtd.clone())));
    vtd.attach_spaces(&spaces);
    let disk = Disk::new("vtd");
    let block = Block::new(BlockConfig::new(&disk.path)).unwrap();
    let device = root
        .add_device_with(|address| {
            let space = spaces.space(address.bdf());
            let options = VirtioPciOptions::new(Arc::new(NullMsi));
            let pci = VirtioPciDevice::new(Box::new(block), space, options).unwrap();
            Ok::<SharedPciDevice, PciError>(Arc::new(Mutex::new(pci)))
        })
        .unwrap();
    vtd_tables(&mem, device.bdf(), read_only, hole);
    vtd_write(&vtd, FEDATA, 0x31, 4);
    vtd_write(&vtd, FEADDR, 0xfee0_0000, 4);
    vtd_write(&vtd, RTADDR, VTD_ROOT, 8);
    vtd_write(&vtd, GCMD, u64::from(GCMD_SRTP), 4);
    vtd_write(&vtd, GCMD, u64::from(GCMD_TE), 4);
    let mut d = Driver::new(mmio, &root, device, mem.clone(), MAPPED.start);
    d.dma_offset = IOVA_OFFSET;
    assert!(d.setup(16));
    d.driver_ok();
    let data: Vec<u8> = (0..512u32).map(|i| (i * 13) as u8).collect();

    d.submit(d.block_request(BLK_T_OUT, 9, &data, 0));
    d.wait_used(1).expect("a write through the VT-d completes");
    d.submit(d.block_request(BLK_T_IN, 9, &[0u8; 512], 1));
    d.wait_used(2).expect("a read through the VT-d completes");
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(1, hole + 0x100, 512, DESC_F_NEXT, 2);
    let mut completed = 2;
    expect_refused(
        &mut d,
        &mut completed,
        "IOVA the guest's tables leave unmapped",
    );

    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(d.buf(1) + 0x100))
        .unwrap();
    assert_eq!(
        back.to_vec(),
        data,
        "the data read back equals the data written"
    );
    let fsts = vtd_read(&vtd, FSTS, 4);
    assert_eq!(fsts & 0b10, 0b10, "primary pending fault: FSTS {fsts:#x}");
    let record_hi = vtd_read(&vtd, FRCD + 8, 8);
    assert_eq!(vtd_read(&vtd, FRCD, 8), IOVA_OFFSET + hole, "faulting page");
    assert_eq!(record_hi & 0xffff, u64::from(device.bdf()), "source id");
    assert_eq!(
        (record_hi >> 32) & 0xff,
        6,
        "read not permitted (the device reads a write's data)"
    );
    assert_eq!(record_hi >> 63, 1, "F");
    let sent = events.0.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "one fault event");
    assert_eq!((sent[0].address, sent[0].data), (0xfee0_0000, 0x31));
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0, "the device stays up");
}

/// One virtio-iommu request: `bytes` device-readable at scratch buffer 0, a 4-byte tail
/// (`tail_len` bytes of room) at buffer 1; returns the used entry and the status byte.
fn viommu_request(d: &mut Driver, done: &mut u16, bytes: &[u8], tail_len: u32) -> (u32, u8) {
    d.mem.write_slice(bytes, GuestAddress(d.buf(0))).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(d.buf(1))).unwrap();
    d.set_desc(0, d.buf(0), bytes.len() as u32, DESC_F_NEXT, 1);
    d.set_desc(1, d.buf(1), tail_len, DESC_F_WRITE, 0);
    d.submit(0);
    *done += 1;
    let (_, len) = d.wait_used(*done).expect("the virtio-iommu stays up");
    let status = d.mem.read_obj(GuestAddress(d.buf(1))).unwrap();
    (len, status)
}

/// sluice's virtio-iommu in front of a virtio-blk, both driven like a guest through the PCI root
/// and the MMIO bus: ATTACH + MAP requests on the IOMMU's queue carry the disk's I/O (data read
/// back), an UNMAP makes the disk's next request on that page fail with a fault in its space's
/// log, an UNMAP that would split a mapping is RANGE, and malformed requests get their status
/// (or a zero-length used entry when there is no room for one) while both devices stay up.
#[test]
fn virtio_iommu_requests_carry_blk_io_and_unmap_makes_its_dma_fault() {
    use sluice_iommu::virtio::request::{encode, Status, MAP_F_READ, MAP_F_WRITE};
    const F_MAP_UNMAP: u32 = 1 << 2;
    let rw = MAP_F_READ | MAP_F_WRITE;
    let (mem, mmio, root) = ram_and_root();
    let viommu = sluice_iommu::VirtioIommu::new(Default::default(), false);
    let spaces = Arc::new(DmaSpaces::with_iommu(mem.clone(), Arc::new(viommu.clone())));
    viommu.attach_spaces(&spaces);
    let iommu_pci = VirtioPciDevice::new(
        Box::new(viommu.clone()),
        sluice_dma::identity(mem.clone()),
        VirtioPciOptions::new(Arc::new(NullMsi)),
    )
    .unwrap();
    let iommu_address = root.add_device(Arc::new(Mutex::new(iommu_pci))).unwrap();
    let disk = Disk::new("viommu");
    let block = Block::new(BlockConfig::new(&disk.path)).unwrap();
    let device = root
        .add_device_with(|address| {
            let space = spaces.space(address.bdf());
            let options = VirtioPciOptions::new(Arc::new(NullMsi));
            let pci = VirtioPciDevice::new(Box::new(block), space, options).unwrap();
            Ok::<SharedPciDevice, PciError>(Arc::new(Mutex::new(pci)))
        })
        .unwrap();
    viommu.set_endpoints([device.bdf()]);
    let endpoint = u32::from(device.bdf());
    let mut iommu = Driver::new(mmio.clone(), &root, iommu_address, mem.clone(), 0x20_0000);
    assert!(iommu.setup_with_features(16, F_MAP_UNMAP));
    iommu.driver_ok();
    let mut done = 0;
    let mut request = |bytes: &[u8]| viommu_request(&mut iommu, &mut done, bytes, 4).1;
    let hole = scratch_page(4);
    let iova = |gpa: u64| gpa + IOVA_OFFSET;

    // The disk's rings and buffers, in three mappings around the page that will be unmapped.
    assert_eq!(request(&encode::attach(1, endpoint, 0)), Status::Ok as u8);
    for (start, end) in [
        (MAPPED.start, hole),
        (hole, hole + PAGE),
        (hole + PAGE, MAPPED.end),
    ] {
        let map = encode::map(1, iova(start), iova(end) - 1, start, rw);
        assert_eq!(request(&map), Status::Ok as u8, "map {start:#x}..{end:#x}");
    }
    let mut d = Driver::new(mmio.clone(), &root, device, mem.clone(), MAPPED.start);
    d.dma_offset = IOVA_OFFSET;
    assert!(d.setup(16));
    d.driver_ok();
    let data: Vec<u8> = (0..512u32).map(|i| (i * 11) as u8).collect();
    // Buffer 4 is the page that will be unmapped: its translation gets cached here.
    d.submit(d.block_request(BLK_T_OUT, 9, &data, 4));
    d.wait_used(1)
        .expect("a write through the virtio-iommu completes");
    d.submit(d.block_request(BLK_T_IN, 9, &[0u8; 512], 1));
    d.wait_used(2)
        .expect("a read through the virtio-iommu completes");
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(d.buf(1) + 0x100))
        .unwrap();
    assert_eq!(
        back.to_vec(),
        data,
        "the data read back equals the data written"
    );
    assert_eq!(d.status_byte(1), BLK_S_OK);

    let split = encode::unmap(1, iova(MAPPED.start), iova(MAPPED.start) + PAGE - 1);
    assert_eq!(
        request(&split),
        Status::Range as u8,
        "would split a mapping"
    );
    let unmap = encode::unmap(1, iova(hole), iova(hole) + PAGE - 1);
    assert_eq!(request(&unmap), Status::Ok as u8);
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(1, hole + 0x100, 512, DESC_F_NEXT, 2);
    let mut completed = 2;
    expect_refused(&mut d, &mut completed, "IOVA the guest unmapped");
    let translator = spaces.translator(device.bdf()).unwrap();
    assert!(
        translator
            .faults()
            .iter()
            .any(|f| f.iova == iova(hole) + 0x100),
        "the unmapped IOVA is in the fault log: {:?}",
        translator.faults()
    );

    // Hostile requests: each gets its status, the IOMMU stays up.
    let overlapping = encode::map(1, iova(MAPPED.start), iova(MAPPED.start) + PAGE - 1, 0, rw);
    assert_eq!(request(&overlapping), Status::Inval as u8);
    assert_eq!(request(&[3, 0]), Status::Inval as u8, "short");
    assert_eq!(request(&[0x77, 0, 0, 0]), Status::Unsupp as u8);
    assert_eq!(request(&encode::attach(1, 0xfff0, 0)), Status::NoEnt as u8);
    assert_eq!(
        request(&encode::probe(endpoint)),
        Status::Unsupp as u8,
        "not negotiated"
    );
    let no_room = viommu_request(&mut iommu, &mut done, &encode::attach(1, endpoint, 0), 2);
    assert_eq!(no_room.0, 0, "no room for a tail: nothing written");
    assert_eq!(iommu.status() & STATUS_NEEDS_RESET, 0);

    // The disk still works on its mapped pages.
    d.submit(d.block_request(BLK_T_OUT, 1, &[0x44u8; 512], 1));
    completed += 1;
    d.wait_used(completed)
        .expect("a mapped request still completes");
    assert_eq!(d.status_byte(1), BLK_S_OK);
    let metrics = sluice_virtio::VirtioDevice::metrics(&viommu);
    assert_eq!(metrics.counter("map"), Some(4));
    assert!(metrics.counter("faults").unwrap() >= 1);
}

/// Guest RAM in a memfd (a vhost-user backend maps it), with an MMIO bus and a PCI root.
fn shared_ram_and_root() -> (GuestMemoryMmap, Arc<Bus>, Arc<PciRoot>) {
    let (_, mmio, root) = ram_and_root();
    let name = std::ffi::CString::new("hostile-vhost-user").unwrap();
    // SAFETY: `name` is NUL-terminated; the flags are valid memfd flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(RAM).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        RAM as usize,
        Some(vm_memory::FileOffset::new(file, 0)),
    )])
    .unwrap();
    (mem, mmio, root)
}

/// The VT-d's fault records that name `iova` for `source`.
fn fault_records_for(vtd: &sluice_iommu::Vtd, source: u16, iova: u64) -> usize {
    use sluice_iommu::regs::{FAULT_RECORDS, FRCD};
    (0..FAULT_RECORDS as u64)
        .map(|i| {
            (
                vtd_read(vtd, FRCD + 16 * i, 8),
                vtd_read(vtd, FRCD + 16 * i + 8, 8),
            )
        })
        .filter(|&(lo, hi)| hi >> 63 == 1 && lo == iova && hi & 0xffff == u64::from(source))
        .count()
}

/// sluice's vhost-user-blk frontend behind the real VT-d, served by sluice's own vhost-user
/// backend (`sluice serve blk`'s server, in a thread): the backend runs the rings on IOVAs and
/// gets each translation from the function's VT-d domain (IOTLB MISS → UPDATE). A request
/// whose buffer the guest's tables leave unmapped fails, and the VT-d records the fault; a
/// page the backend already has a translation for, unmapped by the guest and invalidated,
/// fails too: the invalidation reached the backend's IOTLB before it completed.
#[test]
fn vhost_user_disk_behind_the_vtd_translates_faults_and_follows_invalidations() {
    use sluice_devices::vhost_user_blk::{SharedMemoryRegion, VhostUserBlk, VhostUserBlkConfig};
    use sluice_iommu::regs::{
        GCMD, GCMD_SRTP, GCMD_TE, IOTLB, IOTLB_IIRG_SHIFT, IOTLB_IVT, RTADDR,
    };
    use sluice_virtio::VirtioDevice;
    let (read_only, hole) = (scratch_page(3), scratch_page(4));
    let (mem, mmio, root) = shared_ram_and_root();
    let vtd = sluice_iommu::Vtd::new(mem.clone(), 39, Arc::new(RecordingMsi::default()));
    let spaces = Arc::new(DmaSpaces::with_iommu(mem.clone(), Arc::new(vtd.clone())));
    vtd.attach_spaces(&spaces);
    let disk = Disk::new("vhost-user-vtd");
    let socket = std::env::temp_dir().join(format!(
        "sluice-hostile-vhost-user-{}.sock",
        std::process::id()
    ));
    let block = Block::new(BlockConfig::new(&disk.path)).unwrap();
    // The default miss wait (1 s): a refused request costs that, a loaded machine needs it.
    let server = sluice_vhost::Server::bind(&socket, block).unwrap();
    std::thread::spawn(move || server.run());
    let mut config = VhostUserBlkConfig::new(&socket);
    config.iommu = true;
    config.queue_size = 16;
    let regions = SharedMemoryRegion::from_guest_memory(&mem).unwrap();
    let frontend = VhostUserBlk::new(config, regions).unwrap();
    let observer = frontend.iotlb_observer().expect("behind the VT-d");
    let metrics = frontend.metrics();
    assert_ne!(frontend.device_features() & (1 << 33), 0, "ACCESS_PLATFORM");
    let device = root
        .add_device_with(|address| {
            let space = spaces.space(address.bdf());
            let options = VirtioPciOptions::new(Arc::new(NullMsi));
            let pci = VirtioPciDevice::new(Box::new(frontend), space, options).unwrap();
            Ok::<SharedPciDevice, PciError>(Arc::new(Mutex::new(pci)))
        })
        .unwrap();
    vtd.watch(device.bdf(), observer);
    vtd_tables(&mem, device.bdf(), read_only, hole);
    vtd_write(&vtd, RTADDR, VTD_ROOT, 8);
    vtd_write(&vtd, GCMD, u64::from(GCMD_SRTP), 4);
    vtd_write(&vtd, GCMD, u64::from(GCMD_TE), 4);
    let mut d = Driver::new(mmio, &root, device, mem.clone(), MAPPED.start);
    d.dma_offset = IOVA_OFFSET;
    assert!(d.setup(16));
    d.driver_ok();
    let data: Vec<u8> = (0..512u32).map(|i| (i * 17) as u8).collect();
    let counter = |name: &str| metrics.counter(name).unwrap_or(0);

    // Mapped IOVAs carry the I/O; buffer 2 is the page the guest will unmap later.
    d.submit(d.block_request(BLK_T_OUT, 9, &data, 2));
    d.wait_used(1).expect("a write through the backend's IOTLB");
    d.submit(d.block_request(BLK_T_IN, 9, &[0u8; 512], 1));
    d.wait_used(2).expect("a read through the backend's IOTLB");
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(d.buf(1) + 0x100))
        .unwrap();
    assert_eq!(
        back.to_vec(),
        data,
        "the data read back equals the data written"
    );
    assert_eq!((d.status_byte(2), d.status_byte(1)), (BLK_S_OK, BLK_S_OK));
    let (misses, updates) = (counter("iotlb_misses"), counter("iotlb_updates"));
    assert!(
        misses > 0 && updates > 0,
        "{misses} misses, {updates} updates"
    );
    assert_eq!(counter("iotlb_faults"), 0);

    // A buffer the guest never mapped: the MISS faults in the VT-d and gets no UPDATE.
    d.block_request(BLK_T_OUT, 0, &[1u8; 512], 0);
    d.set_desc(1, hole + 0x100, 512, DESC_F_NEXT, 2);
    let mut completed = 2;
    expect_refused(
        &mut d,
        &mut completed,
        "IOVA the guest's tables leave unmapped",
    );
    assert_eq!(fault_records_for(&vtd, device.bdf(), IOVA_OFFSET + hole), 1);
    assert!(counter("iotlb_faults") >= 1);

    // Unmap buffer 2's page (the backend holds its translation) and invalidate globally.
    let victim = scratch_page(2);
    let walked = vtd
        .mappings(
            device.bdf(),
            sluice_iommu::IovaRange {
                start: IOVA_OFFSET + victim,
                end: IOVA_OFFSET + victim + PAGE,
            },
        )
        .unwrap();
    assert_eq!(walked.len(), 1, "mapped before");
    clear_leaf(&mem, IOVA_OFFSET + victim);
    let invalidations = counter("iotlb_invalidations");
    vtd_write(&vtd, IOTLB, IOTLB_IVT | (1 << IOTLB_IIRG_SHIFT), 8);
    assert!(
        counter("iotlb_invalidations") > invalidations,
        "the invalidation was forwarded before it completed"
    );
    d.block_request(BLK_T_OUT, 0, &[2u8; 512], 0);
    d.set_desc(1, victim + 0x100, 512, DESC_F_NEXT, 2);
    expect_refused(&mut d, &mut completed, "IOVA unmapped and invalidated");
    assert_eq!(
        fault_records_for(&vtd, device.bdf(), IOVA_OFFSET + victim),
        1
    );
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0, "the device stays up");
    println!(
        "vhost-user behind the VT-d: {} misses, {} updates, {} invalidations, {} faults",
        counter("iotlb_misses"),
        counter("iotlb_updates"),
        counter("iotlb_invalidations"),
        counter("iotlb_faults")
    );
    let _ = std::fs::remove_file(&socket);
}

/// Clears the 4 KiB leaf entry for `iova` in the tables `vtd_tables` built.
fn clear_leaf(mem: &GuestMemoryMmap, iova: u64) {
    let mut table = VTD_TABLES;
    for shift in [39, 30, 21] {
        let entry: u64 = mem
            .read_obj(GuestAddress(table + ((iova >> shift) & 0x1ff) * 8))
            .unwrap();
        table = entry & !0xfff;
    }
    mem.write_obj(0u64, GuestAddress(table + ((iova >> 12) & 0x1ff) * 8))
        .unwrap();
}

/// A link with nothing to receive that swallows what is sent.
struct QuietLink;

impl sluice_devices::net::NetBackend for QuietLink {
    fn read_packet(&self, _pair: usize, _buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(None)
    }
    fn write_packet(&self, _pair: usize, _packet: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn queue_fd(&self, _pair: usize) -> Option<std::os::fd::RawFd> {
        None
    }
    fn set_active_pairs(&self, _pairs: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn set_offload(&self, _tun_flags: u32) -> std::io::Result<()> {
        Ok(())
    }
}

const NET_F_CTRL_VQ: u32 = 1 << 17;
const NET_F_GUEST_ANNOUNCE: u32 = 1 << 21;
/// VIRTIO_NET_F_STANDBY (62) in the high feature word.
const NET_F_STANDBY_HIGH: u32 = 1 << (62 - 32);
const NET_S_LINK_UP: u64 = 1;
const NET_S_ANNOUNCE: u64 = 2;

/// sluice's virtio-net (`--net`: announce on; `standby` as asked) behind virtio-pci on `root`.
fn net_function(root: &PciRoot, mem: &GuestMemoryMmap, standby: bool) -> PciAddress {
    use sluice_devices::net::{Net, NetConfig};
    let config = NetConfig {
        standby,
        announce: true,
        ..NetConfig::new([0x52, 0x54, 0x00, 0, 0, 0x62])
    };
    let net = Net::with_backend(Arc::new(QuietLink), 1, config);
    let options = VirtioPciOptions::new(Arc::new(NullMsi));
    let pci =
        VirtioPciDevice::new(Box::new(net), sluice_dma::identity(mem.clone()), options).unwrap();
    root.add_device(Arc::new(Mutex::new(pci))).unwrap()
}

impl Driver {
    /// The device's feature word `select` (0: bits 0..31, 1: bits 32..63).
    fn device_features(&self, select: u32) -> u32 {
        self.write(0x00, u64::from(select), 4);
        self.read(0x04, 4) as u32
    }

    /// Accepts `low`/`high` (VERSION_1 added); returns whether FEATURES_OK held.
    fn negotiate(&self, low: u32, high: u32) -> bool {
        self.write(0x14, 0, 1);
        self.write(0x14, u64::from(STATUS_ACK | STATUS_DRIVER), 1);
        self.write(0x08, 0, 4);
        self.write(0x0c, u64::from(low), 4);
        self.write(0x08, 1, 4);
        self.write(0x0c, u64::from(high | 1), 4);
        self.write(
            0x14,
            u64::from(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
        self.status() & STATUS_FEATURES_OK != 0
    }

    /// Enables queues `0..count` with 16 entries, each ring set in its own 64 KiB.
    fn enable_queues(&self, count: u16) {
        for queue in 0..count {
            let base = self.base + u64::from(queue) * 0x1_0000;
            self.write(0x16, u64::from(queue), 2);
            self.write(0x18, 16, 2);
            self.write(0x20, base, 8);
            self.write(0x28, base + 0x1000, 8);
            self.write(0x30, base + 0x2000, 8);
            self.write(0x1c, 1, 2);
        }
    }
}

/// `--net tap=..,standby=on` offers VIRTIO_NET_F_STANDBY (bit 62) and a driver negotiates it
/// (a NIC without it refuses a driver that accepts it); sluice's NICs offer GUEST_ANNOUNCE with
/// a control queue, and a restored one, once the VM runs, raises a configuration interrupt
/// with VIRTIO_NET_S_ANNOUNCE set, so the guest announces its MAC from its new place.
#[test]
fn standby_is_offered_and_negotiated_and_a_restored_nic_asks_for_an_announce() {
    let (mem, mmio, root) = ram_and_root();
    let standby = net_function(&root, &mem, true);
    let plain = net_function(&root, &mem, false);
    let d = Driver::new(mmio.clone(), &root, standby, mem.clone(), 0x40_0000);
    let p = Driver::new(mmio, &root, plain, mem, 0x60_0000);
    let offered = (d.device_features(0), d.device_features(1));
    let plain_high = p.device_features(1);

    let wanted = NET_F_CTRL_VQ | NET_F_GUEST_ANNOUNCE;
    let negotiated = d.negotiate(wanted, NET_F_STANDBY_HIGH);
    d.enable_queues(3);
    d.driver_ok();
    let plain_refused = !p.negotiate(0, NET_F_STANDBY_HIGH);
    let generation = d.read(0x15, 1);
    let states = root.save_states().unwrap();
    let (mem2, mmio2, root2) = ram_and_root();
    assert_eq!(net_function(&root2, &mem2, true), standby);
    assert_eq!(net_function(&root2, &mem2, false), plain);
    root2.restore_states(&states).unwrap();
    let restored = Driver::new(mmio2, &root2, standby, mem2, 0x40_0000);
    let isr_before_running = restored.read(0x1000, 1);
    root2.resume_after_save();
    let isr = restored.read(0x1000, 1);
    let status = restored.read(0x2000 + 6, 2);

    assert_ne!(offered.1 & NET_F_STANDBY_HIGH, 0, "STANDBY offered");
    assert_eq!(
        offered.0 & wanted,
        wanted,
        "CTRL_VQ and GUEST_ANNOUNCE offered"
    );
    assert_eq!(
        plain_high & NET_F_STANDBY_HIGH,
        0,
        "not offered without standby=on"
    );
    assert!(negotiated, "FEATURES_OK with STANDBY accepted");
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0);
    assert!(
        plain_refused,
        "STANDBY accepted though not offered: refused"
    );
    assert_eq!(
        isr_before_running, 0,
        "nothing signalled before the vCPUs run"
    );
    assert_eq!(isr, 2, "a configuration change");
    assert_eq!(status, NET_S_LINK_UP | NET_S_ANNOUNCE);
    assert_eq!(restored.read(0x15, 1), (generation + 1) & 0xff);
    assert_eq!(restored.status() & STATUS_NEEDS_RESET, 0);
}
