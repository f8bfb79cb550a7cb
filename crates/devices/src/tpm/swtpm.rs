//! swtpm as the TPM backend: its control channel (a Unix socket, `swtpm socket --ctrl
//! type=unixio,path=...`) and a data channel sluice creates and hands over with
//! CMD_SET_DATAFD, as swtpm's docs/man page swtpm_ioctls describe: each control command is a
//! big-endian u32 code and its payload; each answer starts with a big-endian u32 TPM result
//! (0 = success). TPM commands and responses go over the data channel as plain TPM 2.0 byte
//! streams.
//!
//! Snapshots: CMD_GET_STATEBLOB hands out the permanent, volatile and savestate blobs of the
//! running TPM (request: flags, type, offset; answer: result, flags, total length, length, then
//! the blob; result TPM_RETRY means there is no such blob); a restore stops the TPM
//! (CMD_STOP: swtpm refuses to set blobs into a running TPM), sets each blob (CMD_SET_STATEBLOB:
//! flags, type, length and the blob in one message; answer: the result) and starts it again
//! with CMD_INIT, deleting the volatile state file so a later start cannot pick up a stale one.
//!
//! Hand-written: the protocol is a handful of messages of a few bytes; no crate speaks it.
//!
//! swtpm is a separate, less trusted process: every answer is read with a timeout and bounded
//! (a response header larger than [`MAX_RESPONSE`] is an error, nothing is allocated for it).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{StateBlob, TpmBackend, TpmBlobs, HEADER_SIZE};

const CMD_INIT: u32 = 2;
const CMD_SHUTDOWN: u32 = 3;
const CMD_GET_TPMESTABLISHED: u32 = 4;
const CMD_SET_LOCALITY: u32 = 5;
const CMD_CANCEL_TPM_CMD: u32 = 9;
const CMD_RESET_TPMESTABLISHED: u32 = 11;
const CMD_GET_STATEBLOB: u32 = 12;
const CMD_SET_STATEBLOB: u32 = 13;
const CMD_STOP: u32 = 14;
const CMD_SET_DATAFD: u32 = 16;
/// CMD_INIT: remove the volatile state file once read.
const INIT_DELETE_VOLATILE: u32 = 1;
/// CMD_GET_STATEBLOB: hand the blob out decrypted if swtpm encrypts its state files.
const STATE_FLAG_DECRYPTED: u32 = 1;
const BLOB_PERMANENT: u32 = 1;
const BLOB_VOLATILE: u32 = 2;
const BLOB_SAVESTATE: u32 = 3;
/// TPM_RETRY: swtpm has no blob of that type (no TPM2_Shutdown(STATE) was saved, say).
const TPM_RETRY: u32 = 0x800;
/// Largest state blob taken from swtpm (libtpms' NV memory is 128 KiB; this leaves room).
pub const MAX_STATE_BLOB: usize = 4 << 20;

/// Largest response read from swtpm (its own buffer is 4 KiB); the device then checks it
/// against the CRB buffer.
pub const MAX_RESPONSE: usize = 4096;
/// Longest a TPM command may take (key generation on a slow host takes seconds).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SwtpmError {
    #[error("cannot connect to swtpm's control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("swtpm control command {command}: {source}")]
    Io {
        command: u32,
        source: std::io::Error,
    },
    #[error("swtpm control command {command} failed with TPM result {result:#x}")]
    Refused { command: u32, result: u32 },
    #[error("cannot start swtpm (is the swtpm package installed?): {0}")]
    Spawn(std::io::Error),
    #[error("swtpm did not create its control socket {0} in time")]
    NoSocket(PathBuf),
    #[error("swtpm announced a state blob of {total} bytes ({length} in this answer)")]
    BadBlob { total: u32, length: u32 },
}

/// A connected, initialised swtpm.
///
/// The sockets are kept as `File`s: std's socket writes are send(2), which vCPU filters do not
/// allow; read(2)/write(2) on the same fds keep the socket timeouts (SO_RCVTIMEO/SO_SNDTIMEO).
pub struct Swtpm {
    control: File,
    data: File,
    locality: u8,
    /// The swtpm sluice started (`--tpm state=DIR`), shut down and reaped on drop.
    child: Option<Child>,
}

impl Swtpm {
    /// Connects to a running swtpm's control socket, hands it the data channel and
    /// initialises the TPM.
    pub fn connect(control_path: &Path) -> Result<Swtpm, SwtpmError> {
        let control = UnixStream::connect(control_path).map_err(|source| SwtpmError::Connect {
            path: control_path.to_owned(),
            source,
        })?;
        let io = |command| move |source| SwtpmError::Io { command, source };
        control
            .set_read_timeout(Some(CONTROL_TIMEOUT))
            .and_then(|()| control.set_write_timeout(Some(CONTROL_TIMEOUT)))
            .map_err(io(0))?;
        let (data, theirs) = UnixStream::pair().map_err(io(CMD_SET_DATAFD))?;
        data.set_read_timeout(Some(COMMAND_TIMEOUT))
            .and_then(|()| data.set_write_timeout(Some(COMMAND_TIMEOUT)))
            .map_err(io(CMD_SET_DATAFD))?;
        control
            .send_with_fds(&[&CMD_SET_DATAFD.to_be_bytes()[..]], &[theirs.as_raw_fd()])
            .map_err(|e| io(CMD_SET_DATAFD)(std::io::Error::from_raw_os_error(e.errno())))?;
        let mut swtpm = Swtpm {
            control: File::from(OwnedFd::from(control)),
            data: File::from(OwnedFd::from(data)),
            locality: 0,
            child: None,
        };
        swtpm.read_result(CMD_SET_DATAFD)?;
        drop(theirs);
        // init_flags 0: keep the volatile state swtpm may hold.
        swtpm.control_command(CMD_INIT, &0u32.to_be_bytes(), 0)?;
        Ok(swtpm)
    }

    /// An already connected and initialised swtpm's two channels (the fuzz target plays a
    /// hostile swtpm on the other ends).
    pub(super) fn from_channels(control: UnixStream, data: UnixStream) -> Swtpm {
        Swtpm {
            control: File::from(OwnedFd::from(control)),
            data: File::from(OwnedFd::from(data)),
            locality: 0,
            child: None,
        }
    }

    /// Starts `swtpm socket --tpm2` with its state in `state_dir` (created if missing) and its
    /// control socket there, then connects.
    pub fn spawn(state_dir: &Path) -> Result<Swtpm, SwtpmError> {
        std::fs::create_dir_all(state_dir).map_err(SwtpmError::Spawn)?;
        let socket = state_dir.join("swtpm-ctrl.sock");
        let _ = std::fs::remove_file(&socket);
        let mut command = Command::new("swtpm");
        command
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state_dir.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", socket.display()))
            .arg("--log")
            .arg(format!("file={}", state_dir.join("swtpm.log").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // async-signal-safe system call.
        unsafe {
            command.pre_exec(|| {
                // swtpm ends with the thread that started it, however sluice ends (a VM that
                // stops by signal or exit does not drop its devices).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(SwtpmError::Spawn)?;
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        loop {
            // The socket file appears at bind(2), before swtpm listens: a connect in between is
            // refused, so a refusal is retried like a missing file until the deadline.
            let attempt = if socket.exists() {
                Swtpm::connect(&socket)
            } else {
                Err(SwtpmError::NoSocket(socket.clone()))
            };
            let not_yet = match &attempt {
                Err(SwtpmError::NoSocket(_)) => true,
                Err(SwtpmError::Connect { source, .. }) => {
                    source.kind() == std::io::ErrorKind::ConnectionRefused
                }
                _ => false,
            };
            let exited = child.try_wait().ok().flatten().is_some();
            match attempt {
                Ok(mut swtpm) => {
                    swtpm.child = Some(child);
                    return Ok(swtpm);
                }
                Err(e) if !not_yet || exited || Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Sends `command` with `payload`, reads the result and `extra` more answer bytes.
    fn control_command(
        &mut self,
        command: u32,
        payload: &[u8],
        extra: usize,
    ) -> Result<Vec<u8>, SwtpmError> {
        let mut message = command.to_be_bytes().to_vec();
        message.extend_from_slice(payload);
        self.control
            .write_all(&message)
            .map_err(|source| SwtpmError::Io { command, source })?;
        self.read_result(command)?;
        let mut answer = vec![0; extra];
        self.control
            .read_exact(&mut answer)
            .map_err(|source| SwtpmError::Io { command, source })?;
        Ok(answer)
    }

    fn read_result(&mut self, command: u32) -> Result<(), SwtpmError> {
        let mut result = [0; 4];
        self.control
            .read_exact(&mut result)
            .map_err(|source| SwtpmError::Io { command, source })?;
        match u32::from_be_bytes(result) {
            0 => Ok(()),
            result => Err(SwtpmError::Refused { command, result }),
        }
    }

    /// The state blob of `kind` (empty if swtpm has none).
    fn get_blob(&mut self, kind: u32) -> Result<StateBlob, SwtpmError> {
        let command = CMD_GET_STATEBLOB;
        let io = |source| SwtpmError::Io { command, source };
        let mut message = command.to_be_bytes().to_vec();
        for word in [STATE_FLAG_DECRYPTED, kind, 0] {
            message.extend_from_slice(&word.to_be_bytes());
        }
        self.control.write_all(&message).map_err(io)?;
        // The header comes whole even for a failed request.
        let mut header = [0u8; 16];
        self.control.read_exact(&mut header).map_err(io)?;
        let word = |i: usize| u32::from_be_bytes(header[4 * i..4 * i + 4].try_into().unwrap());
        let (result, flags, total, length) = (word(0), word(1), word(2), word(3));
        match result {
            0 => {}
            TPM_RETRY => return Ok(StateBlob::default()),
            result => return Err(SwtpmError::Refused { command, result }),
        }
        if total != length || length as usize > MAX_STATE_BLOB {
            return Err(SwtpmError::BadBlob { total, length });
        }
        let mut data = vec![0; length as usize];
        self.control.read_exact(&mut data).map_err(io)?;
        Ok(StateBlob { flags, data })
    }

    /// Hands swtpm the blob of `kind` (the TPM is stopped); an empty blob is left out.
    fn set_blob(&mut self, kind: u32, blob: &StateBlob) -> Result<(), SwtpmError> {
        if blob.data.is_empty() {
            return Ok(());
        }
        let length = u32::try_from(blob.data.len())
            .ok()
            .filter(|l| *l as usize <= MAX_STATE_BLOB)
            .ok_or(SwtpmError::BadBlob {
                total: u32::MAX,
                length: u32::MAX,
            })?;
        let mut payload = Vec::with_capacity(12 + blob.data.len());
        for word in [blob.flags, kind, length] {
            payload.extend_from_slice(&word.to_be_bytes());
        }
        payload.extend_from_slice(&blob.data);
        // One message: swtpm reads the header and the first part of the blob in one read.
        self.control_command(CMD_SET_STATEBLOB, &payload, 0)?;
        Ok(())
    }

    fn save_blobs(&mut self) -> Result<TpmBlobs, SwtpmError> {
        Ok(TpmBlobs {
            permanent: self.get_blob(BLOB_PERMANENT)?,
            volatile: self.get_blob(BLOB_VOLATILE)?,
            savestate: self.get_blob(BLOB_SAVESTATE)?,
        })
    }

    fn restore_blobs(&mut self, blobs: &TpmBlobs) -> Result<(), SwtpmError> {
        self.control_command(CMD_STOP, &[], 0)?;
        self.set_blob(BLOB_PERMANENT, &blobs.permanent)?;
        self.set_blob(BLOB_VOLATILE, &blobs.volatile)?;
        self.set_blob(BLOB_SAVESTATE, &blobs.savestate)?;
        self.control_command(CMD_INIT, &INIT_DELETE_VOLATILE.to_be_bytes(), 0)?;
        Ok(())
    }

    fn set_locality(&mut self, locality: u8) -> Result<(), SwtpmError> {
        if locality != self.locality {
            self.control_command(CMD_SET_LOCALITY, &[locality, 0, 0, 0], 0)?;
            self.locality = locality;
        }
        Ok(())
    }
}

impl TpmBackend for Swtpm {
    fn execute(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>, String> {
        self.set_locality(locality).map_err(|e| e.to_string())?;
        self.data
            .write_all(command)
            .map_err(|e| format!("sending the command to swtpm: {e}"))?;
        let mut response = vec![0; HEADER_SIZE];
        self.data
            .read_exact(&mut response)
            .map_err(|e| format!("reading swtpm's response header: {e}"))?;
        let size = u32::from_be_bytes([response[2], response[3], response[4], response[5]]);
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if !(HEADER_SIZE..=MAX_RESPONSE).contains(&size) {
            return Err(format!("swtpm announced a response of {size} bytes"));
        }
        response.resize(size, 0);
        self.data
            .read_exact(&mut response[HEADER_SIZE..])
            .map_err(|e| format!("reading swtpm's response: {e}"))?;
        Ok(response)
    }

    fn cancel(&mut self) {
        if let Err(e) = self.control_command(CMD_CANCEL_TPM_CMD, &[], 0) {
            tracing::warn!("tpm: {e}");
        }
    }

    fn established(&mut self) -> bool {
        // The answer: the result, then the bit and three bytes of padding.
        match self.control_command(CMD_GET_TPMESTABLISHED, &[], 4) {
            Ok(answer) => answer[0] & 1 != 0,
            Err(e) => {
                tracing::warn!("tpm: {e}");
                false
            }
        }
    }

    fn reset_established(&mut self, locality: u8) {
        if let Err(e) = self.control_command(CMD_RESET_TPMESTABLISHED, &[locality, 0, 0, 0], 0) {
            tracing::warn!("tpm: {e}");
        }
    }

    fn save_state(&mut self) -> Result<TpmBlobs, String> {
        self.save_blobs().map_err(|e| e.to_string())
    }

    fn restore_state(&mut self, blobs: &TpmBlobs) -> Result<(), String> {
        self.restore_blobs(blobs).map_err(|e| e.to_string())
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An orderly stop writes swtpm's state; a kill only if it does not come.
            if self.control_command(CMD_SHUTDOWN, &[], 0).is_err() {
                let _ = child.kill();
            }
            let deadline = Instant::now() + CONTROL_TIMEOUT;
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
