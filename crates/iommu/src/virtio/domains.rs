//! The virtio-iommu's translation state: domains, each with its endpoints and its mapping tree
//! (an interval map keyed by IOVA start; mappings never overlap), and which domain each
//! endpoint is attached to. Pure logic, no DMA: requests return the cached translations they
//! make stale ([`Invalidation`]) and the device drops them from the endpoints' IOTLBs.
//!
//! Bounded: at most [`Limits::max_domains`] domains and [`Limits::max_mappings`] mappings per
//! VM (NOMEM past them), and only endpoints named at wiring exist (NOENT otherwise).

use std::collections::{BTreeMap, BTreeSet};

use vm_memory::Permissions;

use super::request::{Request, Status, ATTACH_F_BYPASS, MAP_F_READ, MAP_F_WRITE};

/// The translation granule (the lowest bit of `page_size_mask`).
pub const PAGE_SIZE: u64 = 4096;

/// What the device advertises and enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Highest IOVA (inclusive) a mapping may use (`input_range.end`; start is 0).
    pub input_end: u64,
    /// Domain ids (inclusive) the driver may use (`domain_range`).
    pub domain_start: u32,
    pub domain_end: u32,
    pub max_domains: usize,
    pub max_mappings: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            input_end: (1 << 48) - 1,
            domain_start: 0,
            domain_end: 0xffff,
            max_domains: 512,
            max_mappings: 1 << 16,
        }
    }
}

/// Cached translations a request made stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Everything `endpoint` has cached.
    Endpoint(u32),
    /// `endpoint`'s cached translations in `start..start + length`.
    Range {
        endpoint: u32,
        start: u64,
        length: u64,
    },
}

/// One mapping: `start..=end` → `phys..`, with the MAP flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    end: u64,
    phys: u64,
    flags: u32,
}

#[derive(Debug, Default)]
struct Domain {
    bypass: bool,
    endpoints: BTreeSet<u32>,
    mappings: BTreeMap<u64, Entry>,
}

/// How an endpoint's DMA at one IOVA is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The mapping covering the IOVA: `iova..iova + length` → `target..`.
    Mapped {
        iova: u64,
        target: u64,
        length: u64,
        permissions: Permissions,
    },
    /// Untranslated (a bypass domain, or an unattached endpoint while bypass is on).
    Identity,
    /// No translation: the access faults.
    Fault,
}

/// Domains, mappings and attachments of one virtio-iommu.
#[derive(Debug, Default)]
pub struct Domains {
    limits: Limits,
    endpoints: BTreeSet<u32>,
    domains: BTreeMap<u32, Domain>,
    attached: BTreeMap<u32, u32>,
    mappings: usize,
}

impl Domains {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The endpoints (PCI requester ids) behind the IOMMU; requests naming others are NOENT.
    pub fn set_endpoints(&mut self, endpoints: impl IntoIterator<Item = u32>) {
        self.endpoints = endpoints.into_iter().collect();
    }

    pub fn has_endpoint(&self, endpoint: u32) -> bool {
        self.endpoints.contains(&endpoint)
    }

    /// Mappings in all domains.
    pub fn mapping_count(&self) -> usize {
        self.mappings
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// The domain `endpoint` is attached to.
    pub fn domain_of(&self, endpoint: u32) -> Option<u32> {
        self.attached.get(&endpoint).copied()
    }

    /// Detaches everything and destroys every domain (device reset); returns what to drop.
    pub fn clear(&mut self) -> Vec<Invalidation> {
        let stale = self
            .attached
            .keys()
            .map(|&e| Invalidation::Endpoint(e))
            .collect();
        self.domains.clear();
        self.attached.clear();
        self.mappings = 0;
        stale
    }

    /// Carries out ATTACH, DETACH, MAP or UNMAP (PROBE changes nothing: the device answers
    /// it). `bypass_allowed`: VIRTIO_IOMMU_F_BYPASS_CONFIG was negotiated.
    pub fn execute(
        &mut self,
        request: &Request,
        bypass_allowed: bool,
    ) -> Result<Vec<Invalidation>, Status> {
        match *request {
            Request::Attach {
                domain,
                endpoint,
                flags,
            } => self.attach(domain, endpoint, flags, bypass_allowed),
            Request::Detach { domain, endpoint } => self.detach(domain, endpoint),
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => self
                .map(domain, virt_start, virt_end, phys_start, flags)
                .map(|()| Vec::new()),
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => self.unmap(domain, virt_start, virt_end),
            Request::Probe { endpoint } => {
                if self.has_endpoint(endpoint) {
                    Ok(Vec::new())
                } else {
                    Err(Status::NoEnt)
                }
            }
        }
    }

    fn attach(
        &mut self,
        domain: u32,
        endpoint: u32,
        flags: u32,
        bypass_allowed: bool,
    ) -> Result<Vec<Invalidation>, Status> {
        let known_flags = if bypass_allowed { ATTACH_F_BYPASS } else { 0 };
        if flags & !known_flags != 0 {
            return Err(Status::Inval);
        }
        if !self.has_endpoint(endpoint) {
            return Err(Status::NoEnt);
        }
        if !(self.limits.domain_start..=self.limits.domain_end).contains(&domain) {
            return Err(Status::Range);
        }
        let bypass = flags & ATTACH_F_BYPASS != 0;
        match self.domains.get(&domain) {
            Some(existing) if existing.bypass != bypass => return Err(Status::Inval),
            Some(_) => {}
            None if self.domains.len() >= self.limits.max_domains => return Err(Status::NoMem),
            None => {}
        }
        if self.attached.get(&endpoint) == Some(&domain) {
            return Ok(Vec::new());
        }
        if let Some(old) = self.attached.remove(&endpoint) {
            self.leave(old, endpoint);
        }
        let target = self.domains.entry(domain).or_insert_with(|| Domain {
            bypass,
            ..Domain::default()
        });
        target.endpoints.insert(endpoint);
        self.attached.insert(endpoint, domain);
        Ok(vec![Invalidation::Endpoint(endpoint)])
    }

    fn detach(&mut self, domain: u32, endpoint: u32) -> Result<Vec<Invalidation>, Status> {
        if !self.has_endpoint(endpoint) || !self.domains.contains_key(&domain) {
            return Err(Status::NoEnt);
        }
        if self.attached.get(&endpoint) != Some(&domain) {
            return Err(Status::Inval);
        }
        self.attached.remove(&endpoint);
        self.leave(domain, endpoint);
        Ok(vec![Invalidation::Endpoint(endpoint)])
    }

    /// Removes `endpoint` from `domain`; a domain left without endpoints is destroyed with its
    /// mappings (as QEMU does), so detached domains hold no memory.
    fn leave(&mut self, domain: u32, endpoint: u32) {
        let Some(d) = self.domains.get_mut(&domain) else {
            return;
        };
        d.endpoints.remove(&endpoint);
        if d.endpoints.is_empty() {
            let mappings = d.mappings.len();
            self.domains.remove(&domain);
            self.mappings -= mappings;
        }
    }

    fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Result<(), Status> {
        if flags & !(MAP_F_READ | MAP_F_WRITE) != 0 {
            // MAP_F_MMIO needs VIRTIO_IOMMU_F_MMIO, which is not offered; other bits are unknown.
            return Err(Status::Inval);
        }
        if virt_end < virt_start {
            return Err(Status::Inval);
        }
        let last_page = virt_end.checked_add(1);
        let aligned = virt_start.is_multiple_of(PAGE_SIZE)
            && phys_start.is_multiple_of(PAGE_SIZE)
            && last_page.is_some_and(|e| e.is_multiple_of(PAGE_SIZE));
        if !aligned || virt_end > self.limits.input_end {
            return Err(Status::Range);
        }
        if phys_start.checked_add(virt_end - virt_start).is_none() {
            return Err(Status::Range);
        }
        let total = self.mappings;
        let max = self.limits.max_mappings;
        let d = self.domains.get_mut(&domain).ok_or(Status::NoEnt)?;
        if d.bypass {
            return Err(Status::Inval);
        }
        if overlaps(&d.mappings, virt_start, virt_end) {
            return Err(Status::Inval);
        }
        if total >= max {
            return Err(Status::NoMem);
        }
        d.mappings.insert(
            virt_start,
            Entry {
                end: virt_end,
                phys: phys_start,
                flags,
            },
        );
        self.mappings += 1;
        Ok(())
    }

    /// Removes every mapping inside `virt_start..=virt_end`. One that the range would split is
    /// RANGE, and then nothing is removed.
    fn unmap(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    ) -> Result<Vec<Invalidation>, Status> {
        if virt_end < virt_start {
            return Err(Status::Inval);
        }
        let d = self.domains.get_mut(&domain).ok_or(Status::NoEnt)?;
        if d.bypass {
            return Err(Status::Inval);
        }
        let mut inside = Vec::new();
        // A mapping starting before the range but reaching into it would be split.
        if let Some((_, entry)) = d.mappings.range(..virt_start).next_back() {
            if entry.end >= virt_start {
                return Err(Status::Range);
            }
        }
        for (&start, entry) in d.mappings.range(virt_start..=virt_end) {
            if entry.end > virt_end {
                return Err(Status::Range);
            }
            inside.push((start, entry.end));
        }
        let (Some(&(first, _)), Some(&(_, last))) = (inside.first(), inside.last()) else {
            return Ok(Vec::new());
        };
        for (start, _) in &inside {
            d.mappings.remove(start);
        }
        self.mappings -= inside.len();
        let length = (last - first).saturating_add(1);
        let stale = d
            .endpoints
            .iter()
            .map(|&endpoint| Invalidation::Range {
                endpoint,
                start: first,
                length,
            })
            .collect();
        if d.endpoints.is_empty() {
            // Cannot happen (empty domains are destroyed), but never keep an orphan.
            self.domains.remove(&domain);
        }
        Ok(stale)
    }

    /// How `endpoint`'s access at `iova` is translated; `bypass` is the config space's bypass
    /// (for unattached endpoints).
    pub fn lookup(&self, endpoint: u32, iova: u64, access: Permissions, bypass: bool) -> Lookup {
        let Some(domain) = self
            .attached
            .get(&endpoint)
            .and_then(|d| self.domains.get(d))
        else {
            return if bypass {
                Lookup::Identity
            } else {
                Lookup::Fault
            };
        };
        if domain.bypass {
            return Lookup::Identity;
        }
        let Some((&start, entry)) = domain.mappings.range(..=iova).next_back() else {
            return Lookup::Fault;
        };
        if iova > entry.end {
            return Lookup::Fault;
        }
        let permissions = match (
            entry.flags & MAP_F_READ != 0,
            entry.flags & MAP_F_WRITE != 0,
        ) {
            (true, true) => Permissions::ReadWrite,
            (true, false) => Permissions::Read,
            (false, true) => Permissions::Write,
            (false, false) => Permissions::No,
        };
        if !permissions.allow(access) {
            return Lookup::Fault;
        }
        Lookup::Mapped {
            iova: start,
            target: entry.phys,
            // end <= input_end < u64::MAX: no overflow.
            length: entry.end - start + 1,
            permissions,
        }
    }
}

/// Whether any mapping of `mappings` intersects `start..=end`.
fn overlaps(mappings: &BTreeMap<u64, Entry>, start: u64, end: u64) -> bool {
    let before = mappings
        .range(..start)
        .next_back()
        .is_some_and(|(_, e)| e.end >= start);
    before || mappings.range(start..=end).next().is_some()
}
