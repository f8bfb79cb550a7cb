//! Parses the guest kit's serial console (see the guest kit contract) into a [`GuestKitReport`].
//!
//! The console is untrusted text: firmware noise, escape sequences, lines cut by a timeout and
//! malformed JSON are all expected. Lines that do not parse are kept in
//! [`GuestKitReport::malformed`] rather than dropped or turned into errors, so a test can show
//! exactly what the guest printed.

use serde::Deserialize;
use serde_json::Value;

/// Byte the guest writes to the exit port, as defined by the contract.
pub mod exit_byte {
    pub const PASS: u8 = 0;
    pub const WORKLOAD_FAILED: u8 = 1;
    pub const PANIC: u8 = 2;
    pub const EXCEPTION: u8 = 3;
    pub const TIMEOUT: u8 = 4;
    pub const BAD_CMDLINE: u8 = 5;
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Exit byte 0.
    Pass,
    /// Exit byte 1.
    WorkloadFailed,
    /// Exit byte 2.
    Panic,
    /// Exit byte 3: the guest took a CPU exception.
    Exception,
    /// Exit byte 4 (a guest wait timed out), or the host killed the VMM at the hard timeout
    /// (then [`GuestKitReport::host_timed_out`] is true).
    Timeout,
    /// Exit byte 5.
    BadCmdline,
    /// The VMM exited with a status that maps to no contract byte (for example QEMU's own
    /// errors, or a guest that powered off without writing the exit port). Holds the raw status.
    Other(i32),
    /// The VMM was ended by a signal the runner did not send (QEMU aborting, for example).
    Killed,
    /// The VMM reported a fatal error of its own (e.g. QEMU's "KVM internal error", after which
    /// it pauses forever) and the runner stopped it; see [`GuestKitReport::vmm_stderr`].
    VmmFailed,
}

impl ExitKind {
    /// Maps an exit byte written by the guest to its meaning.
    pub fn from_guest_byte(byte: u8) -> ExitKind {
        match byte {
            exit_byte::PASS => ExitKind::Pass,
            exit_byte::WORKLOAD_FAILED => ExitKind::WorkloadFailed,
            exit_byte::PANIC => ExitKind::Panic,
            exit_byte::EXCEPTION => ExitKind::Exception,
            exit_byte::TIMEOUT => ExitKind::Timeout,
            exit_byte::BAD_CMDLINE => ExitKind::BadCmdline,
            other => ExitKind::Other(i32::from(other)),
        }
    }

    /// Maps QEMU's exit status with `isa-debug-exit`, which is `(byte << 1) | 1`. Even statuses
    /// (0 included) mean the guest never wrote the port and are reported as [`ExitKind::Other`].
    pub fn from_qemu_status(status: i32) -> ExitKind {
        if status & 1 == 1 {
            if let Ok(byte) = u8::try_from(status >> 1) {
                return ExitKind::from_guest_byte(byte);
            }
        }
        ExitKind::Other(status)
    }

    /// Maps sluice's exit status, which equals the guest's byte.
    pub fn from_sluice_status(status: i32) -> ExitKind {
        match u8::try_from(status) {
            Ok(byte) if byte <= exit_byte::BAD_CMDLINE => ExitKind::from_guest_byte(byte),
            _ => ExitKind::Other(status),
        }
    }
}

/// The final `GUEST-KIT ...` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
}

/// `ACPI: <SIG> @<hex addr> len=<dec>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiLine {
    pub signature: String,
    pub address: u64,
    pub length: u64,
}

/// One `bar<i>=<hex addr>/<hex size>` of a PCI line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciBar {
    pub index: u8,
    pub address: u64,
    pub size: u64,
}

/// `PCI: <bb:dd.f> <vvvv>:<dddd> class=<cccccc> [bar<i>=<addr>/<size>]...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciLine {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    pub vendor_id: u16,
    pub device_id: u16,
    /// Base class, subclass and programming interface, `0xBBSSPP`.
    pub class: u32,
    pub bars: Vec<PciBar>,
}

impl PciLine {
    /// PCI base class 0x06, subclass 0x00: host bridge.
    pub fn is_host_bridge(&self) -> bool {
        self.class >> 8 == 0x0600
    }
}

/// Latency percentiles of a workload, in nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

/// One `RESULT {json}` line. Fields that do not apply to a workload are `None`; the whole
/// object is kept in `raw` for fields this struct does not name.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadResult {
    pub workload: String,
    pub pass: bool,
    pub op: Option<String>,
    pub ops: Option<u64>,
    pub bytes: Option<u64>,
    pub elapsed_ns: Option<u64>,
    pub errors: Option<u64>,
    pub verify: Option<String>,
    pub lat_ns: Option<Latency>,
    /// The privilege level the workload's data path ran at, as it read CS there (0 or 3).
    pub ring: Option<u8>,
    pub raw: Value,
}

/// The named fields of a `RESULT` object; `workload` and `pass` are required by the contract.
#[derive(Deserialize)]
struct ResultFields {
    workload: String,
    pass: bool,
    op: Option<String>,
    ops: Option<u64>,
    bytes: Option<u64>,
    elapsed_ns: Option<u64>,
    errors: Option<u64>,
    verify: Option<String>,
    lat_ns: Option<Latency>,
    ring: Option<u8>,
}

/// A console line that starts with a known marker but does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedLine {
    /// 1-based line number in the console text.
    pub line_number: usize,
    pub text: String,
    pub reason: String,
}

/// Everything a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestKitReport {
    pub exit: ExitKind,
    /// True when the runner killed the VMM at the hard timeout.
    pub host_timed_out: bool,
    pub acpi_tables: Vec<AcpiLine>,
    pub pci: Vec<PciLine>,
    pub results: Vec<WorkloadResult>,
    /// The last `GUEST-KIT` line, if any.
    pub verdict: Option<Verdict>,
    pub malformed: Vec<MalformedLine>,
    /// The whole console (lossily decoded as UTF-8).
    pub console: String,
    /// What the VMM printed on stderr (QEMU's own errors land here).
    pub vmm_stderr: String,
}

impl GuestKitReport {
    /// Parses console text; `exit` comes from the VMM's status.
    pub fn parse(console: &str, exit: ExitKind) -> GuestKitReport {
        let mut report = GuestKitReport {
            exit,
            host_timed_out: false,
            acpi_tables: Vec::new(),
            pci: Vec::new(),
            results: Vec::new(),
            verdict: None,
            malformed: Vec::new(),
            console: console.to_owned(),
            vmm_stderr: String::new(),
        };
        for (index, raw_line) in console.split('\n').enumerate() {
            report.absorb_line(index + 1, raw_line);
        }
        report
    }

    /// True when the guest both exited with byte 0 and printed `GUEST-KIT PASS`.
    pub fn passed(&self) -> bool {
        self.exit == ExitKind::Pass && self.verdict == Some(Verdict::Pass)
    }

    /// The ACPI table with this signature, if the guest listed it.
    pub fn acpi_table(&self, signature: &str) -> Option<&AcpiLine> {
        self.acpi_tables.iter().find(|t| t.signature == signature)
    }

    /// Results of one workload kind, in console order.
    pub fn results_for<'a>(
        &'a self,
        workload: &'a str,
    ) -> impl Iterator<Item = &'a WorkloadResult> {
        self.results.iter().filter(move |r| r.workload == workload)
    }

    /// A short human summary for assertion messages: exit, verdict, and the console.
    pub fn describe(&self) -> String {
        format!(
            "exit={:?} host_timed_out={} verdict={:?} malformed={:?}\n--- console ---\n{}\n--- vmm stderr ---\n{}",
            self.exit, self.host_timed_out, self.verdict, self.malformed, self.console, self.vmm_stderr
        )
    }

    fn absorb_line(&mut self, line_number: usize, raw_line: &str) {
        let line = strip_noise(raw_line);
        let parsed = if let Some(rest) = line.strip_prefix("ACPI: ") {
            parse_acpi(rest).map(|acpi| self.acpi_tables.push(acpi))
        } else if let Some(rest) = line.strip_prefix("PCI: ") {
            parse_pci(rest).map(|pci| self.pci.push(pci))
        } else if let Some(rest) = line.strip_prefix("RESULT ") {
            parse_result(rest).map(|result| self.results.push(result))
        } else if let Some(rest) = line.strip_prefix("GUEST-KIT ") {
            parse_verdict(rest).map(|verdict| self.verdict = Some(verdict))
        } else {
            Ok(())
        };
        if let Err(reason) = parsed {
            self.malformed.push(MalformedLine {
                line_number,
                text: line.to_owned(),
                reason,
            });
        }
    }
}

/// Drops a carriage return and any leading control characters or ANSI escape sequences that
/// firmware may leave on the line before the guest's first output.
fn strip_noise(line: &str) -> &str {
    let mut rest = line.trim_end_matches('\r');
    loop {
        if let Some(after_escape) = rest.strip_prefix("\u{1b}[") {
            // CSI sequence: parameters, then one final byte in 0x40..=0x7e.
            match after_escape.find(|c: char| ('\u{40}'..='\u{7e}').contains(&c)) {
                Some(end) => rest = &after_escape[end + 1..],
                None => return "",
            }
        } else if let Some(after) = rest.strip_prefix(|c: char| c.is_control() || c == '\u{fffd}') {
            // Skips bare ESC and other single-character noise (lone ESC "c" resets are rare
            // enough that a leftover 'c' only costs one unknown line).
            rest = after;
        } else {
            return rest;
        }
    }
}

fn parse_hex(text: &str) -> Result<u64, String> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u64::from_str_radix(digits, 16).map_err(|e| format!("bad hex number {text:?}: {e}"))
}

fn parse_acpi(rest: &str) -> Result<AcpiLine, String> {
    let mut fields = rest.split_whitespace();
    let signature = fields.next().ok_or("missing signature")?;
    let address = fields
        .next()
        .and_then(|f| f.strip_prefix('@'))
        .ok_or("missing @address")?;
    let length = fields
        .next()
        .and_then(|f| f.strip_prefix("len="))
        .ok_or("missing len=")?;
    if signature.is_empty() || signature.len() > 8 || !signature.is_ascii() {
        return Err(format!("bad signature {signature:?}"));
    }
    Ok(AcpiLine {
        signature: signature.to_owned(),
        address: parse_hex(address)?,
        length: length
            .parse()
            .map_err(|e| format!("bad len {length:?}: {e}"))?,
    })
}

fn parse_pci(rest: &str) -> Result<PciLine, String> {
    let mut fields = rest.split_whitespace();
    let bdf = fields.next().ok_or("missing bus:dev.fn")?;
    let ids = fields.next().ok_or("missing vendor:device")?;
    let class = fields
        .next()
        .and_then(|f| f.strip_prefix("class="))
        .ok_or("missing class=")?;
    let (bus, device, function) = parse_bdf(bdf)?;
    let (vendor, device_id) = ids.split_once(':').ok_or("ids need vvvv:dddd")?;
    let bars = fields.map(parse_bar).collect::<Result<Vec<_>, _>>()?;
    Ok(PciLine {
        bus,
        device,
        function,
        vendor_id: narrow(parse_hex(vendor)?, "vendor")?,
        device_id: narrow(parse_hex(device_id)?, "device")?,
        class: narrow(parse_hex(class)?, "class").and_then(|c: u32| {
            if c > 0xff_ffff {
                Err(format!("class {c:#x} wider than 24 bits"))
            } else {
                Ok(c)
            }
        })?,
        bars,
    })
}

fn parse_bdf(bdf: &str) -> Result<(u8, u8, u8), String> {
    let (bus, dev_fn) = bdf.split_once(':').ok_or("bdf needs bb:dd.f")?;
    let (device, function) = dev_fn.split_once('.').ok_or("bdf needs bb:dd.f")?;
    let device: u8 = narrow(parse_hex(device)?, "device number")?;
    let function: u8 = narrow(parse_hex(function)?, "function number")?;
    if device > 31 || function > 7 {
        return Err(format!("bdf {bdf:?} out of range"));
    }
    Ok((narrow(parse_hex(bus)?, "bus")?, device, function))
}

fn parse_bar(field: &str) -> Result<PciBar, String> {
    let (name, value) = field.split_once('=').ok_or("bar needs bar<i>=addr/size")?;
    let index = name
        .strip_prefix("bar")
        .and_then(|i| i.parse::<u8>().ok())
        .filter(|i| *i < 6)
        .ok_or_else(|| format!("bad bar name {name:?}"))?;
    let (address, size) = value.split_once('/').ok_or("bar needs addr/size")?;
    Ok(PciBar {
        index,
        address: parse_hex(address)?,
        size: parse_hex(size)?,
    })
}

fn narrow<T: TryFrom<u64>>(value: u64, what: &str) -> Result<T, String> {
    T::try_from(value).map_err(|_| format!("{what} {value:#x} out of range"))
}

fn parse_result(rest: &str) -> Result<WorkloadResult, String> {
    let raw: Value = serde_json::from_str(rest.trim()).map_err(|e| format!("bad JSON: {e}"))?;
    let fields: ResultFields =
        serde_json::from_value(raw.clone()).map_err(|e| format!("bad RESULT fields: {e}"))?;
    Ok(WorkloadResult {
        workload: fields.workload,
        pass: fields.pass,
        op: fields.op,
        ops: fields.ops,
        bytes: fields.bytes,
        elapsed_ns: fields.elapsed_ns,
        errors: fields.errors,
        verify: fields.verify,
        lat_ns: fields.lat_ns,
        ring: fields.ring,
        raw,
    })
}

fn parse_verdict(rest: &str) -> Result<Verdict, String> {
    let rest = rest.trim_end();
    if rest == "PASS" {
        Ok(Verdict::Pass)
    } else if rest == "FAIL" {
        Ok(Verdict::Fail(String::new()))
    } else if let Some(reason) = rest.strip_prefix("FAIL ") {
        Ok(Verdict::Fail(reason.trim().to_owned()))
    } else {
        Err(format!("unknown verdict {rest:?}"))
    }
}
