//! The `--qos` option strings: `key=value` pairs separated by commas.
//!
//! Guest keys: `weight=N` (1..=1000), `iops=N`, `iops_burst=N`, `bps=SIZE`, `bps_burst=SIZE`,
//! `queue=N` (requests held per virtqueue, 1..=4096). Device keys (`--qos-device`): `depth=N`
//! (1..=1024), `idle_depth=N`, `poll_guests=N` (0..=1024: guests polled at once under
//! `notify=sched`), `iops`, `iops_burst`, `bps`, `bps_burst`. SIZE takes K, M, G
//! (powers of 1024). A rate of 0 means no limit; a burst without its rate is refused.

use crate::bucket::Rate;
use crate::scheduler::{DeviceConfig, GuestConfig};

/// Rate keys shared by guests and the device.
#[derive(Default)]
struct Rates {
    iops: Option<u64>,
    iops_burst: Option<u64>,
    bps: Option<u64>,
    bps_burst: Option<u64>,
}

impl Rates {
    /// Takes `key=value` if it is a rate key.
    fn take(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let slot = match key {
            "iops" => &mut self.iops,
            "iops_burst" => &mut self.iops_burst,
            "bps" => &mut self.bps,
            "bps_burst" => &mut self.bps_burst,
            _ => return Ok(false),
        };
        *slot = Some(parse_size(value).ok_or_else(|| format!("bad {key} value {value:?}"))?);
        Ok(true)
    }

    fn build(rate: Option<u64>, burst: Option<u64>, what: &str) -> Result<Option<Rate>, String> {
        match (rate.and_then(Rate::new), burst) {
            (None, Some(_)) => Err(format!("{what}_burst needs {what}")),
            (Some(rate), Some(0)) => Err(format!("{what}_burst=0 would never pass ({rate:?})")),
            (Some(rate), Some(burst)) => Ok(Some(Rate { burst, ..rate })),
            (rate, None) => Ok(rate),
        }
    }

    /// The IOPS and bandwidth rates after these keys are applied to `iops` and `bps`: a
    /// rate not named keeps its value, a burst named alone applies to the current rate.
    fn apply_to(
        mut self,
        iops: Option<Rate>,
        bps: Option<Rate>,
    ) -> Result<(Option<Rate>, Option<Rate>), String> {
        let touched = (
            self.iops.is_some() || self.iops_burst.is_some(),
            self.bps.is_some() || self.bps_burst.is_some(),
        );
        if self.iops.is_none() {
            self.iops = iops.map(|r| r.per_sec);
        }
        if self.bps.is_none() {
            self.bps = bps.map(|r| r.per_sec);
        }
        let new_iops = Self::build(self.iops, self.iops_burst, "iops")?;
        let new_bps = Self::build(self.bps, self.bps_burst, "bps")?;
        Ok((
            if touched.0 { new_iops } else { iops },
            if touched.1 { new_bps } else { bps },
        ))
    }
}

fn pairs(spec: &str) -> impl Iterator<Item = Result<(&str, &str), String>> {
    spec.split(',').filter(|p| !p.is_empty()).map(|pair| {
        pair.split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))
    })
}

fn number_in(value: &str, key: &str, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| format!("{key} must be in {}..={}", range.start(), range.end()))
}

/// A guest's configuration named `name` from `spec` (defaults: [`GuestConfig::new`]).
pub fn parse_guest(name: &str, spec: &str) -> Result<GuestConfig, String> {
    apply_guest(&GuestConfig::new(name), spec)
}

/// `current` with the keys of `spec` changed (live reconfiguration): a key not given keeps
/// its value; a rate given without its burst gets the default burst; a burst given alone
/// applies to the current rate; a rate of 0 removes that limit.
pub fn apply_guest(current: &GuestConfig, spec: &str) -> Result<GuestConfig, String> {
    let mut config = current.clone();
    let mut rates = Rates::default();
    for pair in pairs(spec) {
        let (key, value) = pair?;
        if rates.take(key, value)? {
            continue;
        }
        match key {
            "weight" => config.weight = number_in(value, key, 1..=1000)? as u32,
            "queue" => config.queue_limit = number_in(value, key, 1..=4096)? as usize,
            _ => return Err(format!("unknown qos key {key:?}")),
        }
    }
    (config.iops, config.bps) = rates.apply_to(current.iops, current.bps)?;
    Ok(config)
}

/// The device's configuration from `spec` (defaults: [`DeviceConfig::default`]).
pub fn parse_device(spec: &str) -> Result<DeviceConfig, String> {
    apply_device(&DeviceConfig::default(), spec)
}

/// `current` with the keys of `spec` changed (a live `--qos-device` change), by the rules of
/// [`apply_guest`].
pub fn apply_device(current: &DeviceConfig, spec: &str) -> Result<DeviceConfig, String> {
    let mut config = current.clone();
    let mut rates = Rates::default();
    for pair in pairs(spec) {
        let (key, value) = pair?;
        if rates.take(key, value)? {
            continue;
        }
        match key {
            "depth" => config.depth = number_in(value, key, 1..=1024)? as usize,
            "idle_depth" => config.idle_depth = number_in(value, key, 1..=1024)? as usize,
            "poll_guests" => config.poll_guests = number_in(value, key, 0..=1024)? as usize,
            _ => return Err(format!("unknown qos device key {key:?}")),
        }
    }
    (config.iops, config.bps) = rates.apply_to(current.iops, current.bps)?;
    Ok(config)
}

/// `N`, `NK`, `NM`, `NG` (powers of 1024).
fn parse_size(value: &str) -> Option<u64> {
    let (digits, shift) = match value.as_bytes().last()? {
        b'K' | b'k' => (&value[..value.len() - 1], 10),
        b'M' | b'm' => (&value[..value.len() - 1], 20),
        b'G' | b'g' => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_spec_sets_weight_rates_and_bursts() {
        let config = parse_guest("a", "weight=3,iops=1000,iops_burst=50,bps=8M,queue=64").unwrap();
        assert_eq!(config.weight, 3);
        assert_eq!(
            config.iops,
            Some(Rate {
                per_sec: 1000,
                burst: 50
            })
        );
        assert_eq!(
            config.bps,
            Some(Rate {
                per_sec: 8 << 20,
                burst: (8 << 20) / 10
            })
        );
        assert_eq!(config.queue_limit, 64);
        assert_eq!(parse_guest("b", "").unwrap(), GuestConfig::new("b"));
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        for (spec, why) in [
            ("weight=0", "weight must be in 1..=1000"),
            ("weight=x", "weight must be in"),
            ("iops_burst=5", "iops_burst needs iops"),
            ("iops=5,iops_burst=0", "would never pass"),
            ("bps=1Q", "bad bps value"),
            ("bps=99999999999G", "bad bps value"),
            ("speed=5", "unknown qos key"),
            ("weight", "is not key=value"),
            ("queue=0", "queue must be"),
        ] {
            let error = parse_guest("g", spec).unwrap_err();
            assert!(error.contains(why), "{spec}: {error}");
        }
        assert!(parse_device("depth=0").is_err());
        assert!(parse_device("weight=2").is_err());
    }

    #[test]
    fn a_live_change_keeps_what_it_does_not_name() {
        let current = parse_guest("a", "weight=3,iops=1000,iops_burst=50,bps=8M").unwrap();
        let faster = apply_guest(&current, "iops=2000").unwrap();
        assert_eq!(faster.weight, 3);
        assert_eq!(faster.bps, current.bps);
        assert_eq!(
            faster.iops,
            Rate::new(2000),
            "a new rate takes the default burst"
        );
        let burst = apply_guest(&current, "iops_burst=7").unwrap();
        assert_eq!(
            burst.iops,
            Some(Rate {
                per_sec: 1000,
                burst: 7
            })
        );
        let unlimited = apply_guest(&current, "iops=0,weight=9").unwrap();
        assert_eq!((unlimited.iops, unlimited.weight), (None, 9));
        assert_eq!(unlimited.bps, current.bps);
        assert_eq!(apply_guest(&current, "").unwrap(), current);
        let plain = GuestConfig::new("b");
        assert!(apply_guest(&plain, "bps_burst=4K")
            .unwrap_err()
            .contains("bps_burst needs bps"));
        assert!(apply_guest(&current, "iops=0,iops_burst=5").is_err());
        assert!(apply_guest(&current, "weight=1001").is_err());
    }

    #[test]
    fn a_live_device_change_keeps_what_it_does_not_name() {
        let current = parse_device("depth=2,iops=600,bps=100M").unwrap();
        let changed = apply_device(&current, "iops=900,depth=8").unwrap();
        assert_eq!((changed.depth, changed.idle_depth), (8, current.idle_depth));
        assert_eq!(changed.iops, Rate::new(900));
        assert_eq!(changed.bps, current.bps);
        let burst = apply_device(&current, "bps_burst=1M").unwrap();
        assert_eq!(
            burst.bps.map(|r| (r.per_sec, r.burst)),
            Some((100 << 20, 1 << 20))
        );
        let unlimited = apply_device(&current, "iops=0").unwrap();
        assert_eq!((unlimited.iops, unlimited.bps), (None, current.bps));
        assert_eq!(apply_device(&current, "").unwrap(), current);
        for bad in ["depth=0", "weight=3", "iops_burst=0", "depth=2000", "bps=x"] {
            assert!(apply_device(&current, bad).is_err(), "{bad}");
        }
        let plain = DeviceConfig::default();
        assert!(apply_device(&plain, "iops_burst=4")
            .unwrap_err()
            .contains("iops_burst needs iops"));
    }

    #[test]
    fn a_device_spec_sets_depth_and_rates() {
        let device = parse_device("depth=2,idle_depth=1,bps=100M,bps_burst=1M").unwrap();
        assert_eq!(device.depth, 2);
        assert_eq!(
            device.bps,
            Some(Rate {
                per_sec: 100 << 20,
                burst: 1 << 20
            })
        );
        assert_eq!(device.iops, None);
    }
}
