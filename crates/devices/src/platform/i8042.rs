//! i8042 keyboard controller: just enough for Linux's i8042/atkbd probe to pass quietly, and the
//! classic reboot path (command 0xFE pulses the CPU reset line).
//!
//! Written by hand: `vm_superio::I8042Device` models only the reset command, not the controller
//! commands Linux's probe sends (command byte, self-tests, port enable/disable, AUX loopback).
//!
//! Modelled: the status register, the 32-byte controller RAM (byte 0 is the command byte),
//! controller commands (read/write RAM 0x20..0x3f/0x60..0x7f, self-test 0xaa → 0x55, interface
//! tests 0xab/0xa9 → 0x00, keyboard/AUX disable and enable 0xad/0xae/0xa7/0xa8, output port
//! 0xd0/0xd1, write keyboard/AUX output buffer 0xd2/0xd3, pulse output lines 0xf0..0xff) and an
//! attached keyboard that answers reset (0xff → 0xfa 0xaa), identify (0xf2) and the usual
//! configuration commands with an ACK.
//!
//! Not modelled: a mouse (writes to the AUX device via 0xd4 are dropped), key presses, and the
//! AUX interrupt (IRQ 12). Linux therefore decides there is no AUX port after its 250 ms AUX IRQ
//! test; `i8042.noaux` on the kernel command line skips that wait. The keyboard interrupt (IRQ 1)
//! is optional: without it atkbd's commands time out in the background and no keyboard is
//! registered, which is harmless for a headless guest.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_bus::irq::IrqLine;
use sluice_bus::BusDevice;

use super::single_byte;
use crate::{ExitSink, GuestExit};

/// Data port; the device spans `0x60..0x65` so that the command/status port 0x64 is at offset 4.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
/// Command (write) / status (read) port.
pub const I8042_COMMAND_PORT: u16 = I8042_DATA_PORT + COMMAND_OFFSET as u16;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

/// Linux flushes at most 16 bytes before declaring the controller dead; bound the queue the same
/// way so a guest cannot grow it.
const OUTPUT_QUEUE_LIMIT: usize = 16;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Keyboard not inhibited by the keylock switch (Linux warns "Keylock active" if clear).
const STATUS_NOT_INHIBITED: u8 = 0x10;
const STATUS_AUX_DATA: u8 = 0x20;

// Command byte (controller RAM byte 0) bits.
const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
/// What a PC BIOS leaves behind: translation on, POST passed, keyboard interrupt on, no mouse.
const DEFAULT_CTR: u8 = CTR_TRANSLATE | CTR_AUX_DISABLED | CTR_SYSTEM_FLAG | CTR_KBD_INTERRUPT;

// Controller commands.
const CMD_READ_RAM_FIRST: u8 = 0x20;
const CMD_READ_RAM_LAST: u8 = 0x3f;
const CMD_WRITE_RAM_FIRST: u8 = 0x60;
const CMD_WRITE_RAM_LAST: u8 = 0x7f;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX_DEVICE: u8 = 0xd4;
/// 0xf0..=0xff pulse the output lines whose bits are clear in the low nibble; bit 0 is reset.
const CMD_PULSE_FIRST: u8 = 0xf0;

const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;
/// Input port: bit 7 set means the keyboard is not inhibited.
const INPUT_PORT_VALUE: u8 = 0x80;
/// Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUTPUT_PORT_RESET_HIGH: u8 = 0x01;
const DEFAULT_OUTPUT_PORT: u8 = 0x03;

// Keyboard commands and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_ID_FIRST: u8 = 0xab;
/// Second ID byte of an MF2 keyboard, as seen through translation and without it.
const KBD_ID_TRANSLATED: u8 = 0x41;
const KBD_ID_RAW: u8 = 0x83;
const DEFAULT_SCANCODE_SET: u8 = 2;

/// What the next byte written to the data port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataTarget {
    /// A command to the keyboard.
    Keyboard,
    /// The parameter of a keyboard command.
    KeyboardParameter(u8),
    ControllerRam(usize),
    OutputPort,
    KeyboardBuffer,
    AuxBuffer,
    AuxDevice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputByte {
    pub value: u8,
    pub from_aux: bool,
}

/// The controller's state, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Registers {
    /// Controller RAM; byte 0 is the command byte.
    pub ram: Vec<u8>,
    /// Bytes waiting in the output buffer.
    pub output: Vec<OutputByte>,
    pub last_output: u8,
    pub data_target: DataTarget,
    pub last_was_command: bool,
    pub output_port: u8,
    pub scancode_set: u8,
}

/// The i8042 controller with an attached keyboard.
pub struct I8042 {
    exit: Arc<dyn ExitSink>,
    kbd_irq: Option<Arc<dyn IrqLine>>,
    /// Controller RAM; byte 0 is the command byte.
    ram: [u8; 32],
    output: VecDeque<OutputByte>,
    /// Reading an empty output buffer returns the last byte again, as the hardware does.
    last_output: u8,
    data_target: DataTarget,
    last_was_command: bool,
    output_port: u8,
    scancode_set: u8,
    irq_error_logged: bool,
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.read_data(),
            (COMMAND_OFFSET, 1) => self.status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(value) = single_byte(data) else {
            return;
        };
        match offset {
            DATA_OFFSET => self.write_data(value),
            COMMAND_OFFSET => self.write_command(value),
            _ => {}
        }
    }
}

impl I8042 {
    /// A controller reporting resets to `exit`; `kbd_irq` is IRQ 1, if the VMM wires it.
    pub fn new(exit: Arc<dyn ExitSink>, kbd_irq: Option<Arc<dyn IrqLine>>) -> Self {
        let mut ram = [0u8; 32];
        ram[0] = DEFAULT_CTR;
        Self {
            exit,
            kbd_irq,
            ram,
            output: VecDeque::with_capacity(OUTPUT_QUEUE_LIMIT),
            last_output: 0,
            data_target: DataTarget::Keyboard,
            last_was_command: false,
            output_port: DEFAULT_OUTPUT_PORT,
            scancode_set: DEFAULT_SCANCODE_SET,
            irq_error_logged: false,
        }
    }

    /// The controller's state (the VM is paused).
    pub fn save_registers(&self) -> I8042Registers {
        I8042Registers {
            ram: self.ram.to_vec(),
            output: self.output.iter().copied().collect(),
            last_output: self.last_output,
            data_target: self.data_target,
            last_was_command: self.last_was_command,
            output_port: self.output_port,
            scancode_set: self.scancode_set,
        }
    }

    /// Puts back what [`I8042::save_registers`] returned, checked like guest input.
    pub fn restore_registers(&mut self, saved: &I8042Registers) -> Result<(), String> {
        let ram_len = self.ram.len();
        self.ram = saved.ram.as_slice().try_into().map_err(|_| {
            format!(
                "i8042: {} bytes of RAM saved, it has {ram_len}",
                saved.ram.len()
            )
        })?;
        if saved.output.len() > OUTPUT_QUEUE_LIMIT {
            return Err(format!(
                "i8042: {} output bytes saved, the queue holds {OUTPUT_QUEUE_LIMIT}",
                saved.output.len()
            ));
        }
        if let DataTarget::ControllerRam(index) = saved.data_target {
            if index >= ram_len {
                return Err(format!("i8042: RAM index {index} saved, it has {ram_len}"));
            }
        }
        self.output = saved.output.iter().copied().collect();
        self.last_output = saved.last_output;
        self.data_target = saved.data_target;
        self.last_was_command = saved.last_was_command;
        self.output_port = saved.output_port;
        self.scancode_set = saved.scancode_set;
        Ok(())
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn update_ctr(&mut self, set: u8, clear: u8) {
        self.ram[0] = (self.ram[0] | set) & !clear;
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG | STATUS_NOT_INHIBITED;
        if let Some(front) = self.output.front() {
            status |= STATUS_OUTPUT_FULL;
            if front.from_aux {
                status |= STATUS_AUX_DATA;
            }
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        if let Some(byte) = self.output.pop_front() {
            self.last_output = byte.value;
            // Edge-triggered line: signal again for the byte that is now at the front.
            self.interrupt_if_front_ready();
        }
        self.last_output
    }

    fn write_command(&mut self, command: u8) {
        self.last_was_command = true;
        self.data_target = DataTarget::Keyboard;
        match command {
            CMD_READ_RAM_FIRST..=CMD_READ_RAM_LAST => {
                let value = self.ram_byte(command - CMD_READ_RAM_FIRST);
                self.push_output(value, false);
            }
            CMD_WRITE_RAM_FIRST..=CMD_WRITE_RAM_LAST => {
                let index = usize::from(command - CMD_WRITE_RAM_FIRST);
                self.data_target = DataTarget::ControllerRam(index);
            }
            CMD_AUX_DISABLE => self.update_ctr(CTR_AUX_DISABLED, 0),
            CMD_AUX_ENABLE => self.update_ctr(0, CTR_AUX_DISABLED),
            CMD_AUX_TEST | CMD_KBD_TEST => self.push_output(INTERFACE_TEST_PASSED, false),
            CMD_SELF_TEST => self.push_output(SELF_TEST_PASSED, false),
            CMD_KBD_DISABLE => self.update_ctr(CTR_KBD_DISABLED, 0),
            CMD_KBD_ENABLE => self.update_ctr(0, CTR_KBD_DISABLED),
            CMD_READ_INPUT_PORT => self.push_output(INPUT_PORT_VALUE, false),
            CMD_READ_OUTPUT_PORT => self.push_output(self.output_port, false),
            CMD_WRITE_OUTPUT_PORT => self.data_target = DataTarget::OutputPort,
            CMD_WRITE_KBD_BUFFER => self.data_target = DataTarget::KeyboardBuffer,
            CMD_WRITE_AUX_BUFFER => self.data_target = DataTarget::AuxBuffer,
            CMD_WRITE_AUX_DEVICE => self.data_target = DataTarget::AuxDevice,
            CMD_PULSE_FIRST..=u8::MAX => {
                if command & OUTPUT_PORT_RESET_HIGH == 0 {
                    self.request_reset("i8042 reset-line pulse");
                }
            }
            _ => tracing::debug!(command, "ignored i8042 controller command"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_command = false;
        let target = std::mem::replace(&mut self.data_target, DataTarget::Keyboard);
        match target {
            DataTarget::Keyboard => self.keyboard_command(value),
            DataTarget::KeyboardParameter(command) => self.keyboard_parameter(command, value),
            DataTarget::ControllerRam(index) => {
                if let Some(byte) = self.ram.get_mut(index) {
                    *byte = value;
                }
            }
            DataTarget::OutputPort => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_HIGH == 0 {
                    self.request_reset("i8042 output port reset line low");
                }
            }
            DataTarget::KeyboardBuffer => self.push_output(value, false),
            DataTarget::AuxBuffer => self.push_output(value, true),
            DataTarget::AuxDevice => tracing::trace!(value, "no AUX device: byte dropped"),
        }
    }

    fn keyboard_command(&mut self, command: u8) {
        match command {
            KBD_RESET => {
                self.scancode_set = DEFAULT_SCANCODE_SET;
                self.push_output(KBD_ACK, false);
                self.push_output(KBD_SELF_TEST_PASSED, false);
            }
            KBD_IDENTIFY => {
                let second = if self.ctr() & CTR_TRANSLATE != 0 {
                    KBD_ID_TRANSLATED
                } else {
                    KBD_ID_RAW
                };
                self.push_output(KBD_ACK, false);
                self.push_output(KBD_ID_FIRST, false);
                self.push_output(second, false);
            }
            KBD_SET_LEDS | KBD_TYPEMATIC | KBD_SCANCODE_SET => {
                self.data_target = DataTarget::KeyboardParameter(command);
                self.push_output(KBD_ACK, false);
            }
            KBD_ECHO => self.push_output(KBD_ECHO, false),
            KBD_ENABLE | KBD_DISABLE | KBD_DEFAULTS => self.push_output(KBD_ACK, false),
            _ => self.push_output(KBD_RESEND, false),
        }
    }

    fn keyboard_parameter(&mut self, command: u8, value: u8) {
        self.push_output(KBD_ACK, false);
        if command == KBD_SCANCODE_SET {
            match value {
                0 => self.push_output(self.scancode_set, false),
                1..=3 => self.scancode_set = value,
                _ => {}
            }
        }
    }

    fn ram_byte(&self, index: u8) -> u8 {
        self.ram.get(usize::from(index)).copied().unwrap_or(0)
    }

    fn push_output(&mut self, value: u8, from_aux: bool) {
        if self.output.len() >= OUTPUT_QUEUE_LIMIT {
            tracing::debug!(value, "i8042 output queue full: byte dropped");
            return;
        }
        self.output.push_back(OutputByte { value, from_aux });
        if self.output.len() == 1 {
            self.interrupt_if_front_ready();
        }
    }

    /// Raises IRQ 1 for a keyboard byte at the front of the queue if the guest enabled it.
    fn interrupt_if_front_ready(&mut self) {
        let Some(front) = self.output.front() else {
            return;
        };
        if front.from_aux || self.ctr() & CTR_KBD_INTERRUPT == 0 {
            return;
        }
        let Some(irq) = &self.kbd_irq else {
            return;
        };
        if let Err(e) = irq.trigger() {
            if !self.irq_error_logged {
                self.irq_error_logged = true;
                tracing::warn!("i8042 interrupt failed, further failures not logged: {e}");
            }
        }
    }

    fn request_reset(&self, why: &str) {
        tracing::info!("guest requested reset: {why}");
        self.exit.request_exit(GuestExit::Reset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::testing::{fuzz_device, RecordingExitSink, RecordingIrq};

    const BASE: u64 = I8042_DATA_PORT as u64;

    fn controller() -> (I8042, Arc<RecordingExitSink>) {
        let sink = RecordingExitSink::new();
        (I8042::new(sink.clone(), None), sink)
    }

    fn command(dev: &mut I8042, value: u8) {
        dev.write(BASE, COMMAND_OFFSET, &[value]);
    }

    fn write_data(dev: &mut I8042, value: u8) {
        dev.write(BASE, DATA_OFFSET, &[value]);
    }

    fn status(dev: &mut I8042) -> u8 {
        let mut data = [0u8];
        dev.read(BASE, COMMAND_OFFSET, &mut data);
        data[0]
    }

    /// Reads the data port the way Linux's i8042_wait_read does: only when OBF says so.
    fn read_reply(dev: &mut I8042) -> Option<u8> {
        if status(dev) & STATUS_OUTPUT_FULL == 0 {
            return None;
        }
        let mut data = [0u8];
        dev.read(BASE, DATA_OFFSET, &mut data);
        Some(data[0])
    }

    #[test]
    fn reset_command_requests_exactly_one_reset() {
        let (mut dev, sink) = controller();

        command(&mut dev, 0xfe);

        assert_eq!(sink.exits(), vec![GuestExit::Reset]);
    }

    #[test]
    fn pulse_without_reset_bit_does_nothing() {
        let (mut dev, sink) = controller();

        command(&mut dev, 0xff);

        assert!(sink.exits().is_empty());
    }

    #[test]
    fn self_test_replies_0x55_and_empties_buffer() {
        let (mut dev, _) = controller();

        command(&mut dev, CMD_SELF_TEST);

        assert_eq!(read_reply(&mut dev), Some(0x55));
        assert_eq!(read_reply(&mut dev), None);
    }

    #[test]
    fn interface_tests_pass() {
        let (mut dev, _) = controller();

        command(&mut dev, CMD_KBD_TEST);
        let kbd = read_reply(&mut dev);
        command(&mut dev, CMD_AUX_TEST);
        let aux = read_reply(&mut dev);

        assert_eq!((kbd, aux), (Some(0), Some(0)));
    }

    #[test]
    fn status_reports_system_flag_and_no_keylock_when_idle() {
        let (mut dev, _) = controller();

        let idle = status(&mut dev);

        assert_eq!(idle & STATUS_OUTPUT_FULL, 0);
        assert_eq!(
            idle & (STATUS_SYSTEM_FLAG | STATUS_NOT_INHIBITED),
            STATUS_SYSTEM_FLAG | STATUS_NOT_INHIBITED
        );
    }

    #[test]
    fn command_byte_round_trips() {
        let (mut dev, _) = controller();

        command(&mut dev, 0x60);
        write_data(&mut dev, 0x74);
        command(&mut dev, 0x20);

        assert_eq!(read_reply(&mut dev), Some(0x74));
    }

    #[test]
    fn port_disable_and_enable_toggle_command_byte_bits() {
        let (mut dev, _) = controller();
        let mut ctr_after = |cmd: u8| {
            command(&mut dev, cmd);
            command(&mut dev, 0x20);
            read_reply(&mut dev).unwrap()
        };

        let aux_off = ctr_after(CMD_AUX_DISABLE);
        let aux_on = ctr_after(CMD_AUX_ENABLE);
        let kbd_off = ctr_after(CMD_KBD_DISABLE);
        let kbd_on = ctr_after(CMD_KBD_ENABLE);

        assert_ne!(aux_off & CTR_AUX_DISABLED, 0);
        assert_eq!(aux_on & CTR_AUX_DISABLED, 0);
        assert_ne!(kbd_off & CTR_KBD_DISABLED, 0);
        assert_eq!(kbd_on & CTR_KBD_DISABLED, 0);
    }

    #[test]
    fn output_port_write_with_reset_bit_clear_resets() {
        let (mut dev, sink) = controller();

        command(&mut dev, CMD_WRITE_OUTPUT_PORT);
        write_data(&mut dev, 0x03);
        let after_a20 = sink.exits().len();
        command(&mut dev, CMD_WRITE_OUTPUT_PORT);
        write_data(&mut dev, 0x02);

        assert_eq!(after_a20, 0);
        assert_eq!(sink.exits(), vec![GuestExit::Reset]);
    }

    #[test]
    fn keyboard_reset_acks_and_passes_self_test() {
        let (mut dev, _) = controller();

        write_data(&mut dev, KBD_RESET);

        assert_eq!(read_reply(&mut dev), Some(0xfa));
        assert_eq!(read_reply(&mut dev), Some(0xaa));
        assert_eq!(read_reply(&mut dev), None);
    }

    #[test]
    fn keyboard_identifies_as_translated_mf2() {
        let (mut dev, _) = controller();

        write_data(&mut dev, KBD_IDENTIFY);

        let id: Vec<_> = std::iter::from_fn(|| read_reply(&mut dev)).collect();
        assert_eq!(id, vec![0xfa, 0xab, 0x41]);
    }

    #[test]
    fn keyboard_parameter_commands_ack_twice() {
        let (mut dev, _) = controller();

        write_data(&mut dev, KBD_SET_LEDS);
        write_data(&mut dev, 0x07);

        let replies: Vec<_> = std::iter::from_fn(|| read_reply(&mut dev)).collect();
        assert_eq!(replies, vec![0xfa, 0xfa]);
    }

    #[test]
    fn aux_loopback_marks_byte_as_aux() {
        let (mut dev, _) = controller();

        command(&mut dev, CMD_WRITE_AUX_BUFFER);
        write_data(&mut dev, 0x5a);

        assert_ne!(status(&mut dev) & STATUS_AUX_DATA, 0);
        assert_eq!(read_reply(&mut dev), Some(0x5a));
    }

    #[test]
    fn keyboard_bytes_interrupt_when_enabled() {
        let sink = RecordingExitSink::new();
        let irq = RecordingIrq::new();
        let mut dev = I8042::new(sink, Some(irq.clone()));

        write_data(&mut dev, KBD_RESET);
        let after_first_byte = irq.count();
        read_reply(&mut dev);
        let after_second_byte = irq.count();
        read_reply(&mut dev);
        command(&mut dev, 0x60);
        write_data(&mut dev, DEFAULT_CTR & !CTR_KBD_INTERRUPT);
        write_data(&mut dev, KBD_ECHO);

        assert_eq!(after_first_byte, 1);
        assert_eq!(after_second_byte, 2);
        assert_eq!(irq.count(), 2, "no interrupt once the guest disabled it");
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut dev, _) = controller();

        for _ in 0..100 {
            command(&mut dev, CMD_WRITE_KBD_BUFFER);
            write_data(&mut dev, 0x11);
        }

        let queued = std::iter::from_fn(|| read_reply(&mut dev)).count();
        assert_eq!(queued, OUTPUT_QUEUE_LIMIT);
    }

    #[test]
    fn wide_and_unclaimed_accesses_are_ignored() {
        let (mut dev, sink) = controller();
        let mut data = [0u8; 2];

        dev.write(BASE, COMMAND_OFFSET, &[0xfe, 0xfe]);
        dev.write(BASE, 1, &[0xfe]);
        dev.read(BASE, 2, &mut data);

        assert!(sink.exits().is_empty());
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let sink = RecordingExitSink::new();
        let mut dev = I8042::new(sink, Some(RecordingIrq::new()));

        fuzz_device(&mut dev, BASE, I8042_PORT_LEN.into(), 20_000);
    }

    #[test]
    fn saved_controller_state_comes_back_and_bad_indexes_are_refused() {
        let (mut dev, _) = controller();
        command(&mut dev, 0x60);
        write_data(&mut dev, 0x45);
        let saved = dev.save_registers();
        let (mut fresh, _) = controller();

        fresh.restore_registers(&saved).unwrap();
        let bad_index = I8042Registers {
            data_target: DataTarget::ControllerRam(32),
            ..saved.clone()
        };
        let too_much_output = I8042Registers {
            output: vec![
                OutputByte {
                    value: 0,
                    from_aux: false
                };
                OUTPUT_QUEUE_LIMIT + 1
            ],
            ..saved.clone()
        };

        assert_eq!(fresh.save_registers(), saved);
        assert_eq!(fresh.ctr(), 0x45);
        assert!(fresh.restore_registers(&bad_index).is_err());
        assert!(fresh.restore_registers(&too_much_output).is_err());
    }
}
