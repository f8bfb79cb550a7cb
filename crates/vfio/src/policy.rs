//! Config-space virtualization for an assigned function, by a declarative trap policy.
//!
//! [`VirtualConfig::build`] reads the function's real config space once (through
//! [`DeviceConfig`], so tests use a fake) and produces two things:
//!
//! * a shadow [`ConfigSpace`] (sluice-pci's model, with its write masks): the header, the BARs
//!   sized from the VFIO regions, and the capabilities the guest may see, re-linked so hidden ones
//!   are skipped;
//! * a table of [`Rule`]s: for each byte range, whether guest accesses go to the shadow
//!   ([`Access::Emulated`]), to the device ([`Access::Passthrough`]), to the device for reads
//!   only ([`Access::ReadOnly`]), to the shadow with some command bits mirrored to the device
//!   ([`Access::Mirrored`]) or nowhere ([`Access::Hidden`]: reads zero, writes dropped).
//!
//! The table is data: [`header_rules`] for the type 0 header, [`capability_rule`] per capability
//! id, [`EXTENDED_HIDDEN`] for extended capabilities and [`QUIRKS`] for per-device overrides.
//! Bytes no rule covers are hidden. Guest accesses are split at rule boundaries, so a dword read
//! spanning command (mirrored) and status (emulated) is served by both.

use sluice_pci::{
    BarSpec, ConfigSpace, MsixCapability, PciIds, CAPABILITIES_POINTER, COMMAND,
    COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, CONFIG_SPACE_SIZE,
    CONVENTIONAL_CONFIG_SIZE, INTERRUPT_LINE, INTERRUPT_PIN, NUM_BARS, STATUS,
    STATUS_CAPABILITY_LIST,
};

/// Access to the real function's config space (VFIO's config region, or a fake in tests).
pub trait DeviceConfig: Send + Sync {
    /// Reads `data.len()` bytes at `offset`; unreadable bytes read as all ones.
    fn read(&self, offset: usize, data: &mut [u8]);
    /// Writes `data` at `offset`.
    fn write(&self, offset: usize, data: &[u8]);
}

/// Where a guest access to a byte range goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The shadow config space, with its write masks (BARs, MSI-X control, line register).
    Emulated,
    /// The device, for reads and writes.
    Passthrough,
    /// Reads from the device; writes are dropped (the guest must not change the host device).
    ReadOnly,
    /// The shadow; the `device_bits` of each write are also applied to the device
    /// (read-modify-write), so the device really decodes and masters DMA.
    Mirrored { device_bits: u16 },
    /// Reads zero, writes dropped.
    Hidden,
}

/// One entry of the trap policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub offset: usize,
    pub len: usize,
    pub access: Access,
    /// What the range is, for logs and tests.
    pub what: &'static str,
}

impl Rule {
    const fn new(offset: usize, len: usize, access: Access, what: &'static str) -> Self {
        Self {
            offset,
            len,
            access,
            what,
        }
    }

    fn contains(&self, offset: usize) -> bool {
        offset >= self.offset && offset < self.offset + self.len
    }
}

/// Command bits the device must see: it decodes its BARs and masters DMA only if told.
pub const MIRRORED_COMMAND_BITS: u16 = COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER;

/// The type 0 header. BARs and the expansion ROM are emulated (the guest sizes and places them;
/// the ROM is not offered), the interrupt pin reads 0 (INTx is not offered).
pub fn header_rules() -> Vec<Rule> {
    use Access::*;
    vec![
        Rule::new(0x00, 4, Emulated, "vendor and device id"),
        Rule::new(
            COMMAND,
            2,
            Mirrored {
                device_bits: MIRRORED_COMMAND_BITS,
            },
            "command",
        ),
        Rule::new(STATUS, 2, Emulated, "status"),
        Rule::new(0x08, 4, Emulated, "revision and class"),
        Rule::new(0x0c, 4, Emulated, "cache line, latency, header type, BIST"),
        Rule::new(0x10, 24, Emulated, "BARs"),
        Rule::new(0x28, 8, Emulated, "cardbus CIS, subsystem ids"),
        Rule::new(0x30, 4, Hidden, "expansion ROM (not offered)"),
        Rule::new(CAPABILITIES_POINTER, 8, Emulated, "capability pointer"),
        Rule::new(
            INTERRUPT_LINE,
            4,
            Emulated,
            "interrupt line/pin, min grant, max latency",
        ),
    ]
}

pub const CAP_ID_PM: u8 = 0x01;
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_PCIE: u8 = 0x10;
pub const CAP_ID_MSIX: u8 = 0x11;

/// PCI Express capability length (version 2, with the slot and link 2 registers).
const PCIE_CAP_LEN: usize = 0x3c;

/// How a standard capability is exposed: `Some((len, access))` keeps it, `None` hides it.
/// MSI is hidden (sluice offers MSI-X only); unknown ids are hidden rather than guessed at.
pub fn capability_rule(
    id: u8,
    device: &dyn DeviceConfig,
    offset: usize,
) -> Option<(usize, Access)> {
    match id {
        // Emulated: the guest sees D0 and its power-state writes are dropped (a host device is
        // not put to sleep by a guest).
        CAP_ID_PM => Some((8, Access::Emulated)),
        // Emulated from the table of sluice-pci's MSI-X model; the device's own capability is
        // programmed by VFIO_DEVICE_SET_IRQS.
        CAP_ID_MSIX => Some((12, Access::Emulated)),
        // Read from the device (link state, capabilities), writes dropped: no FLR, MPS or ASPM
        // change from a guest.
        CAP_ID_PCIE => Some((PCIE_CAP_LEN, Access::ReadOnly)),
        CAP_ID_VENDOR => {
            let mut len = [0u8];
            device.read(offset + 2, &mut len);
            Some((usize::from(len[0]).max(3), Access::ReadOnly))
        }
        _ => None,
    }
}

pub const EXT_CAP_ID_ACS: u16 = 0x0d;
pub const EXT_CAP_ID_SRIOV: u16 = 0x10;

/// Extended capabilities taken out of the list: SR-IOV (VFs are the host's business) and ACS
/// (isolation is configured by the host). Others are read-only with emulated headers.
pub const EXTENDED_HIDDEN: &[u16] = &[EXT_CAP_ID_SRIOV, EXT_CAP_ID_ACS];

/// A per-device override of the policy (vendor quirks as data).
#[derive(Debug, Clone, Copy)]
pub struct Quirk {
    pub vendor_id: u16,
    /// `None`: every device of the vendor.
    pub device_id: Option<u16>,
    pub rule: Rule,
    /// The shadow value for an emulated or hidden range (little endian, `rule.len` bytes).
    pub value: u32,
    pub why: &'static str,
}

/// Known quirks.
pub const QUIRKS: &[Quirk] = &[Quirk {
    vendor_id: 0x1b36,
    device_id: Some(0x0010),
    rule: Rule::new(INTERRUPT_PIN, 1, Access::Emulated, "interrupt pin"),
    value: 0,
    why: "QEMU's NVMe VFs report INTx pin 1 although VFs have no INTx",
}];

/// The physical MSI-X capability, as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    pub cap_offset: usize,
    pub capability: MsixCapability,
}

/// Why a function cannot be virtualized.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("config space reads all ones: the function is gone or not readable")]
    Unreadable,
    #[error("not a type 0 (endpoint) header: {0:#x}")]
    NotEndpoint(u8),
    #[error("capability list is malformed at {0:#x}")]
    BadCapabilityList(usize),
    #[error("BAR {0}: {1}")]
    Bar(usize, sluice_pci::PciError),
    #[error("MSI-X capability: {0}")]
    Msix(sluice_pci::PciError),
}

/// The guest's view of an assigned function's config space.
pub struct VirtualConfig {
    shadow: ConfigSpace,
    rules: Vec<Rule>,
    msix: Option<MsixLayout>,
    device: Box<dyn DeviceConfig>,
}

impl std::fmt::Debug for VirtualConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualConfig")
            .field("shadow", &self.shadow)
            .field("rules", &self.rules.len())
            .field("msix", &self.msix)
            .finish_non_exhaustive()
    }
}

/// Most capabilities a well-formed list can hold (guards against loops in hostile hardware).
const MAX_CAPABILITIES: usize = 48;
const FIRST_EXTENDED: usize = CONVENTIONAL_CONFIG_SIZE;

impl VirtualConfig {
    /// Builds the shadow and the rules from `device`'s config space and the BARs VFIO reported
    /// (`bars[i]`: the BAR's spec, `None` for an unused index or a 64-bit BAR's upper half).
    pub fn build(
        device: Box<dyn DeviceConfig>,
        bars: &[Option<BarSpec>; NUM_BARS],
    ) -> Result<Self, PolicyError> {
        let mut image = vec![0u8; CONFIG_SPACE_SIZE];
        device.read(0, &mut image);
        let word = |o: usize| u16::from_le_bytes([image[o], image[o + 1]]);
        if word(0) == 0xffff {
            return Err(PolicyError::Unreadable);
        }
        let header_type = image[0x0e] & 0x7f;
        if header_type != 0 {
            return Err(PolicyError::NotEndpoint(header_type));
        }
        let ids = PciIds {
            vendor_id: word(0),
            device_id: word(2),
            class_code: u32::from_le_bytes([image[0x09], image[0x0a], image[0x0b], 0]),
            revision_id: image[0x08],
            subsystem_vendor_id: word(0x2c),
            subsystem_id: word(0x2e),
        };
        let mut shadow = ConfigSpace::new(&ids);
        // Multi-function bit, status and the remaining header bytes as the device has them.
        shadow.set_u8(0x0e, image[0x0e] & 0x80);
        shadow.set_u16(STATUS, word(STATUS) & !STATUS_CAPABILITY_LIST);
        for (index, spec) in bars.iter().enumerate() {
            if let Some(spec) = spec {
                shadow
                    .add_bar(index, *spec)
                    .map_err(|e| PolicyError::Bar(index, e))?;
            }
        }
        let mut rules = header_rules();
        let msix = Self::link_capabilities(&image, device.as_ref(), &mut shadow, &mut rules)?;
        Self::link_extended_capabilities(&image, &mut shadow, &mut rules);
        Self::apply_quirks(ids.vendor_id, ids.device_id, &mut shadow, &mut rules);
        rules.sort_by_key(|r| r.offset);
        let msix = match msix {
            Some(cap_offset) => Some(Self::msix_layout(&shadow, cap_offset)?),
            None => None,
        };
        Ok(Self {
            shadow,
            rules,
            msix,
            device,
        })
    }

    /// Copies the kept standard capabilities into the shadow, re-linked; returns the MSI-X
    /// capability's offset.
    fn link_capabilities(
        image: &[u8],
        device: &dyn DeviceConfig,
        shadow: &mut ConfigSpace,
        rules: &mut Vec<Rule>,
    ) -> Result<Option<usize>, PolicyError> {
        let mut msix = None;
        let mut previous_next: usize = CAPABILITIES_POINTER;
        let has_list =
            u16::from_le_bytes([image[STATUS], image[STATUS + 1]]) & STATUS_CAPABILITY_LIST != 0;
        let mut offset = if has_list {
            usize::from(image[CAPABILITIES_POINTER] & 0xfc)
        } else {
            0
        };
        shadow.set_u8(CAPABILITIES_POINTER, 0);
        for _ in 0..MAX_CAPABILITIES {
            if offset == 0 {
                return Ok(msix);
            }
            if !(0x40..CONVENTIONAL_CONFIG_SIZE - 1).contains(&offset) {
                return Err(PolicyError::BadCapabilityList(offset));
            }
            let id = image[offset];
            let next = usize::from(image[offset + 1] & 0xfc);
            if let Some((len, access)) = capability_rule(id, device, offset) {
                let end = (offset + len).min(CONVENTIONAL_CONFIG_SIZE);
                shadow.set_bytes(offset, &image[offset..end]);
                // The id/next header is always the shadow's (the list is re-linked).
                rules.push(Rule::new(offset, 2, Access::Emulated, "capability header"));
                rules.push(Rule::new(
                    offset + 2,
                    end - offset - 2,
                    access,
                    "capability",
                ));
                // Offsets are < 0x100: they fit the 8-bit pointer.
                shadow.set_u8(previous_next, offset as u8);
                shadow.set_u8(offset + 1, 0);
                previous_next = offset + 1;
                shadow.set_status_bits(STATUS_CAPABILITY_LIST);
                match id {
                    CAP_ID_MSIX => {
                        // Enable and function mask are the guest's; the rest read-only.
                        shadow.set_u16(
                            offset + 2,
                            u16::from_le_bytes([image[offset + 2], image[offset + 3]]) & 0x07ff,
                        );
                        shadow
                            .set_write_mask(offset + 2, &[0x00, 0xc0])
                            .map_err(PolicyError::Msix)?;
                        msix = Some(offset);
                    }
                    CAP_ID_PM => {
                        // Power state D0, no PME: the guest's writes are dropped.
                        shadow.set_u16(offset + 4, 0);
                    }
                    _ => {}
                }
            }
            offset = next;
        }
        Err(PolicyError::BadCapabilityList(offset))
    }

    /// Re-links the extended capabilities in the shadow without the hidden ones; their headers
    /// are emulated and their bodies read-only.
    fn link_extended_capabilities(image: &[u8], shadow: &mut ConfigSpace, rules: &mut Vec<Rule>) {
        let all = walk_extended(image);
        let kept: Vec<(usize, u32)> = all
            .iter()
            .filter(|(_, header)| !EXTENDED_HIDDEN.contains(&((header & 0xffff) as u16)))
            .map(|&(offset, header)| (offset, header & 0x000f_ffff))
            .collect();
        // With the capability at 0x100 hidden, a null header there points at the first kept one.
        let head_hidden = kept.first().is_none_or(|k| k.0 != FIRST_EXTENDED);
        if head_hidden {
            let first = kept.first().map_or(0, |k| k.0 as u32);
            shadow.set_u32(FIRST_EXTENDED, first << 20);
            rules.push(Rule::new(
                FIRST_EXTENDED,
                4,
                Access::Emulated,
                "extended list head",
            ));
        }
        for (i, &(offset, header)) in kept.iter().enumerate() {
            let next = kept.get(i + 1).map_or(0, |k| k.0 as u32);
            shadow.set_u32(offset, header | (next << 20));
            rules.push(Rule::new(
                offset,
                4,
                Access::Emulated,
                "extended capability header",
            ));
            // A body runs to the next capability, kept or hidden (its length is not in the
            // header); the last one to the end of config space.
            let end = all
                .iter()
                .map(|c| c.0)
                .filter(|&o| o > offset)
                .min()
                .unwrap_or(CONFIG_SPACE_SIZE);
            if end > offset + 4 {
                let body = Rule::new(
                    offset + 4,
                    end - offset - 4,
                    Access::ReadOnly,
                    "extended capability",
                );
                rules.push(body);
            }
        }
    }

    fn apply_quirks(
        vendor_id: u16,
        device_id: u16,
        shadow: &mut ConfigSpace,
        rules: &mut Vec<Rule>,
    ) {
        let applies =
            |q: &&Quirk| q.vendor_id == vendor_id && q.device_id.is_none_or(|d| d == device_id);
        for quirk in QUIRKS.iter().filter(applies) {
            let rule = quirk.rule;
            // The quirk's range replaces whatever the rules said for it.
            let mut split = Vec::new();
            for r in rules.drain(..) {
                split.extend(subtract(r, rule.offset, rule.len));
            }
            *rules = split;
            let bytes = quirk.value.to_le_bytes();
            shadow.set_bytes(rule.offset, &bytes[..rule.len.min(4)]);
            rules.push(rule);
            tracing::debug!("vfio: quirk {vendor_id:04x}:{device_id:04x}: {}", quirk.why);
        }
    }

    fn msix_layout(shadow: &ConfigSpace, cap_offset: usize) -> Result<MsixLayout, PolicyError> {
        let control = shadow.read_u16(cap_offset + 2);
        let table = shadow.read_u32(cap_offset + 4);
        let pba = shadow.read_u32(cap_offset + 8);
        let capability = MsixCapability {
            vectors: (control & 0x07ff) + 1,
            table_bar: (table & 0x7) as u8,
            table_offset: table & !0x7,
            pba_bar: (pba & 0x7) as u8,
            pba_offset: pba & !0x7,
        };
        let valid = |bar: u8, offset: u32, len: u64| {
            shadow
                .bar(bar.into())
                .is_some_and(|spec| !spec.is_io() && u64::from(offset) + len <= spec.size)
        };
        if !valid(
            capability.table_bar,
            capability.table_offset,
            capability.table_len(),
        ) || !valid(
            capability.pba_bar,
            capability.pba_offset,
            capability.pba_len(),
        ) {
            return Err(PolicyError::Msix(sluice_pci::PciError::InvalidMsix(
                "table or PBA outside a memory BAR",
            )));
        }
        Ok(MsixLayout {
            cap_offset,
            capability,
        })
    }

    /// The rules, sorted by offset.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The access for the byte at `offset` (bytes no rule covers are hidden).
    pub fn access_at(&self, offset: usize) -> Access {
        self.rule_at(offset).map_or(Access::Hidden, |r| r.access)
    }

    fn rule_at(&self, offset: usize) -> Option<&Rule> {
        let index = self.rules.partition_point(|r| r.offset + r.len <= offset);
        self.rules.get(index).filter(|r| r.contains(offset))
    }

    /// The MSI-X capability, if the function has one.
    pub fn msix(&self) -> Option<MsixLayout> {
        self.msix
    }

    pub fn shadow(&self) -> &ConfigSpace {
        &self.shadow
    }

    pub fn shadow_mut(&mut self) -> &mut ConfigSpace {
        &mut self.shadow
    }

    pub fn device(&self) -> &dyn DeviceConfig {
        self.device.as_ref()
    }

    /// Splits `[offset, offset + len)` into runs of one access each.
    fn chunks(&self, offset: usize, len: usize) -> Vec<(usize, usize, Access)> {
        let mut chunks: Vec<(usize, usize, Access)> = Vec::new();
        for o in offset..offset.saturating_add(len).min(CONFIG_SPACE_SIZE) {
            let access = self.access_at(o);
            match chunks.last_mut() {
                Some(last) if last.2 == access && last.0 + last.1 == o => last.1 += 1,
                _ => chunks.push((o, 1, access)),
            }
        }
        chunks
    }

    /// Guest config read (bytes beyond config space read as all ones).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        for (start, len, access) in self.chunks(offset, data.len()) {
            let out = &mut data[start - offset..start - offset + len];
            match access {
                Access::Emulated | Access::Mirrored { .. } => self.shadow.read(start, out),
                Access::Passthrough | Access::ReadOnly => self.device.read(start, out),
                Access::Hidden => out.fill(0),
            }
        }
    }

    /// Guest config write, applied per the rules.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (start, len, access) in self.chunks(offset, data.len()) {
            let input = &data[start - offset..start - offset + len];
            match access {
                Access::Emulated => self.shadow.write(start, input),
                Access::Mirrored { device_bits } => {
                    self.shadow.write(start, input);
                    self.mirror(start, input, device_bits, offset_in_register(start));
                }
                Access::Passthrough => self.device.write(start, input),
                Access::ReadOnly | Access::Hidden => {}
            }
        }
    }

    /// Applies the `device_bits` of a command write to the device, keeping its other bits.
    fn mirror(&self, start: usize, input: &[u8], device_bits: u16, byte_in_register: usize) {
        let mask = device_bits.to_le_bytes();
        let mut current = vec![0u8; input.len()];
        self.device.read(start, &mut current);
        let merged: Vec<u8> = input
            .iter()
            .zip(&current)
            .enumerate()
            .map(|(i, (&new, &old))| {
                let m = mask.get(byte_in_register + i).copied().unwrap_or(0);
                (old & !m) | (new & m)
            })
            .collect();
        if merged != current {
            self.device.write(start, &merged);
        }
    }

    /// Clears Bus Master on the device and in the shadow (quarantine after a failed reset).
    pub fn clear_bus_master(&mut self) {
        let command = self.shadow.command() & !COMMAND_BUS_MASTER;
        self.shadow.set_u16(COMMAND, command);
        let mut current = [0u8; 2];
        self.device.read(COMMAND, &mut current);
        let cleared = u16::from_le_bytes(current) & !COMMAND_BUS_MASTER;
        self.device.write(COMMAND, &cleared.to_le_bytes());
    }
}

/// The command register is the only mirrored one: a write's first byte is its byte
/// `start - COMMAND`.
fn offset_in_register(start: usize) -> usize {
    start.saturating_sub(COMMAND)
}

/// The extended capabilities as `(offset, header)`, in list order, bounded against loops.
fn walk_extended(image: &[u8]) -> Vec<(usize, u32)> {
    let mut found: Vec<(usize, u32)> = Vec::new();
    let mut offset = FIRST_EXTENDED;
    while (FIRST_EXTENDED..=CONFIG_SPACE_SIZE - 4).contains(&offset) && offset.is_multiple_of(4) {
        let header = u32::from_le_bytes([
            image[offset],
            image[offset + 1],
            image[offset + 2],
            image[offset + 3],
        ]);
        let seen = found.iter().any(|f| f.0 == offset);
        if header == 0 || header == u32::MAX || seen {
            break;
        }
        found.push((offset, header));
        offset = (header >> 20) as usize;
    }
    found
}

/// `rule` without `[offset, offset + len)`: zero, one or two pieces.
fn subtract(rule: Rule, offset: usize, len: usize) -> Vec<Rule> {
    let (start, end) = (rule.offset, rule.offset + rule.len);
    let (cut_start, cut_end) = (offset, offset + len);
    if cut_end <= start || end <= cut_start {
        return vec![rule];
    }
    let mut pieces = Vec::new();
    if start < cut_start {
        pieces.push(Rule {
            len: cut_start - start,
            ..rule
        });
    }
    if cut_end < end {
        pieces.push(Rule {
            offset: cut_end,
            len: end - cut_end,
            ..rule
        });
    }
    pieces
}
