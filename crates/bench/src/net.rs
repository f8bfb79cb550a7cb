//! Host-side frame sources for the `net rx` scenarios: the guest kit counts whatever frames
//! arrive, so a thread feeds frames of the scenario's size into the tap (through an AF_PACKET
//! socket on the tap interface) or to QEMU's UDP socket netdev, paced so it does not starve the
//! emulated vCPU on a 2-core host.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// EtherType of the guest kit's test frames.
const ETHERTYPE: u16 = 0x88b5;
/// Frames per pacing tick; about 8000 frames/s, several times what an emulated guest receives.
const BURST: usize = 8;
const TICK: Duration = Duration::from_millis(1);
/// Longest wait for the tap to appear (sluice creates it while starting).
const TAP_WAIT: Duration = Duration::from_secs(60);

/// A running frame source; [`Feeder::stop`] ends it and returns the frames sent.
pub struct Feeder {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<u64>,
}

impl Feeder {
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

/// A broadcast Ethernet frame with `payload` bytes of the guest kit's EtherType.
pub fn frame(payload: usize) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend((0..payload).map(|i| i as u8));
    frame
}

fn spawn(send: impl FnMut() -> bool + Send + 'static) -> Feeder {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let mut send = send;
    let handle = thread::spawn(move || {
        let mut sent = 0;
        while !flag.load(Ordering::Relaxed) {
            for _ in 0..BURST {
                sent += u64::from(send());
            }
            thread::sleep(TICK);
        }
        sent
    });
    Feeder { stop, handle }
}

/// Feeds frames to QEMU's `-netdev socket,udp=...,localaddr=127.0.0.1:<port>`.
pub fn feed_udp(port: u16, payload: usize) -> std::io::Result<Feeder> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let bytes = frame(payload);
    Ok(spawn(move || {
        socket.send_to(&bytes, ("127.0.0.1", port)).is_ok()
    }))
}

/// An AF_PACKET socket addressed to one interface; closed on drop.
struct PacketSocket {
    fd: libc::c_int,
    address: libc::sockaddr_ll,
}

impl PacketSocket {
    fn open(ifindex: u32) -> Option<PacketSocket> {
        let protocol = ETHERTYPE.to_be();
        // SAFETY: plain socket creation; the fd is owned by the returned value.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        if fd < 0 {
            return None;
        }
        // SAFETY: an all-zero sockaddr_ll is valid; the fields below address the interface.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = i32::try_from(ifindex).ok()?;
        Some(PacketSocket { fd, address })
    }

    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: `frame` and `address` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const self.address).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        sent > 0
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed once.
        unsafe { libc::close(self.fd) };
    }
}

fn wait_for_interface(name: &str, stop: &AtomicBool) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    let deadline = Instant::now() + TAP_WAIT;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: `name` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index != 0 {
            return Some(index);
        }
        thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Feeds frames into tap `ifname` once sluice has created it.
pub fn feed_tap(ifname: String, payload: usize) -> Feeder {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let bytes = frame(payload);
    let handle = thread::spawn(move || {
        let Some(socket) = wait_for_interface(&ifname, &flag).and_then(PacketSocket::open) else {
            return 0;
        };
        let mut sent = 0;
        while !flag.load(Ordering::Relaxed) {
            for _ in 0..BURST {
                sent += u64::from(socket.send(&bytes));
            }
            thread::sleep(TICK);
        }
        sent
    });
    Feeder { stop, handle }
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> std::io::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_broadcast_with_the_guest_kit_ethertype_and_the_payload_size() {
        let bytes = frame(64);

        assert_eq!(bytes.len(), 14 + 64);
        assert_eq!(&bytes[..6], &[0xff; 6]);
        assert_eq!(&bytes[12..14], &[0x88, 0xb5]);
    }

    #[test]
    fn udp_feeder_delivers_frames_until_stopped() {
        let sink = UdpSocket::bind("127.0.0.1:0").expect("bind sink");
        sink.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let port = sink.local_addr().expect("addr").port();

        let feeder = feed_udp(port, 100).expect("feeder");
        let mut buffer = [0u8; 256];
        let received = sink.recv(&mut buffer).expect("a frame arrives");
        let sent = feeder.stop();

        assert_eq!(received, 114);
        assert!(sent >= 1);
    }
}
