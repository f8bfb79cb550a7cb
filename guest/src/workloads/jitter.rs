//! `jitter:ms=N`: a latency probe. The BSP spins for N ms in the workload ring (ring 3 by
//! default, where it runs natively on kvm_pvm) reading the TSC, and reports the gaps between
//! consecutive reads: time the vCPU did not run the loop — its own timer interrupts (every
//! 10 ms) and whatever the host took it away for (another thread on its CPU). Comparing runs
//! alone and beside a noisy neighbour shows what placement protects.

use super::Outcome;
use crate::time::now_ns;

/// Gap thresholds counted, in ns.
const BUCKETS: [u64; 4] = [10_000, 100_000, 1_000_000, 10_000_000];

struct Gaps {
    loops: u64,
    over: [u64; BUCKETS.len()],
    max_ns: u64,
    stolen_ns: u64,
}

fn spin(duration_ns: u64) -> Gaps {
    let mut gaps = Gaps {
        loops: 0,
        over: [0; BUCKETS.len()],
        max_ns: 0,
        stolen_ns: 0,
    };
    let start = now_ns();
    let mut last = start;
    while last - start < duration_ns {
        let now = now_ns();
        let gap = now - last;
        last = now;
        gaps.loops += 1;
        gaps.max_ns = gaps.max_ns.max(gap);
        if gap >= BUCKETS[0] {
            gaps.stolen_ns += gap;
        }
        for (count, threshold) in gaps.over.iter_mut().zip(BUCKETS) {
            *count += u64::from(gap >= threshold);
        }
    }
    gaps
}

pub fn run(ms: u64) -> Outcome {
    let gaps = crate::arch::ring3::run_workload_code(|| spin(ms * 1_000_000));
    crate::println!(
        "RESULT {{\"workload\":\"jitter\",\"ring\":{},\"ms\":{},\"loops\":{},\"gaps_over_10us\":{},\"gaps_over_100us\":{},\"gaps_over_1ms\":{},\"gaps_over_10ms\":{},\"max_gap_ns\":{},\"stolen_ns\":{},\"pass\":true}}",
        crate::arch::ring3::workload_ring(),
        ms,
        gaps.loops,
        gaps.over[0],
        gaps.over[1],
        gaps.over[2],
        gaps.over[3],
        gaps.max_ns,
        gaps.stolen_ns
    );
    Outcome::Pass
}
