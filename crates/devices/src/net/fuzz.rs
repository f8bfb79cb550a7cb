//! The body of the `net_header` fuzz target (fuzz/fuzz_targets/net_header.rs is a thin wrapper),
//! here so that `cargo test` replays the committed corpus through it (tests/fuzz_corpus.rs).
//!
//! Each input is checked twice: whole, with every TX offload negotiated (the widest surface),
//! and with the offloads chosen by the first byte (bit 0 CSUM, bit 1 TSO4, bit 2 TSO6) over the
//! remaining bytes. Besides "never panics" it checks that negotiating fewer offloads never
//! accepts more, and that an accepted header is the input's with `num_buffers` cleared.

use super::header::{parse_tx_packet, NetHeader, TxOffloads};

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
