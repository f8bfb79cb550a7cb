//! A virtual TPM per guest, seen by Linux, in the nested lab: Debian's cloud kernel (tpm_crb
//! built in) boots as L2 on `sluice run --tpm state=DIR` in L1, where sluice starts its own
//! swtpm (Debian's package, in the L1 image) for each guest. Two guests, one after the other in
//! one L1 boot, each with its own state directory:
//!
//! - tpm_crb binds to sluice's CRB device through the ACPI TPM2 table and the MSFT0101 device:
//!   `/dev/tpm0` and `/dev/tpmrm0` appear, sysfs says TPM 2.0;
//! - tpm2-tools (Debian's package, in the guest image's `--tpm` variant) reads PCRs 0 and 16 (`tpm2_pcrread
//!   sha256:0,16`, all zero after the kernel's TPM2_Startup) and random bytes
//!   (`tpm2_getrandom`: two reads, different);
//! - each guest extends PCR 16 with its own digests (two for the first, one for the second)
//!   and reads it back: the values equal the SHA-256 chain computed here, and differ between
//!   the guests — their TPMs are independent.
//!
//! Printed: the lab run's time and each guest's boot-to-done time in L2.
//!
//! No QEMU or no way to build the images: a SKIP line.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::backend::sluice_binary;
use common::qemu::kernel_cmdline_diskless;
use common::{find_program, guest_image_with_tpm, Scratch};
use sluice_lab::{Lab, SCRATCH};

const LAB_TIMEOUT: Duration = Duration::from_secs(600);
const L2_RUN_TIMEOUT: Duration = Duration::from_secs(240);
const ZERO_PCR: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One L2 guest: its name (state directory, console file) and the digests it extends PCR 16
/// with.
struct Guest {
    name: &'static str,
    digests: Vec<String>,
}

/// SHA-256 of `bytes` as lowercase hex, by coreutils' `sha256sum` (the workspace has no hash
/// crate, as the guest kit's TPM test).
fn sha256_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("sha256sum's stdin")
        .write_all(bytes)
        .expect("feed sha256sum");
    let output = child.wait_with_output().expect("sha256sum's output");
    assert!(output.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&output.stdout)[..64].to_string()
}

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digits"))
        .collect()
}

/// PCR 16 after extending its reset value (all zero) with `digests`: new = SHA-256(old ||
/// digest), the TPM 2.0 extend.
fn expected_pcr(digests: &[String]) -> String {
    digests.iter().fold(ZERO_PCR.to_string(), |pcr, digest| {
        let mut chained = from_hex(&pcr);
        chained.extend(from_hex(digest));
        sha256_hex(&chained)
    })
}

/// L2's side: the device nodes, the PCRs and random bytes, the extends, PCR 16 read back as
/// hex from tpm2_pcrread's binary output (no parsing of its YAML).
fn l2_command(guest: &Guest) -> String {
    let extends: String = guest
        .digests
        .iter()
        .map(|d| format!("tpm2_pcrextend 16:sha256={d}; echo TPM-EXTEND-STATUS=$?\n"))
        .collect();
    format!(
        "export TPM2TOOLS_TCTI=device:/dev/tpmrm0\n\
         echo TPM-UP $(cut -d' ' -f1 /proc/uptime)\n\
         ls /dev/tpm0 /dev/tpmrm0 | sed 's/^/TPM-DEV /'\n\
         echo TPM-VERSION $(cat /sys/class/tpm/tpm0/tpm_version_major)\n\
         dmesg | grep -i tpm | sed 's/^/TPM-DMESG /'\n\
         hex() {{ od -An -tx1 -v $1 | tr -d ' \\n'; }}\n\
         tpm2_pcrread sha256:0,16 > p.txt; echo TPM-PCRREAD-STATUS=$?\n\
         sed 's/^/TPM-PCRREAD /' p.txt\n\
         tpm2_pcrread sha256:0 -o p0; echo TPM-PCR0 $(hex p0)\n\
         tpm2_pcrread sha256:16 -o p16; echo TPM-PCR16-BEFORE $(hex p16)\n\
         echo TPM-RANDOM $(tpm2_getrandom --hex 16)\n\
         echo TPM-RANDOM $(tpm2_getrandom --hex 16)\n\
         {extends}\
         tpm2_pcrread sha256:16 -o p16; echo TPM-PCR16-AFTER $(hex p16)\n\
         echo TPM-DONE $(cut -d' ' -f1 /proc/uptime)"
    )
}

/// L1's side: each guest in turn on its own state directory, then what swtpm left there.
fn l1_script(sluice: &str, image: &common::GuestImage, guests: &[Guest]) -> String {
    let mut script = String::from("set -u\n");
    for guest in guests {
        let name = guest.name;
        script += &format!(
            "timeout -s TERM {timeout} {sluice} --log warn,sluice_vmm::tpm=info run \
             --kernel {kernel} --initrd {initrd} --memory 512M --tpm state=/tmp/tpm-{name} \
             --cmdline '{cmdline}' > {SCRATCH}/{name}.console 2>&1\n\
             echo sluice-{name}-exit=$?\n\
             echo STATE-{name} $(ls /tmp/tpm-{name})\n",
            timeout = L2_RUN_TIMEOUT.as_secs(),
            kernel = image.kernel.display(),
            initrd = image.initramfs.display(),
            cmdline = kernel_cmdline_diskless(&l2_command(guest)),
        );
    }
    script
}

/// The values L2 printed after `prefix`, in order.
fn values<'a>(console: &'a str, prefix: &str) -> Vec<&'a str> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(str::trim)
        .collect()
}

fn uptime(console: &str, prefix: &str) -> f64 {
    values(console, prefix)
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn lab_tpm_crb_linux_tpm2_tools_two_guests_with_independent_pcrs() {
    let test = "lab-tpm";
    if sluice_lab::inside_lab() {
        println!("SKIP {test}: already inside the lab");
        return;
    }
    if find_program("sha256sum").is_none() {
        println!("SKIP {test}: sha256sum is not installed");
        return;
    }
    let image = match guest_image_with_tpm() {
        Ok(image) => image,
        Err(reason) => {
            println!("SKIP {test}: cannot build the guest image with tpm2-tools ({reason})");
            return;
        }
    };
    if sluice_lab::skip_without_lab(test) {
        return;
    }
    let sluice = sluice_binary().unwrap_or_else(|e| panic!("cannot build sluice: {e}"));
    let sluice = sluice.display().to_string();
    let scratch = Scratch::new(test);
    let digest = |label: &str| sha256_hex(format!("sluice lab_tpm {label}").as_bytes());
    let guests = [
        Guest {
            name: "a",
            digests: vec![digest("guest a, first"), digest("guest a, second")],
        },
        Guest {
            name: "b",
            digests: vec![digest("guest b, only")],
        },
    ];
    let started = Instant::now();

    let lab = Lab::new()
        .share(&scratch.dir)
        .timeout(LAB_TIMEOUT)
        .run(&l1_script(&sluice, &image, &guests));

    let elapsed = started.elapsed();
    let consoles: Vec<String> = guests
        .iter()
        .map(|g| std::fs::read_to_string(scratch.path(&format!("{}.console", g.name))))
        .map(Result::unwrap_or_default)
        .collect();
    let context = || {
        let mut text = lab.transcript();
        for (guest, console) in guests.iter().zip(&consoles) {
            text += &format!("\n--- L2 {} ---\n{console}", guest.name);
        }
        text
    };
    lab.assert_success();
    let mut after = Vec::new();
    for (guest, console) in guests.iter().zip(&consoles) {
        let name = guest.name;
        assert!(
            lab.stdout.contains(&format!("sluice-{name}-exit=0")),
            "guest {name}: sluice exits 0 after L2 powers off\n{}",
            context()
        );
        assert!(console.contains("TPM-DONE"), "guest {name}\n{}", context());
        assert_eq!(
            values(console, "TPM-DEV "),
            ["/dev/tpm0", "/dev/tpmrm0"],
            "guest {name}: both device nodes\n{}",
            context()
        );
        assert_eq!(values(console, "TPM-VERSION "), ["2"], "{}", context());
        assert_eq!(
            values(console, "TPM-PCRREAD-STATUS="),
            ["0"],
            "{}",
            context()
        );
        let pcrread: Vec<&str> = values(console, "TPM-PCRREAD ");
        assert!(
            pcrread.iter().any(|l| l.starts_with("sha256")),
            "tpm2_pcrread listed the sha256 bank\n{}",
            context()
        );
        assert_eq!(values(console, "TPM-PCR0 "), [ZERO_PCR], "{}", context());
        assert_eq!(
            values(console, "TPM-PCR16-BEFORE "),
            [ZERO_PCR],
            "{}",
            context()
        );
        let random = values(console, "TPM-RANDOM ");
        assert_eq!(random.len(), 2, "{}", context());
        for bytes in &random {
            assert!(
                bytes.len() == 32 && bytes.chars().all(|c| c.is_ascii_hexdigit()),
                "16 random bytes as hex: {bytes:?}\n{}",
                context()
            );
        }
        assert_ne!(random[0], random[1], "two reads, two values");
        assert_eq!(
            values(console, "TPM-EXTEND-STATUS="),
            vec!["0"; guest.digests.len()],
            "{}",
            context()
        );
        let pcr16 = values(console, "TPM-PCR16-AFTER ");
        assert_eq!(
            pcr16,
            [expected_pcr(&guest.digests).as_str()],
            "guest {name}: PCR 16 is the SHA-256 chain of its extends\n{}",
            context()
        );
        assert!(
            lab.stdout
                .lines()
                .any(|l| l.starts_with(&format!("STATE-{name} ")) && l.contains("tpm2-00.permall")),
            "swtpm kept guest {name}'s permanent state in its own directory\n{}",
            context()
        );
        after.push(pcr16[0].to_string());
    }
    assert_ne!(after[0], after[1], "independent TPMs, different PCR 16");

    println!(
        "{test}: two L2 guests, each on its own swtpm: /dev/tpm0 and /dev/tpmrm0, PCRs and \
         random bytes read by tpm2-tools, PCR 16 = the expected chain and different per guest; \
         lab run {:.0} s (L1 boot {:.1} s, L1 script {:.1} s)",
        elapsed.as_secs_f64(),
        lab.boot_seconds.unwrap_or(f64::NAN),
        lab.command_seconds.unwrap_or(f64::NAN),
    );
    for (guest, console) in guests.iter().zip(&consoles) {
        println!(
            "{test}: guest {}: L2 ran its command at {:.1} s of uptime, done at {:.1} s; \
             PCR 16 {}",
            guest.name,
            uptime(console, "TPM-UP "),
            uptime(console, "TPM-DONE "),
            values(console, "TPM-PCR16-AFTER ").join(""),
        );
        for line in values(console, "TPM-DMESG ") {
            println!("{test}: guest {}: {line}", guest.name);
        }
    }
}
