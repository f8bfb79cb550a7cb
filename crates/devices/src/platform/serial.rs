//! 16550A UART (COM1) built on `vm_superio::Serial`, which models the registers, FIFO and
//! interrupt identification; this module adapts it to sluice's bus and interrupt traits and
//! chooses where output goes.
//!
//! * Output goes to a [`SerialOutput`]: any `Write` (stdout or a file chosen by the VMM), with an
//!   optional tee into a [`CaptureBuffer`] so tests can read what the guest printed.
//!   `vm_superio` flushes the writer after every byte, so a VMM crash loses no console output.
//! * The interrupt (IRQ 4 for COM1) goes through a [`sluice_bus::irq::IrqLine`].
//! * Input bytes are injected with [`Serial::enqueue_input`] (stdin forwarding later).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sluice_bus::irq::IrqLine;
use sluice_bus::BusDevice;
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Trigger;

use super::single_byte;

/// COM1 base port (its IRQ line is the VMM's choice: `COM1_IRQ` in crates/vmm/src/layout.rs).
pub const COM1_PORT: u16 = 0x3f8;
/// Registers of a 16550: eight consecutive ports.
pub const SERIAL_PORT_LEN: u16 = 8;

/// Default limit of a [`CaptureBuffer`]: enough for any test transcript, bounded so a chatty
/// guest cannot grow host memory without end.
const DEFAULT_CAPTURE_LIMIT: usize = 16 << 20;

/// What the guest programmed into the UART and the input it has not read yet, for a snapshot.
/// The status registers (LSR, IIR, MSR) follow from these and are not carried.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegisters {
    pub divisor_low: u8,
    pub divisor_high: u8,
    pub interrupt_enable: u8,
    pub line_control: u8,
    pub modem_control: u8,
    pub scratch: u8,
    /// Received bytes still in the FIFO (at most its 64).
    pub input: Vec<u8>,
}

/// Register offsets the restore writes through (16550 numbering).
const REG_DIVISOR_LOW: u8 = 0;
const REG_DIVISOR_HIGH: u8 = 1;
const REG_INTERRUPT_ENABLE: u8 = 1;
const REG_LINE_CONTROL: u8 = 3;
const REG_MODEM_CONTROL: u8 = 4;
const REG_SCRATCH: u8 = 7;
const LINE_CONTROL_DLAB: u8 = 0x80;
/// The receive FIFO's size in vm_superio's model.
const FIFO_BYTES: usize = 64;

/// The 16550 UART model.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, SerialOutput>,
    /// Log the first failure of each kind only: a broken stdout would otherwise log per byte.
    output_error_logged: bool,
    irq_error_logged: bool,
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (register(offset), data.len()) {
            (Some(reg), 1) => data[0] = self.uart.read(reg),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (Some(reg), Some(value)) = (register(offset), single_byte(data)) else {
            return;
        };
        self.write_register(reg, value);
    }
}

impl Serial {
    /// A UART writing guest output to `output` and interrupting through `irq`.
    pub fn new(output: SerialOutput, irq: Arc<dyn IrqLine>) -> Self {
        Self {
            uart: vm_superio::Serial::new(IrqTrigger(irq), output),
            output_error_logged: false,
            irq_error_logged: false,
        }
    }

    /// Queues `bytes` as received input and raises the receive interrupt if enabled. Returns how
    /// many bytes fitted in the 64-byte receive FIFO; the caller retries the rest later.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room_before = self.uart.fifo_capacity();
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(accepted) => accepted,
            Err(UartError::FullFifo) => 0,
            Err(e) => {
                // The bytes were queued even though the interrupt failed.
                self.log_error(e);
                room_before.saturating_sub(self.uart.fifo_capacity())
            }
        }
    }

    /// The registers the guest programmed and its unread input (the VM is paused).
    pub fn save_registers(&self) -> SerialRegisters {
        let state = self.uart.state();
        SerialRegisters {
            divisor_low: state.baud_divisor_low,
            divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            line_control: state.line_control,
            modem_control: state.modem_control,
            scratch: state.scratch,
            input: state.in_buffer,
        }
    }

    /// Puts saved registers back into a UART fresh from reset, through the same register
    /// writes a driver would make, so the derived status registers and the interrupt come out
    /// as the model computes them; the unread input goes in before loopback can be set.
    pub fn restore_registers(&mut self, saved: &SerialRegisters) -> Result<(), String> {
        if saved.input.len() > FIFO_BYTES {
            return Err(format!(
                "serial: {} bytes of input saved, the FIFO holds {FIFO_BYTES}",
                saved.input.len()
            ));
        }
        // IER shares its port with the divisor's high byte: written while DLAB is off, before
        // the saved LCR (which may have DLAB on) goes back.
        self.write_register(REG_LINE_CONTROL, 0);
        self.write_register(REG_MODEM_CONTROL, 0);
        self.enqueue_input(&saved.input);
        for (reg, value) in [
            (REG_INTERRUPT_ENABLE, saved.interrupt_enable),
            (REG_LINE_CONTROL, LINE_CONTROL_DLAB),
            (REG_DIVISOR_LOW, saved.divisor_low),
            (REG_DIVISOR_HIGH, saved.divisor_high),
            (REG_LINE_CONTROL, saved.line_control),
            (REG_MODEM_CONTROL, saved.modem_control),
            (REG_SCRATCH, saved.scratch),
        ] {
            self.write_register(reg, value);
        }
        Ok(())
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        if let Err(e) = self.uart.write(reg, value) {
            self.log_error(e);
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    fn log_error(&mut self, error: UartError<io::Error>) {
        match error {
            UartError::IOError(e) if !self.output_error_logged => {
                self.output_error_logged = true;
                tracing::warn!("serial output failed, further failures not logged: {e}");
            }
            UartError::Trigger(e) if !self.irq_error_logged => {
                self.irq_error_logged = true;
                tracing::warn!("serial interrupt failed, further failures not logged: {e}");
            }
            _ => {}
        }
    }
}

/// The register offset as `vm_superio` wants it, if inside the device's eight ports.
fn register(offset: u64) -> Option<u8> {
    u8::try_from(offset)
        .ok()
        .filter(|&reg| u16::from(reg) < SERIAL_PORT_LEN)
}

/// Adapts an [`IrqLine`] to `vm_superio`'s interrupt trait.
struct IrqTrigger(Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Where the guest's serial output goes: a writer, a capture buffer, or both.
pub struct SerialOutput {
    writer: Option<Box<dyn Write + Send>>,
    capture: Option<CaptureBuffer>,
}

impl SerialOutput {
    /// Output to `writer` (a file, a pipe, ...).
    pub fn new(writer: Box<dyn Write + Send>) -> Self {
        Self {
            writer: Some(writer),
            capture: None,
        }
    }

    /// Output to the VMM's stdout.
    pub fn stdout() -> Self {
        Self::new(Box::new(io::stdout()))
    }

    /// Output only into `capture` (tests, or a VMM that serves the console elsewhere).
    pub fn capture_only(capture: CaptureBuffer) -> Self {
        Self {
            writer: None,
            capture: Some(capture),
        }
    }

    /// Also copies everything written into `capture`.
    pub fn with_capture(mut self, capture: CaptureBuffer) -> Self {
        self.capture = Some(capture);
        self
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Capture first: a test reading the transcript should see bytes even if the writer fails.
        if let Some(capture) = &self.capture {
            capture.append(buf);
        }
        match &mut self.writer {
            Some(writer) => writer.write_all(buf).map(|()| buf.len()),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.writer {
            Some(writer) => writer.flush(),
            None => Ok(()),
        }
    }
}

/// A shared, bounded in-memory transcript of serial output; clones see the same bytes.
#[derive(Clone)]
pub struct CaptureBuffer {
    inner: Arc<Mutex<Capture>>,
}

struct Capture {
    bytes: Vec<u8>,
    limit: usize,
    dropped: u64,
}

impl CaptureBuffer {
    /// A buffer keeping the first 16 MiB written.
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_CAPTURE_LIMIT)
    }

    /// A buffer keeping the first `limit` bytes written; later bytes are counted and dropped.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Capture {
                bytes: Vec::new(),
                limit,
                dropped: 0,
            })),
        }
    }

    /// A copy of the bytes captured so far.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    /// The captured bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock().bytes).into_owned()
    }

    /// How many bytes were dropped because the limit was reached.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn append(&self, buf: &[u8]) {
        let mut capture = self.lock();
        let room = capture.limit.saturating_sub(capture.bytes.len());
        let kept = room.min(buf.len());
        capture.bytes.extend_from_slice(&buf[..kept]);
        capture.dropped += (buf.len() - kept) as u64;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Capture> {
        // A panic while holding the lock cannot leave the byte vector inconsistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for CaptureBuffer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::testing::{fuzz_device, RecordingIrq};

    const BASE: u64 = COM1_PORT as u64;
    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const LSR: u64 = 5;
    const IER_THRE: u8 = 0x02;
    const IER_RDA: u8 = 0x01;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;
    const LSR_IDLE: u8 = 0x40;

    fn serial() -> (Serial, CaptureBuffer, Arc<RecordingIrq>) {
        let capture = CaptureBuffer::new();
        let irq = RecordingIrq::new();
        let dev = Serial::new(SerialOutput::capture_only(capture.clone()), irq.clone());
        (dev, capture, irq)
    }

    fn read(dev: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8];
        dev.read(BASE, offset, &mut data);
        data[0]
    }

    #[test]
    fn bytes_written_to_thr_reach_output() {
        let (mut dev, capture, _) = serial();

        for byte in b"hello\n" {
            dev.write(BASE, THR, &[*byte]);
        }

        assert_eq!(capture.text(), "hello\n");
    }

    #[test]
    fn thr_write_interrupts_only_when_thre_enabled() {
        let (mut dev, _, irq) = serial();

        dev.write(BASE, THR, b"a");
        let before_enable = irq.count();
        dev.write(BASE, IER, &[IER_THRE]);
        let after_enable = irq.count();
        // The guest's interrupt handler reads IIR, which acknowledges THRE.
        let iir = read(&mut dev, IIR);
        dev.write(BASE, THR, b"b");

        assert_eq!(before_enable, 0);
        // Enabling THRE with an empty THR raises the interrupt at once, like the hardware.
        assert_eq!(after_enable, 1);
        assert_eq!(iir & 0x0f, 0x02, "IIR says THR empty");
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn lsr_reports_transmitter_empty() {
        let (mut dev, _, _) = serial();

        dev.write(BASE, THR, b"x");

        let lsr = read(&mut dev, LSR);
        assert_eq!(lsr & (LSR_THR_EMPTY | LSR_IDLE), LSR_THR_EMPTY | LSR_IDLE);
        assert_eq!(lsr & LSR_DATA_READY, 0);
    }

    #[test]
    fn enqueued_input_is_readable_and_interrupts() {
        let (mut dev, _, irq) = serial();
        dev.write(BASE, IER, &[IER_RDA]);

        let accepted = dev.enqueue_input(b"ok");

        assert_eq!(accepted, 2);
        assert_eq!(irq.count(), 1);
        assert_eq!(read(&mut dev, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(read(&mut dev, THR), b'o');
        assert_eq!(read(&mut dev, THR), b'k');
        assert_eq!(read(&mut dev, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_beyond_fifo_is_refused_not_dropped_silently() {
        let (mut dev, _, _) = serial();

        let first = dev.enqueue_input(&[b'z'; 100]);
        let second = dev.enqueue_input(b"more");

        assert_eq!(first, 64);
        assert_eq!(second, 0);
        assert_eq!(dev.input_capacity(), 0);
    }

    #[test]
    fn divisor_latch_writes_do_not_reach_output() {
        let (mut dev, capture, _) = serial();

        dev.write(BASE, LCR, &[0x80]);
        dev.write(BASE, THR, &[0x01]);
        dev.write(BASE, LCR, &[0x03]);

        assert_eq!(capture.contents(), Vec::<u8>::new());
    }

    #[test]
    fn output_tees_into_writer_and_capture() {
        let capture = CaptureBuffer::new();
        let file = CaptureBuffer::new();
        let writer = Box::new(SerialOutput::capture_only(file.clone()));
        let irq = RecordingIrq::new();
        let mut dev = Serial::new(SerialOutput::new(writer).with_capture(capture.clone()), irq);

        dev.write(BASE, THR, b"q");

        assert_eq!(capture.text(), "q");
        assert_eq!(file.text(), "q");
    }

    #[test]
    fn capture_buffer_is_bounded() {
        let capture = CaptureBuffer::with_limit(4);
        let mut out = SerialOutput::capture_only(capture.clone());

        out.write_all(b"abcdef").unwrap();

        assert_eq!(capture.text(), "abcd");
        assert_eq!(capture.dropped(), 2);
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_ignored() {
        let (mut dev, capture, _) = serial();
        let mut data = [0u8; 2];

        dev.write(BASE, THR, b"ab");
        dev.write(BASE, 8, b"c");
        dev.read(BASE, LSR, &mut data);

        assert!(capture.contents().is_empty());
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let (mut dev, _, _) = serial();

        fuzz_device(&mut dev, BASE, SERIAL_PORT_LEN.into(), 20_000);
    }

    #[test]
    fn saved_registers_and_unread_input_come_back_in_a_fresh_uart() {
        let (mut dev, _, _) = serial();
        dev.write(BASE, LCR, &[LINE_CONTROL_DLAB]);
        dev.write(BASE, THR, &[0x0c]);
        dev.write(BASE, IER, &[0x00]);
        dev.write(BASE, LCR, &[0x03]);
        dev.write(BASE, IER, &[IER_RDA]);
        dev.write(BASE, u64::from(REG_SCRATCH), &[0x5a]);
        dev.enqueue_input(b"hi");
        let saved = dev.save_registers();
        let (mut fresh, _, irq) = serial();

        fresh.restore_registers(&saved).unwrap();
        let restored = fresh.save_registers();

        assert_eq!(restored, saved);
        assert_eq!(read(&mut fresh, u64::from(REG_SCRATCH)), 0x5a);
        assert_eq!(read(&mut fresh, IER), IER_RDA);
        assert_eq!(read(&mut fresh, LCR), 0x03);
        assert_ne!(read(&mut fresh, LSR) & LSR_DATA_READY, 0);
        assert!(irq.count() >= 1, "unread input with RDA enabled interrupts");
        assert_eq!([read(&mut fresh, THR), read(&mut fresh, THR)], *b"hi");
        fresh.write(BASE, LCR, &[LINE_CONTROL_DLAB | 0x03]);
        assert_eq!(read(&mut fresh, THR), 0x0c, "divisor latch low");
    }

    #[test]
    fn a_uart_saved_mid_divisor_programming_keeps_dlab_and_its_ier() {
        let (mut dev, _, _) = serial();
        dev.write(BASE, IER, &[IER_THRE]);
        dev.write(BASE, LCR, &[LINE_CONTROL_DLAB]);
        dev.write(BASE, IER, &[0x01]);
        let saved = dev.save_registers();
        let (mut fresh, _, _) = serial();

        fresh.restore_registers(&saved).unwrap();

        assert_eq!(fresh.save_registers(), saved);
        assert_eq!(saved.interrupt_enable, IER_THRE);
        assert_eq!(saved.divisor_high, 0x01);
    }

    #[test]
    fn more_saved_input_than_the_fifo_holds_is_refused() {
        let (mut dev, _, _) = serial();
        let saved = SerialRegisters {
            input: vec![0; FIFO_BYTES + 1],
            ..dev.save_registers()
        };

        let refused = dev.restore_registers(&saved);

        assert!(refused.is_err());
    }
}
