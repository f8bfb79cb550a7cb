//! Replays the committed seeds of the `vhost_user_fds` fuzz target (fuzz/corpus/) through the
//! library function the target wraps, so that `cargo test` catches a regression the corpus
//! already knows how to reach — and checks that the seeds still reach what they were written
//! for.

use std::path::PathBuf;

use sluice_vhost::fuzz::{chains_served, run_frontend_script};
use sluice_vhost::ConnectionEnd;

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
        ("shrink_ram", true, false),
        ("shrink_inflight", true, false),
        ("saturated_call", false, false),
        ("remove_and_add_back", false, true),
        ("add_again_from_another_fd", false, true),
        ("kick_before_addr_no_protocol", false, true),
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
