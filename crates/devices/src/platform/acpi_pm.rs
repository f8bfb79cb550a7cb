//! The ACPI fixed-hardware power-management block: PM1a event and control registers, the PM
//! timer and the reset register, in one port range ([`PM_BLOCK_PORT`]; the FADT and DSDT that
//! advertise it are built from the constants here, re-exported by crates/vmm/src/layout.rs).
//!
//! Written by hand: no rust-vmm crate models ACPI fixed hardware, and it is a few registers.
//!
//! ```text
//! +0x0  PM1a_STS  u16  write 1 to clear: TMR_STS (bit 0), PWRBTN_STS (bit 8), WAK_STS (bit 15)
//! +0x2  PM1a_EN   u16  TMR_EN, PWRBTN_EN
//! +0x4  PM1a_CNT  u16  SCI_EN (bit 0, reads 1), SLP_TYP (bits 12:10), SLP_EN (bit 13, write-only)
//! +0x8  PM_TMR    u32  24-bit free-running counter at 3.579545 MHz, read-only
//! +0xc  RESET     u8   writing the FADT RESET_VALUE (6) resets
//! ```
//!
//! SCI_EN always reads 1: sluice has no SMM firmware to hand the hardware over, so the FADT
//! advertises no SMI_CMD port and the platform is in ACPI mode from power-on, which ACPI says
//! must show as SCI_EN set. Writing SLP_EN with SLP_TYP = 5 (the DSDT's `\_S5`) powers off;
//! other sleep states are not supported and are ignored with a log. Registers may be accessed
//! with any width and alignment: each byte of an access is routed to the register owning it.
//!
//! TMR_STS is evaluated when the status register is read (no SCI is raised for it); the power
//! button ([`AcpiPmBlock::press_power_button`]) raises the SCI when the guest enabled it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_bus::irq::IrqLine;
use sluice_bus::BusDevice;

use super::clock::MonotonicClock;
use crate::{ExitSink, GuestExit};

/// Base port and length. 0xcf9 (a common reset port) is avoided: it overlaps CONFIG_ADDRESS.
pub const PM_BLOCK_PORT: u16 = 0x600;
pub const PM_BLOCK_LEN: u16 = 0x10;
/// The registers' ports, as the FADT advertises them.
pub const PM1A_EVT_PORT: u16 = PM_BLOCK_PORT + PM1_STATUS.offset as u16;
pub const PM1A_CNT_PORT: u16 = PM_BLOCK_PORT + PM1_CONTROL.offset as u16;
pub const PM_TMR_PORT: u16 = PM_BLOCK_PORT + PM_TIMER.offset as u16;
pub const ACPI_RESET_PORT: u16 = PM_BLOCK_PORT + RESET.offset as u16;
/// Value the FADT advertises for RESET_REG.
pub const ACPI_RESET_VALUE: u8 = 0x6;
/// SLP_TYP for S5 advertised in the DSDT `\_S5` package.
pub const S5_SLEEP_TYPE: u8 = 5;
/// PM timer frequency fixed by the ACPI specification.
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// A register of the block: offset and width in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Register {
    offset: u64,
    width: u64,
}

const PM1_STATUS: Register = Register {
    offset: 0x0,
    width: 2,
};
const PM1_ENABLE: Register = Register {
    offset: 0x2,
    width: 2,
};
const PM1_CONTROL: Register = Register {
    offset: 0x4,
    width: 2,
};
const PM_TIMER: Register = Register {
    offset: 0x8,
    width: 4,
};
const RESET: Register = Register {
    offset: 0xc,
    width: 1,
};
const REGISTERS: [Register; 5] = [PM1_STATUS, PM1_ENABLE, PM1_CONTROL, PM_TIMER, RESET];

const STATUS_TIMER: u16 = 1 << 0;
const STATUS_POWER_BUTTON: u16 = 1 << 8;
const STATUS_WAKE: u16 = 1 << 15;
const STATUS_BITS: u16 = STATUS_TIMER | STATUS_POWER_BUTTON | STATUS_WAKE;
const ENABLE_BITS: u16 = STATUS_TIMER | STATUS_POWER_BUTTON;

const CONTROL_SCI_ENABLE: u16 = 1 << 0;
const CONTROL_BUS_MASTER_RELOAD: u16 = 1 << 1;
const CONTROL_SLEEP_TYPE_SHIFT: u16 = 10;
const CONTROL_SLEEP_TYPE_MASK: u16 = 0x7 << CONTROL_SLEEP_TYPE_SHIFT;
const CONTROL_SLEEP_ENABLE: u16 = 1 << 13;
/// Bits that hold a value; GBL_RLS and SLP_EN are write-only triggers.
const CONTROL_STORED_BITS: u16 = CONTROL_BUS_MASTER_RELOAD | CONTROL_SLEEP_TYPE_MASK;

const TIMER_MASK: u64 = (1 << 24) - 1;
const TIMER_MSB_SHIFT: u64 = 23;
const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The PM block model.
pub struct AcpiPmBlock {
    exit: Arc<dyn ExitSink>,
    sci: Option<Arc<dyn IrqLine>>,
    clock: Box<dyn MonotonicClock>,
    status: u16,
    enable: u16,
    control: u16,
    /// How many times timer bit 23 had toggled when TMR_STS was last evaluated.
    timer_msb_toggles: u64,
    sci_error_logged: bool,
}

impl BusDevice for AcpiPmBlock {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.note_timer_toggles();
        let values = self.register_values();
        for (addr, byte) in (offset..).zip(data.iter_mut()) {
            *byte = register_byte(&values, addr);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for register in REGISTERS {
            if let Some((mask, value)) = bytes_for(register, offset, data) {
                self.write_register(register, mask, value);
            }
        }
    }
}

/// The PM1 registers the guest set, for a snapshot. The PM timer is not carried: it counts from
/// the restored process's start, and a guest sees it jump as after any long pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmRegisters {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

impl AcpiPmBlock {
    /// A PM block reporting power-off and reset to `exit`, timing with `clock`, and raising the
    /// SCI (IRQ 9) on `sci` if the VMM wires it.
    pub fn new(
        exit: Arc<dyn ExitSink>,
        sci: Option<Arc<dyn IrqLine>>,
        clock: Box<dyn MonotonicClock>,
    ) -> Self {
        let mut block = Self {
            exit,
            sci,
            clock,
            status: 0,
            enable: 0,
            control: 0,
            timer_msb_toggles: 0,
            sci_error_logged: false,
        };
        block.timer_msb_toggles = block.timer_ticks() >> TIMER_MSB_SHIFT;
        block
    }

    /// The PM1 registers (the VM is paused).
    pub fn save_registers(&self) -> AcpiPmRegisters {
        AcpiPmRegisters {
            status: self.status,
            enable: self.enable,
            control: self.control,
        }
    }

    /// Puts back what [`AcpiPmBlock::save_registers`] returned, keeping only the bits the
    /// registers hold; an event pending and enabled raises the SCI again.
    pub fn restore_registers(&mut self, saved: &AcpiPmRegisters) {
        self.status = saved.status & STATUS_BITS;
        self.enable = saved.enable & ENABLE_BITS;
        self.control = saved.control & CONTROL_STORED_BITS;
        self.raise_sci_if_pending();
    }

    /// Signals a power-button press (e.g. an API "shutdown" request): the guest's ACPI driver
    /// sees PWRBTN_STS and, if it enabled the event, gets an SCI.
    pub fn press_power_button(&mut self) {
        self.status |= STATUS_POWER_BUTTON;
        self.raise_sci_if_pending();
    }

    /// Ticks of the 3.579545 MHz timer since the clock's origin (not truncated to 24 bits).
    fn timer_ticks(&self) -> u64 {
        let nanos = self.clock.elapsed().as_nanos();
        let ticks = nanos.saturating_mul(u128::from(PM_TIMER_HZ)) / NANOS_PER_SEC;
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// Sets TMR_STS if timer bit 23 toggled since last checked.
    fn note_timer_toggles(&mut self) {
        let toggles = self.timer_ticks() >> TIMER_MSB_SHIFT;
        if toggles != self.timer_msb_toggles {
            self.timer_msb_toggles = toggles;
            self.status |= STATUS_TIMER;
        }
    }

    /// Register values in `REGISTERS` order, as the guest reads them.
    fn register_values(&self) -> [u32; 5] {
        [
            self.status.into(),
            self.enable.into(),
            (self.control | CONTROL_SCI_ENABLE).into(),
            // Masked to 24 bits, so it fits.
            (self.timer_ticks() & TIMER_MASK) as u32,
            // The reset register is write-only; reads return 0.
            0,
        ]
    }

    fn write_register(&mut self, register: Register, mask: u32, value: u32) {
        // PM1 registers are 16 bits wide, so their masks and values are too.
        let (mask16, value16) = (mask as u16, value as u16);
        match register {
            PM1_STATUS => self.status &= !(value16 & mask16 & STATUS_BITS),
            PM1_ENABLE => {
                self.enable = ((self.enable & !mask16) | (value16 & mask16)) & ENABLE_BITS;
                self.raise_sci_if_pending();
            }
            PM1_CONTROL => self.write_control(mask16, value16),
            RESET if value == u32::from(ACPI_RESET_VALUE) => {
                tracing::info!("guest requested reset through the ACPI reset register");
                self.exit.request_exit(GuestExit::Reset);
            }
            _ => tracing::debug!(?register, value, "ignored ACPI PM write"),
        }
    }

    fn write_control(&mut self, mask: u16, value: u16) {
        let merged = (self.control & !mask) | (value & mask);
        self.control = merged & CONTROL_STORED_BITS;
        if value & mask & CONTROL_SLEEP_ENABLE == 0 {
            return;
        }
        let sleep_type = (merged & CONTROL_SLEEP_TYPE_MASK) >> CONTROL_SLEEP_TYPE_SHIFT;
        if sleep_type == u16::from(S5_SLEEP_TYPE) {
            tracing::info!("guest entered S5: power off");
            self.exit.request_exit(GuestExit::PowerOff);
        } else {
            tracing::warn!(
                sleep_type,
                "guest asked for an unsupported sleep state; ignored"
            );
        }
    }

    fn raise_sci_if_pending(&mut self) {
        if self.status & self.enable == 0 {
            return;
        }
        let Some(sci) = &self.sci else {
            return;
        };
        if let Err(e) = sci.trigger() {
            if !self.sci_error_logged {
                self.sci_error_logged = true;
                tracing::warn!("SCI injection failed, further failures not logged: {e}");
            }
        }
    }
}

/// The byte at block offset `addr`, or all ones where no register lives.
fn register_byte(values: &[u32; 5], addr: u64) -> u8 {
    REGISTERS
        .iter()
        .zip(values)
        .find(|(reg, _)| addr >= reg.offset && addr - reg.offset < reg.width)
        .map_or(0xff, |(reg, value)| {
            let shift = (addr - reg.offset) * 8;
            (value >> shift) as u8
        })
}

/// The bytes of an access at `offset` that fall in `register`, as (byte mask, value) in the
/// register's own bit positions; `None` if the access misses it.
fn bytes_for(register: Register, offset: u64, data: &[u8]) -> Option<(u32, u32)> {
    let mut mask = 0u32;
    let mut value = 0u32;
    for (addr, byte) in (offset..).zip(data) {
        if addr >= register.offset && addr - register.offset < register.width {
            let shift = (addr - register.offset) * 8;
            mask |= 0xff << shift;
            value |= u32::from(*byte) << shift;
        }
    }
    (mask != 0).then_some((mask, value))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::platform::clock::ManualClock;
    use crate::platform::testing::{fuzz_device, RecordingExitSink, RecordingIrq};

    const BASE: u64 = PM_BLOCK_PORT as u64;

    struct Fixture {
        pm: AcpiPmBlock,
        exits: Arc<RecordingExitSink>,
        sci: Arc<RecordingIrq>,
        clock: ManualClock,
    }

    fn fixture() -> Fixture {
        let exits = RecordingExitSink::new();
        let sci = RecordingIrq::new();
        let clock = ManualClock::default();
        let pm = AcpiPmBlock::new(exits.clone(), Some(sci.clone()), Box::new(clock.clone()));
        Fixture {
            pm,
            exits,
            sci,
            clock,
        }
    }

    fn read16(pm: &mut AcpiPmBlock, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        pm.read(BASE, offset, &mut data);
        u16::from_le_bytes(data)
    }

    fn read_timer(pm: &mut AcpiPmBlock) -> u32 {
        let mut data = [0u8; 4];
        pm.read(BASE, PM_TIMER.offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write16(pm: &mut AcpiPmBlock, offset: u64, value: u16) {
        pm.write(BASE, offset, &value.to_le_bytes());
    }

    fn sleep_command(sleep_type: u16) -> u16 {
        (sleep_type << CONTROL_SLEEP_TYPE_SHIFT) | CONTROL_SLEEP_ENABLE
    }

    #[test]
    fn s5_sleep_powers_off() {
        let mut f = fixture();

        write16(&mut f.pm, PM1_CONTROL.offset, sleep_command(5));

        assert_eq!(f.exits.exits(), vec![GuestExit::PowerOff]);
    }

    #[test]
    fn other_sleep_types_do_nothing() {
        let mut f = fixture();

        for sleep_type in [0, 1, 2, 3, 4, 6, 7] {
            write16(&mut f.pm, PM1_CONTROL.offset, sleep_command(sleep_type));
        }
        // SLP_TYP = 5 without SLP_EN only selects the state.
        write16(&mut f.pm, PM1_CONTROL.offset, 5 << CONTROL_SLEEP_TYPE_SHIFT);

        assert!(f.exits.exits().is_empty());
    }

    #[test]
    fn s5_split_into_byte_writes_powers_off() {
        let mut f = fixture();
        let [low, high] = sleep_command(5).to_le_bytes();

        f.pm.write(BASE, PM1_CONTROL.offset, &[low]);
        f.pm.write(BASE, PM1_CONTROL.offset + 1, &[high]);

        assert_eq!(f.exits.exits(), vec![GuestExit::PowerOff]);
    }

    #[test]
    fn sci_enable_always_reads_one_and_slp_en_reads_zero() {
        let mut f = fixture();

        write16(&mut f.pm, PM1_CONTROL.offset, 3 << CONTROL_SLEEP_TYPE_SHIFT);
        let control = read16(&mut f.pm, PM1_CONTROL.offset);

        assert_eq!(
            control,
            (3 << CONTROL_SLEEP_TYPE_SHIFT) | CONTROL_SCI_ENABLE
        );
    }

    #[test]
    fn status_is_write_one_to_clear() {
        let mut f = fixture();
        f.pm.press_power_button();

        write16(&mut f.pm, PM1_STATUS.offset, 0);
        let after_zero = read16(&mut f.pm, PM1_STATUS.offset);
        write16(&mut f.pm, PM1_STATUS.offset, STATUS_POWER_BUTTON);
        let after_one = read16(&mut f.pm, PM1_STATUS.offset);

        assert_eq!(after_zero, STATUS_POWER_BUTTON);
        assert_eq!(after_one, 0);
    }

    #[test]
    fn power_button_raises_sci_only_when_enabled() {
        let mut f = fixture();

        f.pm.press_power_button();
        let while_disabled = f.sci.count();
        write16(&mut f.pm, PM1_ENABLE.offset, STATUS_POWER_BUTTON);

        assert_eq!(while_disabled, 0);
        assert_eq!(f.sci.count(), 1, "enabling a pending event raises the SCI");
        assert_eq!(read16(&mut f.pm, PM1_ENABLE.offset), STATUS_POWER_BUTTON);
    }

    #[test]
    fn timer_counts_at_3_579545_mhz_and_increases() {
        let mut f = fixture();
        f.clock.set(Duration::from_secs(1));

        let first = read_timer(&mut f.pm);
        f.clock.advance(Duration::from_millis(1));
        let second = read_timer(&mut f.pm);

        assert_eq!(first, 3_579_545);
        assert!(second > first);
        assert!((3579..=3580).contains(&(second - first)));
    }

    #[test]
    fn timer_wraps_at_24_bits_and_sets_tmr_sts() {
        let mut f = fixture();
        f.clock.set(Duration::from_millis(4600));
        let before = read_timer(&mut f.pm);
        let status_before = read16(&mut f.pm, PM1_STATUS.offset);
        write16(&mut f.pm, PM1_STATUS.offset, STATUS_TIMER);
        let status_cleared = read16(&mut f.pm, PM1_STATUS.offset);

        f.clock.set(Duration::from_millis(4800));
        let after = read_timer(&mut f.pm);
        let status_after = read16(&mut f.pm, PM1_STATUS.offset);

        // 4.6 s and 4.8 s of ticks, the latter past 2^24.
        assert_eq!(before, 16_465_907);
        assert_eq!(after, 17_181_816 - (1 << 24));
        assert_eq!(
            status_before & STATUS_TIMER,
            STATUS_TIMER,
            "bit 23 rose by 4.6 s"
        );
        assert_eq!(status_cleared & STATUS_TIMER, 0);
        assert_eq!(
            status_after & STATUS_TIMER,
            STATUS_TIMER,
            "bit 23 fell at the wrap"
        );
    }

    #[test]
    fn timer_is_read_only() {
        let mut f = fixture();
        f.clock.set(Duration::from_secs(2));

        f.pm.write(BASE, PM_TIMER.offset, &[0; 4]);

        assert_eq!(read_timer(&mut f.pm), 7_159_090);
    }

    #[test]
    fn reset_register_resets_only_with_reset_value() {
        let mut f = fixture();

        f.pm.write(BASE, RESET.offset, &[5]);
        f.pm.write(BASE, RESET.offset, &[ACPI_RESET_VALUE]);

        assert_eq!(f.exits.exits(), vec![GuestExit::Reset]);
    }

    #[test]
    fn unused_bytes_read_all_ones() {
        let mut f = fixture();

        let gap = read16(&mut f.pm, 0x6);
        let tail = read16(&mut f.pm, 0xe);

        assert_eq!((gap, tail), (0xffff, 0xffff));
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let mut f = fixture();

        fuzz_device(&mut f.pm, BASE, PM_BLOCK_LEN.into(), 50_000);
        f.clock.set(Duration::MAX);
        fuzz_device(&mut f.pm, BASE, PM_BLOCK_LEN.into(), 5_000);
    }
}
