//! vCPU threads: one per vCPU, each running KVM_RUN and dispatching exits to the PIO and MMIO
//! buses. Fatal exits end the VM with a register dump instead of a panic.

pub mod setup;
pub mod state;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use sluice_bus::Bus;
use sluice_devices::{ExitSink, GuestExit};

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// ACPI S5 or a KVM shutdown event.
    PowerOff,
    /// The guest asked for a reset (i8042, ACPI reset register, KVM reset event).
    Reset,
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u8),
    /// The VM cannot continue (triple fault, emulation failure, failed entry); the text says why
    /// and includes a register dump.
    Crash(String),
    /// The operator stopped the VM (SIGTERM / SIGINT to `sluice run`): devices stopped and
    /// metrics written as for any other end.
    Stopped { signal: i32 },
    /// The operator shut the VM down through the control API.
    Shutdown,
    /// The VM was live-migrated to another sluice, which runs it now.
    Migrated,
}

/// Shared run state: the first outcome wins and every vCPU thread then stops; in between, the
/// VM may be paused (every vCPU parked outside KVM_RUN) and resumed.
#[derive(Default)]
pub struct RunControl {
    outcome: Mutex<Option<VmOutcome>>,
    done: Condvar,
    stopping: AtomicBool,
    pause: Mutex<PauseState>,
    parked_changed: Condvar,
}

/// Which vCPU threads exist, whether a pause is asked for and how many have parked.
#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: usize,
    vcpus: Vec<libc::pthread_t>,
    /// A snapshot's request to the parked vCPUs: the MSRs to read, and each vCPU's state
    /// (by vCPU index) once it has read it.
    capture: Option<Capture>,
}

struct Capture {
    msrs: Arc<Vec<u32>>,
    states: Vec<Option<Result<state::VcpuState, String>>>,
}

/// Why a pause did not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    #[error("the VM is stopping")]
    Stopping,
    #[error("a vCPU did not leave KVM_RUN in time")]
    Timeout,
}

impl RunControl {
    pub fn finish(&self, outcome: VmOutcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.done.notify_all();
        // Parked vCPUs wake up to see the VM end.
        let _pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        self.parked_changed.notify_all();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Blocks until some vCPU or device decided how the VM ends.
    pub fn wait(&self) -> VmOutcome {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(outcome) = slot.clone() {
                return outcome;
            }
            slot = self.done.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Whether every vCPU is parked at the caller's request.
    pub fn is_paused(&self) -> bool {
        let pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        pause.requested && pause.parked == pause.vcpus.len()
    }

    /// Parks every vCPU outside KVM_RUN (devices keep running) and returns once all are
    /// parked, knocking them out of the guest with the kick signal meanwhile.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        pause.requested = true;
        loop {
            if self.is_stopping() {
                return Err(PauseError::Stopping);
            }
            if pause.parked == pause.vcpus.len() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(PauseError::Timeout);
            }
            for &thread in &pause.vcpus {
                // SAFETY: a vCPU thread registered itself and deregisters before it exits.
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
            pause = self
                .parked_changed
                .wait_timeout(pause, Duration::from_millis(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Lets parked vCPUs run the guest again.
    pub fn resume(&self) {
        let mut pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        pause.requested = false;
        self.parked_changed.notify_all();
    }

    /// A vCPU thread starts: it may be paused from now on.
    fn register_vcpu(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        pause.vcpus.push(me);
        self.parked_changed.notify_all();
    }

    /// A vCPU thread ends: a pause no longer waits for it or signals it.
    fn deregister_vcpu(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        pause.vcpus.retain(|&t| t != me);
        self.parked_changed.notify_all();
    }

    /// Called by a vCPU thread between two KVM_RUNs: waits here while a pause is asked for,
    /// reading its state into a snapshot's capture when one asks.
    fn park_while_paused(&self, index: u8, vcpu: &VcpuFd) {
        let mut pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        if !pause.requested {
            return;
        }
        pause.parked += 1;
        self.parked_changed.notify_all();
        while pause.requested && !self.is_stopping() {
            if let Some(capture) = pause.capture.as_mut() {
                if let Some(slot @ None) = capture.states.get_mut(usize::from(index)) {
                    let state = state::VcpuState::capture(vcpu, &capture.msrs);
                    *slot = Some(state.map_err(|e| e.to_string()));
                    self.parked_changed.notify_all();
                }
            }
            pause = self
                .parked_changed
                .wait(pause)
                .unwrap_or_else(PoisonError::into_inner);
        }
        pause.parked -= 1;
        self.parked_changed.notify_all();
    }

    /// The state of each of the `vcpus` vCPUs of a paused VM, read by the vCPU threads
    /// themselves (KVM state is read from the thread that owns the vCPU, while it is parked).
    pub fn capture_vcpus(
        &self,
        vcpus: usize,
        msrs: Arc<Vec<u32>>,
        timeout: Duration,
    ) -> Result<Vec<state::VcpuState>, String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut pause = self.pause.lock().unwrap_or_else(PoisonError::into_inner);
        if !pause.requested || pause.parked != pause.vcpus.len() {
            return Err("the VM is not paused".into());
        }
        pause.capture = Some(Capture {
            msrs,
            states: (0..vcpus).map(|_| None).collect(),
        });
        self.parked_changed.notify_all();
        loop {
            let done = pause
                .capture
                .as_ref()
                .is_some_and(|c| c.states.iter().all(Option::is_some));
            if done || self.is_stopping() || std::time::Instant::now() >= deadline {
                break;
            }
            pause = self
                .parked_changed
                .wait_timeout(pause, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let capture = pause.capture.take().map(|c| c.states).unwrap_or_default();
        capture
            .into_iter()
            .enumerate()
            .map(|(index, state)| match state {
                Some(Ok(state)) => Ok(state),
                Some(Err(e)) => Err(format!("vcpu{index}: {e}")),
                None => Err(format!("vcpu{index} did not give its state in time")),
            })
            .collect()
    }
}

impl ExitSink for RunControl {
    fn request_exit(&self, why: GuestExit) {
        self.finish(match why {
            GuestExit::PowerOff => VmOutcome::PowerOff,
            GuestExit::Reset => VmOutcome::Reset,
            GuestExit::DebugExit(v) => VmOutcome::DebugExit(v),
        });
    }
}

/// Userspace exits of the whole VM, by kind.
#[derive(Default, Debug)]
pub struct ExitStats {
    /// Wall-clock time (ns since the Unix epoch) of the VM's first userspace exit; 0 until then.
    /// Startup benchmarks use a guest whose first instruction exits.
    pub first_exit_unix_ns: AtomicU64,
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

impl ExitStats {
    pub fn total(&self) -> u64 {
        [&self.pio, &self.mmio, &self.interrupted, &self.other]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// What a vCPU thread needs to dispatch exits.
#[derive(Clone)]
pub struct ExitDispatch {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<RunControl>,
    pub stats: Arc<ExitStats>,
    /// Record or replay (crate::replay): sees, or answers instead of the buses, every PIO/MMIO
    /// exit.
    pub hook: Option<Arc<dyn ExitHook>>,
}

/// A PIO/MMIO access as the vCPU made it.
pub use crate::replay::format::ExitKind;

/// Takes over PIO/MMIO exits (crate::replay): `access` handles the access instead of the
/// buses (a read fills `data`), then `complete` runs with the vCPU, before it re-enters.
pub trait ExitHook: Send + Sync {
    fn access(&self, kind: ExitKind, addr: u64, data: &mut [u8], d: &ExitDispatch);
    fn complete(&self, vcpu: &VcpuFd, d: &ExitDispatch);
}

/// Signal used to knock a vCPU out of KVM_RUN when the VM stops.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The handler does nothing: its only job is to make KVM_RUN return EINTR.
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), ignore_kick) {
            tracing::warn!("cannot install the vCPU kick handler: {e}; stopping may be slow");
        }
    });
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    pub fn spawn(index: u8, vcpu: VcpuFd, dispatch: ExitDispatch) -> std::io::Result<Self> {
        Self::spawn_on(index, vcpu, dispatch, None)
    }

    /// [`VcpuThread::spawn`] pinned to the host CPUs `cpus` (`--cpus ...,affinity=`).
    pub fn spawn_on(
        index: u8,
        vcpu: VcpuFd,
        dispatch: ExitDispatch,
        cpus: Option<Vec<u32>>,
    ) -> std::io::Result<Self> {
        install_kick_handler();
        let kind = sluice_sandbox::ThreadKind::Vcpu;
        let handle = sluice_sandbox::spawn_on(kind, format!("vcpu{index}"), cpus, move || {
            run_vcpu(index, vcpu, &dispatch)
        })?;
        Ok(Self { handle })
    }

    /// Knocks the thread out of KVM_RUN until it exits, then joins it.
    pub fn stop(self) {
        use std::os::unix::thread::JoinHandleExt;
        while !self.handle.is_finished() {
            // SAFETY: the pthread id belongs to a thread we own and have not joined yet.
            unsafe { libc::pthread_kill(self.handle.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.handle.join();
    }
}

fn run_vcpu(index: u8, mut vcpu: VcpuFd, dispatch: &ExitDispatch) {
    let control = &dispatch.control;
    control.register_vcpu();
    while !control.is_stopping() {
        control.park_while_paused(index, &vcpu);
        if control.is_stopping() {
            break;
        }
        if let Some(outcome) = run_once(index, &mut vcpu, dispatch) {
            control.finish(outcome);
        }
    }
    control.deregister_vcpu();
}

/// Runs the vCPU until one exit; returns how the VM ends if this exit ends it.
fn run_once(index: u8, vcpu: &mut VcpuFd, d: &ExitDispatch) -> Option<VmOutcome> {
    let exit = match vcpu.run() {
        Ok(exit) => {
            note_first_exit(&d.stats);
            exit
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            d.stats.interrupted.fetch_add(1, Ordering::Relaxed);
            vcpu.set_kvm_immediate_exit(0);
            return None;
        }
        Err(e) => return Some(crash(vcpu, index, &format!("KVM_RUN failed: {e}"))),
    };
    // Set by the PIO/MMIO arms: the hook completes the exit once the borrow of the run area
    // has ended (it reads the vCPU's registers).
    let mut hooked = false;
    let outcome = match exit {
        VcpuExit::IoIn(port, data) => {
            d.stats.pio.fetch_add(1, Ordering::Relaxed);
            match &d.hook {
                Some(hook) => hook.access(ExitKind::PioIn, u64::from(port), data, d),
                None => {
                    d.pio.read(u64::from(port), data);
                }
            }
            hooked = true;
            None
        }
        VcpuExit::IoOut(port, data) => {
            d.stats.pio.fetch_add(1, Ordering::Relaxed);
            match &d.hook {
                Some(hook) => hook.access(ExitKind::PioOut, u64::from(port), &mut copy(data), d),
                None => {
                    d.pio.write(u64::from(port), data);
                }
            }
            hooked = true;
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            d.stats.mmio.fetch_add(1, Ordering::Relaxed);
            match &d.hook {
                Some(hook) => hook.access(ExitKind::MmioRead, addr, data, d),
                None => {
                    d.mmio.read(addr, data);
                }
            }
            hooked = true;
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            d.stats.mmio.fetch_add(1, Ordering::Relaxed);
            sluice_sandbox::fault_point("vcpu-mmio-write");
            match &d.hook {
                Some(hook) => hook.access(ExitKind::MmioWrite, addr, &mut copy(data), d),
                None => {
                    d.mmio.write(addr, data);
                }
            }
            hooked = true;
            None
        }
        VcpuExit::Intr => {
            d.stats.interrupted.fetch_add(1, Ordering::Relaxed);
            None
        }
        VcpuExit::SystemEvent(kind, _) => Some(system_event(vcpu, index, kind)),
        VcpuExit::Shutdown => Some(crash(vcpu, index, "triple fault (KVM_EXIT_SHUTDOWN)")),
        VcpuExit::FailEntry(reason, cpu) => Some(crash(
            vcpu,
            index,
            &format!("VM entry failed (KVM_EXIT_FAIL_ENTRY, reason {reason:#x}, cpu {cpu})"),
        )),
        VcpuExit::InternalError => {
            let detail = internal_error_detail(vcpu);
            Some(crash(
                vcpu,
                index,
                &format!("KVM_EXIT_INTERNAL_ERROR: {detail}"),
            ))
        }
        VcpuExit::Hlt => {
            // With the in-kernel LAPIC, HLT waits in the kernel; a HLT exit means the guest
            // halted with nothing left that could wake it.
            Some(crash(
                vcpu,
                index,
                "halted with interrupts off (KVM_EXIT_HLT)",
            ))
        }
        other => {
            d.stats.other.fetch_add(1, Ordering::Relaxed);
            let what = format!("unexpected exit {other:?}");
            Some(crash(vcpu, index, &what))
        }
    };
    if let (true, Some(hook)) = (hooked, &d.hook) {
        hook.complete(vcpu, d);
    }
    outcome
}

/// A write's bytes, so that a hook sees reads and writes alike as `&mut [u8]`.
fn copy(data: &[u8]) -> Vec<u8> {
    data.to_vec()
}

fn note_first_exit(stats: &ExitStats) {
    if stats.first_exit_unix_ns.load(Ordering::Relaxed) == 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let _ =
            stats
                .first_exit_unix_ns
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }
}

fn system_event(vcpu: &VcpuFd, index: u8, kind: u32) -> VmOutcome {
    match kind {
        KVM_SYSTEM_EVENT_SHUTDOWN => VmOutcome::PowerOff,
        KVM_SYSTEM_EVENT_RESET => VmOutcome::Reset,
        KVM_SYSTEM_EVENT_CRASH => crash(vcpu, index, "guest crash event"),
        other => crash(vcpu, index, &format!("unexpected system event {other}")),
    }
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

fn internal_error_detail(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let data: Vec<String> = internal
        .data
        .iter()
        .take((internal.ndata as usize).min(internal.data.len()))
        .map(|d| format!("{d:#x}"))
        .collect();
    let what = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
        "instruction emulation failed (on kvm_pvm: INT n/int3, XSAVE/XGETBV and CMPXCHG16B are not supported)"
    } else {
        "internal error"
    };
    format!(
        "{what}, suberror {}, data [{}]",
        internal.suberror,
        data.join(", ")
    )
}

fn crash(vcpu: &VcpuFd, index: u8, why: &str) -> VmOutcome {
    VmOutcome::Crash(format!("vcpu{index}: {why}\n{}", register_dump(vcpu)))
}

/// A readable dump of the general, control and segment registers.
pub fn register_dump(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    match vcpu.get_regs() {
        Ok(r) => {
            let _ = writeln!(
                out,
                "  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n  r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
                r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
            );
        }
        Err(e) => {
            let _ = writeln!(out, "  (registers unavailable: {e})");
        }
    }
    match vcpu.get_sregs() {
        Ok(s) => {
            let _ = writeln!(
                out,
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n  cs={:#x} (base {:#x}, l={}, db={}) ss={:#x} ds={:#x}\n  gdt={:#x}/{:#x} idt={:#x}/{:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base, s.cs.l, s.cs.db,
                s.ss.selector, s.ds.selector, s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
            );
        }
        Err(e) => {
            let _ = writeln!(out, "  (system registers unavailable: {e})");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use kvm_ioctls::Kvm;
    use sluice_bus::{read_le, BusDevice};
    use vm_memory::{Bytes, GuestAddress};

    /// Ends the VM with the byte written, like the debug-exit port.
    struct ExitPort(Arc<RunControl>);

    impl BusDevice for ExitPort {
        fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _: u64, _: u64, data: &[u8]) {
            self.0
                .request_exit(GuestExit::DebugExit(read_le(data) as u8));
        }
    }

    fn kvm() -> Option<Kvm> {
        match Kvm::new() {
            Ok(kvm) => Some(kvm),
            Err(e) => {
                println!("SKIP vcpu tests: /dev/kvm unusable: {e}");
                None
            }
        }
    }

    /// Real-mode code at 0x1000: the given bytes, with CS:IP = 0:0x1000.
    fn boot_real_mode(kvm: &Kvm, code: &[u8]) -> (kvm_ioctls::VmFd, VcpuFd, GuestRam) {
        let vm = kvm.create_vm().unwrap();
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.register(&vm).unwrap();
        ram.memory.write_slice(code, GuestAddress(0x1000)).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        (vm, vcpu, ram)
    }

    fn dispatch() -> ExitDispatch {
        ExitDispatch {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            control: Arc::new(RunControl::default()),
            stats: Arc::new(ExitStats::default()),
            hook: None,
        }
    }

    #[test]
    fn port_write_reaches_device_and_ends_vm() {
        let Some(kvm) = kvm() else { return };
        // mov al, 42; out 0xf4, al; hlt
        let (_vm, vcpu, _ram) = boot_real_mode(&kvm, &[0xb0, 42, 0xe6, 0xf4, 0xf4]);
        let d = dispatch();
        d.pio
            .insert(
                "exit",
                Arc::new(Mutex::new(ExitPort(d.control.clone()))),
                0xf4,
                1,
            )
            .unwrap();

        let thread = VcpuThread::spawn(0, vcpu, d.clone()).unwrap();
        let outcome = d.control.wait();
        thread.stop();

        assert_eq!(outcome, VmOutcome::DebugExit(42));
        assert_eq!(d.stats.pio.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn emulation_failure_is_a_crash_with_register_dump_not_a_panic() {
        let Some(kvm) = kvm() else { return };
        // hlt with interrupts disabled: cli; hlt — without an in-kernel irqchip KVM exits HLT.
        let (_vm, vcpu, _ram) = boot_real_mode(&kvm, &[0xfa, 0xf4]);
        let d = dispatch();

        let thread = VcpuThread::spawn(0, vcpu, d.clone()).unwrap();
        let outcome = d.control.wait();
        thread.stop();

        let VmOutcome::Crash(text) = outcome else {
            panic!("expected a crash, got {outcome:?}")
        };
        assert!(text.contains("KVM_EXIT_HLT"), "{text}");
        assert!(text.contains("rip=0x0000000000001002"), "{text}");
    }

    #[test]
    fn stop_interrupts_a_spinning_vcpu() {
        let Some(kvm) = kvm() else { return };
        // jmp $ — spins forever in the guest.
        let (_vm, vcpu, _ram) = boot_real_mode(&kvm, &[0xeb, 0xfe]);
        let d = dispatch();
        let thread = VcpuThread::spawn(0, vcpu, d.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(20));

        d.control.finish(VmOutcome::PowerOff);
        thread.stop();

        assert!(d.stats.interrupted.load(Ordering::Relaxed) >= 1);
    }

    /// The counter the pause test's guest keeps incrementing at 0x2000.
    fn guest_counter(ram: &GuestRam) -> u32 {
        ram.memory.read_obj(GuestAddress(0x2000)).unwrap()
    }

    #[test]
    fn a_paused_vcpu_stops_running_the_guest_until_resumed() {
        let Some(kvm) = kvm() else { return };
        // 1: inc word [0x2000]; jmp 1b
        let (_vm, vcpu, ram) = boot_real_mode(&kvm, &[0xff, 0x06, 0x00, 0x20, 0xeb, 0xfa]);
        let d = dispatch();
        let thread = VcpuThread::spawn(0, vcpu, d.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(20));

        d.control.pause(Duration::from_secs(5)).unwrap();
        let paused_at = guest_counter(&ram);
        std::thread::sleep(Duration::from_millis(50));
        let still = guest_counter(&ram);
        let paused = d.control.is_paused();
        d.control.resume();
        std::thread::sleep(Duration::from_millis(50));
        let resumed = guest_counter(&ram);
        d.control.finish(VmOutcome::PowerOff);
        thread.stop();

        assert!(paused);
        assert_eq!(paused_at, still, "the guest ran while paused");
        assert_ne!(resumed, still, "the guest did not run again after resume");
        assert!(!d.control.is_paused());
    }

    #[test]
    fn a_vm_ends_while_paused() {
        let Some(kvm) = kvm() else { return };
        let (_vm, vcpu, _ram) = boot_real_mode(&kvm, &[0xeb, 0xfe]);
        let d = dispatch();
        let thread = VcpuThread::spawn(0, vcpu, d.clone()).unwrap();
        d.control.pause(Duration::from_secs(5)).unwrap();

        d.control.finish(VmOutcome::PowerOff);
        thread.stop();

        assert_eq!(
            d.control.pause(Duration::from_millis(10)),
            Err(PauseError::Stopping)
        );
    }
}
