//! Fuzz body for the qos option strings (fuzz target `qos_spec`): what `--disk`, `serve blk
//! --disk`, `--qos-device` and the control API's `vm.qos` hand to [`parse_guest`],
//! [`apply_guest`], [`parse_device`] and [`apply_device`] — the API's from any client.
//!
//! Input: `[selector][spec]`. Checked: no panic; an accepted configuration is within the
//! documented ranges (weight 1..=1000, queue 1..=4096, depth 1..=1024, no zero rate or
//! burst); an empty change changes nothing; a guest reconfigured with what was accepted is
//! scheduled (enqueue, dispatch across bucket refills up to the end of time, complete) without
//! a panic, and so is a device changed live to an accepted device change.

use crate::bucket::Rate;
use crate::config::{apply_device, apply_guest, parse_device, parse_guest};
use crate::scheduler::{Access, Class, DeviceConfig, GuestConfig, Request, Scheduler};

/// `[selector][spec]`: selector bit 0 chooses the current guest a change applies to (plain or
/// with limits); bit 1 also parses the spec as a device.
pub fn spec(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let spec = String::from_utf8_lossy(rest);
    if let Ok(config) = parse_guest("g", &spec) {
        check_guest(&config);
    }
    let current = if selector & 1 == 0 {
        GuestConfig::new("g")
    } else {
        parse_guest("g", "weight=7,iops=100,iops_burst=3,bps=1M,queue=9").expect("a valid spec")
    };
    assert_eq!(apply_guest(&current, "").as_ref(), Ok(&current));
    if let Ok(config) = apply_guest(&current, &spec) {
        check_guest(&config);
        schedule(config);
    }
    if selector & 2 != 0 {
        if let Ok(device) = parse_device(&spec) {
            check_device(&device);
        }
        // A live change on top of a device with limits (`vm.qos` id `device`).
        let current = parse_device("depth=3,iops=500,bps=4M,bps_burst=1K").expect("a valid spec");
        assert_eq!(apply_device(&current, "").as_ref(), Ok(&current));
        if let Ok(device) = apply_device(&current, &spec) {
            check_device(&device);
            schedule_on(device, GuestConfig::new("g"));
        }
    }
}

fn check_device(device: &DeviceConfig) {
    assert!((1..=1024).contains(&device.depth), "{device:?}");
    assert!((1..=1024).contains(&device.idle_depth), "{device:?}");
    assert!(device.poll_guests <= 1024, "{device:?}");
    check_rate(device.iops);
    check_rate(device.bps);
}

fn check_guest(config: &GuestConfig) {
    assert!((1..=1000).contains(&config.weight), "{config:?}");
    assert!((1..=4096).contains(&config.queue_limit), "{config:?}");
    check_rate(config.iops);
    check_rate(config.bps);
}

fn check_rate(rate: Option<Rate>) {
    if let Some(rate) = rate {
        assert!(rate.per_sec > 0 && rate.burst > 0, "{rate:?}");
    }
}

/// A guest changed live to `config` takes requests, is granted them as its buckets allow
/// and completes them.
fn schedule(config: GuestConfig) {
    schedule_on(DeviceConfig::default(), config);
}

/// [`schedule`] with the device changed live to `device` first.
fn schedule_on(device: DeviceConfig, config: GuestConfig) {
    let mut scheduler = Scheduler::new(DeviceConfig::default(), 0);
    let guest = scheduler.add_guest(GuestConfig::new("g"), 0);
    let queue = scheduler.add_queue(guest);
    scheduler.reconfigure_device(device, 1);
    assert!(scheduler.reconfigure(guest, config, 1));
    for tag in 0..3 {
        let request = Request {
            tag,
            class: Class::Normal,
            access: Access::Read,
            offset: tag * 4096,
            len: 1 << 20,
        };
        let _ = scheduler.enqueue(queue, request, 1);
    }
    for now in [1, 1_000_000_000, u64::MAX] {
        scheduler.dispatch(now);
        for tag in scheduler.take_grants(queue) {
            assert!(scheduler.complete(queue, tag));
        }
        let _ = scheduler.next_wakeup(now);
        let _ = scheduler.refresh_modes(now);
    }
}
