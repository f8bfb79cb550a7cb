//! [`E1000`]: the 82540EM as a PCI function (8086:100e, class 020000, INTA), and its receive
//! worker.
//!
//! Threads: transmit runs on the vCPU thread that writes TDT (the write is trapped anyway, and
//! the frames of one kick go out in ring order under the device lock with no hand-off to another
//! thread; a tap write does not block). Receive runs in one worker thread that waits in epoll on
//! the tap fd and an eventfd the registers signal when the guest gives buffers (RDT), enables
//! receive (RCTL) or resets the device: frames arrive when the guest is not touching the device,
//! so only a thread of our own can take them. When the ring is full the worker stops reading the
//! tap (frames wait in the tap's queue, as in a NIC's FIFO) and takes the tap fd out of the epoll
//! set until the next wake-up, so it never spins.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use sluice_dma::DmaSpace;
use sluice_pci::{
    BarSpec, ConfigSpace, InterruptPin, PciDevice, PciError, PciIds, PciIntx, COMMAND,
    COMMAND_BUS_MASTER,
};
use sluice_virtio::DeviceMetrics;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use serde::{Deserialize, Serialize};

use super::core::{E1000Core, Rx, SavedCore};
use super::eeprom::Eeprom;
use super::regs::{exit_counter, COUNTER_IO, COUNTER_NAMES, IO_SIZE, MMIO_SIZE};
use crate::net::header::MAX_PACKET_LEN;
use crate::net::{NetBackend, NET_HDR_LEN};

pub const VENDOR_ID: u16 = 0x8086;
/// 82540EM (desktop).
pub const DEVICE_ID: u16 = 0x100e;
/// Intel PRO/1000 MT Desktop Adapter.
pub const SUBSYSTEM_ID: u16 = 0x001e;
const CLASS_ETHERNET: u32 = 0x02_0000;
const REVISION: u8 = 3;
const MMIO_BAR: usize = 0;
const IO_BAR: usize = 1;

const TOKEN_TAP: u64 = 0;
const TOKEN_WAKE: u64 = 1;
const TOKEN_STOP: u64 = 2;
/// After a failed tap read the worker leaves the tap alone this long (a tap that keeps failing
/// while it polls readable would otherwise spin the worker).
const READ_ERROR_BACKOFF_MS: i32 = 100;

/// The PCI function.
pub struct E1000 {
    name: String,
    config: ConfigSpace,
    intx: Arc<PciIntx>,
    core: Arc<Mutex<E1000Core>>,
    metrics: Arc<DeviceMetrics>,
    worker: Option<RxWorker>,
}

fn lock(core: &Mutex<E1000Core>) -> MutexGuard<'_, E1000Core> {
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

impl E1000 {
    /// A NIC with address `mac` on `backend` (queue 0), doing DMA through `dma`. Call
    /// [`E1000::start_receiving`] to start the receive worker.
    pub fn new(
        name: impl Into<String>,
        mac: [u8; 6],
        backend: Arc<dyn NetBackend>,
        dma: DmaSpace,
    ) -> Result<Self, PciError> {
        let name = name.into();
        let ids = PciIds {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            class_code: CLASS_ETHERNET,
            revision_id: REVISION,
            subsystem_vendor_id: VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
        };
        let mut config = ConfigSpace::new(&ids);
        config.add_bar(MMIO_BAR, BarSpec::mem32(MMIO_SIZE))?;
        config.add_bar(IO_BAR, BarSpec::io(IO_SIZE))?;
        let intx = Arc::new(PciIntx::new(InterruptPin::IntA));
        intx.install(&mut config);
        let metrics = Arc::new(DeviceMetrics::with_counters(name.clone(), 2, COUNTER_NAMES));
        let eeprom = Eeprom::new(mac, VENDOR_ID, DEVICE_ID, SUBSYSTEM_ID);
        let core = E1000Core::new(mac, eeprom, intx.clone(), dma, backend, metrics.clone());
        Ok(Self {
            name,
            config,
            intx,
            core: Arc::new(Mutex::new(core)),
            metrics,
            worker: None,
        })
    }

    /// Starts the receive worker on `backend` (the same one the device transmits on).
    pub fn start_receiving(&mut self, backend: Arc<dyn NetBackend>) -> io::Result<()> {
        if self.worker.is_none() {
            self.worker = Some(RxWorker::start(&self.name, self.core.clone(), backend)?);
        }
        Ok(())
    }

    pub fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }

    /// The NIC in a snapshot: its config space and the core ([`SavedCore`]). Frames stay in
    /// the tap from here until the VM runs on ([`PciDevice::resume_after_save`]).
    fn save(&mut self) -> Result<serde_json::Value, String> {
        let mut core = lock(&self.core);
        core.hold_receive(true);
        let saved = SavedE1000 {
            config: self.config.bytes().to_vec(),
            core: core.save(),
        };
        serde_json::to_value(saved).map_err(|e| e.to_string())
    }

    /// Puts back what [`E1000::save`] returned; receiving waits until the vCPUs run.
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let saved = SavedE1000::deserialize(state).map_err(|e| e.to_string())?;
        self.config
            .restore_bytes(&saved.config)
            .map_err(|e| e.to_string())?;
        self.intx.config_written(&self.config);
        let bus_master = self.config.read_u16(COMMAND) & COMMAND_BUS_MASTER != 0;
        let mut core = lock(&self.core);
        core.hold_receive(true);
        core.restore(
            &saved.core,
            |mac| Eeprom::new(mac, VENDOR_ID, DEVICE_ID, SUBSYSTEM_ID),
            bus_master,
        )
    }

    /// The device state, for tests that drive the registers directly.
    pub fn core(&self) -> Arc<Mutex<E1000Core>> {
        self.core.clone()
    }
}

impl Drop for E1000 {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

impl PciDevice for E1000 {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        self.intx.patch_status_read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        self.intx.config_written(&self.config);
        if offset <= COMMAND + 1 && offset + data.len() > COMMAND {
            let master = self.config.read_u16(COMMAND) & COMMAND_BUS_MASTER != 0;
            lock(&self.core).set_bus_master(master);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() != 4 {
            return;
        }
        let mut core = lock(&self.core);
        let value = match bar {
            MMIO_BAR => match u32::try_from(offset) {
                Ok(offset) => {
                    core.count_exit(exit_counter(offset));
                    core.read(offset)
                }
                Err(_) => u32::MAX,
            },
            IO_BAR => {
                core.count_exit(COUNTER_IO);
                core.io_read(offset)
            }
            _ => u32::MAX,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        let mut core = lock(&self.core);
        match bar {
            MMIO_BAR => {
                if let Ok(offset) = u32::try_from(offset) {
                    core.count_exit(exit_counter(offset));
                    core.write(offset, value);
                }
            }
            IO_BAR => {
                core.count_exit(COUNTER_IO);
                core.io_write(offset, value);
            }
            _ => {}
        }
    }

    fn intx(&self) -> Option<Arc<PciIntx>> {
        Some(self.intx.clone())
    }

    fn save_state(&mut self) -> Option<Result<serde_json::Value, String>> {
        Some(self.save())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.restore(state)
    }

    fn resume_after_save(&mut self) {
        lock(&self.core).hold_receive(false);
    }
}

#[derive(Serialize, Deserialize)]
struct SavedE1000 {
    config: Vec<u8>,
    core: SavedCore,
}

/// The receive thread and how to stop it.
struct RxWorker {
    stop: Arc<EventFd>,
    thread: JoinHandle<()>,
}

impl RxWorker {
    fn start(
        name: &str,
        core: Arc<Mutex<E1000Core>>,
        backend: Arc<dyn NetBackend>,
    ) -> io::Result<Self> {
        let tap = backend
            .queue_fd(0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no tap queue 0"))?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            tap,
            EpollEvent::new(EventSet::IN, TOKEN_TAP),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        lock(&core).set_rx_wake(wake.clone());
        let state = RxLoop {
            core,
            backend,
            epoll,
            tap,
            wake,
            packet: vec![0; MAX_PACKET_LEN],
            pending: None,
            tap_armed: true,
            read_failed: false,
        };
        let thread = sluice_sandbox::spawn(
            sluice_sandbox::ThreadKind::QueueWorker,
            format!("{name}-rx"),
            move || state.run(),
        )?;
        Ok(Self { stop, thread })
    }

    fn stop(self) {
        if let Err(e) = self.stop.write(1) {
            tracing::warn!("e1000: stopping the receive worker failed: {e}");
            return;
        }
        let _ = self.thread.join();
    }
}

struct RxLoop {
    core: Arc<Mutex<E1000Core>>,
    backend: Arc<dyn NetBackend>,
    epoll: Epoll,
    tap: i32,
    wake: Arc<EventFd>,
    packet: Vec<u8>,
    /// Length of a packet read from the tap that found no free descriptor.
    pending: Option<usize>,
    tap_armed: bool,
    /// The last tap read failed: wait for a wake-up or the back-off before reading again.
    read_failed: bool,
}

impl RxLoop {
    fn run(mut self) {
        let mut events = [EpollEvent::default(); 3];
        loop {
            self.drain();
            if let Err(e) = self.arm_tap(self.pending.is_none() && !self.read_failed) {
                tracing::error!("e1000: receive worker cannot watch the tap: {e}");
                return;
            }
            let timeout = if self.read_failed {
                READ_ERROR_BACKOFF_MS
            } else {
                -1
            };
            let count = match self.epoll.wait(timeout, &mut events) {
                Ok(0) => {
                    self.read_failed = false;
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("e1000: receive worker epoll failed: {e}");
                    return;
                }
            };
            for event in &events[..count] {
                match event.data() {
                    TOKEN_STOP => return,
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        self.read_failed = false;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Moves frames from the tap into the ring until either runs dry.
    fn drain(&mut self) {
        if self.read_failed {
            return;
        }
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.backend.read_packet(0, &mut self.packet) {
                    Ok(Some(len)) => len,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!("e1000: tap read failed: {e}");
                        self.read_failed = true;
                        return;
                    }
                },
            };
            let frame = self.packet.get(NET_HDR_LEN..len).unwrap_or_default();
            let outcome = lock(&self.core).receive(frame);
            if outcome == Rx::NoBuffers {
                self.pending = Some(len);
                return;
            }
            self.pending = None;
        }
    }

    fn arm_tap(&mut self, armed: bool) -> io::Result<()> {
        if armed == self.tap_armed {
            return Ok(());
        }
        let events = if armed {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        self.epoll.ctl(
            ControlOperation::Modify,
            self.tap,
            EpollEvent::new(events, TOKEN_TAP),
        )?;
        self.tap_armed = armed;
        Ok(())
    }
}
