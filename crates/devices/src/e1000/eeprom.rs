//! The 82540EM's serial EEPROM: 64 16-bit words (EECD.EE_SIZE clear), read two ways —
//! the EERD register (one word per write) and Microwire bit-banging through EECD, which is
//! what Linux's e1000 driver uses for this MAC type (it does not use EERD before the 82573).
//!
//! Contents: the MAC address in words 0..=2, the PCI ids in words 0x0b..=0x0e, init control
//! words, and the checksum word 0x3f chosen so that words 0..=0x3f sum to 0xBABA (the value
//! the drivers check). Writes (Microwire WRITE/ERASE opcodes) are not supported: the EEPROM is
//! read-only, so those commands are ignored.

use serde::{Deserialize, Serialize};

use super::regs::{EECD_CS, EECD_DI, EECD_DO, EECD_SK};

pub const WORDS: usize = 64;
/// The sum of all words, checksum included, that the drivers expect.
pub const CHECKSUM_TARGET: u16 = 0xbaba;
const CHECKSUM_WORD: usize = WORDS - 1;
/// Microwire READ opcode (after the start bit): binary 10.
const OPCODE_READ: u32 = 0b10;
/// Address bits of a 64-word Microwire EEPROM.
const ADDRESS_BITS: u32 = 6;
/// Start bit + 2 opcode bits + address bits.
const COMMAND_BITS: u32 = 1 + 2 + ADDRESS_BITS;

/// Where a Microwire transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Wire {
    /// Waiting for the start bit (leading zeros are allowed).
    Idle,
    /// Shifting in the command: `bits` bits so far (start bit included) in `value`.
    Command { bits: u32, value: u32 },
    /// Shifting out word `address` (then the next ones): `bit` bits of it already shown.
    Reading { address: usize, bit: u32 },
    /// An unsupported command: ignore clocks until CS drops.
    Ignoring,
}

/// The EEPROM contents plus the Microwire state.
#[derive(Debug, Clone)]
pub struct Eeprom {
    words: [u16; WORDS],
    wire: Wire,
    /// EECD bits as last written (SK, CS, DI) and the DO the EEPROM drives.
    last_eecd: u32,
    data_out: bool,
}

/// The Microwire transaction in progress, for a snapshot (the words follow from the MAC and
/// the ids, so they are not saved).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WireState {
    wire: Wire,
    last_eecd: u32,
    data_out: bool,
}

impl Eeprom {
    /// The image for a NIC with address `mac` and PCI ids `vendor:device`.
    pub fn new(mac: [u8; 6], vendor: u16, device: u16, subsystem: u16) -> Self {
        let mut words = [0u16; WORDS];
        for (i, pair) in mac.chunks(2).enumerate() {
            words[i] = u16::from_le_bytes([pair[0], pair[1]]);
        }
        // Compatibility / ID LED word: 0xffff means "use the default LED settings".
        words[0x04] = 0xffff;
        // Initialization control 1: EEPROM signature 01b in bits 15:14 ("valid image").
        words[0x0a] = 0x4408;
        words[0x0b] = subsystem;
        words[0x0c] = vendor;
        words[0x0d] = device;
        words[0x0e] = vendor;
        // Initialization control 2: symmetric and asymmetric pause advertised off.
        words[0x0f] = 0x0000;
        let sum = words[..CHECKSUM_WORD]
            .iter()
            .fold(0u16, |acc, &w| acc.wrapping_add(w));
        words[CHECKSUM_WORD] = CHECKSUM_TARGET.wrapping_sub(sum);
        Self {
            words,
            wire: Wire::Idle,
            last_eecd: 0,
            data_out: true,
        }
    }

    /// Word `address`, or `None` past the end.
    pub fn word(&self, address: usize) -> Option<u16> {
        self.words.get(address).copied()
    }

    pub fn wire_state(&self) -> WireState {
        WireState {
            wire: self.wire,
            last_eecd: self.last_eecd,
            data_out: self.data_out,
        }
    }

    /// Puts back a saved transaction; one no EEPROM could be in is refused.
    pub fn set_wire_state(&mut self, state: WireState) -> Result<(), String> {
        let possible = match state.wire {
            Wire::Idle | Wire::Ignoring => true,
            Wire::Command { bits, value } => {
                (1..COMMAND_BITS).contains(&bits) && u64::from(value) < 1u64 << bits
            }
            Wire::Reading { address, bit } => address < WORDS && bit < 16,
        };
        if !possible {
            return Err(format!("impossible EEPROM state {:?}", state.wire));
        }
        self.wire = state.wire;
        self.last_eecd = state.last_eecd & (EECD_SK | EECD_CS | EECD_DI);
        self.data_out = state.data_out;
        Ok(())
    }

    /// The sum the drivers compute over every word.
    pub fn checksum(&self) -> u16 {
        self.words.iter().fold(0u16, |acc, &w| acc.wrapping_add(w))
    }

    /// The EECD bits the EEPROM side supplies on a read: the driver's SK/CS/DI echoed and DO.
    pub fn eecd_bits(&self) -> u32 {
        let wire = self.last_eecd & (EECD_SK | EECD_CS | EECD_DI);
        if self.data_out {
            wire | EECD_DO
        } else {
            wire
        }
    }

    /// The driver wrote EECD: follows CS and SK edges and shifts DI in / DO out.
    pub fn write_eecd(&mut self, value: u32) {
        let rising_clock = value & EECD_SK != 0 && self.last_eecd & EECD_SK == 0;
        self.last_eecd = value;
        if value & EECD_CS == 0 {
            self.wire = Wire::Idle;
            self.data_out = true;
            return;
        }
        if rising_clock {
            self.clock(value & EECD_DI != 0);
        }
    }

    fn clock(&mut self, data_in: bool) {
        self.wire = match self.wire {
            Wire::Idle if data_in => Wire::Command { bits: 1, value: 1 },
            Wire::Idle => Wire::Idle,
            Wire::Command { bits, value } => {
                let value = (value << 1) | u32::from(data_in);
                let bits = bits + 1;
                if bits < COMMAND_BITS {
                    Wire::Command { bits, value }
                } else if (value >> ADDRESS_BITS) & 0b11 == OPCODE_READ {
                    // The EEPROM drives a dummy 0 right after the address.
                    self.data_out = false;
                    Wire::Reading {
                        address: (value & ((1 << ADDRESS_BITS) - 1)) as usize,
                        bit: 0,
                    }
                } else {
                    Wire::Ignoring
                }
            }
            Wire::Reading { address, bit } => {
                let word = self.words[address % WORDS];
                self.data_out = (word >> (15 - bit)) & 1 != 0;
                // Sequential read: after 16 bits the next word follows.
                if bit == 15 {
                    Wire::Reading {
                        address: (address + 1) % WORDS,
                        bit: 0,
                    }
                } else {
                    Wire::Reading {
                        address,
                        bit: bit + 1,
                    }
                }
            }
            Wire::Ignoring => Wire::Ignoring,
        };
    }
}
