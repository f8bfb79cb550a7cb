//! The operator's SR-IOV actions: `sluice vf create|reset|quarantine`. Each writes sysfs files
//! the kernel documents (Documentation/ABI/testing/sysfs-bus-pci) and returns what it did in
//! lines to print; vendor steps that sysfs cannot do (NVMe's secondary controller resources)
//! are printed, not hidden.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::config_space::{COMMAND_BUS_MASTER, COMMAND_OFFSET};
use crate::pci::{Bdf, PciFunction};
use crate::{io_error, HostError, HostRoot};

/// What `driver_override` is set to by a quarantine: a name no driver has, so no driver binds
/// the function until an operator clears it.
pub const QUARANTINE_DRIVER: &str = "sluice-quarantine";

fn write_attr(path: &Path, value: &str) -> Result<(), HostError> {
    // Sysfs attributes take one write(2) of the whole value; O_TRUNC is ignored there and makes
    // the fake trees of the tests behave the same.
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io_error("open", path))?;
    file.write_all(value.as_bytes())
        .map_err(io_error("write", path))
}

/// `sluice vf create --pf BDF --count N`: checks the PF and writes `sriov_numvfs`.
pub fn create(root: &HostRoot, pf: Bdf, count: u32) -> Result<Vec<String>, HostError> {
    let function = PciFunction::open(root, pf)?;
    let total = function.sriov_totalvfs().ok_or_else(|| {
        HostError::Refused(format!(
            "{pf} ({}) has no SR-IOV capability (no sriov_totalvfs); is it a VF or a plain function?",
            function.id()
        ))
    })?;
    if count == 0 || count > total {
        return Err(HostError::Refused(format!(
            "{pf} offers 1 to {total} VFs (sriov_totalvfs), not {count}"
        )));
    }
    let current = function.sriov_numvfs().unwrap_or(0);
    if current != 0 {
        return Err(HostError::Refused(format!(
            "{pf} already has {current} VFs; the kernel changes the count only from 0: \
             echo 0 > /sys/bus/pci/devices/{pf}/sriov_numvfs first (this removes them)"
        )));
    }
    let mut lines = Vec::new();
    let nvme = function.is_nvme().then(|| nvme_controller(&function));
    if let Some(controller) = &nvme {
        lines.extend(nvme_steps_before(pf, controller));
    }
    write_attr(&function.dir.join("sriov_numvfs"), &count.to_string())?;
    let made = function.sriov_numvfs().unwrap_or(0);
    lines.push(format!(
        "{pf}: sriov_numvfs {made} of {total}; VFs: {}",
        vfs(&function)
            .iter()
            .map(Bdf::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    if let Some(controller) = &nvme {
        lines.extend(nvme_steps_after(controller, count));
    }
    Ok(lines)
}

/// The PF's `/dev/nvmeN`, from `BDF/nvme/nvmeN`; a placeholder when the nvme driver does not
/// hold it.
fn nvme_controller(function: &PciFunction) -> String {
    std::fs::read_dir(function.dir.join("nvme"))
        .ok()
        .and_then(|mut entries| entries.next())
        .and_then(|e| e.ok())
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .unwrap_or_else(|| "/dev/nvmeX (bind the PF to the nvme driver first)".to_string())
}

/// NVMe 1.4 Virtualization Enhancements: VFs are secondary controllers that stay offline until
/// the primary gives them queue (VQ) and interrupt (VI) resources; that is an admin command, so
/// nvme-cli's, not sysfs's.
fn nvme_steps_before(pf: Bdf, controller: &str) -> Vec<String> {
    vec![
        "NVMe PF: each VF is a secondary controller, offline until it gets resources (nvme-cli virt-mgmt).".to_string(),
        "  before (once; frees the primary's flexible resources, takes effect at the PF's reset):".to_string(),
        format!("    nvme primary-ctrl-caps {controller}     # vqfrt/vifrt: flexible resources to share"),
        format!("    nvme virt-mgmt {controller} -c 0 -r 1 -a 1 -n 0   # primary flexible VI = 0"),
        format!("    nvme virt-mgmt {controller} -c 0 -r 0 -a 1 -n 0   # primary flexible VQ = 0"),
        format!("    echo 1 > /sys/bus/pci/devices/{pf}/reset"),
        format!("    echo 0 > /sys/bus/pci/devices/{pf}/sriov_drivers_autoprobe   # do not probe offline VFs"),
    ]
}

fn nvme_steps_after(controller: &str, count: u32) -> Vec<String> {
    let mut lines = vec![format!(
        "  after (per VF; `nvme list-secondary {controller}` maps VF n to its controller id SCID, 1..{count} here):"
    )];
    for scid in 1..=count {
        lines.push(format!(
            "    nvme virt-mgmt {controller} -c {scid} -r 1 -a 8 -n 1   # assign 1 VI"
        ));
        lines.push(format!("    nvme virt-mgmt {controller} -c {scid} -r 0 -a 8 -n 2   # assign 2 VQ (admin + 1 I/O)"));
        lines.push(format!(
            "    nvme virt-mgmt {controller} -c {scid} -r 0 -a 9 -n 0   # online"
        ));
    }
    lines
}

/// The VFs of a PF (`virtfnN` links), in VF order.
pub fn vfs(function: &PciFunction) -> Vec<Bdf> {
    let mut numbered: Vec<(u32, Bdf)> = std::fs::read_dir(&function.dir)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let e = e.ok()?;
                    let index = e
                        .file_name()
                        .to_string_lossy()
                        .strip_prefix("virtfn")?
                        .parse()
                        .ok()?;
                    let target = crate::link_name(&e.path())?;
                    Some((index, Bdf::parse(&target).ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    numbered.sort();
    numbered.into_iter().map(|(_, bdf)| bdf).collect()
}

/// `sluice vf reset BDF`: the kernel's function reset (`reset`), by the first of its
/// `reset_method`s that works.
pub fn reset(root: &HostRoot, bdf: Bdf) -> Result<Vec<String>, HostError> {
    let function = PciFunction::open(root, bdf)?;
    let methods = function.reset_methods();
    if !function.has_reset() {
        return Err(HostError::Refused(format!(
            "the kernel has no reset method for {bdf} (no reset file): quarantine it instead \
             (sluice vf quarantine {bdf})"
        )));
    }
    write_attr(&function.dir.join("reset"), "1")?;
    Ok(vec![format!(
        "{bdf}: reset by the kernel; reset_method: {} (tried in that order)",
        if methods.is_empty() {
            "unknown (kernel without reset_method)".to_string()
        } else {
            methods.join(" ")
        }
    )])
}

/// `sluice vf quarantine BDF`: unbind the function from its driver, clear Bus Master so it
/// cannot DMA, and set `driver_override` so that no driver binds it again.
pub fn quarantine(root: &HostRoot, bdf: Bdf) -> Result<Vec<String>, HostError> {
    let function = PciFunction::open(root, bdf)?;
    let mut lines = Vec::new();
    // driver_override first: an unbind would otherwise let a probe bind it again at once.
    write_attr(&function.dir.join("driver_override"), QUARANTINE_DRIVER)?;
    // Read before the unbind: a driver's remove usually clears Bus Master itself (the report
    // shows what the device had while it was driven).
    let driven = function.config().command();
    // Unbind first, then clear: the driver's shutdown may still need the device's DMA (an
    // NVMe controller completes its delete-queue commands by DMA).
    match function.driver() {
        Some(driver) => {
            write_attr(&function.dir.join("driver/unbind"), &bdf.to_string())?;
            lines.push(format!("{bdf}: unbound from {driver}"));
        }
        None => lines.push(format!("{bdf}: no driver was bound")),
    }
    let (unbound, after) = clear_bus_master(&function.dir.join("config"))?;
    let before = driven.unwrap_or(unbound);
    lines.push(format!(
        "{bdf}: command register {before:#06x} -> {after:#06x} (Bus Master {})",
        if after & COMMAND_BUS_MASTER == 0 {
            "off"
        } else {
            "STILL ON"
        }
    ));
    lines.push(format!(
        "{bdf}: driver_override={} (nothing binds it; release with: echo > /sys/bus/pci/devices/{bdf}/driver_override)",
        function.driver_override().unwrap_or_default()
    ));
    if after & COMMAND_BUS_MASTER != 0 {
        return Err(HostError::Refused(format!(
            "{bdf}: Bus Master is still set after clearing it ({after:#06x})\n{}",
            lines.join("\n")
        )));
    }
    Ok(lines)
}

/// Clears Bus Master Enable in the command register through the config file; returns the
/// register before and after (read back).
fn clear_bus_master(config: &Path) -> Result<(u16, u16), HostError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(config)
        .map_err(io_error("open", config))?;
    let read = |file: &std::fs::File| -> Result<u16, HostError> {
        let mut word = [0u8; 2];
        file.read_exact_at(&mut word, COMMAND_OFFSET)
            .map_err(io_error("read the command register of", config))?;
        Ok(u16::from_le_bytes(word))
    };
    let before = read(&file)?;
    let cleared = before & !COMMAND_BUS_MASTER;
    // A 2-byte write at the register's offset: the kernel turns it into one config word write.
    file.write_all_at(&cleared.to_le_bytes(), COMMAND_OFFSET)
        .map_err(io_error("write the command register of", config))?;
    Ok((before, read(&file)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_space::tests::config_with;
    use crate::fake::FakeTree;

    const PF_DIR: &str = "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0";

    fn sriov_pf(numvfs: u32) -> FakeTree {
        let tree = FakeTree::new();
        tree.pci_function(
            "pci0000:00/0000:00:01.0/0000:01:00.0",
            &config_with(0, &[]),
            Some("nvme"),
            Some(5),
        );
        tree.write(&format!("{PF_DIR}/sriov_totalvfs"), "2\n");
        tree.write(&format!("{PF_DIR}/sriov_numvfs"), format!("{numvfs}\n"));
        tree.write(&format!("{PF_DIR}/nvme/nvme0/dev"), "259:0\n");
        tree
    }

    fn pf() -> Bdf {
        Bdf::parse("01:00.0").unwrap()
    }

    #[test]
    fn create_writes_the_count_and_prints_the_nvme_steps() {
        let tree = sriov_pf(0);

        let lines = create(&tree.root(), pf(), 2).unwrap();

        assert_eq!(tree.read(&format!("{PF_DIR}/sriov_numvfs")), "2");
        let text = lines.join("\n");
        assert!(
            text.contains("nvme virt-mgmt /dev/nvme0 -c 0 -r 1 -a 1 -n 0"),
            "{text}"
        );
        assert!(
            text.contains("nvme virt-mgmt /dev/nvme0 -c 2 -r 0 -a 9 -n 0"),
            "{text}"
        );
        assert!(text.contains("sriov_numvfs 2 of 2"), "{text}");
    }

    #[test]
    fn create_refuses_too_many_vfs_and_a_pf_that_has_some() {
        let tree = sriov_pf(0);
        let too_many = create(&tree.root(), pf(), 3).unwrap_err().to_string();
        assert!(too_many.contains("1 to 2 VFs"), "{too_many}");
        assert_eq!(tree.read(&format!("{PF_DIR}/sriov_numvfs")), "0\n");

        let busy = sriov_pf(1);
        let message = create(&busy.root(), pf(), 1).unwrap_err().to_string();
        assert!(message.contains("already has 1 VFs"), "{message}");
        assert_eq!(busy.read(&format!("{PF_DIR}/sriov_numvfs")), "1\n");
    }

    #[test]
    fn create_refuses_a_function_without_sriov() {
        let tree = FakeTree::new();
        tree.pci_function("pci0000:00/0000:00:02.0", &config_with(0, &[]), None, None);

        let message = create(&tree.root(), Bdf::parse("00:02.0").unwrap(), 1)
            .unwrap_err()
            .to_string();

        assert!(message.contains("no SR-IOV capability"), "{message}");
    }

    #[test]
    fn reset_writes_the_reset_file_and_names_the_methods() {
        let tree = sriov_pf(0);
        tree.write(&format!("{PF_DIR}/reset"), "");
        tree.write(&format!("{PF_DIR}/reset_method"), "flr bus\n");

        let lines = reset(&tree.root(), pf()).unwrap();

        assert_eq!(tree.read(&format!("{PF_DIR}/reset")), "1");
        assert!(lines[0].contains("reset_method: flr bus"), "{lines:?}");
    }

    #[test]
    fn reset_without_a_method_is_refused() {
        let tree = sriov_pf(0);

        let message = reset(&tree.root(), pf()).unwrap_err().to_string();

        assert!(message.contains("no reset method"), "{message}");
    }

    #[test]
    fn quarantine_unbinds_clears_bus_master_and_overrides_the_driver() {
        let tree = sriov_pf(0);
        let mut config = config_with(0, &[]);
        config[4] = 0x06; // memory space + bus master
        tree.write(&format!("{PF_DIR}/config"), &config);
        tree.write("sys/bus/pci/drivers/nvme/unbind", "");

        let lines = quarantine(&tree.root(), pf()).unwrap();

        let config = std::fs::read(tree.path(&format!("{PF_DIR}/config"))).unwrap();
        assert_eq!(u16::from_le_bytes([config[4], config[5]]), 0x0002);
        assert_eq!(tree.read("sys/bus/pci/drivers/nvme/unbind"), "0000:01:00.0");
        assert_eq!(
            tree.read(&format!("{PF_DIR}/driver_override")),
            QUARANTINE_DRIVER
        );
        let text = lines.join("\n");
        assert!(text.contains("unbound from nvme"), "{text}");
        assert!(text.contains("0x0006 -> 0x0002 (Bus Master off)"), "{text}");
    }
}
