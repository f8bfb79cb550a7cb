//! Fuzz body for the migration receiver (fuzz target `migration_stream`): any bytes as the
//! stream a destination reads from the connection it accepted — `Hello`, then everything up
//! to `End` — through the same [`read_hello`] and [`receive`] `sluice run --migrate-from` uses.
//! Checked beyond "never panics": every page run written lies inside the announced RAM and is
//! whole pages, and an accepted state has the announced shape.
//!
//! Input: the stream's bytes as they are; or, when the first byte is [`FRAMED`], a list of
//! `[kind][payload length u16 LE][payload]` that the body frames with valid checksums first, so
//! that the fuzzer reaches the message decoders instead of stopping at the checksum.

use std::io::{self, Cursor};

use super::protocol::{read_hello, receive, write_frame, PageSink, PAGE_SIZE};

/// First byte of an input whose frames the body builds (see the module documentation).
pub const FRAMED: u8 = 0xff;

/// Guest RAM of the announced size that keeps nothing (the size may be anything up to
/// 2^64 - 4096: nothing is allocated for it).
struct CheckedRam {
    size: u64,
    pages: u64,
}

impl PageSink for CheckedRam {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(data.len() as u64);
        assert!(end.is_some_and(|end| end <= self.size), "a run outside RAM");
        assert!(offset.is_multiple_of(PAGE_SIZE) && (data.len() as u64).is_multiple_of(PAGE_SIZE));
        self.pages += data.len() as u64 / PAGE_SIZE;
        Ok(())
    }
}

pub fn migration_stream(data: &[u8]) {
    match data.split_first() {
        Some((&FRAMED, messages)) => {
            accepts(&frame_all(messages));
        }
        _ => {
            accepts(data);
        }
    }
}

/// Frames `[kind][len u16][payload]...` with valid checksums (a short tail is framed as is).
fn frame_all(mut messages: &[u8]) -> Vec<u8> {
    let mut stream = Vec::new();
    while let [kind, low, high, rest @ ..] = messages {
        let len = usize::from(u16::from_le_bytes([*low, *high])).min(rest.len());
        write_frame(&mut stream, *kind, &rest[..len]).expect("a Vec takes any frame");
        messages = &rest[len..];
    }
    stream
}

/// Runs the receiver on `data` with the checks; whether it accepted the stream.
fn accepts(data: &[u8]) -> bool {
    let mut input = Cursor::new(data);
    let Ok(hello) = read_hello(&mut input) else {
        return false;
    };
    let mut ram = CheckedRam {
        size: hello.memory,
        pages: 0,
    };
    if let Ok((state, pages)) = receive(&mut input, hello.cpus, &mut ram) {
        assert_eq!(pages, ram.pages);
        assert_eq!((state.cpus, state.memory), (hello.cpus, hello.memory));
        assert_eq!(state.vcpus.len(), usize::from(hello.cpus));
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::super::protocol::*;
    use super::*;

    #[test]
    fn a_whole_stream_and_every_prefix_pass_the_checks() {
        let mut bytes = Vec::new();
        send_hello(&mut bytes, 1, 1 << 40).unwrap();
        send_pages(&mut bytes, (1 << 40) - PAGE_SIZE, &[7; PAGE_SIZE as usize]).unwrap();
        send_state(&mut bytes, &crate::snapshot::tests::machine(1, 1 << 40)).unwrap();
        send_end(&mut bytes).unwrap();

        let accepted: Vec<bool> = (0..bytes.len())
            .step_by(97)
            .map(|end| accepts(&bytes[..end]))
            .collect();

        assert!(accepts(&bytes));
        assert!(accepted.iter().all(|&a| !a), "a prefix was accepted");
    }

    #[test]
    fn framed_inputs_get_valid_checksums() {
        let mut hello = b"sluice-migration".to_vec();
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&(16 * PAGE_SIZE).to_le_bytes());
        let mut input = vec![1, hello.len() as u8, 0];
        input.extend_from_slice(&hello);
        input.extend_from_slice(&[4, 0, 0]);

        let stream = frame_all(&input);
        let mut cursor = Cursor::new(&stream[..]);

        assert_eq!(read_hello(&mut cursor).unwrap().cpus, 1);
        assert!(matches!(read_message(&mut cursor), Ok(Message::End)));
    }

    /// make_seeds.py computes the checksums itself: its seeds get past them.
    #[test]
    fn the_generated_seeds_have_the_checksums_sluice_computes() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/migration_stream/"
        );
        let seed = std::fs::read(format!("{dir}pages_then_end")).unwrap();
        let mut input = Cursor::new(&seed[..]);
        let hello = read_hello(&mut input).unwrap();
        let mut ram = CheckedRam {
            size: hello.memory,
            pages: 0,
        };

        let refused = receive(&mut input, hello.cpus, &mut ram).err();

        assert_eq!(ram.pages, 2, "both pages were taken");
        assert!(
            matches!(
                refused,
                Some(ProtocolError::Unexpected { found: "end", .. })
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn the_committed_full_stream_seed_is_accepted() {
        let seed = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/migration_stream/full_stream"
        );

        assert!(accepts(&std::fs::read(seed).unwrap()));
    }
}
