//! The virtio-iommu device model: its [`VirtioDevice`] face (features, config space, the request
//! and event queues) and its [`DomainProvider`] face (each requester's translation, asked by
//! its `DmaSpace` on an IOTLB miss). Requests that change translations drop the affected
//! requesters' IOTLB entries before they complete.
//!
//! Locking: one mutex over the state. A translation takes it to look the mapping up; a request
//! takes it, changes the domains and then takes the spaces' IOTLB locks to invalidate. A
//! `DmaSpace` never holds its IOTLB lock while it asks for a translation, so the two orders
//! cannot deadlock (as for the VT-d).

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use sluice_dma::{DmaSpace, DmaSpaces, DomainProvider, Mapping, RequesterId, TranslationSource};
use sluice_virtio::{
    ActivateError, Chain, DeviceMetrics, QueueContext, QueueError, QueueHandler, VirtioDevice,
};
use vm_memory::Permissions;

use super::domains::{Domains, Invalidation, Limits, Lookup, PAGE_SIZE};
use super::request::{
    parse, resv_mem_property, Request, Status, MAX_REQUEST_LEN, RESV_MEM_T_MSI, TAIL_LEN,
};

/// Virtio device type of the IOMMU (virtio 1.2 §5.13).
pub const DEVICE_TYPE_IOMMU: u32 = 23;

/// Feature bits (virtio 1.2 §5.13.3).
pub const F_INPUT_RANGE: u32 = 0;
pub const F_DOMAIN_RANGE: u32 = 1;
pub const F_MAP_UNMAP: u32 = 2;
pub const F_PROBE: u32 = 4;
pub const F_BYPASS_CONFIG: u32 = 6;
const F_VERSION_1: u32 = 32;
const F_RING_EVENT_IDX: u32 = 29;

const FEATURES: u64 = (1 << F_INPUT_RANGE)
    | (1 << F_DOMAIN_RANGE)
    | (1 << F_MAP_UNMAP)
    | (1 << F_PROBE)
    | (1 << F_BYPASS_CONFIG)
    | (1 << F_VERSION_1)
    | (1 << F_RING_EVENT_IDX);

/// Size of each of the two queues (requests, events).
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of properties the driver leaves room for in a PROBE request.
pub const PROBE_SIZE: u32 = 512;
/// The x86 MSI doorbell window, reported to PROBE as a RESV_MEM MSI region: the driver must
/// not map IOVAs there, since interrupt messages are not translated.
pub const MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);

/// Config space layout (virtio_iommu_config).
const CONFIG_LEN: usize = 40;
const CONFIG_BYPASS: usize = 36;

/// Named counters in the device's metrics (`--metrics`).
pub const COUNTER_NAMES: &[&str] = &[
    "attach",
    "detach",
    "map",
    "unmap",
    "probe",
    "bad_requests",
    "translations",
    "faults",
    "invalidations",
];
const BAD_REQUESTS: usize = 5;
const TRANSLATIONS: usize = 6;
const FAULTS: usize = 7;
const INVALIDATIONS: usize = 8;

#[derive(Debug)]
struct State {
    domains: Domains,
    /// The config space's `bypass`: unattached endpoints reach guest memory untranslated.
    bypass: bool,
    /// Features the driver accepted at the last activation.
    features: u64,
}

struct Shared {
    state: Mutex<State>,
    /// `bypass` after a reset (boot bypass).
    boot_bypass: bool,
    spaces: Mutex<Weak<DmaSpaces>>,
    metrics: Arc<DeviceMetrics>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A virtio-iommu. Clones share the device (one goes behind virtio-pci, one is the spaces'
/// domain provider).
#[derive(Clone)]
pub struct VirtioIommu {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommu").finish_non_exhaustive()
    }
}

impl VirtioIommu {
    /// A device with `limits`; with `boot_bypass`, endpoints not attached to a domain reach
    /// guest memory untranslated until the driver clears `bypass` (else their DMA faults).
    pub fn new(limits: Limits, boot_bypass: bool) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    domains: Domains::new(limits),
                    bypass: boot_bypass,
                    features: 0,
                }),
                boot_bypass,
                spaces: Mutex::new(Weak::new()),
                metrics: Arc::new(DeviceMetrics::with_counters(
                    "virtio-iommu",
                    2,
                    COUNTER_NAMES,
                )),
            }),
        }
    }

    /// The DMA spaces whose IOTLBs requests invalidate (those this device is the provider of).
    pub fn attach_spaces(&self, spaces: &Arc<DmaSpaces>) {
        *self
            .shared
            .spaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(spaces);
    }

    /// The endpoints behind the IOMMU (their PCI requester ids); others are NOENT.
    pub fn set_endpoints(&self, endpoints: impl IntoIterator<Item = RequesterId>) {
        self.shared
            .lock()
            .domains
            .set_endpoints(endpoints.into_iter().map(u32::from));
    }

    /// The domain `endpoint` is attached to.
    pub fn domain_of(&self, endpoint: u32) -> Option<u32> {
        self.shared.lock().domains.domain_of(endpoint)
    }

    /// Mappings currently held in all domains.
    pub fn mapping_count(&self) -> usize {
        self.shared.lock().domains.mapping_count()
    }

    /// Carries out one request given as its device-readable bytes, with `property_room` bytes of
    /// device-writable space before the tail; returns the status and, for a PROBE that
    /// succeeded, the property buffer to write there.
    pub fn handle_request(&self, bytes: &[u8], property_room: usize) -> (Status, Option<Vec<u8>>) {
        let metrics = &self.shared.metrics;
        let request = match parse(bytes) {
            Ok(request) => request,
            Err(status) => {
                metrics.count(BAD_REQUESTS, 1);
                return (status, None);
            }
        };
        metrics.count_named(request.kind(), 1);
        let mut state = self.shared.lock();
        let negotiated = |bit: u32| state.features & (1 << bit) != 0;
        let status = match request {
            Request::Map { .. } | Request::Unmap { .. } if !negotiated(F_MAP_UNMAP) => {
                Err(Status::Unsupp)
            }
            Request::Probe { .. } if !negotiated(F_PROBE) => Err(Status::Unsupp),
            Request::Probe { .. } if property_room < PROBE_SIZE as usize => Err(Status::Inval),
            _ => {
                let bypass_allowed = negotiated(F_BYPASS_CONFIG);
                state.domains.execute(&request, bypass_allowed)
            }
        };
        match status {
            Ok(stale) => {
                self.invalidate(&stale);
                let properties = matches!(request, Request::Probe { .. }).then(probe_properties);
                (Status::Ok, properties)
            }
            Err(status) => {
                tracing::debug!("virtio-iommu: {request:?}: {status:?}");
                (status, None)
            }
        }
    }

    /// Drops the stale translations from the endpoints' IOTLBs.
    fn invalidate(&self, stale: &[Invalidation]) {
        let Some(spaces) = self
            .shared
            .spaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade()
        else {
            return;
        };
        for invalidation in stale {
            let (endpoint, range) = match *invalidation {
                Invalidation::Endpoint(endpoint) => (endpoint, None),
                Invalidation::Range {
                    endpoint,
                    start,
                    length,
                } => (endpoint, Some((start, length))),
            };
            let Some(translator) = RequesterId::try_from(endpoint)
                .ok()
                .and_then(|r| spaces.translator(r))
            else {
                continue;
            };
            self.shared.metrics.count(INVALIDATIONS, 1);
            match range {
                Some((start, length)) => translator.invalidate(start, length),
                None => translator.invalidate_all(),
            }
        }
    }

    /// Drops every requester's cached translations (bypass changed, reset).
    fn invalidate_all(&self) {
        let Some(spaces) = self
            .shared
            .spaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade()
        else {
            return;
        };
        for requester in spaces.requesters() {
            if let Some(translator) = spaces.translator(requester) {
                translator.invalidate_all();
            }
        }
    }

    /// The mapping covering `iova` for `requester`, or `None` (a fault, counted).
    fn translate(&self, requester: RequesterId, iova: u64, access: Permissions) -> Option<Mapping> {
        let metrics = &self.shared.metrics;
        metrics.count(TRANSLATIONS, 1);
        let state = self.shared.lock();
        let identity_length = state.domains.limits().input_end + 1;
        let lookup = state
            .domains
            .lookup(u32::from(requester), iova, access, state.bypass);
        let mapping = match lookup {
            Lookup::Mapped {
                iova,
                target,
                length,
                permissions,
            } => Some(Mapping {
                iova,
                target,
                length,
                permissions,
            }),
            Lookup::Identity if iova < identity_length => Some(Mapping {
                iova: 0,
                target: 0,
                length: identity_length,
                permissions: Permissions::ReadWrite,
            }),
            Lookup::Identity | Lookup::Fault => None,
        };
        if mapping.is_none() {
            tracing::debug!("virtio-iommu: fault for {requester:#06x} at {iova:#x} ({access:?})");
            metrics.count(FAULTS, 1);
        }
        mapping
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let state = self.shared.lock();
        let limits = state.domains.limits();
        let mut config = [0u8; CONFIG_LEN];
        // Every power of two from the 4 KiB granule up.
        config[0..8].copy_from_slice(&(!(PAGE_SIZE - 1)).to_le_bytes());
        config[8..16].copy_from_slice(&0u64.to_le_bytes());
        config[16..24].copy_from_slice(&limits.input_end.to_le_bytes());
        config[24..28].copy_from_slice(&limits.domain_start.to_le_bytes());
        config[28..32].copy_from_slice(&limits.domain_end.to_le_bytes());
        config[32..36].copy_from_slice(&PROBE_SIZE.to_le_bytes());
        config[CONFIG_BYPASS] = u8::from(state.bypass);
        config
    }
}

/// The PROBE answer for every endpoint: the MSI window, then zeros (a NONE property ends the
/// list).
fn probe_properties() -> Vec<u8> {
    let mut properties = vec![0u8; PROBE_SIZE as usize];
    let msi = resv_mem_property(RESV_MEM_T_MSI, MSI_WINDOW.0, MSI_WINDOW.1);
    properties[..msi.len()].copy_from_slice(&msi);
    properties
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_IOMMU
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        FEATURES
    }

    /// The request queue, and the event queue if the driver enables it (no event is ever
    /// sent, so a driver that leaves it off loses nothing).
    fn queue_count_range(&self) -> std::ops::RangeInclusive<usize> {
        1..=2
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| config.get(at)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `bypass` is writable (with F_BYPASS_CONFIG); other fields ignore writes.
        if offset != CONFIG_BYPASS as u64 || data.len() != 1 {
            return;
        }
        let bypass = data[0] & 1 != 0;
        let changed = {
            let mut state = self.shared.lock();
            let changed = state.bypass != bypass;
            state.bypass = bypass;
            changed
        };
        if changed {
            // Unattached endpoints' cached identity translations (or their absence) are stale.
            self.invalidate_all();
        }
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.shared.metrics.clone()
    }

    fn ack_features(&mut self, features: u64) -> Result<(), ActivateError> {
        self.shared.lock().features = features;
        Ok(())
    }

    fn queue_handler(
        &mut self,
        index: u16,
        _size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError> {
        match index {
            0 => Ok(Box::new(RequestQueue {
                iommu: self.clone(),
            })),
            // Faults are not reported through the event queue: its buffers stay with the device.
            1 => Ok(Box::new(EventQueue)),
            _ => Err(ActivateError::NoSuchQueue(index)),
        }
    }

    fn reset(&mut self) {
        let stale = {
            let mut state = self.shared.lock();
            state.bypass = self.shared.boot_bypass;
            state.features = 0;
            state.domains.clear()
        };
        self.invalidate(&stale);
        self.invalidate_all();
    }
}

/// Serves the request queue: each chain is one request.
struct RequestQueue {
    iommu: VirtioIommu,
}

impl RequestQueue {
    /// Serves one chain; returns the bytes written and whether the status was OK, or `None`
    /// when the chain has no room for a tail (nothing can be reported).
    fn serve(&self, mem: &DmaSpace, chain: &Chain<'_>) -> Option<(u32, bool)> {
        let mut reader = chain.reader(mem).ok()?;
        let mut writer = chain.writer(mem).ok()?;
        let writable = writer.available_bytes();
        let property_room = writable.checked_sub(TAIL_LEN)?;
        let mut request = [0u8; MAX_REQUEST_LEN];
        let read = read_up_to(&mut reader, &mut request);
        let (status, properties) = self.iommu.handle_request(&request[..read], property_room);
        // The tail is the last 4 device-writable bytes; PROBE's properties come first.
        let mut tail = writer.split_at(property_room).ok()?;
        if let Some(properties) = properties {
            writer.write_all(&properties).ok()?;
        }
        tail.write_all(&[status as u8, 0, 0, 0]).ok()?;
        Some((u32::try_from(writable).ok()?, status == Status::Ok))
    }
}

/// Reads until `buffer` is full or the readable bytes end.
fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    filled
}

impl QueueHandler for RequestQueue {
    fn process(&mut self, ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = ctx.queue.pop(ctx.mem)? {
            let popped = Instant::now();
            let head = chain.head_index();
            let served = self.serve(ctx.mem, &chain);
            let written = served.map_or(0, |(n, _)| n);
            ctx.queue.add_used(ctx.mem, head, written)?;
            let outcome = match served {
                Some((n, true)) => Ok(u64::from(n)),
                _ => Err(()),
            };
            ctx.metrics.record_request(popped, outcome);
            used = true;
        }
        Ok(used)
    }
}

/// The event queue: the device reports no faults through it, so it never takes a buffer.
struct EventQueue;

impl QueueHandler for EventQueue {
    fn process(&mut self, _ctx: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        Ok(false)
    }
}

impl crate::requester::TranslatingUnit for VirtioIommu {
    const KIND: &'static str = "virtio-iommu";

    fn translate_for(
        &self,
        requester: RequesterId,
        iova: u64,
        access: Permissions,
    ) -> Option<Mapping> {
        self.translate(requester, iova, access)
    }
}

impl DomainProvider for VirtioIommu {
    fn domain(&self, requester: RequesterId) -> Option<Box<dyn TranslationSource>> {
        crate::requester::requester_view(self, requester)
    }
}
