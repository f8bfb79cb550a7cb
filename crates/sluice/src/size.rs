//! Parsing of human-friendly sizes on the command line.

use sluice_vmm::memory::MIN_RAM_SIZE;

const MIB: u64 = 1 << 20;

/// Parses `128M`, `2G`, `512` (MiB) or `1048576K` into bytes.
pub fn parse_memory_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "M"),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 128M or 2G"))?;
    let scale = match unit.to_ascii_uppercase().as_str() {
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => MIB,
        "G" | "GIB" => 1 << 30,
        _ => return Err(format!("unknown size unit `{unit}` (use K, M or G)")),
    };
    let bytes = value
        .checked_mul(scale)
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| format!("`{s}` is out of range"))?;
    // Said here, in the user's units: below a MiB the VM's own check would print "0 MiB".
    if bytes < MIN_RAM_SIZE {
        return Err(format!(
            "`{s}` is too small: a VM needs at least {} MiB",
            MIN_RAM_SIZE / MIB
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_bare_mib() {
        assert_eq!(parse_memory_size("128M"), Ok(128 * MIB));
        assert_eq!(parse_memory_size("2g"), Ok(2 << 30));
        assert_eq!(parse_memory_size("512"), Ok(512 * MIB));
        assert_eq!(parse_memory_size("16384K"), Ok(16 * MIB));
    }

    #[test]
    fn rejects_garbage_zero_and_overflow() {
        assert!(parse_memory_size("lots").is_err());
        assert!(parse_memory_size("12X").is_err());
        assert!(parse_memory_size("0").is_err());
        assert!(parse_memory_size("99999999999999999G").is_err());
    }

    /// Defect 13: `--memory 1K` was accepted here and then reported as "0 MiB"; sizes below
    /// the VM's minimum are refused with the size as the user wrote it.
    #[test]
    fn refuses_sizes_below_the_minimum_in_the_users_units() {
        for (input, shown) in [("1K", "1K"), ("1023K", "1023K"), ("15M", "15M")] {
            let err = parse_memory_size(input).expect_err(input);

            assert!(
                err.contains(shown) && err.contains("16 MiB"),
                "{input}: {err}"
            );
            assert!(!err.contains("0 MiB"), "{input}: {err}");
        }
        assert_eq!(parse_memory_size("16M"), Ok(16 * MIB));
    }
}
