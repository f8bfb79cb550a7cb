//! Fuzz body of the `replay_log` target (fuzz/fuzz_targets/replay_log.rs): the log reader on
//! any bytes. Checks beyond "never panics": every decoded page is exactly 4096 bytes and every
//! exit's access is 1..=8 bytes; reading stops at the first error (the replay refuses there).

use super::format::{Event, LogReader, PAGE_SIZE};

/// At most this many events per input, so a long valid log cannot make a run slow.
const MAX_EVENTS: usize = 100_000;

pub fn replay_log(data: &[u8]) {
    let Ok(mut reader) = LogReader::new(data) else {
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
