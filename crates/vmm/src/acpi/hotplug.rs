//! The AML of ACPI PCI hot-plug, in the shape Linux's `acpiphp` drives (see
//! `crate::hotplug` for the host side and why this mechanism):
//!
//! ```text
//! \_SB_.PCI0.PCST   OperationRegion (SystemIO, layout::HOTPLUG_PORT, 16)
//!                   Field { PCIU, 32  PCID, 32  PCEJ, 32  PCPR, 32 }  (hotplug::registers)
//! \_SB_.PCI0.Sxx_   one Device per slot 1..=31: _ADR (slot << 16), _SUN (slot),
//!                   _EJ0 (writes 1 << slot to PCEJ: the host removes the device)
//! \_SB_.PCI0.PCNT   reads PCIU then PCID; Notify (Sxx_, 1) (device check) for each inserted
//!                   slot, Notify (Sxx_, 3) (eject request) for each slot to eject
//! \_SB_.GED_        ACPI0013 Generic Event Device on layout::HOTPLUG_GED_IRQ (edge, high);
//!                   _EVT calls PCNT
//! ```
//!
//! Slots have no `_STA`: acpiphp then checks presence by reading the slot's vendor id, which
//! is what the PCI root answers for a filled or an empty slot.

use acpi_tables::aml::{
    And, Device, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local,
    Method, MethodCall, Name, Notify, OpRegion, OpRegionSpace, Path, ResourceTemplate, Store, Zero,
};
use acpi_tables::Aml;

use crate::layout;

/// Slots with a hot-plug device object: all of bus 0 but the host bridge.
pub const HOTPLUG_SLOTS: std::ops::RangeInclusive<u8> = 1..=31;
/// ACPI notification values (ACPI 6.5 §5.6.6).
const NOTIFY_DEVICE_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;

/// `Sxx_`: the slot's device object name (hex slot number).
pub fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// The children of `\_SB_.PCI0` that hot-plug adds: the register region, its fields, one
/// device per slot and the notify method.
pub fn pci_root_children() -> Vec<u8> {
    let mut aml = Vec::new();
    let port = u32::from(layout::HOTPLUG_PORT);
    let len = layout::HOTPLUG_LEN as u32;
    OpRegion::new(Path::new("PCST"), OpRegionSpace::SystemIO, &port, &len).to_aml_bytes(&mut aml);
    acpi_tables::aml::Field::new(
        Path::new("PCST"),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"PCEJ", 32),
            FieldEntry::Named(*b"PCPR", 32),
        ],
    )
    .to_aml_bytes(&mut aml);
    for slot in HOTPLUG_SLOTS {
        aml.extend_from_slice(&slot_device(slot));
    }
    aml.extend_from_slice(&notify_method());
    aml
}

/// `Device (Sxx_) { _ADR, _SUN, _EJ0 }`.
fn slot_device(slot: u8) -> Vec<u8> {
    let address = u32::from(slot) << 16;
    let sun = u32::from(slot);
    let bit = 1u32 << slot;
    let eject_register = Path::new("\\_SB_.PCI0.PCEJ");
    let store = Store::new(&eject_register, &bit);
    let eject = Method::new(Path::new("_EJ0"), 1, false, vec![&store]);
    let mut aml = Vec::new();
    Device::new(
        Path::new(&slot_name(slot)),
        vec![
            &Name::new(Path::new("_ADR"), &address),
            &Name::new(Path::new("_SUN"), &sun),
            &eject,
        ],
    )
    .to_aml_bytes(&mut aml);
    aml
}

/// `Method (PCNT)`: one `If` per slot and event, so no AML loop walks guest-visible state.
fn notify_method() -> Vec<u8> {
    let inserted = Local(0);
    let to_eject = Local(1);
    let (pciu, pcid) = (Path::new("PCIU"), Path::new("PCID"));
    let read_inserted = Store::new(&inserted, &pciu);
    let read_to_eject = Store::new(&to_eject, &pcid);
    let slots: Vec<(Path, u32)> = HOTPLUG_SLOTS
        .map(|slot| (Path::new(&slot_name(slot)), 1u32 << slot))
        .collect();
    let device_check = NOTIFY_DEVICE_CHECK;
    let eject_request = NOTIFY_EJECT_REQUEST;
    let tests: Vec<(And<'_>, Notify<'_>, And<'_>, Notify<'_>)> = slots
        .iter()
        .map(|(path, bit)| {
            (
                And::new(&Zero {}, &inserted, bit),
                Notify::new(path, &device_check),
                And::new(&Zero {}, &to_eject, bit),
                Notify::new(path, &eject_request),
            )
        })
        .collect();
    let ifs: Vec<If<'_>> = tests
        .iter()
        .flat_map(|(plugged, check, eject, request)| {
            [If::new(plugged, vec![check]), If::new(eject, vec![request])]
        })
        .collect();
    let mut body: Vec<&dyn Aml> = vec![&read_inserted, &read_to_eject];
    body.extend(ifs.iter().map(|i| i as &dyn Aml));
    let mut aml = Vec::new();
    Method::new(Path::new("PCNT"), 0, true, body).to_aml_bytes(&mut aml);
    aml
}

/// `\_SB_.GED_`: the Generic Event Device whose interrupt announces hot-plug events.
pub fn generic_event_device() -> Vec<u8> {
    // Consumer, edge-triggered, active high, exclusive: an irqfd pulse on an ISA pin.
    let irq = Interrupt::new(true, true, false, false, layout::HOTPLUG_GED_IRQ);
    let resources = ResourceTemplate::new(vec![&irq]);
    let notify = MethodCall::new(Path::new("\\_SB_.PCI0.PCNT"), vec![]);
    let event = Method::new(Path::new("_EVT"), 1, true, vec![&notify]);
    let mut aml = Vec::new();
    Device::new(
        Path::new("GED_"),
        vec![
            &Name::new(Path::new("_HID"), &"ACPI0013"),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_CRS"), &resources),
            &event,
        ],
    )
    .to_aml_bytes(&mut aml);
    aml
}
