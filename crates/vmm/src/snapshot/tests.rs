use vm_memory::{Bytes, GuestAddress};

use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-snapshot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn vcpu_state(rip: u64) -> VcpuState {
    VcpuState {
        regs: kvm_bindings::kvm_regs {
            rip,
            ..Default::default()
        },
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: None,
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 42,
            ..Default::default()
        }],
        events: Default::default(),
        mp_state: Default::default(),
    }
}

pub(crate) fn machine(cpus: u8, memory: u64) -> MachineState {
    MachineState {
        cpus,
        memory,
        vcpus: (0..cpus)
            .map(|i| vcpu_state(0x1000 + u64::from(i)))
            .collect(),
        irqchip: IrqchipState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: kvm_clock_data {
                clock: 77,
                ..Default::default()
            },
        },
        memory_checksum: 0,
        devices: Vec::new(),
        platform: None,
    }
}

fn ram_with_pattern() -> GuestRam {
    let ram = GuestRam::new(16 << 20).unwrap();
    ram.memory
        .write_slice(b"below", GuestAddress(0x1000))
        .unwrap();
    ram.memory
        .write_slice(&[0xa5; 4096], GuestAddress(0x80_0000))
        .unwrap();
    ram
}

#[test]
fn state_and_memory_come_back_as_written() {
    let dir = scratch("roundtrip");
    let ram = ram_with_pattern();

    write(&dir, machine(2, ram.size), &ram).unwrap();
    let state = read(&dir).unwrap();
    let copy = GuestRam::new(16 << 20).unwrap();
    load_memory(&dir, &state, &copy).unwrap();

    assert_eq!(state.cpus, 2);
    assert_eq!(state.vcpus[1].regs.rip, 0x1001);
    assert_eq!(state.vcpus[0].msrs[0].data, 42);
    assert_eq!(state.irqchip.clock.clock, 77);
    let mut below = [0u8; 5];
    copy.memory
        .read_slice(&mut below, GuestAddress(0x1000))
        .unwrap();
    assert_eq!(&below, b"below");
    let mut page = [0u8; 4096];
    copy.memory
        .read_slice(&mut page, GuestAddress(0x80_0000))
        .unwrap();
    assert!(page.iter().all(|&b| b == 0xa5));
    let on_disk = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap();
    assert_eq!(on_disk.len(), 16 << 20);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_flipped_byte_in_the_state_or_the_memory_is_refused() {
    let dir = scratch("corrupt");
    let ram = ram_with_pattern();
    write(&dir, machine(1, ram.size), &ram).unwrap();
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).unwrap();

    let tampered = text.replacen("\"cpus\":1", "\"cpus\":2", 1);
    std::fs::write(&state_path, &tampered).unwrap();
    let state_refused = read(&dir);
    std::fs::write(&state_path, &text).unwrap();
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(MEMORY_FILE))
        .unwrap();
    memory.write_all_at(&[0x5a], 0x80_0010).unwrap();
    let state = read(&dir).unwrap();
    let memory_refused = load_memory(&dir, &state, &GuestRam::new(16 << 20).unwrap());

    assert!(matches!(state_refused, Err(SnapshotError::Corrupt(_))));
    assert!(matches!(memory_refused, Err(SnapshotError::Corrupt(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn another_version_or_another_file_is_refused_with_what_it_is() {
    let dir = scratch("version");
    let ram = ram_with_pattern();
    write(&dir, machine(1, ram.size), &ram).unwrap();
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).unwrap();

    std::fs::write(&state_path, text.replacen(" 1 ", " 2 ", 1)).unwrap();
    let newer = read(&dir);
    std::fs::write(&state_path, "hello\n{}").unwrap();
    let other = read(&dir);
    let smaller = GuestRam::new(32 << 20).unwrap();
    std::fs::write(&state_path, &text).unwrap();
    let state = read(&dir).unwrap();
    let wrong_size = load_memory(&dir, &state, &smaller);

    assert!(matches!(
        newer,
        Err(SnapshotError::Version { found: 2, .. })
    ));
    assert!(matches!(other, Err(SnapshotError::NotASnapshot(_))));
    assert!(matches!(wrong_size, Err(SnapshotError::BadState { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}
