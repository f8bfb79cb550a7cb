//! `cargo test` replays the committed corpora of the fuzz targets whose bodies live in this
//! crate: every input of every target through its body (fuzz/corpus_replay.rs has the
//! mechanism and how to add a target), and the `vhost_user_fds` seeds each checked to still
//! reach what they were written for.

mod common;
#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

use std::path::PathBuf;

use sluice_devices::block::{Block, BlockConfig};
use sluice_vhost::fuzz::{
    chains_served, run_frontend_script, vhost_iotlb, vhost_user_fds, vhost_user_messages,
};
use sluice_vhost::server::Server;
use sluice_vhost::ConnectionEnd;

#[test]
fn fuzz_corpora_replay_without_panics() {
    let image = common::make_image("fuzz-corpus");
    let block = Block::new(BlockConfig::new(&image)).expect("open the image");
    let socket = common::temp_path("fuzz-corpus.sock");
    let server = Server::bind(&socket, block).expect("bind");
    let messages = |data: &[u8]| {
        vhost_user_messages(data, |stream| {
            server.serve_connection(stream);
        })
    };

    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[
            ("vhost_user_messages", &messages),
            ("vhost_user_fds", &vhost_user_fds),
            ("vhost_iotlb", &vhost_iotlb),
        ],
    );

    drop(server);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&image);
}

fn seed(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus/vhost_user_fds")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_vhost_user_fds_corpus_replays_and_each_seed_reaches_its_point() {
    // (seed, the connection ends by the SIGBUS path, the device serves its request)
    let seeds = [
        ("ring_io", false, true),
        ("packed_ring_io", false, true),
        ("packed_inflight_recovery", false, true),
        ("shrink_ram", true, false),
        ("shrink_inflight", true, false),
        ("saturated_call", false, false),
        ("remove_and_add_back", false, true),
        ("add_again_from_another_fd", false, true),
        ("kick_before_addr_no_protocol", false, true),
        ("iotlb_ring_io", false, true),
        ("dirty_log_ring_io", false, true),
    ];

    for (name, faults, serves) in seeds {
        let served_before = chains_served();

        let outcome = run_frontend_script(&seed(name));

        match (&outcome.end, faults) {
            (Some(ConnectionEnd::Closed), false) => {
                assert_eq!(outcome.played, outcome.operations, "{name}: {outcome:?}")
            }
            (Some(ConnectionEnd::Refused(why)), true) if why.contains("SIGBUS") => {}
            _ => panic!("{name}: {outcome:?}"),
        }
        if serves {
            assert!(chains_served() > served_before, "{name}: no chain served");
        }
    }
}

#[test]
fn hostile_dirty_log_seeds_are_refused_by_name() {
    for name in ["dirty_log_past_end", "dirty_log_too_small"] {
        let outcome = run_frontend_script(&seed(name));

        match &outcome.end {
            Some(ConnectionEnd::Dropped(why)) if why.to_string().contains("SET_LOG_BASE") => {}
            _ => panic!("{name}: {outcome:?}"),
        }
    }
    // An empty log does not even parse (the `vhost` crate's message validation).
    let outcome = run_frontend_script(&seed("dirty_log_empty"));
    assert!(
        matches!(outcome.end, Some(ConnectionEnd::Dropped(_))),
        "{outcome:?}"
    );
}
