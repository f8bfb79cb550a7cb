//! sluice's control API: HTTP/1.1 with JSON bodies over a Unix socket (`sluice run
//! --api-socket PATH`), shaped after Cloud Hypervisor's so that its users feel at home
//! (`/api/v1/vm.info`, `vm.pause`, `vm.resume`, `vm.snapshot`, `vm.send-migration`,
//! `vm.shutdown`, `vm.counters`, `vmm.ping`, and the hot-plug routes `vm.add-disk`,
//! `vm.add-net`, `vm.add-device`, `vm.remove-device`), `vm.qos` (the I/O scheduler's
//! settings and stats per disk, changed live with a PUT), plus `/metrics` in the Prometheus
//! text format. The OpenAPI document is docs/api.yaml.
//!
//! The VM side is the [`VmApi`] trait (sluice-vmm implements it), so this crate knows nothing
//! of KVM. The server is `tiny_http` (synchronous, one thread, Unix sockets): the API takes a
//! handful of requests per VM lifetime, so an async runtime would be all cost (a migration
//! holds the thread until it is done: other requests wait meanwhile). The client
//! ([`request`], used by `sluice ctl`) is a dozen lines over `UnixStream`: one request per
//! connection, `Connection: close`, no crate needed for that.
//!
//! Every request is answered; bad ones get a 4xx with `{"error": "..."}` (unknown path 404,
//! wrong method 405, a body where none is taken or one over [`MAX_BODY`] 400, a bad device
//! request body 400, an unknown device id 404, a state that does not allow the action 409),
//! never a crash of the VMM.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

/// The largest request body read.
pub const MAX_BODY: usize = 64 << 10;
/// How long the client waits for an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A VM as the API sees it.
pub trait VmApi: Send + Sync {
    /// State and configuration (`{"state": "Running"|"Paused"|..., "config": {...}}`).
    fn info(&self) -> Value;
    /// Parks every vCPU; devices keep their state.
    fn pause(&self) -> Result<(), ApiError>;
    fn resume(&self) -> Result<(), ApiError>;
    /// Ends the VM as a power-off would, metrics written.
    fn shutdown(&self) -> Result<(), ApiError>;
    /// Writes a snapshot of the paused VM into the directory `destination`.
    fn snapshot(&self, destination: &Path) -> Result<(), ApiError>;
    /// Per-device counters as JSON.
    fn counters(&self) -> Value;
    /// The same counters in the Prometheus text format.
    fn prometheus(&self) -> String;
    /// Live-migrates the VM to `destination_url` (`unix:PATH`, `tcp:HOST:PORT`) and answers
    /// when it is done, with what it cost.
    fn send_migration(&self, destination_url: &str) -> Result<Value, ApiError> {
        Err(ApiError::Failed(format!(
            "this VMM cannot migrate (to {destination_url})"
        )))
    }
    /// Hot-plugs a virtio-blk disk; answers the new device (`{"id", "bdf", ...}`).
    fn add_disk(&self, _request: &DeviceRequest) -> Result<Value, ApiError> {
        Err(ApiError::Conflict("this VMM cannot hot-plug".into()))
    }
    /// Hot-plugs a virtio-net device on a tap.
    fn add_net(&self, _request: &DeviceRequest) -> Result<Value, ApiError> {
        Err(ApiError::Conflict("this VMM cannot hot-plug".into()))
    }
    /// Hot-plugs an assigned (VFIO) host PCI function.
    fn add_device(&self, _request: &DeviceRequest) -> Result<Value, ApiError> {
        Err(ApiError::Conflict("this VMM cannot hot-plug".into()))
    }
    /// Asks the guest to eject device `id`.
    fn remove_device(&self, _id: &str) -> Result<Value, ApiError> {
        Err(ApiError::Conflict("this VMM cannot hot-unplug".into()))
    }
    /// Every disk behind the I/O scheduler: its weight and limits and what it got
    /// (`{"disks": [{"id", "weight", "iops_limit", ..., "share", "queue_delay_p99_us"}]}`).
    fn qos(&self) -> Result<Value, ApiError> {
        Err(ApiError::Conflict("this VMM has no I/O scheduler".into()))
    }
    /// Changes the weight and limits of the scheduled disk `request.id` (always given) to
    /// `request.options` (the `--disk` keys `weight`, `iops`, `iops_burst`, `bps`,
    /// `bps_burst`, `qos_queue`); answers the disk's new settings. The id `device` is the
    /// scheduler itself (the `--qos-device` keys).
    fn set_qos(&self, _request: &DeviceRequest) -> Result<Value, ApiError> {
        Err(ApiError::Conflict("this VMM has no I/O scheduler".into()))
    }
}

/// A hot-plug request body: a flat JSON object whose values are strings, booleans
/// (`on`/`off`) or non-negative integers, and an optional `"id"` string. The other keys are the
/// device's options as the command line spells them (`path`, `readonly`, `tap`, `mac`, ...),
/// checked by the VMM's own option parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRequest {
    pub id: Option<String>,
    pub options: Vec<(String, String)>,
}

impl DeviceRequest {
    /// The options as `key=value,key=value` (the `--disk`/`--net` syntax).
    pub fn options_string(&self) -> String {
        let pairs: Vec<String> = self
            .options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        pairs.join(",")
    }

    /// The value of option `key`, if given.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Parses `body` for `route` (named in errors).
    pub fn parse(route: &str, body: &[u8]) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| format!("{route} wants a JSON object: {e}"))?;
        let Value::Object(fields) = value else {
            return Err(format!("{route} wants a JSON object"));
        };
        let mut request = DeviceRequest {
            id: None,
            options: Vec::new(),
        };
        for (key, value) in fields {
            let text = match &value {
                Value::String(s) => s.clone(),
                Value::Bool(on) => if *on { "on" } else { "off" }.to_string(),
                Value::Number(n) if n.is_u64() => n.to_string(),
                _ => {
                    return Err(format!(
                        "{route}: `{key}` must be a string, a boolean or a non-negative integer"
                    ))
                }
            };
            if key.is_empty() || key.contains([',', '=']) || text.contains(',') {
                return Err(format!(
                    "{route}: `{key}`: keys and values may not contain `,` (nor keys `=`)"
                ));
            }
            if key == "id" {
                request.id = Some(text);
            } else {
                request.options.push((key, text));
            }
        }
        Ok(request)
    }
}

/// `vm.remove-device`'s body, `{"id": "disk1"}`.
fn device_id(body: &[u8]) -> Result<String, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("vm.remove-device wants {{\"id\": \"ID\"}}: {e}"))?;
    let Value::Object(fields) = value else {
        return Err("vm.remove-device wants {\"id\": \"ID\"}".into());
    };
    if let Some(key) = fields.keys().find(|k| *k != "id") {
        return Err(format!("vm.remove-device: unknown field `{key}`"));
    }
    fields
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| "vm.remove-device: no id string".into())
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Not possible in the VM's current state (pausing a paused VM, acting on a stopping one).
    #[error("{0}")]
    Conflict(String),
    /// The VM could not do it.
    #[error("{0}")]
    Failed(String),
    /// The request's content is wrong (bad option, bad value).
    #[error("{0}")]
    BadRequest(String),
    /// The request names something that does not exist (a device id).
    #[error("{0}")]
    NotFound(String),
}

impl ApiError {
    fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::Failed(_) => 500,
        }
    }
}

/// Errors setting up the server or making a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} exists and is not a stale socket: refusing to replace it")]
    PathTaken(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot reach the API at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("bad answer from the API: {0}")]
    BadAnswer(String),
}

/// The server thread; dropping it stops the thread and removes the socket.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path` (free, or a stale socket nobody answers on) and serves `vm`.
    pub fn start(path: &Path, vm: Arc<dyn VmApi>) -> Result<Self, Error> {
        claim_path(path)?;
        let server = tiny_http::Server::http_unix(path).map_err(|e| Error::Listen {
            path: path.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(&serving, vm.as_ref()))
            .map_err(|source| Error::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            server,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Refuses a path that holds anything but a socket nobody listens on (which is removed).
fn claim_path(path: &Path) -> Result<(), Error> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let stale = meta.file_type().is_socket() && UnixStream::connect(path).is_err();
    if !stale {
        return Err(Error::PathTaken(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|source| Error::Listen {
        path: path.to_path_buf(),
        source,
    })
}

fn serve(server: &tiny_http::Server, vm: &dyn VmApi) {
    for mut request in server.incoming_requests() {
        let answer = match read_body(&mut request) {
            Ok(body) => route(request.method(), request.url(), &body, vm),
            Err(answer) => answer,
        };
        let response = tiny_http::Response::from_string(answer.body)
            .with_status_code(answer.status)
            .with_header(content_type(answer.content_type));
        if let Err(e) = request.respond(response) {
            tracing::debug!("api: answering failed: {e}");
        }
    }
}

fn content_type(value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(&b"Content-Type"[..], value.as_bytes())
        .unwrap_or_else(|()| unreachable!("a constant, valid header"))
}

/// What the API answers: status, body, its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub content_type: &'static str,
}

impl Answer {
    fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            body: value.to_string(),
            content_type: "application/json",
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Self::json(status, &json!({ "error": message }))
    }

    fn no_content() -> Self {
        Self {
            status: 204,
            body: String::new(),
            content_type: "application/json",
        }
    }
}

fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, Answer> {
    if request.body_length().is_some_and(|len| len > MAX_BODY) {
        return Err(Answer::error(400, "request body too large"));
    }
    let mut body = Vec::new();
    let read = request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body);
    match read {
        Err(e) => Err(Answer::error(400, &format!("cannot read the body: {e}"))),
        Ok(_) if body.len() > MAX_BODY => Err(Answer::error(400, "request body too large")),
        Ok(_) => Ok(body),
    }
}

/// The API's routes: what `method` on `url` with `body` answers.
pub fn route(method: &tiny_http::Method, url: &str, body: &[u8], vm: &dyn VmApi) -> Answer {
    use tiny_http::Method::{Get, Put};
    let path = url.split('?').next().unwrap_or(url);
    let action = |result: Result<(), ApiError>| match result {
        Ok(()) => Answer::no_content(),
        Err(e) => Answer::error(e.status(), &e.to_string()),
    };
    let answer = |result: Result<Value, ApiError>| match result {
        Ok(value) => Answer::json(200, &value),
        Err(e) => Answer::error(e.status(), &e.to_string()),
    };
    let device = |route: &str, add: &dyn Fn(&DeviceRequest) -> Result<Value, ApiError>| {
        match DeviceRequest::parse(route, body) {
            Ok(request) => answer(add(&request)),
            Err(why) => Answer::error(400, &why),
        }
    };
    // Clients may send nothing or an empty JSON object with an action.
    let trimmed = String::from_utf8_lossy(body);
    let has_body = !matches!(trimmed.trim(), "" | "{}");
    match (path, method) {
        ("/api/v1/vm.snapshot", Put) => match snapshot_destination(body) {
            Ok(destination) => action(vm.snapshot(&destination)),
            Err(why) => Answer::error(400, &why),
        },
        ("/api/v1/vm.send-migration", Put) => match migration_destination(body) {
            Ok(url) => answer(vm.send_migration(&url)),
            Err(why) => Answer::error(400, &why),
        },
        ("/api/v1/vm.add-disk", Put) => device("vm.add-disk", &|r| vm.add_disk(r)),
        ("/api/v1/vm.add-net", Put) => device("vm.add-net", &|r| vm.add_net(r)),
        ("/api/v1/vm.add-device", Put) => device("vm.add-device", &|r| vm.add_device(r)),
        ("/api/v1/vm.qos", Put) => match DeviceRequest::parse("vm.qos", body) {
            Ok(request) if request.id.is_none() => {
                Answer::error(400, "vm.qos needs the disk's \"id\"")
            }
            Ok(request) => answer(vm.set_qos(&request)),
            Err(why) => Answer::error(400, &why),
        },
        ("/api/v1/vm.remove-device", Put) => match device_id(body) {
            Ok(id) => answer(vm.remove_device(&id)),
            Err(why) => Answer::error(400, &why),
        },
        (_, Put) if has_body => Answer::error(400, "this action takes no body"),
        ("/api/v1/vmm.ping", Get) => Answer::json(
            200,
            &json!({ "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id() }),
        ),
        ("/api/v1/vm.info", Get) => Answer::json(200, &vm.info()),
        ("/api/v1/vm.counters", Get) => Answer::json(200, &vm.counters()),
        ("/api/v1/vm.qos", Get) => answer(vm.qos()),
        ("/metrics", Get) => Answer {
            status: 200,
            body: vm.prometheus(),
            content_type: "text/plain; version=0.0.4",
        },
        ("/api/v1/vm.pause", Put) => action(vm.pause()),
        ("/api/v1/vm.resume", Put) => action(vm.resume()),
        ("/api/v1/vm.shutdown" | "/api/v1/vmm.shutdown", Put) => action(vm.shutdown()),
        (
            "/api/v1/vmm.ping"
            | "/api/v1/vm.info"
            | "/api/v1/vm.counters"
            | "/metrics"
            | "/api/v1/vm.pause"
            | "/api/v1/vm.resume"
            | "/api/v1/vm.shutdown"
            | "/api/v1/vmm.shutdown"
            | "/api/v1/vm.snapshot"
            | "/api/v1/vm.send-migration"
            | "/api/v1/vm.add-disk"
            | "/api/v1/vm.add-net"
            | "/api/v1/vm.add-device"
            | "/api/v1/vm.remove-device"
            | "/api/v1/vm.qos",
            _,
        ) => Answer::error(405, &format!("{method} is not allowed on {path}")),
        _ => Answer::error(404, &format!("no such endpoint: {path}")),
    }
}

/// `vm.snapshot`'s body, `{"destination_url": "file:///dir"}` as Cloud Hypervisor's: the
/// directory named.
fn snapshot_destination(body: &[u8]) -> Result<PathBuf, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("vm.snapshot wants {{\"destination_url\": \"file:///DIR\"}}: {e}"))?;
    let url = value["destination_url"]
        .as_str()
        .ok_or("vm.snapshot: no destination_url string")?;
    let dir = url
        .strip_prefix("file://")
        .filter(|dir| dir.starts_with('/'))
        .ok_or("vm.snapshot: destination_url must be file:///ABSOLUTE/DIR")?;
    Ok(PathBuf::from(dir))
}

/// `vm.send-migration`'s body, `{"destination_url": "unix:/path"}` as Cloud Hypervisor's.
fn migration_destination(body: &[u8]) -> Result<String, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        format!("vm.send-migration wants {{\"destination_url\": \"unix:PATH\"}}: {e}")
    })?;
    let url = value["destination_url"]
        .as_str()
        .ok_or("vm.send-migration: no destination_url string")?;
    Ok(url.to_string())
}

/// One request to the API at `socket`: the status and the body.
pub fn request(socket: &Path, method: &str, path: &str) -> Result<(u16, String), Error> {
    request_with(socket, method, path, "")
}

/// [`request`] with a JSON `body`.
pub fn request_with(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), Error> {
    request_with_timeout(socket, method, path, body, CLIENT_TIMEOUT)
}

/// [`request_with`] waiting up to `timeout` for the answer (a migration takes a while).
pub fn request_with_timeout(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, String), Error> {
    let connect = |source| Error::Connect {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(connect)?;
    stream.set_read_timeout(Some(timeout)).map_err(connect)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(connect)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(connect)?;
    parse_answer(&answer)
}

/// Status and body of an HTTP/1.1 answer (not chunked: the server sends a length).
fn parse_answer(answer: &str) -> Result<(u16, String), Error> {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::BadAnswer("no end of headers".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::BadAnswer(head.lines().next().unwrap_or("").into()))?;
    Ok((status, body.to_string()))
}

pub mod fuzz;
#[cfg(test)]
mod tests;
