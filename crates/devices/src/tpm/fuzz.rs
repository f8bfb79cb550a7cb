//! Fuzz bodies of `tpm_crb` (fuzz/fuzz_targets/tpm_crb.rs): register and buffer accesses of
//! any size at any offset of the five locality pages, against a backend that answers with the
//! input's bytes (any length, any header). Checks: no panic, the response registers always
//! name the buffer inside the page, and after every started command the buffer holds a
//! response whose header size fits the buffer.
//!
//! And of `tpm_state` (fuzz/fuzz_targets/tpm_state.rs): snapshots and migration. A hostile
//! swtpm's answers to the state-blob commands (CMD_GET_STATEBLOB headers and blobs, results of
//! CMD_STOP / CMD_SET_STATEBLOB / CMD_INIT) from the input's bytes, on real sockets; then a
//! saved state from the input (locality, buffer of any length, flags) restored into a device
//! whose registers are read. Checks: no panic or hang, no blob over [`MAX_STATE_BLOB`]
//! accepted, a refused state leaves the registers as they were.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::swtpm::{Swtpm, MAX_STATE_BLOB};
use super::{
    SavedTpm, StateBlob, TpmBackend, TpmBlobs, TpmCrb, BUFFER_SIZE, CRB_BASE, CRB_SIZE, HEADER_SIZE,
};
use sluice_bus::BusDevice;

/// Answers every command with the next slice of the input, as a hostile backend would.
struct ScriptedBackend {
    replies: Vec<Vec<u8>>,
}

impl TpmBackend for ScriptedBackend {
    fn execute(&mut self, _locality: u8, _command: &[u8]) -> Result<Vec<u8>, String> {
        self.replies.pop().ok_or_else(|| "no reply".to_string())
    }
    fn cancel(&mut self) {}
    fn established(&mut self) -> bool {
        false
    }
    fn reset_established(&mut self, _locality: u8) {}
}

pub fn tpm_crb(data: &[u8]) {
    let (script, ops) = data.split_at(data.len() / 4);
    // Replies: chunks of the first quarter, some stretched beyond the buffer.
    let replies = script
        .chunks(16)
        .map(|chunk| {
            let mut reply = chunk.to_vec();
            if chunk.first().is_some_and(|b| b & 1 != 0) {
                reply.resize(BUFFER_SIZE + usize::from(chunk[0]), 0);
            }
            reply
        })
        .collect();
    let mut crb = TpmCrb::new(Box::new(ScriptedBackend { replies }));
    for op in ops.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % (CRB_SIZE + 16);
        let len = [1, 2, 4, 8, 3][usize::from(op[3] % 5)];
        let value = &op[4..4 + len.min(4)];
        let commands = crb.commands;
        if op[0] & 1 == 0 {
            let mut out = vec![0; len];
            crb.read(CRB_BASE, offset, &mut out);
        } else {
            crb.write(CRB_BASE, offset, value);
        }
        if crb.commands != commands {
            let size = u32::from_be_bytes(crb.buffer[2..6].try_into().unwrap()) as usize;
            assert!((HEADER_SIZE..=BUFFER_SIZE).contains(&size), "{size}");
        }
        let mut address = [0u8; 4];
        crb.read(CRB_BASE, 0x5c, &mut address);
        assert_eq!(u32::from_le_bytes(address), (CRB_BASE + 0x80) as u32);
    }
}

/// A backend that takes any state (what the device checks is under test, not swtpm's).
struct AcceptingBackend;

impl TpmBackend for AcceptingBackend {
    fn execute(&mut self, _locality: u8, _command: &[u8]) -> Result<Vec<u8>, String> {
        Err("no TPM".into())
    }
    fn cancel(&mut self) {}
    fn established(&mut self) -> bool {
        false
    }
    fn reset_established(&mut self, _locality: u8) {}
    fn restore_state(&mut self, _blobs: &TpmBlobs) -> Result<(), String> {
        Ok(())
    }
}

pub fn tpm_state(data: &[u8]) {
    let (answers, saved) = data.split_at(data.len() / 2);
    hostile_swtpm(answers);
    restore_saved(saved);
}

/// swtpm's side is the input, written up front and then closed: every read sluice makes ends
/// with the input's bytes or at their end, never blocks.
fn hostile_swtpm(answers: &[u8]) {
    let (Ok((control, theirs)), Ok((data, _their_data))) = (UnixStream::pair(), UnixStream::pair())
    else {
        return;
    };
    // Non-blocking: an input larger than the socket buffer is cut there rather than block.
    let mut theirs = theirs;
    if theirs.set_nonblocking(true).is_err() || theirs.write(answers).is_err() {
        return;
    }
    let _ = theirs.shutdown(Shutdown::Write);
    let mut swtpm = Swtpm::from_channels(control, data);
    if let Ok(blobs) = swtpm.save_state() {
        for blob in [&blobs.permanent, &blobs.volatile, &blobs.savestate] {
            assert!(blob.data.len() <= MAX_STATE_BLOB);
        }
    }
    let blob = StateBlob {
        flags: 0,
        data: answers.iter().take(64).copied().collect(),
    };
    let _ = swtpm.restore_state(&TpmBlobs {
        permanent: blob.clone(),
        volatile: blob,
        savestate: StateBlob::default(),
    });
    let _ = swtpm.established();
}

fn restore_saved(input: &[u8]) {
    let byte = |i: usize| input.get(i).copied().unwrap_or(0);
    let word = |i: usize| u32::from_le_bytes([byte(i), byte(i + 1), byte(i + 2), byte(i + 3)]);
    // The buffer is usually whole, sometimes short or long by the input's say.
    let length = match byte(1) % 4 {
        0 => usize::from(byte(2)) * 17,
        1 => BUFFER_SIZE + usize::from(byte(2)),
        _ => BUFFER_SIZE,
    };
    let mut buffer: Vec<u8> = input.iter().skip(12).copied().take(length).collect();
    buffer.resize(length, 0);
    let saved = SavedTpm {
        active: (byte(0) & 0x80 == 0).then_some(byte(0) & 0x7),
        idle: byte(3) & 1 != 0,
        fatal: byte(3) & 2 != 0,
        cancel: word(4),
        int_enable: word(8),
        buffer,
        tpm: TpmBlobs::default(),
    };
    let mut crb = TpmCrb::new(Box::new(AcceptingBackend));
    let before = crb.register_qword(0, 0);
    match crb.restore_state(&saved) {
        Ok(()) => {
            assert!(crb.active.is_none_or(|l| l < 5));
            assert!(crb.cancel <= 1);
        }
        Err(_) => assert_eq!(
            crb.register_qword(0, 0),
            before,
            "a refused state changed nothing"
        ),
    }
    for offset in (0..0x80).step_by(4) {
        let mut out = [0u8; 4];
        crb.read(CRB_BASE, offset, &mut out);
    }
    let mut address = [0u8; 4];
    crb.read(CRB_BASE, 0x5c, &mut address);
    assert_eq!(u32::from_le_bytes(address), (CRB_BASE + 0x80) as u32);
}
