//! `cargo test` replays the committed corpora of the `migration_stream` and `replay_log` fuzz
//! targets (see fuzz/corpus_replay.rs for the mechanism).

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

#[test]
fn fuzz_corpora_replay_without_panics() {
    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[
            (
                "migration_stream",
                &sluice_vmm::migration::fuzz::migration_stream,
            ),
            ("replay_log", &sluice_vmm::replay::fuzz::replay_log),
        ],
    );
}
