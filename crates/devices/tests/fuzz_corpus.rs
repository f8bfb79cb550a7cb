//! `cargo test` replays the committed corpora of the fuzz targets whose bodies live in this
//! crate (see fuzz/corpus_replay.rs for the mechanism and how to add a target), and checks that
//! each `vhost_user_backend_replies` seed reaches the point it was written for.

use std::path::Path;

use sluice_devices::vhost_user_blk::fuzz::{run_hostile_backend, BackendOutcome};
use vhost::vhost_user::message::FrontendReq;

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

#[test]
fn fuzz_corpora_replay_without_panics() {
    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[
            ("blk_request", &sluice_devices::block::fuzz::blk_request),
            ("blk_trace", &sluice_devices::block::fuzz::blk_trace),
            ("net_header", &sluice_devices::net::fuzz::net_header),
            ("net_state", &sluice_devices::net::fuzz::net_state),
            ("e1000_tx", &sluice_devices::e1000::fuzz::e1000_tx),
            ("e1000_state", &sluice_devices::e1000::fuzz::e1000_state),
            (
                "e1000_registers",
                &sluice_devices::e1000::fuzz::e1000_registers,
            ),
            (
                "vhost_user_backend_replies",
                &sluice_devices::vhost_user_blk::fuzz::hostile_backend,
            ),
            ("nvme_command", &sluice_devices::nvme::fuzz::nvme_command),
            (
                "nvme_registers",
                &sluice_devices::nvme::fuzz::nvme_registers,
            ),
            ("nvme_trace", &sluice_devices::nvme::fuzz::nvme_trace),
            ("tpm_crb", &sluice_devices::tpm::fuzz::tpm_crb),
            ("tpm_state", &sluice_devices::tpm::fuzz::tpm_state),
        ],
    );
}

/// Each e1000_tx seed sends what it was written for (headers: flags, gso_type).
#[test]
fn e1000_tx_seeds_reach_their_point() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/e1000_tx");
    let sent = |name: &str| {
        let input = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        sluice_devices::e1000::fuzz::run_tx(&input)
            .iter()
            .map(|p| (p.len() - 12, p[0], p[1]))
            .collect::<Vec<_>>()
    };

    assert_eq!(sent("two_legacy_frames"), vec![(60, 0, 0), (60, 0, 0)]);
    assert_eq!(sent("split_frame_with_vlan"), vec![(64, 0, 0)]);
    assert_eq!(sent("checksum_offload"), vec![(154, 1, 0)]);
    assert_eq!(sent("segmentation_offload"), vec![(1254, 1, 1)]);
    assert!(sent("ring_without_eop").is_empty());
    assert!(sent("buffer_outside_memory").is_empty());
}

fn backend_seed(name: &str) -> BackendOutcome {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus/vhost_user_backend_replies")
        .join(name);
    let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    run_hostile_backend(&input)
}

fn saw(outcome: &BackendOutcome, request: FrontendReq) -> bool {
    outcome.requests.contains(&(request as u32))
}

/// The device came up and its DRIVER_OK setup reached SET_VRING_ENABLE without a reset.
fn assert_running(name: &str, outcome: &BackendOutcome) {
    assert_eq!(outcome.handshake_error, None, "{name}: {outcome:?}");
    assert!(outcome.activated, "{name}: {outcome:?}");
    assert!(!outcome.needs_reset, "{name}: {outcome:?}");
    assert!(
        saw(outcome, FrontendReq::SET_VRING_ENABLE),
        "{name}: {outcome:?}"
    );
    assert!(
        saw(outcome, FrontendReq::GET_VRING_BASE),
        "{name}: {outcome:?}"
    );
}

fn assert_handshake_failed_at(name: &str, outcome: &BackendOutcome, step: &str) {
    let error = outcome.handshake_error.as_deref().unwrap_or("");
    assert!(error.contains(step), "{name}: expected {step}: {outcome:?}");
    assert!(!outcome.activated, "{name}");
}

#[test]
fn healthy_backend_seeds_get_a_running_device() {
    for name in ["healthy", "healthy_two_queues_second_active"] {
        let outcome = backend_seed(name);

        assert_running(name, &outcome);
        assert!(saw(&outcome, FrontendReq::SET_INFLIGHT_FD), "{name}");
        assert!(saw(&outcome, FrontendReq::RESET_DEVICE), "{name}");
        assert_eq!(outcome.connections, 1, "{name}");
    }
}

#[test]
fn the_migration_seeds_log_and_quiesce_or_refuse_a_bad_log_reply() {
    let logged = backend_seed("migration_logging");
    let bad = backend_seed("migration_log_reply_too_long");

    assert_eq!(logged.handshake_error, None, "{logged:?}");
    assert!(logged.activated && !logged.needs_reset, "{logged:?}");
    assert!(logged.logging, "{logged:?}");
    assert!(logged.quiesced, "{logged:?}");
    assert!(saw(&logged, FrontendReq::SET_LOG_BASE), "{logged:?}");
    assert!(saw(&logged, FrontendReq::GET_VRING_BASE), "{logged:?}");
    assert!(saw(&bad, FrontendReq::SET_LOG_BASE), "{bad:?}");
    assert!(!bad.logging, "{bad:?}");
}

#[test]
fn the_qsd_shaped_seed_runs_without_inflight_or_reset_device() {
    let outcome = backend_seed("qsd_handshake");

    assert_running("qsd_handshake", &outcome);
    assert!(saw(&outcome, FrontendReq::ADD_MEM_REG), "{outcome:?}");
    assert!(!saw(&outcome, FrontendReq::GET_INFLIGHT_FD), "{outcome:?}");
    assert!(!saw(&outcome, FrontendReq::RESET_DEVICE), "{outcome:?}");
}

#[test]
fn broken_handshake_seeds_fail_at_their_request() {
    for (name, step) in [
        ("truncated_get_config", "GET_CONFIG"),
        ("nack_set_owner", "SET_OWNER"),
        ("close_mid_handshake", "GET_QUEUE_NUM"),
        ("garbage_reply", "GET_FEATURES"),
        ("stale_ack", "GET_CONFIG"),
    ] {
        let outcome = backend_seed(name);

        assert_handshake_failed_at(name, &outcome, step);
    }
}

#[test]
fn a_nack_at_driver_ok_needs_a_reset_that_still_stops_the_ring() {
    let outcome = backend_seed("nack_at_driver_ok");

    assert!(outcome.activated && outcome.needs_reset, "{outcome:?}");
    assert!(!saw(&outcome, FrontendReq::ADD_MEM_REG), "{outcome:?}");
    assert!(saw(&outcome, FrontendReq::GET_VRING_BASE), "{outcome:?}");
    assert_eq!(outcome.connections, 1, "a refusal keeps the connection");
}

#[test]
fn an_inflight_area_without_its_fd_needs_a_reset() {
    let outcome = backend_seed("inflight_without_fd");

    assert!(outcome.activated && outcome.needs_reset, "{outcome:?}");
    assert!(!saw(&outcome, FrontendReq::SET_INFLIGHT_FD), "{outcome:?}");
}

#[test]
fn a_backend_gone_after_the_handshake_is_reconnected_at_driver_ok() {
    let outcome = backend_seed("reconnect_at_driver_ok");

    assert_running("reconnect_at_driver_ok", &outcome);
    assert_eq!(outcome.connections, 2, "{outcome:?}");
}

#[test]
fn a_reset_stalled_at_get_vring_base_gives_up_on_the_connection() {
    let outcome = backend_seed("stall_at_reset");

    assert_running("stall_at_reset", &outcome);
    assert!(!saw(&outcome, FrontendReq::RESET_DEVICE), "{outcome:?}");
}

/// Behind a vIOMMU: the MISSes on the backend channel get one UPDATE each when the IOVA is
/// mapped (checked well-formed by the scripted backend), none for one beyond guest RAM; the
/// device keeps running whatever the channel carries.
#[test]
fn iommu_seeds_answer_misses_with_updates_and_survive_a_bad_channel() {
    let misses = backend_seed("iommu_misses");
    let garbage = backend_seed("iommu_channel_garbage");
    let refused = backend_seed("iommu_without_access_platform");

    assert_running("iommu_misses", &misses);
    assert!(saw(&misses, FrontendReq::SET_BACKEND_REQ_FD), "{misses:?}");
    assert_eq!(misses.iotlb_updates, 2, "{misses:?}");
    assert_running("iommu_channel_garbage", &garbage);
    assert_eq!(garbage.iotlb_updates, 0, "{garbage:?}");
    assert_handshake_failed_at(
        "iommu_without_access_platform",
        &refused,
        "cannot translate IOVAs",
    );
}

/// The blk_trace seeds cut from a real recording re-run on the device model with the
/// recorded answers (the read-back of a fresh image, a verify write, the final flush).
#[test]
fn recorded_blk_trace_seeds_rerun_with_their_answers() {
    use sluice_devices::block::rerun::{rerun, RerunOptions};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/blk_trace");
    for (name, requests) in [("recorded_prefix", 3), ("recorded_write_and_flush", 2)] {
        let report = rerun(&dir.join(name), &RerunOptions::default()).unwrap();
        assert_eq!(report.mismatch, None, "{name}");
        assert_eq!(report.matched, requests, "{name}");
    }
}

/// The nvme_trace seeds cut from a real NVMe request log (the guest kit's reads of a fresh
/// namespace, a verify write and the final flush) re-run on the NVM command path with the
/// recorded statuses and read data.
#[test]
fn recorded_nvme_trace_seeds_rerun_with_their_answers() {
    use sluice_devices::block::rerun::RerunOptions;
    use sluice_devices::nvme::rerun::rerun;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nvme_trace");
    for (name, commands) in [("recorded_prefix", 3), ("recorded_write_and_flush", 2)] {
        let report = rerun(&dir.join(name), &RerunOptions::default()).unwrap();
        assert_eq!(report.mismatch, None, "{name}");
        assert_eq!(report.matched, commands, "{name}");
    }
}
