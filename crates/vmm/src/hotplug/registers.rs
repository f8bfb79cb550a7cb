//! The PCI hot-plug register block the DSDT's AML reads and writes (`layout::HOTPLUG_PORT`,
//! 16 bytes of I/O space, 32-bit accesses only). One bit per slot of bus 0 (bit 0, the host
//! bridge, is never set):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x0 | `PCIU` | read, clears | slots whose device was inserted since the last read |
//! | 0x4 | `PCID` | read, clears | slots whose device the host asks the guest to eject |
//! | 0x8 | `PCEJ` | write | the guest's `_EJ0`: eject (remove) the devices of these slots |
//! | 0xc | `PCPR` | read | slots holding a device sluice can remove (boot-time or hot-plugged virtio) |
//!
//! The block is guest input: an access of another width or offset reads all ones and is
//! counted; an eject bit for the host bridge, an empty slot or a slot above 31 is ignored and
//! counted. Pure state here; `super::Hotplug` does the removal and raises the interrupt.

use serde::Serialize;

/// Bytes of I/O space the block decodes.
pub const HOTPLUG_BLOCK_LEN: u64 = 16;
pub const PCIU_OFFSET: u64 = 0x0;
pub const PCID_OFFSET: u64 = 0x4;
pub const PCEJ_OFFSET: u64 = 0x8;
pub const PCPR_OFFSET: u64 = 0xc;
/// The host bridge's slot: never inserted, ejected or reported.
const HOST_BRIDGE_BIT: u32 = 1;

/// What the guest did wrong or right with the block, for `vm.counters`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HotplugCounters {
    pub insertions: u64,
    pub eject_requests: u64,
    pub ejects: u64,
    /// Eject bits naming the host bridge or an empty slot.
    pub ejects_ignored: u64,
    /// Accesses of a width other than 4 bytes, at a bad offset, or writes to read-only words.
    pub bad_accesses: u64,
}

/// The slot bitmaps.
#[derive(Debug, Default)]
pub struct HotplugRegisters {
    inserted: u32,
    eject_requested: u32,
    present: u32,
    counters: HotplugCounters,
}

fn slot_bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0) & !HOST_BRIDGE_BIT
}

impl HotplugRegisters {
    /// A device was in `slot` when the guest booted (no event).
    pub fn present_at_boot(&mut self, slot: u8) {
        self.present |= slot_bit(slot);
    }

    /// A device was put into `slot`: reported to the guest at its next `PCIU` read.
    pub fn inserted(&mut self, slot: u8) {
        let bit = slot_bit(slot);
        self.present |= bit;
        self.inserted |= bit;
        self.eject_requested &= !bit;
        self.counters.insertions += 1;
    }

    /// The host asks the guest to eject the device in `slot`; false if the slot is empty.
    pub fn request_eject(&mut self, slot: u8) -> bool {
        let bit = slot_bit(slot);
        if self.present & bit == 0 {
            return false;
        }
        self.eject_requested |= bit;
        self.inserted &= !bit;
        self.counters.eject_requests += 1;
        true
    }

    /// Guest read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (PCIU_OFFSET, 4) => std::mem::take(&mut self.inserted),
            (PCID_OFFSET, 4) => std::mem::take(&mut self.eject_requested),
            (PCEJ_OFFSET, 4) => 0,
            (PCPR_OFFSET, 4) => self.present,
            _ => {
                self.counters.bad_accesses += 1;
                data.fill(0xff);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Guest write; returns the slots whose devices the guest ejected (to be removed now).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<u8> {
        let value = match (offset, <[u8; 4]>::try_from(data)) {
            (PCEJ_OFFSET, Ok(bytes)) => u32::from_le_bytes(bytes),
            _ => {
                self.counters.bad_accesses += 1;
                return Vec::new();
            }
        };
        let valid = value & self.present;
        self.counters.ejects_ignored += u64::from((value & !valid).count_ones());
        self.present &= !valid;
        self.inserted &= !valid;
        self.eject_requested &= !valid;
        self.counters.ejects += u64::from(valid.count_ones());
        (0u8..32)
            .filter(|&slot| valid & slot_bit(slot) != 0)
            .collect()
    }

    pub fn counters(&self) -> HotplugCounters {
        self.counters
    }

    /// Slots holding a device, as the guest reads `PCPR`.
    pub fn present(&self) -> u32 {
        self.present
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(regs: &mut HotplugRegisters, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        regs.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn an_insertion_is_reported_once_and_marks_the_slot_present() {
        let mut regs = HotplugRegisters::default();
        regs.inserted(3);

        assert_eq!(read32(&mut regs, PCIU_OFFSET), 1 << 3);
        assert_eq!(read32(&mut regs, PCIU_OFFSET), 0, "PCIU clears on read");
        assert_eq!(read32(&mut regs, PCPR_OFFSET), 1 << 3);
        assert_eq!(regs.counters().insertions, 1);
    }

    #[test]
    fn an_eject_request_is_reported_and_the_guest_eject_frees_the_slot() {
        let mut regs = HotplugRegisters::default();
        regs.present_at_boot(2);
        assert!(regs.request_eject(2));

        assert_eq!(read32(&mut regs, PCID_OFFSET), 1 << 2);
        assert_eq!(read32(&mut regs, PCID_OFFSET), 0, "PCID clears on read");
        assert_eq!(regs.write(PCEJ_OFFSET, &(1u32 << 2).to_le_bytes()), vec![2]);
        assert_eq!(read32(&mut regs, PCPR_OFFSET), 0);
        assert_eq!(regs.counters().ejects, 1);
        assert_eq!(
            regs.write(PCEJ_OFFSET, &(1u32 << 2).to_le_bytes()),
            Vec::<u8>::new(),
            "a second eject of the now empty slot does nothing"
        );
        assert_eq!(regs.counters().ejects_ignored, 1);
    }

    #[test]
    fn an_eject_request_for_an_empty_slot_is_refused() {
        let mut regs = HotplugRegisters::default();

        assert!(!regs.request_eject(5));
        assert_eq!(read32(&mut regs, PCID_OFFSET), 0);
    }

    #[test]
    fn eject_bits_for_the_host_bridge_and_empty_slots_are_ignored_and_counted() {
        let mut regs = HotplugRegisters::default();
        regs.present_at_boot(0);
        regs.present_at_boot(4);

        let ejected = regs.write(PCEJ_OFFSET, &u32::MAX.to_le_bytes());

        assert_eq!(ejected, vec![4], "only the occupied slot");
        assert_eq!(regs.counters().ejects_ignored, 31);
        assert_eq!(read32(&mut regs, PCPR_OFFSET), 0);
    }

    #[test]
    fn bad_widths_offsets_and_read_only_writes_are_counted_and_change_nothing() {
        let mut regs = HotplugRegisters::default();
        regs.inserted(6);
        let mut byte = [0u8; 1];
        regs.read(PCIU_OFFSET, &mut byte);
        assert_eq!(byte, [0xff]);
        let mut word = [0u8; 4];
        regs.read(0x10, &mut word);
        assert_eq!(word, [0xff; 4]);
        assert!(regs.write(PCEJ_OFFSET, &[0x40]).is_empty());
        assert!(regs.write(PCIU_OFFSET, &[0; 4]).is_empty());
        assert!(regs.write(u64::MAX, &[0; 8]).is_empty());

        assert_eq!(regs.counters().bad_accesses, 5);
        assert_eq!(read32(&mut regs, PCIU_OFFSET), 1 << 6, "still pending");
        assert_eq!(regs.present(), 1 << 6);
    }

    #[test]
    fn a_reinsertion_cancels_a_pending_eject_request() {
        let mut regs = HotplugRegisters::default();
        regs.present_at_boot(7);
        regs.request_eject(7);
        regs.inserted(7);

        assert_eq!(read32(&mut regs, PCID_OFFSET), 0);
        assert_eq!(read32(&mut regs, PCIU_OFFSET), 1 << 7);
    }
}
