//! A PCI function's configuration space as sysfs gives it (`/sys/bus/pci/devices/BDF/config`):
//! the standard and extended capability lists, the PCIe port type and the ACS capability.
//!
//! Hand-written rather than taken from a crate: the few crates that parse config space
//! (e.g. `pci-driver`) open devices through VFIO or need the device bound; here only a byte
//! array is walked, and the walk must survive anything (a short read as non-root gives only
//! 64 bytes; a broken device may link its capabilities in a loop).

/// Standard capability id of the PCI Express capability.
const CAP_ID_PCIE: u8 = 0x10;
/// Extended capability id of Access Control Services.
pub const EXT_CAP_ID_ACS: u16 = 0x000d;
/// Extended capability id of SR-IOV.
pub const EXT_CAP_ID_SRIOV: u16 = 0x0010;
/// Where the extended capability list starts.
const EXT_CAP_START: usize = 0x100;
/// The size of a PCIe function's configuration space.
const CONFIG_SPACE_SIZE: usize = 4096;
/// Offset and bit of Bus Master Enable in the command register.
pub const COMMAND_OFFSET: u64 = 0x04;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// A function's config space bytes (as many as could be read).
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
}

/// PCIe device/port type (PCIe capability register bits 7:4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortType {
    Endpoint,
    LegacyEndpoint,
    RootPort,
    SwitchUpstream,
    SwitchDownstream,
    PcieToPciBridge,
    PciToPcieBridge,
    RootComplexIntegratedEndpoint,
    RootComplexEventCollector,
    Unknown(u8),
}

impl PortType {
    fn from_bits(bits: u8) -> PortType {
        match bits {
            0x0 => PortType::Endpoint,
            0x1 => PortType::LegacyEndpoint,
            0x4 => PortType::RootPort,
            0x5 => PortType::SwitchUpstream,
            0x6 => PortType::SwitchDownstream,
            0x7 => PortType::PcieToPciBridge,
            0x8 => PortType::PciToPcieBridge,
            0x9 => PortType::RootComplexIntegratedEndpoint,
            0xa => PortType::RootComplexEventCollector,
            other => PortType::Unknown(other),
        }
    }

    /// Ports whose ACS decides whether functions below them can reach each other without
    /// going through the IOMMU (the kernel's `pci_acs_path_enabled` looks at these).
    pub fn routes_peer_to_peer(self) -> bool {
        matches!(self, PortType::RootPort | PortType::SwitchDownstream)
    }
}

/// The ACS capability and control registers (PCIe base spec 7.7.8); one flag per bit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AcsFlags {
    /// Source Validation.
    pub sv: bool,
    /// Translation Blocking.
    pub tb: bool,
    /// P2P Request Redirect.
    pub rr: bool,
    /// P2P Completion Redirect.
    pub cr: bool,
    /// Upstream Forwarding.
    pub uf: bool,
}

impl AcsFlags {
    fn from_bits(bits: u16) -> AcsFlags {
        AcsFlags {
            sv: bits & (1 << 0) != 0,
            tb: bits & (1 << 1) != 0,
            rr: bits & (1 << 2) != 0,
            cr: bits & (1 << 3) != 0,
            uf: bits & (1 << 4) != 0,
        }
    }

    /// What the kernel requires of a downstream port to isolate what is below it
    /// (`REQ_ACS_FLAGS`: SV, RR, CR, UF).
    pub fn isolates(&self) -> bool {
        self.sv && self.rr && self.cr && self.uf
    }

    /// `SV+ RR+ CR+ UF+` style, as lspci prints it.
    pub fn describe(&self) -> String {
        let flag = |name: &str, on: bool| format!("{name}{}", if on { '+' } else { '-' });
        [
            flag("SV", self.sv),
            flag("RR", self.rr),
            flag("CR", self.cr),
            flag("UF", self.uf),
        ]
        .join(" ")
    }
}

/// A function's ACS: what it can do and what is enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Acs {
    pub capable: AcsFlags,
    pub enabled: AcsFlags,
}

/// One entry of the extended capability list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtendedCap {
    pub id: u16,
    pub version: u8,
    pub offset: usize,
}

impl ConfigSpace {
    pub fn new(bytes: Vec<u8>) -> ConfigSpace {
        ConfigSpace { bytes }
    }

    /// Whether the extended space (beyond 256 bytes) was readable: sysfs gives only the first
    /// 64 bytes to a reader without CAP_SYS_ADMIN.
    pub fn has_extended_space(&self) -> bool {
        self.bytes.len() > EXT_CAP_START
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn read_u8(&self, offset: usize) -> Option<u8> {
        self.bytes.get(offset).copied()
    }

    pub fn read_u16(&self, offset: usize) -> Option<u16> {
        let bytes = self.bytes.get(offset..offset.checked_add(2)?)?;
        Some(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    pub fn read_u32(&self, offset: usize) -> Option<u32> {
        let bytes = self.bytes.get(offset..offset.checked_add(4)?)?;
        Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub fn command(&self) -> Option<u16> {
        self.read_u16(COMMAND_OFFSET as usize)
    }

    /// The standard capability list as (id, offset), stopping at a loop, a pointer into the
    /// header or the end of what was read.
    pub fn capabilities(&self) -> Vec<(u8, usize)> {
        let mut found = Vec::new();
        let has_list = self
            .read_u16(0x06)
            .is_some_and(|status| status & (1 << 4) != 0);
        if !has_list {
            return found;
        }
        let mut next = self.read_u8(0x34).map_or(0, |p| usize::from(p & 0xfc));
        // 48 entries of 4 bytes fill the 192 bytes after the header: more is a loop.
        while next >= 0x40 && found.len() < 48 {
            let Some(id) = self.read_u8(next) else { break };
            found.push((id, next));
            next = self.read_u8(next + 1).map_or(0, |p| usize::from(p & 0xfc));
        }
        found
    }

    /// The PCIe port type, if the function has a PCI Express capability.
    pub fn port_type(&self) -> Option<PortType> {
        let (_, offset) = self
            .capabilities()
            .into_iter()
            .find(|&(id, _)| id == CAP_ID_PCIE)?;
        let flags = self.read_u16(offset + 2)?;
        Some(PortType::from_bits(((flags >> 4) & 0xf) as u8))
    }

    /// The extended capability list, stopping at a loop, a pointer below 0x100 or the end of
    /// what was read.
    pub fn extended_capabilities(&self) -> Vec<ExtendedCap> {
        let mut found = Vec::new();
        let mut offset = EXT_CAP_START;
        // (4096 - 256) / 4 headers at most: more is a loop.
        while found.len() < (CONFIG_SPACE_SIZE - EXT_CAP_START) / 4 {
            let Some(header) = self.read_u32(offset) else {
                break;
            };
            // An all-zero or all-ones first header: no extended capabilities.
            if header == 0 || header == u32::MAX {
                break;
            }
            found.push(ExtendedCap {
                id: (header & 0xffff) as u16,
                version: ((header >> 16) & 0xf) as u8,
                offset,
            });
            let next = (header >> 20) as usize & 0xffc;
            if next < EXT_CAP_START {
                break;
            }
            offset = next;
        }
        found
    }

    pub fn find_extended(&self, id: u16) -> Option<ExtendedCap> {
        self.extended_capabilities()
            .into_iter()
            .find(|cap| cap.id == id)
    }

    /// The ACS capability (extended id 0x000d): capability register at +4, control at +6.
    pub fn acs(&self) -> Option<Acs> {
        let cap = self.find_extended(EXT_CAP_ID_ACS)?;
        Some(Acs {
            capable: AcsFlags::from_bits(self.read_u16(cap.offset + 4)?),
            enabled: AcsFlags::from_bits(self.read_u16(cap.offset + 6)?),
        })
    }
}

/// For the fuzz target: walk everything a config space offers, never panicking.
pub fn fuzz(data: &[u8]) {
    let config = ConfigSpace::new(data.to_vec());
    let _ = config.capabilities();
    let _ = config.port_type();
    let _ = config.extended_capabilities();
    let _ = config.acs();
    let _ = config.command();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A config space builder for tests: a PCIe capability of `port` at 0x40 and the given
    /// extended capabilities (id, body words) chained from 0x100.
    pub(crate) fn config_with(port: u8, extended: &[(u16, &[u32])]) -> Vec<u8> {
        let mut bytes = vec![0u8; CONFIG_SPACE_SIZE];
        bytes[0x06] = 1 << 4; // status: capability list
        bytes[0x34] = 0x40;
        bytes[0x40] = CAP_ID_PCIE;
        bytes[0x41] = 0; // last standard capability
        bytes[0x42..0x44].copy_from_slice(&(2 | (u16::from(port) << 4)).to_le_bytes());
        let mut offset = EXT_CAP_START;
        for (index, (id, body)) in extended.iter().enumerate() {
            let size = 4 + 4 * body.len();
            let next = if index + 1 == extended.len() {
                0
            } else {
                (offset + size + 3) & !3
            };
            let header = u32::from(*id) | (1 << 16) | ((next as u32) << 20);
            bytes[offset..offset + 4].copy_from_slice(&header.to_le_bytes());
            for (word_index, word) in body.iter().enumerate() {
                let at = offset + 4 + 4 * word_index;
                bytes[at..at + 4].copy_from_slice(&word.to_le_bytes());
            }
            offset = next;
        }
        bytes
    }

    #[test]
    fn acs_flags_are_read_from_the_capability_and_control_registers() {
        // AER (id 1) first, then ACS: capable SV TB RR CR UF (0x1f), enabled SV RR (0x05).
        let bytes = config_with(4, &[(0x0001, &[0; 10]), (EXT_CAP_ID_ACS, &[0x0005_001f])]);
        let config = ConfigSpace::new(bytes);

        let acs = config.acs().expect("ACS found after AER");

        assert_eq!(config.port_type(), Some(PortType::RootPort));
        assert_eq!(acs.capable.describe(), "SV+ RR+ CR+ UF+");
        assert!(acs.capable.tb);
        assert_eq!(acs.enabled.describe(), "SV+ RR+ CR- UF-");
        assert!(!acs.enabled.isolates());
        assert!(acs.capable.isolates());
    }

    #[test]
    fn a_function_without_acs_has_none() {
        let config = ConfigSpace::new(config_with(0, &[(EXT_CAP_ID_SRIOV, &[0; 15])]));

        assert_eq!(config.acs(), None);
        assert_eq!(config.port_type(), Some(PortType::Endpoint));
        assert_eq!(
            config.find_extended(EXT_CAP_ID_SRIOV).map(|c| c.offset),
            Some(0x100)
        );
    }

    #[test]
    fn a_looping_extended_list_ends() {
        let mut bytes = config_with(6, &[(0x0001, &[])]);
        // The header at 0x100 points at itself.
        let header = 0x0001u32 | (1 << 16) | (0x100 << 20);
        bytes[0x100..0x104].copy_from_slice(&header.to_le_bytes());
        let config = ConfigSpace::new(bytes);

        let caps = config.extended_capabilities();

        assert_eq!(caps.len(), (CONFIG_SPACE_SIZE - EXT_CAP_START) / 4);
        assert_eq!(config.acs(), None);
    }

    #[test]
    fn the_64_bytes_a_non_root_reader_gets_have_no_extended_space() {
        let mut bytes = config_with(4, &[(EXT_CAP_ID_ACS, &[0x001f_001f])]);
        bytes.truncate(64);
        let config = ConfigSpace::new(bytes);

        assert!(!config.has_extended_space());
        assert_eq!(config.acs(), None);
        // The PCIe capability at 0x40 is beyond the 64 bytes too.
        assert_eq!(config.port_type(), None);
        assert_eq!(config.command(), Some(0));
    }

    #[test]
    fn truncated_and_garbage_input_never_panics() {
        for len in [0, 1, 7, 0x35, 0x41, 0x101, 0x103, 0x105] {
            let bytes = config_with(4, &[(EXT_CAP_ID_ACS, &[0x001f_001f])]);
            fuzz(&bytes[..len]);
        }
        fuzz(&[0xff; 4096]);
        fuzz(&[0xff; 5000]);
    }
}
