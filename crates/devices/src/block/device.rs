//! The virtio-blk device: configuration, feature bits, the `virtio_blk_config` space, and one
//! [`BlockQueueHandler`] per queue (the framework runs each on its own queue worker).

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;

use sluice_virtio::{ActivateError, DeviceMetrics, QueueHandler, VirtioDevice, DEVICE_TYPE_BLOCK};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use sluice_qos::{GuestId, Qos};
use sluice_storage::{DiskImage, ImageError, IoEngine, MAX_BLOCK_SIZE};

use super::handler::BlockQueueHandler;
use super::request::{DiskLimits, ID_BYTES, SECTOR_SIZE};

/// Largest queue the device offers (the split-ring maximum).
const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest data segment the driver may use (`size_max`).
const SIZE_MAX: u32 = 1 << 20;
/// Upper bound on `seg_max` whatever the queue size.
const SEG_MAX_LIMIT: u32 = 254;
/// Segments per discard / write-zeroes request.
const MAX_DISCARD_SEG: u32 = 16;
/// Sectors per discard / write-zeroes segment.
const MAX_DISCARD_SECTORS: u32 = u32::MAX;
/// Bytes of `virtio_blk_config` the device fills in (through `write_zeroes_may_unmap`).
const CONFIG_SPACE_SIZE: usize = 60;

/// How to build a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Disk image (regular file or block device).
    pub path: PathBuf,
    pub read_only: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    pub queues: u16,
    pub queue_size: u16,
    /// GET_ID answer, at most 20 bytes.
    pub serial: String,
    /// Block size the guest sees (`blk_size`), a power of two in 512..=4096; `None`: the
    /// host's ([`DiskImage::host_block_size`]). With O_DIRECT it may not be smaller than that.
    pub logical_block_size: Option<u32>,
    pub io_engine: IoEngine,
}

impl BlockConfig {
    /// One queue of 256 entries, read-write, page cache, the host's block size, io_uring if
    /// possible.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlockConfig {
            path: path.into(),
            read_only: false,
            direct: false,
            queues: 1,
            queue_size: 256,
            serial: String::new(),
            logical_block_size: None,
            io_engine: IoEngine::Auto,
        }
    }
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("serial is {0} bytes, at most 20 are allowed")]
    SerialTooLong(usize),
    #[error("queue count {0} must be 1..=65535")]
    QueueCount(u16),
    #[error("queue size {0} must be a power of two in 2..=32768")]
    QueueSize(u16),
    #[error("logical block size {0} must be a power of two in 512..=4096")]
    BlockSize(u32),
    #[error(
        "logical block size {requested} is smaller than the {host} bytes {path} needs with \
         direct=on"
    )]
    BlockSizeBelowHost {
        path: PathBuf,
        requested: u32,
        host: u32,
    },
}

/// A virtio-blk device backed by a disk image.
pub struct Block {
    config: BlockConfig,
    image: Arc<DiskImage>,
    limits: DiskLimits,
    serial: [u8; ID_BYTES],
    engine: IoEngine,
    metrics: Arc<DeviceMetrics>,
    /// The shared scheduler this disk's queues go through, and the disk's guest in it.
    scheduler: Option<(Arc<Qos>, GuestId)>,
    /// Where every queue started from now on logs the chains it answers (`requests=`).
    request_log: Option<Arc<super::trace::RequestLog>>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("config", &self.config)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Validates `config`, opens and locks the image, and picks the I/O engine.
    pub fn new(config: BlockConfig) -> Result<Block, BlockError> {
        validate(&config)?;
        let serial = serial_bytes(&config.serial)?;
        let image = DiskImage::open(&config.path, config.read_only, config.direct)?;
        let mut config = config;
        config.logical_block_size = Some(block_size_for(&config, &image)?);
        let limits = limits_for(&config, image.size());
        let engine = config.io_engine.resolve();
        tracing::info!(
            "virtio-blk {}: {} sectors of 512 bytes, {}-byte blocks{}, I/O through {}",
            config.path.display(),
            limits.capacity_sectors,
            config.logical_block_size.unwrap_or(512),
            if config.read_only { ", read-only" } else { "" },
            match engine {
                IoEngine::Sync => "synchronous preadv/pwritev",
                _ => "io_uring",
            }
        );
        let name = format!(
            "blk:{}",
            config
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let metrics = Arc::new(DeviceMetrics::new(name, usize::from(config.queues)));
        Ok(Block {
            config,
            image: Arc::new(image),
            limits,
            serial,
            engine,
            metrics,
            scheduler: None,
            request_log: None,
        })
    }

    /// Puts every queue started from now on behind `qos`, as its guest `guest` (a shared
    /// backend: weights, limits and priorities against the other disks on the scheduler).
    pub fn join_scheduler(&mut self, qos: Arc<Qos>, guest: GuestId) {
        self.scheduler = Some((qos, guest));
    }

    /// Logs every chain the queues started from now on answer into `log` (see
    /// [`super::trace`]).
    pub fn log_requests(&mut self, log: Arc<super::trace::RequestLog>) {
        self.request_log = Some(log);
    }

    /// The device's shape as a request log's header records it.
    pub fn trace_header(&self) -> super::trace::TraceHeader {
        super::trace::TraceHeader {
            capacity_sectors: self.limits.capacity_sectors,
            block_size: self.block_size(),
            read_only: self.config.read_only,
            serial: self.serial,
            queue_size: self.config.queue_size,
        }
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.limits.capacity_sectors
    }

    /// The engine chosen at creation (`IoUring` or `Sync`, never `Auto`).
    pub fn io_engine(&self) -> IoEngine {
        self.engine
    }

    /// The request limits the device advertises and enforces.
    pub fn limits(&self) -> DiskLimits {
        self.limits
    }

    /// The logical block size the guest sees (`blk_size`).
    pub fn block_size(&self) -> u32 {
        self.config.logical_block_size.unwrap_or(SECTOR_SIZE as u32)
    }

    /// A queue handler over this device's image (for a worker, a vhost-user backend, or tests).
    pub fn queue_handler(&self, queue_size: u16) -> BlockQueueHandler {
        BlockQueueHandler::new(
            Arc::clone(&self.image),
            self.limits,
            self.serial,
            self.engine,
            queue_size,
        )
    }

    /// The `virtio_blk_config` structure, little endian.
    fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut space = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            space[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        let limits = &self.limits;
        put(0, &limits.capacity_sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &limits.seg_max.to_le_bytes());
        let block_size = self.block_size();
        put(20, &block_size.to_le_bytes());
        put(34, &self.config.queues.to_le_bytes());
        let alignment = block_size / SECTOR_SIZE as u32;
        if !limits.read_only {
            put(36, &limits.max_discard_sectors.to_le_bytes());
            put(40, &limits.max_discard_seg.to_le_bytes());
            put(44, &alignment.to_le_bytes());
            put(48, &limits.max_write_zeroes_sectors.to_le_bytes());
            put(52, &limits.max_write_zeroes_seg.to_le_bytes());
            put(56, &[1]); // write_zeroes_may_unmap
        }
        space
    }
}

fn validate(config: &BlockConfig) -> Result<(), BlockError> {
    if config.queues == 0 {
        return Err(BlockError::QueueCount(config.queues));
    }
    let size = config.queue_size;
    if !size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&size) {
        return Err(BlockError::QueueSize(size));
    }
    if let Some(block) = config.logical_block_size {
        if !block.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block) {
            return Err(BlockError::BlockSize(block));
        }
    }
    Ok(())
}

/// The block size to advertise: the one asked for, else the host's. O_DIRECT fails I/O that is
/// not aligned to the host's block, so with direct=on a smaller one is refused.
fn block_size_for(config: &BlockConfig, image: &DiskImage) -> Result<u32, BlockError> {
    let host = image.host_block_size();
    let requested = config.logical_block_size.unwrap_or(host);
    if config.direct && requested < host {
        return Err(BlockError::BlockSizeBelowHost {
            path: config.path.clone(),
            requested,
            host,
        });
    }
    if !requested.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&requested) {
        return Err(BlockError::BlockSize(requested));
    }
    Ok(requested)
}

fn serial_bytes(serial: &str) -> Result<[u8; ID_BYTES], BlockError> {
    let bytes = serial.as_bytes();
    if bytes.len() > ID_BYTES {
        return Err(BlockError::SerialTooLong(bytes.len()));
    }
    let mut out = [0u8; ID_BYTES];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

fn limits_for(config: &BlockConfig, size: u64) -> DiskLimits {
    // Room for the header and status descriptors in a direct (non-indirect) chain.
    let seg_max = u32::from(config.queue_size)
        .saturating_sub(2)
        .clamp(1, SEG_MAX_LIMIT);
    DiskLimits {
        capacity_sectors: size / SECTOR_SIZE,
        read_only: config.read_only,
        seg_max,
        max_request_bytes: u64::from(seg_max) * u64::from(SIZE_MAX),
        max_discard_seg: MAX_DISCARD_SEG,
        max_discard_sectors: MAX_DISCARD_SECTORS,
        max_write_zeroes_seg: MAX_DISCARD_SEG,
        max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
    }
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size; usize::from(self.config.queues)]
    }

    fn device_features(&self) -> u64 {
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.config.read_only {
            features |= bit(VIRTIO_BLK_F_RO);
        } else {
            features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if self.config.queues > 1 {
            features |= bit(VIRTIO_BLK_F_MQ);
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| space.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only without VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        tracing::debug!(
            "virtio-blk: ignored config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    /// With MQ a driver may use fewer queues than offered (Linux: one per vCPU).
    fn queue_count_range(&self) -> RangeInclusive<usize> {
        1..=usize::from(self.config.queues)
    }

    fn queue_handler(
        &mut self,
        index: u16,
        size: u16,
    ) -> Result<Box<dyn QueueHandler>, ActivateError> {
        if index >= self.config.queues {
            return Err(ActivateError::NoSuchQueue(index));
        }
        let mut handler = Block::queue_handler(self, size);
        if let Some(log) = &self.request_log {
            handler = handler.with_request_log(Arc::clone(log), index);
        }
        let Some((qos, guest)) = &self.scheduler else {
            return Ok(Box::new(handler));
        };
        let port = qos.port(*guest).map_err(ActivateError::Worker)?;
        let handler = handler
            .with_scheduler(port)
            .map_err(ActivateError::Worker)?;
        Ok(Box::new(handler))
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        Arc::clone(&self.metrics)
    }
}
