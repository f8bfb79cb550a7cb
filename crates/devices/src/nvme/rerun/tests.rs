use super::*;
use crate::nvme::trace::{encode_header, encode_record};
use vmm_sys_util::tempfile::TempFile;

const NS: Namespace = Namespace {
    blocks: 64,
    block_shift: 9,
};

/// An SQE: `opcode` on namespace 1, `blocks` from `slba`.
fn sqe(opcode: u8, slba: u64, blocks: u16) -> [u8; 64] {
    let mut raw = [0u8; 64];
    raw[0] = opcode;
    raw[4..8].copy_from_slice(&1u32.to_le_bytes());
    raw[40..48].copy_from_slice(&slba.to_le_bytes());
    raw[48..50].copy_from_slice(&(blocks - 1).to_le_bytes());
    raw
}

fn command(sqe: [u8; 64], data: TracedData, status: Status, data_hash: u64) -> TracedCommand {
    TracedCommand {
        qid: 1,
        sqe,
        data,
        status: status.0,
        data_hash,
    }
}

fn write_log(name: &str, commands: &[TracedCommand]) -> TempFile {
    let file = TempFile::new_with_prefix(std::env::temp_dir().join(name)).unwrap();
    let mut bytes = encode_header(&NS);
    for c in commands {
        bytes.extend_from_slice(&encode_record(c));
    }
    std::fs::write(file.as_path(), bytes).unwrap();
    file
}

/// A write, its read-back, a read past the namespace and a read the walk refused.
fn logged(read_hash: u64) -> Vec<TracedCommand> {
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    vec![
        command(
            sqe(0x01, 3, 2),
            TracedData::ToDevice(data.clone()),
            Status::SUCCESS,
            0,
        ),
        command(
            sqe(0x02, 3, 2),
            TracedData::FromDevice(1024),
            Status::SUCCESS,
            read_hash,
        ),
        command(
            sqe(0x02, 64, 1),
            TracedData::None,
            Status::LBA_OUT_OF_RANGE,
            0,
        ),
        command(
            sqe(0x02, 0, 1),
            TracedData::None,
            Status::DATA_TRANSFER_ERROR,
            0,
        ),
    ]
}

fn written() -> u64 {
    fnv1a(&(0..1024u32).map(|i| (i * 7) as u8).collect::<Vec<_>>())
}

#[test]
fn a_write_its_read_back_and_a_range_error_rerun_and_a_walk_refusal_is_skipped() {
    let log = write_log("sluice-nq-ok-", &logged(written()));
    let report = rerun(log.as_path(), &RerunOptions::default()).unwrap();
    assert_eq!(report.mismatch, None);
    assert_eq!((report.matched, report.skipped), (3, 1));
}

#[test]
fn a_read_whose_data_differs_stops_the_rerun_there() {
    let log = write_log("sluice-nq-bad-", &logged(written() ^ 1));
    let report = rerun(log.as_path(), &RerunOptions::default()).unwrap();
    let mismatch = report.mismatch.expect("a mismatch");
    assert_eq!((mismatch.request, report.matched), (2, 1));
    assert!(
        mismatch.what.contains("1024 bytes read differ"),
        "{mismatch}"
    );
}

#[test]
fn seeds_carry_the_rewritten_command_and_its_data() {
    let commands = logged(written());
    let seed = nvme_command_seed(&commands[0]).unwrap();
    let cmd = Command(seed[1..65].try_into().unwrap());
    assert_eq!((seed[0], cmd.psdt(), cmd.opcode()), (0, 1, 0x01));
    assert_eq!(&cmd.sgl1()[..8], &SEED_DATA.to_le_bytes());
    assert_eq!(
        &seed[65 + SEED_DATA as usize..],
        match &commands[0].data {
            TracedData::ToDevice(bytes) => &bytes[..],
            _ => unreachable!(),
        }
    );
    crate::nvme::fuzz::nvme_command(&seed);
}
