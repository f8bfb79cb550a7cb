//! A TPM 2.0 driver over the TCG CRB interface (`w=tpm`): finds the TPM2 table's control
//! area, takes locality 0, and runs TPM2_Startup(CLEAR), TPM2_GetRandom(16), TPM2_PCR_Read,
//! TPM2_PCR_Extend and TPM2_PCR_Read of PCR 16 in the SHA-256 bank through the command/response
//! buffer. It prints PCR 16 before and after and the digest it extended with; the host checks
//! after = SHA-256(before || digest) (the kit has no hash code of its own). With `hold=MS`
//! (`w=tpm:hold=MS`) it then prints `tpm: holding`, waits MS milliseconds — the host snapshots
//! or migrates the VM meanwhile — and reads PCR 16 again (`pcr_held`: equal to `pcr_after`
//! when the TPM's state travelled with the VM).
//!
//! Polled, no interrupts; every wait has a deadline.

use alloc::string::String;
use alloc::vec::Vec;

use crate::phys::{le_u32, le_u64, mmio_read32, mmio_read8, mmio_write32, mmio_write8};
use crate::workloads::Outcome;

const LOC_CTRL: u64 = 0x08;
const LOC_STS: u64 = 0x0c;
const CTRL_REQ: u64 = 0x40;
const CTRL_STS: u64 = 0x44;
const CTRL_START: u64 = 0x4c;
const CTRL_CMD_SIZE: u64 = 0x58;
const CTRL_CMD_LADDR: u64 = 0x5c;
const CTRL_CMD_HADDR: u64 = 0x60;
const CTRL_RSP_SIZE: u64 = 0x64;
const CTRL_RSP_ADDR: u64 = 0x68;
const START_METHOD_CRB: u32 = 7;
const HEADER: usize = 10;
const PCR: u32 = 16;
const TPM_RC_INITIALIZE: u32 = 0x100;
/// TPM_ALG_SHA256.
const SHA256: u16 = 0x000b;

/// The CRB register page of locality 0.
struct Crb {
    base: u64,
    timeout_ms: u64,
}

impl Crb {
    fn find() -> Result<Crb, &'static str> {
        let info = crate::acpi::info().ok_or("no ACPI")?;
        let &(_, addr, len) = info
            .tables
            .iter()
            .find(|(sig, _, _)| sig == b"TPM2")
            .ok_or("no TPM2 table")?;
        let table = crate::phys::bytes(addr, len as usize).ok_or("TPM2 table unreadable")?;
        if len < 52 || le_u32(table, 48) != START_METHOD_CRB {
            return Err("TPM2 table: not a CRB start method");
        }
        let control = le_u64(table, 40);
        if !(CTRL_REQ..crate::phys::IDENTITY_LIMIT).contains(&control) {
            return Err("TPM2 table: control area outside the identity map");
        }
        Ok(Crb {
            base: control - CTRL_REQ,
            timeout_ms: 0,
        })
    }

    fn read(&self, register: u64) -> u32 {
        mmio_read32(self.base + register)
    }

    fn write(&self, register: u64, value: u32) {
        mmio_write32(self.base + register, value)
    }

    fn wait(&self, what: &'static str, done: impl Fn() -> bool) -> Result<(), &'static str> {
        let deadline = crate::time::Deadline::after_ms(self.timeout_ms);
        while !done() {
            if deadline.expired() {
                return Err(what);
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    fn take_locality(&self) -> Result<(), &'static str> {
        self.write(LOC_CTRL, 1);
        self.wait("locality 0 not granted", || self.read(LOC_STS) & 1 != 0)
    }

    /// Sends `command`, returns the whole response (bounded by the response buffer).
    fn execute(&self, command: &[u8]) -> Result<Vec<u8>, &'static str> {
        self.write(CTRL_REQ, 1);
        self.wait("cmdReady not taken", || {
            self.read(CTRL_REQ) & 1 == 0 && self.read(CTRL_STS) & 2 == 0
        })?;
        let cmd_addr =
            u64::from(self.read(CTRL_CMD_LADDR)) | (u64::from(self.read(CTRL_CMD_HADDR)) << 32);
        if command.len() > self.read(CTRL_CMD_SIZE) as usize {
            return Err("command larger than the command buffer");
        }
        for (i, byte) in command.iter().enumerate() {
            mmio_write8(cmd_addr + i as u64, *byte);
        }
        self.write(CTRL_START, 1);
        self.wait("command did not complete", || {
            self.read(CTRL_START) & 1 == 0
        })?;
        if self.read(CTRL_STS) & 1 != 0 {
            return Err("TPM reports a fatal error");
        }
        let rsp_addr =
            u64::from(self.read(CTRL_RSP_ADDR)) | (u64::from(self.read(CTRL_RSP_ADDR + 4)) << 32);
        let rsp_size = self.read(CTRL_RSP_SIZE) as usize;
        let read = |i: usize| mmio_read8(rsp_addr + i as u64);
        let size = (2..6).fold(0usize, |acc, i| (acc << 8) | usize::from(read(i)));
        if !(HEADER..=rsp_size).contains(&size) {
            return Err("response size outside the response buffer");
        }
        Ok((0..size).map(read).collect())
    }
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .map_or(u32::MAX, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// A command: tag, size, code, then `body`.
fn command(tag: u16, code: u32, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + body.len());
    bytes.extend_from_slice(&tag.to_be_bytes());
    bytes.extend_from_slice(&((HEADER + body.len()) as u32).to_be_bytes());
    bytes.extend_from_slice(&code.to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

fn no_sessions(code: u32, body: &[u8]) -> Vec<u8> {
    command(0x8001, code, body)
}

/// TPM2_PCR_Read of PCR 16 in the SHA-256 bank: its 32 bytes.
fn read_pcr(crb: &Crb) -> Result<Vec<u8>, &'static str> {
    let mut selection = 1u32.to_be_bytes().to_vec();
    selection.extend_from_slice(&SHA256.to_be_bytes());
    selection.extend_from_slice(&[3, 0, 0, 1 << (PCR % 8)]);
    let response = crb.execute(&no_sessions(0x17e, &selection))?;
    // Header, update counter (4), the selection back (10), digest count (4), size (2).
    let at = HEADER + 4 + 10 + 4;
    if be32(&response, 6) != 0 || response.len() != at + 2 + 32 || response[at + 1] != 32 {
        return Err("PCR_Read failed");
    }
    Ok(response[at + 2..].to_vec())
}

fn extend_pcr(crb: &Crb, digest: &[u8]) -> Result<(), &'static str> {
    let mut body = PCR.to_be_bytes().to_vec();
    // One password session (TPM_RS_PW) with an empty auth: 9 bytes.
    body.extend_from_slice(&9u32.to_be_bytes());
    body.extend_from_slice(&0x4000_0009u32.to_be_bytes());
    body.extend_from_slice(&[0, 0, 0, 0, 0]);
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&SHA256.to_be_bytes());
    body.extend_from_slice(digest);
    let response = crb.execute(&command(0x8002, 0x182, &body))?;
    match be32(&response, 6) {
        0 => Ok(()),
        _ => Err("PCR_Extend failed"),
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        text.push_str(&alloc::format!("{byte:02x}"));
    }
    text
}

/// What the run saw.
struct Seen {
    startup_rc: u32,
    random: Vec<u8>,
    before: Vec<u8>,
    digest: Vec<u8>,
    after: Vec<u8>,
    /// PCR 16 read again after the hold, if there was one.
    held: Option<Vec<u8>>,
}

fn run(timeout_ms: u64, hold_ms: u64) -> Result<Seen, &'static str> {
    let mut crb = Crb::find()?;
    crb.timeout_ms = timeout_ms;
    crb.take_locality()?;
    let startup = crb.execute(&no_sessions(0x144, &[0, 0]))?;
    let startup_rc = be32(&startup, 6);
    if startup_rc != 0 && startup_rc != TPM_RC_INITIALIZE {
        return Err("Startup failed");
    }
    let random = crb.execute(&no_sessions(0x17b, &[0, 16]))?;
    if be32(&random, 6) != 0 || random.len() != HEADER + 2 + 16 {
        return Err("GetRandom failed");
    }
    let before = read_pcr(&crb)?;
    let digest: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(7) ^ 0x5a).collect();
    extend_pcr(&crb, &digest)?;
    let after = read_pcr(&crb)?;
    let held = if hold_ms > 0 {
        crate::println!("tpm: holding {hold_ms} ms");
        let deadline = crate::time::Deadline::after_ms(hold_ms);
        while !deadline.expired() {
            core::hint::spin_loop();
        }
        Some(read_pcr(&crb)?)
    } else {
        None
    };
    Ok(Seen {
        startup_rc,
        random: random[HEADER + 2..].to_vec(),
        before,
        digest,
        after,
        held,
    })
}

pub fn run_workload(timeout_ms: u64, hold_ms: u64) -> Outcome {
    match run(timeout_ms, hold_ms) {
        Ok(seen) => {
            let held = seen
                .held
                .as_deref()
                .map(|pcr| alloc::format!(",\"pcr_held\":\"{}\"", hex(pcr)))
                .unwrap_or_default();
            crate::println!(
                "RESULT {{\"workload\":\"tpm\",\"startup_rc\":{},\"random\":\"{}\",\"pcr\":{},\"pcr_before\":\"{}\",\"digest\":\"{}\",\"pcr_after\":\"{}\"{held},\"pass\":true}}",
                seen.startup_rc,
                hex(&seen.random),
                PCR,
                hex(&seen.before),
                hex(&seen.digest),
                hex(&seen.after)
            );
            Outcome::Pass
        }
        Err(why) => {
            crate::println!(
                "RESULT {{\"workload\":\"tpm\",\"error\":\"{}\",\"pass\":false}}",
                why
            );
            Outcome::Fail
        }
    }
}
