//! `cargo test` replays the committed corpora of the fuzz targets whose bodies live in this
//! crate (see fuzz/corpus_replay.rs for the mechanism and how to add a target).

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

#[test]
fn fuzz_corpora_replay_without_panics() {
    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[
            ("blk_request", &sluice_devices::block::fuzz::blk_request),
            ("net_header", &sluice_devices::net::fuzz::net_header),
        ],
    );
}
