//! `cargo test` replays the committed corpus of the fuzz target whose body lives in this crate
//! (see fuzz/corpus_replay.rs), and checks the seeds parse to what they were written for.

use sluice_host::config_space::{ConfigSpace, PortType};

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

#[test]
fn fuzz_corpora_replay_without_panics() {
    corpus_replay::replay_owned(
        env!("CARGO_PKG_NAME"),
        &[("pci_config_space", &sluice_host::config_space::fuzz)],
    );
}

fn seed(name: &str) -> ConfigSpace {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus/pci_config_space")
        .join(name);
    ConfigSpace::new(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

#[test]
fn the_seeds_parse_to_what_they_were_written_for() {
    let root_port = seed("root_port_aer_acs");
    assert_eq!(root_port.port_type(), Some(PortType::RootPort));
    let acs = root_port.acs().expect("ACS after AER");
    assert_eq!(acs.enabled.describe(), "SV+ RR+ CR+ UF+");
    assert!(!acs.enabled.tb);

    assert_eq!(seed("non_root_64_bytes").acs(), None);
    assert_eq!(seed("endpoint_sriov").port_type(), Some(PortType::Endpoint));
    assert_eq!(seed("extended_loop").extended_capabilities().len(), 960);
    assert_eq!(seed("standard_loop").capabilities().len(), 48);
}
