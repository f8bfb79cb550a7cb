//! Device configuration as the user states it (`--disk`, `--net`, `--rng`, `--nvme`), independent of the
//! device models' own config types.

use std::path::PathBuf;
use std::time::Duration;

use sluice_devices::net::parse_mac;

pub use sluice_virtio::NotifyPolicy;

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    /// O_DIRECT instead of the host page cache.
    pub direct: bool,
    pub queues: u16,
    pub queue_size: u16,
    pub serial: Option<String>,
    pub notify: NotifyPolicy,
    /// Logical block size the guest sees; `None`: the host's (see sluice-storage).
    pub block_size: Option<u32>,
    /// Served by an external vhost-user backend listening on `socket` (no `path`).
    pub vhost_user: bool,
    pub socket: Option<PathBuf>,
    /// Bound on each request to the vhost-user backend (None: the frontend's default).
    pub timeout: Option<Duration>,
    /// Offer VIRTIO_F_RING_PACKED (`packed=on`; in-process disks only).
    pub packed: bool,
    /// Behind the process's sluice-qos scheduler with these weight and limits (`weight=`,
    /// `iops=`, `iops_burst=`, `bps=`, `bps_burst=`, `qos_queue=`; in-process disks only).
    pub qos: Option<sluice_qos::GuestConfig>,
    /// Log every request the device answers into this file (`requests=`; in-process disks
    /// only; sluice-devices `block::trace`, `sluice replay --device`).
    pub requests: Option<PathBuf>,
}

/// A virtio-net device on a tap.
#[derive(Debug, Clone, PartialEq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    /// Queue pairs.
    pub queues: u16,
    pub notify: NotifyPolicy,
    /// Offer VIRTIO_F_RING_PACKED (`packed=on`).
    pub packed: bool,
    /// Offer VIRTIO_NET_F_STANDBY (`standby=on`): the standby of a passthrough NIC with the
    /// same MAC (Linux's net_failover); needs `mac=`.
    pub standby: bool,
}

/// An emulated e1000 (82540EM) NIC on a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E1000Spec {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
}

impl E1000Spec {
    /// `tap=NAME[,mac=xx:..]`
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut nic = E1000Spec {
            tap: String::new(),
            mac: None,
        };
        for (k, v) in pairs(s)? {
            match k {
                "tap" if !v.is_empty() && v.len() < 16 => nic.tap = v.to_string(),
                "tap" => return Err(format!("tap={v}: interface names are 1..=15 bytes")),
                "mac" => nic.mac = Some(parse_mac(v).map_err(|e| format!("mac={v}: {e}"))?),
                _ => return Err(format!("--e1000: unknown key `{k}`")),
            }
        }
        if nic.tap.is_empty() {
            return Err("--e1000 needs tap=NAME".into());
        }
        Ok(nic)
    }
}

/// A virtio-rng device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RngSpec {
    /// Offer VIRTIO_F_RING_PACKED (`packed=on`).
    pub packed: bool,
}

impl RngSpec {
    /// Empty (plain `--rng`) or `packed=on|off`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut rng = RngSpec::default();
        for (k, v) in pairs(s)? {
            match k {
                "packed" => rng.packed = on_off(k, v)?,
                _ => return Err(format!("--rng: unknown key `{k}`")),
            }
        }
        Ok(rng)
    }
}

/// A host PCI function assigned with VFIO (`--device vfio=BDF`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioSpec {
    pub host: sluice_vfio::HostBdf,
    /// Start although the host does not remap interrupts (`allow_unsafe_interrupts=on`).
    pub allow_unsafe_interrupts: bool,
    /// `dma=`; when not given, on-demand behind `--iommu` and all without (machine.rs).
    pub dma: Option<VfioDma>,
}

/// How an assigned function's DMA is mapped in the host IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfioDma {
    /// All guest RAM at IOVA = guest physical address, pinned before the guest runs.
    All,
    /// What the guest's vIOMMU tables map, as they change (crate::vfio_shadow).
    OnDemand,
}

/// `vfio=BDF|SYSFS_PATH[,dma=all|on-demand][,allow_unsafe_interrupts=on]` (the `--device`
/// value).
pub fn parse_device(s: &str) -> Result<VfioSpec, String> {
    let mut host = None;
    let mut allow_unsafe_interrupts = false;
    let mut dma = None;
    for (k, v) in pairs(s)? {
        match k {
            "vfio" => host = Some(sluice_vfio::HostBdf::parse(v)?),
            "dma" => {
                dma = Some(match v {
                    "all" => VfioDma::All,
                    "on-demand" => VfioDma::OnDemand,
                    _ => {
                        return Err(format!(
                        "dma={v}: expected all (all guest RAM pinned) or on-demand (what the guest's virtual IOMMU maps)"
                    ))
                    }
                })
            }
            "allow_unsafe_interrupts" => allow_unsafe_interrupts = on_off(k, v)?,
            _ => return Err(format!("--device: unknown key `{k}`")),
        }
    }
    let host = host.ok_or("--device needs vfio=BDF (the only device kind so far)")?;
    Ok(VfioSpec {
        host,
        allow_unsafe_interrupts,
        dma,
    })
}

/// `--tpm`: where the TPM 2.0 behind the CRB device comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpmSpec {
    /// A running swtpm's control socket (`swtpm socket --tpm2 --ctrl type=unixio,path=PATH`).
    Socket(PathBuf),
    /// sluice starts swtpm itself with its state in this directory (one per guest).
    State(PathBuf),
}

impl TpmSpec {
    /// `socket=PATH` or `state=DIR`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match pairs(s)?.as_slice() {
            [("socket", path)] if !path.is_empty() => Ok(TpmSpec::Socket(path.into())),
            [("state", dir)] if !dir.is_empty() => Ok(TpmSpec::State(dir.into())),
            _ => Err(format!("`{s}`: expected socket=PATH or state=DIR")),
        }
    }
}

/// Parses `key=value,key=value` into pairs; values may not contain commas, and a key may be
/// given once (a second value is a mistake, not an override).
fn pairs(s: &str) -> Result<Vec<(&str, &str)>, String> {
    let pairs: Vec<(&str, &str)> = s
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .ok_or_else(|| format!("`{p}` is not key=value"))
        })
        .collect::<Result<_, _>>()?;
    for (i, (key, _)) in pairs.iter().enumerate() {
        if pairs[..i].iter().any(|(earlier, _)| earlier == key) {
            return Err(format!("`{key}` is given more than once"));
        }
    }
    Ok(pairs)
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

fn number<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{key}={v}: expected a number"))
}

/// Longest poll budget or batch delay: each polling queue spins a host CPU for this long after
/// its last request, and a batch holds interrupts back this long.
pub const MAX_NOTIFY_MICROS: u64 = 10_000;
/// Most completions one interrupt may wait for.
pub const MAX_BATCH_REQUESTS: u64 = 1024;

/// `irq`, `poll[:MICROS]`, `batch[:N[:MICROS]]`.
pub fn parse_notify(v: &str) -> Result<NotifyPolicy, String> {
    let mut parts = v.split(':');
    let kind = parts.next().unwrap_or("");
    let mut arg = |default: u64, range: std::ops::RangeInclusive<u64>, what: &str| {
        let n = parts
            .next()
            .map_or(Ok(default), |p| number::<u64>("notify", p))?;
        let unit = if what.ends_with("size") {
            "requests"
        } else {
            "µs"
        };
        if n < *range.start() {
            Err(format!(
                "notify={v}: the {what} is at least {}",
                range.start()
            ))
        } else if n > *range.end() {
            Err(format!(
                "notify={v}: the {what} is at most {} {unit}",
                range.end()
            ))
        } else {
            Ok(n)
        }
    };
    let micros = 0..=MAX_NOTIFY_MICROS;
    let policy = match kind {
        "irq" => NotifyPolicy::Interrupt,
        "poll" => NotifyPolicy::Poll {
            budget: Duration::from_micros(arg(50, micros, "poll budget")?),
        },
        "sched" => NotifyPolicy::Scheduled {
            budget: Duration::from_micros(arg(50, micros, "poll budget")?),
        },
        "batch" => NotifyPolicy::Batch {
            // Bounded by MAX_BATCH_REQUESTS, so it fits.
            max_requests: arg(16, 1..=MAX_BATCH_REQUESTS, "batch size")? as u32,
            max_delay: Duration::from_micros(arg(50, micros, "batch delay")?),
        },
        _ => {
            return Err(format!(
                "notify={v}: expected irq, poll[:us], sched[:us] or batch[:n[:us]]"
            ))
        }
    };
    if parts.next().is_some() {
        return Err(format!("notify={v}: too many fields"));
    }
    Ok(policy)
}

fn queue_count(key: &str, v: &str) -> Result<u16, String> {
    match number::<u16>(key, v)? {
        n @ 1..=64 => Ok(n),
        _ => Err(format!("{key}={v}: expected 1..=64")),
    }
}

fn queue_size(v: &str) -> Result<u16, String> {
    match number::<u16>("queue_size", v)? {
        n if n.is_power_of_two() && n <= 32768 => Ok(n),
        _ => Err(format!(
            "queue_size={v}: expected a power of two up to 32768"
        )),
    }
}

/// A logical block size: a power of two in 512..=4096.
pub fn block_size(v: &str) -> Result<u32, String> {
    match number::<u32>("block_size", v)? {
        n if n.is_power_of_two() && (512..=4096).contains(&n) => Ok(n),
        _ => Err(format!("block_size={v}: expected 512, 1024, 2048 or 4096")),
    }
}

/// `timeout=` of a vhost-user disk: `500ms`, `5s` or plain seconds, from 1 ms to 10 min.
fn parse_timeout(v: &str) -> Result<Duration, String> {
    let bad = || format!("timeout={v}: expected e.g. 500ms or 5s, from 1ms to 600s");
    let (digits, unit) = match v.strip_suffix("ms") {
        Some(ms) => (ms, Duration::from_millis(1)),
        None => (v.strip_suffix('s').unwrap_or(v), Duration::from_secs(1)),
    };
    let timeout = unit * digits.parse::<u32>().map_err(|_| bad())?;
    if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(600) {
        return Err(bad());
    }
    Ok(timeout)
}

impl DiskSpec {
    /// `path=FILE[,readonly=on][,direct=on][,queues=N][,queue_size=N][,serial=S][,notify=..]
    /// [,block_size=N][,packed=on][,requests=LOG]` or `vhost_user=on,socket=PATH[,queues=N]
    /// [,queue_size=N][,timeout=5s]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut disk = DiskSpec {
            path: PathBuf::new(),
            read_only: false,
            direct: false,
            queues: 1,
            queue_size: 256,
            serial: None,
            notify: NotifyPolicy::Interrupt,
            block_size: None,
            packed: false,
            vhost_user: false,
            socket: None,
            timeout: None,
            qos: None,
            requests: None,
        };
        let mut qos_keys = Vec::new();
        for (k, v) in pairs(s)? {
            match k {
                "weight" | "iops" | "iops_burst" | "bps" | "bps_burst" => {
                    qos_keys.push(format!("{k}={v}"));
                }
                "qos_queue" => qos_keys.push(format!("queue={v}")),
                "path" => disk.path = PathBuf::from(v),
                "requests" if !v.is_empty() => disk.requests = Some(PathBuf::from(v)),
                "vhost_user" => disk.vhost_user = on_off(k, v)?,
                "socket" => disk.socket = Some(PathBuf::from(v)),
                "timeout" => disk.timeout = Some(parse_timeout(v)?),
                "readonly" => disk.read_only = on_off(k, v)?,
                "direct" => disk.direct = on_off(k, v)?,
                "queues" => disk.queues = queue_count(k, v)?,
                "queue_size" => disk.queue_size = queue_size(v)?,
                "serial" if v.len() <= 20 => disk.serial = Some(v.to_string()),
                "serial" => return Err("serial: at most 20 bytes".into()),
                "notify" => disk.notify = parse_notify(v)?,
                "block_size" => disk.block_size = Some(block_size(v)?),
                "packed" => disk.packed = on_off(k, v)?,
                _ => return Err(format!("--disk: unknown key `{k}`")),
            }
        }
        if !qos_keys.is_empty() {
            let name = disk
                .path
                .file_name()
                .map_or_else(|| "disk".to_owned(), |n| n.to_string_lossy().into_owned());
            let guest = sluice_qos::parse_guest(&name, &qos_keys.join(","))
                .map_err(|e| format!("--disk: {e}"))?;
            disk.qos = Some(guest);
        }
        if matches!(disk.notify, NotifyPolicy::Scheduled { .. }) && disk.qos.is_none() {
            return Err(
                "--disk notify=sched: the scheduler chooses polling per guest, so the disk                  needs to be behind it (weight=, iops= or bps=)"
                    .into(),
            );
        }
        if disk.vhost_user || disk.socket.is_some() || disk.timeout.is_some() {
            return disk.check_vhost_user();
        }
        if disk.path.as_os_str().is_empty() {
            return Err("--disk needs path=FILE".into());
        }
        Ok(disk)
    }

    /// The image options belong to the backend: refuse them rather than ignore them.
    fn check_vhost_user(self) -> Result<Self, String> {
        if !self.vhost_user {
            return Err("--disk socket=.. and timeout=.. need vhost_user=on".into());
        }
        if self.socket.is_none() {
            return Err("--disk vhost_user=on needs socket=PATH".into());
        }
        if self.packed {
            // The frontend hands the backend split rings only (see sluice-devices).
            return Err("--disk vhost_user=on: packed=on is not supported".into());
        }
        if self.qos.is_some() {
            return Err(
                "--disk vhost_user=on: weight and limits are the backend's (serve blk --disk)"
                    .into(),
            );
        }
        if !self.path.as_os_str().is_empty()
            || self.read_only
            || self.direct
            || self.serial.is_some()
            || self.block_size.is_some()
        {
            return Err(
                "--disk vhost_user=on: path, readonly, direct, serial and block_size are the \
                 backend's"
                    .into(),
            );
        }
        if self.requests.is_some() {
            return Err(
                "--disk vhost_user=on: requests= logs the in-process device's requests".into(),
            );
        }
        Ok(self)
    }
}

impl NetSpec {
    /// `tap=NAME[,mac=xx:..][,queues=N][,notify=..][,packed=on][,standby=on]`
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut net = NetSpec {
            tap: String::new(),
            mac: None,
            queues: 1,
            notify: NotifyPolicy::Interrupt,
            packed: false,
            standby: false,
        };
        for (k, v) in pairs(s)? {
            match k {
                "tap" if !v.is_empty() && v.len() < 16 => net.tap = v.to_string(),
                "tap" => return Err(format!("tap={v}: interface names are 1..=15 bytes")),
                "mac" => net.mac = Some(parse_mac(v).map_err(|e| format!("mac={v}: {e}"))?),
                "queues" => net.queues = queue_count(k, v)?,
                "notify" => net.notify = parse_notify(v)?,
                "packed" => net.packed = on_off(k, v)?,
                "standby" => net.standby = on_off(k, v)?,
                _ => return Err(format!("--net: unknown key `{k}`")),
            }
        }
        if net.tap.is_empty() {
            return Err("--net needs tap=NAME".into());
        }
        if matches!(net.notify, NotifyPolicy::Scheduled { .. }) {
            return Err(
                "--net notify=sched: an in-process NIC has no scheduler (sluice serve net                  --net has)"
                    .into(),
            );
        }
        if net.standby && net.mac.is_none() {
            return Err(
                "--net standby=on needs mac=: the guest pairs the standby with the passthrough \
                 NIC that has the same MAC, so it cannot be a random one"
                    .into(),
            );
        }
        Ok(net)
    }
}

/// An emulated NVMe controller (`--nvme`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeSpec {
    pub path: PathBuf,
    /// I/O queue pairs offered to the driver.
    pub queues: u16,
    pub serial: Option<String>,
    /// O_DIRECT instead of the host page cache.
    pub direct: bool,
    /// Offer Doorbell Buffer Config (shadow doorbells); `dbbuf=off` is for comparisons.
    pub dbbuf: bool,
    /// Log every I/O command into this request log (docs/replay.md "Device-level replay").
    pub requests: Option<PathBuf>,
}

impl NvmeSpec {
    /// `path=IMG[,queues=N][,serial=S][,direct=on][,dbbuf=on|off][,requests=FILE]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut nvme = NvmeSpec {
            path: PathBuf::new(),
            queues: 4,
            serial: None,
            direct: false,
            dbbuf: true,
            requests: None,
        };
        for (k, v) in pairs(s)? {
            match k {
                "path" => nvme.path = PathBuf::from(v),
                "queues" => nvme.queues = queue_count(k, v)?,
                "serial" if !v.is_empty() && v.len() <= 20 && v.is_ascii() => {
                    nvme.serial = Some(v.to_string())
                }
                "serial" => return Err("serial: 1 to 20 ASCII bytes".into()),
                "direct" => nvme.direct = on_off(k, v)?,
                "dbbuf" => nvme.dbbuf = on_off(k, v)?,
                "requests" if !v.is_empty() => nvme.requests = Some(PathBuf::from(v)),
                _ => return Err(format!("--nvme: unknown key `{k}`")),
            }
        }
        if nvme.path.as_os_str().is_empty() {
            return Err("--nvme needs path=IMG".into());
        }
        Ok(nvme)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_nvme_spec_and_refuses_bad_ones() {
        let nvme = NvmeSpec::parse("path=/img,queues=2,serial=SN1,direct=on,dbbuf=off").unwrap();
        let plain = NvmeSpec::parse("path=/img").unwrap();

        assert_eq!(nvme.queues, 2);
        assert_eq!(nvme.serial.as_deref(), Some("SN1"));
        assert!(nvme.direct && !nvme.dbbuf);
        let logged = NvmeSpec::parse("path=/img,requests=/tmp/n.requests").unwrap();
        assert_eq!(logged.requests, Some(PathBuf::from("/tmp/n.requests")));
        assert!(NvmeSpec::parse("path=/img,requests=").is_err());
        assert_eq!((plain.queues, plain.direct, plain.dbbuf), (4, false, true));
        for bad in [
            "",
            "queues=2",
            "path=x,queues=0",
            "path=x,queues=65",
            "path=x,readonly=on",
            "path=x,serial=",
            "path=x,serial=123456789012345678901",
        ] {
            assert!(NvmeSpec::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn parses_a_full_disk_spec() {
        let disk = DiskSpec::parse(
            "path=/tmp/d.img,readonly=on,direct=on,queues=4,queue_size=128,serial=abc,notify=batch:8:100",
        )
        .unwrap();

        assert_eq!(disk.path, PathBuf::from("/tmp/d.img"));
        assert!(disk.read_only && disk.direct);
        assert_eq!((disk.queues, disk.queue_size), (4, 128));
        assert_eq!(disk.serial.as_deref(), Some("abc"));
        assert_eq!(disk.block_size, None);
        assert_eq!(
            DiskSpec::parse("path=x,block_size=4096")
                .unwrap()
                .block_size,
            Some(4096)
        );
        assert_eq!(
            disk.notify,
            NotifyPolicy::Batch {
                max_requests: 8,
                max_delay: Duration::from_micros(100)
            }
        );
    }

    #[test]
    fn standby_needs_an_explicit_mac() {
        let standby = NetSpec::parse("tap=t0,mac=52:54:00:12:34:56,standby=on").unwrap();
        let plain = NetSpec::parse("tap=t0").unwrap();
        let refused = NetSpec::parse("tap=t0,standby=on").unwrap_err();

        assert!(standby.standby && !plain.standby);
        assert!(refused.contains("needs mac="), "{refused}");
        assert!(NetSpec::parse("tap=t0,mac=52:54:00:12:34:56,standby=maybe").is_err());
    }

    #[test]
    fn packed_is_off_unless_asked_for() {
        let plain = DiskSpec::parse("path=x").unwrap();
        let packed = DiskSpec::parse("path=x,packed=on").unwrap();
        let net = NetSpec::parse("tap=t0,packed=on").unwrap();
        let rng = RngSpec::parse("packed=on").unwrap();

        assert!(!plain.packed && packed.packed && net.packed && rng.packed);
        assert_eq!(RngSpec::parse(""), Ok(RngSpec { packed: false }));
        assert!(RngSpec::parse("packed=maybe").is_err());
        assert!(RngSpec::parse("speed=1").is_err());
        assert!(DiskSpec::parse("vhost_user=on,socket=/s,packed=on").is_err());
    }

    #[test]
    fn a_request_log_is_for_in_process_disks_only() {
        let disk = DiskSpec::parse("path=x,requests=/tmp/x.requests").unwrap();

        assert_eq!(disk.requests, Some(PathBuf::from("/tmp/x.requests")));
        assert_eq!(DiskSpec::parse("path=x").unwrap().requests, None);
        assert!(DiskSpec::parse("path=x,requests=").is_err());
        let error = DiskSpec::parse("vhost_user=on,socket=/s,requests=r").unwrap_err();
        assert!(error.contains("requests="), "{error}");
    }

    #[test]
    fn parses_e1000_specs() {
        let nic = E1000Spec::parse("tap=e0,mac=52:54:00:aa:bb:cc").unwrap();

        assert_eq!(nic.tap, "e0");
        assert_eq!(nic.mac, Some([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]));
        for bad in [
            "",
            "mac=52:54:00:aa:bb:cc",
            "tap=e0,queues=2",
            "tap=e0,mac=zz",
            "tap=e0,tap=e1",
        ] {
            assert!(E1000Spec::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn rejects_bad_disk_specs() {
        for bad in [
            "readonly=on",
            "path=x,queues=0",
            "path=x,queue_size=100",
            "path=x,color=red",
            "path=x,notify=sometimes",
            "path=x,serial=123456789012345678901",
            "path=x,block_size=1000",
            "path=x,block_size=8192",
            "vhost_user=on,socket=s,block_size=4096",
            "path",
        ] {
            assert!(DiskSpec::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn a_disk_with_a_weight_or_limits_joins_the_scheduler() {
        let disk = DiskSpec::parse("path=/x/a.img,weight=3,iops=100,bps=8M,qos_queue=16").unwrap();
        let qos = disk.qos.expect("scheduled");
        assert_eq!(qos.name, "a.img");
        assert_eq!(qos.weight, 3);
        assert_eq!(qos.iops.map(|r| r.per_sec), Some(100));
        assert_eq!(qos.bps.map(|r| r.per_sec), Some(8 << 20));
        assert_eq!(qos.queue_limit, 16);
        assert_eq!(DiskSpec::parse("path=/x/a.img").unwrap().qos, None);
        let error = DiskSpec::parse("path=a,weight=0").unwrap_err();
        assert!(error.contains("weight must be in 1..=1000"), "{error}");
        let error = DiskSpec::parse("vhost_user=on,socket=/s,weight=2").unwrap_err();
        assert!(error.contains("the backend's"), "{error}");
    }

    #[test]
    fn parses_a_vhost_user_disk() {
        let disk = DiskSpec::parse("vhost_user=on,socket=/run/blk.sock,queues=2").unwrap();

        assert!(disk.vhost_user);
        assert_eq!(disk.socket, Some(PathBuf::from("/run/blk.sock")));
        assert_eq!(disk.queues, 2);
        assert_eq!(disk.timeout, None);
        assert!(!DiskSpec::parse("path=x").unwrap().vhost_user);
        let timed = |t: &str| DiskSpec::parse(&format!("vhost_user=on,socket=s,timeout={t}"));
        assert_eq!(
            timed("250ms").unwrap().timeout,
            Some(Duration::from_millis(250))
        );
        assert_eq!(timed("5s").unwrap().timeout, Some(Duration::from_secs(5)));
        assert_eq!(timed("2").unwrap().timeout, Some(Duration::from_secs(2)));
        for bad in [
            "vhost_user=on",
            "socket=/run/blk.sock",
            "vhost_user=on,socket=s,path=x",
            "vhost_user=on,socket=s,readonly=on",
            "vhost_user=maybe,socket=s",
            "vhost_user=on,socket=s,timeout=0s",
            "vhost_user=on,socket=s,timeout=601s",
            "vhost_user=on,socket=s,timeout=soon",
            "vhost_user=on,socket=s,timeout=-1ms",
            "path=x,timeout=5s",
        ] {
            assert!(DiskSpec::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn parses_net_and_notify_defaults() {
        let net = NetSpec::parse("tap=tap0,mac=52:54:00:12:34:56,queues=2,notify=poll").unwrap();

        assert_eq!(net.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(
            net.notify,
            NotifyPolicy::Poll {
                budget: Duration::from_micros(50)
            }
        );
        assert!(NetSpec::parse("tap=tap0,mac=01:00:00:00:00:01").is_err());
        assert!(NetSpec::parse("tap=averyveryverylongname").is_err());
    }

    #[test]
    fn refuses_mac_bytes_that_are_not_one_or_two_hex_digits() {
        // `sluice serve net --mac` refused these while `--net mac=` took them (two parsers).
        for mac in [
            "+52:54:00:12:34:56",
            "052:54:00:12:34:56",
            "52:54:00:12:34:",
        ] {
            let net = NetSpec::parse(&format!("tap=tap0,mac={mac}"));

            assert!(net.is_err(), "mac={mac} parsed as {net:?}");
        }
    }

    /// Defect 13: a key given twice is a mistake to report, not a silent "last one wins".
    #[test]
    fn parses_vfio_devices_and_their_dma_modes() {
        let spec = parse_device("vfio=01:00.1,dma=all,allow_unsafe_interrupts=on").unwrap();
        let path = parse_device("vfio=/sys/bus/pci/devices/0000:01:00.2").unwrap();
        let on_demand = parse_device("vfio=01:00.1,dma=on-demand").unwrap();

        assert_eq!(spec.host.as_str(), "0000:01:00.1");
        assert!(spec.allow_unsafe_interrupts);
        assert_eq!(spec.dma, Some(VfioDma::All));
        assert_eq!(path.host.as_str(), "0000:01:00.2");
        assert!(!path.allow_unsafe_interrupts);
        assert_eq!(path.dma, None);
        assert_eq!(on_demand.dma, Some(VfioDma::OnDemand));
        assert!(parse_device("vfio=01:00.1,dma=lazy")
            .unwrap_err()
            .contains("on-demand"));
        assert!(parse_device("dma=all").is_err());
        assert!(parse_device("vfio=zz").is_err());
    }

    #[test]
    fn parses_tpm_specs() {
        assert_eq!(
            TpmSpec::parse("socket=/run/swtpm.sock"),
            Ok(TpmSpec::Socket("/run/swtpm.sock".into()))
        );
        assert_eq!(
            TpmSpec::parse("state=/var/lib/vm1/tpm"),
            Ok(TpmSpec::State("/var/lib/vm1/tpm".into()))
        );
        for bad in ["", "socket=", "path=/x", "socket=/a,state=/b", "/x"] {
            assert!(TpmSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_duplicate_keys() {
        for bad in [
            "path=a,path=b",
            "path=a,readonly=on,readonly=off",
            "path=a,notify=irq,notify=poll",
            "vhost_user=on,socket=s,socket=t",
        ] {
            let err = DiskSpec::parse(bad).expect_err(bad);
            assert!(err.contains("more than once"), "{bad}: {err}");
        }
        let err = NetSpec::parse("tap=a,tap=b").unwrap_err();
        assert!(err.contains("more than once"), "{err}");
    }

    /// Defect 13: a poll budget of hours pins a host CPU per queue for hours; bound it.
    #[test]
    fn refuses_absurd_poll_and_batch_budgets() {
        for bad in ["poll:3600000000", "batch:16:3600000000", "batch:100000"] {
            let err = parse_notify(bad).expect_err(bad);
            assert!(err.contains("at most"), "{bad}: {err}");
        }
        assert!(parse_notify("batch:0").unwrap_err().contains("at least 1"));
        assert_eq!(
            parse_notify("poll:1000"),
            Ok(NotifyPolicy::Poll {
                budget: Duration::from_millis(1)
            })
        );
        assert!(parse_notify("sched:3600000000")
            .unwrap_err()
            .contains("at most"));
    }

    #[test]
    fn notify_sched_is_for_disks_behind_the_scheduler_only() {
        let disk = DiskSpec::parse("path=/x/a.img,weight=2,notify=sched:30").unwrap();
        assert_eq!(
            disk.notify,
            NotifyPolicy::Scheduled {
                budget: Duration::from_micros(30)
            }
        );
        let plain = DiskSpec::parse("path=/x/a.img,notify=sched").unwrap_err();
        assert!(plain.contains("needs to be behind it"), "{plain}");
        let net = NetSpec::parse("tap=t0,notify=sched").unwrap_err();
        assert!(net.contains("no scheduler"), "{net}");
    }
}
