//! The tap backend: one `/dev/net/tun` file descriptor per queue pair, opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (plus `IFF_MULTI_QUEUE` for more than one pair), a
//! 12-byte vnet header and `O_NONBLOCK`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::header::NET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";
/// Kernel interface names are at most 15 bytes plus the NUL.
const IFNAMSIZ: usize = libc::IFNAMSIZ;
/// Queue pairs the kernel allows on one tap (MAX_TAP_QUEUES).
pub const MAX_TAP_QUEUES: u16 = 256;
/// Name template when the caller does not choose one: the kernel picks the number.
const DEFAULT_NAME: &str = "sluice%d";

/// Why the tap could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("creating tap devices needs CAP_NET_ADMIN: {0}")]
    Permission(String),
    #[error("invalid tap name {0:?} (1..=15 bytes, no NUL)")]
    Name(String),
    #[error("a tap has 1..={MAX_TAP_QUEUES} queues, asked for {0}")]
    QueueCount(u16),
    #[error("{op}: {err}")]
    Io { op: String, err: io::Error },
}

impl TapError {
    /// Maps EPERM/EACCES to the capability hint, anything else to `Io`.
    fn from_os(op: String, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(format!("{op}: {err}")),
            _ => TapError::Io { op, err },
        }
    }
}

/// An open tap device: one non-blocking file descriptor per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<OwnedFd>,
    multi_queue: bool,
    /// Which queues are attached (multiqueue taps only deliver to attached queues).
    attached: Mutex<Vec<bool>>,
    /// Per queue: signalled when the queue is attached again, so an RX handler that stopped
    /// on a detached queue starts reading (the guest may not kick it again).
    attach_events: Vec<EventFd>,
}

impl Tap {
    /// Opens (creating it if missing) the tap `name`, or a new `sluiceN` tap if `None`.
    pub fn open(name: Option<&str>, queues: u16) -> Result<Tap, TapError> {
        if queues == 0 || queues > MAX_TAP_QUEUES {
            return Err(TapError::QueueCount(queues));
        }
        let mut name = name.unwrap_or(DEFAULT_NAME).to_string();
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name));
        }
        let multi_queue = queues > 1;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut fds = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues {
            let fd = open_tun()?;
            // The kernel resolves a `%d` template on the first queue; later queues use the result.
            name = set_iff(&fd, &name, flags)?;
            set_vnet_hdr_size(&fd)?;
            fds.push(fd);
        }
        let attach_events = fds
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|err| TapError::Io {
                op: "eventfd".into(),
                err,
            })?;
        Ok(Tap {
            name,
            attached: Mutex::new(vec![true; fds.len()]),
            attach_events,
            queues: fds,
            multi_queue,
        })
    }

    /// The interface name (the kernel's choice when opened with a template).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of queue pairs (file descriptors).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The file descriptor of queue pair `index`.
    pub fn queue_fd(&self, index: usize) -> Option<RawFd> {
        self.queues.get(index).map(AsRawFd::as_raw_fd)
    }

    /// Readable after queue `index` was attached again (see [`Tap::set_active_queues`]).
    pub fn attach_event_fd(&self, index: usize) -> Option<RawFd> {
        self.attach_events.get(index).map(AsRawFd::as_raw_fd)
    }

    /// Tells the kernel which offloads the reader (the guest) handles (`TUN_F_*`).
    pub fn set_offload(&self, tun_flags: libc::c_uint) -> io::Result<()> {
        let fd = self.first_fd()?;
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is a tun fd we own.
        let ret = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(tun_flags)) };
        cvt(ret).map(drop)
    }

    /// Brings the interface up (`IFF_UP`), as `ip link set <name> up` would.
    pub fn set_up(&self) -> io::Result<()> {
        // SAFETY: plain socket(2) call; the result is checked and owned below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        cvt(raw)?;
        // SAFETY: `raw` is a freshly created, valid descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = ifreq_named(&self.name)?;
        // SAFETY: SIOCGIFFLAGS reads the flags into `req`, a valid ifreq that outlives the call.
        cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
        // SAFETY: the kernel filled ifru_flags, the union member SIOCGIFFLAGS uses.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq that outlives the call.
        cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) }).map(drop)
    }

    /// Attaches queues `0..pairs` and detaches the rest, so the kernel only steers frames to
    /// queues the guest serves. No-op on a single-queue tap.
    pub fn set_active_queues(&self, pairs: usize) -> io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        for (index, (fd, state)) in self.queues.iter().zip(attached.iter_mut()).enumerate() {
            let want = index < pairs.max(1);
            if *state != want {
                set_queue_attached(fd, want)?;
                *state = want;
                if let Some(event) = self.attach_events.get(index).filter(|_| want) {
                    event.write(1)?;
                }
            }
        }
        Ok(())
    }

    /// Reads one packet (vnet header + frame) from queue `index`; `None` if none is waiting.
    pub fn read_packet(&self, index: usize, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let fd = self.fd(index)?;
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
            let ret = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            match cvt_len(ret) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one packet (vnet header + frame) to queue `index`.
    pub fn write_packet(&self, index: usize, packet: &[u8]) -> io::Result<()> {
        let fd = self.fd(index)?;
        loop {
            // SAFETY: `packet` is valid for reads of `packet.len()` bytes during the call.
            let ret = unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) };
            match cvt_len(ret) {
                Ok(n) if n == packet.len() => return Ok(()),
                Ok(n) => {
                    let msg = format!("short tap write: {n} of {} bytes", packet.len());
                    return Err(io::Error::new(io::ErrorKind::WriteZero, msg));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn fd(&self, index: usize) -> io::Result<RawFd> {
        self.queue_fd(index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such tap queue"))
    }

    fn first_fd(&self) -> io::Result<RawFd> {
        self.fd(0)
    }
}

fn open_tun() -> Result<OwnedFd, TapError> {
    let path = CString::new(TUN_PATH).map_err(|e| TapError::Io {
        op: TUN_PATH.into(),
        err: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: `path` is a valid NUL-terminated string; the result is checked before use.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        let err = io::Error::last_os_error();
        return Err(TapError::from_os(format!("open {TUN_PATH}"), err));
    }
    // SAFETY: `raw` is a freshly opened descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// TUNSETIFF: binds `fd` to the tap `name` (creating it if needed); returns the actual name.
fn set_iff(fd: &OwnedFd, name: &str, flags: libc::c_int) -> Result<String, TapError> {
    let op = || format!("TUNSETIFF {name}");
    let mut req = ifreq_named(name).map_err(|err| TapError::Io { op: op(), err })?;
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and updates `req`, a valid ifreq that outlives the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    cvt(ret).map_err(|err| TapError::from_os(op(), err))?;
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn set_vnet_hdr_size(fd: &OwnedFd) -> Result<(), TapError> {
    let size = NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, valid during the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
    cvt(ret).map(drop).map_err(|err| TapError::Io {
        op: "TUNSETVNETHDRSZ".into(),
        err,
    })
}

fn set_queue_attached(fd: &OwnedFd, attach: bool) -> io::Result<()> {
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let flag = if attach {
        libc::IFF_ATTACH_QUEUE
    } else {
        libc::IFF_DETACH_QUEUE
    };
    req.ifr_ifru.ifru_flags = flag as libc::c_short;
    // SAFETY: TUNSETQUEUE reads `req`, a valid ifreq that outlives the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETQUEUE, &req) }).map(drop)
}

fn ifreq_named(name: &str) -> io::Result<libc::ifreq> {
    if name.len() >= IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_len(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}
