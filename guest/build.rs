//! Links the guest kit as a freestanding static ELF at 1 MiB with its own linker script.

fn main() {
    // Under kvm_pvm the guest runs in KVM's instruction emulator, which cannot execute SSE
    // arithmetic; .cargo/config.toml turns SSE off. Building without it gives a kernel that
    // passes under TCG and dies under KVM, so refuse.
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    if features.split(',').any(|f| f == "sse" || f == "sse2") {
        panic!(
            "sluice-guest must be built without SSE: run cargo from guest/ (so guest/.cargo/config.toml \
             applies) or set RUSTFLAGS as in that file"
        );
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
        "-Wl,-z,max-page-size=4096",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/linker.ld");
}
