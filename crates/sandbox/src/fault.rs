//! Test-only faults (feature `fault-injection`, enabled by sluice's dev-dependency, so never in
//! a release build): `SLUICE_TEST_FAULT=TARGET:FAULT[:N]` makes the N-th thread (default the
//! first) of TARGET — a kind (`vcpu`, `queue-worker`, `vhost-frontend`, `irq-resampler`,
//! `connection`) or a
//! thread name (`vcpu1`) — fail as it starts: `panic`, or `syscall`, a call no filter allows
//! (sysinfo(2), harmless when unfiltered).

use std::sync::atomic::{AtomicU32, Ordering};

use crate::ThreadKind;

/// Targeted threads of each kind started so far (indexed like `ThreadKind as usize`).
static STARTED: [AtomicU32; 5] = [const { AtomicU32::new(0) }; 5];

pub(crate) fn at_start(kind: ThreadKind) {
    let Ok(spec) = std::env::var("SLUICE_TEST_FAULT") else {
        return;
    };
    let mut parts = spec.split(':');
    let (Some(target), Some(fault)) = (parts.next(), parts.next()) else {
        return;
    };
    let wanted: u32 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(1);
    let thread = std::thread::current();
    if target != kind.name() && Some(target) != thread.name() {
        return;
    }
    if STARTED[kind as usize].fetch_add(1, Ordering::Relaxed) + 1 != wanted {
        return;
    }
    match fault {
        "panic" => panic!(
            "SLUICE_TEST_FAULT: injected panic in a {} thread",
            kind.name()
        ),
        "syscall" => {
            // SAFETY: sysinfo(2) into a valid, owned buffer; no side effects.
            let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::sysinfo(&mut info) };
        }
        _ => {}
    }
}
