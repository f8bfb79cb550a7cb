//! Per-device and per-queue counters. Updated with relaxed atomics from the queue workers; read
//! at any time for JSON and Prometheus export.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Log2 latency buckets in nanoseconds: bucket i counts latencies in [2^i, 2^(i+1)).
const BUCKETS: usize = 40;

/// A lock-free latency histogram with log2 buckets.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, nanos: u64) {
        let bucket = (63 - nanos.max(1).leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts per bucket.
    pub fn counts(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// Upper bound (ns) of the bucket holding the `q` quantile (0.0..=1.0), or 0 if empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let target = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return 1u64 << (i + 1);
            }
        }
        1u64 << BUCKETS
    }
}

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    /// Driver notifications received (kick eventfd wakeups).
    pub kicks: AtomicU64,
    /// Interrupts sent to the driver.
    pub interrupts: AtomicU64,
    /// Interrupts not sent because EVENT_IDX / flags said the driver did not want them, or
    /// because batching coalesced them.
    pub notifications_suppressed: AtomicU64,
    /// Times the worker went into its poll loop (`notify=poll`, or `notify=sched` while its
    /// scheduler has the guest polled).
    pub poll_entries: AtomicU64,
    /// Requests (descriptor chains) completed.
    pub requests: AtomicU64,
    /// Payload bytes moved.
    pub bytes: AtomicU64,
    /// Requests completed with an error status (malformed, backend I/O error).
    pub errors: AtomicU64,
    /// Time from popping a chain to adding it to the used ring.
    pub latency: LatencyHistogram,
    /// When the queue's worker stopped: buffers the driver had published that the device never
    /// took (a lost kick if the VM hung), and requests still in flight in the device (a lost
    /// completion). Both 0 after a clean run.
    pub unread_at_stop: AtomicU64,
    pub in_flight_at_stop: AtomicU64,
}

impl QueueMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one finished request popped at `started`: `Ok(bytes)` moved that much payload,
    /// `Err(())` completed with an error status (or a zero-length used entry).
    pub fn record_request(&self, started: Instant, outcome: Result<u64, ()>) {
        Self::add(&self.requests, 1);
        match outcome {
            Ok(bytes) => Self::add(&self.bytes, bytes),
            Err(()) => Self::add(&self.errors, 1),
        }
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.latency.record(nanos);
    }
}

/// Counters of one device.
#[derive(Debug)]
pub struct DeviceMetrics {
    pub name: String,
    pub queues: Vec<QueueMetrics>,
    /// Device-specific counters outside any queue (an emulated device's exits per register,
    /// its interrupts); empty for virtio devices.
    pub counters: Vec<NamedCounter>,
}

/// One device-wide counter with its name in the JSON / Prometheus output.
#[derive(Debug)]
pub struct NamedCounter {
    pub name: &'static str,
    pub value: AtomicU64,
}

impl DeviceMetrics {
    pub fn new(name: impl Into<String>, queues: usize) -> Self {
        Self::with_counters(name, queues, &[])
    }

    /// Like [`DeviceMetrics::new`], plus the named device-wide counters `names` (all zero).
    pub fn with_counters(name: impl Into<String>, queues: usize, names: &[&'static str]) -> Self {
        Self {
            name: name.into(),
            queues: (0..queues).map(|_| QueueMetrics::default()).collect(),
            counters: names
                .iter()
                .map(|&name| NamedCounter {
                    name,
                    value: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    /// Adds `n` to the named counter at `index` (ignored if there is none).
    pub fn count(&self, index: usize, n: u64) {
        if let Some(counter) = self.counters.get(index) {
            QueueMetrics::add(&counter.value, n);
        }
    }

    /// Adds `n` to the named counter `name` (ignored if there is none).
    pub fn count_named(&self, name: &str, n: u64) {
        if let Some(counter) = self.counters.iter().find(|c| c.name == name) {
            QueueMetrics::add(&counter.value, n);
        }
    }

    /// The value of the named counter `name`, if the device has it.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.value.load(Ordering::Relaxed))
    }

    /// JSON object: {"device": name, "queues": [{"kicks":..,"latency_ns":{"p50":..}}]}.
    pub fn to_json(&self) -> serde_json::Value {
        let queues: Vec<serde_json::Value> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
                serde_json::json!({
                    "queue": i,
                    "kicks": load(&q.kicks),
                    "interrupts": load(&q.interrupts),
                    "notifications_suppressed": load(&q.notifications_suppressed),
                    "poll_entries": load(&q.poll_entries),
                    "requests": load(&q.requests),
                    "bytes": load(&q.bytes),
                    "errors": load(&q.errors),
                    "unread_at_stop": load(&q.unread_at_stop),
                    "in_flight_at_stop": load(&q.in_flight_at_stop),
                    "latency_ns": {
                        "p50": q.latency.quantile(0.5),
                        "p90": q.latency.quantile(0.9),
                        "p99": q.latency.quantile(0.99),
                    },
                })
            })
            .collect();
        let mut json = serde_json::json!({ "device": self.name, "queues": queues });
        if !self.counters.is_empty() {
            let counters: serde_json::Map<String, serde_json::Value> = self
                .counters
                .iter()
                .map(|c| (c.name.to_string(), c.value.load(Ordering::Relaxed).into()))
                .collect();
            json["counters"] = counters.into();
        }
        json
    }

    /// Prometheus text exposition lines (counters labelled by device and queue).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        for (i, q) in self.queues.iter().enumerate() {
            for (metric, counter) in [
                ("kicks", &q.kicks),
                ("interrupts", &q.interrupts),
                ("notifications_suppressed", &q.notifications_suppressed),
                ("poll_entries", &q.poll_entries),
                ("requests", &q.requests),
                ("bytes", &q.bytes),
                ("errors", &q.errors),
            ] {
                out.push_str(&format!(
                    "sluice_virtio_{metric}_total{{device=\"{}\",queue=\"{i}\"}} {}\n",
                    self.name,
                    counter.load(Ordering::Relaxed)
                ));
            }
        }
        for counter in &self.counters {
            out.push_str(&format!(
                "sluice_device_{}_total{{device=\"{}\"}} {}\n",
                counter.name,
                self.name,
                counter.value.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_follow_recorded_latencies() {
        let h = LatencyHistogram::default();
        for _ in 0..90 {
            h.record(1_000); // bucket [512, 1024) .. 1000 is in [512,1024)
        }
        for _ in 0..10 {
            h.record(1_000_000);
        }

        assert_eq!(h.quantile(0.5), 1024);
        assert_eq!(h.quantile(0.99), 1 << 20);
        assert_eq!(LatencyHistogram::default().quantile(0.5), 0);
    }

    #[test]
    fn exports_json_and_prometheus() {
        let m = DeviceMetrics::new("blk0", 2);
        QueueMetrics::add(&m.queues[1].requests, 3);

        let json = m.to_json();
        let prom = m.to_prometheus();

        assert_eq!(json["queues"][1]["requests"], 3);
        assert!(prom.contains("sluice_virtio_requests_total{device=\"blk0\",queue=\"1\"} 3"));
        assert!(json.get("counters").is_none());
    }

    #[test]
    fn device_counters_are_exported_by_name() {
        let m = DeviceMetrics::with_counters("nvme0", 1, &["cc", "sq_doorbells"]);
        m.count_named("sq_doorbells", 5);
        m.count_named("other", 1);

        let json = m.to_json();
        let prom = m.to_prometheus();

        assert_eq!(json["counters"]["sq_doorbells"], 5);
        assert_eq!(json["counters"]["cc"], 0);
        assert!(m.counter("other").is_none());
        assert!(prom.contains("sluice_device_sq_doorbells_total{device=\"nvme0\"} 5"));
    }

    #[test]
    fn named_counters_are_exported_only_when_a_device_has_them() {
        let plain = DeviceMetrics::new("blk0", 1);
        let nic = DeviceMetrics::with_counters("e1000", 2, &["exits_tdt", "interrupts"]);

        nic.count(0, 2);
        nic.count(9, 1);

        assert!(plain.to_json().get("counters").is_none());
        assert_eq!(nic.to_json()["counters"]["exits_tdt"], 2);
        assert_eq!(nic.counter("interrupts"), Some(0));
        assert!(nic
            .to_prometheus()
            .contains("sluice_device_exits_tdt_total{device=\"e1000\"} 2"));
    }

    #[test]
    fn a_recorded_request_counts_bytes_or_an_error_and_its_latency() {
        let q = QueueMetrics::default();
        let started = Instant::now() - std::time::Duration::from_millis(1);

        q.record_request(started, Ok(4096));
        q.record_request(started, Err(()));

        assert_eq!(q.requests.load(Ordering::Relaxed), 2);
        assert_eq!(q.bytes.load(Ordering::Relaxed), 4096);
        assert_eq!(q.errors.load(Ordering::Relaxed), 1);
        assert_eq!(q.latency.counts().iter().sum::<u64>(), 2);
        assert!(
            q.latency.quantile(0.5) > 1_000_000,
            "at least the 1 ms that passed"
        );
    }
}
