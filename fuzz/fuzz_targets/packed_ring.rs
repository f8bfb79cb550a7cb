//! Packed virtqueue (device side); the body and what it checks: `sluice_virtio::ring::fuzz`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_virtio::ring::fuzz::packed_ring(data));
