//! Fuzz body of `tpm_crb` (fuzz/fuzz_targets/tpm_crb.rs): register and buffer accesses of any
//! size at any offset of the five locality pages, against a backend that answers with the
//! input's bytes (any length, any header). Checks: no panic, the response registers always
//! name the buffer inside the page, and after every started command the buffer holds a
//! response whose header size fits the buffer.

use super::{TpmBackend, TpmCrb, BUFFER_SIZE, CRB_BASE, CRB_SIZE, HEADER_SIZE};
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
