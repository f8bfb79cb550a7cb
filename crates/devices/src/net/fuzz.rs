//! The bodies of the `net_header` and `net_state` fuzz targets (fuzz/fuzz_targets/ has thin
//! wrappers), here so that `cargo test` replays the committed corpora through them
//! (tests/fuzz_corpus.rs).
//!
//! `net_state`: the model's saved state as a snapshot file or a migration peer hands it over
//! (JSON, [`super::SavedNet`]), restored into a two-pair device; an accepted state must save
//! back the same, and the device must then start every queue (its RX handlers taking the
//! carried frames) without panicking.
//!
//! `net_header`:
//! Each input is checked twice: whole, with every TX offload negotiated (the widest surface),
//! and with the offloads chosen by the first byte (bit 0 CSUM, bit 1 TSO4, bit 2 TSO6) over the
//! remaining bytes. Besides "never panics" it checks that negotiating fewer offloads never
//! accepts more, and that an accepted header is the input's with `num_buffers` cleared.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use sluice_virtio::VirtioDevice;

use super::header::{parse_tx_packet, NetHeader, TxOffloads};
use super::{Net, NetBackend, NetConfig, SavedNet};

/// A link with nothing to receive that swallows what is sent.
struct NullLink;

impl NetBackend for NullLink {
    fn read_packet(&self, _pair: usize, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }
    fn write_packet(&self, _pair: usize, _packet: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn queue_fd(&self, _pair: usize) -> Option<RawFd> {
        None
    }
    fn set_active_pairs(&self, _pairs: u16) -> io::Result<()> {
        Ok(())
    }
    fn set_offload(&self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// Restores `data` as a saved virtio-net state; panics if an accepted one breaks the checks
/// in the module documentation.
pub fn net_state(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let config = NetConfig {
        announce: true,
        ..NetConfig::new([0x52, 0x54, 0, 0, 0, 1])
    };
    let mut device = Net::with_backend(Arc::new(NullLink), 2, config);
    if device.restore_state(&value).is_err() {
        return;
    }
    let mut accepted = SavedNet::deserialize_from(&value).expect("an accepted state parses");
    // Frames are kept per pair, in order.
    accepted.rx_frames.sort_by_key(|(pair, _)| *pair);
    let saved = device.save_state().expect("saves").expect("has state");
    assert_eq!(
        SavedNet::deserialize_from(&saved).expect("saved state parses"),
        accepted,
        "an accepted state saves back unchanged"
    );
    device
        .ack_features(device.device_features())
        .expect("acks its own features");
    let handlers: Vec<_> = (0..5)
        .map(|index| {
            device
                .queue_handler(index, 16)
                .expect("every queue has a handler")
        })
        .collect();
    drop(handlers);
    device.reset();
}

/// Validates `data` as TX packets and panics if a result breaks an invariant above.
pub fn net_header(data: &[u8]) {
    check(data, TxOffloads::ALL);
    if let Some((&selector, packet)) = data.split_first() {
        let offloads = TxOffloads {
            csum: selector & 1 != 0,
            tso4: selector & 2 != 0,
            tso6: selector & 4 != 0,
        };
        check(packet, offloads);
    }
}

fn check(packet: &[u8], offloads: TxOffloads) {
    let Ok(header) = parse_tx_packet(packet, offloads) else {
        return;
    };
    let raw = NetHeader::from_bytes(packet).expect("accepted packet has a header");
    assert_eq!(
        header,
        NetHeader {
            num_buffers: 0,
            ..raw
        }
    );
    assert_eq!(NetHeader::from_bytes(&header.to_bytes()), Some(header));
    assert!(
        parse_tx_packet(packet, TxOffloads::ALL).is_ok(),
        "accepted with {offloads:?} but refused with every offload"
    );
}
