//! `cargo test` replays the committed corpus of the `qos_spec` fuzz target (see
//! fuzz/corpus_replay.rs for the mechanism).

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

#[test]
fn fuzz_corpora_replay_without_panics() {
    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[("qos_spec", &sluice_qos::fuzz::spec)],
    );
}
