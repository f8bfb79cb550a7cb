//! `sluice replay --device` for an NVMe request log ([`super::trace`]): the logged I/O
//! commands re-run one at a time, in the log's order, through the controller's NVM command
//! execution path (`parse_io_command`, the PRP/SGL walker, an `IoQueue` on the image, the
//! worker's status mapping) on a fresh all-zero image of the logged namespace (or a copy given
//! with `--image`), with no VM and no controller registers.
//!
//! The guest's data pointers cannot be followed without the guest's memory, so each command
//! that moves data gets its data pointer rewritten to one SGL Data Block over a private buffer
//! holding the logged bytes (a write, Dataset Management's ranges) or zeros (a read); the rest
//! of the SQE is the logged one. The completion status must equal the logged one and a read's
//! returned bytes must hash to the logged hash; the first difference stops the re-run. A
//! command the controller refused in its data-pointer walk (a PRP/SGL status with no data
//! logged) is not re-run: the guest memory that made the walk fail is not in the log; such
//! commands are counted as skipped. With a corpus directory each command that fits becomes an
//! `nvme_command` fuzz seed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_storage::{DiskImage, IoCompletion, IoEngine, IoOp, IoQueue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::command::{Command, Status};
use super::io::{io_error_status, parse_io_command, IoKind, Namespace};
use super::prp::WalkLimits;
use super::trace::{NvmeTraceReader, TracedCommand, TracedData, MAX_DATA_BYTES};
use crate::block::rerun::{
    create_corpus_dir, open_log, scratch_image, Mismatch, RerunError, RerunOptions, RerunReport,
};
use crate::request_log::fnv1a;

/// Where the re-run puts a command's data in its private memory.
const DATA_BASE: u64 = 0x1000;
const RAM_SIZE: usize = DATA_BASE as usize + MAX_DATA_BYTES as usize;
/// PSDT 01b: SGLs, metadata contiguous (CDW0 bits 15:14).
const PSDT_SGL: u8 = 1 << 6;
/// Bounds one command's wait for its completion.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The `nvme_command` target's guest memory, and where a seed's data goes in it.
const SEED_MEMORY: usize = 0x1_0000;
const SEED_DATA: u64 = 0x1000;

/// Re-runs the NVMe request log at `log` (see the module documentation).
pub fn rerun(log: &Path, options: &RerunOptions) -> Result<RerunReport, RerunError> {
    let started = Instant::now();
    let open = || open_log(log);
    // A corrupt record is refused before anything runs, not met half-way.
    let mut check = NvmeTraceReader::new(open()?)?;
    while check.next_command()?.is_some() {}
    let mut reader = NvmeTraceReader::new(open()?)?;
    let ns = reader.namespace;
    let setup = |what: String| RerunError::Setup(what);
    let bytes = ns.blocks << ns.block_shift;
    let scratch;
    let image_path = match &options.image {
        Some(path) => path.clone(),
        None => {
            // Removed when dropped, at the end of the re-run.
            scratch = scratch_image(bytes)?;
            scratch.as_path().to_path_buf()
        }
    };
    let image = DiskImage::open(&image_path, false, false)
        .map_err(|e| setup(format!("{}: {e}", image_path.display())))?;
    if image.size() >> ns.block_shift != ns.blocks {
        return Err(setup(format!(
            "{} has {} bytes, the log's namespace {bytes}",
            image_path.display(),
            image.size()
        )));
    }
    create_corpus_dir(options)?;
    let mut executor = Executor::new(Arc::new(image), ns)?;
    let mut report = RerunReport::default();
    let mut position = 0u64;
    while let Some(command) = reader.next_command()? {
        position += 1;
        if let Some(dir) = &options.corpus {
            report.seeds += u64::from(write_seed(dir, &command)?);
        }
        if refused_by_the_walk(&command) {
            report.skipped += 1;
            continue;
        }
        if let Err(what) = executor.run(&command) {
            report.mismatch = Some(Mismatch {
                request: position,
                queue: command.qid,
                what,
            });
            break;
        }
        report.matched += 1;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// A data-moving command answered with a data-pointer status and no logged data.
fn refused_by_the_walk(command: &TracedCommand) -> bool {
    let walk_statuses = [
        Status::INVALID_FIELD,
        Status::DATA_TRANSFER_ERROR,
        Status::INVALID_SGL_SEGMENT_DESCRIPTOR,
        Status::INVALID_SGL_DESCRIPTOR_COUNT,
        Status::DATA_SGL_LENGTH_INVALID,
        Status::SGL_DESCRIPTOR_TYPE_INVALID,
        Status::PRP_OFFSET_INVALID,
    ];
    let cmd = Command(command.sqe);
    command.data == TracedData::None
        && matches!(cmd.opcode(), 0x01 | 0x02 | 0x09)
        && walk_statuses.contains(&Status(command.status))
}

/// `sqe` with its data pointer replaced by one SGL Data Block of `len` bytes at `addr`.
fn with_data_at(sqe: &[u8; 64], addr: u64, len: usize) -> Command {
    let mut raw = *sqe;
    raw[1] = (raw[1] & 0x3f) | PSDT_SGL;
    raw[24..32].copy_from_slice(&addr.to_le_bytes());
    raw[32..36].copy_from_slice(&(len as u32).to_le_bytes());
    // Reserved bytes, and type 0 (Data Block) subtype 0 in byte 15.
    raw[36..40].fill(0);
    Command(raw)
}

/// The command as the re-run issues it, with where its data lies.
fn reissued(command: &TracedCommand, at: u64) -> (Command, usize) {
    match &command.data {
        TracedData::None => (Command(command.sqe), 0),
        TracedData::ToDevice(bytes) => (with_data_at(&command.sqe, at, bytes.len()), bytes.len()),
        TracedData::FromDevice(len) => {
            let len = *len as usize;
            (with_data_at(&command.sqe, at, len), len)
        }
    }
}

/// The NVM command execution path over a private memory and the image.
struct Executor {
    mem: GuestMemoryMmap,
    dma: sluice_dma::DmaSpace,
    io: IoQueue<IoKind>,
    ns: Namespace,
    limits: WalkLimits,
}

impl Executor {
    fn new(image: Arc<DiskImage>, ns: Namespace) -> Result<Self, RerunError> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)])
            .map_err(|e| RerunError::Setup(format!("re-run memory: {e}")))?;
        let dma = sluice_dma::identity(mem.clone());
        Ok(Self {
            mem,
            dma,
            // Synchronous: each command is done when `submit` returns.
            io: IoQueue::new(image, IoEngine::Sync, 1),
            ns,
            limits: WalkLimits {
                page_size: 4096,
                max_transfer: MAX_DATA_BYTES as usize,
                allow_sgl: true,
            },
        })
    }

    /// Issues `command` and compares its answer with the log's.
    fn run(&mut self, command: &TracedCommand) -> Result<(), String> {
        let (cmd, len) = reissued(command, DATA_BASE);
        let memory_error = |e: vm_memory::GuestMemoryError| format!("re-run memory: {e}");
        match &command.data {
            TracedData::ToDevice(bytes) => self
                .mem
                .write_slice(bytes, GuestAddress(DATA_BASE))
                .map_err(memory_error)?,
            TracedData::FromDevice(_) => self
                .mem
                .write_slice(&vec![0u8; len], GuestAddress(DATA_BASE))
                .map_err(memory_error)?,
            TracedData::None => {}
        }
        let status = self.execute(&cmd)?;
        if status.0 != command.status {
            return Err(format!(
                "status {:#06x}, the log has {:#06x}",
                status.0, command.status
            ));
        }
        if let (TracedData::FromDevice(_), true) = (&command.data, status.is_success()) {
            let mut data = vec![0u8; len];
            self.mem
                .read_slice(&mut data, GuestAddress(DATA_BASE))
                .map_err(memory_error)?;
            if fnv1a(&data) != command.data_hash {
                return Err(format!(
                    "the {len} bytes read differ from the logged ones (hash {:#018x}, the log has \
                     {:#018x})",
                    fnv1a(&data),
                    command.data_hash
                ));
            }
        }
        Ok(())
    }

    /// Parses and executes `cmd` as an I/O queue worker does (write cache on; a FUA command
    /// is flushed after), returning its completion status.
    fn execute(&mut self, cmd: &Command) -> Result<Status, String> {
        let request = match parse_io_command(&self.dma, cmd, &self.ns, &self.limits, true) {
            Ok(request) => request,
            Err(status) => return Ok(status),
        };
        let kind = request.kind;
        let mut result = self.complete(kind, request.op)?;
        if result.is_ok() && request.flush_after {
            result = self.complete(kind, IoOp::Flush)?;
        }
        Ok(match result {
            Ok(()) => Status::SUCCESS,
            Err(e) => io_error_status(kind, &e),
        })
    }

    /// Runs `op` to completion (bounded).
    fn complete(&mut self, kind: IoKind, op: IoOp) -> Result<std::io::Result<()>, String> {
        if let Some(IoCompletion { result, .. }) = self.io.submit(kind, op) {
            return Ok(result);
        }
        self.io.commit();
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(done) = self.io.reap().pop() {
                return Ok(done.result);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err("the command was not answered in 10 s".into())
    }
}

/// The `nvme_command` seed for `command` (mode 0: the I/O parser and walker; the data pointer
/// rewritten to an SGL over the target's memory, the data at 0x1000); `None` if it does not
/// fit the target's 64 KiB.
pub fn nvme_command_seed(command: &TracedCommand) -> Option<Vec<u8>> {
    let (cmd, len) = reissued(command, SEED_DATA);
    if SEED_DATA as usize + len > SEED_MEMORY {
        return None;
    }
    let mut seed = vec![0u8];
    seed.extend_from_slice(&cmd.0);
    if let TracedData::ToDevice(bytes) = &command.data {
        // The target zero-fills the memory the input does not cover.
        seed.resize(1 + 64 + SEED_DATA as usize, 0);
        seed.extend_from_slice(bytes);
    }
    Some(seed)
}

/// Writes `command`'s seed into `dir`, named by its hash; whether a new file was written.
fn write_seed(dir: &Path, command: &TracedCommand) -> Result<bool, RerunError> {
    let Some(seed) = nvme_command_seed(command) else {
        return Ok(false);
    };
    let path = dir.join(format!("nq-{:016x}", fnv1a(&seed)));
    if path.exists() {
        return Ok(false);
    }
    std::fs::write(&path, &seed).map_err(|source| RerunError::Open {
        path: path.display().to_string(),
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests;
