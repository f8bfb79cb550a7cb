//! vhost-user-blk backends the guest's disk is served by: qemu-storage-daemon (the reference)
//! and `sluice serve blk`. A backend can be killed with SIGKILL and started again on the same
//! socket, which is what the reconnect tests do.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{repo_root, run_with_timeout};

const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
const SLUICE_BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// Which program serves the disk.
#[derive(Clone, Debug)]
pub enum BackendKind {
    StorageDaemon,
    Sluice(PathBuf),
}

impl BackendKind {
    pub fn name(&self) -> &'static str {
        match self {
            BackendKind::StorageDaemon => "qemu-storage-daemon",
            BackendKind::Sluice(_) => "sluice serve blk",
        }
    }

    fn command(&self, socket: &Path, image: &Path, queues: u16) -> Command {
        match self {
            BackendKind::StorageDaemon => {
                let mut command = Command::new("qemu-storage-daemon");
                command
                    .arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=f,filename={}",
                        image.display()
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e,addr.type=unix,addr.path={},node-name=f,\
                         writable=on,num-queues={queues}",
                        socket.display()
                    ));
                command
            }
            BackendKind::Sluice(binary) => {
                let mut command = Command::new(binary);
                command
                    .args(["serve", "blk", "--socket"])
                    .arg(socket)
                    .arg("--image")
                    .arg(image)
                    .args(["--queues", &queues.to_string()])
                    // The connection's summary lines (the IOTLB counts among them) are info.
                    .args(["--log", "warn,sluice_vhost=info"]);
                command
            }
        }
    }
}

/// The sluice binary: `$SLUICE_BIN`, or `cargo build -p sluice` into this workspace's target
/// directory (once per test binary).
pub fn sluice_binary() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(binary) = std::env::var_os("SLUICE_BIN") {
                return Ok(PathBuf::from(binary));
            }
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            run_with_timeout(
                Command::new(cargo)
                    .args(["build", "--quiet", "-p", "sluice", "--bin", "sluice"])
                    .current_dir(repo_root()),
                SLUICE_BUILD_TIMEOUT,
                "cargo build -p sluice",
            )?;
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target"));
            Ok(target.join("debug/sluice"))
        })
        .clone()
}

/// A running backend; killed on drop.
pub struct Backend {
    kind: BackendKind,
    socket: PathBuf,
    image: PathBuf,
    queues: u16,
    log: PathBuf,
    child: Child,
    starts: u32,
}

impl Backend {
    /// Starts the backend and waits until its socket exists.
    pub fn start(
        kind: BackendKind,
        socket: &Path,
        image: &Path,
        queues: u16,
        log: &Path,
    ) -> Backend {
        let child = spawn(&kind, socket, image, queues, log, 0);
        let mut backend = Backend {
            kind,
            socket: socket.to_path_buf(),
            image: image.to_path_buf(),
            queues,
            log: log.to_path_buf(),
            child,
            starts: 1,
        };
        backend.wait_listening();
        backend
    }

    /// SIGKILL: no chance to finish or flush anything in flight.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same backend again on the same socket (the stale socket file is removed
    /// first, as a supervisor restarting a crashed backend would).
    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        self.child = spawn(
            &self.kind,
            &self.socket,
            &self.image,
            self.queues,
            &self.log,
            self.starts,
        );
        self.starts += 1;
        self.wait_listening();
    }

    /// Stops the backend (SIGTERM, then SIGKILL) and returns its exit description.
    pub fn stop(&mut self) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("had already exited: {status}");
        }
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!("stopped: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        "ignored SIGTERM; killed".into()
    }

    /// Everything the backend printed (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !self.socket.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited before listening ({status}):\n{}",
                    self.kind.name(),
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not create {} in {LISTEN_TIMEOUT:?}:\n{}",
                self.kind.name(),
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn(
    kind: &BackendKind,
    socket: &Path,
    image: &Path,
    queues: u16,
    log: &Path,
    run: u32,
) -> Child {
    let mut file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the backend log");
    std::io::Write::write_all(
        &mut file,
        format!("=== {} start #{run}\n", kind.name()).as_bytes(),
    )
    .expect("write the backend log");
    kind.command(socket, image, queues)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone the log fd"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", kind.name()))
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
    }
}
