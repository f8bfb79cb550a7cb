//! Fuzz body for the control API (fuzz target `api_request`): what a client may send reaches
//! [`route`] as method, URL and body, and the client's answer parser sees arbitrary bytes.
//! Checked: no panic, every answer is one of the statuses the API documents, and an error
//! answer is a JSON object with an `error` string.

use std::path::Path;

use serde_json::{json, Value};

use crate::{parse_answer, route, ApiError, DeviceRequest, VmApi};

/// A VM that accepts every action.
struct Accepting;

impl VmApi for Accepting {
    fn info(&self) -> Value {
        json!({ "state": "Running" })
    }
    fn pause(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiError> {
        Err(ApiError::Conflict("not paused".into()))
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn snapshot(&self, _destination: &Path) -> Result<(), ApiError> {
        Ok(())
    }

    fn counters(&self) -> Value {
        json!({})
    }
    fn prometheus(&self) -> String {
        String::new()
    }
    fn add_disk(&self, request: &DeviceRequest) -> Result<Value, ApiError> {
        match request.option("path") {
            Some(path) => Ok(json!({ "id": request.id, "path": path, "bdf": "00:05.0" })),
            None => Err(ApiError::BadRequest("no path".into())),
        }
    }
    fn set_qos(&self, request: &DeviceRequest) -> Result<Value, ApiError> {
        match request.id.as_deref() {
            Some("disk0") => Ok(json!({ "id": "disk0", "options": request.options_string() })),
            _ => Err(ApiError::NotFound("no scheduled disk".into())),
        }
    }
    fn remove_device(&self, id: &str) -> Result<Value, ApiError> {
        match id {
            "disk0" => Ok(json!({ "id": id })),
            _ => Err(ApiError::NotFound(format!("no device with id `{id}`"))),
        }
    }
}

const METHODS: [tiny_http::Method; 5] = [
    tiny_http::Method::Get,
    tiny_http::Method::Put,
    tiny_http::Method::Post,
    tiny_http::Method::Delete,
    tiny_http::Method::Patch,
];

/// `[method selector][url up to '\n'][body]`.
pub fn request(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = &METHODS[usize::from(selector) % METHODS.len()];
    let (url, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(end) => (&rest[..end], &rest[end + 1..]),
        None => (rest, &[][..]),
    };
    let url = String::from_utf8_lossy(url);

    let answer = route(method, &url, body, &Accepting);

    assert!(
        [200, 204, 400, 404, 405, 409, 500].contains(&answer.status),
        "{answer:?}"
    );
    if answer.status >= 400 {
        let error: Value = serde_json::from_str(&answer.body).expect("an error is JSON");
        assert!(error["error"].is_string(), "{answer:?}");
    }
    let _ = parse_answer(&String::from_utf8_lossy(data));
}
