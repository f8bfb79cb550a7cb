//! Names of the per-run metrics in `results.json`, and which ones the table, the ratios and the
//! plot use.

/// Guest ops (blk requests or net frames) of the timed loop; fio: total I/Os.
pub const OPS: &str = "ops";
/// Ops per second of the timed loop (the guest kit's RESULT: ops / elapsed_ns): IOPS or frames/s.
pub const RATE: &str = "rate";
pub const MIB_PER_S: &str = "mib_per_s";
pub const LAT_P50_US: &str = "lat_p50_us";
pub const LAT_P99_US: &str = "lat_p99_us";
/// CPU seconds (user + system) of every process involved (VMM, vhost-user backend) from the
/// guest kit's last `PCI:` line to its RESULT line, sampled from /proc/<pid>/stat; fio: its
/// whole rusage.
pub const HOST_CPU_S: &str = "host_cpu_s";
pub const HOST_CPU_US_PER_OP: &str = "host_cpu_us_per_op";
/// sluice only, from `--metrics`: every exit to userspace, boot included, per op.
pub const EXITS_PER_OP: &str = "exits_per_op";
/// The same without the guest's COM1 console output.
pub const EXITS_PER_OP_NO_CONSOLE: &str = "exits_per_op_no_console";
/// sluice only: doorbell kicks (ioeventfd signals) per op; absent for vhost-user devices.
pub const KICKS_PER_OP: &str = "kicks_per_op";
pub const INTERRUPTS_PER_OP: &str = "interrupts_per_op";
/// sluice only: device-side request latency (pop from the ring to the used entry) of the busiest
/// queue, from `--metrics`' log2 histogram (a bucket's upper bound).
pub const DEVICE_LAT_P50_US: &str = "device_lat_p50_us";
pub const DEVICE_LAT_P99_US: &str = "device_lat_p99_us";
/// The VMM process's max RSS (wait4 ru_maxrss), guest RAM it touched included.
pub const VMM_MAX_RSS_MIB: &str = "vmm_max_rss_mib";
/// Process spawn to the guest kit's first console line (a VMM's own banner does not count).
pub const FIRST_LINE_MS: &str = "first_line_ms";
/// Process spawn to the first RESULT line (guest kit ready and done with `w=info`).
pub const READY_MS: &str = "ready_ms";
/// Process spawn to reaped; absent for VMMs the bench stops itself after the guest kit's
/// verdict (Cloud Hypervisor, Firecracker).
pub const EXIT_MS: &str = "exit_ms";
/// sluice only (startup-first-insn): process spawn to the first vCPU exit, which is the probe
/// guest's first instruction (sluice logs its time as `first_exit_unix_ns`).
pub const FIRST_INSN_MS: &str = "first_insn_ms";
/// sluice only: in-process setup, `run()` to the vCPUs started (sluice's `setup_us`).
pub const SETUP_MS: &str = "setup_ms";
/// sluice only: RssAnon + RssFile when the VM stops, i.e. without guest RAM (a shared memfd,
/// counted as RssShmem); sluice's `rss_overhead_kib`.
pub const VMM_RSS_OVERHEAD_MIB: &str = "vmm_rss_overhead_mib";

/// Metrics summarized in the table, with a short header and the digits shown.
pub const TABLE: &[(&str, &str, usize)] = &[
    (RATE, "ops/s", 0),
    (MIB_PER_S, "MiB/s", 1),
    (HOST_CPU_US_PER_OP, "host CPU µs/op", 0),
    (EXITS_PER_OP, "exits/op", 3),
    (EXITS_PER_OP_NO_CONSOLE, "exits/op w/o COM1", 4),
    (KICKS_PER_OP, "kicks/op", 3),
    (INTERRUPTS_PER_OP, "irqs/op", 3),
    (LAT_P50_US, "lat p50 µs", 0),
    (DEVICE_LAT_P50_US, "device lat p50 µs", 0),
    (DEVICE_LAT_P99_US, "device lat p99 µs", 0),
    (VMM_MAX_RSS_MIB, "VMM max RSS MiB", 1),
];

/// Metrics of the startup table.
pub const STARTUP_TABLE: &[(&str, &str, usize)] = &[
    (FIRST_INSN_MS, "first guest instruction ms", 2),
    (SETUP_MS, "in-process setup ms", 2),
    (FIRST_LINE_MS, "first console line ms", 1),
    (READY_MS, "ready (RESULT) ms", 1),
    (EXIT_MS, "process exit ms", 1),
    (VMM_MAX_RSS_MIB, "VMM max RSS MiB", 1),
    (VMM_RSS_OVERHEAD_MIB, "VMM RSS w/o guest RAM MiB", 2),
];

/// Metrics whose ratios between competitors are reported.
pub const RATIOS: &[&str] = &[RATE, HOST_CPU_US_PER_OP, READY_MS, VMM_MAX_RSS_MIB];
