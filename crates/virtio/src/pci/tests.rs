//! virtio-pci transport tests: a fake device model behind [`VirtioPciDevice`], driven through
//! the `PciDevice` accessors the way a guest driver would.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use sluice_bus::irq::MsiMessage;
use sluice_pci::testing::{RecordingRouter, RecordingSink};
use sluice_pci::{CAPABILITIES_POINTER, DEVICE_ID, MSIX_CAPABILITY_ID, VENDOR_ID};
use vm_memory::GuestMemoryMmap;

use super::common::offset::*;
use super::interrupt::{ISR_CONFIG, ISR_QUEUE};
use super::*;
use crate::device::{ActivateError, VirtioInterrupt};
use crate::metrics::DeviceMetrics;

const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const FEATURE_BIT_3: u64 = 1 << 3;
const OFFERED: u64 = FEATURE_VERSION_1 | FEATURE_EVENT_IDX | FEATURE_BIT_3;
const RAM_SIZE: usize = 0x10_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

/// What the fake device saw at one activation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ActivatedQueue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    policy: NotifyPolicy,
}

#[derive(Default)]
struct Record {
    activations: Vec<(u64, Vec<ActivatedQueue>)>,
    resets: u32,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    kicks: Vec<EventFd>,
    fail_activate: bool,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct FakeDevice {
    record: Arc<Mutex<Record>>,
    max_sizes: Vec<u16>,
    device_type: u32,
    features: u64,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.max_sizes.clone()
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = 0xa0u8.wrapping_add(offset as u8).wrapping_add(i as u8);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut record = self.record.lock().unwrap();
        record.config_writes.push((offset, data.to_vec()));
    }

    fn queue_count_range(&self) -> std::ops::RangeInclusive<usize> {
        1..=self.max_sizes.len()
    }

    fn queue_handler(
        &mut self,
        index: u16,
        _size: u16,
    ) -> Result<Box<dyn crate::QueueHandler>, ActivateError> {
        Err(ActivateError::NoSuchQueue(index))
    }

    /// The fake records what activation hands over instead of running the queues.
    fn external_queues(&mut self) -> Option<&mut dyn crate::ExternalQueues> {
        Some(self)
    }

    fn reset(&mut self) {
        let mut record = self.record.lock().unwrap();
        record.resets += 1;
        record.kicks.clear();
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        Arc::new(DeviceMetrics::new("fake", self.max_sizes.len()))
    }
}

impl crate::ExternalQueues for FakeDevice {
    fn start(
        &mut self,
        features: u64,
        _mem: DmaSpace,
        queues: Vec<QueueBinding>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let mut record = self.record.lock().unwrap();
        if record.fail_activate {
            return Err(ActivateError::Backend("no backend".into()));
        }
        let seen = queues
            .iter()
            .map(|b| (b, b.queue.as_split().expect("split ring")))
            .map(|(b, q)| ActivatedQueue {
                index: b.index,
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                event_idx: q.event_idx_enabled(),
                policy: b.policy,
            })
            .collect();
        record.activations.push((features, seen));
        record.kicks = queues.into_iter().map(|b| b.kick).collect();
        record.interrupt = Some(interrupt);
        Ok(())
    }

    fn stop(&mut self) {
        self.record.lock().unwrap().kicks.clear();
    }
}

/// Records registrations as (registered?, address, len); signals nothing.
#[derive(Default)]
struct FakeIoEvents {
    log: Mutex<Vec<(bool, u64, u32)>>,
}

impl IoEventRegistrar for FakeIoEvents {
    fn register(&self, _: &EventFd, addr: u64, len: u32, _: Option<u64>) -> io::Result<()> {
        self.log.lock().unwrap().push((true, addr, len));
        Ok(())
    }

    fn unregister(&self, _: &EventFd, addr: u64, len: u32, _: Option<u64>) -> io::Result<()> {
        self.log.lock().unwrap().push((false, addr, len));
        Ok(())
    }
}

struct Setup {
    dev: VirtioPciDevice,
    record: Arc<Mutex<Record>>,
    sink: Arc<RecordingSink>,
}

fn memory() -> DmaSpace {
    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
    sluice_dma::identity(ram)
}

fn fake(device_type: u32, max_sizes: &[u16]) -> (FakeDevice, Arc<Mutex<Record>>) {
    let record = Arc::new(Mutex::new(Record::default()));
    let device = FakeDevice {
        record: record.clone(),
        max_sizes: max_sizes.to_vec(),
        device_type,
        features: OFFERED,
    };
    (device, record)
}

fn setup_with(
    device_type: u32,
    max_sizes: &[u16],
    tweak: impl FnOnce(&mut VirtioPciOptions),
) -> Setup {
    let (device, record) = fake(device_type, max_sizes);
    let sink = Arc::new(RecordingSink::default());
    let mut options = VirtioPciOptions::new(sink.clone());
    tweak(&mut options);
    let dev = VirtioPciDevice::new(Box::new(device), memory(), options).unwrap();
    Setup { dev, record, sink }
}

fn setup() -> Setup {
    setup_with(DEVICE_TYPE_BLOCK, &[8, 16], |_| {})
}

fn read(dev: &mut VirtioPciDevice, offset: u64, width: usize) -> u64 {
    let mut data = [0u8; 8];
    dev.bar_read(VIRTIO_PCI_BAR, offset, &mut data[..width]);
    u64::from_le_bytes(data)
}

fn write(dev: &mut VirtioPciDevice, offset: u64, width: usize, value: u64) {
    dev.bar_write(VIRTIO_PCI_BAR, offset, &value.to_le_bytes()[..width]);
}

fn status(dev: &mut VirtioPciDevice) -> u8 {
    read(dev, DEVICE_STATUS, 1) as u8
}

fn set_status(dev: &mut VirtioPciDevice, value: u8) {
    write(dev, DEVICE_STATUS, 1, value.into());
}

fn accept(dev: &mut VirtioPciDevice, features: u64) {
    for window in 0..2u64 {
        write(dev, DRIVER_FEATURE_SELECT, 4, window);
        write(
            dev,
            DRIVER_FEATURE,
            4,
            (features >> (32 * window)) & 0xffff_ffff,
        );
    }
}

/// Reset, ACKNOWLEDGE, DRIVER, accept `features`, ask for FEATURES_OK; returns the status.
fn negotiate(dev: &mut VirtioPciDevice, features: u64) -> u8 {
    set_status(dev, 0);
    set_status(dev, ACKNOWLEDGE);
    set_status(dev, ACKNOWLEDGE | DRIVER);
    accept(dev, features);
    set_status(dev, ACKNOWLEDGE | DRIVER | STATUS_FEATURES_OK);
    status(dev)
}

fn offered(dev: &mut VirtioPciDevice) -> u64 {
    let mut features = 0;
    for window in 0..2u64 {
        write(dev, DEVICE_FEATURE_SELECT, 4, window);
        features |= read(dev, DEVICE_FEATURE, 4) << (32 * window);
    }
    features
}

fn setup_queue(dev: &mut VirtioPciDevice, index: u16, size: u16, base: u64) -> u64 {
    write(dev, QUEUE_SELECT, 2, index.into());
    write(dev, QUEUE_SIZE, 2, size.into());
    write(dev, QUEUE_DESC, 8, base + DESC);
    // Two-part writes, as Linux does.
    write(dev, QUEUE_DRIVER, 4, base + AVAIL);
    write(dev, QUEUE_DRIVER + 4, 4, 0);
    write(dev, QUEUE_DEVICE, 4, base + USED);
    write(dev, QUEUE_DEVICE + 4, 4, 0);
    write(dev, QUEUE_ENABLE, 2, 1);
    read(dev, QUEUE_ENABLE, 2)
}

fn driver_ok(dev: &mut VirtioPciDevice) {
    set_status(
        dev,
        ACKNOWLEDGE | DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
}

/// Capabilities as (offset, id) by walking the list from the header pointer.
fn capabilities(dev: &mut VirtioPciDevice) -> Vec<(usize, u8)> {
    let mut caps = Vec::new();
    let mut byte = [0u8; 1];
    dev.config_read(CAPABILITIES_POINTER, &mut byte);
    let mut at = usize::from(byte[0]);
    while at != 0 && caps.len() < 48 {
        let mut header = [0u8; 2];
        dev.config_read(at, &mut header);
        caps.push((at, header[0]));
        at = usize::from(header[1]);
    }
    caps
}

fn config_u32(dev: &mut VirtioPciDevice, offset: usize) -> u32 {
    let mut data = [0u8; 4];
    dev.config_read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn msix_cap(dev: &mut VirtioPciDevice) -> usize {
    capabilities(dev)
        .into_iter()
        .find(|&(_, id)| id == MSIX_CAPABILITY_ID)
        .map(|(at, _)| at)
        .unwrap()
}

fn enable_msix(dev: &mut VirtioPciDevice) {
    let cap = msix_cap(dev);
    dev.config_write(cap + 2, &0x8000u16.to_le_bytes());
}

fn program_vector(dev: &mut VirtioPciDevice, vector: u64, message: MsiMessage) {
    let entry = MSIX_TABLE_OFFSET + 16 * vector;
    write(dev, entry, 8, message.address);
    write(dev, entry + 8, 4, message.data.into());
    write(dev, entry + 12, 4, 0);
}

fn activated_interrupt(record: &Arc<Mutex<Record>>) -> Arc<dyn VirtioInterrupt> {
    record.lock().unwrap().interrupt.clone().unwrap()
}

/// Negotiates, sets up queue 0 (size 8), optionally queue 1, and sets DRIVER_OK.
fn activate(dev: &mut VirtioPciDevice, with_queue_1: bool) {
    negotiate(dev, FEATURE_VERSION_1 | FEATURE_EVENT_IDX);
    assert_eq!(setup_queue(dev, 0, 8, 0), 1);
    if with_queue_1 {
        assert_eq!(setup_queue(dev, 1, 16, 0x1_0000), 1);
    }
    driver_ok(dev);
}

#[test]
fn identity_follows_the_device_type() {
    let mut s = setup();
    let mut net = setup_with(DEVICE_TYPE_NET, &[8], |_| {});
    let mut rng = setup_with(DEVICE_TYPE_RNG, &[8], |_| {});

    assert_eq!(config_u32(&mut s.dev, VENDOR_ID), 0x1042_1af4);
    assert_eq!(
        config_u32(&mut s.dev, 0x08),
        0x0100_0001,
        "class + revision"
    );
    assert_eq!(config_u32(&mut s.dev, 0x2c), 0x0002_1af4, "subsystem");
    assert_eq!(config_u32(&mut net.dev, 0x08) >> 8, 0x02_0000);
    assert_eq!(config_u32(&mut rng.dev, 0x08) >> 8, 0xff_0000);
    assert_eq!(config_u32(&mut rng.dev, DEVICE_ID) & 0xffff, 0x1044);
    assert_eq!(
        config_u32(&mut s.dev, 0x10) & 0xf,
        0b0100,
        "64-bit memory BAR"
    );
}

#[test]
fn capability_list_reaches_every_structure() {
    let mut s = setup();

    let caps = capabilities(&mut s.dev);

    let mut seen = Vec::new();
    for &(at, id) in &caps {
        if id != PCI_CAP_ID_VENDOR {
            continue;
        }
        let mut cap = [0u8; 20];
        s.dev.config_read(at, &mut cap);
        let field = |i: usize| u32::from_le_bytes(cap[i..i + 4].try_into().unwrap());
        let (cfg_type, bar, offset, length) = (cap[3], cap[4], field(8), field(12));
        assert_eq!(bar, 0);
        assert!(u64::from(offset) + u64::from(length) <= VIRTIO_PCI_BAR_SIZE);
        seen.push((cfg_type, offset, cap[2]));
        if cfg_type == cfg_type::NOTIFY {
            assert_eq!(field(16), NOTIFY_OFF_MULTIPLIER);
            assert!(length >= 2 * NOTIFY_OFF_MULTIPLIER, "covers both queues");
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (cfg_type::COMMON, 0x0000, 16),
            (cfg_type::NOTIFY, 0x3000, 20),
            (cfg_type::ISR, 0x1000, 16),
            (cfg_type::DEVICE, 0x2000, 16),
            (cfg_type::PCI, 0, 20),
        ]
    );
    let msix = msix_cap(&mut s.dev);
    let mut control = [0u8; 2];
    s.dev.config_read(msix + 2, &mut control);
    assert_eq!(
        u16::from_le_bytes(control) & 0x7ff,
        2,
        "3 vectors: 2 queues + config"
    );
    assert_eq!(config_u32(&mut s.dev, msix + 4), 0x4000);
    assert_eq!(config_u32(&mut s.dev, msix + 8), 0x5000);
}

#[test]
fn features_negotiate_to_the_intersection() {
    let mut s = setup();
    assert_eq!(offered(&mut s.dev), OFFERED);

    let status = negotiate(&mut s.dev, FEATURE_VERSION_1 | FEATURE_BIT_3);
    assert_eq!(setup_queue(&mut s.dev, 0, 8, 0), 1);
    driver_ok(&mut s.dev);

    assert_ne!(status & STATUS_FEATURES_OK, 0);
    let record = s.record.lock().unwrap();
    assert_eq!(record.activations.len(), 1);
    assert_eq!(record.activations[0].0, FEATURE_VERSION_1 | FEATURE_BIT_3);
    assert!(!record.activations[0].1[0].event_idx);
}

/// Maps every IOVA to the same guest physical address, through the translated (IOMMU) path.
#[derive(Debug)]
struct IdentityIommu;

impl sluice_dma::TranslationSource for IdentityIommu {
    fn lookup(&self, iova: u64, _: vm_memory::Permissions) -> Option<sluice_dma::Mapping> {
        Some(sluice_dma::Mapping {
            iova: iova & !0xfff,
            target: iova & !0xfff,
            length: 0x1000,
            permissions: vm_memory::Permissions::ReadWrite,
        })
    }
}

#[test]
fn access_platform_is_offered_only_behind_an_iommu_for_in_process_queues() {
    let translated = || {
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
        sluice_dma::translated(ram, Box::new(IdentityIommu))
    };
    let options = || VirtioPciOptions::new(Arc::new(RecordingSink::default()));
    let echo = || {
        Box::new(EchoDevice {
            metrics: Arc::new(DeviceMetrics::new("echo", 1)),
        })
    };
    let mut behind_iommu = VirtioPciDevice::new(echo(), translated(), options()).unwrap();
    let mut identity = VirtioPciDevice::new(echo(), memory(), options()).unwrap();
    let (external, _) = fake(DEVICE_TYPE_BLOCK, &[8]);
    let mut external = VirtioPciDevice::new(Box::new(external), translated(), options()).unwrap();

    assert_ne!(offered(&mut behind_iommu) & FEATURE_ACCESS_PLATFORM, 0);
    assert_eq!(offered(&mut identity) & FEATURE_ACCESS_PLATFORM, 0);
    assert_eq!(
        offered(&mut external) & FEATURE_ACCESS_PLATFORM,
        0,
        "another process runs the rings on guest physical addresses"
    );
}

#[test]
fn features_ok_is_refused_for_unoffered_features() {
    let mut s = setup();

    let after_features_ok = negotiate(&mut s.dev, FEATURE_VERSION_1 | (1 << 40));
    driver_ok(&mut s.dev);

    assert_eq!(after_features_ok & STATUS_FEATURES_OK, 0);
    assert_eq!(after_features_ok, ACKNOWLEDGE | DRIVER);
    assert_eq!(status(&mut s.dev) & STATUS_DRIVER_OK, 0);
    assert!(s.record.lock().unwrap().activations.is_empty());
}

#[test]
fn features_ok_is_refused_without_version_1() {
    let mut s = setup();

    let status = negotiate(&mut s.dev, FEATURE_EVENT_IDX);

    assert_eq!(status & STATUS_FEATURES_OK, 0);
}

#[test]
fn driver_features_freeze_after_features_ok() {
    let mut s = setup();
    negotiate(&mut s.dev, FEATURE_VERSION_1);

    accept(&mut s.dev, FEATURE_VERSION_1 | FEATURE_EVENT_IDX);

    assert_eq!(s.dev.negotiated_features(), FEATURE_VERSION_1);
}

#[test]
fn queue_enable_refuses_bad_sizes() {
    let mut s = setup();
    negotiate(&mut s.dev, FEATURE_VERSION_1);

    let not_power_of_two = setup_queue(&mut s.dev, 0, 6, 0);
    let too_big = setup_queue(&mut s.dev, 0, 16, 0);
    let zero = setup_queue(&mut s.dev, 0, 0, 0);
    let good = setup_queue(&mut s.dev, 0, 4, 0);

    assert_eq!((not_power_of_two, too_big, zero, good), (0, 0, 0, 1));
    write(&mut s.dev, QUEUE_SIZE, 2, 2);
    assert_eq!(read(&mut s.dev, QUEUE_SIZE, 2), 4, "frozen once enabled");
}

#[test]
fn queue_registers_read_back_and_absent_queues_read_zero() {
    let mut s = setup();
    write(&mut s.dev, QUEUE_SELECT, 2, 1);

    let max = read(&mut s.dev, QUEUE_SIZE, 2);
    let notify_off = read(&mut s.dev, QUEUE_NOTIFY_OFF, 2);
    write(&mut s.dev, QUEUE_DESC, 8, 0x1234_5678_9abc_def0);
    let high = read(&mut s.dev, QUEUE_DESC + 4, 4);
    write(&mut s.dev, QUEUE_SELECT, 2, 7);
    let absent = read(&mut s.dev, QUEUE_SIZE, 2);
    write(&mut s.dev, QUEUE_SIZE, 2, 4);

    assert_eq!(max, 16);
    assert_eq!(notify_off, 1);
    assert_eq!(high, 0x1234_5678);
    assert_eq!(absent, 0);
    assert_eq!(read(&mut s.dev, NUM_QUEUES, 2), 2);
}

#[test]
fn wrong_widths_are_ignored() {
    let mut s = setup();
    negotiate(&mut s.dev, FEATURE_VERSION_1);

    write(&mut s.dev, DEVICE_FEATURE_SELECT, 2, 1);
    write(&mut s.dev, DEVICE_STATUS, 2, 0);
    write(&mut s.dev, QUEUE_SELECT + 1, 1, 1);

    assert_eq!(read(&mut s.dev, DEVICE_FEATURE_SELECT, 4), 0);
    assert_ne!(
        status(&mut s.dev),
        0,
        "a 2-byte status write is not a reset"
    );
    assert_eq!(read(&mut s.dev, DEVICE_STATUS, 4), 0, "4-byte status read");
    assert_eq!(read(&mut s.dev, QUEUE_SELECT, 2), 0);
    assert_eq!(read(&mut s.dev, 0x0ffe, 4), 0, "crosses the region end");
    assert_eq!(s.record.lock().unwrap().resets, 1, "only negotiate's reset");
}

#[test]
fn driver_ok_activates_the_enabled_queues() {
    let mut s = setup_with(DEVICE_TYPE_BLOCK, &[8, 16, 8], |o| {
        o.queue_policies = vec![
            NotifyPolicy::Interrupt,
            NotifyPolicy::Poll {
                budget: std::time::Duration::from_micros(50),
            },
        ];
    });
    negotiate(&mut s.dev, FEATURE_VERSION_1 | FEATURE_EVENT_IDX);
    setup_queue(&mut s.dev, 1, 16, 0x1_0000);
    setup_queue(&mut s.dev, 2, 4, 0x2_0000);

    driver_ok(&mut s.dev);

    let record = s.record.lock().unwrap();
    let (features, queues) = &record.activations[0];
    assert_eq!(*features, FEATURE_VERSION_1 | FEATURE_EVENT_IDX);
    let expected = |index: u16, size, base, policy| ActivatedQueue {
        index,
        size,
        desc: base + DESC,
        avail: base + AVAIL,
        used: base + USED,
        event_idx: true,
        policy,
    };
    let poll = NotifyPolicy::Poll {
        budget: std::time::Duration::from_micros(50),
    };
    assert_eq!(
        queues,
        &vec![
            expected(1, 16, 0x1_0000, poll),
            expected(2, 4, 0x2_0000, NotifyPolicy::Interrupt),
        ]
    );
    assert!(s.dev.is_active());
    drop(record);
    assert_ne!(status(&mut s.dev) & STATUS_DRIVER_OK, 0);
}

#[test]
fn driver_ok_without_features_ok_does_not_activate() {
    let mut s = setup();
    set_status(&mut s.dev, ACKNOWLEDGE | DRIVER);

    set_status(&mut s.dev, ACKNOWLEDGE | DRIVER | STATUS_DRIVER_OK);

    assert_eq!(status(&mut s.dev), ACKNOWLEDGE | DRIVER);
    assert!(s.record.lock().unwrap().activations.is_empty());
}

#[test]
fn rings_outside_memory_need_reset_instead_of_activating() {
    let mut s = setup();
    enable_msix(&mut s.dev);
    let config_message = MsiMessage {
        address: 0xfee0_0000,
        data: 0x55,
    };
    program_vector(&mut s.dev, 2, config_message);
    write(&mut s.dev, CONFIG_MSIX_VECTOR, 2, 2);
    negotiate(&mut s.dev, FEATURE_VERSION_1);
    write(&mut s.dev, CONFIG_MSIX_VECTOR, 2, 2);
    setup_queue(&mut s.dev, 0, 8, RAM_SIZE as u64);

    driver_ok(&mut s.dev);

    assert!(s.record.lock().unwrap().activations.is_empty());
    assert_ne!(status(&mut s.dev) & STATUS_NEEDS_RESET, 0);
    assert_eq!(s.sink.sent(), vec![config_message]);
    assert_eq!(
        read(&mut s.dev, ISR_CFG_OFFSET, 1),
        2,
        "config change cause"
    );
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), 0, "read clears");
}

#[test]
fn activation_failure_needs_reset() {
    let mut s = setup();
    s.record.lock().unwrap().fail_activate = true;

    activate(&mut s.dev, false);

    assert_ne!(status(&mut s.dev) & STATUS_NEEDS_RESET, 0);
    assert!(!s.dev.is_active());
}

#[test]
fn reset_returns_everything_to_defaults() {
    let mut s = setup();
    enable_msix(&mut s.dev);
    activate(&mut s.dev, true);
    write(&mut s.dev, QUEUE_SELECT, 2, 0);
    write(&mut s.dev, QUEUE_MSIX_VECTOR, 2, 0);
    write(&mut s.dev, CONFIG_MSIX_VECTOR, 2, 1);

    set_status(&mut s.dev, 0);

    assert_eq!(s.record.lock().unwrap().resets, 2, "negotiate's + this one");
    assert_eq!(status(&mut s.dev), 0);
    assert!(!s.dev.is_active());
    assert_eq!(read(&mut s.dev, QUEUE_ENABLE, 2), 0);
    assert_eq!(read(&mut s.dev, QUEUE_SIZE, 2), 8);
    assert_eq!(read(&mut s.dev, QUEUE_DESC, 8), 0);
    assert_eq!(read(&mut s.dev, QUEUE_MSIX_VECTOR, 2), 0xffff);
    assert_eq!(read(&mut s.dev, CONFIG_MSIX_VECTOR, 2), 0xffff);
    assert_eq!(s.dev.negotiated_features(), 0);
}

#[test]
fn msix_vector_out_of_range_reads_back_no_vector() {
    let mut s = setup();
    write(&mut s.dev, QUEUE_SELECT, 2, 1);

    write(&mut s.dev, QUEUE_MSIX_VECTOR, 2, 2);
    let last = read(&mut s.dev, QUEUE_MSIX_VECTOR, 2);
    write(&mut s.dev, QUEUE_MSIX_VECTOR, 2, 3);
    let beyond = read(&mut s.dev, QUEUE_MSIX_VECTOR, 2);
    write(&mut s.dev, CONFIG_MSIX_VECTOR, 2, 0x7ff);

    assert_eq!(last, 2);
    assert_eq!(beyond, u64::from(VIRTIO_MSI_NO_VECTOR));
    assert_eq!(read(&mut s.dev, CONFIG_MSIX_VECTOR, 2), 0xffff);
}

#[test]
fn notify_write_signals_the_queue_eventfd() {
    let mut s = setup();

    write(&mut s.dev, NOTIFY_OFFSET + 4, 2, 1);
    write(&mut s.dev, NOTIFY_OFFSET + 2, 2, 0);
    write(&mut s.dev, NOTIFY_OFFSET + 4 * 9, 2, 9);

    assert_eq!(s.dev.kick_event(1).unwrap().read().unwrap(), 1);
    assert!(s.dev.kick_event(0).unwrap().read().is_err(), "no kick on 0");
}

#[test]
fn kicks_before_driver_ok_reach_the_activated_queue() {
    let mut s = setup();
    negotiate(&mut s.dev, FEATURE_VERSION_1);
    setup_queue(&mut s.dev, 0, 8, 0);
    write(&mut s.dev, NOTIFY_OFFSET, 2, 0);

    driver_ok(&mut s.dev);
    write(&mut s.dev, NOTIFY_OFFSET, 2, 0);

    let record = s.record.lock().unwrap();
    assert_eq!(record.kicks[0].read().unwrap(), 2);
}

#[test]
fn ioeventfds_follow_the_bar() {
    let registrar = Arc::new(FakeIoEvents::default());
    let ioevents: Arc<dyn IoEventRegistrar> = registrar.clone();
    let mut s = setup_with(DEVICE_TYPE_BLOCK, &[8, 16], |o| o.ioevents = Some(ioevents));

    s.dev.bar_moved(0, None, Some(0xe000_0000));
    s.dev.bar_moved(0, Some(0xe000_0000), Some(0xd000_0000));
    s.dev.bar_moved(0, Some(0xd000_0000), None);

    let log = registrar.log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            (true, 0xe000_3000, 2),
            (true, 0xe000_3004, 2),
            (false, 0xe000_3000, 2),
            (false, 0xe000_3004, 2),
            (true, 0xd000_3000, 2),
            (true, 0xd000_3004, 2),
            (false, 0xd000_3000, 2),
            (false, 0xd000_3004, 2),
        ]
    );
}

#[test]
fn dropping_the_transport_removes_its_ioeventfds() {
    let registrar = Arc::new(FakeIoEvents::default());
    let ioevents: Arc<dyn IoEventRegistrar> = registrar.clone();
    let mut s = setup_with(DEVICE_TYPE_RNG, &[8], |o| o.ioevents = Some(ioevents));
    s.dev.bar_moved(0, None, Some(0xe000_0000));

    drop(s.dev);

    let log = registrar.log.lock().unwrap().clone();
    assert_eq!(log.last(), Some(&(false, 0xe000_3000, 2)));
}

#[test]
fn queue_interrupt_sends_the_programmed_msix_message() {
    let mut s = setup();
    enable_msix(&mut s.dev);
    let message = MsiMessage {
        address: 0xfee0_1000,
        data: 0x41,
    };
    program_vector(&mut s.dev, 1, message);
    negotiate(&mut s.dev, FEATURE_VERSION_1);
    setup_queue(&mut s.dev, 0, 8, 0);
    write(&mut s.dev, QUEUE_MSIX_VECTOR, 2, 1);
    driver_ok(&mut s.dev);
    let interrupt = activated_interrupt(&s.record);

    interrupt.notify_queue(0).unwrap();

    assert_eq!(s.sink.sent(), vec![message]);
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), 0, "MSI-X, not ISR");
}

#[test]
fn masked_vector_is_held_pending_and_delivered_on_unmask() {
    let mut s = setup();
    enable_msix(&mut s.dev);
    let message = MsiMessage {
        address: 0xfee0_2000,
        data: 0x42,
    };
    program_vector(&mut s.dev, 0, message);
    write(&mut s.dev, MSIX_TABLE_OFFSET + 12, 4, 1);
    activate(&mut s.dev, false);
    write(&mut s.dev, QUEUE_SELECT, 2, 0);
    write(&mut s.dev, QUEUE_MSIX_VECTOR, 2, 0);

    activated_interrupt(&s.record).notify_queue(0).unwrap();
    let while_masked = s.sink.sent();
    let pba = read(&mut s.dev, MSIX_PBA_OFFSET, 8);
    write(&mut s.dev, MSIX_TABLE_OFFSET + 12, 4, 0);

    assert!(while_masked.is_empty());
    assert_eq!(pba, 1);
    assert_eq!(s.sink.sent(), vec![message]);
}

#[test]
fn queue_interrupt_without_a_vector_sets_isr() {
    let mut s = setup();
    activate(&mut s.dev, false);

    activated_interrupt(&s.record).notify_queue(0).unwrap();

    assert!(s.sink.sent().is_empty());
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), 1);
}

#[test]
fn routes_carry_interrupts_once_programmed() {
    let router = Arc::new(RecordingRouter::default());
    let msi_router: Arc<dyn MsiRouter> = router.clone();
    let mut s = setup_with(DEVICE_TYPE_BLOCK, &[8, 16], |o| {
        o.msi_router = Some(msi_router)
    });
    let message = MsiMessage {
        address: 0xfee0_3000,
        data: 0x43,
    };
    enable_msix(&mut s.dev);
    program_vector(&mut s.dev, 1, message);
    activate(&mut s.dev, false);
    write(&mut s.dev, QUEUE_SELECT, 2, 0);
    write(&mut s.dev, QUEUE_MSIX_VECTOR, 2, 1);

    activated_interrupt(&s.record).notify_queue(0).unwrap();

    assert_eq!(router.allocated(), 3);
    assert_eq!(
        router.route(1).update_list(),
        vec![message],
        "pointed at the programmed message, no redundant updates"
    );
    assert_eq!(router.route(1).trigger_count(), 1);
    assert!(s.sink.sent().is_empty(), "the route, not KVM_SIGNAL_MSI");
    assert_eq!(router.route(0).trigger_count(), 0);
}

#[test]
fn worker_needs_reset_sets_status_and_signals_config() {
    let mut s = setup();
    enable_msix(&mut s.dev);
    let config_message = MsiMessage {
        address: 0xfee0_0000,
        data: 0x60,
    };
    program_vector(&mut s.dev, 2, config_message);
    activate(&mut s.dev, false);
    write(&mut s.dev, CONFIG_MSIX_VECTOR, 2, 2);
    let interrupt = activated_interrupt(&s.record);

    interrupt.needs_reset();
    interrupt.needs_reset();

    assert_ne!(status(&mut s.dev) & STATUS_NEEDS_RESET, 0);
    assert_eq!(s.sink.sent(), vec![config_message], "signalled once");
}

#[test]
fn interrupts_from_a_previous_activation_are_dropped() {
    let mut s = setup();
    activate(&mut s.dev, false);
    let stale = activated_interrupt(&s.record);
    set_status(&mut s.dev, 0);

    stale.needs_reset();
    stale.notify_queue(0).unwrap();
    stale.notify_config().unwrap();

    assert_eq!(status(&mut s.dev), 0);
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), 0);
    assert_eq!(read(&mut s.dev, CONFIG_GENERATION, 1), 0);
}

#[test]
fn config_change_bumps_generation() {
    let mut s = setup();
    activate(&mut s.dev, false);

    activated_interrupt(&s.record).notify_config().unwrap();

    assert_eq!(read(&mut s.dev, CONFIG_GENERATION, 1), 1);
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), 2);
}

#[test]
fn device_config_is_forwarded() {
    let mut s = setup();

    let value = read(&mut s.dev, DEVICE_CFG_OFFSET + 4, 2);
    write(&mut s.dev, DEVICE_CFG_OFFSET + 8, 4, 0xdead_beef);

    assert_eq!(value, 0xa5a4);
    let writes = s.record.lock().unwrap().config_writes.clone();
    assert_eq!(writes, vec![(8, 0xdead_beefu32.to_le_bytes().to_vec())]);
}

#[test]
fn pci_cfg_capability_reaches_the_bar() {
    let mut s = setup();
    let cap = capabilities(&mut s.dev)
        .into_iter()
        .find(|&(at, id)| {
            let mut t = [0u8; 1];
            s.dev.config_read(at + 3, &mut t);
            id == PCI_CAP_ID_VENDOR && t[0] == cfg_type::PCI
        })
        .map(|(at, _)| at)
        .unwrap();
    let mut data = [0u8; 4];

    s.dev
        .config_write(cap + 8, &(NUM_QUEUES as u32).to_le_bytes());
    s.dev.config_write(cap + 12, &2u32.to_le_bytes());
    s.dev.config_read(cap + 16, &mut data);
    let num_queues = u16::from_le_bytes([data[0], data[1]]);
    s.dev
        .config_write(cap + 8, &(QUEUE_SELECT as u32).to_le_bytes());
    s.dev.config_write(cap + 16, &1u32.to_le_bytes());
    s.dev.config_write(cap + 4, &[3]);
    s.dev.config_write(cap + 16, &0u32.to_le_bytes());

    assert_eq!(num_queues, 2);
    assert_eq!(read(&mut s.dev, QUEUE_SELECT, 2), 1, "bar 3 write ignored");
}

#[test]
fn bad_device_descriptions_are_refused() {
    let cases: [(&[u16], u64); 4] = [
        (&[], OFFERED),
        (&[6], OFFERED),
        (&[8], FEATURE_EVENT_IDX),
        (&[0], OFFERED),
    ];
    for (sizes, features) in cases {
        let (mut device, _) = fake(DEVICE_TYPE_BLOCK, sizes);
        device.features = features;
        let options = VirtioPciOptions::new(Arc::new(RecordingSink::default()));

        let result = VirtioPciDevice::new(Box::new(device), memory(), options);

        assert!(result.is_err(), "{sizes:?} {features:#x}");
    }
}

/// xorshift64: deterministic pseudo-random bytes for the register-write loop.
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
fn random_register_scripts_never_panic() {
    let mut rng = XorShift(0x5eed_cafe_f00d_d00d);
    let activations = Arc::new(AtomicU64::new(0));
    for round in 0..1500 {
        let mut dev = if round % 2 == 0 {
            fuzz::null_transport().unwrap()
        } else {
            setup().dev
        };
        let len = (rng.next() % 512) as usize;
        let script: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();

        fuzz::run_register_script(&mut dev, &script);
        if dev.is_active() {
            activations.fetch_add(1, Ordering::Relaxed);
        }

        set_status(&mut dev, 0);
        assert_eq!(status(&mut dev), 0);
        assert_eq!(read(&mut dev, NUM_QUEUES, 2), 2);
    }
}

#[test]
fn a_scripted_driver_activates_the_null_device() {
    let mut dev = fuzz::null_transport().unwrap();
    // op 0x68: focused common-cfg write of 2 bytes; 0x60: 1 byte; 0x70: 4 bytes; 0x78: 8 bytes.
    let mut script = Vec::new();
    let mut op = |op: u8, offset: u64, value: &[u8]| {
        script.push(op);
        script.extend_from_slice(&(offset as u16).to_le_bytes());
        script.extend_from_slice(value);
    };
    op(0x60, DEVICE_STATUS, &[3]);
    op(0x70, DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
    op(0x70, DRIVER_FEATURE, &1u32.to_le_bytes());
    op(0x60, DEVICE_STATUS, &[3 | STATUS_FEATURES_OK]);
    op(0x68, QUEUE_SIZE, &8u16.to_le_bytes());
    op(0x78, QUEUE_DESC, &0x1000u64.to_le_bytes());
    op(0x78, QUEUE_DRIVER, &0x2000u64.to_le_bytes());
    op(0x78, QUEUE_DEVICE, &0x3000u64.to_le_bytes());
    op(0x68, QUEUE_ENABLE, &1u16.to_le_bytes());
    op(
        0x60,
        DEVICE_STATUS,
        &[3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
    );

    fuzz::run_register_script(&mut dev, &script);

    assert!(dev.is_active());
    assert_eq!(dev.negotiated_features(), FEATURE_VERSION_1);
}

/// A device whose queues the framework serves with real [`crate::worker::QueueWorker`]s running
/// the worker tests' echo handler.
struct EchoDevice {
    metrics: Arc<DeviceMetrics>,
}

impl VirtioDevice for EchoDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![8]
    }

    fn device_features(&self) -> u64 {
        FEATURE_VERSION_1 | FEATURE_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn queue_handler(
        &mut self,
        _index: u16,
        _size: u16,
    ) -> Result<Box<dyn crate::QueueHandler>, ActivateError> {
        Ok(Box::new(crate::worker::tests::EchoHandler))
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}

#[test]
fn a_kick_through_the_bar_comes_back_as_an_msix_message() {
    use virtio_queue::mock::MockSplitQueue;

    let mem = memory();
    let sink = Arc::new(RecordingSink::default());
    let metrics = Arc::new(DeviceMetrics::new("echo", 1));
    let device = EchoDevice {
        metrics: metrics.clone(),
    };
    let options = VirtioPciOptions::new(sink.clone());
    let mut dev = VirtioPciDevice::new(Box::new(device), mem.clone(), options).unwrap();
    let mut driver = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 8);
    let message = MsiMessage {
        address: 0xfee0_0000,
        data: 0x31,
    };
    enable_msix(&mut dev);
    program_vector(&mut dev, 0, message);
    negotiate(&mut dev, FEATURE_VERSION_1);
    write(&mut dev, QUEUE_SELECT, 2, 0);
    write(&mut dev, QUEUE_SIZE, 2, 8);
    write(&mut dev, QUEUE_DESC, 8, driver.desc_table_addr().0);
    write(&mut dev, QUEUE_DRIVER, 8, driver.avail_addr().0);
    write(&mut dev, QUEUE_DEVICE, 8, driver.used_addr().0);
    write(&mut dev, QUEUE_MSIX_VECTOR, 2, 0);
    write(&mut dev, QUEUE_ENABLE, 2, 1);
    driver_ok(&mut dev);

    driver.add_chain(2).unwrap();
    write(&mut dev, NOTIFY_OFFSET, 2, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sink.sent().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    set_status(&mut dev, 0);

    assert_eq!(driver.used().idx().load(), 1);
    assert_eq!(driver.used().ring().ref_at(0).unwrap().load().len(), 0x2000);
    assert_eq!(sink.sent(), vec![message]);
    assert_eq!(metrics.queues[0].kicks.load(Ordering::SeqCst), 1);
    assert_eq!(metrics.queues[0].interrupts.load(Ordering::SeqCst), 1);
}

/// Records the levels the transport's INTx pin drives.
#[derive(Default)]
struct RecordingLevelLine {
    levels: Mutex<Vec<bool>>,
}

impl sluice_bus::irq::LevelIrqLine for RecordingLevelLine {
    fn set_level(&self, asserted: bool) -> io::Result<()> {
        self.levels.lock().unwrap().push(asserted);
        Ok(())
    }
}

impl RecordingLevelLine {
    fn levels(&self) -> Vec<bool> {
        self.levels.lock().unwrap().clone()
    }
}

/// `dev`'s INTA connected to a recording line (what the PCI root does with a router).
fn connect_intx(dev: &VirtioPciDevice) -> Arc<RecordingLevelLine> {
    let line = Arc::new(RecordingLevelLine::default());
    dev.intx().unwrap().connect(line.clone()).unwrap();
    line
}

fn interrupt_status_bit(dev: &mut VirtioPciDevice) -> bool {
    let mut status = [0u8; 2];
    dev.config_read(sluice_pci::STATUS, &mut status);
    u16::from_le_bytes(status) & sluice_pci::STATUS_INTERRUPT != 0
}

#[test]
fn the_function_declares_inta() {
    let mut s = setup();
    let mut pin = [0u8; 1];

    s.dev.config_read(sluice_pci::INTERRUPT_PIN, &mut pin);

    assert_eq!(pin[0], 1);
}

#[test]
fn without_msix_a_queue_interrupt_asserts_inta_until_the_isr_read() {
    let mut s = setup();
    let line = connect_intx(&s.dev);
    activate(&mut s.dev, false);

    activated_interrupt(&s.record).notify_queue(0).unwrap();
    activated_interrupt(&s.record).notify_queue(0).unwrap();

    assert_eq!(line.levels(), vec![true], "level: one assertion");
    assert!(interrupt_status_bit(&mut s.dev));
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), u64::from(ISR_QUEUE));
    assert_eq!(line.levels(), vec![true, false], "the ISR read deasserts");
    assert!(!interrupt_status_bit(&mut s.dev));
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), 0);
    assert!(s.sink.sent().is_empty());
}

#[test]
fn config_change_without_msix_asserts_inta_with_the_config_bit() {
    let mut s = setup();
    let line = connect_intx(&s.dev);
    activate(&mut s.dev, false);

    activated_interrupt(&s.record).notify_config().unwrap();

    assert_eq!(line.levels(), vec![true]);
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), u64::from(ISR_CONFIG));
    assert_eq!(line.levels(), vec![true, false]);
}

#[test]
fn with_msix_enabled_intx_stays_low_even_without_a_vector() {
    let mut s = setup();
    let line = connect_intx(&s.dev);
    enable_msix(&mut s.dev);
    activate(&mut s.dev, false);

    activated_interrupt(&s.record).notify_queue(0).unwrap();

    assert!(line.levels().is_empty(), "MSI-X on: INTx must not assert");
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), u64::from(ISR_QUEUE));
}

#[test]
fn interrupt_disable_and_reset_deassert_inta() {
    let mut s = setup();
    let line = connect_intx(&s.dev);
    activate(&mut s.dev, false);
    activated_interrupt(&s.record).notify_queue(0).unwrap();

    let mut command = [0u8; 2];
    s.dev.config_read(sluice_pci::COMMAND, &mut command);
    let disabled = u16::from_le_bytes(command) | sluice_pci::COMMAND_INTX_DISABLE;
    s.dev
        .config_write(sluice_pci::COMMAND, &disabled.to_le_bytes());
    assert_eq!(line.levels(), vec![true, false]);
    s.dev.config_write(
        sluice_pci::COMMAND,
        &(disabled & !sluice_pci::COMMAND_INTX_DISABLE).to_le_bytes(),
    );
    assert_eq!(
        line.levels(),
        vec![true, false, true],
        "cause still pending"
    );

    set_status(&mut s.dev, 0);

    assert_eq!(line.levels(), vec![true, false, true, false]);
    assert_eq!(read(&mut s.dev, ISR_CFG_OFFSET, 1), 0);
}

// Packed rings through the transport.

/// A device whose queues run on sluice's workers and echo every chain's length.
struct PackedEchoDevice;

impl VirtioDevice for PackedEchoDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16]
    }
    fn device_features(&self) -> u64 {
        FEATURE_VERSION_1 | FEATURE_EVENT_IDX
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn metrics(&self) -> Arc<DeviceMetrics> {
        Arc::new(DeviceMetrics::new("echo", 1))
    }
    fn queue_handler(
        &mut self,
        _index: u16,
        _size: u16,
    ) -> Result<Box<dyn crate::QueueHandler>, ActivateError> {
        Ok(Box::new(crate::worker::tests::EchoHandler))
    }
}

fn echo_device(mem: &DmaSpace, packed_ring: bool) -> VirtioPciDevice {
    let mut options = VirtioPciOptions::new(Arc::new(RecordingSink::default()));
    options.packed_ring = packed_ring;
    VirtioPciDevice::new(Box::new(PackedEchoDevice), mem.clone(), options).unwrap()
}

#[test]
fn packed_ring_is_offered_only_when_asked_and_never_for_external_queues() {
    let mem = memory();
    let mut split_only = echo_device(&mem, false);
    let mut packed = echo_device(&mem, true);
    let mut external = setup_with(DEVICE_TYPE_BLOCK, &[8], |o| o.packed_ring = true);

    assert_eq!(offered(&mut split_only) & FEATURE_RING_PACKED, 0);
    assert_ne!(offered(&mut packed) & FEATURE_RING_PACKED, 0);
    assert_eq!(offered(&mut external.dev) & FEATURE_RING_PACKED, 0);
}

#[test]
fn negotiated_packed_ring_runs_at_the_queue_addresses_with_any_size() {
    let mem = memory();
    let mut dev = echo_device(&mem, true);
    negotiate(
        &mut dev,
        FEATURE_VERSION_1 | FEATURE_EVENT_IDX | FEATURE_RING_PACKED,
    );
    // Size 6 is not a power of two: fine for a packed ring. desc = ring, driver / device =
    // the event suppression areas.
    let mut driver = crate::ring::mock::PackedDriver::new(&mem, DESC, 6);
    write(&mut dev, QUEUE_SELECT, 2, 0);
    write(&mut dev, QUEUE_SIZE, 2, 6);
    write(&mut dev, QUEUE_DESC, 8, DESC);
    write(&mut dev, QUEUE_DRIVER, 8, DESC + 6 * 16);
    write(&mut dev, QUEUE_DEVICE, 8, DESC + 6 * 16 + 4);
    write(&mut dev, QUEUE_ENABLE, 2, 1);
    let enabled = read(&mut dev, QUEUE_ENABLE, 2);
    driver_ok(&mut dev);

    driver.add_chain(4, &[(0x8_0000, 100, true)]);
    dev.kick_event(0).unwrap().write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut used = None;
    while used.is_none() && std::time::Instant::now() < deadline {
        used = driver.used();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }

    assert_eq!(enabled, 1);
    assert!(dev.is_active());
    assert_eq!(used, Some((4, 100)));
    assert_eq!(status(&mut dev) & STATUS_NEEDS_RESET, 0);
}

#[test]
fn split_ring_still_needs_a_power_of_two_size() {
    let mem = memory();
    let mut dev = echo_device(&mem, true);
    negotiate(&mut dev, FEATURE_VERSION_1);

    assert_eq!(setup_queue(&mut dev, 0, 6, 0), 0);
}

#[test]
fn packed_ring_outside_memory_needs_reset() {
    let mem = memory();
    let mut dev = echo_device(&mem, true);
    negotiate(&mut dev, FEATURE_VERSION_1 | FEATURE_RING_PACKED);
    write(&mut dev, QUEUE_SELECT, 2, 0);
    write(&mut dev, QUEUE_DESC, 8, RAM_SIZE as u64 - 16);
    write(&mut dev, QUEUE_DRIVER, 8, DESC);
    write(&mut dev, QUEUE_DEVICE, 8, DESC + 4);
    write(&mut dev, QUEUE_ENABLE, 2, 1);
    driver_ok(&mut dev);

    assert!(!dev.is_active());
    assert_ne!(status(&mut dev) & STATUS_NEEDS_RESET, 0);
}
