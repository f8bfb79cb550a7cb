//! Test-only faults (feature `fault-injection`, enabled by sluice's dev-dependency, so never in
//! a release build), chosen by `SLUICE_TEST_FAULT=TARGET:FAULT[:N]`. TARGET is
//! * a thread kind (`vcpu`, `queue-worker`, `vhost-frontend`, `irq-resampler`, `connection`)
//!   or a thread name (`vcpu1`): the N-th such thread (default the first) fails as it starts;
//! * or a code path marked with [`crate::fault_point`] (`vcpu-mmio-write`: a vCPU about to
//!   hand a guest MMIO write to its device): the N-th pass there fails.
//!
//! FAULT is `panic`, or `syscall` — a call no filter allows (sysinfo(2), harmless unfiltered).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use crate::ThreadKind;

struct Spec {
    target: String,
    fault: String,
    nth: u32,
    /// Matching threads started / passes made so far.
    seen: AtomicU32,
}

fn spec() -> Option<&'static Spec> {
    static SPEC: OnceLock<Option<Spec>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let text = std::env::var("SLUICE_TEST_FAULT").ok()?;
        let mut parts = text.split(':');
        let (target, fault) = (parts.next()?, parts.next()?);
        Some(Spec {
            target: target.to_owned(),
            fault: fault.to_owned(),
            nth: parts.next().and_then(|n| n.parse().ok()).unwrap_or(1),
            seen: AtomicU32::new(0),
        })
    })
    .as_ref()
}

pub(crate) fn at_start(kind: ThreadKind) {
    let thread = std::thread::current();
    let Some(spec) = spec().filter(|s| s.target == kind.name() || thread.name() == Some(&s.target))
    else {
        return;
    };
    hit(spec, kind.name());
}

pub(crate) fn at_point(point: &str) {
    if let Some(spec) = spec().filter(|s| s.target == point) {
        hit(spec, point);
    }
}

fn hit(spec: &Spec, what: &str) {
    if spec.seen.fetch_add(1, Ordering::Relaxed) + 1 != spec.nth {
        return;
    }
    match spec.fault.as_str() {
        "panic" => panic!("SLUICE_TEST_FAULT: injected panic at {what}"),
        "syscall" => {
            // SAFETY: sysinfo(2) into a valid, owned buffer; no side effects.
            let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::sysinfo(&raw mut info) };
        }
        _ => {}
    }
}
