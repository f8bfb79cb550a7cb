//! A TPM 2.0 behind the TCG PC Client CRB interface (Command Response Buffer, TPM Profile spec
//! §6.5): the register pages of five localities at [`CRB_BASE`], the command/response buffer
//! inside them, and a [`TpmBackend`] that runs the commands — swtpm over its control and data
//! channels ([`swtpm`]), or a fake in tests.
//!
//! Hand-written: no crate models the CRB registers; the state machine is small. The command
//! and response addresses the guest reads point at the buffer inside the register page and are
//! read-only, so the device never touches guest RAM: every access is an MMIO exit bounded by the
//! page. A command whose header size is outside 10..=buffer, or a backend response that is
//! malformed or larger than the buffer, becomes a TPM error response in the buffer — never an
//! out-of-bounds copy. Commands run synchronously in the vCPU thread that writes CTRL_START
//! (the guest polls CTRL_START for completion anyway); the backend's own timeouts bound it.
//!
//! Snapshots and migration carry [`SavedTpm`]: the CRB's registers and buffer plus the TPM's
//! own state as its backend hands it out ([`TpmBlobs`]: swtpm's permanent, volatile and
//! savestate blobs). A restore checks the registers before it touches the backend.

pub mod fuzz;
pub mod swtpm;

use serde::{Deserialize, Serialize};
use sluice_bus::BusDevice;

/// The CRB register pages (locality 0) in guest-physical memory.
pub const CRB_BASE: u64 = 0xfed4_0000;
/// One 4 KiB page per locality, 0..=4.
pub const CRB_SIZE: u64 = LOCALITY_SIZE * LOCALITIES as u64;
const LOCALITY_SIZE: u64 = 0x1000;
const LOCALITIES: u8 = 5;
/// The control area's first register (CTRL_REQ), which the TPM2 table names.
pub const CONTROL_AREA: u64 = CRB_BASE + CTRL_REQ;
/// The command/response buffer: the rest of each locality's page.
const DATA_BUFFER: u64 = 0x80;
pub const BUFFER_SIZE: usize = (LOCALITY_SIZE - DATA_BUFFER) as usize;

const LOC_STATE: u64 = 0x00;
const LOC_CTRL: u64 = 0x08;
const LOC_STS: u64 = 0x0c;
const INTF_ID: u64 = 0x30;
const CTRL_REQ: u64 = 0x40;
const CTRL_STS: u64 = 0x44;
const CTRL_CANCEL: u64 = 0x48;
const CTRL_START: u64 = 0x4c;
const CTRL_INT_ENABLE: u64 = 0x50;
const CTRL_CMD_SIZE: u64 = 0x58;
const CTRL_CMD_LADDR: u64 = 0x5c;
#[cfg(test)]
const CTRL_CMD_HADDR: u64 = 0x60;
const CTRL_RSP_SIZE: u64 = 0x64;
const CTRL_RSP_ADDR: u64 = 0x68;

const LOC_STATE_ESTABLISHED: u32 = 1 << 0;
const LOC_STATE_ASSIGNED: u32 = 1 << 1;
const LOC_STATE_VALID: u32 = 1 << 7;
const LOC_CTRL_REQUEST: u32 = 1 << 0;
const LOC_CTRL_RELINQUISH: u32 = 1 << 1;
const LOC_CTRL_RESET_ESTABLISHMENT: u32 = 1 << 3;
const LOC_STS_GRANTED: u32 = 1 << 0;
const CTRL_REQ_CMD_READY: u32 = 1 << 0;
const CTRL_REQ_GO_IDLE: u32 = 1 << 1;
const CTRL_STS_FATAL: u32 = 1 << 0;
const CTRL_STS_IDLE: u32 = 1 << 1;

/// INTF_ID: CRB interface (type 1, version 1), five localities, 64-byte transfers, CRB only,
/// CRB selected, vendor 0x1b36 device 0x0001.
const INTERFACE_ID: u64 =
    1 | (1 << 4) | (1 << 8) | (3 << 11) | (1 << 14) | (1 << 17) | (0x1b36 << 32) | (1 << 48);

/// Smallest TPM 2.0 command or response: tag (2), size (4), code (4).
pub const HEADER_SIZE: usize = 10;
const TPM_ST_NO_SESSIONS: u16 = 0x8001;
/// TPM_RC_FAILURE: the TPM (here: its backend) failed.
pub const TPM_RC_FAILURE: u32 = 0x101;
/// TPM_RC_COMMAND_SIZE: the header's size disagrees with what was sent.
pub const TPM_RC_COMMAND_SIZE: u32 = 0x142;

/// One of the TPM's state blobs as the backend hands it out, with the backend's flags for it
/// (swtpm: whether it is still encrypted), handed back unchanged on restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBlob {
    pub flags: u32,
    pub data: Vec<u8>,
}

/// The TPM's whole state: permanent (NV memory, seeds, hierarchies), volatile (PCRs, sessions,
/// loaded objects) and the state a TPM2_Shutdown(STATE) saved. An empty blob: none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmBlobs {
    pub permanent: StateBlob,
    pub volatile: StateBlob,
    pub savestate: StateBlob,
}

/// What a snapshot carries of the TPM: the CRB's registers, the command/response buffer (a
/// response the guest has not read yet) and the TPM's blobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTpm {
    /// The locality holding the TPM (0..=4).
    pub active: Option<u8>,
    pub idle: bool,
    pub fatal: bool,
    pub cancel: u32,
    pub int_enable: u32,
    /// Exactly [`BUFFER_SIZE`] bytes.
    pub buffer: Vec<u8>,
    pub tpm: TpmBlobs,
}

/// Runs TPM commands: swtpm, or a fake in tests. Responses are checked by the device.
pub trait TpmBackend: Send {
    /// Runs `command` at `locality` and returns the whole response.
    fn execute(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>, String>;
    /// Asks the TPM to cancel the command in progress.
    fn cancel(&mut self);
    /// The TPM's establishment flag (LOC_STATE.tpmEstablished).
    fn established(&mut self) -> bool;
    /// Resets the establishment flag (localities 3 and 4 only).
    fn reset_established(&mut self, locality: u8);
    /// The TPM's state (the VM is paused: no command runs).
    fn save_state(&mut self) -> Result<TpmBlobs, String> {
        Err("this TPM backend cannot save its state".into())
    }
    /// Replaces the TPM's state with `blobs` and starts it again from them.
    fn restore_state(&mut self, _blobs: &TpmBlobs) -> Result<(), String> {
        Err("this TPM backend cannot restore a state".into())
    }
}

/// The CRB device.
pub struct TpmCrb {
    backend: Box<dyn TpmBackend>,
    buffer: Box<[u8; BUFFER_SIZE]>,
    active: Option<u8>,
    established: bool,
    idle: bool,
    fatal: bool,
    cancel: u32,
    int_enable: u32,
    /// Commands run, for tests and logs.
    pub commands: u64,
}

impl TpmCrb {
    pub fn new(mut backend: Box<dyn TpmBackend>) -> TpmCrb {
        let established = backend.established();
        TpmCrb {
            backend,
            buffer: Box::new([0; BUFFER_SIZE]),
            active: None,
            established,
            idle: true,
            fatal: false,
            cancel: 0,
            int_enable: 0,
            commands: 0,
        }
    }

    /// The device's and the TPM's state; the VM is paused.
    pub fn save_state(&mut self) -> Result<SavedTpm, String> {
        Ok(SavedTpm {
            active: self.active,
            idle: self.idle,
            fatal: self.fatal,
            cancel: self.cancel,
            int_enable: self.int_enable,
            buffer: self.buffer.to_vec(),
            tpm: self.backend.save_state()?,
        })
    }

    /// Puts a saved state back (a fresh device, before any vCPU runs). The registers are checked
    /// first: a refused state leaves the TPM as it was.
    pub fn restore_state(&mut self, saved: &SavedTpm) -> Result<(), String> {
        if saved.buffer.len() != BUFFER_SIZE {
            return Err(format!(
                "tpm: a saved buffer of {} bytes, the device has {BUFFER_SIZE}",
                saved.buffer.len()
            ));
        }
        if let Some(locality) = saved.active.filter(|l| *l >= LOCALITIES) {
            return Err(format!("tpm: saved active locality {locality} (0..=4)"));
        }
        self.backend.restore_state(&saved.tpm)?;
        self.buffer.copy_from_slice(&saved.buffer);
        self.active = saved.active;
        self.idle = saved.idle;
        self.fatal = saved.fatal;
        self.cancel = saved.cancel & 1;
        self.int_enable = saved.int_enable;
        self.established = self.backend.established();
        Ok(())
    }

    /// The locality whose page `offset` falls in, and the offset inside it.
    fn split(offset: u64) -> Option<(u8, u64)> {
        if offset >= CRB_SIZE {
            return None;
        }
        Some(((offset / LOCALITY_SIZE) as u8, offset % LOCALITY_SIZE))
    }

    /// The 64-bit register word at `aligned` (8-byte aligned, below the buffer).
    fn register_qword(&self, locality: u8, aligned: u64) -> u64 {
        let dword = |offset: u64| -> u32 {
            match offset {
                LOC_STATE => {
                    let mut state = LOC_STATE_VALID;
                    if self.established {
                        state |= LOC_STATE_ESTABLISHED;
                    }
                    if let Some(active) = self.active {
                        state |= LOC_STATE_ASSIGNED | (u32::from(active) << 2);
                    }
                    state
                }
                LOC_STS => u32::from(self.active == Some(locality)) * LOC_STS_GRANTED,
                CTRL_STS => {
                    (u32::from(self.fatal) * CTRL_STS_FATAL)
                        | (u32::from(self.idle) * CTRL_STS_IDLE)
                }
                CTRL_CANCEL => self.cancel,
                CTRL_INT_ENABLE => self.int_enable,
                CTRL_CMD_SIZE | CTRL_RSP_SIZE => BUFFER_SIZE as u32,
                CTRL_CMD_LADDR => (CRB_BASE + DATA_BUFFER) as u32,
                CTRL_RSP_ADDR => (CRB_BASE + DATA_BUFFER) as u32,
                INTF_ID => INTERFACE_ID as u32,
                0x34 => (INTERFACE_ID >> 32) as u32,
                // LOC_CTRL, CTRL_REQ and CTRL_START read 0: requests take effect at once;
                // CTRL_CMD_HADDR, the high half of RSP_ADDR, INT_STS and the rest are 0.
                _ => 0,
            }
        };
        u64::from(dword(aligned)) | (u64::from(dword(aligned + 4)) << 32)
    }

    fn write_register(&mut self, locality: u8, offset: u64, value: u32) {
        if offset == LOC_CTRL {
            self.locality_control(locality, value);
            return;
        }
        // The control area belongs to the locality that holds the TPM.
        if self.active != Some(locality) {
            tracing::debug!("tpm: locality {locality} wrote {offset:#x} without the TPM");
            return;
        }
        match offset {
            CTRL_REQ if value & CTRL_REQ_CMD_READY != 0 => self.idle = false,
            CTRL_REQ if value & CTRL_REQ_GO_IDLE != 0 => self.idle = true,
            CTRL_CANCEL => {
                self.cancel = value & 1;
                if self.cancel != 0 {
                    self.backend.cancel();
                }
            }
            CTRL_START if value & 1 != 0 => self.start(locality),
            CTRL_INT_ENABLE => self.int_enable = value,
            // CTRL_INT_STS at 0x54 (write 1 to clear; nothing is ever raised), addresses and sizes
            // (read-only), the rest.
            _ => {}
        }
    }

    fn locality_control(&mut self, locality: u8, value: u32) {
        if value & LOC_CTRL_REQUEST != 0 && self.active.is_none() {
            self.active = Some(locality);
        }
        if value & LOC_CTRL_RELINQUISH != 0 && self.active == Some(locality) {
            self.active = None;
        }
        if value & LOC_CTRL_RESET_ESTABLISHMENT != 0 && locality >= 3 {
            self.backend.reset_established(locality);
            self.established = self.backend.established();
        }
    }

    /// Runs the command in the buffer and leaves the response (or an error response) there.
    fn start(&mut self, locality: u8) {
        self.idle = false;
        self.commands += 1;
        let size = u32::from_be_bytes([
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
            self.buffer[5],
        ]) as usize;
        if !(HEADER_SIZE..=BUFFER_SIZE).contains(&size) {
            tracing::debug!("tpm: command of {size} bytes refused");
            self.respond_error(TPM_RC_COMMAND_SIZE);
            return;
        }
        match self.backend.execute(locality, &self.buffer[..size]) {
            Ok(response) if valid_response(&response) => {
                self.buffer[..response.len()].copy_from_slice(&response);
            }
            Ok(response) => {
                tracing::warn!(
                    "tpm: the backend's response of {} bytes is malformed or larger than the \
                     {BUFFER_SIZE}-byte buffer",
                    response.len()
                );
                self.respond_error(TPM_RC_FAILURE);
            }
            Err(e) => {
                tracing::warn!("tpm: the backend failed: {e}");
                self.fatal = true;
                self.respond_error(TPM_RC_FAILURE);
            }
        }
    }

    fn respond_error(&mut self, code: u32) {
        self.buffer[..HEADER_SIZE].copy_from_slice(&error_response(code));
    }
}

/// A response fits the buffer and its header's size is its length.
fn valid_response(response: &[u8]) -> bool {
    (HEADER_SIZE..=BUFFER_SIZE).contains(&response.len())
        && u32::from_be_bytes([response[2], response[3], response[4], response[5]]) as usize
            == response.len()
}

/// A bare TPM 2.0 response carrying `code`.
pub fn error_response(code: u32) -> [u8; HEADER_SIZE] {
    let mut response = [0; HEADER_SIZE];
    response[..2].copy_from_slice(&TPM_ST_NO_SESSIONS.to_be_bytes());
    response[2..6].copy_from_slice(&(HEADER_SIZE as u32).to_be_bytes());
    response[6..].copy_from_slice(&code.to_be_bytes());
    response
}

impl BusDevice for TpmCrb {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((locality, inner)) = Self::split(offset) else {
            return;
        };
        let Some(end) = inner.checked_add(data.len() as u64) else {
            return;
        };
        if inner >= DATA_BUFFER {
            let start = (inner - DATA_BUFFER) as usize;
            if let Some(bytes) = self.buffer.get(start..start + data.len()) {
                data.copy_from_slice(bytes);
            }
            return;
        }
        let aligned = inner & !7;
        // Registers: at most 8 bytes inside one 8-byte word.
        if data.len() > 8 || end > aligned + 8 {
            return;
        }
        let word = self.register_qword(locality, aligned).to_le_bytes();
        let at = (inner - aligned) as usize;
        data.copy_from_slice(&word[at..at + data.len()]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some((locality, inner)) = Self::split(offset) else {
            return;
        };
        if inner >= DATA_BUFFER {
            let start = (inner - DATA_BUFFER) as usize;
            if let Some(bytes) = self.buffer.get_mut(start..start + data.len()) {
                bytes.copy_from_slice(data);
            }
            return;
        }
        let aligned = inner & !3;
        let at = (inner - aligned) as usize;
        // Registers: at most 4 bytes inside one 32-bit register, the rest of it written as 0.
        if data.len() > 4 || at + data.len() > 4 {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes[at..at + data.len()].copy_from_slice(data);
        self.write_register(locality, aligned, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
