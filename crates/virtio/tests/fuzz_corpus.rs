//! `cargo test` replays the committed corpora of the fuzz targets whose bodies live in this
//! crate (see fuzz/corpus_replay.rs for the mechanism and how to add a target).

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

#[test]
fn fuzz_corpora_replay_without_panics() {
    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[
            (
                "virtio_pci_registers",
                &sluice_virtio::pci::fuzz::fuzz_register_script,
            ),
            ("packed_ring", &sluice_virtio::ring::fuzz::packed_ring),
        ],
    );
}
