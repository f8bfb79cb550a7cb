//! The frontend against scripted hostile backends: a unix listener that accepts and then
//! answers nothing, half a reply, garbage, or the handshake only to stall on one later
//! request. Whatever the peer does, `new` fails within its timeout with an error naming the
//! socket and the request, the vCPU-side calls (`activate`, `reset`) return at once or within
//! the timeout, and a setup that cannot finish marks the device NEEDS_RESET.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::thread::JoinHandle;

use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;

/// The bound the tests give the frontend, and the slack allowed on top of it.
const TIMEOUT: Duration = Duration::from_millis(500);
const SLACK: Duration = Duration::from_secs(3);
/// What "returns at once" means on a loaded machine: well under the timeout.
const AT_ONCE: Duration = Duration::from_millis(250);

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES;
/// CONFIG | REPLY_ACK: every SET request then waits for an ack a backend can withhold.
const PROTOCOL_FEATURES: u64 = (1 << 9) | (1 << 3);

fn code(request: FrontendReq) -> u32 {
    request as u32
}

/// What the scripted backend does on one connection.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Reads nothing and answers nothing; the connection stays open.
    Silent,
    /// Answers the first request with half a header, then nothing.
    Truncated,
    /// Answers the first request with a well-formed reply to another request.
    Garbage,
    /// Answers like a backend would; never answers `stall_at` (the connection stays open),
    /// waits `delay` before answering `delay_at`, and hangs up after answering `hang_up_after`.
    Serve {
        stall_at: Option<FrontendReq>,
        delay_at: Option<(FrontendReq, Duration)>,
        hang_up_after: Option<FrontendReq>,
    },
}

const SERVE: Behaviour = Behaviour::Serve {
    stall_at: None,
    delay_at: None,
    hang_up_after: None,
};

fn stall_at(request: FrontendReq) -> Behaviour {
    Behaviour::Serve {
        stall_at: Some(request),
        delay_at: None,
        hang_up_after: None,
    }
}

/// What the backend saw, for the tests to assert on.
#[derive(Default)]
struct Seen {
    accepts: AtomicUsize,
    requests: Mutex<Vec<u32>>,
    /// The kick eventfd's counter when SET_VRING_KICK brought it (0: nothing kicked yet).
    kick_count: Mutex<Option<u64>>,
}

impl Seen {
    fn saw(&self, request: FrontendReq) -> bool {
        self.requests.lock().unwrap().contains(&code(request))
    }
}

/// A scripted vhost-user backend on a fresh socket: connection `n` behaves as `script[n]`
/// (the last entry for any later one). Stopped on drop.
struct Backend {
    socket: PathBuf,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(test: &str, script: Vec<Behaviour>) -> Self {
        let socket =
            std::env::temp_dir().join(format!("sluice-vub-{}-{test}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || serve(listener, script, &seen, &stop))
        };
        Self {
            socket,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn config(&self) -> VhostUserBlkConfig {
        let mut config = VhostUserBlkConfig::new(&self.socket);
        config.queue_size = QUEUE_SIZE;
        config.timeout = TIMEOUT;
        config
    }

    fn wait_for(&self, what: &str, done: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(&self.seen) {
            assert!(Instant::now() < deadline, "the backend never saw {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn serve(listener: UnixListener, script: Vec<Behaviour>, seen: &Seen, stop: &AtomicBool) {
    // Stalled connections stay open until the end: a stall is not a hang-up.
    let mut stalled = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let n = seen.accepts.fetch_add(1, Ordering::SeqCst);
        let behaviour = script[n.min(script.len() - 1)];
        if let Some(stream) = converse(stream, behaviour, seen, stop) {
            stalled.push(stream);
        }
    }
}

/// One connection; returns the stream if the backend stalls on it.
fn converse(
    mut stream: UnixStream,
    behaviour: Behaviour,
    seen: &Seen,
    stop: &AtomicBool,
) -> Option<UnixStream> {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let (stall_at, delay_at, hang_up_after) = match behaviour {
        Behaviour::Silent => return Some(stream),
        Behaviour::Serve {
            stall_at,
            delay_at,
            hang_up_after,
        } => (stall_at, delay_at, hang_up_after),
        Behaviour::Truncated | Behaviour::Garbage => (None, None, None),
    };
    while !stop.load(Ordering::SeqCst) {
        // Told to stop, or the peer hung up: either way this connection is over.
        let (request, flags, body, kick) = receive(&mut stream, stop)??;
        seen.requests.lock().unwrap().push(request);
        match behaviour {
            Behaviour::Truncated => {
                stream.write_all(&header(request, 8)[..6]).unwrap();
                return Some(stream);
            }
            Behaviour::Garbage => {
                let mut reply = header(code(FrontendReq::GET_VRING_BASE), 8).to_vec();
                reply.extend_from_slice(&[0xa5; 8]);
                let _ = stream.write_all(&reply);
                return Some(stream);
            }
            _ => {}
        }
        if stall_at.is_some_and(|r| code(r) == request) {
            return Some(stream);
        }
        if let Some(kick) = kick.filter(|_| request == code(FrontendReq::SET_VRING_KICK)) {
            let mut count = [0u8; 8];
            let value = (&kick)
                .read(&mut count)
                .map_or(0, |_| u64::from_le_bytes(count));
            *seen.kick_count.lock().unwrap() = Some(value);
        }
        if let Some((_, delay)) = delay_at.filter(|(r, _)| code(*r) == request) {
            std::thread::sleep(delay);
        }
        if stream.write_all(&reply(request, flags, &body)).is_err() {
            return None;
        }
        if hang_up_after.is_some_and(|r| code(r) == request) {
            return None;
        }
    }
    None
}

type Message = (u32, u32, Vec<u8>, Option<File>);

/// The next request: Some(None) when the peer hung up, None when told to stop.
fn receive(stream: &mut UnixStream, stop: &AtomicBool) -> Option<Option<Message>> {
    let mut head = [0u8; 12];
    let (n, kick) = loop {
        match stream.recv_with_fd(&mut head) {
            Ok(got) => break got,
            Err(e) if e.errno() != libc::EAGAIN => return Some(None),
            Err(_) if !stop.load(Ordering::SeqCst) => continue,
            Err(_) => return None,
        }
    };
    if n < head.len() {
        return Some(None);
    }
    let word = |i: usize| u32::from_le_bytes(head[i * 4..i * 4 + 4].try_into().unwrap());
    let mut body = vec![0u8; word(2).min(4096) as usize];
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let complete = stream.read_exact(&mut body).is_ok();
    stream
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    Some(complete.then_some((word(0), word(1), body, kick)))
}

fn header(request: u32, size: u32) -> [u8; 12] {
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&request.to_le_bytes());
    head[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    head[8..].copy_from_slice(&size.to_le_bytes());
    head
}

/// What a well-behaved backend answers (nothing for a SET without NEED_REPLY).
fn reply(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let payload: Vec<u8> = match request {
        r if r == code(FrontendReq::GET_FEATURES) => FEATURES.to_le_bytes().to_vec(),
        r if r == code(FrontendReq::GET_PROTOCOL_FEATURES) => {
            PROTOCOL_FEATURES.to_le_bytes().to_vec()
        }
        r if r == code(FrontendReq::GET_CONFIG) => {
            let mut config = body.get(..12).unwrap_or(&[0; 12]).to_vec();
            let mut space = [0u8; VIRTIO_BLK_CONFIG_SIZE];
            space[..8].copy_from_slice(&2048u64.to_le_bytes());
            config.extend_from_slice(&space);
            config
        }
        // VhostUserVringState: the index asked about, ring position 0.
        r if r == code(FrontendReq::GET_VRING_BASE) => {
            let mut state = body.get(..4).unwrap_or(&[0; 4]).to_vec();
            state.extend_from_slice(&0u32.to_le_bytes());
            state
        }
        _ if flags & FLAG_NEED_REPLY != 0 => 0u64.to_le_bytes().to_vec(),
        _ => return Vec::new(),
    };
    let mut message = header(request, payload.len() as u32).to_vec();
    message.extend_from_slice(&payload);
    message
}

/// Runs `f` on its own thread; panics if it does not return within `bound` (before the fix,
/// these calls never returned, and a hung test would not fail).
fn within<T: Send + 'static>(
    bound: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration) {
    let (done, result) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let value = f();
        let _ = done.send((value, start.elapsed()));
    });
    result
        .recv_timeout(bound)
        .unwrap_or_else(|_| panic!("{what} did not return within {bound:?}"))
}

fn handshake_error(test: &str, behaviour: Behaviour) -> (String, Duration) {
    let backend = Backend::start(test, vec![behaviour]);
    let config = backend.config();

    let (result, took) = within(TIMEOUT + SLACK, "VhostUserBlk::new", move || {
        VhostUserBlk::new(config, Vec::new()).map(|_| ())
    });

    let error = result.expect_err("the handshake succeeded").to_string();
    assert!(
        error.contains(&*backend.socket.to_string_lossy()),
        "the error does not name the socket: {error}"
    );
    (error, took)
}

#[test]
fn a_backend_that_never_answers_fails_the_handshake_in_time() {
    let (error, took) = handshake_error("silent", Behaviour::Silent);

    assert!(error.contains("GET_FEATURES"), "{error}");
    assert!(
        took >= TIMEOUT,
        "gave up after {took:?}, before the timeout"
    );
}

#[test]
fn a_backend_that_never_accepts_fails_the_connect_in_time() {
    let socket =
        std::env::temp_dir().join(format!("sluice-vub-{}-backlog.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    // SAFETY: listen(2) on a socket this test owns; a zero backlog holds one connection.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let _queued = UnixStream::connect(&socket).unwrap();
    let mut config = VhostUserBlkConfig::new(&socket);
    config.timeout = TIMEOUT;

    let (result, took) = within(TIMEOUT + SLACK, "VhostUserBlk::new", move || {
        VhostUserBlk::new(config, Vec::new()).map(|_| ())
    });

    let error = result.expect_err("connected to a full queue").to_string();
    let _ = std::fs::remove_file(&socket);
    assert!(error.contains(&*socket.to_string_lossy()), "{error}");
    assert!(error.contains("accepted no connection"), "{error}");
    assert!(
        took >= TIMEOUT,
        "gave up after {took:?}, before the timeout"
    );
}

#[test]
fn half_a_reply_fails_the_handshake_in_time() {
    let (error, _) = handshake_error("truncated", Behaviour::Truncated);

    assert!(error.contains("GET_FEATURES"), "{error}");
}

#[test]
fn a_garbage_reply_is_a_clear_error() {
    let (error, took) = handshake_error("garbage", Behaviour::Garbage);

    assert!(error.contains("GET_FEATURES"), "{error}");
    assert!(
        took < TIMEOUT,
        "garbage is refused at once, not timed out ({took:?})"
    );
}

#[test]
fn a_backend_stalled_after_the_handshake_fails_it_in_time() {
    let (error, _) = handshake_error("stall-config", stall_at(FrontendReq::GET_CONFIG));

    assert!(error.contains("GET_CONFIG"), "{error}");
}

/// A connected device with one queue, and the driver side of that queue.
struct Rig {
    backend: Backend,
    device: VhostUserBlk,
    mem: GuestMemoryMmap,
    interrupts: Arc<Interrupts>,
}

impl Rig {
    fn new(test: &str, script: Vec<Behaviour>, mem: &GuestMemoryMmap) -> Self {
        let backend = Backend::start(test, script);
        let mem = mem.clone();
        let regions = SharedMemoryRegion::from_guest_memory(&mem).unwrap();
        let device = VhostUserBlk::new(backend.config(), regions).unwrap();
        Self {
            backend,
            device,
            mem,
            interrupts: Arc::new(Interrupts::default()),
        }
    }

    /// DRIVER_OK from the vCPU (`ExternalQueues::start`): returns at once whatever the backend
    /// does.
    fn activate(self, driver: &Driver<'_>) -> Self {
        let binding = driver.binding();
        let (rig, took) = within(AT_ONCE * 4, "activate", move || {
            let mut rig = self;
            let features = rig.device.device_features();
            let mem = sluice_dma::identity(rig.mem.clone());
            let interrupt: Arc<dyn VirtioInterrupt> = rig.interrupts.clone();
            rig.device
                .start(features, mem, vec![binding], interrupt)
                .unwrap();
            rig
        });
        assert!(took < AT_ONCE, "activate took {took:?}");
        rig
    }

    /// A device reset from the vCPU, as the framework does it: bounded by the timeout.
    fn reset(self) -> (Self, Duration) {
        within(TIMEOUT * 2 + SLACK, "reset", move || {
            let mut rig = self;
            ExternalQueues::stop(&mut rig.device);
            rig.device.reset();
            rig
        })
    }

    fn needs_reset(&self) -> bool {
        self.interrupts.needs_reset.load(Ordering::SeqCst)
    }

    fn wait_needs_reset(&self) {
        let deadline = Instant::now() + TIMEOUT + SLACK;
        while !self.needs_reset() {
            assert!(Instant::now() < deadline, "the device never needed reset");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn a_setup_stalled_at_driver_ok_needs_reset_without_blocking_the_vcpu() {
    for (test, stalled) in [
        ("stall-features", FrontendReq::SET_FEATURES),
        ("stall-mem", FrontendReq::SET_MEM_TABLE),
        ("stall-kick", FrontendReq::SET_VRING_KICK),
    ] {
        let mem = memfd_ram(RAM_SIZE);
        let rig = Rig::new(test, vec![stall_at(stalled)], &mem);
        let driver = Driver::new(&mem, 0);

        let rig = rig.activate(&driver);
        rig.backend.wait_for("the stalled request", |s| {
            s.requests.lock().unwrap().contains(&code(stalled))
        });
        let started = Instant::now();
        rig.wait_needs_reset();
        let (rig, _) = rig.reset();

        assert!(
            started.elapsed() < TIMEOUT + SLACK,
            "{test}: NEEDS_RESET came late"
        );
        assert!(
            !rig.backend.seen.saw(FrontendReq::SET_VRING_ENABLE),
            "{test}"
        );
    }
}

#[test]
fn a_reset_during_a_stalled_setup_is_bounded_and_needs_no_reset() {
    let mem = memfd_ram(RAM_SIZE);
    let rig = Rig::new(
        "reset-in-setup",
        vec![stall_at(FrontendReq::SET_MEM_TABLE)],
        &mem,
    );
    let driver = Driver::new(&mem, 0);
    let rig = rig.activate(&driver);
    rig.backend.wait_for("SET_MEM_TABLE", |s| {
        s.requests
            .lock()
            .unwrap()
            .contains(&code(FrontendReq::SET_MEM_TABLE))
    });

    let (rig, took) = rig.reset();

    assert!(took < TIMEOUT + SLACK, "reset took {took:?}");
    std::thread::sleep(TIMEOUT);
    assert!(
        !rig.needs_reset(),
        "a reset setup must not ask for another reset"
    );
}

#[test]
fn a_backend_stalled_at_reset_holds_the_vcpu_no_longer_than_the_timeout() {
    let mem = memfd_ram(RAM_SIZE);
    let rig = Rig::new(
        "stall-reset",
        vec![stall_at(FrontendReq::GET_VRING_BASE)],
        &mem,
    );
    let driver = Driver::new(&mem, 0);
    let rig = rig.activate(&driver);
    rig.backend
        .wait_for("SET_VRING_ENABLE", |s| s.saw(FrontendReq::SET_VRING_ENABLE));

    let (rig, took) = rig.reset();

    assert!(rig.backend.seen.saw(FrontendReq::GET_VRING_BASE));
    assert!(
        took >= TIMEOUT,
        "reset gave up after {took:?}, before the timeout"
    );
    assert!(!rig.needs_reset());
}

#[test]
fn kicks_made_during_setup_reach_the_backend() {
    let slow_memory = Behaviour::Serve {
        stall_at: None,
        delay_at: Some((FrontendReq::SET_MEM_TABLE, TIMEOUT / 2)),
        hang_up_after: None,
    };
    let mem = memfd_ram(RAM_SIZE);
    let rig = Rig::new("early-kick", vec![slow_memory], &mem);
    let driver = Driver::new(&mem, 0);
    let rig = rig.activate(&driver);

    // The guest kicks before the backend has the ring: the eventfd keeps the count.
    driver.kick.write(1).unwrap();
    rig.backend
        .wait_for("SET_VRING_ENABLE", |s| s.saw(FrontendReq::SET_VRING_ENABLE));

    assert_eq!(*rig.backend.seen.kick_count.lock().unwrap(), Some(1));
    assert!(!rig.needs_reset());
    let (rig, _) = rig.reset();
    assert!(rig.backend.seen.saw(FrontendReq::GET_VRING_BASE));
}

#[test]
fn a_reconnect_to_a_stalled_backend_holds_reset_no_longer_than_the_timeout() {
    let hang_up = Behaviour::Serve {
        stall_at: None,
        delay_at: None,
        hang_up_after: Some(FrontendReq::SET_VRING_ENABLE),
    };
    let mem = memfd_ram(RAM_SIZE);
    let rig = Rig::new("reconnect-stall", vec![hang_up, Behaviour::Silent], &mem);
    let driver = Driver::new(&mem, 0);
    let rig = rig.activate(&driver);
    // The pump reconnects about a second after the hang-up, to a backend that never answers.
    rig.backend.wait_for("a second connection", |s| {
        s.accepts.load(Ordering::SeqCst) >= 2
    });

    let (rig, took) = rig.reset();

    assert!(took < TIMEOUT + SLACK, "reset took {took:?}");
    assert!(!rig.needs_reset());
}

#[test]
fn a_healthy_scripted_backend_is_set_up_in_order() {
    let mem = memfd_ram(RAM_SIZE);
    let rig = Rig::new("healthy", vec![SERVE], &mem);
    let driver = Driver::new(&mem, 0);
    let rig = rig.activate(&driver);
    rig.backend
        .wait_for("SET_VRING_ENABLE", |s| s.saw(FrontendReq::SET_VRING_ENABLE));

    let (rig, _) = rig.reset();

    let requests = rig.backend.seen.requests.lock().unwrap().clone();
    let order = [
        FrontendReq::SET_FEATURES,
        FrontendReq::SET_MEM_TABLE,
        FrontendReq::SET_VRING_KICK,
        FrontendReq::SET_VRING_ENABLE,
        FrontendReq::GET_VRING_BASE,
    ]
    .map(|r| requests.iter().position(|&c| c == code(r)));
    assert!(order.iter().all(Option::is_some), "{requests:?}");
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{requests:?}");
    assert!(!rig.needs_reset());
}

#[test]
fn a_guest_config_write_never_waits_for_the_backend() {
    let mem = memfd_ram(RAM_SIZE);
    let rig = Rig::new(
        "stall-config-write",
        vec![stall_at(FrontendReq::SET_CONFIG)],
        &mem,
    );

    let (rig, took) = within(AT_ONCE * 4, "write_config", move || {
        let mut rig = rig;
        rig.device.write_config(CONFIG_WCE_OFFSET, &[1]);
        rig
    });

    assert!(took < AT_ONCE, "write_config took {took:?}");
    let mut wce = [0u8];
    rig.device.read_config(CONFIG_WCE_OFFSET, &mut wce);
    assert_eq!(wce, [1], "the guest reads back what it wrote");
    rig.backend
        .wait_for("SET_CONFIG", |s| s.saw(FrontendReq::SET_CONFIG));
}

#[test]
fn a_backend_without_dirty_logging_refuses_the_migration_by_name() {
    let mem = memfd_ram(RAM_SIZE);
    let rig = Rig::new("no-log", vec![SERVE], &mem);
    let driver = Driver::new(&mem, 0);
    let rig = rig.activate(&driver);
    rig.backend
        .wait_for("SET_VRING_ENABLE", |s| s.saw(FrontendReq::SET_VRING_ENABLE));

    let refused = rig.device.session().start_logging();

    let why = refused.expect_err("no LOG_SHMFD, no LOG_ALL").to_string();
    assert!(why.contains("VHOST_USER_PROTOCOL_F_LOG_SHMFD"), "{why}");
    let requests = rig.backend.seen.requests.lock().unwrap().clone();
    assert!(
        !requests.contains(&code(FrontendReq::SET_LOG_BASE)),
        "nothing sent: {requests:?}"
    );
    assert!(rig.device.session().take_logged().is_empty());
    let (rig, _) = rig.reset();
    assert!(!rig.needs_reset());
}
