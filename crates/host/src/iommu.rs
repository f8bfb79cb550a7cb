//! Is there an IOMMU, is it on, does it remap interrupts?
//!
//! Evidence, strongest first:
//! - the kernel made IOMMU devices (`/sys/class/iommu/*`) and groups (`/sys/kernel/iommu_groups`):
//!   the IOMMU is enabled;
//! - the ACPI table the firmware gives (`DMAR` for Intel VT-d, `IVRS` for AMD-Vi, in
//!   `/sys/firmware/acpi/tables`): the hardware is there, enabled or not;
//! - the kernel command line (`intel_iommu=`, `amd_iommu=`, `iommu=`): what was asked for.
//!
//! Interrupt remapping: dmesg is not reliably readable (dmesg_restrict, a rotated ring), so the
//! kernel's interrupt chips in `/proc/interrupts` decide: remapped chips are named `IR-...`
//! (`IR-PCI-MSI`, `IR-IO-APIC`) once the kernel enabled remapping. VT-d's extended capability
//! register (`/sys/class/iommu/dmarN/intel-iommu/ecap`, bit 3 IR) says whether the hardware can,
//! and `allow_unsafe_interrupts` of vfio_iommu_type1 whether VFIO would accept a host without it.

use crate::{read_attr, HostRoot};

/// VT-d ECAP bit 3: Interrupt Remapping support.
const VTD_ECAP_IR: u64 = 1 << 3;

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IommuState {
    /// `DMAR` and/or `IVRS` when the firmware describes an IOMMU.
    pub acpi_tables: Vec<String>,
    /// `/sys/class/iommu` entries (`dmar0`, `ivhd0`, ...).
    pub units: Vec<String>,
    pub groups: usize,
    /// IOMMU options on the kernel command line.
    pub cmdline: Vec<String>,
    /// Interrupt chips in /proc/interrupts whose name starts with `IR-`.
    pub remapped_chips: Vec<String>,
    /// Whether every VT-d unit's ECAP has IR; `None` when there is no VT-d unit to ask.
    pub vtd_ecap_ir: Option<bool>,
    /// vfio_iommu_type1's allow_unsafe_interrupts; `None` when the module is not loaded.
    pub allow_unsafe_interrupts: Option<bool>,
}

impl IommuState {
    pub fn read(root: &HostRoot) -> IommuState {
        let acpi_tables = ["DMAR", "IVRS"]
            .into_iter()
            .filter(|t| root.sys(&format!("firmware/acpi/tables/{t}")).exists())
            .map(str::to_string)
            .collect();
        let mut units: Vec<String> = std::fs::read_dir(root.sys("class/iommu"))
            .map(|entries| {
                entries
                    .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        units.sort();
        let vtd_ecaps: Vec<bool> = units
            .iter()
            .filter_map(|unit| {
                read_attr(&root.sys(&format!("class/iommu/{unit}/intel-iommu/ecap")))
            })
            .filter_map(|ecap| u64::from_str_radix(ecap.trim_start_matches("0x"), 16).ok())
            .map(|ecap| ecap & VTD_ECAP_IR != 0)
            .collect();
        IommuState {
            acpi_tables,
            groups: crate::pci::group_count(root),
            cmdline: read_attr(&root.proc("cmdline"))
                .map(|line| iommu_options(&line))
                .unwrap_or_default(),
            remapped_chips: read_attr(&root.proc("interrupts"))
                .map(|text| remapped_chips(&text))
                .unwrap_or_default(),
            vtd_ecap_ir: (!vtd_ecaps.is_empty()).then(|| vtd_ecaps.iter().all(|&ir| ir)),
            allow_unsafe_interrupts: read_attr(
                &root.sys("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"),
            )
            .map(|v| v == "Y" || v == "1"),
            units,
        }
    }

    /// The kernel runs an IOMMU: it registered units and made groups.
    pub fn enabled(&self) -> bool {
        !self.units.is_empty() && self.groups > 0
    }

    pub fn interrupt_remapping(&self) -> bool {
        !self.remapped_chips.is_empty()
    }

    /// A command-line option that turns the IOMMU off or into passthrough-only mode.
    pub fn disabled_on_cmdline(&self) -> Option<&str> {
        self.cmdline
            .iter()
            .find(|o| {
                matches!(
                    o.as_str(),
                    "intel_iommu=off" | "amd_iommu=off" | "iommu=off" | "intremap=off"
                )
            })
            .map(String::as_str)
    }
}

/// The IOMMU-related options of a kernel command line.
fn iommu_options(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        // Everything after `--` is for init, not the kernel.
        .take_while(|word| *word != "--")
        .filter(|word| {
            [
                "intel_iommu=",
                "amd_iommu=",
                "iommu=",
                "iommu.",
                "intremap=",
            ]
            .iter()
            .any(|prefix| word.starts_with(prefix))
        })
        .map(str::to_string)
        .collect()
}

/// Chip names in /proc/interrupts that start with `IR-` (remapped), each once.
fn remapped_chips(interrupts: &str) -> Vec<String> {
    let mut chips: Vec<String> = interrupts
        .lines()
        .flat_map(str::split_whitespace)
        .filter(|word| word.starts_with("IR-"))
        .map(str::to_string)
        .collect();
    chips.sort();
    chips.dedup();
    chips
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeTree;

    const INTERRUPTS_IR: &str = "           CPU0\n  \
        0:         50  IR-IO-APIC    2-edge      timer\n \
        24:          0  DMAR-MSI    0-edge      dmar0\n \
        25:        120  IR-PCI-MSI 524288-edge      nvme0q0\n";

    #[test]
    fn a_vtd_host_with_remapping_is_enabled_and_remaps() {
        let tree = FakeTree::new();
        tree.write("sys/firmware/acpi/tables/DMAR", [0u8; 48]);
        tree.write("sys/class/iommu/dmar0/intel-iommu/ecap", "f00f4a\n");
        tree.write("sys/kernel/iommu_groups/0/devices/.keep", "");
        tree.write(
            "proc/cmdline",
            "console=ttyS0 intel_iommu=on -- iommu=off\n",
        );
        tree.write("proc/interrupts", INTERRUPTS_IR);

        let state = IommuState::read(&tree.root());

        assert_eq!(state.acpi_tables, ["DMAR"]);
        assert_eq!(state.units, ["dmar0"]);
        assert!(state.enabled());
        assert_eq!(state.cmdline, ["intel_iommu=on"]);
        assert_eq!(state.remapped_chips, ["IR-IO-APIC", "IR-PCI-MSI"]);
        assert!(state.interrupt_remapping());
        assert_eq!(state.vtd_ecap_ir, Some(true));
        assert_eq!(state.allow_unsafe_interrupts, None);
        assert_eq!(state.disabled_on_cmdline(), None);
    }

    #[test]
    fn a_host_without_iommu_has_nothing_enabled() {
        let tree = FakeTree::new();
        tree.write("sys/firmware/acpi/tables/APIC", [0u8; 48]);
        tree.write("proc/cmdline", "console=ttyS0 intel_iommu=off\n");
        tree.write("proc/interrupts", "  0: 50 IO-APIC 2-edge timer\n");
        tree.write(
            "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
            "N\n",
        );

        let state = IommuState::read(&tree.root());

        assert!(state.acpi_tables.is_empty());
        assert!(!state.enabled());
        assert!(!state.interrupt_remapping());
        assert_eq!(state.vtd_ecap_ir, None);
        assert_eq!(state.allow_unsafe_interrupts, Some(false));
        assert_eq!(state.disabled_on_cmdline(), Some("intel_iommu=off"));
    }

    #[test]
    fn vtd_without_ir_in_ecap_is_reported() {
        let tree = FakeTree::new();
        tree.write("sys/class/iommu/dmar0/intel-iommu/ecap", "f00f42\n");

        let state = IommuState::read(&tree.root());

        assert_eq!(state.vtd_ecap_ir, Some(false));
    }
}
