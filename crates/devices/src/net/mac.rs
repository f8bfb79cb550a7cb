//! The one parser of a NIC's MAC address, shared by `sluice run --net mac=` (crates/vmm) and
//! `sluice serve net --mac` (crates/sluice).

/// `xx:xx:xx:xx:xx:xx` (each byte one or two hex digits), unicast. The error says what is wrong,
/// without repeating the input: callers name the option it came from.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bytes = text
        .split(':')
        .map(|byte| match byte.len() {
            1 | 2 if byte.bytes().all(|b| b.is_ascii_hexdigit()) => {
                u8::from_str_radix(byte, 16).ok()
            }
            _ => None,
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or("expected xx:xx:xx:xx:xx:xx")?;
    let mac: [u8; 6] = bytes
        .try_into()
        .map_err(|_| "expected six bytes".to_string())?;
    if mac[0] & 1 != 0 {
        return Err("a multicast address cannot be a NIC's address".into());
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn parses_a_unicast_mac() {
        let mac = parse_mac("52:54:00:ab:cd:0e");

        assert_eq!(mac, Ok([0x52, 0x54, 0x00, 0xab, 0xcd, 0x0e]));
    }

    #[test]
    fn refuses_malformed_and_multicast_macs() {
        for text in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0e:ff",
            "52:54:00:ab:cd:xyz",
            "+52:54:00:ab:cd:0e",
            "052:54:00:ab:cd:0e",
            "52:54:00:ab:cd:",
            "",
            "01:00:5e:00:00:01",
        ] {
            let mac = parse_mac(text);

            assert!(mac.is_err(), "{text:?} parsed as {mac:?}");
        }
    }
}
