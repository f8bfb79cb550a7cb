//! Fuzz body of the `replay_log` target (fuzz/fuzz_targets/replay_log.rs): the log reader on
//! any bytes. Checks beyond "never panics": every decoded page is exactly 4096 bytes and every
//! exit's access is 1..=8 bytes; reading stops at the first error (the replay refuses there).
//!
//! An input starting with 0xff is framed by the body: the rest becomes one events chunk, with
//! a valid checksum, after a valid header and meta chunk, so mutations reach the event decoder
//! instead of all failing the checksum.

use super::format::{checksum, Event, LogMeta, LogReader, LogWriter, KIND_EVENTS, PAGE_SIZE};

/// At most this many events per input, so a long valid log cannot make a run slow.
const MAX_EVENTS: usize = 100_000;

pub fn replay_log(data: &[u8]) {
    match data.split_first() {
        Some((0xff, events)) => read_all(&framed(events)),
        _ => read_all(data),
    }
}

/// A log whose only events chunk is `events`, checksummed.
fn framed(events: &[u8]) -> Vec<u8> {
    let meta = LogMeta {
        memory: 16 << 20,
        cpus: 1,
        cmdline: String::new(),
        devices: Vec::new(),
        entry: 0x10_0000,
        protocol: "pvh".into(),
        protocol_pointer: 0x6000,
    };
    let mut log = Vec::new();
    if LogWriter::new(&mut log, &meta).is_err() {
        return log;
    }
    let len = events.len().min(1 << 20) as u32;
    let events = &events[..len as usize];
    log.extend_from_slice(b"CHNK");
    log.push(KIND_EVENTS);
    log.extend_from_slice(&len.to_le_bytes());
    log.extend_from_slice(&checksum(KIND_EVENTS, len, events).to_le_bytes());
    log.extend_from_slice(events);
    log
}

fn read_all(log: &[u8]) {
    let Ok(mut reader) = LogReader::new(log) else {
        return;
    };
    for _ in 0..MAX_EVENTS {
        match reader.next_event() {
            Ok(Some(Event::InitPage { bytes, .. } | Event::DmaPage { bytes, .. })) => {
                assert_eq!(bytes.len(), PAGE_SIZE);
            }
            Ok(Some(Event::Exit(exit))) => assert!((1..=8).contains(&exit.data.len())),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The framed seed's events decode to their end: the framing reaches the event decoder.
    #[test]
    fn a_framed_seed_reaches_its_end_record() {
        let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/replay_log/framed_events");
        let seed = std::fs::read(seed).unwrap();
        let log = framed(&seed[1..]);
        let mut reader = LogReader::new(&log[..]).unwrap();
        let mut last = None;
        while let Some(event) = reader.next_event().unwrap() {
            last = Some(event);
        }
        assert!(matches!(last, Some(Event::End(_))), "{last:?}");
    }
}
