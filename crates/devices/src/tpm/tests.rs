use std::sync::{Arc, Mutex};

use super::*;

/// Commands seen: (locality, bytes).
type Seen = Arc<Mutex<Vec<(u8, Vec<u8>)>>>;
/// The next reply; `None`: a fixed good one.
type Reply = Arc<Mutex<Option<Result<Vec<u8>, String>>>>;

/// Records commands and answers with a scripted response (or fails).
#[derive(Clone, Default)]
struct FakeBackend {
    seen: Seen,
    reply: Reply,
    cancels: Arc<Mutex<u32>>,
}

impl TpmBackend for FakeBackend {
    fn execute(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>, String> {
        self.seen.lock().unwrap().push((locality, command.to_vec()));
        self.reply
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| Ok(response(0, &[1, 2, 3])))
    }
    fn cancel(&mut self) {
        *self.cancels.lock().unwrap() += 1;
    }
    fn established(&mut self) -> bool {
        true
    }
    fn reset_established(&mut self, _locality: u8) {}
}

fn response(code: u32, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0x80, 0x01];
    bytes.extend_from_slice(&((HEADER_SIZE + body.len()) as u32).to_be_bytes());
    bytes.extend_from_slice(&code.to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

fn read32(crb: &mut TpmCrb, offset: u64) -> u32 {
    let mut bytes = [0; 4];
    crb.read(CRB_BASE, offset, &mut bytes);
    u32::from_le_bytes(bytes)
}

fn write32(crb: &mut TpmCrb, offset: u64, value: u32) {
    crb.write(CRB_BASE, offset, &value.to_le_bytes());
}

fn page(locality: u8) -> u64 {
    u64::from(locality) * LOCALITY_SIZE
}

/// What a driver does: take the locality, cmdReady, fill the buffer, start, read the answer.
fn run_command(crb: &mut TpmCrb, locality: u8, command: &[u8]) -> Vec<u8> {
    let base = page(locality);
    write32(crb, base + LOC_CTRL, LOC_CTRL_REQUEST);
    write32(crb, base + CTRL_REQ, CTRL_REQ_CMD_READY);
    for (i, chunk) in command.chunks(4).enumerate() {
        crb.write(CRB_BASE, base + DATA_BUFFER + 4 * i as u64, chunk);
    }
    write32(crb, base + CTRL_START, 1);
    assert_eq!(read32(crb, base + CTRL_START), 0, "the command completes");
    let mut header = [0; HEADER_SIZE];
    crb.read(CRB_BASE, base + DATA_BUFFER, &mut header);
    let size = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
    let mut answer = vec![0; size];
    crb.read(CRB_BASE, base + DATA_BUFFER, &mut answer);
    answer
}

fn crb_with(backend: &FakeBackend) -> TpmCrb {
    TpmCrb::new(Box::new(backend.clone()))
}

#[test]
fn registers_describe_a_crb_interface_with_its_buffer_in_the_page() {
    let mut crb = crb_with(&FakeBackend::default());

    let interface = read32(&mut crb, INTF_ID);
    let mut rsp_addr = [0; 8];
    crb.read(CRB_BASE, CTRL_RSP_ADDR, &mut rsp_addr);

    assert_eq!(interface & 0xf, 1, "interface type CRB");
    assert_eq!((interface >> 14) & 1, 1, "CapCRB");
    assert_eq!((interface >> 17) & 3, 1, "CRB selected");
    assert_eq!(read32(&mut crb, CTRL_CMD_SIZE), BUFFER_SIZE as u32);
    assert_eq!(read32(&mut crb, CTRL_RSP_SIZE), BUFFER_SIZE as u32);
    assert_eq!(read32(&mut crb, CTRL_CMD_LADDR), 0xfed4_0080);
    assert_eq!(read32(&mut crb, CTRL_CMD_HADDR), 0);
    assert_eq!(u64::from_le_bytes(rsp_addr), 0xfed4_0080);
    // Read-only: a guest cannot aim the device elsewhere.
    write32(&mut crb, LOC_CTRL, LOC_CTRL_REQUEST);
    write32(&mut crb, CTRL_CMD_LADDR, 0x1000);
    assert_eq!(read32(&mut crb, CTRL_CMD_LADDR), 0xfed4_0080);
    let state = read32(&mut crb, LOC_STATE);
    assert_eq!(
        state,
        LOC_STATE_VALID | LOC_STATE_ASSIGNED | LOC_STATE_ESTABLISHED
    );
}

#[test]
fn one_locality_holds_the_tpm_and_others_cannot_start_commands() {
    let backend = FakeBackend::default();
    let mut crb = crb_with(&backend);

    write32(&mut crb, page(2) + LOC_CTRL, LOC_CTRL_REQUEST);
    write32(&mut crb, page(0) + LOC_CTRL, LOC_CTRL_REQUEST);
    let state = read32(&mut crb, page(0) + LOC_STATE);
    let granted = (
        read32(&mut crb, page(0) + LOC_STS),
        read32(&mut crb, page(2) + LOC_STS),
    );
    crb.write(CRB_BASE, page(0) + DATA_BUFFER, &response(0, &[]));
    write32(&mut crb, page(0) + CTRL_START, 1);
    write32(&mut crb, page(2) + LOC_CTRL, LOC_CTRL_RELINQUISH);
    let after_relinquish = read32(&mut crb, page(0) + LOC_STATE);

    assert_eq!((state >> 2) & 7, 2, "locality 2 asked first");
    assert_eq!(granted, (0, LOC_STS_GRANTED));
    assert!(
        backend.seen.lock().unwrap().is_empty(),
        "locality 0 cannot start"
    );
    assert_eq!(after_relinquish & LOC_STATE_ASSIGNED, 0);
    let answer = run_command(&mut crb, 0, &response(0x144, &[0, 0]));
    assert_eq!(answer, response(0, &[1, 2, 3]));
    assert_eq!(backend.seen.lock().unwrap()[0].0, 0);
}

#[test]
fn a_command_reaches_the_backend_whole_at_its_locality() {
    let backend = FakeBackend::default();
    let mut crb = crb_with(&backend);
    let command = response(0x17b, &[0, 16]);

    let answer = run_command(&mut crb, 3, &command);

    assert_eq!(answer, response(0, &[1, 2, 3]));
    assert_eq!(*backend.seen.lock().unwrap(), vec![(3, command)]);
    assert_eq!(read32(&mut crb, page(3) + CTRL_STS) & CTRL_STS_FATAL, 0);
}

#[test]
fn a_command_size_beyond_the_buffer_or_below_a_header_is_refused_without_the_backend() {
    let backend = FakeBackend::default();
    let mut crb = crb_with(&backend);
    let mut huge = response(0x17b, &[0, 16]);
    huge[2..6].copy_from_slice(&(BUFFER_SIZE as u32 + 1).to_be_bytes());
    let mut tiny = huge.clone();
    tiny[2..6].copy_from_slice(&9u32.to_be_bytes());
    let mut max = huge.clone();
    max[2..6].copy_from_slice(&u32::MAX.to_be_bytes());

    for command in [huge, tiny, max] {
        let answer = run_command(&mut crb, 0, &command);
        assert_eq!(answer, error_response(TPM_RC_COMMAND_SIZE));
    }
    assert!(backend.seen.lock().unwrap().is_empty());
}

#[test]
fn a_response_larger_than_the_buffer_or_lying_about_its_size_is_an_error() {
    let backend = FakeBackend::default();
    let mut crb = crb_with(&backend);
    let mut too_big = response(0, &vec![7; BUFFER_SIZE]);
    let size = too_big.len() as u32;
    too_big[2..6].copy_from_slice(&size.to_be_bytes());
    let mut lying = response(0, &[1, 2, 3]);
    lying[2..6].copy_from_slice(&100u32.to_be_bytes());

    for reply in [too_big, lying, vec![0x80]] {
        *backend.reply.lock().unwrap() = Some(Ok(reply));
        let answer = run_command(&mut crb, 0, &response(0x17b, &[0, 16]));
        assert_eq!(answer, error_response(TPM_RC_FAILURE));
    }
    assert_eq!(read32(&mut crb, CTRL_STS) & CTRL_STS_FATAL, 0);
}

#[test]
fn a_failed_backend_sets_the_fatal_status() {
    let backend = FakeBackend::default();
    *backend.reply.lock().unwrap() = Some(Err("swtpm is gone".into()));
    let mut crb = crb_with(&backend);

    let answer = run_command(&mut crb, 0, &response(0x17b, &[0, 16]));

    assert_eq!(answer, error_response(TPM_RC_FAILURE));
    assert_eq!(read32(&mut crb, CTRL_STS) & CTRL_STS_FATAL, CTRL_STS_FATAL);
}

#[test]
fn cancel_and_idle_follow_the_holder() {
    let backend = FakeBackend::default();
    let mut crb = crb_with(&backend);

    write32(&mut crb, CTRL_CANCEL, 1);
    write32(&mut crb, LOC_CTRL, LOC_CTRL_REQUEST);
    let idle_at_start = read32(&mut crb, CTRL_STS) & CTRL_STS_IDLE;
    write32(&mut crb, CTRL_REQ, CTRL_REQ_CMD_READY);
    let ready = read32(&mut crb, CTRL_STS) & CTRL_STS_IDLE;
    write32(&mut crb, CTRL_CANCEL, 1);
    write32(&mut crb, CTRL_REQ, CTRL_REQ_GO_IDLE);

    assert_eq!((idle_at_start, ready), (CTRL_STS_IDLE, 0));
    assert_eq!(
        *backend.cancels.lock().unwrap(),
        1,
        "only the holder cancels"
    );
    assert_eq!(read32(&mut crb, CTRL_CANCEL), 1);
    assert_eq!(read32(&mut crb, CTRL_STS) & CTRL_STS_IDLE, CTRL_STS_IDLE);
}

#[test]
fn accesses_at_the_edges_stay_inside_the_page() {
    let mut crb = crb_with(&FakeBackend::default());
    let mut wide = [0xffu8; 16];

    crb.read(CRB_BASE, CRB_SIZE - 2, &mut wide[..4]);
    crb.read(CRB_BASE, LOCALITY_SIZE - 2, &mut wide[..8]);
    crb.read(CRB_BASE, 0x3e, &mut wide[..4]);
    crb.read(CRB_BASE, u64::MAX - 1, &mut wide[..8]);
    crb.write(CRB_BASE, LOCALITY_SIZE - 2, &[1; 8]);
    crb.write(CRB_BASE, 0x4e, &[1; 4]);
    crb.write(CRB_BASE, u64::MAX, &[1; 4]);

    assert_eq!(wide[..8], [0; 8]);
    assert_eq!(crb.commands, 0);
}

/// Through the registers to a real swtpm (`swtpm socket`, started here): Startup, GetRandom,
/// PCR_Extend of PCR 16 in the SHA-256 bank and PCR_Read give SHA-256(zeros || digest).
#[test]
fn swtpm_extends_and_reads_a_pcr_through_the_crb() {
    if std::process::Command::new("swtpm")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP swtpm_extends_and_reads_a_pcr_through_the_crb: no swtpm");
        return;
    }
    let dir = std::env::temp_dir().join(format!("sluice-swtpm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let swtpm = swtpm::Swtpm::spawn(&dir).unwrap();
    let mut crb = TpmCrb::new(Box::new(swtpm));
    let digest: Vec<u8> = (0u8..32).collect();

    let startup = run_command(&mut crb, 0, &response(0x144, &[0, 0]));
    let random = run_command(&mut crb, 0, &response(0x17b, &[0, 16]));
    let extend = run_command(&mut crb, 0, &pcr_extend(16, &digest));
    let read = run_command(
        &mut crb,
        0,
        &response(0x17e, &[0, 0, 0, 1, 0, 0x0b, 3, 0, 0, 1]),
    );
    drop(crb);

    assert_eq!(startup, response(0, &[]));
    assert_eq!(
        &random[..HEADER_SIZE],
        &response(0, &random[HEADER_SIZE..])[..10]
    );
    assert_eq!(random.len(), HEADER_SIZE + 2 + 16, "{random:x?}");
    assert_eq!(extend[6..10], [0; 4], "{extend:x?}");
    assert_eq!(read[6..10], [0; 4], "{read:x?}");
    let mut chained = vec![0u8; 32];
    chained.extend_from_slice(&digest);
    assert_eq!(read[28..30], [0, 32], "{read:x?}");
    assert_eq!(read[30..62], sha256(&chained)[..], "{read:x?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// TPM2_PCR_Extend of `pcr` with one SHA-256 digest, password session (empty auth).
pub(crate) fn pcr_extend(pcr: u32, digest: &[u8]) -> Vec<u8> {
    let mut body = pcr.to_be_bytes().to_vec();
    body.extend_from_slice(&9u32.to_be_bytes());
    body.extend_from_slice(&0x4000_0009u32.to_be_bytes());
    body.extend_from_slice(&[0, 0, 0, 0, 0]);
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&0x000bu16.to_be_bytes());
    body.extend_from_slice(digest);
    let mut command = response(0x182, &body);
    command[..2].copy_from_slice(&[0x80, 0x02]);
    command
}

/// SHA-256 by coreutils (no hash crate in the workspace).
fn sha256(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn pcr16_read(crb: &mut TpmCrb) -> Vec<u8> {
    run_command(crb, 0, &response(0x17e, &[0, 0, 0, 1, 0, 0x0b, 3, 0, 0, 1]))
}

/// Snapshot and restore against real swtpms: PCR 16 extended on one, the device saved
/// (swtpm's blobs through CMD_GET_STATEBLOB) and restored into a device on a second swtpm
/// with an empty state directory (CMD_STOP, CMD_SET_STATEBLOB, CMD_INIT): the second reads the
/// same PCR 16 without a Startup of its own, the first keeps running after the save, and the
/// registers and the unread response in the buffer came along.
#[test]
fn a_saved_tpm_restored_on_another_swtpm_reads_the_same_pcr() {
    if std::process::Command::new("swtpm")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP a_saved_tpm_restored_on_another_swtpm_reads_the_same_pcr: no swtpm");
        return;
    }
    let dirs = ["a", "b"].map(|n| {
        let dir =
            std::env::temp_dir().join(format!("sluice-swtpm-save-{n}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    });
    let mut source = TpmCrb::new(Box::new(swtpm::Swtpm::spawn(&dirs[0]).unwrap()));
    let mut target = TpmCrb::new(Box::new(swtpm::Swtpm::spawn(&dirs[1]).unwrap()));
    let digest: Vec<u8> = (0u8..32).rev().collect();
    run_command(&mut source, 0, &response(0x144, &[0, 0]));
    run_command(&mut source, 0, &pcr_extend(16, &digest));
    let before = pcr16_read(&mut source);

    let saved = source.save_state().unwrap();
    let still_running = pcr16_read(&mut source);
    target.restore_state(&saved).unwrap();
    let mut unread = [0u8; 62];
    target.read(CRB_BASE, DATA_BUFFER, &mut unread);
    let after = pcr16_read(&mut target);
    drop((source, target));

    assert_eq!(before[6..10], [0; 4], "{before:x?}");
    assert_eq!(still_running, before);
    assert_eq!(saved.active, Some(0));
    assert!(!saved.tpm.permanent.data.is_empty() && !saved.tpm.volatile.data.is_empty());
    assert_eq!(
        unread[..],
        before[..],
        "the response in the buffer travelled"
    );
    assert_eq!(after, before, "PCR 16 on the restored TPM");
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A saved state with a short buffer or a locality beyond 4 is refused before the backend is
/// asked to restore anything.
#[test]
fn a_bad_saved_state_is_refused_before_the_backend_sees_it() {
    let mut crb = crb_with(&FakeBackend::default());
    let good = SavedTpm {
        active: Some(0),
        idle: true,
        fatal: false,
        cancel: 0,
        int_enable: 0,
        buffer: vec![0; BUFFER_SIZE],
        tpm: TpmBlobs::default(),
    };
    let short = SavedTpm {
        buffer: vec![0; 16],
        ..good.clone()
    };
    let locality = SavedTpm {
        active: Some(5),
        ..good.clone()
    };

    let short = crb.restore_state(&short).unwrap_err();
    let locality = crb.restore_state(&locality).unwrap_err();
    // The fake cannot restore: the error is the backend's, after the checks passed.
    let backend = crb.restore_state(&good).unwrap_err();

    assert!(short.contains("16 bytes"), "{short}");
    assert!(locality.contains("locality 5"), "{locality}");
    assert!(backend.contains("cannot restore"), "{backend}");
    assert_eq!(crb.active, None, "nothing changed");
}

/// swtpm's answers on the wire, played from the other end of the control socket: three
/// CMD_GET_STATEBLOB answers (the last TPM_RETRY: no savestate blob) become the blobs with
/// their flags; a blob announced beyond the limit is refused without reading it.
#[test]
fn state_blob_answers_parse_into_blobs_and_oversized_ones_are_refused() {
    use std::io::Write;
    let answer = |result: u32, flags: u32, total: u32, blob: &[u8]| {
        let mut bytes = Vec::new();
        for word in [result, flags, total, blob.len() as u32] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        bytes.extend_from_slice(blob);
        bytes
    };
    let swtpm_answering = |answers: &[u8]| {
        let (control, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (data, _) = std::os::unix::net::UnixStream::pair().unwrap();
        theirs.write_all(answers).unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        (swtpm::Swtpm::from_channels(control, data), theirs)
    };
    let mut good = answer(0, 2, 4, b"perm");
    good.extend(answer(0, 0, 3, b"vol"));
    good.extend(answer(0x800, 0, 0, b""));
    let mut oversized = answer(0, 0, 8 << 20, b"");
    oversized[12..16].copy_from_slice(&(8u32 << 20).to_be_bytes());

    let (mut swtpm, _peer) = swtpm_answering(&good);
    let blobs = swtpm.save_state().unwrap();
    let (mut swtpm, _peer) = swtpm_answering(&oversized);
    let refused = swtpm.save_state().unwrap_err();

    assert_eq!(
        blobs.permanent,
        StateBlob {
            flags: 2,
            data: b"perm".to_vec()
        }
    );
    assert_eq!(blobs.volatile.data, b"vol");
    assert_eq!(blobs.savestate, StateBlob::default());
    assert!(refused.contains("state blob of 8388608 bytes"), "{refused}");
}
