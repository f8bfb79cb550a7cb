use std::sync::Mutex;

use super::*;

/// A VM that records the actions asked of it and refuses a second pause.
#[derive(Default)]
struct FakeVm {
    paused: Mutex<bool>,
    actions: Mutex<Vec<&'static str>>,
}

impl VmApi for FakeVm {
    fn info(&self) -> Value {
        let state = if *self.paused.lock().unwrap() {
            "Paused"
        } else {
            "Running"
        };
        json!({ "state": state })
    }

    fn pause(&self) -> Result<(), ApiError> {
        let mut paused = self.paused.lock().unwrap();
        if *paused {
            return Err(ApiError::Conflict("already paused".into()));
        }
        *paused = true;
        self.actions.lock().unwrap().push("pause");
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        *self.paused.lock().unwrap() = false;
        self.actions.lock().unwrap().push("resume");
        Ok(())
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.actions.lock().unwrap().push("shutdown");
        Ok(())
    }

    fn snapshot(&self, _destination: &Path) -> Result<(), ApiError> {
        Ok(())
    }

    fn counters(&self) -> Value {
        json!({ "blk0": { "requests": 7 } })
    }

    fn prometheus(&self) -> String {
        "sluice_requests_total{device=\"blk0\"} 7\n".into()
    }
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sluice-api-{name}-{}.sock", std::process::id()))
}

fn serve(name: &str) -> (ApiServer, Arc<FakeVm>, PathBuf) {
    let path = socket_path(name);
    let _ = std::fs::remove_file(&path);
    let vm = Arc::new(FakeVm::default());
    let server = ApiServer::start(&path, vm.clone()).unwrap();
    (server, vm, path)
}

#[test]
fn pause_info_resume_over_the_socket() {
    let (_server, vm, path) = serve("cycle");

    let paused = request(&path, "PUT", "/api/v1/vm.pause").unwrap();
    let info = request(&path, "GET", "/api/v1/vm.info").unwrap();
    let again = request(&path, "PUT", "/api/v1/vm.pause").unwrap();
    let resumed = request(&path, "PUT", "/api/v1/vm.resume").unwrap();

    assert_eq!(paused.0, 204);
    assert_eq!(info.0, 200);
    let info: Value = serde_json::from_str(&info.1).unwrap();
    assert_eq!(info["state"], "Paused");
    assert_eq!(again.0, 409);
    let again: Value = serde_json::from_str(&again.1).unwrap();
    assert_eq!(again["error"], "already paused");
    assert_eq!(resumed.0, 204);
    assert_eq!(*vm.actions.lock().unwrap(), ["pause", "resume"]);
}

#[test]
fn counters_as_json_and_prometheus_text() {
    let (_server, _vm, path) = serve("counters");

    let json_answer = request(&path, "GET", "/api/v1/vm.counters").unwrap();
    let text = request(&path, "GET", "/metrics").unwrap();
    let ping = request(&path, "GET", "/api/v1/vmm.ping").unwrap();

    let counters: Value = serde_json::from_str(&json_answer.1).unwrap();
    assert_eq!(counters["blk0"]["requests"], 7);
    assert_eq!(
        text,
        (200, "sluice_requests_total{device=\"blk0\"} 7\n".into())
    );
    assert_eq!(ping.0, 200);
}

#[test]
fn bad_requests_get_a_4xx_with_a_json_error_and_the_server_carries_on() {
    let (_server, vm, path) = serve("bad");
    let cases = [
        ("GET", "/api/v1/vm.nothing", 404),
        ("GET", "/api/v1/vm.pause", 405),
        ("DELETE", "/api/v1/vm.info", 405),
        ("PUT", "/", 404),
    ];

    for (method, url, status) in cases {
        let (got, body) = request(&path, method, url).unwrap();

        assert_eq!(got, status, "{method} {url}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert!(vm.actions.lock().unwrap().is_empty());
    assert_eq!(request(&path, "GET", "/api/v1/vmm.ping").unwrap().0, 200);
}

#[test]
fn a_body_on_an_action_or_garbage_on_the_wire_is_refused() {
    let (_server, vm, path) = serve("garbage");

    let mut stream = UnixStream::connect(&path).unwrap();
    stream
        .write_all(
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        )
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let mut garbage = UnixStream::connect(&path).unwrap();
    garbage.write_all(b"\x00\x01 not http\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    let _ = garbage.read_to_end(&mut reply);

    assert_eq!(parse_answer(&answer).unwrap().0, 400);
    assert!(vm.actions.lock().unwrap().is_empty());
    assert_eq!(request(&path, "GET", "/api/v1/vmm.ping").unwrap().0, 200);
}

#[test]
fn an_existing_file_is_never_replaced_but_a_stale_socket_is() {
    let path = socket_path("taken");
    std::fs::write(&path, b"precious").unwrap();

    let refused = ApiServer::start(&path, Arc::new(FakeVm::default()));

    assert!(matches!(refused, Err(Error::PathTaken(_))));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    let server = ApiServer::start(&path, Arc::new(FakeVm::default())).unwrap();
    assert_eq!(request(&path, "GET", "/api/v1/vmm.ping").unwrap().0, 200);
    drop(server);
    assert!(!path.exists(), "the socket is removed with the server");
}

#[test]
fn a_device_request_becomes_command_line_options_and_bad_bodies_are_refused() {
    let request = DeviceRequest::parse(
        "vm.add-disk",
        br#"{"path": "/img", "readonly": true, "queues": 2, "id": "d1"}"#,
    )
    .unwrap();

    assert_eq!(request.id.as_deref(), Some("d1"));
    assert_eq!(request.options_string(), "path=/img,queues=2,readonly=on");
    assert_eq!(request.option("readonly"), Some("on"));
    for bad in [
        &b"{\"path\": "[..],
        b"[]",
        b"\"path\"",
        br#"{"path": null}"#,
        br#"{"path": -1}"#,
        br#"{"path": 1.5}"#,
        br#"{"path": ["a"]}"#,
        br#"{"path": "a,readonly=on"}"#,
        br#"{"pa=th": "a"}"#,
        br#"{"": "a"}"#,
    ] {
        let refused = DeviceRequest::parse("vm.add-disk", bad);
        assert!(refused.is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn hotplug_routes_answer_400_for_bad_bodies_and_409_from_a_vm_without_hotplug() {
    let vm = FakeVm::default();
    let put = tiny_http::Method::Put;

    let malformed = route(&put, "/api/v1/vm.add-disk", b"{", &vm);
    let not_supported = route(&put, "/api/v1/vm.add-net", br#"{"tap": "t0"}"#, &vm);
    let no_id = route(&put, "/api/v1/vm.remove-device", b"{}", &vm);
    let extra = route(
        &put,
        "/api/v1/vm.remove-device",
        br#"{"id": "a", "b": 1}"#,
        &vm,
    );
    let wrong_method = route(&tiny_http::Method::Get, "/api/v1/vm.add-device", b"", &vm);

    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert_eq!(not_supported.status, 409, "{not_supported:?}");
    assert_eq!(no_id.status, 400, "{no_id:?}");
    assert_eq!(extra.status, 400, "{extra:?}");
    assert_eq!(wrong_method.status, 405, "{wrong_method:?}");
    assert!(malformed.body.contains("\"error\""));
}

#[test]
fn qos_routes_need_an_id_and_a_flat_body_and_a_vm_without_a_scheduler_answers_409() {
    let vm = FakeVm::default();
    let put = tiny_http::Method::Put;

    let no_id = route(&put, "/api/v1/vm.qos", br#"{"iops": 5}"#, &vm);
    let malformed = route(&put, "/api/v1/vm.qos", b"[1]", &vm);
    let nested = route(
        &put,
        "/api/v1/vm.qos",
        br#"{"id": "disk0", "iops": {}}"#,
        &vm,
    );
    let negative = route(
        &put,
        "/api/v1/vm.qos",
        br#"{"id": "disk0", "iops": -1}"#,
        &vm,
    );
    let not_supported = route(&put, "/api/v1/vm.qos", br#"{"id": "disk0"}"#, &vm);
    let get = route(&tiny_http::Method::Get, "/api/v1/vm.qos", b"", &vm);
    let wrong_method = route(&tiny_http::Method::Delete, "/api/v1/vm.qos", b"", &vm);

    for bad in [&no_id, &malformed, &nested, &negative] {
        assert_eq!(bad.status, 400, "{bad:?}");
        let body: Value = serde_json::from_str(&bad.body).unwrap();
        assert!(body["error"].is_string(), "{bad:?}");
    }
    assert!(no_id.body.contains("needs the disk"), "{no_id:?}");
    assert_eq!(not_supported.status, 409, "{not_supported:?}");
    assert_eq!(get.status, 409, "{get:?}");
    assert_eq!(wrong_method.status, 405, "{wrong_method:?}");
}
