//! Fuzz body for the `vfio_config` target: the trap policy built from any config space a device
//! may present, then a script of guest config accesses.
//!
//! Input: `[image_len: u16 LE][image: image_len bytes (at most 4096; the rest of config space
//! reads zero)][ops]`, each op 8 bytes `[kind, offset lo, offset hi, width, value: u32 LE]`:
//! `kind & 1` writes, else reads; width `1 << (width % 3)` bytes; offset taken modulo 4096. BAR 0
//! is a 16 KiB 64-bit memory BAR.
//!
//! Must hold: no panic (a malformed capability list is an error, never a loop or an
//! out-of-bounds access); hidden bytes read zero; a guest write changes on the device only bytes
//! the policy passes through, and of the command register only the mirrored bits.

use std::sync::{Arc, Mutex, PoisonError};

use sluice_pci::{BarSpec, COMMAND, CONFIG_SPACE_SIZE, NUM_BARS};

use crate::policy::{Access, DeviceConfig, VirtualConfig};

struct Fake(Arc<Mutex<Vec<u8>>>);

impl DeviceConfig for Fake {
    fn read(&self, offset: usize, data: &mut [u8]) {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&self, offset: usize, data: &[u8]) {
        let mut bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let end = (offset + data.len()).min(bytes.len());
        if offset < end {
            bytes[offset..end].copy_from_slice(&data[..end - offset]);
        }
    }
}

/// The `vfio_config` target body.
pub fn config_policy(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_le_bytes(*len))
        .min(CONFIG_SPACE_SIZE)
        .min(rest.len());
    let (image, ops) = rest.split_at(len);
    let mut bytes = vec![0u8; CONFIG_SPACE_SIZE];
    bytes[..len].copy_from_slice(image);
    let device = Arc::new(Mutex::new(bytes));
    let mut bars = [None; NUM_BARS];
    bars[0] = Some(BarSpec::mem64(0x4000));
    let Ok(mut config) = VirtualConfig::build(Box::new(Fake(device.clone())), &bars) else {
        return;
    };
    for op in ops.chunks_exact(8) {
        let offset = usize::from(u16::from_le_bytes([op[1], op[2]])) % CONFIG_SPACE_SIZE;
        let width = 1usize << (op[3] % 3);
        let value = &op[4..4 + width];
        if op[0] & 1 == 0 {
            let mut out = vec![0u8; width];
            config.read(offset, &mut out);
            for (i, byte) in out.iter().enumerate() {
                let at = offset + i;
                if at < CONFIG_SPACE_SIZE && config.access_at(at) == Access::Hidden {
                    assert_eq!(*byte, 0, "hidden byte {at:#x} read non-zero");
                }
            }
            continue;
        }
        let before = device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        config.write(offset, value);
        let after = device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (at, (old, new)) in before.iter().zip(&after).enumerate() {
            if old == new {
                continue;
            }
            match config.access_at(at) {
                Access::Passthrough => {}
                Access::Mirrored { device_bits } => {
                    let mask = device_bits.to_le_bytes()[at - COMMAND];
                    assert_eq!(old & !mask, new & !mask, "unmirrored command bits changed");
                }
                other => panic!("write changed device byte {at:#x} under {other:?}"),
            }
        }
    }
}
