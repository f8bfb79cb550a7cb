//! Tests: the parser, the domain logic, DMA through the VM's spaces with the device as their
//! provider, and the request queue handler over a mock split ring.

use std::sync::Arc;

use sluice_dma::DmaSpaces;
use sluice_virtio::{QueueContext, QueueMetrics, VirtQueue, VirtioDevice};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

use super::device::{F_BYPASS_CONFIG, F_MAP_UNMAP, F_PROBE, MSI_WINDOW, PROBE_SIZE};
use super::domains::{Domains, Invalidation, Limits, Lookup};
use super::request::{encode, parse, Request, Status, MAP_F_READ, MAP_F_WRITE};
use super::VirtioIommu;

const RW: u32 = MAP_F_READ | MAP_F_WRITE;
const BLK: u32 = 0x10;
const NVME: u32 = 0x18;

fn domains() -> Domains {
    let mut d = Domains::new(Limits::default());
    d.set_endpoints([BLK, NVME]);
    d
}

fn run(d: &mut Domains, bytes: Vec<u8>) -> Result<Vec<Invalidation>, Status> {
    d.execute(&parse(&bytes)?, false)
}

// ---- the parser ----------------------------------------------------------------------------

#[test]
fn every_request_round_trips_through_the_parser() {
    assert_eq!(
        parse(&encode::attach(3, BLK, 0)),
        Ok(Request::Attach {
            domain: 3,
            endpoint: BLK,
            flags: 0
        })
    );
    assert_eq!(
        parse(&encode::map(3, 0x1000, 0x1fff, 0x8000, RW)),
        Ok(Request::Map {
            domain: 3,
            virt_start: 0x1000,
            virt_end: 0x1fff,
            phys_start: 0x8000,
            flags: RW
        })
    );
    assert_eq!(
        parse(&encode::unmap(3, 0, u64::MAX)),
        Ok(Request::Unmap {
            domain: 3,
            virt_start: 0,
            virt_end: u64::MAX
        })
    );
    assert_eq!(
        parse(&encode::detach(3, BLK)),
        Ok(Request::Detach {
            domain: 3,
            endpoint: BLK
        })
    );
    assert_eq!(
        parse(&encode::probe(NVME)),
        Ok(Request::Probe { endpoint: NVME })
    );
}

#[test]
fn short_unknown_and_reserved_requests_are_refused_with_their_status() {
    let map = encode::map(3, 0x1000, 0x1fff, 0x8000, RW);
    let mut attach = encode::attach(3, BLK, 0);
    attach[19] = 1;

    assert_eq!(parse(&[]), Err(Status::Inval));
    assert_eq!(parse(&[3, 0]), Err(Status::Inval));
    assert_eq!(parse(&map[..map.len() - 1]), Err(Status::Inval));
    assert_eq!(parse(&[9, 0, 0, 0]), Err(Status::Unsupp));
    assert_eq!(parse(&attach), Err(Status::Inval), "reserved byte set");
}

// ---- domains -------------------------------------------------------------------------------

#[test]
fn a_mapping_translates_inside_its_range_with_its_permissions_and_faults_outside() {
    let mut d = domains();
    run(&mut d, encode::attach(1, BLK, 0)).unwrap();
    run(
        &mut d,
        encode::map(1, 0x10_0000, 0x10_3fff, 0x5000, MAP_F_READ),
    )
    .unwrap();

    let inside = d.lookup(BLK, 0x10_2345, Permissions::Read, false);
    let write = d.lookup(BLK, 0x10_2345, Permissions::Write, false);
    let outside = d.lookup(BLK, 0x10_4000, Permissions::Read, false);
    let other = d.lookup(NVME, 0x10_2345, Permissions::Read, false);

    assert_eq!(
        inside,
        Lookup::Mapped {
            iova: 0x10_0000,
            target: 0x5000,
            length: 0x4000,
            permissions: Permissions::Read
        }
    );
    assert_eq!(write, Lookup::Fault, "read-only mapping");
    assert_eq!(outside, Lookup::Fault);
    assert_eq!(other, Lookup::Fault, "unattached endpoint");
    assert_eq!(
        d.lookup(NVME, 0x10_2345, Permissions::Read, true),
        Lookup::Identity,
        "bypass on"
    );
}

#[test]
fn bad_maps_get_the_spec_status_and_change_nothing() {
    let mut d = domains();
    run(&mut d, encode::attach(1, BLK, 0)).unwrap();
    run(&mut d, encode::map(1, 0x2000, 0x5fff, 0x2000, RW)).unwrap();

    let cases = [
        (
            encode::map(1, 0x4000, 0x7fff, 0, RW),
            Status::Inval,
            "overlap",
        ),
        (encode::map(1, 0x0, 0x2fff, 0, RW), Status::Inval, "overlap"),
        (
            encode::map(1, 0x8001, 0x8fff, 0, RW),
            Status::Range,
            "unaligned",
        ),
        (encode::map(1, 0x8000, 0x8ffe, 0, RW), Status::Range, "end"),
        (
            encode::map(1, 0x8000, 0x8fff, 0x10, RW),
            Status::Range,
            "phys",
        ),
        (
            encode::map(1, 0x9000, 0x8fff, 0, RW),
            Status::Inval,
            "reversed",
        ),
        (
            encode::map(1, 1 << 48, (1 << 48) + 0xfff, 0, RW),
            Status::Range,
            "input",
        ),
        (
            encode::map(1, 0, u64::MAX, 0, RW),
            Status::Range,
            "whole space",
        ),
        (
            encode::map(1, 0x8000, 0x9fff, !0xfff, RW),
            Status::Range,
            "phys wraps",
        ),
        (
            encode::map(1, 0x8000, 0x8fff, 0, 4),
            Status::Inval,
            "MMIO flag",
        ),
        (
            encode::map(2, 0x8000, 0x8fff, 0, RW),
            Status::NoEnt,
            "no domain",
        ),
    ];
    for (request, status, why) in cases {
        assert_eq!(run(&mut d, request), Err(status), "{why}");
    }
    assert_eq!(d.mapping_count(), 1);
}

#[test]
fn an_unmap_that_would_split_a_mapping_is_range_and_removes_nothing() {
    let mut d = domains();
    run(&mut d, encode::attach(1, BLK, 0)).unwrap();
    run(&mut d, encode::map(1, 0x1000, 0x1fff, 0x1000, RW)).unwrap();
    run(&mut d, encode::map(1, 0x4000, 0x7fff, 0x4000, RW)).unwrap();

    assert_eq!(
        run(&mut d, encode::unmap(1, 0x0, 0x4fff)),
        Err(Status::Range)
    );
    assert_eq!(
        run(&mut d, encode::unmap(1, 0x5000, 0x8fff)),
        Err(Status::Range)
    );
    assert_eq!(d.mapping_count(), 2);

    let stale = run(&mut d, encode::unmap(1, 0x0, 0x7fff)).unwrap();

    assert_eq!(d.mapping_count(), 0);
    assert_eq!(
        stale,
        vec![Invalidation::Range {
            endpoint: BLK,
            start: 0x1000,
            length: 0x7000
        }]
    );
    assert_eq!(run(&mut d, encode::unmap(1, 0, u64::MAX)), Ok(vec![]));
}

#[test]
fn unknown_endpoints_and_domains_and_bad_attaches_are_refused() {
    let mut d = domains();

    assert_eq!(run(&mut d, encode::attach(1, 0x99, 0)), Err(Status::NoEnt));
    assert_eq!(
        run(&mut d, encode::attach(0x1_0000, BLK, 0)),
        Err(Status::Range)
    );
    assert_eq!(
        run(&mut d, encode::attach(1, BLK, 1)),
        Err(Status::Inval),
        "bypass"
    );
    assert_eq!(run(&mut d, encode::attach(1, BLK, 2)), Err(Status::Inval));
    assert_eq!(run(&mut d, encode::detach(1, BLK)), Err(Status::NoEnt));
    assert_eq!(run(&mut d, encode::unmap(1, 0, 0xfff)), Err(Status::NoEnt));
    assert_eq!(run(&mut d, encode::probe(0x99)), Err(Status::NoEnt));
    assert_eq!(d.domain_count(), 0);
}

#[test]
fn detaching_the_last_endpoint_destroys_the_domain_and_its_mappings() {
    let mut d = domains();
    run(&mut d, encode::attach(1, BLK, 0)).unwrap();
    run(&mut d, encode::attach(1, NVME, 0)).unwrap();
    run(&mut d, encode::map(1, 0x1000, 0x1fff, 0x1000, RW)).unwrap();

    assert_eq!(run(&mut d, encode::detach(2, BLK)), Err(Status::NoEnt));
    run(&mut d, encode::attach(2, NVME, 0)).unwrap();
    assert_eq!(
        run(&mut d, encode::detach(1, NVME)),
        Err(Status::Inval),
        "moved"
    );
    assert_eq!(
        run(&mut d, encode::detach(1, BLK)),
        Ok(vec![Invalidation::Endpoint(BLK)])
    );

    assert_eq!(d.domain_count(), 1, "domain 2 holds NVME");
    assert_eq!(d.mapping_count(), 0);
    assert_eq!(
        d.lookup(BLK, 0x1000, Permissions::Read, false),
        Lookup::Fault
    );
}

#[test]
fn the_caps_on_domains_and_mappings_answer_nomem() {
    let mut d = Domains::new(Limits {
        max_domains: 1,
        max_mappings: 2,
        ..Limits::default()
    });
    d.set_endpoints([BLK, NVME]);
    run(&mut d, encode::attach(1, BLK, 0)).unwrap();

    assert_eq!(run(&mut d, encode::attach(2, NVME, 0)), Err(Status::NoMem));
    run(&mut d, encode::map(1, 0x1000, 0x1fff, 0, RW)).unwrap();
    run(&mut d, encode::map(1, 0x2000, 0x2fff, 0, RW)).unwrap();
    assert_eq!(
        run(&mut d, encode::map(1, 0x3000, 0x3fff, 0, RW)),
        Err(Status::NoMem)
    );
    run(&mut d, encode::unmap(1, 0x1000, 0x1fff)).unwrap();
    assert_eq!(
        run(&mut d, encode::map(1, 0x3000, 0x3fff, 0, RW)),
        Ok(vec![])
    );
}

#[test]
fn a_bypass_domain_is_identity_and_takes_no_mappings() {
    let mut d = domains();
    let attach = parse(&encode::attach(7, BLK, 1)).unwrap();
    d.execute(&attach, true).unwrap();

    assert_eq!(
        d.lookup(BLK, 0x1234, Permissions::Write, false),
        Lookup::Identity
    );
    assert_eq!(
        d.execute(&parse(&encode::map(7, 0, 0xfff, 0, RW)).unwrap(), true),
        Err(Status::Inval)
    );
    let mapped_attach = parse(&encode::attach(7, NVME, 0)).unwrap();
    assert_eq!(d.execute(&mapped_attach, true), Err(Status::Inval), "mode");
}

// ---- DMA through the VM's spaces -------------------------------------------------------------

fn ram() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

const ALL_FEATURES: u64 = (1 << F_MAP_UNMAP) | (1 << F_PROBE) | (1 << F_BYPASS_CONFIG);

fn iommu_with_spaces(mem: &GuestMemoryMmap) -> (VirtioIommu, Arc<DmaSpaces>) {
    let mut iommu = VirtioIommu::new(Limits::default(), false);
    let spaces = Arc::new(DmaSpaces::with_iommu(mem.clone(), Arc::new(iommu.clone())));
    iommu.attach_spaces(&spaces);
    iommu.set_endpoints([BLK as u16, NVME as u16]);
    iommu.ack_features(ALL_FEATURES).unwrap();
    (iommu, spaces)
}

fn ok(iommu: &VirtioIommu, bytes: Vec<u8>) {
    assert_eq!(iommu.handle_request(&bytes, 0).0, Status::Ok);
}

#[test]
fn a_detached_endpoint_faults_and_a_mapped_one_reaches_its_pages() {
    let mem = ram();
    mem.write_obj(0x1234_5678_u32, GuestAddress(0x20_0010))
        .unwrap();
    let (iommu, spaces) = iommu_with_spaces(&mem);
    let blk = spaces.space(BLK as u16);

    let before = blk.read_obj::<u32>(GuestAddress(0x20_0010));
    ok(&iommu, encode::attach(1, BLK, 0));
    ok(
        &iommu,
        encode::map(1, 0x8000_0000, 0x8000_ffff, 0x20_0000, RW),
    );
    let through = blk.read_obj::<u32>(GuestAddress(0x8000_0010)).unwrap();
    blk.write_obj(0xabcd_u32, GuestAddress(0x8000_0020))
        .unwrap();

    assert!(before.is_err(), "unattached endpoint");
    assert_eq!(spaces.translator(BLK as u16).unwrap().faults().len(), 1);
    assert_eq!(through, 0x1234_5678);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x20_0020)).unwrap(),
        0xabcd
    );
    assert_eq!(iommu.metrics().counter("faults"), Some(1));
    assert_eq!(iommu.metrics().counter("map"), Some(1));
}

#[test]
fn unmap_and_detach_drop_the_endpoints_cached_translations() {
    let mem = ram();
    let (iommu, spaces) = iommu_with_spaces(&mem);
    let blk = spaces.space(BLK as u16);
    ok(&iommu, encode::attach(1, BLK, 0));
    ok(&iommu, encode::map(1, 0x1_0000, 0x1_0fff, 0x30_0000, RW));
    blk.write_obj(1u32, GuestAddress(0x1_0000)).unwrap();

    ok(&iommu, encode::unmap(1, 0x1_0000, 0x1_0fff));
    let after_unmap = blk.write_obj(2u32, GuestAddress(0x1_0000));
    ok(
        &iommu,
        encode::map(1, 0x1_0000, 0x1_0fff, 0x30_0000, MAP_F_READ),
    );
    let read = blk.read_obj::<u32>(GuestAddress(0x1_0000)).unwrap();
    ok(&iommu, encode::detach(1, BLK));
    let after_detach = blk.read_obj::<u32>(GuestAddress(0x1_0000));

    assert!(
        after_unmap.is_err(),
        "the cached translation survived UNMAP"
    );
    assert_eq!(read, 1);
    assert!(
        after_detach.is_err(),
        "the cached translation survived DETACH"
    );
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x30_0000)).unwrap(), 1);
}

#[test]
fn the_bypass_config_field_lets_unattached_endpoints_through() {
    let mem = ram();
    mem.write_obj(0x55_u32, GuestAddress(0x1000)).unwrap();
    let (mut iommu, spaces) = iommu_with_spaces(&mem);
    let nvme = spaces.space(NVME as u16);
    assert!(nvme.read_obj::<u32>(GuestAddress(0x1000)).is_err());

    iommu.write_config(36, &[1]);
    let mut bypass = [0u8];
    iommu.read_config(36, &mut bypass);

    assert_eq!(bypass, [1]);
    assert_eq!(nvme.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x55);
    iommu.write_config(36, &[0]);
    assert!(
        nvme.read_obj::<u32>(GuestAddress(0x1000)).is_err(),
        "bypass off again"
    );
}

#[test]
fn config_space_states_the_granule_ranges_and_probe_size() {
    let iommu = VirtioIommu::new(Limits::default(), false);
    let mut config = [0u8; 40];

    iommu.read_config(0, &mut config);

    let le64 = |at: usize| u64::from_le_bytes(config[at..at + 8].try_into().unwrap());
    let le32 = |at: usize| u32::from_le_bytes(config[at..at + 4].try_into().unwrap());
    assert_eq!(le64(0), 0xffff_ffff_ffff_f000);
    assert_eq!((le64(8), le64(16)), (0, (1 << 48) - 1));
    assert_eq!((le32(24), le32(28)), (0, 0xffff));
    assert_eq!(le32(32), PROBE_SIZE);
    assert_eq!(config[36], 0, "no boot bypass");
    assert_eq!(iommu.device_type(), 23);
}

#[test]
fn map_and_probe_need_their_features_negotiated() {
    let mem = ram();
    let (mut iommu, _spaces) = iommu_with_spaces(&mem);
    iommu.ack_features(0).unwrap();
    ok(&iommu, encode::attach(1, BLK, 0));

    let map = iommu.handle_request(&encode::map(1, 0, 0xfff, 0, RW), 0);
    let probe = iommu.handle_request(&encode::probe(BLK), PROBE_SIZE as usize);

    assert_eq!(map.0, Status::Unsupp);
    assert_eq!(probe.0, Status::Unsupp);
}

// ---- the request queue -------------------------------------------------------------------------

const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn add_chain(vq: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, buffers: &[(u64, u32, bool)]) {
    let descriptors: Vec<RawDescriptor> = buffers
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let mut flags = if writable { WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= NEXT;
            }
            RawDescriptor::from(Descriptor::new(addr, len, flags, first + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&descriptors, first).unwrap();
}

fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, slot: u16) -> (u32, u32) {
    let elem = vq.used().ring().ref_at(slot.into()).unwrap().load();
    (elem.id(), elem.len())
}

fn process(iommu: &mut VirtioIommu, queue: &mut VirtQueue, mem: &GuestMemoryMmap) -> QueueMetrics {
    let dma = sluice_dma::identity(mem.clone());
    let metrics = QueueMetrics::default();
    let mut handler = iommu.queue_handler(0, 16).unwrap();
    let mut ctx = QueueContext {
        queue,
        mem: &dma,
        metrics: &metrics,
    };
    handler.process(&mut ctx).unwrap();
    metrics
}

#[test]
fn the_request_queue_answers_attach_map_and_probe_and_refuses_bad_chains() {
    let mem = ram();
    let (mut iommu, _spaces) = iommu_with_spaces(&mem);
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue = VirtQueue::from(vq.create_queue::<Queue>().unwrap());
    let requests = [
        encode::attach(1, BLK, 0),
        encode::map(1, 0x1000, 0x1fff, 0x2000, RW),
        encode::probe(BLK),
        encode::map(1, 0x1000, 0x1fff, 0x2000, RW),
    ];
    for (i, request) in requests.iter().enumerate() {
        let at = 0x10_0000 + i as u64 * 0x1000;
        mem.write_slice(request, GuestAddress(at)).unwrap();
    }
    add_chain(&vq, 0, &[(0x10_0000, 20, false), (0x18_0000, 4, true)]);
    add_chain(&vq, 2, &[(0x10_1000, 36, false), (0x18_1000, 4, true)]);
    add_chain(
        &vq,
        4,
        &[(0x10_2000, 72, false), (0x18_2000, PROBE_SIZE + 4, true)],
    );
    add_chain(&vq, 6, &[(0x10_3000, 36, false), (0x18_3000, 4, true)]);
    add_chain(&vq, 8, &[(0x10_3000, 36, false), (0x18_4000, 3, true)]);

    let metrics = process(&mut iommu, &mut queue, &mem);

    let status = |at: u64| mem.read_obj::<u8>(GuestAddress(at)).unwrap();
    assert_eq!(vq.used().idx().load(), 5);
    assert_eq!(used(&vq, 0), (0, 4));
    assert_eq!(status(0x18_0000), Status::Ok as u8);
    assert_eq!(status(0x18_1000), Status::Ok as u8);
    assert_eq!(status(0x18_2000 + u64::from(PROBE_SIZE)), Status::Ok as u8);
    let mut property = [0u8; 24];
    mem.read_slice(&mut property, GuestAddress(0x18_2000))
        .unwrap();
    assert_eq!(&property[..6], &[1, 0, 20, 0, 1, 0], "RESV_MEM, MSI");
    assert_eq!(
        u64::from_le_bytes(property[8..16].try_into().unwrap()),
        MSI_WINDOW.0
    );
    assert_eq!(
        u64::from_le_bytes(property[16..24].try_into().unwrap()),
        MSI_WINDOW.1
    );
    assert_eq!(status(0x18_3000), Status::Inval as u8, "overlapping map");
    assert_eq!(used(&vq, 4), (8, 0), "no room for a tail");
    assert_eq!(iommu.mapping_count(), 1);
    assert_eq!(metrics.errors.load(std::sync::atomic::Ordering::Relaxed), 2);
}
