//! The scenarios of the matrix and their guest kit command lines.
//!
//! Op counts are small on purpose: on kvm_pvm hosts the guest runs in KVM's instruction
//! emulator (about 1M instructions/s, ~600 µs of guest time per I/O), so the full matrix stays
//! near 15 minutes and `--quick` near 2.

use serde::Serialize;

/// Guest RAM for device scenarios (the blk benchmark's value).
pub const DEVICE_MEMORY_MIB: u32 = 256;
/// Guest RAM for the startup scenario (the startup benchmark's value).
pub const STARTUP_MEMORY_MIB: u32 = 128;

/// A block workload of the guest kit (`w=blk:...`), or the same pattern for fio.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlkParams {
    /// The guest kit's op: `randread`, `randwrite` or `read` (sequential).
    pub op: &'static str,
    pub bs: u32,
    /// Requests in flight per queue.
    pub qd: u32,
    pub queues: u16,
    pub ops: u64,
    /// The span of the disk the requests touch, in MiB.
    pub span_mb: u64,
    /// The guest kit publishes this many requests per kick (`mode=batch:batch=N`) instead of
    /// kicking after each one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_batch: Option<u32>,
}

/// A net workload of the guest kit (`w=net:...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetParams {
    /// `tx` (guest sends) or `rx` (the host feeds frames, the guest counts them).
    pub dir: &'static str,
    /// Payload bytes after the 14-byte Ethernet header.
    pub size: u32,
    pub frames: u64,
}

/// What a scenario measures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Workload {
    Blk(BlkParams),
    Net(NetParams),
    /// Process start to the guest kit's first console line and first RESULT (`w=info`).
    Startup,
    /// Process start to the first guest instruction, setup time and the VMM's own memory, with
    /// a probe guest whose first instruction exits (bench/guests/first-insn-exit.S).
    FirstInstruction,
}

/// One row group of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scenario {
    pub id: String,
    #[serde(flatten)]
    pub workload: Workload,
}

impl Scenario {
    /// The guest kit command line of this scenario.
    pub fn guest_cmdline(&self) -> String {
        match &self.workload {
            Workload::Blk(b) => {
                let batch = b
                    .guest_batch
                    .map(|n| format!(":mode=batch:batch={n}"))
                    .unwrap_or_default();
                format!(
                    "quiet w=blk:op={}:bs={}:qd={}:queues={}:ops={}:span_mb={}{batch}",
                    b.op, b.bs, b.qd, b.queues, b.ops, b.span_mb
                )
            }
            Workload::Net(n) => format!(
                "quiet w=net:dir={}:size={}:frames={}",
                n.dir, n.size, n.frames
            ),
            Workload::Startup => "quiet w=info".to_owned(),
            Workload::FirstInstruction => "(no guest kit: bench/guests/first-insn-exit.S)".into(),
        }
    }

    /// The workload name in the guest kit's RESULT line.
    pub fn result_workload(&self) -> &'static str {
        match self.workload {
            Workload::Blk(_) => "blk",
            Workload::Net(_) => "net",
            Workload::Startup | Workload::FirstInstruction => "info",
        }
    }

    /// Guest RAM for this scenario.
    pub fn memory_mib(&self) -> u32 {
        match self.workload {
            Workload::Startup | Workload::FirstInstruction => STARTUP_MEMORY_MIB,
            _ => DEVICE_MEMORY_MIB,
        }
    }

    /// True when `pattern` selects this scenario for `competitor`. A pattern is
    /// `SCENARIO[/COMPETITOR]`: a substring of the scenario id, and optionally a competitor id
    /// (exact, so `sluice` does not also select `sluice-vhost-serve`); commas separate
    /// alternatives.
    pub fn selected(&self, competitor: &str, pattern: Option<&str>) -> bool {
        let Some(pattern) = pattern else {
            return true;
        };
        pattern
            .split(',')
            .filter(|p| !p.is_empty())
            .any(|p| match p.split_once('/') {
                Some((scenario, wanted)) => self.id.contains(scenario) && wanted == competitor,
                None => self.id.contains(p),
            })
    }
}

fn blk(op: &'static str, bs: u32, qd: u32, queues: u16, ops: u64, span_mb: u64) -> Scenario {
    let name = match op {
        "read" => "seqread",
        other => other,
    };
    Scenario {
        id: format!("blk-{name}-{}k-qd{qd}-{queues}q", bs / 1024),
        workload: Workload::Blk(BlkParams {
            op,
            bs,
            qd,
            queues,
            ops,
            span_mb,
            guest_batch: None,
        }),
    }
}

/// `scenario` with the guest kit publishing `batch` requests per kick.
fn guest_batched(mut scenario: Scenario, batch: u32) -> Scenario {
    if let Workload::Blk(params) = &mut scenario.workload {
        params.guest_batch = Some(batch);
        scenario.id.push_str("-gbatch");
    }
    scenario
}

fn net(dir: &'static str, size: u32, frames: u64) -> Scenario {
    Scenario {
        id: format!("net-{dir}-{size}b"),
        workload: Workload::Net(NetParams { dir, size, frames }),
    }
}

/// The whole matrix; `quick` shrinks the op counts (not the list).
pub fn matrix(quick: bool, span_mb: u64) -> Vec<Scenario> {
    // Ops per run: the guest kit's data paths run natively in ring 3, so a run needs tens of
    // thousands of requests to last ~0.5-1 s on kvm_pvm (~40k IOPS at QD32, ~6k at QD1,
    // ~20k 64-byte tx frames/s): long enough for the 10 ms CPU-time ticks to resolve the CPU
    // per request, short enough to keep the matrix under ~20 minutes.
    let (ops_qd1, ops_qd32, ops_seq, frames) = if quick {
        (100, 200, 40, 100)
    } else {
        (3000, 30000, 2000, 20000)
    };
    let mut scenarios = Vec::new();
    for op in ["randread", "randwrite"] {
        for (qd, ops) in [(1, ops_qd1), (32, ops_qd32)] {
            for queues in [1, 2] {
                scenarios.push(blk(op, 4096, qd, queues, ops, span_mb));
            }
        }
    }
    // Guest-side batching: one kick per 16 requests, against the kick per request above.
    scenarios.push(guest_batched(
        blk("randread", 4096, 32, 1, ops_qd32, span_mb),
        16,
    ));
    scenarios.push(blk("read", 128 * 1024, 4, 1, ops_seq, span_mb));
    for dir in ["tx", "rx"] {
        for size in [64, 1500] {
            // Received frames arrive at the host feeder's pace (net.rs), not the guest's:
            // a fifth of the count keeps rx runs as short as tx ones.
            let count = if dir == "rx" { frames / 5 } else { frames };
            scenarios.push(net(dir, size, count));
        }
    }
    scenarios.push(Scenario {
        id: "startup".to_owned(),
        workload: Workload::Startup,
    });
    scenarios.push(Scenario {
        id: "startup-first-insn".to_owned(),
        workload: Workload::FirstInstruction,
    });
    scenarios
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_has_unique_ids_and_the_issue_scenarios() {
        let scenarios = matrix(false, 128);

        let mut ids: Vec<&str> = scenarios.iter().map(|s| s.id.as_str()).collect();
        for expected in [
            "blk-randread-4k-qd1-1q",
            "blk-randwrite-4k-qd32-2q",
            "blk-seqread-128k-qd4-1q",
            "net-tx-64b",
            "net-rx-1500b",
            "blk-randread-4k-qd32-1q-gbatch",
            "startup",
            "startup-first-insn",
        ] {
            assert!(ids.contains(&expected), "{expected} missing from {ids:?}");
        }
        let count = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), count, "duplicate scenario ids");
    }

    #[test]
    fn blk_cmdline_carries_every_parameter() {
        let scenario = blk("randwrite", 4096, 32, 2, 500, 64);

        assert_eq!(
            scenario.guest_cmdline(),
            "quiet w=blk:op=randwrite:bs=4096:qd=32:queues=2:ops=500:span_mb=64"
        );
    }

    #[test]
    fn guest_batched_scenario_asks_the_guest_kit_to_batch() {
        let scenario = guest_batched(blk("randread", 4096, 32, 1, 200, 32), 16);

        assert_eq!(scenario.id, "blk-randread-4k-qd32-1q-gbatch");
        assert_eq!(
            scenario.guest_cmdline(),
            "quiet w=blk:op=randread:bs=4096:qd=32:queues=1:ops=200:span_mb=32\
             :mode=batch:batch=16"
        );
    }

    #[test]
    fn only_matches_a_scenario_substring_and_an_exact_competitor() {
        let scenario = net("rx", 64, 10);

        assert!(scenario.selected("qemu", None));
        assert!(scenario.selected("qemu", Some("net-rx")));
        assert!(scenario.selected("qemu", Some("startup,rx-64b/qemu")));
        assert!(!scenario.selected("sluice", Some("rx-64b/qemu")));
        assert!(!scenario.selected("qemu", Some("blk")));
        assert!(scenario.selected("sluice", Some("rx/sluice")));
        assert!(!scenario.selected("sluice-vhost-serve", Some("rx/sluice")));
    }
}
