//! Static checks of the embedded guest kit ELF with binutils: no instruction that kvm_pvm
//! cannot run (see platform notes), and the PVH entry note that QEMU and sluice boot by.
//!
//! One exception is made, narrowly: LLVM fills the gap between functions (and the byte after a
//! call to a `noreturn` function) with `int3`. A run of `int3` that follows an unconditional
//! jump/call/return and reaches the next symbol is that fill and is never executed; any other
//! `int3` fails the test.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use sluice_guest_kit::GUEST_KIT_ELF;

/// The embedded ELF in a temp file for binutils, removed on drop.
struct ElfFile(PathBuf);

impl ElfFile {
    fn new(tag: &str) -> ElfFile {
        let path =
            std::env::temp_dir().join(format!("sluice-guest-kit-{tag}-{}.elf", std::process::id()));
        fs::write(&path, GUEST_KIT_ELF).expect("write guest kit ELF");
        ElfFile(path)
    }
}

impl Drop for ElfFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn binutils(tool: &str, args: &[&str], elf: &ElfFile) -> String {
    let output = Command::new(tool)
        .args(args)
        .arg(&elf.0)
        .output()
        .unwrap_or_else(|e| panic!("{tool} not runnable ({e}); install binutils"));
    assert!(
        output.status.success(),
        "{tool} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// True for a mnemonic kvm_pvm cannot execute in long mode.
fn is_forbidden(mnemonic: &str) -> bool {
    matches!(mnemonic, "int" | "int3" | "into" | "xgetbv" | "cmpxchg16b")
        || mnemonic.starts_with("xsave")
        || mnemonic.starts_with("xrstor")
}

/// One line of `objdump -d` output that matters here.
enum Line<'a> {
    /// `0000000000100120 <isr_stubs>:` or a blank/section line: a boundary.
    Boundary(&'a str),
    /// `  10000c:\tlock cmpxchg16b (%rdi)` as (address, instruction).
    Instruction(&'a str, &'a str),
}

fn parse_disassembly(disassembly: &str) -> Vec<Line<'_>> {
    disassembly
        .lines()
        .map(|line| match line.split_once(":\t") {
            Some((address, instruction)) if !line.ends_with(">:") => {
                Line::Instruction(address.trim(), instruction.trim())
            }
            _ => Line::Boundary(
                line.strip_suffix(">:")
                    .map_or("", |l| l.rsplit('<').next().unwrap_or(l)),
            ),
        })
        .collect()
}

/// Mnemonics of an instruction: prefixes (lock, rep, data16) come first, operands start with
/// %, $, (, *, <, - or a digit.
fn mnemonics(instruction: &str) -> impl Iterator<Item = &str> + Clone {
    instruction.split_whitespace().take_while(|token| {
        !token.starts_with(['%', '$', '(', '*', '<', '-']) && !token.starts_with(char::is_numeric)
    })
}

/// After these the next byte is reached only by a jump to it (or, after a call to a
/// `noreturn` function, never).
fn ends_straight_line_flow(instruction: &str) -> bool {
    mnemonics(instruction).any(|m| {
        m.starts_with("jmp")
            || m.starts_with("ret")
            || m.starts_with("iret")
            || m.starts_with("call")
            || m == "ud2"
    })
}

/// True when the `int3` at `index` belongs to a run of `int3` that follows an unconditional
/// control transfer and lasts until the next symbol: the assembler's alignment fill (and LLVM's
/// trap after a `noreturn` call), which no code path executes.
fn is_padding_int3(lines: &[Line<'_>], index: usize) -> bool {
    let is_int3 = |line: &Line<'_>| matches!(line, Line::Instruction(_, "int3"));
    let run_start = lines[..index]
        .iter()
        .rposition(|line| !is_int3(line))
        .map_or(0, |p| p + 1);
    let before_run = run_start.checked_sub(1).and_then(|i| lines.get(i));
    let after_run = lines[index..].iter().find(|line| !is_int3(line));
    matches!(before_run, Some(Line::Instruction(_, previous)) if ends_straight_line_flow(previous))
        && matches!(after_run, None | Some(Line::Boundary(_)))
}

/// Forbidden instructions in `objdump -d` (AT&T) output, as "address: instruction  <symbol>".
fn forbidden_instructions(disassembly: &str) -> Vec<String> {
    let lines = parse_disassembly(disassembly);
    let mut symbol = "";
    let mut offenders = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        match line {
            Line::Boundary(name) => {
                if !name.is_empty() {
                    symbol = name;
                }
            }
            Line::Instruction(address, instruction) => {
                if mnemonics(instruction).any(is_forbidden)
                    && !(*instruction == "int3" && is_padding_int3(&lines, index))
                {
                    offenders.push(format!("{address}: {instruction}  <{symbol}>"));
                }
            }
        }
    }
    offenders
}

#[test]
fn classifier_flags_every_forbidden_instruction_and_nothing_else() {
    let sample = "\
0000000000100000 <entry>:
  0fffff:\tnop
  100000:\tint3
  100001:\tint    $0x20
  100003:\tlock cmpxchg16b (%rdi)
  100008:\txsaveopt64 (%rsp)
  10000d:\txrstor (%rax)
  100010:\txgetbv
  100013:\tinto
  100014:\tcall   100100 <xsave_state>
  100019:\tmov    %eax,%ebx
  10001b:\tcmpxchg %rcx,(%rdx)
  10001f:\tfxsave (%rsp)
  100023:\tjmp    100000 <entry>
  100025:\tint3
  100026:\tint3

0000000000100030 <after_padding>:
  100030:\tcall   100100 <panic>
  100035:\tint3
  100036:\tret
";

    let offenders = forbidden_instructions(sample);

    let addresses: Vec<_> = offenders
        .iter()
        .map(|o| o.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(
        addresses,
        ["100000", "100001", "100003", "100008", "10000d", "100010", "100013", "100035"],
        "{offenders:#?}"
    );
}

#[test]
fn guest_kit_has_no_instructions_kvm_pvm_cannot_run() {
    let elf = ElfFile::new("objdump");

    let disassembly = binutils("objdump", &["-d", "--no-show-raw-insn", "-M", "att"], &elf);

    assert!(
        disassembly.lines().filter(|l| l.contains(":\t")).count() > 100,
        "objdump found almost no code:\n{disassembly}"
    );
    let offenders = forbidden_instructions(&disassembly);
    assert!(
        offenders.is_empty(),
        "guest kit contains instructions kvm_pvm cannot run:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn guest_kit_carries_the_pvh_entry_note() {
    let elf = ElfFile::new("readelf");

    let notes = binutils("readelf", &["--notes", "--wide"], &elf);

    // binutils 2.40 has no name for Xen type 18 and prints "Unknown note type: (0x00000012)".
    let has_pvh_note = notes.lines().any(|line| {
        line.trim_start().starts_with("Xen")
            && (line.contains("0x00000012") || line.contains("PHYS32_ENTRY"))
    });
    assert!(has_pvh_note, "no Xen PHYS32_ENTRY note:\n{notes}");
}
