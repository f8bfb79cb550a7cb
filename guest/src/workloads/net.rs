//! The network workloads (`w=net` on virtio-net, `w=e1000` on an e1000), independent of the
//! NIC: test frames, the tx / rx / echo loops and the RESULT line. A driver supplies a
//! [`NetPort`]; the loops run in ring 3 like every data path.
//!
//! Frames are broadcast with EtherType 0x88b5 (local experimental) and a payload of sequence
//! number plus a pattern, so `echo` can check what the peer sent back (MAC addresses may be
//! swapped).

use crate::arch::ring3;
use crate::cmdline::{NetDir, NetParams};
use crate::time::{now_ns, Deadline};
use crate::workloads::stats::Histogram;
use crate::workloads::Outcome;
use alloc::vec::Vec;

pub const ETH_HDR: usize = 14;
pub const ETHERTYPE: u16 = 0x88b5;

/// What the workloads need from a NIC driver.
pub trait NetPort {
    type Error: core::fmt::Debug;

    fn mac(&self) -> [u8; 6];
    fn timeout_ms(&self) -> u64;
    /// Queues one frame for transmission (waiting for room if needed).
    fn send(&mut self, frame: &[u8]) -> Result<(), Self::Error>;
    /// Waits for one received frame (without any device header) and hands it to `f`.
    fn receive<T>(&mut self, f: impl FnOnce(&[u8]) -> T) -> Result<T, Self::Error>;
    /// Waits until every queued frame was sent.
    fn drain_tx(&mut self) -> Result<(), Self::Error>;
    /// The error for a workload-level timeout (`what` names the step).
    fn timeout(what: &'static str) -> Self::Error;
}

/// The frame for sequence number `seq` with `size` payload bytes.
pub fn build_frame(mac: &[u8; 6], seq: u64, size: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HDR + size);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(mac);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(&seq.to_le_bytes());
    frame.extend((8..size).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8)));
    frame
}

/// Whether `frame` is our echo of `expected` (MAC addresses ignored).
fn echo_matches(frame: &[u8], expected: &[u8]) -> bool {
    frame.len() >= expected.len() && frame[12..expected.len()] == expected[12..]
}

fn is_ours(frame: &[u8]) -> bool {
    frame.len() >= ETH_HDR + 8 && frame[12..14] == ETHERTYPE.to_be_bytes()
}

#[derive(Default)]
pub struct Counts {
    pub frames: u64,
    pub bytes: u64,
    pub errors: u64,
}

fn run_echo<P: NetPort>(
    port: &mut P,
    p: &NetParams,
    hist: &mut Histogram,
) -> Result<Counts, P::Error> {
    let mut counts = Counts::default();
    let mac = port.mac();
    for seq in 0..p.frames {
        let frame = build_frame(&mac, seq, p.size as usize);
        let sent = now_ns();
        port.send(&frame)?;
        let deadline = Deadline::after_ms(port.timeout_ms());
        loop {
            let (ours, matches, seq_seen) = port.receive(|got| {
                let seq_seen = got
                    .get(ETH_HDR..ETH_HDR + 8)
                    .map(|b| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)));
                (is_ours(got), echo_matches(got, &frame), seq_seen)
            })?;
            if ours && seq_seen == Some(seq) {
                hist.record(now_ns() - sent);
                counts.frames += 1;
                counts.bytes += frame.len() as u64;
                counts.errors += u64::from(!matches);
                break;
            }
            if deadline.expired() {
                return Err(P::timeout("net echo"));
            }
        }
    }
    Ok(counts)
}

fn run_tx<P: NetPort>(port: &mut P, p: &NetParams) -> Result<Counts, P::Error> {
    let mut counts = Counts::default();
    let mac = port.mac();
    for seq in 0..p.frames {
        let frame = build_frame(&mac, seq, p.size as usize);
        port.send(&frame)?;
        counts.frames += 1;
        counts.bytes += frame.len() as u64;
    }
    port.drain_tx()?;
    Ok(counts)
}

fn run_rx<P: NetPort>(port: &mut P, p: &NetParams) -> Result<Counts, P::Error> {
    let mut counts = Counts::default();
    while counts.frames < p.frames {
        let len = port.receive(|got| got.len())?;
        counts.frames += 1;
        counts.bytes += len as u64;
    }
    Ok(counts)
}

/// What the loops measured.
pub struct Measured {
    pub ring: u8,
    pub counts: Counts,
    pub elapsed_ns: u64,
    pub hist: Histogram,
}

/// Runs `p.dir` on `port` in the workload ring.
pub fn run<P: NetPort>(port: &mut P, p: &NetParams) -> Result<Measured, P::Error> {
    let mut hist = Histogram::new();
    let start = now_ns();
    let (ring, counts) = ring3::run_workload_code(|| {
        let counts = match p.dir {
            NetDir::Echo => run_echo(port, p, &mut hist),
            NetDir::Tx => run_tx(port, p),
            NetDir::Rx => run_rx(port, p),
        };
        (ring3::current_ring(), counts)
    });
    let counts = counts?;
    Ok(Measured {
        ring,
        counts,
        elapsed_ns: now_ns() - start,
        hist,
    })
}

/// Prints the RESULT line; `transport` is extra JSON fields of the NIC (`"vq":"split"`).
pub fn report(
    workload: &str,
    p: &NetParams,
    m: &Measured,
    transport: &str,
    notifies: u64,
    interrupts: u64,
) -> Outcome {
    let counts = &m.counts;
    let pass = counts.errors == 0 && counts.frames == p.frames;
    let verify = match p.dir {
        NetDir::Echo if counts.errors == 0 => "ok",
        NetDir::Echo => "fail",
        _ => "n/a",
    };
    crate::println!(
        "RESULT {{\"workload\":\"{}\",\"ring\":{},\"dir\":\"{}\",\"size\":{},\"mode\":\"{}\",{},\"frames\":{},\"ops\":{},\"bytes\":{},\"elapsed_ns\":{},\"lat_ns\":{},\"notifies\":{},\"interrupts\":{},\"errors\":{},\"verify\":\"{}\",\"pass\":{}}}",
        workload, m.ring, p.dir.name(), p.size, p.mode.name(), transport, counts.frames, counts.frames, counts.bytes, m.elapsed_ns, m.hist.json(),
        notifies, interrupts, counts.errors, verify, pass
    );
    if pass {
        Outcome::Pass
    } else {
        Outcome::Fail
    }
}
