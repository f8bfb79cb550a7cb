//! `sluice serve <device> ...` as a child process for the net and rng tests: started with its
//! output in a log file, waited for until its socket exists, killed on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `sluice serve`.
pub struct Served {
    child: Child,
    log: PathBuf,
}

impl Served {
    /// Runs `binary serve <args>` and waits for `socket`; `Err(log)` if it exits first.
    pub fn start(
        binary: &Path,
        args: &[&str],
        socket: &Path,
        log: &Path,
    ) -> Result<Served, String> {
        let file = File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let child = Command::new(binary)
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut served = Served {
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !socket.exists() {
            if let Ok(Some(status)) = served.child.try_wait() {
                return Err(format!(
                    "exited before listening ({status}): {}",
                    served.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no socket after {LISTEN_TIMEOUT:?}: {}",
                    served.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(served)
    }

    /// Whether the process is still running (it never exits on its own).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything it printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
