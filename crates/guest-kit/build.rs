//! Builds the guest kit (the freestanding kernel in `<repo>/guest`, its own cargo workspace) with
//! a nested `cargo build` and copies the ELF to `$OUT_DIR/sluice-guest.elf`, which `src/lib.rs`
//! embeds with `include_bytes!`.
//!
//! The nested cargo runs with a clean environment: the outer build's flags, wrappers, target dir,
//! jobserver and profile settings are for the host crates and would break (or silently change) a
//! `no_std` kernel build. If the guest does not build, this script fails and prints the nested
//! cargo's output; there is no fallback stub.
//!
//! `SLUICE_GUEST_KIT_ELF=<path>` embeds a prebuilt guest kit instead (e.g. one a CI step already
//! built); the script says so with a `cargo:warning` so it is never silent.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const GUEST_BINARY: &str = "sluice-guest";
const PREBUILT_ENV: &str = "SLUICE_GUEST_KIT_ELF";

/// Variables the outer cargo (or the user's shell) sets that must not reach the nested build.
const REMOVED_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_LINKER",
    "MAKEFLAGS",
    "MFLAGS",
    "OUT_DIR",
    "TARGET",
    "HOST",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
];

/// `CARGO_*` variables that are user configuration for reaching registries; everything else
/// starting with `CARGO_` (profile, build, target, encoded flags, package metadata) is removed.
const KEPT_CARGO_PREFIXES: &[&str] = &[
    "CARGO_HOME",
    "CARGO_NET_",
    "CARGO_HTTP_",
    "CARGO_REGISTRIES_",
];

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let embedded = out_dir.join("sluice-guest.elf");
    println!("cargo:rerun-if-env-changed={PREBUILT_ENV}");

    if let Some(prebuilt) = env::var_os(PREBUILT_ENV) {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        println!(
            "cargo:warning=embedding prebuilt guest kit from {PREBUILT_ENV}={}",
            prebuilt.display()
        );
        copy_elf(&prebuilt, &embedded);
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let guest_dir = manifest_dir.join("../../guest");
    let guest_manifest = guest_dir.join("Cargo.toml");
    emit_rerun_for_guest(&guest_dir);
    if !guest_manifest.is_file() {
        fail(&format!(
            "guest kit sources not found: {} does not exist. The guest kernel lives in \
             <repo>/guest (its own cargo workspace); it is built and embedded by this script. \
             To embed a prebuilt guest kit instead, set {PREBUILT_ENV}=<path to ELF>.",
            guest_manifest.display()
        ));
    }

    let guest_target_dir = out_dir.join("guest-target");
    build_guest(&guest_dir, &guest_manifest, &guest_target_dir);
    let built = guest_target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BINARY);
    copy_elf(&built, &embedded);
}

/// Reruns this script when anything in the guest workspace changes. Each top-level entry except
/// build output is listed (cargo scans listed directories recursively), so new modules, the
/// linker script and `.cargo/config.toml` are covered wherever the guest puts them.
fn emit_rerun_for_guest(guest_dir: &Path) {
    println!("cargo:rerun-if-changed={}", guest_dir.display());
    let Ok(entries) = fs::read_dir(guest_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}

fn build_guest(guest_dir: &Path, guest_manifest: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(guest_dir)
        .args(["build", "--release", "--manifest-path"])
        .arg(guest_manifest)
        .args(["--target", GUEST_TARGET, "--target-dir"])
        .arg(target_dir);
    clean_environment(&mut command);

    let output = match command.output() {
        Ok(output) => output,
        Err(error) => fail(&format!(
            "could not run the nested cargo for the guest kit: {error}"
        )),
    };
    if !output.status.success() {
        fail(&format!(
            "building the guest kit failed ({}).\n--- nested cargo stderr ---\n{}\n--- nested cargo stdout ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        ));
    }
}

fn clean_environment(command: &mut Command) {
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let cargo_owned = name.starts_with("CARGO_")
            && !KEPT_CARGO_PREFIXES
                .iter()
                .any(|kept| name.starts_with(kept));
        if cargo_owned || REMOVED_VARS.contains(&name) {
            command.env_remove(name);
        }
    }
}

fn copy_elf(from: &Path, to: &Path) {
    let bytes = match fs::read(from) {
        Ok(bytes) => bytes,
        Err(error) => fail(&format!(
            "cannot read guest kit ELF {}: {error}",
            from.display()
        )),
    };
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        fail(&format!("{} is not an ELF file", from.display()));
    }
    if let Err(error) = fs::write(to, bytes) {
        fail(&format!("cannot write {}: {error}", to.display()));
    }
}

fn fail(message: &str) -> ! {
    // cargo shows a failing build script's stderr; a panic would add a backtrace hint only.
    eprintln!("error: {message}");
    std::process::exit(1);
}
