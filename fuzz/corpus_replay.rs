//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/*`) through the targets' bodies as
//! ordinary `cargo test` tests, so every seed, and every crash input added after a fix, stays a
//! regression test without cargo-fuzz or libFuzzer.
//!
//! Not a crate: one integration test of each crate that owns a target body includes this file
//! (`#[path = "../../../fuzz/corpus_replay.rs"] mod corpus_replay;`) and calls [`replay_owned`]
//! with every body it owns. [`TARGETS`] is the one list of targets; a test fails when the list,
//! the `fuzz_targets/*.rs` files, the corpus directories and the bodies registered by the owning
//! crate disagree, so a new target cannot be left out of the replay.
//!
//! Adding a target: write its body as a `pub fn(&[u8])` in the owning crate, make
//! `fuzz/fuzz_targets/<name>.rs` a thin wrapper over it, commit seeds in `fuzz/corpus/<name>/`,
//! add `(<name>, <owning crate>)` to [`TARGETS`] and `(<name>, &body)` to that crate's
//! `tests/fuzz_corpus.rs`.

use std::collections::BTreeSet;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Every fuzz target and the package whose tests replay its corpus.
pub const TARGETS: &[(&str, &str)] = &[
    ("blk_request", "sluice-devices"),
    ("blk_trace", "sluice-devices"),
    ("nvme_trace", "sluice-devices"),
    ("net_header", "sluice-devices"),
    ("net_state", "sluice-devices"),
    ("e1000_state", "sluice-devices"),
    ("virtio_pci_registers", "sluice-virtio"),
    ("packed_ring", "sluice-virtio"),
    ("vhost_user_messages", "sluice-vhost"),
    ("vhost_user_fds", "sluice-vhost"),
    ("vhost_iotlb", "sluice-vhost"),
    ("vhost_user_backend_replies", "sluice-devices"),
    ("e1000_tx", "sluice-devices"),
    ("e1000_registers", "sluice-devices"),
    ("vtd_registers", "sluice-iommu"),
    ("virtio_iommu_request", "sluice-iommu"),
    ("nvme_command", "sluice-devices"),
    ("nvme_registers", "sluice-devices"),
    ("pci_config_space", "sluice-host"),
    ("vfio_config", "sluice-vfio"),
    ("api_request", "sluice-api"),
    ("qos_spec", "sluice-qos"),
    ("migration_stream", "sluice-vmm"),
    ("replay_log", "sluice-vmm"),
    ("tpm_crb", "sluice-devices"),
    ("tpm_state", "sluice-devices"),
];

/// A target body: what `fuzz_target!` runs on one input.
pub type Body<'a> = &'a dyn Fn(&[u8]);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// File stems (or directory names) in `dir`.
fn names_in(dir: &Path, extension: Option<&str>) -> BTreeSet<String> {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| extension.is_none_or(|ext| path.extension().is_some_and(|e| e == ext)))
        .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The files of `target`'s corpus, sorted (at least one: a replay of nothing proves nothing).
fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus of {target} ({}): {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    files
}

/// Fails unless [`TARGETS`], `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*` name the same targets.
fn check_layout() {
    let listed: BTreeSet<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    let sources = names_in(&fuzz_dir().join("fuzz_targets"), Some("rs"));
    let corpora = names_in(&fuzz_dir().join("corpus"), None);
    assert_eq!(listed, sources, "TARGETS vs fuzz/fuzz_targets/*.rs");
    assert_eq!(listed, corpora, "TARGETS vs fuzz/corpus/*");
}

/// Runs each of `bodies` (the targets `package` owns, by name) on every file of its corpus and
/// fails, naming the files, if any input panics.
pub fn replay_owned(package: &str, bodies: &[(&str, Body<'_>)]) {
    check_layout();
    let owned: BTreeSet<&str> = TARGETS
        .iter()
        .filter(|(_, owner)| *owner == package)
        .map(|(name, _)| *name)
        .collect();
    let registered: BTreeSet<&str> = bodies.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        registered, owned,
        "bodies registered vs TARGETS owned by {package}"
    );

    let mut failures = Vec::new();
    for (target, body) in bodies {
        for file in corpus_files(target) {
            let input = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if catch_unwind(AssertUnwindSafe(|| body(&input))).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "inputs that panicked: {failures:#?}");
}
