//! Legacy INTx: a level-triggered interrupt pin per function, for devices whose driver does not
//! enable MSI-X (virtio-pci fallback) or that have nothing else (e1000).
//!
//! * [`PciIntx`] is the device's pin with ISR-style cause bits: [`PciIntx::raise`] sets causes
//!   and asserts the line, [`PciIntx::take`] (the driver's read of an ISR / ICR register) returns
//!   and clears them and deasserts. The line is high while causes are pending, unless the guest
//!   set Interrupt Disable in the command register or the function uses MSI/MSI-X (PCI 3.0
//!   §6.8: a function with MSI-X enabled must not assert INTx). Causes survive those gates, so
//!   the line comes back when they open again.
//! * [`IntxRouting`] maps a root-bus slot's INTA..INTD to IOAPIC GSIs with the usual swizzle
//!   (pin + slot, modulo the GSIs reserved for PCI); the root uses it to connect each pin and
//!   fill the interrupt line register, and the DSDT's `_PRT` is generated from the same mapping.
//!
//! Hand-written like the rest of the crate (see the crate docs).

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use sluice_bus::irq::LevelIrqLine;

use crate::config::{ConfigSpace, COMMAND, COMMAND_INTX_DISABLE, INTERRUPT_LINE, STATUS};
use crate::PciError;

/// Status register bit 3: the function's INTx is asserted.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Interrupt line value meaning "not connected / unknown" on x86.
pub const INTERRUPT_LINE_UNKNOWN: u8 = 0xff;

/// A function's interrupt pin (the config-space value is 1..=4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InterruptPin {
    IntA,
    IntB,
    IntC,
    IntD,
}

impl InterruptPin {
    pub const ALL: [InterruptPin; 4] = [Self::IntA, Self::IntB, Self::IntC, Self::IntD];

    /// 0 for INTA .. 3 for INTD (the index ACPI `_PRT` entries use).
    pub fn index(self) -> u8 {
        self as u8
    }

    /// The interrupt pin register value: 1 for INTA .. 4 for INTD.
    pub fn register_value(self) -> u8 {
        self.index() + 1
    }
}

/// How the root bus's INTx pins reach the interrupt controller: `gsis` IOAPIC inputs from
/// `first_gsi`, shared by all slots with the standard swizzle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntxRouting {
    first_gsi: u32,
    gsis: u32,
}

impl IntxRouting {
    /// `gsis` inputs from `first_gsi`; the interrupt line register holds a GSI, so they must
    /// all be below 255.
    pub fn new(first_gsi: u32, gsis: u32) -> Result<Self, PciError> {
        let fits = gsis > 0
            && first_gsi
                .checked_add(gsis)
                .is_some_and(|end| end <= u32::from(INTERRUPT_LINE_UNKNOWN));
        if !fits {
            return Err(PciError::InvalidIntxRouting { first_gsi, gsis });
        }
        Ok(Self { first_gsi, gsis })
    }

    /// The GSI that `pin` of the device in `slot` (on bus 0) is wired to.
    pub fn gsi(&self, slot: u8, pin: InterruptPin) -> u32 {
        self.first_gsi + (u32::from(slot) + u32::from(pin.index())) % self.gsis
    }

    pub fn first_gsi(&self) -> u32 {
        self.first_gsi
    }

    pub fn gsis(&self) -> u32 {
        self.gsis
    }
}

#[derive(Debug, Default)]
struct IntxState {
    causes: u32,
    /// Command register Interrupt Disable.
    disabled: bool,
    /// The function signals with MSI/MSI-X.
    msi_active: bool,
    /// What the line was last driven to.
    asserted: bool,
}

impl IntxState {
    fn wanted_level(&self) -> bool {
        self.causes != 0 && !self.disabled && !self.msi_active
    }
}

/// One function's INTx pin (shared between the device's register accesses and the threads that
/// raise causes; every method takes `&self`).
pub struct PciIntx {
    pin: InterruptPin,
    line: OnceLock<Arc<dyn LevelIrqLine>>,
    state: Mutex<IntxState>,
}

impl std::fmt::Debug for PciIntx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciIntx")
            .field("pin", &self.pin)
            .field("connected", &self.line.get().is_some())
            .field("state", &*self.state())
            .finish()
    }
}

impl PciIntx {
    /// A pin with no causes, not yet connected (the root connects it when the device is added).
    pub fn new(pin: InterruptPin) -> Self {
        Self {
            pin,
            line: OnceLock::new(),
            state: Mutex::new(IntxState::default()),
        }
    }

    pub fn pin(&self) -> InterruptPin {
        self.pin
    }

    /// Declares the pin in `config` (interrupt pin register; line "unknown" until routed).
    pub fn install(&self, config: &mut ConfigSpace) {
        config.set_interrupt_pin(self.pin.register_value());
        config.set_u8(INTERRUPT_LINE, INTERRUPT_LINE_UNKNOWN);
    }

    /// Wires the pin to `line`. A pin is connected once; a second connection is refused.
    pub fn connect(&self, line: Arc<dyn LevelIrqLine>) -> Result<(), PciError> {
        self.line
            .set(line)
            .map_err(|_| PciError::IntxAlreadyConnected)?;
        // Causes raised before the connection must not be lost.
        let mut state = self.state();
        state.asserted = false;
        self.drive(&mut state);
        Ok(())
    }

    pub fn is_connected(&self) -> bool {
        self.line.get().is_some()
    }

    fn state(&self) -> MutexGuard<'_, IntxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings the line to what the state wants (called with the state lock held, so a raise
    /// and a take cannot interleave between deciding and driving).
    fn drive(&self, state: &mut IntxState) {
        let wanted = state.wanted_level();
        if wanted == state.asserted {
            return;
        }
        let Some(line) = self.line.get() else {
            return;
        };
        match line.set_level(wanted) {
            Ok(()) => state.asserted = wanted,
            Err(e) => tracing::warn!("INTx {:?}: driving the line failed: {e}", self.pin),
        }
    }

    /// Adds interrupt causes (ISR bits) and asserts the line if allowed.
    pub fn raise(&self, causes: u32) {
        let mut state = self.state();
        state.causes |= causes;
        self.drive(&mut state);
    }

    /// Returns and clears the pending causes, deasserting the line (a read-to-clear register).
    pub fn take(&self) -> u32 {
        let mut state = self.state();
        let causes = std::mem::take(&mut state.causes);
        self.drive(&mut state);
        causes
    }

    /// The pending causes, without clearing them.
    pub fn causes(&self) -> u32 {
        self.state().causes
    }

    /// Whether the line is asserted now (the status register's Interrupt Status bit).
    pub fn is_asserted(&self) -> bool {
        self.state().asserted
    }

    /// Follows the command register's Interrupt Disable bit.
    pub fn set_disabled(&self, disabled: bool) {
        let mut state = self.state();
        state.disabled = disabled;
        self.drive(&mut state);
    }

    /// The function switched MSI/MSI-X on (INTx is then held) or off.
    pub fn set_msi_active(&self, active: bool) {
        let mut state = self.state();
        state.msi_active = active;
        self.drive(&mut state);
    }

    /// After a guest config write: picks up Interrupt Disable from the command register.
    pub fn config_written(&self, config: &ConfigSpace) {
        self.set_disabled(config.read_u16(COMMAND) & COMMAND_INTX_DISABLE != 0);
    }

    /// Patches the Interrupt Status bit into a guest read of `data` at `offset` (the bit lives
    /// in the device's state, not in the config bytes).
    pub fn patch_status_read(&self, offset: usize, data: &mut [u8]) {
        let Some(at) = STATUS.checked_sub(offset) else {
            return;
        };
        if let Some(byte) = data.get_mut(at) {
            if self.is_asserted() {
                *byte |= STATUS_INTERRUPT as u8;
            }
        }
    }

    /// Function reset: no causes, line low, gates open.
    pub fn reset(&self) {
        let mut state = self.state();
        state.causes = 0;
        state.disabled = false;
        state.msi_active = false;
        self.drive(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PciIds, INTERRUPT_PIN};
    use std::io;

    /// Records every level the pin drives.
    #[derive(Default)]
    struct RecordingLine {
        levels: Mutex<Vec<bool>>,
    }

    impl LevelIrqLine for RecordingLine {
        fn set_level(&self, asserted: bool) -> io::Result<()> {
            self.levels.lock().unwrap().push(asserted);
            Ok(())
        }
    }

    impl RecordingLine {
        fn levels(&self) -> Vec<bool> {
            self.levels.lock().unwrap().clone()
        }
    }

    fn connected() -> (PciIntx, Arc<RecordingLine>) {
        let intx = PciIntx::new(InterruptPin::IntA);
        let line = Arc::new(RecordingLine::default());
        intx.connect(line.clone()).unwrap();
        (intx, line)
    }

    #[test]
    fn raise_asserts_once_and_take_clears_and_deasserts() {
        let (intx, line) = connected();

        intx.raise(1);
        intx.raise(2);

        assert!(intx.is_asserted());
        assert_eq!(line.levels(), vec![true], "already high: no second edge");
        assert_eq!(intx.take(), 3);
        assert_eq!(line.levels(), vec![true, false]);
        assert_eq!(intx.take(), 0, "read-to-clear");
        assert_eq!(line.levels(), vec![true, false]);
    }

    #[test]
    fn interrupt_disable_holds_the_line_low_and_keeps_the_causes() {
        let (intx, line) = connected();
        intx.raise(1);

        intx.set_disabled(true);
        intx.raise(2);

        assert!(!intx.is_asserted());
        assert_eq!(intx.causes(), 3);
        intx.set_disabled(false);
        assert_eq!(
            line.levels(),
            vec![true, false, true],
            "back up when re-enabled"
        );
    }

    #[test]
    fn msi_active_suppresses_intx() {
        let (intx, line) = connected();
        intx.set_msi_active(true);

        intx.raise(2);

        assert!(line.levels().is_empty());
        assert_eq!(intx.take(), 2, "the cause is still reported");
        intx.set_msi_active(false);
        assert!(line.levels().is_empty(), "nothing left to assert");
    }

    #[test]
    fn causes_raised_before_connecting_assert_on_connect() {
        let intx = PciIntx::new(InterruptPin::IntB);
        intx.raise(1);
        let line = Arc::new(RecordingLine::default());

        intx.connect(line.clone()).unwrap();

        assert_eq!(line.levels(), vec![true]);
        assert_eq!(
            intx.connect(Arc::new(RecordingLine::default())),
            Err(PciError::IntxAlreadyConnected)
        );
    }

    #[test]
    fn config_space_carries_pin_line_command_and_status() {
        let (intx, _) = connected();
        let mut config = ConfigSpace::new(&PciIds::default());
        intx.install(&mut config);
        assert_eq!(config.read_u8(INTERRUPT_PIN), 1);
        assert_eq!(config.read_u8(INTERRUPT_LINE), INTERRUPT_LINE_UNKNOWN);

        config.write(COMMAND, &COMMAND_INTX_DISABLE.to_le_bytes());
        intx.config_written(&config);
        intx.raise(1);
        let mut status = [0u8; 4];
        intx.patch_status_read(COMMAND, &mut status);
        assert_eq!(
            status[2] & STATUS_INTERRUPT as u8,
            0,
            "disabled: not asserted"
        );

        config.write(COMMAND, &0u16.to_le_bytes());
        intx.config_written(&config);
        let mut status = [0u8; 2];
        intx.patch_status_read(STATUS, &mut status);
        assert_eq!(status[0] & STATUS_INTERRUPT as u8, STATUS_INTERRUPT as u8);
        let mut unrelated = [0u8; 2];
        intx.patch_status_read(0, &mut unrelated);
        assert_eq!(unrelated, [0, 0]);
    }

    #[test]
    fn reset_drops_causes_and_the_line() {
        let (intx, line) = connected();
        intx.set_disabled(true);
        intx.set_disabled(false);
        intx.raise(1);

        intx.reset();

        assert_eq!(intx.causes(), 0);
        assert_eq!(line.levels(), vec![true, false]);
    }

    #[test]
    fn routing_swizzles_pins_across_slots() {
        let routing = IntxRouting::new(16, 8).unwrap();

        assert_eq!(routing.gsi(0, InterruptPin::IntA), 16);
        assert_eq!(routing.gsi(1, InterruptPin::IntA), 17);
        assert_eq!(routing.gsi(1, InterruptPin::IntD), 20);
        assert_eq!(routing.gsi(7, InterruptPin::IntB), 16, "wraps");
        assert_eq!(routing.gsi(31, InterruptPin::IntD), 16 + (31 + 3) % 8);
        let all: std::collections::BTreeSet<u32> = (0..32)
            .flat_map(|slot| InterruptPin::ALL.map(|pin| routing.gsi(slot, pin)))
            .collect();
        assert_eq!(all, (16..24).collect());
    }

    #[test]
    fn routing_is_validated() {
        assert!(IntxRouting::new(16, 0).is_err());
        assert!(IntxRouting::new(250, 8).is_err());
        assert!(IntxRouting::new(u32::MAX, 2).is_err());
        assert!(IntxRouting::new(0, 255).is_ok());
    }
}
