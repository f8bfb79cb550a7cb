//! Latency histogram: log2 buckets split into 16 linear sub-buckets (≤ 6.25 % error), integer
//! only (the kernel has no floating point).

const SUB_BITS: u32 = 4;
const SUBS: usize = 1 << SUB_BITS;
const BUCKETS: usize = 64 - SUB_BITS as usize + 1;

pub struct Histogram {
    counts: [[u64; SUBS]; BUCKETS],
    total: u64,
    max: u64,
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: [[0; SUBS]; BUCKETS],
            total: 0,
            max: 0,
        }
    }

    fn index(value: u64) -> (usize, usize) {
        if value < SUBS as u64 {
            return (0, value as usize);
        }
        let bucket = 63 - value.leading_zeros() - SUB_BITS + 1;
        let sub = (value >> (bucket - 1)) as usize & (SUBS - 1);
        (bucket as usize, sub)
    }

    /// Lower bound of the values in (bucket, sub).
    fn value_of(bucket: usize, sub: usize) -> u64 {
        if bucket == 0 {
            sub as u64
        } else {
            ((SUBS + sub) as u64) << (bucket - 1)
        }
    }

    pub fn record(&mut self, value: u64) {
        let (bucket, sub) = Self::index(value);
        self.counts[bucket][sub] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    /// Adds `other`'s samples (another CPU's share of the same run).
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            for (count, more) in mine.iter_mut().zip(theirs.iter()) {
                *count += more;
            }
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// Value below which `percent` % of the samples fall (bucket lower bound).
    pub fn percentile(&self, percent: u64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = (self.total * percent).div_ceil(100).max(1);
        let mut seen = 0;
        for (bucket, subs) in self.counts.iter().enumerate() {
            for (sub, count) in subs.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return Self::value_of(bucket, sub).min(self.max);
                }
            }
        }
        self.max
    }

    /// `{"p50":..,"p90":..,"p99":..,"max":..}`
    pub fn json(&self) -> alloc::string::String {
        alloc::format!(
            "{{\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{}}}",
            self.percentile(50),
            self.percentile(90),
            self.percentile(99),
            self.max
        )
    }
}
