//! The 82540EM's internal copper PHY (a Marvell 88E1011 core, PHY address 1), reached through
//! MDIC. The link to the tap is always up at 1000 Mb/s full duplex, so the model reports
//! autonegotiation as complete as soon as it is (re)started; registers the drivers configure
//! (advertisement, 1000BASE-T control, the Marvell specific control registers) keep what they
//! are written, the status and identity registers are read-only.

/// The only PHY address that answers on the MDIO bus.
pub const PHY_ADDRESS: u32 = 1;
pub const REGISTERS: usize = 32;

const CONTROL: usize = 0;
const STATUS: usize = 1;
const ID1: usize = 2;
const ID2: usize = 3;
const AUTONEG_ADV: usize = 4;
const LP_ABILITY: usize = 5;
const AUTONEG_EXP: usize = 6;
const GBIT_CONTROL: usize = 9;
const GBIT_STATUS: usize = 10;
const EXT_STATUS: usize = 15;
const M88_SPEC_CONTROL: usize = 16;
const M88_SPEC_STATUS: usize = 17;
const M88_EXT_SPEC_CONTROL: usize = 20;

const CONTROL_RESET: u16 = 1 << 15;
const CONTROL_RESTART_AUTONEG: u16 = 1 << 9;
pub const STATUS_LINK: u16 = 1 << 2;
pub const STATUS_AUTONEG_COMPLETE: u16 = 1 << 5;

/// Registers a write cannot change.
const READ_ONLY: [usize; 9] = [
    STATUS,
    ID1,
    ID2,
    LP_ABILITY,
    AUTONEG_EXP,
    GBIT_STATUS,
    EXT_STATUS,
    M88_SPEC_STATUS,
    // Reserved / vendor registers that only read.
    18,
];

fn defaults() -> [u16; REGISTERS] {
    let mut r = [0u16; REGISTERS];
    // Autonegotiation on, full duplex, speed bits "1000".
    r[CONTROL] = 0x1140;
    // 10/100 capable, extended status, preamble suppression, autoneg complete and able,
    // link up, extended capabilities.
    r[STATUS] = 0x796d;
    // M88E1011_I_PHY_ID 0x01410c20, revision 0.
    r[ID1] = 0x0141;
    r[ID2] = 0x0c20;
    r[AUTONEG_ADV] = 0x0de1;
    // Partner: 10/100 half and full duplex, acknowledge, IEEE 802.3 selector.
    r[LP_ABILITY] = 0x41e1;
    r[AUTONEG_EXP] = 0x0001;
    r[GBIT_CONTROL] = 0x0e00;
    // Partner 1000BASE-T full and half duplex, local and remote receiver OK.
    r[GBIT_STATUS] = 0x3c00;
    r[EXT_STATUS] = 0x3000;
    r[M88_SPEC_CONTROL] = 0x0068;
    // 1000 Mb/s, full duplex, speed and duplex resolved, link up.
    r[M88_SPEC_STATUS] = 0xac00;
    r[M88_EXT_SPEC_CONTROL] = 0x0d60;
    r
}

#[derive(Debug, Clone)]
pub struct Phy {
    registers: [u16; REGISTERS],
}

impl Default for Phy {
    fn default() -> Self {
        Self {
            registers: defaults(),
        }
    }
}

impl Phy {
    /// Every register, for a snapshot.
    pub fn registers(&self) -> Vec<u16> {
        self.registers.to_vec()
    }

    /// A PHY with the registers a snapshot saved (all [`REGISTERS`] of them).
    pub fn from_registers(saved: &[u16]) -> Result<Self, String> {
        let registers = saved
            .try_into()
            .map_err(|_| format!("{} PHY registers saved, not {REGISTERS}", saved.len()))?;
        Ok(Self { registers })
    }

    /// Register `index` (0..32; others read 0).
    pub fn read(&self, index: usize) -> u16 {
        self.registers.get(index).copied().unwrap_or(0)
    }

    /// A driver write of `value` to register `index`.
    pub fn write(&mut self, index: usize, value: u16) {
        if index >= REGISTERS || READ_ONLY.contains(&index) {
            return;
        }
        if index == CONTROL {
            if value & CONTROL_RESET != 0 {
                // Reset restores the defaults; the bit clears itself.
                *self = Self::default();
                self.registers[CONTROL] = value & !(CONTROL_RESET | CONTROL_RESTART_AUTONEG);
                return;
            }
            // Restart completes at once: the tap's link has nothing to negotiate.
            self.registers[CONTROL] = value & !CONTROL_RESTART_AUTONEG;
            self.registers[STATUS] |= STATUS_AUTONEG_COMPLETE | STATUS_LINK;
            return;
        }
        self.registers[index] = value;
    }
}
