//! Bodies of the `nvme_command`, `nvme_registers` and `nvme_trace` fuzz targets (fuzz/fuzz_targets/ holds
//! thin wrappers), here so that `cargo test` replays the committed corpora
//! (tests/fuzz_corpus.rs) without libFuzzer.
//!
//! `nvme_command`: `[mode, 64-byte SQE, guest memory...]` — the memory (at most 64 KiB, zero
//! filled) is guest RAM at 0. Mode bit 0 clear: the SQE goes through the NVM command parser and
//! the PRP/SGL walker ([`parse_io_command`]) with 4 KiB pages (bit 1: 8 KiB) against a 1 MiB
//! namespace; bit 0 set: it is the only entry of the admin queue of a freshly enabled
//! controller (admin SQ at 0xe000, CQ at 0xf000), served as the guest's doorbell write would
//! serve it. Checks besides "never panics": a parsed read or write moves exactly its blocks'
//! bytes inside the namespace, every extent lies inside the namespace, a walk describes exactly
//! the transfer; an admin command completes at most once, with its CID.
//!
//! `nvme_trace`: an NVMe request log (see [`nvme_trace`]).
//!
//! `nvme_registers`: an op script against a fresh controller over 64 KiB of zeroed guest
//! memory. Each op is 12 bytes: `[kind, width, offset lo, offset hi, value (8 bytes LE)]`;
//! kind % 5: 0 BAR0 read, 1 BAR0 write, 2 MSI-X BAR write, 3 config space write, 4 guest
//! memory write (8 bytes at `offset & 0xfff8`, so a script can lay out queues and commands);
//! width % 4 picks 1, 2, 4 or 8 bytes; BAR0 offsets wrap at 16 KiB. At most 64 ops.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use sluice_bus::irq::{MsiMessage, MsiSink};
use sluice_pci::PciDevice;
use sluice_storage::IoOp;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::command::{Command, Status};
use super::io::{parse_io_command, Namespace};
use super::prp::{data_segments, WalkLimits};
use super::registers::{ACQ, AQA, ASQ, CC, CC_EN, DOORBELLS};
use super::{Nvme, NvmeConfig, NvmeInterrupts};

const MEMORY: usize = 0x1_0000;
const NAMESPACE: Namespace = Namespace {
    blocks: 2048,
    block_shift: 9,
};
const FUZZ_ASQ: u64 = 0xe000;
const FUZZ_ACQ: u64 = 0xf000;
const MAX_OPS: usize = 64;
const OP_SIZE: usize = 12;

fn memory(bytes: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
    let len = bytes.len().min(MEMORY);
    mem.write_slice(&bytes[..len], GuestAddress(0)).unwrap();
    mem
}

/// One image file per process, 1 MiB, reused by every input (each controller opens and
/// locks it, then drops it before the next input).
fn image_path() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path =
                std::env::temp_dir().join(format!("sluice-nvme-fuzz-{}.img", std::process::id()));
            let file = std::fs::File::create(&path).unwrap();
            file.set_len(NAMESPACE.blocks << NAMESPACE.block_shift)
                .unwrap();
            path
        })
        .clone()
}

/// Interrupts go nowhere (the slow path: no routes).
struct NullSink;

impl MsiSink for NullSink {
    fn send(&self, _msg: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}

fn controller(mem: &GuestMemoryMmap) -> Nvme {
    let mut config = NvmeConfig::new(image_path());
    config.queues = 2;
    config.engine = sluice_storage::IoEngine::Sync;
    let interrupts = NvmeInterrupts {
        msi_sink: Arc::new(NullSink),
        msi_router: None,
        ioevents: None,
    };
    Nvme::new(
        &config,
        sluice_dma::identity(mem.clone()),
        interrupts,
        "nvme-fuzz",
    )
    .unwrap()
}

/// The `nvme_command` target.
pub fn nvme_command(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if rest.len() < 64 {
        return;
    }
    let mut raw = [0u8; 64];
    raw.copy_from_slice(&rest[..64]);
    let cmd = Command(raw);
    let mem = memory(&rest[64..]);
    if mode & 1 == 0 {
        io_command(&mem, &cmd, mode);
    } else {
        admin_command(&mem, &cmd);
    }
}

fn io_command(mem: &GuestMemoryMmap, cmd: &Command, mode: u8) {
    let dma = sluice_dma::identity(mem.clone());
    let limits = WalkLimits {
        page_size: if mode & 2 == 0 { 4096 } else { 8192 },
        max_transfer: 128 * 1024,
        allow_sgl: true,
    };
    let disk = NAMESPACE.blocks << NAMESPACE.block_shift;
    if let Ok(request) = parse_io_command(&dma, cmd, &NAMESPACE, &limits, mode & 4 == 0) {
        match &request.op {
            IoOp::Read { offset, buffers } | IoOp::Write { offset, buffers } => {
                let blocks = u64::from(cmd.cdw(12) & 0xffff) + 1;
                assert_eq!(buffers.len() as u64, blocks << NAMESPACE.block_shift);
                assert!(offset + buffers.len() as u64 <= disk);
            }
            IoOp::Discard(extents) | IoOp::WriteZeroes(extents) => {
                for e in extents {
                    assert!(
                        e.offset.checked_add(e.len).is_some_and(|end| end <= disk),
                        "{e:?}"
                    );
                }
            }
            IoOp::Flush => {}
        }
    }
    // The walker alone, for a length from CDW12.
    let len = (cmd.cdw(12) as usize) & 0x3_ffff;
    if let Ok(segments) = data_segments(&dma, cmd, len, &limits) {
        let total: usize = segments.iter().map(|(_, n)| n).sum();
        assert_eq!(total, len, "{segments:?}");
    }
}

fn admin_command(mem: &GuestMemoryMmap, cmd: &Command) {
    let mut nvme = controller(mem);
    mem.write_slice(&cmd.0, GuestAddress(FUZZ_ASQ)).unwrap();
    mem.write_slice(&[0u8; 256], GuestAddress(FUZZ_ACQ))
        .unwrap();
    nvme.bar_write(0, AQA, &0x000f_000fu32.to_le_bytes());
    nvme.bar_write(0, ASQ, &FUZZ_ASQ.to_le_bytes());
    nvme.bar_write(0, ACQ, &FUZZ_ACQ.to_le_bytes());
    nvme.bar_write(0, CC, &(CC_EN | (6 << 16) | (4 << 20)).to_le_bytes());
    nvme.bar_write(0, DOORBELLS, &1u32.to_le_bytes());
    let mut entries = [0u8; 32];
    mem.read_slice(&mut entries, GuestAddress(FUZZ_ACQ))
        .unwrap();
    let first_phase = entries[14] & 1;
    let second_phase = entries[30] & 1;
    // The command completes once (or is held, an AER), never twice.
    assert_eq!(second_phase, 0);
    if first_phase == 1 {
        assert_eq!(u16::from_le_bytes([entries[12], entries[13]]), cmd.cid());
        let status = Status::from_field(u16::from_le_bytes([entries[14], entries[15]]) >> 1);
        assert!(status.code_type() <= 2, "{status:?}");
    }
}

/// The `nvme_registers` target.
pub fn nvme_registers(data: &[u8]) {
    let mem = memory(&[]);
    let mut nvme = controller(&mem);
    for op in data.chunks_exact(OP_SIZE).take(MAX_OPS) {
        let width = 1usize << (op[1] % 4);
        let offset = u64::from(u16::from_le_bytes([op[2], op[3]]));
        let mut value = [0u8; 8];
        value.copy_from_slice(&op[4..12]);
        match op[0] % 5 {
            0 => {
                let mut out = vec![0u8; width];
                nvme.bar_read(0, offset % 0x4000, &mut out);
            }
            1 => nvme.bar_write(0, offset % 0x4000, &value[..width]),
            2 => nvme.bar_write(4, offset % 0x2000, &value[..width]),
            3 => nvme.config_write((offset % 0x1000) as usize & !(width - 1), &value[..width]),
            _ => {
                let addr = u64::from(offset as u16 & 0xfff8);
                mem.write_slice(&value, GuestAddress(addr)).unwrap();
            }
        }
    }
}

/// Records decoded per `nvme_trace` input (the rest of a longer input is not looked at).
const TRACE_RECORDS: usize = 256;

/// The `nvme_trace` target: `data` as an NVMe request log (`requests=`, [`super::trace`]).
/// Besides "never panics": every record decoded stays inside the data bound, encodes back to
/// bytes that decode to the same record, and its `nvme_command` seed (if it fits) passes that
/// target's checks.
///
/// An input starting with 0xff is *framed* by this body so mutations get past the checksums:
/// the 24-byte file header, then `[length u16][payload]...`, each payload wrapped in a record
/// with its tag, length and valid checksum.
pub fn nvme_trace(data: &[u8]) {
    use super::trace::{encode_header, encode_record, NvmeTraceReader, TracedData, MAX_DATA_BYTES};
    let framed;
    let data = match data.split_first() {
        Some((0xff, rest)) => {
            framed = crate::request_log::frame_fuzz_input(rest, super::trace::HEADER_BYTES);
            &framed[..]
        }
        _ => data,
    };
    let Ok(mut reader) = NvmeTraceReader::new(data) else {
        return;
    };
    for _ in 0..TRACE_RECORDS {
        let Ok(Some(command)) = reader.next_command() else {
            return;
        };
        if let TracedData::ToDevice(bytes) = &command.data {
            assert!(bytes.len() <= MAX_DATA_BYTES as usize);
        }
        let mut again = encode_header(&reader.namespace);
        again.extend_from_slice(&encode_record(&command));
        let decoded = NvmeTraceReader::new(&again[..])
            .and_then(|mut r| r.next_command())
            .expect("an encoded record decodes");
        assert_eq!(decoded.as_ref(), Some(&command));
        if let Some(seed) = super::rerun::nvme_command_seed(&command) {
            assert!(seed.len() <= 1 + 64 + MEMORY);
            nvme_command(&seed);
        }
    }
}
