//! A type 0 configuration space: the 4 KiB register file of one PCI(e) function.
//!
//! Every byte has a write mask (which bits the guest may change) and a write-1-to-clear mask, so a
//! guest write can never touch a read-only field whatever its width or alignment. BAR sizing falls
//! out of the mask: the address bits below the BAR size are read-only zero, so writing all ones
//! reads back the size mask with the type bits. Devices change read-only state with the
//! `set_*` methods, which bypass the masks.

use crate::bar::{BarKind, BarSpec, BAR_IO_FLAGS_MASK, BAR_MEM_FLAGS_MASK};
use crate::PciError;

/// Bytes of PCIe configuration space per function (conventional + extended).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Bytes reachable through the conventional mechanism (CF8/CFC).
pub const CONVENTIONAL_CONFIG_SIZE: usize = 256;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
/// Programming interface (0x09), subclass (0x0a), base class (0x0b).
pub const CLASS_CODE: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
pub const HEADER_TYPE: usize = 0x0e;
const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
const COMMAND_SERR_ENABLE: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command bits a guest may change; the rest are hardwired to zero on a virtual function.
const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR_ENABLE
    | COMMAND_INTX_DISABLE;

pub const STATUS_CAPABILITY_LIST: u16 = 1 << 4;
/// Error bits of the status register (parity, target/master abort, SERR, parity error): RW1C.
const STATUS_WRITE_1_TO_CLEAR: u16 = 0xf900;

/// Header type 0 (endpoint); bit 7 (multi-function) stays clear.
const HEADER_TYPE_ENDPOINT: u8 = 0;
/// The first byte after the type 0 header, where capabilities start.
const FIRST_CAPABILITY: usize = 0x40;
/// Extended capabilities start right after conventional space.
const FIRST_EXTENDED_CAPABILITY: usize = 0x100;
/// Bytes of a capability header (id, next pointer).
const CAPABILITY_HEADER_LEN: usize = 2;
/// Bytes of an extended capability header (id, version, next).
const EXTENDED_CAPABILITY_HEADER_LEN: usize = 4;
/// Highest extended capability id (16 bits) and version (4 bits).
const EXTENDED_CAPABILITY_VERSION_MAX: u8 = 0xf;

/// Number of BAR registers in a type 0 header.
pub const NUM_BARS: usize = 6;

/// Identity of a function, as found in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    /// Base class << 16 | subclass << 8 | programming interface.
    pub class_code: u32,
    pub revision_id: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// What one BAR register holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Bar(BarSpec),
    /// The upper half of the 64-bit BAR in the slot below.
    UpperHalf,
}

/// One function's configuration space with write masks.
#[derive(Clone)]
pub struct ConfigSpace {
    data: Box<[u8; CONFIG_SPACE_SIZE]>,
    write_mask: Box<[u8; CONFIG_SPACE_SIZE]>,
    write_1_to_clear: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [BarSlot; NUM_BARS],
    /// Offset of the last capability in the list (its next pointer is patched on add).
    last_capability: Option<usize>,
    next_capability: usize,
    last_extended_capability: Option<usize>,
    next_extended_capability: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "vendor_id",
                &format_args!("{:#06x}", self.read_u16(VENDOR_ID)),
            )
            .field(
                "device_id",
                &format_args!("{:#06x}", self.read_u16(DEVICE_ID)),
            )
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// The register contents (what a snapshot keeps: masks and BAR layout are the device's,
    /// rebuilt when it is created).
    pub fn bytes(&self) -> &[u8] {
        &self.data[..]
    }

    /// Puts back register contents from [`ConfigSpace::bytes`] of the same function: the
    /// length and the vendor, device and class registers must match.
    pub fn restore_bytes(&mut self, bytes: &[u8]) -> Result<(), PciError> {
        const IDENTITY: std::ops::Range<usize> = 0..4;
        const CLASS: std::ops::Range<usize> = 0x08..0x0c;
        let same_function = bytes.len() == CONFIG_SPACE_SIZE
            && bytes[IDENTITY] == self.data[IDENTITY]
            && bytes[CLASS] == self.data[CLASS];
        if !same_function {
            return Err(PciError::RestoreMismatch);
        }
        self.data.copy_from_slice(bytes);
        Ok(())
    }

    /// A type 0 header carrying `ids`, with the standard writable fields.
    pub fn new(ids: &PciIds) -> Self {
        let mut config = Self {
            data: Box::new([0; CONFIG_SPACE_SIZE]),
            write_mask: Box::new([0; CONFIG_SPACE_SIZE]),
            write_1_to_clear: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [BarSlot::Unused; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
            last_extended_capability: None,
            next_extended_capability: FIRST_EXTENDED_CAPABILITY,
        };
        config.set_u16(VENDOR_ID, ids.vendor_id);
        config.set_u16(DEVICE_ID, ids.device_id);
        config.set_u8(REVISION_ID, ids.revision_id);
        let class = ids.class_code.to_le_bytes();
        config.set_bytes(CLASS_CODE, &class[..3]);
        config.set_u8(HEADER_TYPE, HEADER_TYPE_ENDPOINT);
        config.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
        config.set_u16(SUBSYSTEM_ID, ids.subsystem_id);
        config.mask_u16(COMMAND, COMMAND_WRITABLE);
        config.write_1_to_clear[STATUS..STATUS + 2]
            .copy_from_slice(&STATUS_WRITE_1_TO_CLEAR.to_le_bytes());
        config.write_mask[CACHE_LINE_SIZE] = 0xff;
        config.write_mask[INTERRUPT_LINE] = 0xff;
        config
    }

    /// Reads `data.len()` bytes at `offset`; bytes outside config space read as all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i)
                .and_then(|o| self.data.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Applies a guest write: only writable bits change, ones in write-1-to-clear bits clear them.
    /// Bytes outside config space are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else {
                return;
            };
            let mask = self.write_mask[o];
            let updated = (self.data[o] & !mask) | (value & mask);
            self.data[o] = updated & !(value & self.write_1_to_clear[o]);
        }
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Device-side write that ignores the masks (for read-only state the device owns).
    /// Bytes outside config space are dropped.
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            if let Some(byte) = offset.checked_add(i).and_then(|o| self.data.get_mut(o)) {
                *byte = value;
            }
        }
    }

    pub fn set_u8(&mut self, offset: usize, value: u8) {
        self.set_bytes(offset, &[value]);
    }

    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets which bits of `mask.len()` bytes at `offset` the guest may write.
    pub fn set_write_mask(&mut self, offset: usize, mask: &[u8]) -> Result<(), PciError> {
        Self::checked_range(offset, mask.len())?;
        self.write_mask[offset..offset + mask.len()].copy_from_slice(mask);
        Ok(())
    }

    /// Sets which bits of `mask.len()` bytes at `offset` are write-1-to-clear.
    pub fn set_write_1_to_clear_mask(
        &mut self,
        offset: usize,
        mask: &[u8],
    ) -> Result<(), PciError> {
        Self::checked_range(offset, mask.len())?;
        self.write_1_to_clear[offset..offset + mask.len()].copy_from_slice(mask);
        Ok(())
    }

    fn checked_range(offset: usize, len: usize) -> Result<(), PciError> {
        match offset.checked_add(len) {
            Some(end) if end <= CONFIG_SPACE_SIZE => Ok(()),
            _ => Err(PciError::OutOfBounds { offset, len }),
        }
    }

    fn mask_u16(&mut self, offset: usize, mask: u16) {
        self.write_mask[offset..offset + 2].copy_from_slice(&mask.to_le_bytes());
    }

    fn mask_u32(&mut self, offset: usize, mask: u32) {
        self.write_mask[offset..offset + 4].copy_from_slice(&mask.to_le_bytes());
    }

    pub fn vendor_id(&self) -> u16 {
        self.read_u16(VENDOR_ID)
    }

    pub fn device_id(&self) -> u16 {
        self.read_u16(DEVICE_ID)
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    pub fn status(&self) -> u16 {
        self.read_u16(STATUS)
    }

    /// Sets status bits the device raises (e.g. an error bit the guest then clears with a 1).
    pub fn set_status_bits(&mut self, bits: u16) {
        let status = self.status() | bits;
        self.set_u16(STATUS, status);
    }

    /// INTx pin: 0 none, 1..=4 INTA..INTD.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_u8(INTERRUPT_PIN, pin.min(4));
    }

    /// Appends a capability with `id` and `body` (the bytes after the id/next header) to the list
    /// at the next dword-aligned offset from 0x40, links it, and sets the status capability bit.
    /// Returns the capability's offset. The body is read-only unless [`Self::set_write_mask`]
    /// says otherwise.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, PciError> {
        let len = body.len().saturating_add(CAPABILITY_HEADER_LEN);
        let offset = self.next_capability.next_multiple_of(4);
        let overflow = PciError::CapabilityOverflow { id: id.into(), len };
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= CONVENTIONAL_CONFIG_SIZE)
            .ok_or(overflow)?;
        self.data[offset] = id;
        self.data[offset + 1] = 0;
        self.data[offset + CAPABILITY_HEADER_LEN..end].copy_from_slice(body);
        // `offset` < 0x100, so it fits the 8-bit pointer.
        let pointer = offset as u8;
        match self.last_capability {
            None => self.data[CAPABILITIES_POINTER] = pointer,
            Some(previous) => self.data[previous + 1] = pointer,
        }
        self.last_capability = Some(offset);
        self.next_capability = end;
        self.set_status_bits(STATUS_CAPABILITY_LIST);
        Ok(offset)
    }

    /// Appends an extended capability (header dword: id, 4-bit version, next offset) from 0x100.
    /// Returns its offset.
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
    ) -> Result<usize, PciError> {
        let len = body.len().saturating_add(EXTENDED_CAPABILITY_HEADER_LEN);
        let offset = self.next_extended_capability.next_multiple_of(4);
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= CONFIG_SPACE_SIZE)
            .ok_or(PciError::CapabilityOverflow { id, len })?;
        if version > EXTENDED_CAPABILITY_VERSION_MAX {
            return Err(PciError::CapabilityOverflow { id, len });
        }
        let header = u32::from(id) | (u32::from(version) << 16);
        self.set_u32(offset, header);
        self.data[offset + EXTENDED_CAPABILITY_HEADER_LEN..end].copy_from_slice(body);
        if let Some(previous) = self.last_extended_capability {
            // Offsets are < 0x1000, so they fit the 12-bit next field.
            let linked = self.read_u32(previous) | ((offset as u32) << 20);
            self.set_u32(previous, linked);
        }
        self.last_extended_capability = Some(offset);
        self.next_extended_capability = end;
        Ok(offset)
    }

    /// Declares BAR `index` (a 64-bit BAR also takes `index + 1`). The register reads back the
    /// type bits and address 0 until [`Self::set_bar_address`] or the guest programs it.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciError> {
        spec.validate()?;
        let is_64 = spec.kind == BarKind::Mem64;
        let slots = if is_64 { 2 } else { 1 };
        let free = index < NUM_BARS
            && (index..index + slots).all(|i| matches!(self.bars.get(i), Some(BarSlot::Unused)));
        if !free {
            return Err(PciError::BarSlotUnavailable(index));
        }
        let register = Self::bar_register(index);
        self.bars[index] = BarSlot::Bar(spec);
        self.set_u32(register, spec.type_bits());
        self.mask_u32(register, spec.low_write_mask());
        if is_64 {
            self.bars[index + 1] = BarSlot::UpperHalf;
            self.set_u32(register + 4, 0);
            self.mask_u32(register + 4, spec.high_write_mask());
        }
        Ok(())
    }

    /// The BAR declared at `index` (`None` if unused or the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<BarSpec> {
        match self.bars.get(index) {
            Some(BarSlot::Bar(spec)) => Some(*spec),
            _ => None,
        }
    }

    /// All declared BARs with their indices.
    pub fn bars(&self) -> impl Iterator<Item = (usize, BarSpec)> + '_ {
        (0..NUM_BARS).filter_map(|i| self.bar(i).map(|spec| (i, spec)))
    }

    /// The address BAR `index` is programmed with (without the type bits).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar(index)?;
        let register = Self::bar_register(index);
        let low = self.read_u32(register);
        Some(match spec.kind {
            BarKind::Io => u64::from(low & !BAR_IO_FLAGS_MASK),
            BarKind::Mem32 => u64::from(low & !BAR_MEM_FLAGS_MASK),
            BarKind::Mem64 => {
                let high = self.read_u32(register + 4);
                (u64::from(high) << 32) | u64::from(low & !BAR_MEM_FLAGS_MASK)
            }
        })
    }

    /// Programs BAR `index` with `address` (device/allocator side).
    pub fn set_bar_address(&mut self, index: usize, address: u64) -> Result<(), PciError> {
        let spec = self.bar(index).ok_or(PciError::NoSuchBar(index))?;
        if !address.is_multiple_of(spec.size) || !spec.can_decode_at(address) {
            return Err(PciError::MisalignedBarAddress {
                address,
                size: spec.size,
            });
        }
        let register = Self::bar_register(index);
        // Truncation keeps the low dword; the high dword is written separately for Mem64.
        self.set_u32(register, (address as u32) | spec.type_bits());
        if spec.kind == BarKind::Mem64 {
            self.set_u32(register + 4, (address >> 32) as u32);
        }
        Ok(())
    }

    /// True while the guest is sizing BAR `index`: one of its registers holds the all-ones probe,
    /// which is no address the guest means to decode at.
    pub fn bar_is_probing(&self, index: usize) -> bool {
        let Some(spec) = self.bar(index) else {
            return false;
        };
        let register = Self::bar_register(index);
        let all_set = |offset: usize, mask: u32| mask != 0 && self.read_u32(offset) & mask == mask;
        let low_probe = all_set(register, spec.low_write_mask());
        let high_probe =
            spec.kind == BarKind::Mem64 && all_set(register + 4, spec.high_write_mask());
        low_probe || high_probe
    }

    /// Whether the command register lets BAR `spec` decode.
    pub fn decodes(&self, spec: &BarSpec) -> bool {
        let bit = if spec.is_io() {
            COMMAND_IO_SPACE
        } else {
            COMMAND_MEMORY_SPACE
        };
        self.command() & bit != 0
    }

    fn bar_register(index: usize) -> usize {
        BAR0 + 4 * index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class_code: 0x0c0330,
            revision_id: 2,
            subsystem_vendor_id: 0xaaaa,
            subsystem_id: 0xbbbb,
        }
    }

    fn guest_size(config: &mut ConfigSpace, register: usize) -> u32 {
        config.write(register, &u32::MAX.to_le_bytes());
        config.read_u32(register)
    }

    #[test]
    fn header_holds_ids() {
        let config = ConfigSpace::new(&ids());

        assert_eq!(config.read_u32(0), 0x5678_1234);
        assert_eq!(config.read_u32(REVISION_ID), 0x0c03_3002);
        assert_eq!(config.read_u32(SUBSYSTEM_VENDOR_ID), 0xbbbb_aaaa);
        assert_eq!(config.read_u8(HEADER_TYPE), 0);
        assert_eq!(config.status() & STATUS_CAPABILITY_LIST, 0);
    }

    #[test]
    fn read_only_fields_ignore_guest_writes() {
        let mut config = ConfigSpace::new(&ids());

        config.write(0, &[0; 64]);

        assert_eq!(config.vendor_id(), 0x1234);
        assert_eq!(config.device_id(), 0x5678);
        config.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(config.command(), COMMAND_WRITABLE);
        config.write(INTERRUPT_LINE, &[0xff, 0xff]);
        assert_eq!(config.read_u8(INTERRUPT_LINE), 0xff);
        assert_eq!(config.read_u8(INTERRUPT_PIN), 0);
    }

    #[test]
    fn status_error_bits_are_write_1_to_clear() {
        let mut config = ConfigSpace::new(&ids());
        config.set_status_bits(0x8000 | 0x1000 | STATUS_CAPABILITY_LIST);

        config.write(STATUS, &0x1000u16.to_le_bytes());

        assert_eq!(config.status(), 0x8000 | STATUS_CAPABILITY_LIST);
        config.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(config.status(), STATUS_CAPABILITY_LIST);
    }

    #[test]
    fn bar_sizing_reads_back_size_mask_with_type_bits() {
        let mut config = ConfigSpace::new(&ids());
        config.add_bar(0, BarSpec::mem32(0x1000)).unwrap();
        config.add_bar(1, BarSpec::io(0x40)).unwrap();
        config
            .add_bar(2, BarSpec::mem64(0x10_0000).prefetchable())
            .unwrap();
        config.add_bar(4, BarSpec::mem64(1 << 34)).unwrap();

        assert_eq!(guest_size(&mut config, 0x10), 0xffff_f000);
        assert_eq!(guest_size(&mut config, 0x14), 0xffff_ffc1);
        assert_eq!(guest_size(&mut config, 0x18), 0xfff0_000c);
        assert_eq!(guest_size(&mut config, 0x1c), 0xffff_ffff);
        assert_eq!(guest_size(&mut config, 0x20), 0x0000_0004);
        assert_eq!(guest_size(&mut config, 0x24), 0xffff_fffc);
        assert_eq!(guest_size(&mut config, 0x30), 0, "no expansion ROM");
    }

    #[test]
    fn unused_bars_read_zero_when_sized() {
        let mut config = ConfigSpace::new(&ids());
        config.add_bar(0, BarSpec::mem64(0x1000)).unwrap();

        assert_eq!(guest_size(&mut config, 0x18), 0);
        assert_eq!(config.bar(1), None, "upper half is not a BAR");
    }

    #[test]
    fn guest_programs_bar_address() {
        let mut config = ConfigSpace::new(&ids());
        config.add_bar(2, BarSpec::mem64(0x4000)).unwrap();

        config.write(0x18, &0x1234_5678u32.to_le_bytes());
        config.write(0x1c, &0x1u32.to_le_bytes());

        assert_eq!(config.bar_address(2), Some(0x1_1234_4000));
        assert_eq!(config.read_u32(0x18), 0x1234_4004);
        assert!(!config.bar_is_probing(2));
        config.write(0x1c, &u32::MAX.to_le_bytes());
        assert!(config.bar_is_probing(2));
    }

    #[test]
    fn add_bar_refuses_taken_or_missing_slots() {
        let mut config = ConfigSpace::new(&ids());
        config.add_bar(1, BarSpec::mem32(0x1000)).unwrap();

        assert!(config.add_bar(0, BarSpec::mem64(0x1000)).is_err());
        assert!(config.add_bar(5, BarSpec::mem64(0x1000)).is_err());
        assert!(config.add_bar(6, BarSpec::mem32(0x1000)).is_err());
        assert!(config.add_bar(usize::MAX, BarSpec::mem32(0x1000)).is_err());
        assert!(config.add_bar(1, BarSpec::io(4)).is_err());
        assert!(config.set_bar_address(1, 0xc000_0800).is_err());
        assert!(config.set_bar_address(3, 0xc000_0000).is_err());
    }

    #[test]
    fn capabilities_are_linked_and_dword_aligned() {
        let mut config = ConfigSpace::new(&ids());

        let first = config.add_capability(0x09, &[1, 2, 3]).unwrap();
        let second = config.add_capability(0x10, &[0; 10]).unwrap();

        assert_eq!(first, 0x40);
        assert_eq!(second, 0x48);
        assert_eq!(config.read_u8(CAPABILITIES_POINTER), 0x40);
        assert_eq!(config.read_u8(first + 1), 0x48);
        assert_eq!(config.read_u8(second + 1), 0);
        assert_eq!(config.read_u8(first + 4), 3);
        assert_ne!(config.status() & STATUS_CAPABILITY_LIST, 0);
    }

    #[test]
    fn capability_overflow_is_refused() {
        let mut config = ConfigSpace::new(&ids());
        config.add_capability(0x09, &[0; 0xb0]).unwrap();

        let err = config.add_capability(0x09, &[0; 0x10]);

        assert!(matches!(err, Err(PciError::CapabilityOverflow { .. })));
        assert_eq!(config.read_u8(0x41), 0, "failed add leaves the list intact");
        assert!(config.add_capability(0x09, &[0; 0x0a]).is_ok());
        assert!(config.add_capability(0x09, &[]).is_err());
    }

    #[test]
    fn extended_capabilities_link_from_0x100() {
        let mut config = ConfigSpace::new(&ids());

        let first = config.add_extended_capability(0x0001, 2, &[0; 8]).unwrap();
        let second = config.add_extended_capability(0x000d, 1, &[0; 4]).unwrap();

        assert_eq!(first, 0x100);
        assert_eq!(second, 0x10c);
        assert_eq!(config.read_u32(first), 0x10c0_0000 | 0x2_0001);
        assert_eq!(config.read_u32(second), 0x1_000d);
        assert!(config.add_extended_capability(1, 1, &[0; 0x1000]).is_err());
        assert!(config.add_extended_capability(1, 0x10, &[]).is_err());
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let mut config = ConfigSpace::new(&ids());
        let mut data = [0u8; 8];

        config.read(CONFIG_SPACE_SIZE - 4, &mut data);
        config.write(usize::MAX - 2, &[1; 8]);
        config.set_bytes(usize::MAX, &[1; 8]);

        assert_eq!(data, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(config
            .set_write_mask(CONFIG_SPACE_SIZE - 1, &[0, 0])
            .is_err());
        assert_eq!(config.read_u32(usize::MAX), u32::MAX);
    }
}
