//! The VM's disks behind the process's sluice-qos scheduler, by their control-API id
//! (`disk0`, or the id given at hot-plug): `vm.qos` reads their settings and stats and
//! changes their weight and limits while the guest runs; the metrics (`--metrics`,
//! `vm.counters`, `/metrics`) carry the same stats. The id [`DEVICE_ID`] names the scheduler
//! itself: its depth and device-wide buckets (`--qos-device`), changed the same way.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{json, Value};
use sluice_qos::{GuestId, Qos};

/// A disk's place on a scheduler.
#[derive(Clone)]
pub struct ScheduledGuest {
    pub qos: Arc<Qos>,
    pub guest: GuestId,
}

impl std::fmt::Debug for ScheduledGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScheduledGuest")
            .field("guest", &self.guest)
            .finish_non_exhaustive()
    }
}

/// The `vm.qos` id of the scheduler itself (its `--qos-device` settings); no disk or NIC of a
/// server may take it as its name.
pub const DEVICE_ID: &str = "device";

/// Why a change was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    /// No scheduled disk with that id (404).
    #[error("no disk with id `{0}` is behind the I/O scheduler (vm.qos lists them)")]
    NotFound(String),
    /// Id `device`, but no disk is scheduled, so there is no scheduler to change (404).
    #[error("no I/O scheduler to change: no disk is behind one (or --qos-device off)")]
    NoScheduler,
    /// A bad key or value (400).
    #[error("{0}")]
    BadRequest(String),
}

/// The API keys `vm.qos` takes, as `--disk` spells them, and the scheduler's names for them.
const KEYS: [(&str, &str); 6] = [
    ("weight", "weight"),
    ("iops", "iops"),
    ("iops_burst", "iops_burst"),
    ("bps", "bps"),
    ("bps_burst", "bps_burst"),
    ("qos_queue", "queue"),
];

/// The `vm.qos` keys of the device itself, as `--qos-device` spells them.
const DEVICE_KEYS: [&str; 7] = [
    "depth",
    "idle_depth",
    "poll_guests",
    "iops",
    "iops_burst",
    "bps",
    "bps_burst",
];

/// The scheduled disks of one VM (or of one `sluice serve`), all on one scheduler.
#[derive(Default)]
pub struct QosDisks {
    disks: Mutex<Vec<(String, ScheduledGuest)>>,
    /// The scheduler the disks share (the first added disk's; it stays when disks leave).
    device: Mutex<Option<Arc<Qos>>>,
}

impl QosDisks {
    fn locked(&self) -> MutexGuard<'_, Vec<(String, ScheduledGuest)>> {
        self.disks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add(&self, id: String, guest: ScheduledGuest) {
        self.device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| Arc::clone(&guest.qos));
        self.locked().push((id, guest));
    }

    /// The scheduler the disks share (None before the first disk joined one).
    pub fn scheduler(&self) -> Option<Arc<Qos>> {
        self.device()
    }

    fn device(&self) -> Option<Arc<Qos>> {
        self.device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Drops the disk `id` (it was unplugged): from the list and from its scheduler, whose
    /// stats and shares then leave it out.
    pub fn forget(&self, id: &str) {
        let mut disks = self.locked();
        for (_, gone) in disks.iter().filter(|(disk, _)| disk == id) {
            gone.qos.remove_guest(gone.guest);
        }
        disks.retain(|(disk, _)| disk != id);
    }

    pub fn is_empty(&self) -> bool {
        self.locked().is_empty()
    }

    /// Per scheduled disk: its id, weight, limits and stats (see `sluice_qos::stats_json`),
    /// its share counted over every disk of its scheduler.
    pub fn status(&self) -> Value {
        let disks: Vec<Value> = self
            .locked()
            .iter()
            .map(|(id, g)| disk_json(id, g))
            .collect();
        let device = self.device().map(|qos| device_json(&qos.device_config()));
        json!({ "disks": disks, "device": device })
    }

    /// Changes the disk `id`'s settings named in `changes` (`--disk` keys and values); the
    /// others keep their values. Answers the disk's new status.
    pub fn reconfigure(&self, id: &str, changes: &[(String, String)]) -> Result<Value, QosError> {
        if id == DEVICE_ID {
            return self.reconfigure_device(changes);
        }
        let scheduled = self
            .locked()
            .iter()
            .find(|(disk, _)| disk == id)
            .map(|(_, g)| g.clone())
            .ok_or_else(|| QosError::NotFound(id.to_string()))?;
        let spec = scheduler_spec(changes)?;
        let current = scheduled
            .qos
            .guest_config(scheduled.guest)
            .ok_or_else(|| QosError::NotFound(id.to_string()))?;
        let config = sluice_qos::apply_guest(&current, &spec)
            .map_err(|e| QosError::BadRequest(format!("vm.qos {id}: {e}")))?;
        scheduled.qos.reconfigure(scheduled.guest, config);
        tracing::info!("qos: {id} reconfigured ({spec})");
        Ok(disk_json(id, &scheduled))
    }

    /// Changes the scheduler's own depth and buckets (`--qos-device` keys); answers its new
    /// settings. Nothing changes unless every key and value is good.
    fn reconfigure_device(&self, changes: &[(String, String)]) -> Result<Value, QosError> {
        let qos = self.device().ok_or(QosError::NoScheduler)?;
        let spec = spec_of(changes, &|key| {
            DEVICE_KEYS.contains(&key).then(|| key.to_string())
        })
        .map_err(|e| e.with_known(&DEVICE_KEYS))?;
        let config = sluice_qos::apply_device(&qos.device_config(), &spec)
            .map_err(|e| QosError::BadRequest(format!("vm.qos {DEVICE_ID}: {e}")))?;
        qos.reconfigure_device(config);
        tracing::info!("qos: the device reconfigured ({spec})");
        Ok(device_json(&qos.device_config()))
    }

    /// The stats in the Prometheus text format, one series per disk and figure.
    pub fn prometheus(&self) -> String {
        let Value::Array(disks) = self.status()["disks"].take() else {
            return String::new();
        };
        let mut text = String::new();
        for disk in &disks {
            let id = disk["id"].as_str().unwrap_or_default();
            for (series, field) in PROMETHEUS_SERIES {
                if let Some(value) = disk[field].as_f64() {
                    text.push_str(&format!("sluice_qos_{series}{{disk=\"{id}\"}} {value}\n"));
                }
            }
        }
        text
    }
}

/// Prometheus series and the status field each reports.
const PROMETHEUS_SERIES: [(&str, &str); 9] = [
    ("weight", "weight"),
    ("dispatched_total", "dispatched"),
    ("bytes_total", "bytes"),
    ("share", "share"),
    ("queue_delay_mean_us", "queue_delay_mean_us"),
    ("queue_delay_p99_us", "queue_delay_p99_us"),
    ("queue_delay_max_us", "queue_delay_max_us"),
    ("throttled_ms_total", "throttled_ms"),
    ("refused_enqueues_total", "refused_enqueues"),
];

/// One disk's settings and stats, with its id.
fn disk_json(id: &str, scheduled: &ScheduledGuest) -> Value {
    let mut disk = scheduled
        .qos
        .guest_json(scheduled.guest)
        .unwrap_or(Value::Null);
    if let Value::Object(fields) = &mut disk {
        fields.insert("id".into(), Value::String(id.to_string()));
        if let Some(config) = scheduled.qos.guest_config(scheduled.guest) {
            fields.insert("iops_burst".into(), json!(config.iops.map(|r| r.burst)));
            fields.insert("bps_burst".into(), json!(config.bps.map(|r| r.burst)));
            fields.insert("qos_queue".into(), json!(config.queue_limit));
        }
    }
    disk
}

/// The device's settings as `vm.qos` shows them.
fn device_json(device: &sluice_qos::DeviceConfig) -> Value {
    json!({
        "id": DEVICE_ID,
        "depth": device.depth,
        "idle_depth": device.idle_depth,
        "poll_guests": device.poll_guests,
        "iops_limit": device.iops.map(|r| r.per_sec),
        "iops_burst": device.iops.map(|r| r.burst),
        "bps_limit": device.bps.map(|r| r.per_sec),
        "bps_burst": device.bps.map(|r| r.burst),
    })
}

/// Why [`spec_of`] refused a change.
enum SpecError {
    UnknownKey(String),
    Bad(QosError),
}

impl SpecError {
    /// The refusal, naming the keys that would have been taken.
    fn with_known(self, known: &[&str]) -> QosError {
        match self {
            SpecError::UnknownKey(key) => QosError::BadRequest(format!(
                "vm.qos: unknown field `{key}` (id, {})",
                known.join(", ")
            )),
            SpecError::Bad(e) => e,
        }
    }
}

/// `changes` as the scheduler's option string, each key through `name` (None: unknown); a
/// value that could smuggle in another key is refused.
fn spec_of(
    changes: &[(String, String)],
    name: &dyn Fn(&str) -> Option<String>,
) -> Result<String, SpecError> {
    let mut pairs = Vec::new();
    for (key, value) in changes {
        let name = name(key).ok_or_else(|| SpecError::UnknownKey(key.clone()))?;
        if value.is_empty() || value.contains([',', '=']) {
            return Err(SpecError::Bad(QosError::BadRequest(format!(
                "vm.qos: `{key}` has a bad value {value:?}"
            ))));
        }
        pairs.push(format!("{name}={value}"));
    }
    Ok(pairs.join(","))
}

/// `changes` as a disk's option string; unknown keys are refused by name.
fn scheduler_spec(changes: &[(String, String)]) -> Result<String, QosError> {
    let known: Vec<&str> = KEYS.iter().map(|(api, _)| *api).collect();
    spec_of(changes, &|key| {
        KEYS.iter()
            .find(|(api, _)| *api == key)
            .map(|(_, name)| name.to_string())
    })
    .map_err(|e| e.with_known(&known))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_qos::{DeviceConfig, GuestConfig};

    fn disks() -> (QosDisks, Arc<Qos>) {
        let qos = Qos::new(DeviceConfig::default());
        let disks = QosDisks::default();
        let guest = qos.add_guest(sluice_qos::parse_guest("a.img", "weight=2,iops=100").unwrap());
        disks.add(
            "disk0".into(),
            ScheduledGuest {
                qos: Arc::clone(&qos),
                guest,
            },
        );
        (disks, qos)
    }

    fn change(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_change_applies_to_the_named_disk_and_keeps_the_rest() {
        let (disks, qos) = disks();
        let answer = disks
            .reconfigure("disk0", &change(&[("iops", "500"), ("qos_queue", "8")]))
            .unwrap();
        let config: GuestConfig = qos.guest_config(GuestId(0)).unwrap();
        assert_eq!(config.iops.map(|r| r.per_sec), Some(500));
        assert_eq!((config.weight, config.queue_limit), (2, 8));
        assert_eq!(answer["id"], "disk0");
        assert_eq!(answer["iops_limit"], 500);
        assert_eq!(answer["weight"], 2);
        assert_eq!(disks.status()["disks"][0]["qos_queue"], 8);
        assert!(disks
            .prometheus()
            .contains("sluice_qos_weight{disk=\"disk0\"} 2"));
    }

    #[test]
    fn unknown_disks_keys_and_bad_values_are_refused_and_change_nothing() {
        let (disks, qos) = disks();
        let before = qos.guest_config(GuestId(0));
        let unknown = disks.reconfigure("disk9", &change(&[("iops", "5")]));
        let key = disks.reconfigure("disk0", &change(&[("speed", "5")]));
        let value = disks.reconfigure("disk0", &change(&[("weight", "0")]));
        let burst = disks.reconfigure("disk0", &change(&[("bps_burst", "1M")]));
        let sneaky = disks.reconfigure("disk0", &change(&[("iops", "5=weight")]));
        assert!(matches!(unknown, Err(QosError::NotFound(_))), "{unknown:?}");
        for bad in [key, value, burst, sneaky] {
            assert!(matches!(bad, Err(QosError::BadRequest(_))), "{bad:?}");
        }
        assert_eq!(qos.guest_config(GuestId(0)), before);
        disks.forget("disk0");
        assert!(disks.is_empty());
    }

    /// An unplugged disk leaves its scheduler: the stats (`--metrics`, `serve --metrics`)
    /// list only the disks still there, whose shares add up to 1 again; its id can no longer
    /// be changed.
    #[test]
    fn a_forgotten_disk_leaves_the_schedulers_stats_and_shares() {
        let (disks, qos) = disks();
        let hot = qos.add_guest(sluice_qos::parse_guest("hot.img", "weight=1").unwrap());
        disks.add(
            "hot0".into(),
            ScheduledGuest {
                qos: Arc::clone(&qos),
                guest: hot,
            },
        );
        // Each disk gets requests granted and completed through a queue of its own.
        for guest in [GuestId(0), hot] {
            let port = qos.port(guest).unwrap();
            port.enqueue(sluice_qos::Request {
                tag: 1,
                class: sluice_qos::Class::Normal,
                access: sluice_qos::Access::Read,
                offset: 0,
                len: 4096,
            })
            .unwrap();
            assert_eq!(port.dispatch(), vec![1]);
            port.complete_and_dispatch(&[1]);
        }
        let names = |stats: &Value| -> Vec<String> {
            stats["guests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g["name"].as_str().unwrap().to_string())
                .collect()
        };
        let before = qos.stats_json();
        assert_eq!(names(&before), ["a.img", "hot.img"]);
        assert_eq!(before["guests"][0]["share"], 0.5);

        disks.forget("hot0");
        let after = qos.stats_json();
        assert_eq!(names(&after), ["a.img"], "{after}");
        assert_eq!(after["guests"][0]["share"], 1.0);
        assert_eq!(disks.status()["disks"][0]["share"], 1.0);
        assert_eq!(qos.guest_config(hot), None);
        assert!(matches!(
            disks.reconfigure("hot0", &change(&[("weight", "2")])),
            Err(QosError::NotFound(_))
        ));
        assert!(!qos.remove_guest(hot), "removed once");
    }

    #[test]
    fn the_device_is_changed_by_its_id_and_a_refused_change_changes_nothing() {
        let (disks, qos) = disks();
        assert_eq!(disks.status()["device"]["depth"], 4);
        let answer = disks
            .reconfigure(DEVICE_ID, &change(&[("iops", "600"), ("depth", "8")]))
            .unwrap();
        assert_eq!(answer["iops_limit"], 600);
        assert_eq!(answer["iops_burst"], 60);
        assert_eq!(qos.device_config().depth, 8);
        assert_eq!(disks.status()["device"]["iops_limit"], 600);
        let before = qos.device_config();
        let guest_before = qos.guest_config(GuestId(0));
        for bad in [
            change(&[("depth", "0")]),
            change(&[("weight", "2")]),
            change(&[("iops", "5"), ("qos_queue", "3")]),
            change(&[("bps_burst", "1M")]),
            change(&[("iops", "7,depth=1")]),
        ] {
            let refused = disks.reconfigure(DEVICE_ID, &bad);
            assert!(
                matches!(refused, Err(QosError::BadRequest(_))),
                "{bad:?}: {refused:?}"
            );
        }
        assert_eq!(
            qos.device_config(),
            before,
            "a refused change changed the device"
        );
        assert_eq!(qos.guest_config(GuestId(0)), guest_before);
        // The scheduler stays after its last disk left; without any there is none to change.
        disks.forget("disk0");
        assert!(disks
            .reconfigure(DEVICE_ID, &change(&[("depth", "2")]))
            .is_ok());
        let empty = QosDisks::default();
        assert!(matches!(
            empty.reconfigure(DEVICE_ID, &change(&[("depth", "2")])),
            Err(QosError::NoScheduler)
        ));
        assert_eq!(empty.status()["device"], Value::Null);
    }
}
