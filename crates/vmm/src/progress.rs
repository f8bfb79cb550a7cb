//! Progress of the long copies — a snapshot's memory, a restore's, a live migration's rounds,
//! a destination receiving — on stderr: a one-line bar redrawn in place for a person at a
//! terminal, or one JSON object per line for tools (`sluice run --progress bar|json|off`; the
//! default is a bar when stderr is a terminal and nothing otherwise).
//!
//! A JSON line: `{"phase":"snapshot","round":0,"bytes_done":N,"bytes_total":N,"pages":N,
//! "percent":P,"elapsed_ms":T,"done":false}`. `bytes_done`/`bytes_total` are the current
//! step's (the RAM scanned in a snapshot, a restore and round 0 of a migration; the dirty pages
//! of a later round, which never shrink within it), `pages` counts every page written or sent
//! in the phase so far (never decreases), `round` the migration's rounds (0 otherwise; the
//! stop-and-copy is the last). Each phase ends with one line with `"done":true` and
//! `"percent":100`. Lines are written at most every [`INTERVAL`] plus that last one.
//!
//! Hand-written: the verified dependency set has no progress-bar crate (no indicatif), and a
//! bar is a carriage return and a few characters.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Shortest time between two lines (the final one is always written).
pub const INTERVAL: Duration = Duration::from_millis(100);
const BAR_WIDTH: usize = 30;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Off,
    Bar,
    Json,
}

impl ProgressMode {
    /// `bar`, `json` or `off`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "bar" => Ok(Self::Bar),
            "json" => Ok(Self::Json),
            "off" => Ok(Self::Off),
            _ => Err(format!("--progress {s}: expected bar, json or off")),
        }
    }

    /// A bar when stderr is a terminal, nothing otherwise.
    pub fn default_for_stderr() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDERR_FILENO) } == 1 {
            Self::Bar
        } else {
            Self::Off
        }
    }
}

/// The process's mode (set once by the CLI; off until then, as in tests that build VMs).
static MODE: AtomicU8 = AtomicU8::new(0);

pub fn set_mode(mode: ProgressMode) {
    let value = match mode {
        ProgressMode::Off => 0,
        ProgressMode::Bar => 1,
        ProgressMode::Json => 2,
    };
    MODE.store(value, Ordering::Relaxed);
}

fn mode() -> ProgressMode {
    match MODE.load(Ordering::Relaxed) {
        1 => ProgressMode::Bar,
        2 => ProgressMode::Json,
        _ => ProgressMode::Off,
    }
}

/// One phase's progress (see the module documentation).
pub struct Progress {
    mode: ProgressMode,
    phase: &'static str,
    started: Instant,
    last_line: Option<Instant>,
    round: u32,
    done: u64,
    total: u64,
    pages: u64,
}

impl Progress {
    /// Starts `phase` with a first step of `total` bytes.
    pub fn start(phase: &'static str, total: u64) -> Self {
        Self {
            mode: mode(),
            phase,
            started: Instant::now(),
            last_line: None,
            round: 0,
            done: 0,
            total,
            pages: 0,
        }
    }

    /// The current step's round.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// A new step (a migration round) of `total` bytes.
    pub fn next_round(&mut self, round: u32, total: u64) {
        self.round = round;
        self.done = 0;
        self.total = total;
        self.show(false);
    }

    /// `bytes` more of the step are done, `pages` more pages written or sent.
    pub fn advance(&mut self, bytes: u64, pages: u64) {
        self.done = self.done.saturating_add(bytes).min(self.total);
        self.pages = self.pages.saturating_add(pages);
        if self.mode == ProgressMode::Off {
            return;
        }
        let due = self.last_line.is_none_or(|at| at.elapsed() >= INTERVAL);
        if due {
            self.show(false);
        }
    }

    /// The phase is complete: the last line, at 100 %.
    pub fn finish(&mut self) {
        self.done = self.total;
        self.show(true);
    }

    fn percent(&self, finished: bool) -> u64 {
        if finished {
            return 100;
        }
        (self.done * 100)
            .checked_div(self.total)
            .unwrap_or(0)
            .min(99)
    }

    fn show(&mut self, finished: bool) {
        if self.mode == ProgressMode::Off {
            return;
        }
        self.last_line = Some(Instant::now());
        let line = self.line(finished, self.started.elapsed());
        // Like every message, progress ignores a stderr that cannot be written.
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(line.as_bytes());
        let _ = stderr.flush();
    }

    /// The text shown `elapsed` into the phase.
    fn line(&self, finished: bool, elapsed: Duration) -> String {
        let percent = self.percent(finished);
        match self.mode {
            ProgressMode::Json => format!(
                "{}\n",
                serde_json::json!({
                    "phase": self.phase,
                    "round": self.round,
                    "bytes_done": self.done,
                    "bytes_total": self.total,
                    "pages": self.pages,
                    "percent": percent,
                    "elapsed_ms": elapsed.as_millis() as u64,
                    "done": finished,
                })
            ),
            _ => {
                let filled = (percent as usize * BAR_WIDTH) / 100;
                let round = if self.round > 0 {
                    format!(" round {}", self.round)
                } else {
                    String::new()
                };
                format!(
                    "\r{} [{}{}] {percent:>3}% {}/{} MiB{round} {:.1}s{}",
                    self.phase,
                    "#".repeat(filled),
                    "-".repeat(BAR_WIDTH - filled),
                    self.done >> 20,
                    self.total >> 20,
                    elapsed.as_secs_f64(),
                    if finished { "\n" } else { "" }
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_stays_below_100_until_the_phase_is_finished() {
        let mut progress = Progress::start("test", 1000);
        progress.advance(999, 1);
        assert_eq!(progress.percent(false), 99);
        progress.advance(5000, 1);
        assert_eq!(progress.done, 1000, "never past the step's total");
        assert_eq!(progress.percent(true), 100);
        let mut empty = Progress::start("test", 0);
        empty.advance(0, 0);
        assert_eq!(empty.percent(false), 0);
    }

    #[test]
    fn a_bar_redraws_one_line_and_ends_it_at_100_percent() {
        // Driven with the mode off (nothing written), shown as a bar.
        let mut progress = Progress::start("restore", 64 << 20);
        progress.next_round(2, 64 << 20);
        progress.advance(16 << 20, 4096);
        progress.mode = ProgressMode::Bar;
        let midway = progress.line(false, Duration::from_millis(1500));
        progress.mode = ProgressMode::Off;
        progress.finish();
        progress.mode = ProgressMode::Bar;
        let last = progress.line(true, Duration::from_secs(3));

        assert_eq!(
            midway,
            format!(
                "\rrestore [{}{}]  25% 16/64 MiB round 2 1.5s",
                "#".repeat(7),
                "-".repeat(23)
            )
        );
        assert!(last.starts_with(&format!("\rrestore [{}] 100% 64/64 MiB", "#".repeat(30))));
        assert!(last.ends_with('\n'), "{last:?}");
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field() {
        let mut progress = Progress::start("migrate", 8192);
        progress.advance(4096, 1);
        progress.mode = ProgressMode::Json;
        let line = progress.line(false, Duration::from_millis(7));
        let value: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();

        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        assert_eq!(
            value,
            serde_json::json!({"phase": "migrate", "round": 0, "bytes_done": 4096,
                "bytes_total": 8192, "pages": 1, "percent": 50, "elapsed_ms": 7, "done": false})
        );
    }

    #[test]
    fn modes_parse_and_refuse_others() {
        assert_eq!(ProgressMode::parse("json"), Ok(ProgressMode::Json));
        assert_eq!(ProgressMode::parse("bar"), Ok(ProgressMode::Bar));
        assert_eq!(ProgressMode::parse("off"), Ok(ProgressMode::Off));
        assert!(ProgressMode::parse("yes").is_err());
    }
}
