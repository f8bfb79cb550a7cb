//! virtio-pci modern transport: a byte script of BAR0 / PCI config space reads and writes
//! (format in `sluice_virtio::pci::fuzz`) against a fresh device over a null device model.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sluice_virtio::pci::fuzz::fuzz_register_script(data);
});
