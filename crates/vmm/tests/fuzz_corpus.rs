//! `cargo test` replays the committed corpus of the `migration_stream` fuzz target (see
//! fuzz/corpus_replay.rs for the mechanism).

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

#[test]
fn fuzz_corpora_replay_without_panics() {
    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[(
            "migration_stream",
            &sluice_vmm::migration::fuzz::migration_stream,
        )],
    );
}
