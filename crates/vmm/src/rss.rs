//! The VMM's own memory footprint, read from /proc/self/status.
//!
//! Guest RAM is a shared memfd mapping, so the pages the guest touched show up as `RssShmem`;
//! `RssAnon + RssFile` is what sluice itself costs (heap, stacks, code).

/// Resident memory of this process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RssKib {
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
}

impl RssKib {
    /// What the VMM costs beyond guest RAM.
    pub fn overhead(&self) -> u64 {
        self.anon + self.file
    }

    /// Reads the current values; zeros when /proc is unavailable.
    pub fn current() -> Self {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| Self::parse(&s))
            .unwrap_or_default()
    }

    fn parse(status: &str) -> Self {
        let mut rss = Self::default();
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let kib = value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            match key {
                "RssAnon" => rss.anon = kib,
                "RssFile" => rss.file = kib,
                "RssShmem" => rss.shmem = kib,
                _ => {}
            }
        }
        rss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status_fields() {
        let status =
            "Name:\tsluice\nRssAnon:\t    1200 kB\nRssFile:\t    2300 kB\nRssShmem:\t  65536 kB\n";

        let rss = RssKib::parse(status);

        assert_eq!(
            rss,
            RssKib {
                anon: 1200,
                file: 2300,
                shmem: 65536
            }
        );
        assert_eq!(rss.overhead(), 3500);
    }

    #[test]
    fn reads_this_process() {
        assert!(RssKib::current().overhead() > 0);
    }
}
