//! `cargo test` replays the committed corpora of `vtd_registers` and `virtio_iommu_request` (see fuzz/corpus_replay.rs) and
//! checks that each seed reaches the point it was written for.

use std::path::Path;

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

#[test]
fn fuzz_corpora_replay_without_panics() {
    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[
            ("vtd_registers", &sluice_iommu::fuzz::vtd_registers),
            (
                "virtio_iommu_request",
                &sluice_iommu::fuzz::virtio_iommu_request,
            ),
        ],
    );
}

#[test]
fn vtd_seeds_reach_their_point() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/vtd_registers");
    let outcomes = |name: &str| {
        let input = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        sluice_iommu::fuzz::run_script(&input)
    };

    assert_eq!(outcomes("translation_off_dma"), [true, true]);
    assert_eq!(
        outcomes("four_level_tables"),
        [true, true, false],
        "unmapped 0x9000"
    );
    assert_eq!(outcomes("three_level_2m_page"), [true, true]);
    assert_eq!(outcomes("invalidation_queue"), [true, true]);
    assert_eq!(outcomes("register_invalidation"), [true, true]);
    assert_eq!(
        outcomes("interrupt_remapping"),
        [true, false, false, false],
        "remapped; SID fault, index beyond the table, compatibility format blocked"
    );
    assert_eq!(
        outcomes("ioapic_entries"),
        [true, false, false],
        "IOAPIC entry remapped; an IRTE of another source, a blocked compatibility entry"
    );
}

#[test]
fn virtio_iommu_seeds_get_the_statuses_they_were_written_for() {
    use sluice_iommu::virtio::request::Status::{Inval, NoEnt, Ok, Range, Unsupp};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/virtio_iommu_request");
    let statuses = |name: &str| {
        let input = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        sluice_iommu::fuzz::run_requests(&input)
    };

    assert_eq!(statuses("attach_map_unmap_detach"), [Ok, Ok, Ok, Ok]);
    assert_eq!(
        statuses("split_unmap_and_overlap"),
        [Ok, Ok, Ok, Inval, Range, Ok]
    );
    assert_eq!(statuses("probe_and_bypass_domain"), [Ok, Ok, Inval, Inval]);
    assert_eq!(
        statuses("bad_requests"),
        [Inval, Unsupp, Inval, NoEnt, Range, Unsupp]
    );
    // Moving BLK to domain 3 left domain 1 empty, so it was destroyed.
    assert_eq!(
        statuses("move_between_domains"),
        [Ok, Ok, Ok, Ok, NoEnt, Ok]
    );
}
