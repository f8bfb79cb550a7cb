//! The controller driven the way a driver drives it: registers through BAR0, queues and
//! buffers in real guest memory, a temporary image file behind it.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_bus::IoEventRegistrar;
use sluice_pci::testing::{RecordingRouter, RecordingSink};
use sluice_pci::{PciDevice, MSIX_ENABLE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

use super::admin::*;
use super::command::Status;
use super::io::{OPC_DATASET_MANAGEMENT, OPC_FLUSH, OPC_READ, OPC_WRITE, OPC_WRITE_ZEROES};
use super::registers::*;
use super::*;

const RAM_SIZE: usize = 4 << 20;
const IMAGE_SIZE: u64 = 1 << 20;
const BLOCKS: u64 = IMAGE_SIZE / 512;
const ASQ_ADDR: u64 = 0x1_0000;
const ACQ_ADDR: u64 = 0x1_1000;
const ADMIN_ENTRIES: u16 = 32;
const SQ_ADDR: u64 = 0x2_0000;
const CQ_ADDR: u64 = 0x2_8000;
const IO_ENTRIES: u16 = 64;
const ID_BUF: u64 = 0x3_0000;
const DATA: u64 = 0x4_0000;
const READ_BACK: u64 = 0x6_0000;
const LISTS: u64 = 0x8_0000;
const SHADOW: u64 = 0x9_0000;
const EVENT_IDX: u64 = 0x9_1000;
const MSIX_CAP: usize = 0x40;
/// Where the tests place BAR0 (for the doorbell ioeventfds).
const BAR0: u64 = 0xfe00_0000;

/// Stands in for KVM's ioeventfds: keeps what is registered, so a test can "write the
/// doorbell" the way KVM would, by signalling the registered eventfd.
#[derive(Default)]
struct FakeIoEvents {
    registered: Mutex<Vec<(u64, EventFd)>>,
    removed: Mutex<Vec<u64>>,
}

impl IoEventRegistrar for FakeIoEvents {
    fn register(&self, event: &EventFd, addr: u64, len: u32, data: Option<u64>) -> io::Result<()> {
        assert_eq!((len, data), (4, None));
        let mut registered = self.registered.lock().unwrap();
        if registered.iter().any(|(a, _)| *a == addr) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        registered.push((addr, event.try_clone()?));
        Ok(())
    }

    fn unregister(
        &self,
        _event: &EventFd,
        addr: u64,
        _len: u32,
        _data: Option<u64>,
    ) -> io::Result<()> {
        self.registered.lock().unwrap().retain(|(a, _)| *a != addr);
        self.removed.lock().unwrap().push(addr);
        Ok(())
    }
}

impl FakeIoEvents {
    /// A guest write to `addr`, if KVM would take it.
    fn write(&self, addr: u64) -> bool {
        let registered = self.registered.lock().unwrap();
        let Some((_, event)) = registered.iter().find(|(a, _)| *a == addr) else {
            return false;
        };
        event.write(1).unwrap();
        true
    }
}

/// A test driver: the controller, guest memory, the image file and queue positions.
struct Driver {
    nvme: Nvme,
    mem: GuestMemoryMmap,
    image: TempFile,
    router: Arc<RecordingRouter>,
    kvm: Arc<FakeIoEvents>,
    admin_tail: u16,
    admin_head: u16,
    admin_phase: bool,
    io_tail: u16,
    io_head: u16,
    io_phase: bool,
    next_cid: u16,
    /// Shadow doorbells in use: ring the MMIO doorbell only when EventIdx asks (Linux's rule).
    shadow: bool,
}

fn command(opcode: u8, nsid: u32) -> [u8; 64] {
    let mut raw = [0u8; 64];
    raw[0] = opcode;
    raw[4..8].copy_from_slice(&nsid.to_le_bytes());
    raw
}

fn set_dw(raw: &mut [u8; 64], index: usize, value: u32) {
    raw[index * 4..index * 4 + 4].copy_from_slice(&value.to_le_bytes());
}

fn set_prp(raw: &mut [u8; 64], prp1: u64, prp2: u64) {
    raw[24..32].copy_from_slice(&prp1.to_le_bytes());
    raw[32..40].copy_from_slice(&prp2.to_le_bytes());
}

fn rw(opcode: u8, slba: u64, blocks: u32, prp1: u64, prp2: u64) -> [u8; 64] {
    let mut raw = command(opcode, 1);
    set_prp(&mut raw, prp1, prp2);
    set_dw(&mut raw, 10, slba as u32);
    set_dw(&mut raw, 11, (slba >> 32) as u32);
    set_dw(&mut raw, 12, blocks - 1);
    raw
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

impl Driver {
    fn new(queues: u16) -> Driver {
        Self::new_with(queues, true)
    }

    fn new_with(queues: u16, shadow_doorbells: bool) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
        let image = TempFile::new_with_prefix("/tmp/sluice-nvme-test-").unwrap();
        image.as_file().set_len(IMAGE_SIZE).unwrap();
        let mut config = NvmeConfig::new(image.as_path());
        config.queues = queues;
        config.serial = "SLUICETEST01".into();
        config.shadow_doorbells = shadow_doorbells;
        let router = Arc::new(RecordingRouter::default());
        let kvm = Arc::new(FakeIoEvents::default());
        let interrupts = NvmeInterrupts {
            msi_sink: Arc::new(RecordingSink::default()),
            msi_router: Some(router.clone()),
            ioevents: Some(kvm.clone()),
        };
        let mut nvme = Nvme::new(
            &config,
            sluice_dma::identity(mem.clone()),
            interrupts,
            "nvme-test",
        )
        .unwrap();
        nvme.bar_moved(0, None, Some(BAR0));
        Driver {
            nvme,
            mem,
            image,
            router,
            kvm,
            admin_tail: 0,
            admin_head: 0,
            admin_phase: true,
            io_tail: 0,
            io_head: 0,
            io_phase: true,
            next_cid: 1,
            shadow: false,
        }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.nvme.bar_write(0, offset, &value.to_le_bytes());
    }

    fn write64(&mut self, offset: u64, value: u64) {
        self.nvme.bar_write(0, offset, &value.to_le_bytes());
    }

    fn read32(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.nvme.bar_read(0, offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn read64(&mut self, offset: u64) -> u64 {
        let mut data = [0u8; 8];
        self.nvme.bar_read(0, offset, &mut data);
        u64::from_le_bytes(data)
    }

    fn cc_value() -> u32 {
        CC_EN | (6 << 16) | (4 << 20)
    }

    fn enable(&mut self) {
        let sizes = u32::from(ADMIN_ENTRIES - 1);
        self.write32(AQA, sizes | (sizes << 16));
        self.write64(ASQ, ASQ_ADDR);
        self.write64(ACQ, ACQ_ADDR);
        self.write32(CC, Self::cc_value());
        assert_eq!(self.read32(CSTS) & CSTS_RDY, CSTS_RDY, "controller ready");
        self.admin_tail = 0;
        self.admin_head = 0;
        self.admin_phase = true;
    }

    fn disable(&mut self) {
        self.write32(CC, 0);
        self.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(ACQ_ADDR))
            .unwrap();
        self.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(CQ_ADDR))
            .unwrap();
    }

    fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Runs an admin command (served synchronously): its status and DW0.
    fn admin(&mut self, mut raw: [u8; 64]) -> (Status, u32) {
        let cid = self.cid();
        raw[2..4].copy_from_slice(&cid.to_le_bytes());
        let at = ASQ_ADDR + u64::from(self.admin_tail) * 64;
        self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
        self.admin_tail = (self.admin_tail + 1) % ADMIN_ENTRIES;
        self.write32(DOORBELLS, u32::from(self.admin_tail));
        let entry = self
            .take_entry(ACQ_ADDR, true)
            .expect("admin completion posted before the doorbell write returns");
        assert_eq!(entry.cid, cid);
        self.write32(DOORBELLS + 4, u32::from(self.admin_head));
        (entry.status, entry.result)
    }

    /// The next completion of the admin (`admin`) or I/O queue, if posted.
    fn take_entry(&mut self, base: u64, admin: bool) -> Option<Entry> {
        let (head, phase, size) = if admin {
            (&mut self.admin_head, &mut self.admin_phase, ADMIN_ENTRIES)
        } else {
            (&mut self.io_head, &mut self.io_phase, IO_ENTRIES)
        };
        let mut bytes = [0u8; 16];
        self.mem
            .read_slice(&mut bytes, GuestAddress(base + u64::from(*head) * 16))
            .unwrap();
        let dw3 = u16::from_le_bytes([bytes[14], bytes[15]]);
        if (dw3 & 1 == 1) != *phase {
            return None;
        }
        *head = (*head + 1) % size;
        if *head == 0 {
            *phase = !*phase;
        }
        Some(Entry {
            result: u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
            sq_id: u16::from_le_bytes([bytes[10], bytes[11]]),
            cid: u16::from_le_bytes([bytes[12], bytes[13]]),
            status: Status::from_field(dw3 >> 1),
        })
    }

    fn create_io_queues(&mut self) {
        let mut cq = command(OPC_CREATE_CQ, 0);
        set_prp(&mut cq, CQ_ADDR, 0);
        set_dw(&mut cq, 10, 1 | (u32::from(IO_ENTRIES - 1) << 16));
        set_dw(&mut cq, 11, 0x3 | (1 << 16));
        assert_eq!(self.admin(cq).0, Status::SUCCESS);
        let mut sq = command(OPC_CREATE_SQ, 0);
        set_prp(&mut sq, SQ_ADDR, 0);
        set_dw(&mut sq, 10, 1 | (u32::from(IO_ENTRIES - 1) << 16));
        set_dw(&mut sq, 11, 1 | (1 << 16));
        assert_eq!(self.admin(sq).0, Status::SUCCESS);
        self.io_tail = 0;
        self.io_head = 0;
        self.io_phase = true;
    }

    /// Queues commands on I/O SQ 1 and rings once (or per the shadow EventIdx).
    fn submit(&mut self, commands: &[[u8; 64]]) -> Vec<u16> {
        let old = self.io_tail;
        let mut cids = Vec::new();
        for raw in commands {
            let mut raw = *raw;
            let cid = self.cid();
            raw[2..4].copy_from_slice(&cid.to_le_bytes());
            let at = SQ_ADDR + u64::from(self.io_tail) * 64;
            self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
            self.io_tail = (self.io_tail + 1) % IO_ENTRIES;
            cids.push(cid);
        }
        if self.shadow {
            self.mem
                .write_obj(u32::from(self.io_tail), GuestAddress(SHADOW + 8))
                .unwrap();
            std::sync::atomic::fence(Ordering::SeqCst);
            let event: u32 = self.mem.read_obj(GuestAddress(EVENT_IDX + 8)).unwrap();
            let (new, event, old) = (self.io_tail, event as u16, old);
            if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
                && !self.kvm.write(BAR0 + DOORBELLS + 8)
            {
                self.write32(DOORBELLS + 8, u32::from(self.io_tail));
            }
        } else {
            self.write32(DOORBELLS + 8, u32::from(self.io_tail));
        }
        cids
    }

    /// Waits for `n` I/O completions and acknowledges them.
    fn reap(&mut self, n: usize) -> Vec<Entry> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut entries = Vec::new();
        while entries.len() < n {
            match self.take_entry(CQ_ADDR, false) {
                Some(entry) => entries.push(entry),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                None => panic!("only {} of {n} completions arrived", entries.len()),
            }
        }
        if self.shadow {
            self.mem
                .write_obj(u32::from(self.io_head), GuestAddress(SHADOW + 12))
                .unwrap();
        }
        self.write32(DOORBELLS + 12, u32::from(self.io_head));
        entries
    }

    fn io(&mut self, raw: [u8; 64]) -> Status {
        self.submit(&[raw]);
        self.reap(1)[0].status
    }

    fn identify(&mut self, cns: u32, nsid: u32) -> (Status, Vec<u8>) {
        let mut raw = command(OPC_IDENTIFY, nsid);
        set_prp(&mut raw, ID_BUF, 0);
        set_dw(&mut raw, 10, cns);
        self.mem
            .write_slice(&[0xaau8; 4096], GuestAddress(ID_BUF))
            .unwrap();
        let status = self.admin(raw).0;
        let mut page = vec![0u8; 4096];
        self.mem
            .read_slice(&mut page, GuestAddress(ID_BUF))
            .unwrap();
        (status, page)
    }

    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.image
            .as_file()
            .read_exact_at(&mut data, offset)
            .unwrap();
        data
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }
}

#[derive(Debug)]
struct Entry {
    result: u32,
    sq_id: u16,
    cid: u16,
    status: Status,
}

fn ready_driver() -> Driver {
    let mut driver = Driver::new(2);
    driver.enable();
    driver.create_io_queues();
    driver
}

#[test]
fn registers_advertise_nvme_1_4_and_enable_follows_cc() {
    let mut driver = Driver::new(2);

    let cap = driver.read64(CAP);
    let version = driver.read32(VS);
    let ready_before = driver.read32(CSTS) & CSTS_RDY;
    driver.enable();
    let ready_after = driver.read32(CSTS) & CSTS_RDY;
    driver.write32(CC, 0);

    assert_eq!(cap, capabilities());
    assert_eq!(version, 0x0001_0400);
    assert_eq!(ready_before, 0);
    assert_eq!(ready_after, CSTS_RDY);
    assert_eq!(driver.read32(CSTS), 0, "reset clears RDY");
    assert_eq!(driver.nvme.config().read_u32(0x08) >> 8, 0x01_0802);
}

#[test]
fn enable_with_bad_configuration_or_admin_queue_sets_fatal_status() {
    let mut bad_page_size = Driver::new(1);
    let mut unaligned_queue = Driver::new(1);

    bad_page_size.write32(AQA, 0x001f_001f);
    bad_page_size.write32(CC, CC_EN | (5 << 7));
    unaligned_queue.write32(AQA, 0x001f_001f);
    unaligned_queue.write64(ASQ, RAM_SIZE as u64); // outside guest memory
    unaligned_queue.write64(ACQ, ACQ_ADDR);
    unaligned_queue.write32(CC, Driver::cc_value());

    assert_eq!(bad_page_size.read32(CSTS), CSTS_CFS);
    assert_eq!(unaligned_queue.read32(CSTS), CSTS_CFS);
}

#[test]
fn identify_returns_controller_namespace_and_lists() {
    let mut driver = Driver::new(2);
    driver.enable();

    let (ctrl_status, ctrl) = driver.identify(1, 0);
    let (ns_status, ns) = driver.identify(0, 1);
    let (list_status, list) = driver.identify(2, 0);
    let (desc_status, desc) = driver.identify(3, 1);
    let (bad_cns, _) = driver.identify(0x10, 0);
    let (bad_ns, _) = driver.identify(0, 2);

    assert_eq!(ctrl_status, Status::SUCCESS);
    assert_eq!(u16::from_le_bytes([ctrl[0], ctrl[1]]), NVME_VENDOR_ID);
    assert_eq!(&ctrl[4..24], b"SLUICETEST01        ");
    assert!(ctrl[24..64].starts_with(b"sluice NVMe controller "));
    assert_eq!(ctrl[77], MDTS);
    assert_eq!(
        u32::from_le_bytes(ctrl[80..84].try_into().unwrap()),
        VERSION
    );
    assert_ne!(u16::from_le_bytes([ctrl[256], ctrl[257]]) & OACS_DBBUF, 0);
    assert_eq!((ctrl[512], ctrl[513]), (0x66, 0x44));
    assert_eq!(u32::from_le_bytes(ctrl[516..520].try_into().unwrap()), 1);
    assert_eq!(ns_status, Status::SUCCESS);
    assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), BLOCKS);
    assert_eq!(
        (u32::from_le_bytes(ns[128..132].try_into().unwrap()) >> 16) & 0xff,
        9
    );
    assert_eq!(list_status, Status::SUCCESS);
    assert_eq!(&list[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(desc_status, Status::SUCCESS);
    assert_eq!((desc[0], desc[1]), (3, 16));
    assert_eq!(bad_cns, Status::INVALID_FIELD);
    assert_eq!(bad_ns, Status::INVALID_NAMESPACE);
}

#[test]
fn written_pattern_reads_back_and_lands_in_the_image() {
    let mut driver = ready_driver();
    // 12 KiB starting 512 bytes into a page: PRP1 + a PRP list of three entries.
    let data = pattern(12 * 1024, 7);
    let first = DATA + 0x200;
    driver.mem.write_slice(&data, GuestAddress(first)).unwrap();
    for (i, page) in [DATA + 0x1000, DATA + 0x2000, DATA + 0x3000]
        .iter()
        .enumerate()
    {
        driver
            .mem
            .write_obj(*page, GuestAddress(LISTS + 8 * i as u64))
            .unwrap();
    }

    let write = driver.io(rw(OPC_WRITE, 16, 24, first, LISTS));
    let flush = driver.io(command(OPC_FLUSH, 1));
    driver
        .mem
        .write_obj(READ_BACK + 0x1000, GuestAddress(LISTS + 0x800))
        .unwrap();
    driver
        .mem
        .write_obj(READ_BACK + 0x2000, GuestAddress(LISTS + 0x808))
        .unwrap();
    driver
        .mem
        .write_obj(READ_BACK + 0x3000, GuestAddress(LISTS + 0x810))
        .unwrap();
    let read = driver.io(rw(OPC_READ, 16, 24, READ_BACK + 0x200, LISTS + 0x800));

    assert_eq!(
        (write, flush, read),
        (Status::SUCCESS, Status::SUCCESS, Status::SUCCESS)
    );
    assert_eq!(driver.guest_bytes(READ_BACK + 0x200, data.len()), data);
    assert_eq!(driver.image_bytes(16 * 512, data.len()), data);
    let metrics = driver.nvme.metrics();
    assert_eq!(metrics.queues[1].requests.load(Ordering::Relaxed), 3);
    assert_eq!(
        metrics.queues[1].bytes.load(Ordering::Relaxed),
        2 * data.len() as u64
    );
}

#[test]
fn sgl_segments_carry_data_both_ways() {
    let mut driver = ready_driver();
    let data = pattern(4096, 3);
    driver
        .mem
        .write_slice(&data[..1024], GuestAddress(DATA))
        .unwrap();
    driver
        .mem
        .write_slice(&data[1024..], GuestAddress(DATA + 0x2000))
        .unwrap();
    // A last segment of two data blocks.
    let descriptor = |addr: u64, len: u32, kind: u8| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[15] = kind << 4;
        d
    };
    driver
        .mem
        .write_slice(&descriptor(DATA, 1024, 0), GuestAddress(LISTS))
        .unwrap();
    driver
        .mem
        .write_slice(
            &descriptor(DATA + 0x2000, 3072, 0),
            GuestAddress(LISTS + 16),
        )
        .unwrap();
    let mut write = rw(OPC_WRITE, 100, 8, 0, 0);
    write[1] = 0x40; // PSDT: SGL
    write[24..40].copy_from_slice(&descriptor(LISTS, 32, 3));
    let mut read = rw(OPC_READ, 100, 8, 0, 0);
    read[1] = 0x40;
    read[24..40].copy_from_slice(&descriptor(READ_BACK, 4096, 0));
    let mut short = read;
    short[24..40].copy_from_slice(&descriptor(READ_BACK, 4095, 0));
    let mut bit_bucket = read;
    bit_bucket[24..40].copy_from_slice(&descriptor(READ_BACK, 4096, 1));

    let statuses = [
        driver.io(write),
        driver.io(read),
        driver.io(short),
        driver.io(bit_bucket),
    ];

    assert_eq!(
        statuses,
        [
            Status::SUCCESS,
            Status::SUCCESS,
            Status::DATA_SGL_LENGTH_INVALID,
            Status::SGL_DESCRIPTOR_TYPE_INVALID
        ]
    );
    assert_eq!(driver.guest_bytes(READ_BACK, 4096), data);
    assert_eq!(driver.image_bytes(100 * 512, 4096), data);
}

#[test]
fn hostile_data_pointers_get_the_status_the_spec_names() {
    let mut driver = ready_driver();
    driver
        .mem
        .write_obj(DATA + 0x1234u64, GuestAddress(LISTS))
        .unwrap();

    let unaligned_prp1 = driver.io(rw(OPC_READ, 0, 1, DATA + 2, 0));
    let offset_prp2 = driver.io(rw(OPC_READ, 0, 16, DATA, DATA + 0x1200));
    let offset_list_entry = driver.io(rw(OPC_READ, 0, 24, DATA, LISTS));
    let misaligned_list = driver.io(rw(OPC_READ, 0, 24, DATA, LISTS + 4));
    let out_of_range = driver.io(rw(OPC_READ, BLOCKS - 1, 2, DATA, DATA + 0x1000));
    let beyond_mdts = driver.io(rw(OPC_READ, 0, 257, DATA, LISTS));
    let outside_memory = driver.io(rw(OPC_READ, 0, 1, RAM_SIZE as u64, 0));
    let bad_namespace = driver.io({
        let mut raw = rw(OPC_READ, 0, 1, DATA, 0);
        raw[4] = 7;
        raw
    });
    let bad_opcode = driver.io(command(0x7f, 1));
    let reserved_psdt = driver.io({
        let mut raw = rw(OPC_READ, 0, 1, DATA, 0);
        raw[1] = 0xc0;
        raw
    });

    assert_eq!(unaligned_prp1, Status::PRP_OFFSET_INVALID);
    assert_eq!(offset_prp2, Status::PRP_OFFSET_INVALID);
    assert_eq!(offset_list_entry, Status::PRP_OFFSET_INVALID);
    assert_eq!(misaligned_list, Status::PRP_OFFSET_INVALID);
    assert_eq!(out_of_range, Status::LBA_OUT_OF_RANGE);
    assert_eq!(beyond_mdts, Status::INVALID_FIELD);
    assert_eq!(outside_memory, Status::DATA_TRANSFER_ERROR);
    assert_eq!(bad_namespace, Status::INVALID_NAMESPACE);
    assert_eq!(bad_opcode, Status::INVALID_OPCODE);
    assert_eq!(reserved_psdt, Status::INVALID_FIELD);
    assert_eq!(
        driver.nvme.metrics().queues[1]
            .errors
            .load(Ordering::Relaxed),
        10
    );
}

#[test]
fn write_zeroes_and_deallocate_change_the_image() {
    let mut driver = ready_driver();
    let data = pattern(8192, 9);
    driver.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(
        driver.io(rw(OPC_WRITE, 0, 16, DATA, DATA + 0x1000)),
        Status::SUCCESS
    );
    let mut zeroes = command(OPC_WRITE_ZEROES, 1);
    set_dw(&mut zeroes, 10, 2);
    set_dw(&mut zeroes, 12, 1); // two blocks from LBA 2
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&4u32.to_le_bytes());
    range[8..16].copy_from_slice(&8u64.to_le_bytes());
    driver
        .mem
        .write_slice(&range, GuestAddress(ID_BUF))
        .unwrap();
    let mut dsm = command(OPC_DATASET_MANAGEMENT, 1);
    set_prp(&mut dsm, ID_BUF, 0);
    set_dw(&mut dsm, 11, 1 << 2);
    let mut dsm_out_of_range = dsm;
    range[8..16].copy_from_slice(&BLOCKS.to_le_bytes());
    driver
        .mem
        .write_slice(&range, GuestAddress(ID_BUF + 0x100))
        .unwrap();
    set_prp(&mut dsm_out_of_range, ID_BUF + 0x100, 0);

    let zeroed = driver.io(zeroes);
    let deallocated = driver.io(dsm);
    let refused = driver.io(dsm_out_of_range);

    assert_eq!((zeroed, deallocated), (Status::SUCCESS, Status::SUCCESS));
    assert_eq!(refused, Status::LBA_OUT_OF_RANGE);
    let image = driver.image_bytes(0, 8192);
    assert_eq!(&image[..1024], &data[..1024]);
    assert!(image[1024..2048].iter().all(|b| *b == 0));
    assert_eq!(&image[2048..4096], &data[2048..4096]);
}

#[test]
fn queue_management_refuses_hostile_ids_sizes_and_vectors() {
    let mut driver = Driver::new(2);
    driver.enable();
    let create_cq = |qid: u32, size: u32, flags: u32, base: u64| {
        let mut raw = command(OPC_CREATE_CQ, 0);
        set_prp(&mut raw, base, 0);
        set_dw(&mut raw, 10, qid | (size << 16));
        set_dw(&mut raw, 11, flags);
        raw
    };
    let create_sq = |qid: u32, cqid: u32| {
        let mut raw = command(OPC_CREATE_SQ, 0);
        set_prp(&mut raw, SQ_ADDR, 0);
        set_dw(&mut raw, 10, qid | (63 << 16));
        set_dw(&mut raw, 11, 1 | (cqid << 16));
        raw
    };

    let statuses = [
        driver.admin(create_cq(0, 63, 3, CQ_ADDR)).0,
        driver.admin(create_cq(3, 63, 3, CQ_ADDR)).0,
        driver.admin(create_cq(1, 0, 3, CQ_ADDR)).0,
        driver.admin(create_cq(1, 1024, 3, CQ_ADDR)).0,
        driver.admin(create_cq(1, 63, 2, CQ_ADDR)).0,
        driver.admin(create_cq(1, 63, 3 | (3 << 16), CQ_ADDR)).0,
        driver.admin(create_cq(1, 63, 3, CQ_ADDR + 8)).0,
        driver.admin(create_sq(1, 1)).0,
        driver.admin(create_cq(1, 63, 3, CQ_ADDR)).0,
        driver.admin(create_cq(1, 63, 3, CQ_ADDR)).0,
        driver.admin(create_sq(1, 2)).0,
        driver.admin(create_sq(1, 1)).0,
        driver
            .admin({
                let mut raw = command(OPC_DELETE_CQ, 0);
                set_dw(&mut raw, 10, 1);
                raw
            })
            .0,
    ];

    assert_eq!(
        statuses,
        [
            Status::INVALID_QUEUE_IDENTIFIER,
            Status::INVALID_QUEUE_IDENTIFIER,
            Status::INVALID_QUEUE_SIZE,
            Status::INVALID_QUEUE_SIZE,
            Status::INVALID_FIELD,
            Status::INVALID_INTERRUPT_VECTOR,
            Status::PRP_OFFSET_INVALID,
            Status::COMPLETION_QUEUE_INVALID,
            Status::SUCCESS,
            Status::INVALID_QUEUE_IDENTIFIER,
            Status::COMPLETION_QUEUE_INVALID,
            Status::SUCCESS,
            Status::INVALID_QUEUE_DELETION,
        ]
    );
    assert_eq!(driver.nvme.io_queues(), 1);
}

#[test]
fn features_logs_and_event_requests_follow_the_spec() {
    let mut driver = Driver::new(4);
    driver.enable();
    let mut queues = command(OPC_SET_FEATURES, 0);
    set_dw(&mut queues, 10, u32::from(FEAT_NUMBER_OF_QUEUES));
    set_dw(&mut queues, 11, 15 | (15 << 16));
    let mut unknown = command(OPC_GET_FEATURES, 0);
    set_dw(&mut unknown, 10, 0x7e);
    let mut saveable = command(OPC_SET_FEATURES, 0);
    set_dw(&mut saveable, 10, u32::from(FEAT_ARBITRATION) | (1 << 31));
    let mut smart = command(OPC_GET_LOG_PAGE, 0);
    set_prp(&mut smart, ID_BUF, 0);
    set_dw(&mut smart, 10, u32::from(LOG_SMART) | (127 << 16));
    let mut bad_log = smart;
    set_dw(&mut bad_log, 10, 0x70 | (127 << 16));

    let granted = driver.admin(queues);
    let unknown_status = driver.admin(unknown).0;
    let saveable_status = driver.admin(saveable).0;
    let smart_status = driver.admin(smart).0;
    let smart_page = driver.guest_bytes(ID_BUF, 512);
    let bad_log_status = driver.admin(bad_log).0;
    let abort = driver.admin(command(OPC_ABORT, 0));
    // AERs are held: submit the limit, then one more, which completes with the limit error.
    for _ in 0..AER_LIMIT {
        let at = ASQ_ADDR + u64::from(driver.admin_tail) * 64;
        driver
            .mem
            .write_slice(&command(OPC_ASYNC_EVENT_REQUEST, 0), GuestAddress(at))
            .unwrap();
        driver.admin_tail += 1;
        driver.write32(DOORBELLS, u32::from(driver.admin_tail));
    }
    let held = driver.nvme.held_event_requests();
    let nothing_posted = driver.take_entry(ACQ_ADDR, true).is_none();
    let over_limit = driver.admin(command(OPC_ASYNC_EVENT_REQUEST, 0)).0;
    let keep_alive = driver.admin(command(OPC_KEEP_ALIVE, 0)).0;

    assert_eq!(
        granted,
        (Status::SUCCESS, 3 | (3 << 16)),
        "4 queues at most"
    );
    assert_eq!(unknown_status, Status::INVALID_FIELD);
    assert_eq!(saveable_status, Status::FEATURE_NOT_SAVEABLE);
    assert_eq!(smart_status, Status::SUCCESS);
    assert_eq!(smart_page[3], 100, "available spare");
    assert_eq!(bad_log_status, Status::INVALID_LOG_PAGE);
    assert_eq!(abort, (Status::SUCCESS, 1), "not aborted");
    assert_eq!(held, AER_LIMIT);
    assert!(nothing_posted);
    assert_eq!(over_limit, Status::AER_LIMIT_EXCEEDED);
    assert_eq!(keep_alive, Status::SUCCESS);
}

#[test]
fn shadow_doorbells_let_commands_through_without_doorbell_writes() {
    let mut driver = Driver::new(2);
    driver.enable();
    let mut dbbuf = command(OPC_DOORBELL_BUFFER_CONFIG, 0);
    set_prp(&mut dbbuf, SHADOW, EVENT_IDX);
    let mut unaligned = dbbuf;
    set_prp(&mut unaligned, SHADOW + 8, EVENT_IDX);
    assert_eq!(driver.admin(unaligned).0, Status::INVALID_FIELD);
    assert_eq!(driver.admin(dbbuf).0, Status::SUCCESS);
    driver.shadow = true;
    driver.create_io_queues();
    let data = pattern(4096, 11);
    driver.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let writes: Vec<_> = (0..4u64)
        .map(|i| rw(OPC_WRITE, i * 8, 8, DATA, 0))
        .collect();

    driver.submit(&writes);
    let entries = driver.reap(4);
    driver.submit(&[rw(OPC_READ, 24, 8, READ_BACK, 0)]);
    let read = driver.reap(1);

    assert!(entries
        .iter()
        .all(|e| e.status == Status::SUCCESS && e.sq_id == 1));
    assert_eq!(read[0].status, Status::SUCCESS);
    assert_eq!(driver.guest_bytes(READ_BACK, 4096), data);
    let event: u32 = driver.mem.read_obj(GuestAddress(EVENT_IDX + 8)).unwrap();
    assert_eq!(event, 5, "EventIdx follows the tail the worker saw");
    let queue = &driver.nvme.metrics().queues[1];
    assert_eq!(
        queue.kicks.load(Ordering::Relaxed),
        2,
        "one MMIO doorbell per batch"
    );
    // 5 commands, 2 doorbells: at least 3 came without one. A command the worker takes from
    // the shadow tail before it reads that command's doorbell also counts (each fetch counts
    // its own commands beyond the doorbells it read; a doorbell read later takes nothing back).
    let suppressed = queue.notifications_suppressed.load(Ordering::Relaxed);
    assert!((3..=4).contains(&suppressed), "{suppressed} suppressed");
    let metrics = driver.nvme.metrics();
    let sq_exits = metrics.counter("exits_sq_doorbells");
    // The 4 admin doorbells (dbbuf twice, create CQ and SQ) only: the I/O ones went to KVM.
    assert_eq!(sq_exits, Some(4));
    assert_eq!(
        driver.kvm.registered.lock().unwrap()[0].0,
        BAR0 + DOORBELLS + 8
    );
}

#[test]
fn doorbell_ioeventfds_follow_bar0_and_go_with_their_queue() {
    let mut driver = Driver::new(2);
    driver.enable();
    let mut dbbuf = command(OPC_DOORBELL_BUFFER_CONFIG, 0);
    set_prp(&mut dbbuf, SHADOW, EVENT_IDX);
    driver.create_io_queues();
    let before_dbbuf = driver.kvm.registered.lock().unwrap().len();
    assert_eq!(driver.admin(dbbuf).0, Status::SUCCESS);
    let after_dbbuf: Vec<u64> = driver
        .kvm
        .registered
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.0)
        .collect();

    driver.nvme.bar_moved(0, Some(BAR0), Some(BAR0 + 0x10_0000));
    let moved: Vec<u64> = driver
        .kvm
        .registered
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.0)
        .collect();
    let mut delete_sq = command(OPC_DELETE_SQ, 0);
    set_dw(&mut delete_sq, 10, 1);
    assert_eq!(driver.admin(delete_sq).0, Status::SUCCESS);

    assert_eq!(before_dbbuf, 0, "trapped until shadow doorbells are on");
    assert_eq!(after_dbbuf, [BAR0 + DOORBELLS + 8]);
    assert_eq!(moved, [BAR0 + 0x10_0000 + DOORBELLS + 8]);
    assert!(driver.kvm.registered.lock().unwrap().is_empty());
    assert_eq!(
        *driver.kvm.removed.lock().unwrap(),
        [BAR0 + DOORBELLS + 8, BAR0 + 0x10_0000 + DOORBELLS + 8]
    );
}

#[test]
fn msix_vector_of_the_cq_fires_on_completion() {
    let mut driver = Driver::new(2);
    driver
        .nvme
        .config_write(MSIX_CAP + 2, &MSIX_ENABLE.to_le_bytes());
    for vector in 0..2u64 {
        let entry = vector * 16;
        driver
            .nvme
            .bar_write(4, entry, &0xfee0_0000u32.to_le_bytes());
        driver
            .nvme
            .bar_write(4, entry + 8, &(0x40 + vector as u32).to_le_bytes());
        driver.nvme.bar_write(4, entry + 12, &0u32.to_le_bytes());
    }
    driver.enable();
    driver.create_io_queues();
    let admin_interrupts = driver.router.route(0).trigger_count();

    driver.io(rw(OPC_READ, 0, 1, DATA, 0));

    assert!(admin_interrupts >= 2, "admin completions signal vector 0");
    assert_eq!(driver.router.route(1).trigger_count(), 1);
    assert_eq!(
        driver.nvme.shared.intx.causes(),
        0,
        "INTx stays quiet with MSI-X on"
    );
}

#[test]
fn intx_follows_unconsumed_completions_and_intms() {
    let mut driver = Driver::new(1);
    driver.enable();
    let mut raw = command(OPC_KEEP_ALIVE, 0);
    raw[2] = 1;
    driver
        .mem
        .write_slice(&raw, GuestAddress(ASQ_ADDR))
        .unwrap();

    driver.write32(DOORBELLS, 1);
    let raised = driver.nvme.shared.intx.causes();
    driver.write32(INTMS, 1);
    let masked = driver.nvme.shared.intx.causes();
    driver.write32(INTMC, 1);
    let unmasked = driver.nvme.shared.intx.causes();
    driver.write32(DOORBELLS + 4, 1);
    let consumed = driver.nvme.shared.intx.causes();

    assert_eq!((raised, masked, unmasked, consumed), (1, 0, 1, 0));
}

#[test]
fn reset_mid_io_stops_the_queues_and_the_controller_works_again() {
    let mut driver = ready_driver();
    let data = pattern(64 * 1024, 5);
    driver.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    for i in 0..16u64 {
        driver
            .mem
            .write_obj(DATA + 0x1000 * (i + 1), GuestAddress(LISTS + 8 * i))
            .unwrap();
    }
    let writes: Vec<_> = (0..32u64)
        .map(|i| rw(OPC_WRITE, i * 16, 128, DATA, LISTS))
        .collect();
    driver.submit(&writes);

    let started = Instant::now();
    driver.disable();
    let reset_took = started.elapsed();

    assert_eq!(driver.read32(CSTS) & CSTS_RDY, 0);
    assert_eq!(driver.nvme.io_queues(), 0);
    assert!(
        reset_took < Duration::from_secs(5),
        "reset took {reset_took:?}"
    );
    driver.enable();
    driver.create_io_queues();
    assert_eq!(driver.io(rw(OPC_WRITE, 1000, 8, DATA, 0)), Status::SUCCESS);
    assert_eq!(
        driver.io(rw(OPC_READ, 1000, 8, READ_BACK, 0)),
        Status::SUCCESS
    );
    assert_eq!(driver.guest_bytes(READ_BACK, 4096), data[..4096]);
}

#[test]
fn shutdown_completes_in_flight_io_and_reports_complete() {
    let mut driver = ready_driver();
    let data = pattern(4096, 1);
    driver.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    driver.submit(&[rw(OPC_WRITE, 40, 8, DATA, 0)]);

    driver.write32(CC, Driver::cc_value() | (1 << 14));

    assert_eq!(driver.read32(CSTS) & CSTS_SHST_MASK, CSTS_SHST_COMPLETE);
    assert_eq!(
        driver.reap(1)[0].status,
        Status::SUCCESS,
        "drained, not dropped"
    );
    assert_eq!(driver.image_bytes(40 * 512, 4096), data);
}

#[test]
fn deleting_a_queue_drains_it_and_frees_its_id() {
    let mut driver = ready_driver();
    let mut delete_sq = command(OPC_DELETE_SQ, 0);
    set_dw(&mut delete_sq, 10, 1);
    let mut delete_cq = command(OPC_DELETE_CQ, 0);
    set_dw(&mut delete_cq, 10, 1);

    let sq = driver.admin(delete_sq).0;
    let sq_again = driver.admin(delete_sq).0;
    let cq = driver.admin(delete_cq).0;

    assert_eq!(
        (sq, sq_again, cq),
        (
            Status::SUCCESS,
            Status::INVALID_QUEUE_IDENTIFIER,
            Status::SUCCESS
        )
    );
    assert_eq!(driver.nvme.io_queues(), 0);
    driver.create_io_queues();
    assert_eq!(driver.nvme.io_queues(), 1);
}

#[test]
fn without_shadow_doorbells_the_command_is_neither_offered_nor_taken() {
    let mut driver = Driver::new_with(1, false);
    driver.enable();
    let mut dbbuf = command(OPC_DOORBELL_BUFFER_CONFIG, 0);
    set_prp(&mut dbbuf, SHADOW, EVENT_IDX);

    let (_, ctrl) = driver.identify(1, 0);
    let status = driver.admin(dbbuf).0;

    assert_eq!(u16::from_le_bytes([ctrl[256], ctrl[257]]) & OACS_DBBUF, 0);
    assert_eq!(status, Status::INVALID_OPCODE);
}

#[test]
fn invalid_doorbell_writes_complete_one_event_request_until_the_error_log_is_read() {
    let mut driver = ready_driver();
    let mut error_log = command(OPC_GET_LOG_PAGE, 0);
    set_prp(&mut error_log, ID_BUF, 0);
    set_dw(&mut error_log, 10, u32::from(LOG_ERROR) | (15 << 16));
    let aer_at = |driver: &mut Driver| {
        let at = ASQ_ADDR + u64::from(driver.admin_tail) * 64;
        let mut raw = command(OPC_ASYNC_EVENT_REQUEST, 0);
        raw[2..4].copy_from_slice(&0x0aeau16.to_le_bytes());
        driver.mem.write_slice(&raw, GuestAddress(at)).unwrap();
        driver.admin_tail += 1;
        driver.write32(DOORBELLS, u32::from(driver.admin_tail));
    };
    aer_at(&mut driver);
    aer_at(&mut driver);

    driver.write32(DOORBELLS + 8 * 5, 1); // SQ 5 does not exist
    let first = driver.take_entry(ACQ_ADDR, true);
    driver.write32(DOORBELLS + 8, 4096); // beyond SQ 1: masked until the log is read
    let masked = driver.take_entry(ACQ_ADDR, true);
    driver.write32(DOORBELLS + 4, u32::from(driver.admin_head));
    let log = driver.admin(error_log).0;
    driver.write32(DOORBELLS + 8, 4096);
    let second = driver.take_entry(ACQ_ADDR, true);

    let first = first.expect("an event for the invalid register");
    assert_eq!(
        (first.cid, first.status, first.result),
        (0x0aea, Status::SUCCESS, 0x01_0000)
    );
    assert!(masked.is_none());
    assert_eq!(log, Status::SUCCESS);
    let second = second.expect("an event for the invalid value");
    assert_eq!(second.result, 0x01_0100);
    assert_eq!(driver.nvme.held_event_requests(), 0);
}

/// Waits up to 2 s for `route` to have fired `count` times.
fn wait_for_triggers(route: &sluice_pci::testing::RecordingRoute, count: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(2);
    while route.trigger_count() < count && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    route.trigger_count()
}

#[test]
fn interrupt_coalescing_folds_completions_into_one_interrupt_per_window() {
    let mut driver = Driver::new(2);
    driver
        .nvme
        .config_write(MSIX_CAP + 2, &MSIX_ENABLE.to_le_bytes());
    for vector in 0..2u64 {
        driver
            .nvme
            .bar_write(4, vector * 16, &0xfee0_0000u32.to_le_bytes());
        driver
            .nvme
            .bar_write(4, vector * 16 + 12, &0u32.to_le_bytes());
    }
    driver.enable();
    driver.create_io_queues();
    let mut coalesce = command(OPC_SET_FEATURES, 0);
    set_dw(&mut coalesce, 10, u32::from(FEAT_INTERRUPT_COALESCING));
    set_dw(&mut coalesce, 11, 3 | (255 << 8)); // 4 entries or 25.5 ms
    assert_eq!(driver.admin(coalesce).0, Status::SUCCESS);
    let route = driver.router.route(1);

    driver.submit(&[rw(OPC_READ, 0, 1, DATA, 0), rw(OPC_READ, 1, 1, DATA, 0)]);
    let held = driver.reap(2);
    let after_window = wait_for_triggers(&route, 1);
    std::thread::sleep(Duration::from_millis(60));
    let coalesced = route.trigger_count();
    let mut vector_config = command(OPC_SET_FEATURES, 0);
    set_dw(
        &mut vector_config,
        10,
        u32::from(FEAT_INTERRUPT_VECTOR_CONFIG),
    );
    set_dw(&mut vector_config, 11, 1 | (1 << 16)); // vector 1: coalescing disabled
    assert_eq!(driver.admin(vector_config).0, Status::SUCCESS);
    let mut get_config = command(OPC_GET_FEATURES, 0);
    set_dw(&mut get_config, 10, u32::from(FEAT_INTERRUPT_VECTOR_CONFIG));
    set_dw(&mut get_config, 11, 1);
    let read_back = driver.admin(get_config);
    driver.submit(&[rw(OPC_READ, 2, 1, DATA, 0)]);
    driver.reap(1);
    let uncoalesced = wait_for_triggers(&route, coalesced + 1);

    assert!(held.iter().all(|e| e.status == Status::SUCCESS));
    assert_eq!(after_window, 1, "the time limit sends the held interrupt");
    assert_eq!(coalesced, 1, "two completions, one interrupt");
    assert_eq!(read_back, (Status::SUCCESS, 1 | (1 << 16)));
    assert_eq!(
        uncoalesced, 2,
        "CD on the vector: the next completion interrupts"
    );
}

/// A function built like [`Driver::new`]'s over the same memory, image and plumbing (the
/// destination of a restore); the old one must be gone first (its image lock, its doorbell
/// ioeventfds).
fn function_over(
    mem: &GuestMemoryMmap,
    image: &TempFile,
    router: &Arc<RecordingRouter>,
    kvm: &Arc<FakeIoEvents>,
    queues: u16,
) -> Nvme {
    let mut config = NvmeConfig::new(image.as_path());
    config.queues = queues;
    config.serial = "SLUICETEST01".into();
    let interrupts = NvmeInterrupts {
        msi_sink: Arc::new(RecordingSink::default()),
        msi_router: Some(router.clone()),
        ioevents: Some(kvm.clone()),
    };
    let mut nvme = Nvme::new(
        &config,
        sluice_dma::identity(mem.clone()),
        interrupts,
        "nvme-restored",
    )
    .unwrap();
    nvme.bar_moved(0, None, Some(BAR0));
    nvme
}

impl Driver {
    /// The driver with its function replaced by a fresh one built the same way.
    fn with_fresh_function(mut self) -> Driver {
        let queues = self.nvme.max_queues;
        drop(self.nvme);
        self.nvme = function_over(&self.mem, &self.image, &self.router, &self.kvm, queues);
        self
    }
}

#[test]
fn a_saved_controller_runs_on_and_a_restored_one_serves_the_same_queues() {
    let mut driver = Driver::new(2);
    driver.enable();
    let mut dbbuf = command(OPC_DOORBELL_BUFFER_CONFIG, 0);
    set_prp(&mut dbbuf, SHADOW, EVENT_IDX);
    assert_eq!(driver.admin(dbbuf).0, Status::SUCCESS);
    driver.shadow = true;
    driver.create_io_queues();
    let data = pattern(4096, 5);
    driver.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    // Past the middle of the 64-entry CQ, so the restored one wraps its phase.
    for _ in 0..40 {
        assert_eq!(driver.io(rw(OPC_WRITE, 8, 8, DATA, 0)), Status::SUCCESS);
    }

    // An Async Event Request the controller holds across the save and the restore.
    let at = ASQ_ADDR + u64::from(driver.admin_tail) * 64;
    let mut aer = command(OPC_ASYNC_EVENT_REQUEST, 0);
    aer[2..4].copy_from_slice(&0x0aeau16.to_le_bytes());
    driver.mem.write_slice(&aer, GuestAddress(at)).unwrap();
    driver.admin_tail += 1;
    driver.write32(DOORBELLS, u32::from(driver.admin_tail));

    let first = driver.nvme.save_state().unwrap().unwrap();
    let after_save = driver.io(rw(OPC_READ, 8, 8, READ_BACK, 0));
    let second = driver.nvme.save_state().unwrap().unwrap();
    let mut driver = driver.with_fresh_function();
    driver.nvme.restore_state(&second).unwrap();
    driver
        .mem
        .write_slice(&[0u8; 4096], GuestAddress(READ_BACK))
        .unwrap();
    let reads: Vec<Status> = (0..40)
        .map(|_| driver.io(rw(OPC_READ, 8, 8, READ_BACK, 0)))
        .collect();
    let held = driver.nvme.held_event_requests();
    driver.write32(DOORBELLS + 8 * 5, 1); // SQ 5 does not exist: an error event
    let event = driver.take_entry(ACQ_ADDR, true);
    driver.write32(DOORBELLS + 4, u32::from(driver.admin_head));
    let (identify, _) = driver.identify(u32::from(CNS_CONTROLLER), 0);

    assert_eq!(after_save, Status::SUCCESS, "the saved controller runs on");
    assert_ne!(first, serde_json::Value::Null);
    assert!(reads.iter().all(|s| *s == Status::SUCCESS), "{reads:?}");
    assert_eq!(driver.guest_bytes(READ_BACK, 4096), data);
    assert_eq!(held, 1, "the Async Event Request is still held");
    let event = event.expect("the held request completes with the event");
    assert_eq!((event.cid, event.result), (0x0aea, 0x01_0000));
    assert_eq!(identify, Status::SUCCESS, "the admin queue goes on too");
    assert_eq!(driver.nvme.io_queues(), 1);
    assert!(
        driver.kvm.registered.lock().unwrap()[0].0 == BAR0 + DOORBELLS + 8,
        "the shadowed SQ doorbell is an ioeventfd again"
    );
}

#[test]
fn a_hostile_saved_state_is_refused_and_nothing_runs() {
    let mut driver = Driver::new(2);
    driver.enable();
    driver.create_io_queues();
    let state = driver.nvme.save_state().unwrap().unwrap();
    let controller = &state["controller"];
    let mutations: [(&str, serde_json::Value); 6] = [
        ("sq head past its size", {
            let mut s = state.clone();
            s["controller"]["sqs"][0]["head"] = 64.into();
            s
        }),
        ("sq on a missing cq", {
            let mut s = state.clone();
            s["controller"]["sqs"][0]["cqid"] = 2.into();
            s
        }),
        ("cq vector beyond the table", {
            let mut s = state.clone();
            s["controller"]["cqs"][0]["vector"] = 9.into();
            s
        }),
        ("queue outside guest memory", {
            let mut s = state.clone();
            s["controller"]["cqs"][0]["base"] = (1u64 << 40).into();
            s
        }),
        ("admin queue of one entry", {
            let mut s = state.clone();
            s["controller"]["admin_sq"][1] = 1.into();
            s
        }),
        ("another queue count", {
            let mut s = state.clone();
            s["max_queues"] = 3.into();
            s
        }),
    ];
    assert!(controller.is_object());
    let mut driver = driver.with_fresh_function();

    for (what, hostile) in mutations {
        let refused = driver.nvme.restore_state(&hostile);

        assert!(refused.is_err(), "{what}: accepted");
        assert_eq!(driver.nvme.io_queues(), 0, "{what}: a queue runs");
    }
    driver.nvme.restore_state(&state).unwrap();
    assert_eq!(driver.nvme.io_queues(), 1);
}
