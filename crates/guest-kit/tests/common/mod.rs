//! Helpers shared by the QEMU integration tests: run construction, pass assertions, temporary
//! disk images and a UDP echo peer for virtio-net's socket backend.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::fs::{self, File};
use std::net::UdpSocket;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use sluice_guest_kit::{find_qemu, Accel, GuestKitReport, GuestKitRun, Machine};

/// Generous hard limit: a guest kit boot takes a few seconds even under TCG, but QEMU's KVM
/// variant on kvm_pvm boots SeaBIOS in the instruction emulator, which with two vCPUs on a
/// loaded 2-core host took over 30 s; a run that reaches this is a hang and is reported as one.
pub const HARD_TIMEOUT: Duration = Duration::from_secs(90);

/// A QEMU run; fails the test with the install hint when QEMU is missing.
pub fn qemu(accel: Accel, machine: Machine, cmdline: &str) -> GuestKitRun {
    if let Err(error) = find_qemu() {
        panic!("{error}");
    }
    GuestKitRun::qemu(accel, machine, cmdline).with_timeout(HARD_TIMEOUT)
}

/// Prints `SKIP <test>: <reason>` and returns true when `accel` cannot run here.
pub fn skip(accel: Accel, test: &str) -> bool {
    accel == Accel::Kvm && sluice_guest_kit::skip_without_kvm(test)
}

/// Fails unless the guest failed its workload cleanly: exit byte 1 and a FAIL verdict.
pub fn assert_workload_failed(report: &GuestKitReport) {
    assert_eq!(
        report.exit,
        sluice_guest_kit::ExitKind::WorkloadFailed,
        "{}",
        report.describe()
    );
    assert!(
        matches!(report.verdict, Some(sluice_guest_kit::Verdict::Fail(_))),
        "{}",
        report.describe()
    );
}

/// Fails with the whole console when the guest did not pass.
pub fn assert_passed(report: &GuestKitReport) {
    assert!(
        report.passed(),
        "guest kit did not pass: {}",
        report.describe()
    );
    assert!(
        report.malformed.is_empty(),
        "malformed console lines: {}",
        report.describe()
    );
    assert!(
        report.results.iter().all(|r| r.pass),
        "a RESULT has pass=false: {}",
        report.describe()
    );
}

/// A sparse raw disk image in the temp directory, removed on drop.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(tag: &str, size: u64) -> TempImage {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "sluice-guest-kit-{tag}-{}-{}.img",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&path).expect("create image");
        file.set_len(size).expect("size image");
        TempImage { path }
    }

    pub fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buffer = vec![0u8; len];
        let file = File::open(&self.path).expect("open image");
        file.read_exact_at(&mut buffer, offset).expect("read image");
        buffer
    }

    pub fn write_at(&self, offset: u64, bytes: &[u8]) {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .expect("open image");
        file.write_all_at(bytes, offset).expect("write image");
        file.sync_all().expect("sync image");
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A free UDP port on 127.0.0.1 (bound and released: QEMU binds it a moment later).
pub fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
    socket.local_addr().expect("probe address").port()
}

/// Echoes every datagram back to its sender (QEMU's `-netdev socket,udp=` endpoint), counts
/// them and keeps the first one.
pub struct EchoPeer {
    pub port: u16,
    pub echoed: Arc<AtomicU64>,
    pub first_frame: Arc<Mutex<Option<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoPeer {
    pub fn start() -> EchoPeer {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind echo socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let port = socket.local_addr().expect("echo address").port();
        let echoed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let first_frame = Arc::new(Mutex::new(None));
        let thread = {
            let (echoed, stop) = (Arc::clone(&echoed), Arc::clone(&stop));
            let first = Arc::clone(&first_frame);
            thread::spawn(move || {
                let mut buffer = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, from)) = socket.recv_from(&mut buffer) else {
                        continue;
                    };
                    if let Ok(mut first) = first.lock() {
                        first.get_or_insert_with(|| buffer[..len].to_vec());
                    }
                    if socket.send_to(&buffer[..len], from).is_ok() {
                        echoed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        EchoPeer {
            port,
            echoed,
            first_frame,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
