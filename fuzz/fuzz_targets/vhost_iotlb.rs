//! vhost-user IOTLB messages (update, invalidate, anything else) and the lookups queues and
//! rings make; the body and what it checks: `sluice_vhost::fuzz::vhost_iotlb`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_vhost::fuzz::vhost_iotlb(data));
