//! Device-level replay of a virtio-blk request log ([`super::trace`]): `sluice replay --device
//! LOG`. No VM: the device model's queue handler, a disk image of the logged shape (a fresh,
//! all-zero one unless the caller gives a copy of the original), and a split ring in private
//! memory that this module drives as the guest's driver did. Each logged chain is laid out
//! again (same buffers in the same order, the logged bytes in the readable ones, buffers that
//! were outside guest memory outside it again), published, and run to its answer one at a
//! time, in the log's order (the order the recording answered them); the answer — used length,
//! status byte, hash of the data written — must equal the logged one. The first difference
//! stops the re-run and is reported.
//!
//! Each chain can also become a seed of the `blk_request` fuzz target (docs/fuzzing.md): the
//! 64 KiB memory image that target parses, with the chain at descriptor 0.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_dma::DmaSpace;
use sluice_virtio::{QueueContext, QueueHandler, QueueMetrics, VirtQueue};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::trace::{
    fnv1a, written_bytes, TraceError, TraceReader, TracedBuffer, TracedRequest, MAX_BUFFERS,
    MAX_CHAIN_BYTES,
};
use super::{Block, BlockConfig, BlockError};

/// The re-run ring: room for the longest logged chain as direct descriptors.
const RING_SIZE: u16 = MAX_BUFFERS as u16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const BUFFER_BASE: u64 = 0x1_0000;
/// Buffers are 512-aligned: at most one sector of padding each.
const RAM_SIZE: usize = BUFFER_BASE as usize + MAX_CHAIN_BYTES as usize + MAX_BUFFERS * 512;
/// Where a buffer that was outside guest memory goes (outside this memory too).
const OUTSIDE: u64 = 1 << 40;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The `blk_request` fuzz target's memory (see `parse_request_for_fuzz`).
const SEED_MEMORY: usize = 0x1_0000;
const SEED_QUEUE_SIZE: usize = 16;
const SEED_AVAIL: usize = 0x100;
const SEED_BUFFERS: u64 = 0x1000;

/// What to re-run against and what to write.
#[derive(Debug, Clone, Default)]
pub struct RerunOptions {
    /// A copy of the disk the recording started from; `None`: a fresh all-zero image of the
    /// logged size (in the system's temporary directory, removed afterwards).
    pub image: Option<PathBuf>,
    /// Write each logged chain as a `blk_request` fuzz seed into this directory.
    pub corpus: Option<PathBuf>,
}

/// How a re-run went.
#[derive(Debug, Clone, Default)]
pub struct RerunReport {
    /// Requests re-run with the logged answer.
    pub matched: u64,
    /// The first request whose answer differed.
    pub mismatch: Option<Mismatch>,
    /// Seeds written (distinct ones; a chain that does not fit the fuzz target's 64 KiB is
    /// not written).
    pub seeds: u64,
    /// Records not re-run (NVMe: commands refused by their data-pointer walk, which needs the
    /// guest's memory).
    pub skipped: u64,
    pub elapsed: Duration,
}

/// A request whose answer differed from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// 1-based position in the log.
    pub request: u64,
    pub queue: u16,
    pub what: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device re-run diverged at request #{} (queue {}): {}",
            self.request, self.queue, self.what
        )
    }
}

/// Why a re-run could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RerunError {
    #[error("{path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] TraceError),
    #[error("the logged device: {0}")]
    Device(#[from] BlockError),
    #[error("{0}")]
    Setup(String),
}

/// The request log at `log`, buffered (shared with the NVMe re-run).
pub(crate) fn open_log(log: &Path) -> Result<std::io::BufReader<std::fs::File>, RerunError> {
    std::fs::File::open(log)
        .map(std::io::BufReader::new)
        .map_err(|source| RerunError::Open {
            path: log.display().to_string(),
            source,
        })
}

/// A zeroed image of `bytes` for a re-run without `--image`, removed when dropped.
pub(crate) fn scratch_image(bytes: u64) -> Result<TempFile, RerunError> {
    let setup = |e: &dyn std::fmt::Display| RerunError::Setup(format!("a scratch image: {e}"));
    let scratch = TempFile::new_with_prefix(std::env::temp_dir().join("sluice-rerun-"))
        .map_err(|e| setup(&e))?;
    scratch.as_file().set_len(bytes).map_err(|e| setup(&e))?;
    Ok(scratch)
}

/// The `--corpus` directory, created if asked for.
pub(crate) fn create_corpus_dir(options: &RerunOptions) -> Result<(), RerunError> {
    let Some(dir) = &options.corpus else {
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(|source| RerunError::Open {
        path: dir.display().to_string(),
        source,
    })
}

/// Re-runs the request log at `log` (see the module documentation).
pub fn rerun(log: &Path, options: &RerunOptions) -> Result<RerunReport, RerunError> {
    let started = Instant::now();
    let open = || open_log(log);
    // The whole log is read once first: a corrupt record is refused before anything runs,
    // not met half-way.
    let mut check = TraceReader::new(open()?)?;
    while check.next_request()?.is_some() {}
    let mut reader = TraceReader::new(open()?)?;
    let header = reader.header;
    let (image, _scratch) = match &options.image {
        Some(path) => (path.clone(), None),
        None => {
            let bytes = header.capacity_sectors.checked_mul(512).ok_or_else(|| {
                RerunError::Setup(format!("capacity of {} sectors", header.capacity_sectors))
            })?;
            // Removed when dropped, at the end of the re-run.
            let scratch = scratch_image(bytes)?;
            (scratch.as_path().to_path_buf(), Some(scratch))
        }
    };
    let mut config = BlockConfig::new(&image);
    config.read_only = header.read_only;
    config.queue_size = header.queue_size;
    config.logical_block_size = Some(header.block_size);
    let serial_len = header.serial.iter().position(|&b| b == 0).unwrap_or(20);
    config.serial = String::from_utf8_lossy(&header.serial[..serial_len]).into_owned();
    let block = Block::new(config)?;
    if block.capacity_sectors() != header.capacity_sectors {
        return Err(RerunError::Setup(format!(
            "{} has {} sectors, the log's disk {}",
            image.display(),
            block.capacity_sectors(),
            header.capacity_sectors
        )));
    }
    create_corpus_dir(options)?;
    let mut driver = Driver::new()?;
    let mut handler = block.queue_handler(RING_SIZE);
    let mut report = RerunReport::default();
    let mut position = 0u64;
    while let Some(request) = reader.next_request()? {
        position += 1;
        if let Some(dir) = &options.corpus {
            report.seeds += u64::from(write_seed(dir, &request, header.read_only)?);
        }
        if let Err(what) = driver.run(&mut handler, &request) {
            report.mismatch = Some(Mismatch {
                request: position,
                queue: request.queue,
                what,
            });
            break;
        }
        report.matched += 1;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The driver side of the re-run ring.
struct Driver {
    mem: GuestMemoryMmap,
    space: DmaSpace,
    queue: VirtQueue,
    metrics: QueueMetrics,
    /// Chains published so far (the avail index).
    published: u16,
}

impl Driver {
    fn new() -> Result<Self, RerunError> {
        let setup = |e: String| RerunError::Setup(e);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)])
            .map_err(|e| setup(format!("re-run memory: {e}")))?;
        let mut queue = Queue::new(RING_SIZE).map_err(|e| setup(format!("re-run ring: {e}")))?;
        queue.set_size(RING_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        let space = sluice_dma::identity(mem.clone());
        Ok(Self {
            mem,
            space,
            queue: VirtQueue::from(queue),
            metrics: QueueMetrics::default(),
            published: 0,
        })
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| format!("re-run memory: {e}"))
    }

    fn read_u32(&self, addr: u64) -> Result<u32, String> {
        self.mem
            .read_obj(GuestAddress(addr))
            .map_err(|e| format!("re-run memory: {e}"))
    }

    /// Lays `request`'s chain out at descriptor 0, publishes it, runs the handler until it is
    /// answered and compares the answer with the log's.
    fn run(
        &mut self,
        handler: &mut super::BlockQueueHandler,
        request: &TracedRequest,
    ) -> Result<(), String> {
        let (placed, used_len) = self.exchange(handler, &request.buffers)?;
        let expected = request.answer;
        if used_len != expected.used_len {
            return Err(format!(
                "used length {used_len}, the log has {}",
                expected.used_len
            ));
        }
        let writable = writable_buffers(&request.buffers, &placed);
        let status = self.status_byte(&writable, used_len);
        if expected.status.is_some() && status != expected.status {
            return Err(format!(
                "status {status:?}, the log has {:?}",
                expected.status
            ));
        }
        let data = written_bytes(&self.space, &writable, used_len.saturating_sub(1));
        if fnv1a(&data) != expected.data_hash {
            return Err(format!(
                "the {} bytes written differ from the logged ones (hash {:#018x}, the log has \
                 {:#018x})",
                data.len(),
                fnv1a(&data),
                expected.data_hash
            ));
        }
        Ok(())
    }

    /// The status byte: the last byte of the last writable buffer (the parser's rule), if
    /// the device answered with one.
    fn status_byte(&self, writable: &[(GuestAddress, u32)], used_len: u32) -> Option<u8> {
        let &(addr, len) = writable
            .last()
            .filter(|(_, len)| *len > 0 && used_len > 0)?;
        self.mem
            .read_obj::<u8>(GuestAddress(addr.0 + u64::from(len) - 1))
            .ok()
    }

    /// Publishes `buffers` as one chain at descriptor 0 (readable ones with their bytes) and
    /// runs the handler until it is answered; returns where the buffers went and the used
    /// length.
    fn exchange(
        &mut self,
        handler: &mut super::BlockQueueHandler,
        buffers: &[TracedBuffer],
    ) -> Result<(Vec<u64>, u32), String> {
        let placed = layout(buffers, BUFFER_BASE, OUTSIDE)
            .ok_or("a chain with no buffers or over the re-run memory")?;
        for (i, (buffer, &addr)) in buffers.iter().zip(&placed).enumerate() {
            match buffer {
                TracedBuffer::Readable(bytes) => self.write(addr, bytes)?,
                TracedBuffer::Writable(len) => self.write(addr, &vec![0; *len as usize])?,
                TracedBuffer::Outside { .. } => {}
            }
            let last = i + 1 == placed.len();
            self.write(
                DESC_TABLE + 16 * i as u64,
                &descriptor(addr, buffer, last, i as u16 + 1),
            )?;
        }
        let slot = u64::from(self.published % RING_SIZE);
        self.write(AVAIL_RING + 4 + 2 * slot, &0u16.to_le_bytes())?;
        self.published = self.published.wrapping_add(1);
        self.write(AVAIL_RING + 2, &self.published.to_le_bytes())?;
        self.answer(handler)?;
        let slot = u64::from(self.published.wrapping_sub(1) % RING_SIZE);
        let head = self.read_u32(USED_RING + 4 + 8 * slot)?;
        let used_len = self.read_u32(USED_RING + 8 + 8 * slot)?;
        if head != 0 {
            return Err(format!(
                "the device answered descriptor {head}, not the chain at 0"
            ));
        }
        Ok((placed, used_len))
    }

    /// Runs the handler until the used index reaches the avail index (bounded).
    fn answer(&mut self, handler: &mut super::BlockQueueHandler) -> Result<(), String> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut ctx = QueueContext {
            queue: &mut self.queue,
            mem: &self.space,
            metrics: &self.metrics,
        };
        handler
            .process(&mut ctx)
            .map_err(|e| format!("the device's queue failed: {e}"))?;
        loop {
            let used: u16 = self
                .mem
                .read_obj(GuestAddress(USED_RING + 2))
                .map_err(|e| format!("re-run memory: {e}"))?;
            if used == self.published {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("the request was not answered in 10 s".into());
            }
            match handler.completion_fd() {
                Some(fd) => wait_readable(fd),
                None => return Err("the device took the chain and never answered it".into()),
            }
            handler
                .complete(&mut ctx)
                .map_err(|e| format!("the device's queue failed: {e}"))?;
        }
    }
}

fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack for the duration of the call.
    unsafe { libc::poll(&raw mut pfd, 1, 100) };
}

/// The writable buffers of a chain laid out at `placed` (outside ones left out).
fn writable_buffers(buffers: &[TracedBuffer], placed: &[u64]) -> Vec<(GuestAddress, u32)> {
    buffers
        .iter()
        .zip(placed)
        .filter(|(b, _)| matches!(b, TracedBuffer::Writable(_)))
        .map(|(b, &addr)| (GuestAddress(addr), b.len()))
        .collect()
}

/// A split descriptor: buffer `i` of a chain, linked to `next` unless `last`.
fn descriptor(addr: u64, buffer: &TracedBuffer, last: bool, next: u16) -> [u8; 16] {
    let mut flags = if buffer.writable() {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    if !last {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&buffer.len().to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&(if last { 0 } else { next }).to_le_bytes());
    raw
}

/// Addresses for `buffers` from `base` up (512-aligned, so O_DIRECT-sized buffers stay
/// aligned), buffers that were outside memory at `outside`; `None` for an empty chain or one
/// over [`MAX_CHAIN_BYTES`] or [`MAX_BUFFERS`].
fn layout(buffers: &[TracedBuffer], base: u64, outside: u64) -> Option<Vec<u64>> {
    if buffers.is_empty() || buffers.len() > MAX_BUFFERS {
        return None;
    }
    let mut next = base;
    let mut placed = Vec::with_capacity(buffers.len());
    for buffer in buffers {
        if let TracedBuffer::Outside { .. } = buffer {
            placed.push(outside);
            continue;
        }
        placed.push(next);
        next = (next + u64::from(buffer.len()) + 511) & !511;
    }
    (next - base <= MAX_CHAIN_BYTES + 512 * MAX_BUFFERS as u64).then_some(placed)
}

/// The `blk_request` seed for `request`: the fuzz target's 64 KiB memory with the chain at
/// descriptor 0 (avail ring at 0x100, buffers from 0x1000; the first byte, descriptor 0's
/// address, is 1 for a read-only disk as the target reads it). `None` if it does not fit.
pub fn blk_request_seed(request: &TracedRequest, read_only: bool) -> Option<Vec<u8>> {
    if request.buffers.len() > SEED_QUEUE_SIZE {
        return None;
    }
    let base = SEED_BUFFERS + u64::from(read_only);
    let placed = layout(&request.buffers, base, OUTSIDE)?;
    let mut memory = vec![0u8; SEED_MEMORY];
    let mut end = SEED_AVAIL + 6;
    for (i, (buffer, &addr)) in request.buffers.iter().zip(&placed).enumerate() {
        let last = i + 1 == placed.len();
        memory[16 * i..16 * i + 16].copy_from_slice(&descriptor(addr, buffer, last, i as u16 + 1));
        if let TracedBuffer::Readable(bytes) = buffer {
            let at = usize::try_from(addr).ok()?;
            memory.get_mut(at..at + bytes.len())?.copy_from_slice(bytes);
            end = end.max(at + bytes.len());
        } else if !matches!(buffer, TracedBuffer::Outside { .. }) {
            let at = usize::try_from(addr + u64::from(buffer.len())).ok()?;
            if at > SEED_MEMORY {
                return None;
            }
        }
    }
    memory[SEED_AVAIL + 2..SEED_AVAIL + 4].copy_from_slice(&1u16.to_le_bytes());
    // The target zero-fills what the input does not cover: the seed ends at its last
    // meaningful byte.
    memory.truncate(end);
    Some(memory)
}

/// Writes `request`'s seed into `dir`, named by its hash (so equal chains make one file);
/// returns whether a new file was written.
fn write_seed(dir: &Path, request: &TracedRequest, read_only: bool) -> Result<bool, RerunError> {
    let Some(seed) = blk_request_seed(request, read_only) else {
        return Ok(false);
    };
    let path = dir.join(format!("rq-{:016x}", fnv1a(&seed)));
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
