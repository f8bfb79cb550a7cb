//! Host side of the kit's `w=tpm` workload: starting a swtpm for a VMM to connect to, and
//! checking the PCR chain the guest reports (after = SHA-256(before || digest)) — the kit has no
//! hash code, and neither does the workspace, so coreutils' `sha256sum` computes it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `swtpm socket --tpm2` with its state and control socket in a directory; killed on drop.
pub struct SwtpmProcess {
    child: Child,
    pub socket: PathBuf,
}

impl SwtpmProcess {
    /// Starts swtpm with state in `dir`; `None` when swtpm is not installed.
    pub fn start(dir: &Path) -> Option<SwtpmProcess> {
        std::fs::create_dir_all(dir).ok()?;
        let socket = dir.join("ctrl.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut swtpm = SwtpmProcess { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !swtpm.socket.exists() {
            if Instant::now() > deadline || swtpm.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(swtpm)
    }
}

impl Drop for SwtpmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SHA-256 of `bytes` by `sha256sum`.
pub fn sha256(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("sha256sum: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("sha256sum: no stdin")?
        .write_all(bytes)
        .map_err(|e| format!("sha256sum: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    from_hex(text.get(..64).ok_or("sha256sum: short output")?)
}

pub fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("odd-length hex `{text}`"));
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// Checks a `w=tpm` RESULT: PCR before all zeros (a fresh Startup(CLEAR)), 16 random bytes,
/// and after = SHA-256(before || digest).
pub fn check_pcr_chain(result: &serde_json::Value) -> Result<(), String> {
    let field = |name: &str| -> Result<Vec<u8>, String> {
        from_hex(
            result[name]
                .as_str()
                .ok_or_else(|| format!("no {name} in {result}"))?,
        )
    };
    let (before, digest, after) = (field("pcr_before")?, field("digest")?, field("pcr_after")?);
    if before != [0; 32] {
        return Err(format!("PCR not reset by Startup(CLEAR): {result}"));
    }
    if field("random")?.len() != 16 {
        return Err(format!("not 16 random bytes: {result}"));
    }
    let mut chained = before;
    chained.extend_from_slice(&digest);
    if after != sha256(&chained)? {
        return Err(format!("PCR after != SHA-256(before || digest): {result}"));
    }
    Ok(())
}
