//! The source side: pre-copy rounds, auto-converge, stop-and-copy, and recovery when the
//! destination fails (see the module documentation of crate::migration).

use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::protocol::{self, Message, PAGE_SIZE};
use super::tracking::{union, DirtyTracking};
use super::{unix_ns, MigrationError, MigrationUrl, Stream};
use crate::handle::{MachineParts, VmHandle};
use crate::memory::GuestRam;
use crate::progress::Progress;
use crate::snapshot::MachineState;
use crate::vcpu::{RunControl, VmOutcome};

/// A dirty set this small is sent during the stop-and-copy.
pub const DIRTY_THRESHOLD: usize = 256;
/// At most this many rounds after round 0 (a guest that never converges is stopped anyway).
const MAX_ROUNDS: u32 = 30;
/// A round "converges" if it is at most this fraction (in percent) of the previous one.
const CONVERGING_PERCENT: usize = 90;
/// Throttle steps (percent of each period the vCPUs are parked).
const THROTTLE_STEPS: [u8; 4] = [20, 40, 60, 80];
const THROTTLE_PERIOD: Duration = Duration::from_millis(100);
/// Rounds at the highest throttle before giving up on convergence.
const ROUNDS_AT_MAX_THROTTLE: u32 = 2;
/// How long the vCPUs may take to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the destination may take from `End` to running.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Captures until the devices' state stops moving (chains taken on reactivation complete).
const MAX_CAPTURES: usize = 8;
/// Bytes read from RAM per step in round 0.
const CHUNK: usize = 1 << 20;
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// What a completed migration cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationReport {
    /// From the request to the destination's acknowledgement.
    pub total_ms: f64,
    /// From the source's pause to the destination's resume (CLOCK_REALTIME on both).
    pub downtime_ms: f64,
    /// Pre-copy rounds after round 0, plus the stop-and-copy.
    pub rounds: u32,
    pub pages_sent: u64,
    /// The highest auto-converge throttle used (0: none).
    pub throttle_percent: u8,
    pub paused_unix_ns: u64,
    pub resumed_unix_ns: u64,
}

/// Migrates the VM behind `handle` to `url`; see crate::migration.
pub(crate) fn send(
    handle: &VmHandle,
    parts: &MachineParts,
    url: &str,
) -> Result<MigrationReport, MigrationError> {
    let started = Instant::now();
    let stream = MigrationUrl::parse(url)?.connect()?;
    let control = handle.control().clone();
    let mut out = BufWriter::with_capacity(1 << 20, stream.try_clone()?);
    protocol::send_hello(&mut out, handle.config().cpus, handle.config().memory)?;
    let tracking = DirtyTracking::start(parts.vm.clone(), &parts.ram)?;
    let mut progress = Progress::start("migrate", parts.ram.size);
    let mut pages_sent = send_nonzero(&mut out, &parts.ram, &mut progress)?;
    tracing::info!("migration: round 0 sent {pages_sent} pages");
    let (pending, rounds, throttle_percent) =
        precopy(&mut out, &parts.ram, &tracking, &control, &mut progress).map(
            |(pending, rounds, sent, throttle)| {
                pages_sent += sent;
                (pending, rounds, throttle)
            },
        )?;
    let paused_unix_ns = unix_ns();
    control
        .pause(PAUSE_TIMEOUT)
        .map_err(|e| MigrationError::Vm(format!("cannot pause: {e}")))?;
    progress.next_round(rounds + 1, 0);
    let result = stop_and_copy(
        handle,
        parts,
        &tracking,
        pending,
        out,
        stream,
        &mut progress,
    );
    match result {
        Ok((sent, resumed_unix_ns)) => {
            drop(tracking);
            progress.finish();
            control.finish(VmOutcome::Migrated);
            let report = MigrationReport {
                total_ms: started.elapsed().as_secs_f64() * 1e3,
                downtime_ms: resumed_unix_ns.saturating_sub(paused_unix_ns) as f64 / 1e6,
                rounds: rounds + 1,
                pages_sent: pages_sent + sent,
                throttle_percent,
                paused_unix_ns,
                resumed_unix_ns,
            };
            tracing::info!("migration done: {report:?}");
            Ok(report)
        }
        Err(e) => {
            drop(tracking);
            // No lost VM: it runs on here, with its images locked again — unless another
            // process holds them now (a destination that runs the VM although its `Ack` never
            // arrived): two VMs writing one disk would corrupt it, so this one stops instead.
            // The vhost-user backends come back too (their frontends reconnect).
            sluice_devices::vhost_user_blk::migration::take_back();
            if let Err(lock) = sluice_storage::lock::reacquire_all() {
                let why = format!(
                    "{e}; the disk images cannot be taken back ({lock}): the destination may \
                     be running the VM, so it stops here"
                );
                control.finish(VmOutcome::Crash(format!("migration failed: {why}")));
                return Err(MigrationError::Abandoned(why));
            }
            // Devices stopped by the capture take up their work first.
            parts.pci.resume_after_save();
            control.resume();
            tracing::warn!("migration failed, the VM runs on here: {e}");
            Err(e)
        }
    }
}

/// Pre-copy rounds after round 0. Returns the last (small) dirty set, not yet sent, the number
/// of rounds sent, the pages they sent and the highest throttle used.
fn precopy(
    out: &mut impl Write,
    ram: &GuestRam,
    tracking: &DirtyTracking,
    control: &Arc<RunControl>,
    progress: &mut Progress,
) -> Result<(Vec<u64>, u32, u64, u8), MigrationError> {
    let throttle = Throttle::start(control.clone());
    let mut previous = usize::MAX;
    let mut rounds = 0;
    let mut sent = 0;
    let mut step = 0;
    let mut at_max = 0;
    loop {
        let dirty = tracking.take_round()?;
        let converging = dirty.len() * 100 <= previous.saturating_mul(CONVERGING_PERCENT);
        let done = dirty.len() <= DIRTY_THRESHOLD
            || rounds >= MAX_ROUNDS
            || at_max > ROUNDS_AT_MAX_THROTTLE;
        if done {
            return Ok((dirty, rounds, sent, throttle.stop()));
        }
        if !converging && previous != usize::MAX {
            if step < THROTTLE_STEPS.len() {
                throttle.set(THROTTLE_STEPS[step]);
                tracing::info!(
                    "migration: throttling the vCPUs to {}%",
                    THROTTLE_STEPS[step]
                );
                step += 1;
            } else {
                at_max += 1;
            }
        }
        progress.next_round(rounds + 1, dirty.len() as u64 * PAGE_SIZE);
        sent += send_page_list(out, ram, &dirty, progress)?;
        rounds += 1;
        tracing::info!("migration: round {rounds} sent {} pages", dirty.len());
        previous = dirty.len();
    }
}

/// The VM is paused: capture its state until the devices are quiet, hand over the image
/// locks, send the last pages and the state, wait for the `Ack`. Returns the pages sent and
/// the destination's resume time.
fn stop_and_copy(
    handle: &VmHandle,
    parts: &MachineParts,
    tracking: &DirtyTracking,
    pending: Vec<u64>,
    mut out: BufWriter<Stream>,
    mut stream: Stream,
    progress: &mut Progress,
) -> Result<(u64, u64), MigrationError> {
    let paused = Instant::now();
    let state = quiet_state(handle, parts)?;
    let captured = paused.elapsed();
    sluice_storage::lock::release_all()
        .map_err(|e| MigrationError::Vm(format!("cannot release the image locks: {e}")))?;
    // vhost-user backends: quiesced and released for the destination, before their logs'
    // last read below.
    sluice_devices::vhost_user_blk::migration::hand_over().map_err(MigrationError::Vm)?;
    let last = union(pending, &tracking.take_round()?);
    let last = union(last, &tracking.take_device_sticky());
    progress.next_round(progress.round(), last.len() as u64 * PAGE_SIZE);
    let sent = send_page_list(&mut out, &parts.ram, &last, progress)?;
    protocol::send_state(&mut out, &state)?;
    protocol::send_end(&mut out)?;
    out.flush()?;
    tracing::info!(
        "migration: stop-and-copy: state captured in {captured:?}, {sent} pages and the state \
         sent {:?} after the pause",
        paused.elapsed()
    );
    drop(out);
    stream.set_read_timeout(Some(ACK_TIMEOUT))?;
    match protocol::read_message(&mut stream) {
        Ok(Message::Ack { resumed_unix_ns }) => Ok((sent, resumed_unix_ns)),
        Ok(other) => Err(MigrationError::NoAck(format!("got {}", other.name()))),
        Err(e) => Err(MigrationError::NoAck(e.to_string())),
    }
}

/// Captures the paused VM until two captures agree on the devices: capturing quiesces the
/// virtio queues (requests taken complete) and leaves them stopped until the VM runs on here,
/// so a second capture normally agrees; virtio-net also carries what reached its tap
/// meanwhile (at most 256 frames per pair, so even a flood settles).
fn quiet_state(handle: &VmHandle, parts: &MachineParts) -> Result<MachineState, MigrationError> {
    let mut state = handle.capture_state(parts).map_err(MigrationError::Vm)?;
    for _ in 0..MAX_CAPTURES {
        let again = handle.capture_state(parts).map_err(MigrationError::Vm)?;
        if again.devices == state.devices {
            return Ok(again);
        }
        state = again;
    }
    Err(MigrationError::Vm(
        "the devices kept making progress while the VM was paused".into(),
    ))
}

/// Round 0: every non-zero page (the destination's RAM starts zeroed). Returns pages sent.
fn send_nonzero(
    out: &mut impl Write,
    ram: &GuestRam,
    progress: &mut Progress,
) -> Result<u64, MigrationError> {
    let mut buffer = vec![0u8; CHUNK];
    let mut sent = 0;
    let mut offset = 0u64;
    while offset < ram.size {
        let len = (ram.size - offset).min(CHUNK as u64) as usize;
        let chunk = &mut buffer[..len];
        ram.file.read_exact_at(chunk, offset)?;
        let sent_before = sent;
        // Runs of non-zero pages.
        let page = PAGE_SIZE as usize;
        let mut run_start = None;
        for index in 0..=len / page {
            // A slice comparison is one memcmp, even in a debug build.
            let nonzero = chunk
                .get(index * page..(index + 1) * page)
                .is_some_and(|p| p != ZERO_PAGE.as_slice());
            match (nonzero, run_start) {
                (true, None) => run_start = Some(index),
                (false, Some(start)) => {
                    protocol::send_pages(
                        out,
                        offset + (start * page) as u64,
                        &chunk[start * page..index * page],
                    )?;
                    sent += (index - start) as u64;
                    run_start = None;
                }
                _ => {}
            }
        }
        offset += len as u64;
        progress.advance(len as u64, sent - sent_before);
    }
    Ok(sent)
}

/// Sends the pages in `pages` (ascending file page numbers), coalescing neighbours.
fn send_page_list(
    out: &mut impl Write,
    ram: &GuestRam,
    pages: &[u64],
    progress: &mut Progress,
) -> Result<u64, MigrationError> {
    let mut buffer = Vec::new();
    let mut index = 0;
    while index < pages.len() {
        let start = pages[index];
        let mut end = index + 1;
        while end < pages.len()
            && pages[end] == start + (end - index) as u64
            && end - index < protocol::MAX_RUN_PAGES
        {
            end += 1;
        }
        let count = end - index;
        buffer.resize(count * PAGE_SIZE as usize, 0);
        let offset = start * PAGE_SIZE;
        if offset + buffer.len() as u64 > ram.size {
            return Err(MigrationError::Tracking(format!(
                "dirty page {start} outside guest RAM"
            )));
        }
        ram.file.read_exact_at(&mut buffer, offset)?;
        protocol::send_pages(out, offset, &buffer)?;
        progress.advance(buffer.len() as u64, count as u64);
        index = end;
    }
    Ok(pages.len() as u64)
}

/// Auto-converge: parks the vCPUs for a share of every period.
struct Throttle {
    percent: Arc<AtomicU8>,
    highest: AtomicU8,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    fn start(control: Arc<RunControl>) -> Self {
        let percent = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (percent, stop) = (percent.clone(), stop.clone());
            std::thread::Builder::new()
                .name("migration-throttle".into())
                .spawn(move || throttle_loop(&control, &percent, &stop))
                .ok()
        };
        Self {
            percent,
            highest: AtomicU8::new(0),
            stop,
            thread,
        }
    }

    fn set(&self, percent: u8) {
        self.percent.store(percent, Ordering::Relaxed);
        self.highest.fetch_max(percent, Ordering::Relaxed);
    }

    /// Stops throttling (the vCPUs run) and returns the highest percentage used.
    fn stop(mut self) -> u8 {
        self.finish();
        self.highest.load(Ordering::Relaxed)
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.finish();
    }
}

fn throttle_loop(control: &RunControl, percent: &AtomicU8, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let share = u32::from(percent.load(Ordering::Relaxed).min(100));
        if share == 0 {
            std::thread::sleep(THROTTLE_PERIOD / 10);
            continue;
        }
        if control.pause(PAUSE_TIMEOUT).is_err() {
            // The VM is ending; nothing to throttle.
            control.resume();
            return;
        }
        std::thread::sleep(THROTTLE_PERIOD * share / 100);
        control.resume();
        std::thread::sleep(THROTTLE_PERIOD * (100 - share) / 100);
    }
}
