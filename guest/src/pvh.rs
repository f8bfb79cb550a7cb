//! Reads the PVH `hvm_start_info` the loader hands over in EBX: command line, RSDP address and
//! the E820-style memory map. Everything is copied out at boot and validated (magic, counts,
//! lengths), so later code never touches loader memory again.

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MAX_CMDLINE: usize = 2048;
const MAX_RAM_REGIONS: usize = 32;
const MEMMAP_RAM: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// What the loader told us.
pub struct BootInfo {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// RSDP physical address, 0 when the loader gave none.
    pub rsdp: u64,
    ram: [(u64, u64); MAX_RAM_REGIONS],
    ram_count: usize,
}

impl BootInfo {
    /// The kernel command line (lossy: non-UTF-8 bytes end it).
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => core::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or(""),
        }
    }

    /// RAM regions `(start, length)` from the memory map.
    pub fn ram_regions(&self) -> &[(u64, u64)] {
        &self.ram[..self.ram_count]
    }
}

fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: the first 4 GiB are identity mapped and callers only pass addresses below that
    // (checked by `low_enough`); read_unaligned copes with any alignment.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn low_enough(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= 1 << 32)
}

fn copy_cmdline(info: &mut BootInfo, addr: u64) {
    if !low_enough(addr, MAX_CMDLINE as u64) {
        return;
    }
    for (i, slot) in info.cmdline.iter_mut().enumerate() {
        let byte: u8 = read_phys(addr + i as u64);
        if byte == 0 {
            break;
        }
        *slot = byte;
        info.cmdline_len = i + 1;
    }
}

fn copy_memmap(info: &mut BootInfo, addr: u64, entries: u32) {
    let entry_size = size_of::<MemmapEntry>() as u64;
    let entries = u64::from(entries).min(128);
    if !low_enough(addr, entries * entry_size) {
        return;
    }
    for i in 0..entries {
        let entry: MemmapEntry = read_phys(addr + i * entry_size);
        if entry.kind == MEMMAP_RAM && entry.size != 0 && info.ram_count < MAX_RAM_REGIONS {
            info.ram[info.ram_count] = (entry.addr, entry.size);
            info.ram_count += 1;
        }
    }
}

/// Parses the start info at `paddr`; `None` when the magic is wrong.
pub fn parse(paddr: u64) -> Option<BootInfo> {
    if !low_enough(paddr, size_of::<StartInfo>() as u64) {
        return None;
    }
    let start: StartInfo = read_phys(paddr);
    if start.magic != START_INFO_MAGIC {
        return None;
    }
    let mut info = BootInfo {
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        rsdp: start.rsdp_paddr,
        ram: [(0, 0); MAX_RAM_REGIONS],
        ram_count: 0,
    };
    copy_cmdline(&mut info, start.cmdline_paddr);
    if start.version >= 1 {
        copy_memmap(&mut info, start.memmap_paddr, start.memmap_entries);
    }
    Some(info)
}
