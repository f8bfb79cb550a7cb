//! The data the admin commands return: Identify structures and log pages (NVMe 1.4 §5.14,
//! §5.15), built as plain byte pages so they can be checked field by field.

use super::io::Namespace;
use super::registers::{MDTS, VERSION};

pub const OPC_DELETE_SQ: u8 = 0x00;
pub const OPC_CREATE_SQ: u8 = 0x01;
pub const OPC_GET_LOG_PAGE: u8 = 0x02;
pub const OPC_DELETE_CQ: u8 = 0x04;
pub const OPC_CREATE_CQ: u8 = 0x05;
pub const OPC_IDENTIFY: u8 = 0x06;
pub const OPC_ABORT: u8 = 0x08;
pub const OPC_SET_FEATURES: u8 = 0x09;
pub const OPC_GET_FEATURES: u8 = 0x0a;
pub const OPC_ASYNC_EVENT_REQUEST: u8 = 0x0c;
pub const OPC_KEEP_ALIVE: u8 = 0x18;
pub const OPC_DOORBELL_BUFFER_CONFIG: u8 = 0x7c;

pub const CNS_NAMESPACE: u8 = 0x00;
pub const CNS_CONTROLLER: u8 = 0x01;
pub const CNS_ACTIVE_NAMESPACES: u8 = 0x02;
pub const CNS_NAMESPACE_DESCRIPTORS: u8 = 0x03;

pub const LOG_ERROR: u8 = 0x01;
pub const LOG_SMART: u8 = 0x02;
pub const LOG_FIRMWARE_SLOT: u8 = 0x03;

pub const FEAT_ARBITRATION: u8 = 0x01;
pub const FEAT_VOLATILE_WRITE_CACHE: u8 = 0x06;
pub const FEAT_NUMBER_OF_QUEUES: u8 = 0x07;
pub const FEAT_INTERRUPT_COALESCING: u8 = 0x08;
pub const FEAT_INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
pub const FEAT_ASYNC_EVENT_CONFIG: u8 = 0x0b;

/// Error status event information (NVMe 1.4 Figure 146).
pub const EVENT_INVALID_DOORBELL_REGISTER: u8 = 0x00;
pub const EVENT_INVALID_DOORBELL_VALUE: u8 = 0x01;

/// Outstanding Async Event Requests (AERL is this minus one).
pub const AER_LIMIT: usize = 4;
/// Aborts the controller takes at once (ACL is this minus one).
const ABORT_LIMIT: u8 = 4;
/// Error log entries (ELPE is this minus one).
pub const ERROR_LOG_ENTRIES: usize = 1;
const ERROR_LOG_ENTRY_SIZE: usize = 64;
pub const PAGE: usize = 4096;

/// OACS bit 8: Doorbell Buffer Config.
pub const OACS_DBBUF: u16 = 1 << 8;
/// ONCS: Dataset Management (bit 2), Write Zeroes (bit 3).
const ONCS: u16 = (1 << 2) | (1 << 3);
/// VWC: a volatile write cache (bit 0) that Flush with the broadcast NSID flushes (bits 2:1).
const VWC: u8 = 0x07;
/// SGLS: SGLs supported, no alignment requirement.
const SGLS: u32 = 0x1;
/// LPA bit 2: extended data for Get Log Page (NUMDU, offsets).
const LPA: u8 = 1 << 2;
/// FRMW: slot 1 read-only, one slot.
const FRMW: u8 = 0x03;
/// Temperatures in Kelvin: what the SMART log reports, and the thresholds.
const TEMPERATURE_KELVIN: u16 = 313;
const WARNING_TEMPERATURE: u16 = 343;
const CRITICAL_TEMPERATURE: u16 = 358;

/// The controller's identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub vendor_id: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Doorbell Buffer Config is offered (OACS bit 8).
    pub shadow_doorbells: bool,
}

fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
    page[at..at + bytes.len()].copy_from_slice(bytes);
}

/// An ASCII field, space padded (and cut) to `len` bytes; non-printable bytes are dropped.
fn put_ascii(page: &mut [u8], at: usize, len: usize, text: &str) {
    let mut field = vec![b' '; len];
    let printable = text.bytes().filter(|b| (0x20..0x7f).contains(b));
    for (slot, byte) in field.iter_mut().zip(printable) {
        *slot = byte;
    }
    put(page, at, &field);
}

/// Identify Controller (CNS 01h).
pub fn identify_controller(id: &Identity, io_queues: u16) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    put(&mut page, 0, &id.vendor_id.to_le_bytes());
    put(&mut page, 2, &id.vendor_id.to_le_bytes());
    put_ascii(&mut page, 4, 20, &id.serial);
    put_ascii(&mut page, 24, 40, &id.model);
    put_ascii(&mut page, 64, 8, &id.firmware);
    page[72] = 6; // RAB
    page[77] = MDTS;
    put(&mut page, 80, &VERSION.to_le_bytes());
    page[111] = 1; // CNTRLTYPE: I/O controller
    let oacs = if id.shadow_doorbells { OACS_DBBUF } else { 0 };
    put(&mut page, 256, &oacs.to_le_bytes());
    page[258] = ABORT_LIMIT - 1;
    page[259] = AER_LIMIT as u8 - 1;
    page[260] = FRMW;
    page[261] = LPA;
    page[262] = ERROR_LOG_ENTRIES as u8 - 1;
    put(&mut page, 266, &WARNING_TEMPERATURE.to_le_bytes());
    put(&mut page, 268, &CRITICAL_TEMPERATURE.to_le_bytes());
    page[512] = 0x66; // SQES: 64 bytes
    page[513] = 0x44; // CQES: 16 bytes
    put(
        &mut page,
        514,
        &(io_queues.saturating_mul(1024)).to_le_bytes(),
    ); // MAXCMD
    put(&mut page, 516, &1u32.to_le_bytes()); // NN
    put(&mut page, 520, &ONCS.to_le_bytes());
    page[525] = VWC;
    put(&mut page, 536, &SGLS.to_le_bytes());
    let nqn = format!("nqn.2026-12.dev.sluice:nvme:{}", id.serial);
    put_ascii(&mut page, 768, 256.min(nqn.len()), &nqn);
    // Power state 0: 25 W.
    put(&mut page, 2048, &2500u16.to_le_bytes());
    page
}

/// Identify Namespace (CNS 00h) of the one namespace.
pub fn identify_namespace(ns: &Namespace) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    put(&mut page, 0, &ns.blocks.to_le_bytes()); // NSZE
    put(&mut page, 8, &ns.blocks.to_le_bytes()); // NCAP
    put(&mut page, 16, &ns.blocks.to_le_bytes()); // NUSE
                                                  // NLBAF 0 (one format), FLBAS 0; LBA format 0: no metadata, LBADS.
    put(&mut page, 128, &(ns.block_shift << 16).to_le_bytes());
    page
}

/// Active Namespace ID list (CNS 02h): namespaces above `after`.
pub fn active_namespaces(after: u32) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    if after < super::io::NSID {
        put(&mut page, 0, &super::io::NSID.to_le_bytes());
    }
    page
}

/// Namespace Identification Descriptor list (CNS 03h): a UUID derived from the serial.
pub fn namespace_descriptors(serial: &str) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    page[0] = 0x3; // NIDT: UUID
    page[1] = 16; // NIDL
    let mut uuid = [0u8; 16];
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, slot) in uuid.iter_mut().enumerate() {
        for byte in serial.bytes().chain([i as u8]) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        *slot = (hash >> 24) as u8;
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
    put(&mut page, 4, &uuid);
    page
}

/// What the SMART / Health log reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Health {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub read_commands: u64,
    pub write_commands: u64,
    pub power_on_hours: u64,
}

/// Data units are thousands of 512-byte units, rounded up (NVMe 1.4 Figure 194).
fn data_units(bytes: u64) -> u128 {
    u128::from(bytes.div_ceil(512)).div_ceil(1000)
}

/// SMART / Health Information (log 02h).
pub fn smart_log(health: &Health) -> Vec<u8> {
    let mut page = vec![0u8; 512];
    put(&mut page, 1, &TEMPERATURE_KELVIN.to_le_bytes());
    page[3] = 100; // available spare
    page[4] = 10; // spare threshold
    put(&mut page, 32, &data_units(health.bytes_read).to_le_bytes());
    put(
        &mut page,
        48,
        &data_units(health.bytes_written).to_le_bytes(),
    );
    put(
        &mut page,
        64,
        &u128::from(health.read_commands).to_le_bytes(),
    );
    put(
        &mut page,
        80,
        &u128::from(health.write_commands).to_le_bytes(),
    );
    put(&mut page, 112, &1u128.to_le_bytes()); // power cycles
    put(
        &mut page,
        128,
        &u128::from(health.power_on_hours).to_le_bytes(),
    );
    page
}

/// Firmware Slot Information (log 03h): slot 1 active.
pub fn firmware_log(firmware: &str) -> Vec<u8> {
    let mut page = vec![0u8; 512];
    page[0] = 1; // AFI: slot 1
    put_ascii(&mut page, 8, 8, firmware);
    page
}

/// Error Information (log 01h): no errors recorded (error count 0 marks an entry invalid).
pub fn error_log() -> Vec<u8> {
    vec![0u8; ERROR_LOG_ENTRIES * ERROR_LOG_ENTRY_SIZE]
}
