//! Live migration between two sluice processes: pre-copy of guest RAM while the VM runs, then
//! a short stop-and-copy of what changed plus the snapshot's [`MachineState`].
//!
//! * **Source** ([`send`], `PUT /api/v1/vm.send-migration`): turns on dirty tracking
//!   ([`tracking`]: KVM's dirty log for vCPU writes, sluice-dma's page log for device writes),
//!   sends every non-zero page (round 0), then rounds of the pages dirtied meanwhile until a
//!   round is small ([`DIRTY_THRESHOLD`] pages) or stops shrinking. When rounds stop
//!   converging it throttles the vCPUs (auto-converge: parked for 20 %, then 40, 60, 80 % of
//!   every 100 ms). Then it pauses the VM, captures its state until the devices are quiet (the
//!   snapshot's capture: virtio queues quiesce, requests in flight complete), drops its image
//!   locks, sends the last dirty pages, every page a device acquired for writing and the
//!   state, and waits for the destination's `Ack`. Success ends the VM here with
//!   [`VmOutcome::Migrated`](crate::vcpu::VmOutcome::Migrated); any failure after the pause
//!   takes the image locks back and resumes the VM here, so a failed migration loses nothing —
//!   unless another process holds them by then (a destination running the VM whose `Ack` was
//!   lost): two VMs writing one disk would corrupt it, so the source then stops instead.
//! * **Destination** ([`Incoming`], `sluice run --migrate-from URL`): listens, takes one
//!   connection, reads `Hello` (vCPUs and RAM size give the machine's shape), then builds the
//!   VM like a restore: RAM from the stream, state from its `State`, devices restored, vCPUs
//!   started, and `Ack` with the wall-clock time they resumed.
//!
//! Downtime is measured from the source's pause to the destination's resume, both read from
//! CLOCK_REALTIME on this host (the two processes share the clock).
//!
//! What is refused: everything a snapshot refuses (VFIO, the vIOMMU, the test device, a VM
//! changed by hot-plug) — the device dirty log covers exactly the devices that remain
//! (virtio-blk on an image, virtio-net, virtio-rng, NVMe, the e1000: its receive buffers and
//! descriptor write-backs; see sluice_dma::dirty for the write
//! paths: virtio-net writes guest memory only through chains it popped — received frames,
//! their `num_buffers`, control acks — and the used ring, all marked; the TPM writes no guest
//! memory: its buffer is in the device, its state travels in the machine state) — and vhost-user disks
//! whose backend cannot log its writes (no VHOST_USER_PROTOCOL_F_LOG_SHMFD or VHOST_F_LOG_ALL).
//! A vhost-user disk's backend logs into a bitmap the source reads each round
//! (`sluice_devices::vhost_user_blk::migration`); at the stop-and-copy it is quiesced and
//! handed over with the image locks (its connection closes, so the destination's frontend can
//! own it when it builds the VM), and a failure takes it back (the frontend reconnects).
//! virtio-net's RX side takes frames from the tap on its own, so the captured rings stay
//! stopped until the VM runs on (only a failed migration resumes it here): a frame that
//! reaches the source's tap after the capture is not in the guest, and lost as on any link;
//! what was read before is carried.
//!
//! Progress (crate::progress): the source shows round 0 (RAM scanned), each dirty round and the
//! stop-and-copy as rounds, the destination what it received.
//! Transports: `unix:PATH` and `tcp:HOST:PORT`, unencrypted and unauthenticated (on one host).

pub mod fuzz;
pub mod protocol;
mod source;
pub mod tracking;

#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

pub(crate) use source::send;
pub use source::{MigrationReport, DIRTY_THRESHOLD};

use crate::memory::GuestRam;
use crate::snapshot::MachineState;
use protocol::{Hello, PageSink, ProtocolError};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("bad migration URL `{0}`: expected unix:PATH or tcp:HOST:PORT")]
    Url(String),
    #[error("migration connection at {url}: {source}")]
    Connect { url: String, source: io::Error },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the destination did not acknowledge: {0}")]
    NoAck(String),
    #[error("dirty tracking: {0}")]
    Tracking(String),
    #[error("the VM: {0}")]
    Vm(String),
    /// Failed after the hand-over, and the VM cannot safely run on at the source either.
    #[error("{0}")]
    Abandoned(String),
}

impl From<io::Error> for MigrationError {
    fn from(e: io::Error) -> Self {
        MigrationError::Protocol(ProtocolError::Io(e))
    }
}

/// Where the stream goes (source) or comes from (destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    Tcp(String),
}

impl MigrationUrl {
    pub fn parse(url: &str) -> Result<Self, MigrationError> {
        let bad = || MigrationError::Url(url.to_string());
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(MigrationUrl::Unix(PathBuf::from(path)));
        }
        if let Some(address) = url.strip_prefix("tcp:") {
            let port_ok = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(bad());
            }
            return Ok(MigrationUrl::Tcp(address.to_string()));
        }
        Err(bad())
    }

    fn describe(&self) -> String {
        match self {
            MigrationUrl::Unix(path) => format!("unix:{}", path.display()),
            MigrationUrl::Tcp(address) => format!("tcp:{address}"),
        }
    }

    pub(crate) fn connect(&self) -> Result<Stream, MigrationError> {
        let connect = |source| MigrationError::Connect {
            url: self.describe(),
            source,
        };
        match self {
            MigrationUrl::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            MigrationUrl::Tcp(address) => TcpStream::connect(address).map(|s| {
                // Frames are written whole through a buffer; no need to wait for more.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
        .map_err(connect)
    }

    /// Listens and takes the first connection.
    fn accept(&self) -> Result<Stream, MigrationError> {
        let fail = |source| MigrationError::Connect {
            url: self.describe(),
            source,
        };
        match self {
            MigrationUrl::Unix(path) => {
                let listener = bind_unix(path).map_err(fail)?;
                let accepted = listener.accept().map(|(s, _)| Stream::Unix(s));
                // One connection only: nobody else may connect to this VM's stream.
                let _ = std::fs::remove_file(path);
                accepted.map_err(fail)
            }
            MigrationUrl::Tcp(address) => {
                let listener = TcpListener::bind(address).map_err(fail)?;
                listener.accept().map(|(s, _)| Stream::Tcp(s)).map_err(fail)
            }
        }
    }
}

/// Binds `path`, replacing a stale socket nobody listens on (a destination that was killed
/// while it waited leaves one), never anything else.
fn bind_unix(path: &std::path::Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            let stale = std::fs::symlink_metadata(path)?.file_type().is_socket()
                && UnixStream::connect(path).is_err();
            if !stale {
                return Err(e);
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

/// A connected migration stream.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        match self {
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
        }
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tcp(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// The destination's side: one accepted stream whose `Hello` was read.
pub struct Incoming {
    input: io::BufReader<Stream>,
    hello: Hello,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("hello", &self.hello)
            .finish()
    }
}

impl Incoming {
    /// Listens at `url`, takes one connection and reads its `Hello`.
    pub fn accept(url: &str) -> Result<Self, MigrationError> {
        let stream = MigrationUrl::parse(url)?.accept()?;
        let mut input = io::BufReader::with_capacity(1 << 20, stream);
        let hello = protocol::read_hello(&mut input)?;
        Ok(Self { input, hello })
    }

    /// What the source announced: the VM's vCPUs and RAM size.
    pub fn hello(&self) -> Hello {
        self.hello
    }

    /// Receives RAM into `ram` and returns the state (the VM was built with the announced
    /// shape).
    pub(crate) fn receive(&mut self, ram: &GuestRam) -> Result<MachineState, MigrationError> {
        let mut sink = RamSink {
            ram,
            progress: crate::progress::Progress::start("receive", ram.size),
        };
        if ram.size != self.hello.memory {
            return Err(MigrationError::Vm(format!(
                "the VM has {} bytes of RAM, the stream {}",
                ram.size, self.hello.memory
            )));
        }
        let (state, pages) = protocol::receive(&mut self.input, self.hello.cpus, &mut sink)?;
        sink.progress.finish();
        tracing::info!(
            "migration: received {pages} pages and the state at {} ns (CLOCK_REALTIME)",
            unix_ns()
        );
        Ok(state)
    }

    /// The VM runs here: tell the source when its vCPUs resumed.
    pub(crate) fn acknowledge(mut self, resumed_unix_ns: u64) -> Result<(), MigrationError> {
        let out = self.input.get_mut();
        protocol::send_ack(out, resumed_unix_ns)?;
        out.flush()?;
        Ok(())
    }
}

/// Guest RAM as the receiver's page sink (offsets in its memfd), showing what arrived (the
/// step's total is the RAM size: pages sent again in later rounds count again, so the bar may
/// end early; the last line says 100 % once the state arrived).
struct RamSink<'a> {
    ram: &'a GuestRam,
    progress: crate::progress::Progress,
}

impl PageSink for RamSink<'_> {
    fn size(&self) -> u64 {
        self.ram.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&*self.ram.file, data, offset)?;
        let bytes = data.len() as u64;
        self.progress.advance(bytes, bytes / protocol::PAGE_SIZE);
        Ok(())
    }
}

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME).
pub(crate) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
