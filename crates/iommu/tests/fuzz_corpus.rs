//! `cargo test` replays the committed corpus of `vtd_registers` (see fuzz/corpus_replay.rs) and
//! checks that each seed reaches the point it was written for.

use std::path::Path;

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

#[test]
fn fuzz_corpora_replay_without_panics() {
    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[("vtd_registers", &sluice_iommu::fuzz::vtd_registers)],
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
