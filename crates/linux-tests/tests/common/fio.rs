//! fio in the guest: the job command line, its summary, and a host-side check of the blocks it
//! left on the disk image.
//!
//! With `--verify=crc32c` every block fio writes starts with a verify header (fio 3.33,
//! verify.h): magic 0xacca (u16), verify type (u16, 5 = crc32c), block length (u32), random
//! seed (u64), the block's byte offset on the device (u64), time (2 x u32), job number (u16),
//! I/O number (u16), then a crc32c of those 36 bytes (u32); a crc32c of the data after the
//! 44-byte header follows at byte 40. fio's crc32c starts from !0 and is not inverted at the end.
//! So the host can prove, without fio, that each written block landed at the offset it was
//! written to with the bytes it was written with. Measured against fio 3.33 on the host.
//!
//! crc32c is written out here (bitwise, ~10 lines) because no crc crate is in the workspace
//! and speed does not matter for 256 MiB in a test.

use std::io::Read;
use std::path::Path;

pub const BLOCK_SIZE: usize = 4096;
const MAGIC: u16 = 0xacca;
const VERIFY_CRC32C: u16 = 5;
const VERIFY_CRC32C_INTEL: u16 = 6;
const HEADER_CRC_LEN: usize = 36;
const DATA_START: usize = 44;

/// A randrw job with crc32c verification over the whole disk: `jobs` jobs, each on its own
/// `region_mib` region (so the blocks of different jobs never overlap), each moving `io_mib`,
/// job n pinned to vCPU n (blk-mq maps each vCPU to its own hardware queue when there are
/// enough). Afterwards the guest prints `SLUICE-HW-QUEUES=<n>`: the queues the driver set up.
#[derive(Clone, Copy, Debug)]
pub struct FioJob {
    pub jobs: u32,
    pub region_mib: u32,
    pub io_mib: u32,
}

impl FioJob {
    /// Random reads and writes, every read verified (the vhost-user tests' job).
    pub fn command(&self) -> String {
        self.command_with("vda", "randrw", "")
    }

    /// Random writes, then a verify pass reading every written block back. With `io_mib`
    /// equal to `region_mib`, fio's random map writes every block of each region exactly once.
    pub fn randwrite_command(&self) -> String {
        self.randwrite_command_on("vda")
    }

    /// `randwrite_command` on the block device `/dev/<disk>` (e.g. `nvme0n1`).
    pub fn randwrite_command_on(&self, disk: &str) -> String {
        self.command_with(disk, "randwrite", "")
    }

    /// Only the verify pass of `randwrite_command` (same offsets, seeds and headers), writing
    /// nothing: it checks what an earlier run left on the disk.
    pub fn verify_only_command(&self) -> String {
        self.command_with("vda", "randwrite", " --verify_only")
    }

    fn command_with(&self, disk: &str, rw: &str, extra: &str) -> String {
        format!(
            "fio --name=sluice --filename=/dev/{disk} --direct=1 --ioengine=libaio --rw={rw} \
             --bs={BLOCK_SIZE} --iodepth=16 --numjobs={jobs} --size={region}M \
             --offset_increment={region}M --io_size={io}M --verify=crc32c --verify_fatal=1 \
             --cpus_allowed=0-{last_cpu} --cpus_allowed_policy=split --eta=never \
             --group_reporting{extra}; status=$?; \
             echo SLUICE-HW-QUEUES=$(ls /sys/block/{disk}/mq | wc -l); exit $status",
            jobs = self.jobs,
            region = self.region_mib,
            io = self.io_mib,
            last_cpu = self.jobs.saturating_sub(1),
        )
    }
}

/// The `SLUICE-HW-QUEUES=` count the job command prints.
pub fn hardware_queues(console: &str) -> Option<u32> {
    console
        .lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix("SLUICE-HW-QUEUES=")?.parse().ok())
}

/// `issued rwts: total=R,W,T,X` from fio's (group) report: the number of reads and writes.
pub fn issued_reads_writes(report: &str) -> Option<(u64, u64)> {
    let line = report.lines().find(|l| l.contains("issued rwts: total="))?;
    let totals = line.split("total=").nth(1)?.split_whitespace().next()?;
    let mut numbers = totals.split(',').map(|n| n.parse::<u64>().ok());
    Some((numbers.next()??, numbers.next()??))
}

/// fio's crc32c: Castagnoli polynomial (reflected 0x82f63b78), initial value !0, no final xor.
pub fn fio_crc32c(data: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn le16(block: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([block[at], block[at + 1]])
}

fn le32(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(block: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"))
}

/// Why one non-zero block is not a valid fio block for its offset, or None if it is.
pub fn check_block(block: &[u8; BLOCK_SIZE], offset: u64) -> Option<String> {
    let magic = le16(block, 0);
    if magic != MAGIC {
        return Some(format!("no fio header (magic {magic:#06x})"));
    }
    let kind = le16(block, 2);
    if kind != VERIFY_CRC32C && kind != VERIFY_CRC32C_INTEL {
        return Some(format!("verify type {kind}, not crc32c"));
    }
    let len = le32(block, 4) as usize;
    if len != BLOCK_SIZE {
        return Some(format!("block length {len}"));
    }
    if fio_crc32c(&block[..HEADER_CRC_LEN]) != le32(block, HEADER_CRC_LEN) {
        return Some("header crc mismatch".into());
    }
    let written_at = le64(block, 16);
    if written_at != offset {
        return Some(format!("written for offset {written_at:#x}"));
    }
    if fio_crc32c(&block[DATA_START..]) != le32(block, 40) {
        return Some("data crc mismatch".into());
    }
    None
}

/// What the host found on the disk image.
#[derive(Debug, Default)]
pub struct ImageScan {
    pub fio_blocks: u64,
    pub zero_blocks: u64,
    /// (offset, reason) of the first few bad blocks.
    pub bad: Vec<(u64, String)>,
    pub bad_count: u64,
}

/// Checks every 4 KiB block of the image: all zeros (never written) or a valid fio block.
pub fn scan_image(path: &Path) -> std::io::Result<ImageScan> {
    let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut scan = ImageScan::default();
    let mut block = [0u8; BLOCK_SIZE];
    let mut offset = 0u64;
    loop {
        match file.read_exact(&mut block) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        if block.iter().all(|&b| b == 0) {
            scan.zero_blocks += 1;
        } else if let Some(reason) = check_block(&block, offset) {
            scan.bad_count += 1;
            if scan.bad.len() < 8 {
                scan.bad.push((offset, reason));
            }
        } else {
            scan.fio_blocks += 1;
        }
        offset += BLOCK_SIZE as u64;
    }
    Ok(scan)
}
