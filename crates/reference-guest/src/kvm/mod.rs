//! A KVM micro-VM: real vCPUs running a small 32-bit guest program over the
//! same RAM blocks the engine migrates.
//!
//! Guest RAM is the given regions back to back in guest-physical memory,
//! one KVM memory slot each (through [`migration_sys::KvmVm`], which also
//! owns their dirty logs). Page 0 holds the program (`program.S`); the rest
//! is shared out among the vCPUs, each owning a status page and the data
//! pages after it. Every vCPU rewrites its data pages in order, forever, and
//! checks each page holds what it left there before it rewrites it. Asked to,
//! it checks all of its pages and reports its own verdict through I/O ports:
//! the host only relays it ([`KvmGuest::self_check`]).
//!
//! The guest is 32-bit with paging off, so KVM's dirty log holds exactly the
//! pages the program wrote (a 64-bit guest would add its page-table pages).
//!
//! The host runs each vCPU on a thread of its own and sees it at every tick
//! (every 16 pages written): that is where the guest is paced to its dirty
//! rate, throttled, and paused. A paused vCPU has completed the I/O it exited
//! for (`immediate_exit`), so its registers are the whole of its state.

mod program;
mod state;

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migration_core::{Vm, VmError};
use migration_sys::{GuestRegion, KvmVm, PAGE_SIZE};

use program::{
    CHUNK_PAGES, COMMAND_CHECK, COMMAND_RUN, PORT_CHECKED, PORT_FIRST_BAD, PORT_MISMATCHES, PORT_PASS, PORT_TICK,
    PORT_VERDICT, PORT_YIELD,
};
use state::KvmState;
pub use state::{MAX_VCPUS, is_kvm_state};

/// Largest guest RAM of the micro-VM: its program addresses memory with 32 bits, and stays
/// below where a PC keeps its devices.
pub const MAX_KVM_RAM: u64 = 3 << 30;

/// How long a pause, the boot or a self-check may take before it is called a failure.
const WAIT: Duration = Duration::from_secs(120);

/// Failures of the KVM micro-VM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// What was asked of KVM.
        op: &'static str,
        /// What KVM answered.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error("guest memory setup failed")]
    Memory(#[from] migration_sys::SysError),
    /// The guest cannot be built as asked.
    #[error("invalid KVM guest: {0}")]
    Invalid(String),
    /// A vCPU stopped in a way the program never does.
    #[error("vCPU {vcpu} failed: {reason}")]
    Vcpu {
        /// Which vCPU.
        vcpu: usize,
        /// What happened.
        reason: String,
    },
    /// The guest did not get somewhere in time.
    #[error("the KVM guest did not {0} within {WAIT:?}")]
    Timeout(&'static str),
    /// The device state could not be loaded.
    #[error("cannot load the KVM guest's state")]
    State(#[from] crate::StateError),
    /// The operation needs the guest built (a destination before its state arrived has none).
    #[error("the KVM guest has no vCPUs yet")]
    NotBuilt,
    /// A vCPU thread could not be spawned.
    #[error("cannot spawn a vCPU thread")]
    Spawn(#[source] std::io::Error),
}

/// Whether KVM guests can run here: `/dev/kvm` opens and a VM can be created.
pub fn kvm_usable() -> Result<(), KvmError> {
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    Ok(())
}

/// For tests: true where KVM is usable, false (after saying why on stderr) where it is not.
///
/// # Panics
///
/// Where KVM is not usable and `MIGRATE_REQUIRE_KVM=1` asks for it: its absence then fails the
/// test.
pub fn kvm_for_tests() -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(err) if std::env::var("MIGRATE_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("MIGRATE_REQUIRE_KVM=1, but KVM is not usable: {err}")
        }
        Err(err) => {
            eprintln!("skipped: KVM is not usable here ({err}); MIGRATE_REQUIRE_KVM=1 makes this a failure");
            false
        }
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Kvm { op, source }
}

/// The guest's own verdict on its memory, as its vCPUs reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmVerdict {
    /// Data pages the self-check compared.
    pub pages_checked: u64,
    /// Pages that did not hold what the guest left there, seen while writing or checking.
    pub mismatches: u64,
    /// Guest-physical address of the first bad page, if any.
    pub first_bad: Option<u32>,
    /// Whether every vCPU reported "passed".
    pub passed: bool,
}

impl fmt::Display for KvmVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pages checked by the guest, {} mismatches",
            self.pages_checked, self.mismatches
        )?;
        if let Some(addr) = self.first_bad {
            write!(f, " (first at guest address {addr:#x})")?;
        }
        Ok(())
    }
}

/// One vCPU's report, filled port by port.
#[derive(Debug, Clone, Copy, Default)]
struct Report {
    checked: u32,
    mismatches: u32,
    first_bad: u32,
    passed: Option<bool>,
}

/// What the host and the vCPU threads share.
#[derive(Debug, Default)]
struct ControlState {
    /// Whether the vCPUs may run (false: paused, or asked to pause).
    run: bool,
    /// vCPUs parked (outside KVM_RUN with their I/O completed).
    parked: usize,
    /// Threads that must end.
    exit: bool,
    /// Per vCPU: a self-check asked for and not yet started.
    check_asked: Vec<bool>,
    /// Per vCPU: its last self-check report.
    reports: Vec<Report>,
    /// Per vCPU: the last pass it completed.
    passes: Vec<u32>,
    /// Percent of time the vCPUs are kept out of the guest.
    throttle: u8,
    /// The first vCPU failure.
    failure: Option<(usize, String)>,
}

#[derive(Debug, Default)]
struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Data pages written, over all vCPUs (counted per tick).
    pages_written: AtomicU64,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (bounded) until `done` holds; fails on a vCPU failure.
    fn wait_until(&self, what: &'static str, mut done: impl FnMut(&ControlState) -> bool) -> Result<(), KvmError> {
        let deadline = Instant::now() + WAIT;
        let mut state = self.lock();
        loop {
            if let Some((vcpu, reason)) = &state.failure {
                return Err(KvmError::Vcpu {
                    vcpu: *vcpu,
                    reason: reason.clone(),
                });
            }
            if done(&state) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(KvmError::Timeout(what));
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The VM itself once built: KVM's handles and the vCPUs.
struct Machine {
    /// Kept so the VM outlives its vCPUs.
    _vm: VmFd,
    memory: Arc<KvmVm>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
}

/// A KVM micro-VM over guest RAM regions, implementing [`Vm`].
pub struct KvmGuest {
    regions: Vec<Arc<GuestRegion>>,
    machine: Option<Machine>,
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
    dirty_rate: u64,
}

impl fmt::Debug for KvmGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmGuest")
            .field("regions", &self.regions.len())
            .field("vcpus", &self.machine.as_ref().map_or(0, |m| m.vcpus.len()))
            .field("dirty_rate", &self.dirty_rate)
            .finish()
    }
}

impl KvmGuest {
    /// Builds the source's micro-VM over `regions` with `vcpus` vCPUs and
    /// boots it: every data page holds its first generation, so all of guest
    /// RAM holds data. The guest is paused when this returns;
    /// [`KvmGuest::start`] runs it at `dirty_rate` bytes of page writes per
    /// second (0: it idles between self-checks).
    pub fn new(regions: Vec<Arc<GuestRegion>>, vcpus: usize, dirty_rate: u64) -> Result<Self, KvmError> {
        let layout = Layout::new(&regions, vcpus)?;
        regions[0].write(0, program::PROGRAM)?;
        let machine = Machine::build(&regions, vcpus)?;
        for (index, vcpu) in machine.vcpus.iter().enumerate() {
            let vcpu = vcpu.lock().unwrap_or_else(|p| p.into_inner());
            let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            flat_protected_mode(&mut sregs);
            vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            vcpu.set_regs(&layout.boot_regs(index))
                .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        // Boot: the host loads every data page with generation 1, as a VMM loads a guest
        // image; the vCPUs start at pass 1 (running the first pass in the guest would take
        // a millisecond a page here, see `flat_protected_mode`).
        layout.populate(&regions, vcpus)?;
        let mut guest = Self::with_machine(regions, machine, dirty_rate);
        guest.spawn()?;
        guest.pause_vcpus()?;
        Ok(guest)
    }

    /// The destination's micro-VM over received `regions`: it has no vCPUs
    /// until [`Vm::load_device_state`] builds them from the source's state,
    /// and it does not touch guest RAM before it runs.
    pub fn destination(regions: Vec<Arc<GuestRegion>>) -> Self {
        Self {
            regions,
            machine: None,
            control: Arc::new(Control::default()),
            threads: Vec::new(),
            dirty_rate: 0,
        }
    }

    fn with_machine(regions: Vec<Arc<GuestRegion>>, machine: Machine, dirty_rate: u64) -> Self {
        let vcpus = machine.vcpus.len();
        let control = Control::default();
        {
            let mut state = control.lock();
            state.check_asked = vec![false; vcpus];
            state.reports = vec![Report::default(); vcpus];
            // Booted (or booted by the source): every vCPU is past its
            // first pass.
            state.passes = vec![1; vcpus];
        }
        Self {
            regions,
            machine: Some(machine),
            control: Arc::new(control),
            threads: Vec::new(),
            dirty_rate,
        }
    }

    /// The memory side of the VM, for [`migration_core::KvmDirtyLog`].
    pub fn memory(&self) -> Option<Arc<KvmVm>> {
        self.machine.as_ref().map(|m| Arc::clone(&m.memory))
    }

    /// Number of vCPUs (0 before a destination loaded its state).
    pub fn vcpus(&self) -> usize {
        self.machine.as_ref().map_or(0, |m| m.vcpus.len())
    }

    /// Lets the guest run at its dirty rate (the same as [`Vm::resume`]).
    pub fn start(&mut self) -> Result<(), KvmError> {
        self.run_vcpus()
    }

    /// Data pages the guest has written so far (counted every 16 pages).
    pub fn writes(&self) -> u64 {
        self.control.pages_written.load(Ordering::Relaxed)
    }

    /// Waits (bounded by `timeout`) until the guest has written `at_least` pages; returns
    /// whether it did.
    pub fn wait_writes(&self, at_least: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.writes() < at_least {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let state = self.control.lock();
            let _ = self
                .control
                .changed
                .wait_timeout(state, (deadline - now).min(Duration::from_millis(50)));
        }
        true
    }

    /// Asks every vCPU to check all of its pages and waits for their verdicts. The guest must
    /// be running; it goes on writing afterwards.
    pub fn self_check(&self) -> Result<KvmVerdict, KvmError> {
        if self.machine.is_none() {
            return Err(KvmError::NotBuilt);
        }
        {
            let mut state = self.control.lock();
            state.check_asked.iter_mut().for_each(|a| *a = true);
            state.reports.iter_mut().for_each(|r| *r = Report::default());
        }
        self.control.changed.notify_all();
        self.control.wait_until("finish its self-check", |s| {
            s.reports.iter().all(|r| r.passed.is_some())
        })?;
        let state = self.control.lock();
        Ok(KvmVerdict {
            pages_checked: state.reports.iter().map(|r| u64::from(r.checked)).sum(),
            mismatches: state.reports.iter().map(|r| u64::from(r.mismatches)).sum(),
            first_bad: state.reports.iter().map(|r| r.first_bad).find(|&a| a != 0),
            passed: state.reports.iter().all(|r| r.passed == Some(true)),
        })
    }

    fn spawn(&mut self) -> Result<(), KvmError> {
        let machine = self.machine.as_ref().ok_or(KvmError::NotBuilt)?;
        let per_vcpu = self.dirty_rate / machine.vcpus.len() as u64;
        for (index, vcpu) in machine.vcpus.iter().enumerate() {
            let runner = VcpuRunner {
                index,
                vcpu: Arc::clone(vcpu),
                control: Arc::clone(&self.control),
                rate: per_vcpu,
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu-{index}"))
                .spawn(move || runner.run())
                .map_err(KvmError::Spawn)?;
            self.threads.push(thread);
        }
        Ok(())
    }

    fn run_vcpus(&mut self) -> Result<(), KvmError> {
        if self.machine.is_none() {
            return Err(KvmError::NotBuilt);
        }
        if self.threads.is_empty() {
            self.spawn()?;
        }
        self.control.lock().run = true;
        self.control.changed.notify_all();
        Ok(())
    }

    fn pause_vcpus(&self) -> Result<(), KvmError> {
        let vcpus = self.vcpus();
        self.control.lock().run = false;
        self.control.changed.notify_all();
        self.control.wait_until("pause", |s| s.parked == vcpus)
    }

    fn save(&self) -> Result<Vec<u8>, KvmError> {
        let machine = self.machine.as_ref().ok_or(KvmError::NotBuilt)?;
        let vcpus = machine
            .vcpus
            .iter()
            .map(|vcpu| {
                let vcpu = vcpu.lock().unwrap_or_else(|p| p.into_inner());
                Ok((
                    vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
                    vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
                ))
            })
            .collect::<Result<_, KvmError>>()?;
        Ok(KvmState {
            dirty_rate: self.dirty_rate,
            vcpus,
        }
        .encode())
    }

    fn load(&mut self, blob: &[u8]) -> Result<(), KvmError> {
        if self.machine.is_some() {
            return Err(KvmError::Invalid("the guest has vCPUs already".into()));
        }
        let state = KvmState::decode(blob)?;
        Layout::new(&self.regions, state.vcpus.len())?;
        let machine = Machine::build(&self.regions, state.vcpus.len())?;
        for (vcpu, (regs, sregs)) in machine.vcpus.iter().zip(&state.vcpus) {
            let vcpu = vcpu.lock().unwrap_or_else(|p| p.into_inner());
            vcpu.set_sregs(sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            vcpu.set_regs(regs).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        let regions = std::mem::take(&mut self.regions);
        *self = Self::with_machine(regions, machine, state.dirty_rate);
        Ok(())
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        self.control.lock().exit = true;
        self.control.changed.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Vm for KvmGuest {
    fn pause(&mut self) -> Result<(), VmError> {
        self.pause_vcpus()
            .map_err(|e| VmError::with_source("pausing the KVM guest", e))
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.run_vcpus()
            .map_err(|e| VmError::with_source("resuming the KVM guest", e))
    }

    fn save_device_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.save()
            .map_err(|e| VmError::with_source("saving the KVM guest's vCPU state", e))
    }

    fn load_device_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.load(state)
            .map_err(|e| VmError::with_source("loading the KVM guest's vCPU state", e))
    }

    fn throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.control.lock().throttle = percent.min(99);
        self.control.changed.notify_all();
        Ok(())
    }
}

impl Machine {
    /// A VM with `regions` back to back from guest-physical address 0, one slot each, and
    /// `vcpus` vCPUs.
    fn build(regions: &[Arc<GuestRegion>], vcpus: usize) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let memory = Arc::new(KvmVm::from_vm_fd(vm.as_raw_fd())?);
        let mut guest_addr = 0u64;
        for (slot, region) in regions.iter().enumerate() {
            memory.add_slot(slot as u32, guest_addr, Arc::clone(region))?;
            guest_addr += region.len() as u64;
        }
        let vcpus = (0..vcpus)
            .map(|id| {
                vm.create_vcpu(id as u64)
                    .map(|fd| Arc::new(Mutex::new(fd)))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { _vm: vm, memory, vcpus })
    }
}

/// Where each vCPU's pages are: page 0 holds the program, and the rest is shared out evenly,
/// each share a status page and its data pages.
struct Layout {
    share: u64,
}

impl Layout {
    fn new(regions: &[Arc<GuestRegion>], vcpus: usize) -> Result<Self, KvmError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(KvmError::Invalid(format!("{vcpus} vCPUs (1 to {MAX_VCPUS})")));
        }
        let bytes: u64 = regions.iter().map(|r| r.len() as u64).sum();
        if bytes > MAX_KVM_RAM {
            return Err(KvmError::Invalid(format!(
                "{bytes} bytes of RAM (at most {MAX_KVM_RAM}: the guest is 32-bit)"
            )));
        }
        if regions.first().is_none_or(|r| r.len() < PAGE_SIZE) {
            return Err(KvmError::Invalid("the first block must hold the program's page".into()));
        }
        let share = (bytes / PAGE_SIZE as u64).saturating_sub(1) / vcpus as u64;
        if share < 2 {
            return Err(KvmError::Invalid(format!(
                "{bytes} bytes of RAM is too little for {vcpus} vCPUs (each needs two pages)"
            )));
        }
        Ok(Self { share })
    }

    fn status_page(&self, index: usize) -> u64 {
        (1 + index as u64 * self.share) * PAGE_SIZE as u64
    }

    /// Writes generation 1 into every data page of every vCPU, the content the program
    /// gives it (word 0 the generation, the others generation * (address | 1)).
    fn populate(&self, regions: &[Arc<GuestRegion>], vcpus: usize) -> Result<(), KvmError> {
        let mut page = vec![0u8; PAGE_SIZE];
        for index in 0..vcpus {
            for data in 1..self.share {
                let addr = self.status_page(index) + data * PAGE_SIZE as u64;
                let word = (addr as u32) | 1;
                for (i, chunk) in page.chunks_exact_mut(4).enumerate() {
                    chunk.copy_from_slice(&(if i == 0 { 1 } else { word }).to_le_bytes());
                }
                let (region, offset) = locate(regions, addr)
                    .ok_or_else(|| KvmError::Invalid(format!("guest address {addr:#x} is outside guest RAM")))?;
                region.write(offset, &page)?;
            }
        }
        Ok(())
    }

    /// The registers vCPU `index` boots with: its status page and data pages, at pass 1.
    fn boot_regs(&self, index: usize) -> kvm_regs {
        let status = self.status_page(index);
        kvm_regs {
            rip: 0,
            rflags: 2,
            rbx: status,
            rbp: self.share - 1,
            rsi: 0,
            rdx: 1,
            rsp: status + PAGE_SIZE as u64,
            ..Default::default()
        }
    }
}

/// The region holding guest-physical address `addr` (regions lie back to back from 0), and the
/// offset in it.
fn locate(regions: &[Arc<GuestRegion>], addr: u64) -> Option<(&GuestRegion, usize)> {
    let mut start = 0u64;
    for region in regions {
        let end = start + region.len() as u64;
        if addr < end {
            return Some((region, (addr - start) as usize));
        }
        start = end;
    }
    None
}

/// 32-bit protected mode with flat 4 GiB code and data segments, paging off.
///
/// On this machine's KVM (PVM) a guest with paging off is emulated by the host, instruction
/// by instruction: the program rewrites a page in about a millisecond (its string
/// instructions are emulated whole, which is why it uses them). Paging on (PAE, or long mode
/// in compatibility mode with 2 MiB pages) was tried and ran slower still or did not run.
fn flat_protected_mode(sregs: &mut kvm_sregs) {
    let data = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 3,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cs = kvm_segment {
        selector: 0x08,
        type_: 11,
        ..data
    };
    sregs.cr0 = (sregs.cr0 | 1) & !(1 << 31);
}

/// A vCPU's thread: runs it, answers its ports, paces and parks it.
struct VcpuRunner {
    index: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    control: Arc<Control>,
    /// Page-write bytes per second of this vCPU once booted (0: idle).
    rate: u64,
}

/// What the thread does after an exit.
enum Next {
    Enter,
    Park,
}

impl VcpuRunner {
    fn run(self) {
        let mut parked = false;
        loop {
            {
                let mut state = self.control.lock();
                while !state.run && !state.exit {
                    if !parked {
                        parked = true;
                        state.parked += 1;
                        self.control.changed.notify_all();
                    }
                    state = self.control.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                if state.exit {
                    return;
                }
                if parked {
                    parked = false;
                    state.parked -= 1;
                }
            }
            if let Err(reason) = self.run_until_parked() {
                let mut state = self.control.lock();
                state.failure.get_or_insert((self.index, reason));
                state.exit = true;
                self.control.changed.notify_all();
                return;
            }
        }
    }

    /// Runs the vCPU until it should park; returns with its I/O completed.
    fn run_until_parked(&self) -> Result<(), String> {
        let mut vcpu = self.vcpu.lock().unwrap_or_else(|p| p.into_inner());
        let chunk_time = (self.rate > 0)
            .then(|| Duration::from_secs_f64((CHUNK_PAGES * PAGE_SIZE as u64) as f64 / self.rate as f64));
        let mut due = Instant::now();
        let mut entered = Instant::now();
        loop {
            let next = match vcpu.run() {
                Ok(VcpuExit::IoIn(PORT_TICK, data)) => {
                    let ran = entered.elapsed();
                    self.control.pages_written.fetch_add(CHUNK_PAGES, Ordering::Relaxed);
                    let (command, next) = self.tick(ran, chunk_time, &mut due);
                    put_u32(data, command);
                    next
                }
                Ok(VcpuExit::IoOut(port, data)) => self.report(port, get_u32(data)),
                Ok(exit) => return Err(format!("unexpected exit {exit:?}")),
                Err(err) => return Err(format!("KVM_RUN failed: {err}")),
            };
            if let Next::Park = next {
                return complete_io(&mut vcpu);
            }
            entered = Instant::now();
        }
    }

    /// At a tick: paces and throttles the vCPU (waiting until its next chunk is due), and
    /// answers what it should do next.
    fn tick(&self, ran: Duration, chunk_time: Option<Duration>, due: &mut Instant) -> (u32, Next) {
        let mut state = self.control.lock();
        let booted = state.passes[self.index] >= 1;
        let now = Instant::now();
        if booted {
            // Throttled to p%, the vCPU is kept out p/(100-p) of the time it ran.
            let p = u32::from(state.throttle);
            let throttle_until = now + ran * p / (100 - p);
            *due = match chunk_time {
                // Falling far behind (a pause, a slow host) restarts the pace, no burst.
                Some(chunk) => (*due + chunk).max(now.checked_sub(Duration::from_millis(100)).unwrap_or(now)),
                None => now,
            }
            .max(throttle_until);
        }
        loop {
            if !state.run || state.exit {
                return (COMMAND_RUN, Next::Park);
            }
            if std::mem::take(&mut state.check_asked[self.index]) {
                return (COMMAND_CHECK, Next::Enter);
            }
            let now = Instant::now();
            let idle = booted && chunk_time.is_none();
            if !idle && (!booted || now >= *due) {
                return (COMMAND_RUN, Next::Enter);
            }
            let wait = if idle { WAIT } else { *due - now };
            state = self
                .control
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Records what the guest reported on `port`.
    fn report(&self, port: u16, value: u32) -> Next {
        let mut state = self.control.lock();
        let index = self.index;
        match port {
            PORT_PASS => {
                state.passes[index] = value;
                self.control.changed.notify_all();
            }
            PORT_CHECKED => state.reports[index].checked = value,
            PORT_MISMATCHES => state.reports[index].mismatches = value,
            PORT_FIRST_BAD => state.reports[index].first_bad = value,
            PORT_VERDICT => {
                state.reports[index].passed = Some(value == 0);
                self.control.changed.notify_all();
            }
            // A pause point only (and ports the program does not use).
            PORT_YIELD => {}
            _ => {}
        }
        if state.run && !state.exit {
            Next::Enter
        } else {
            Next::Park
        }
    }
}

/// Completes the I/O the vCPU exited for without running guest code (`immediate_exit`), so
/// its registers hold all of its state.
fn complete_io(vcpu: &mut VcpuFd) -> Result<(), String> {
    vcpu.set_kvm_immediate_exit(1);
    let result = match vcpu.run() {
        Err(err) if err.errno() == libc::EINTR => Ok(()),
        Err(err) => Err(format!("completing I/O before a pause failed: {err}")),
        Ok(exit) => Err(format!("unexpected exit {exit:?} while completing I/O")),
    };
    vcpu.set_kvm_immediate_exit(0);
    result
}

fn put_u32(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&bytes[..n]);
}

fn get_u32(data: &[u8]) -> u32 {
    let mut bytes = [0; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(pages: &[usize]) -> Vec<Arc<GuestRegion>> {
        pages
            .iter()
            .map(|&p| Arc::new(GuestRegion::anonymous(p * PAGE_SIZE).expect("mmap")))
            .collect()
    }

    fn copy(from: &[Arc<GuestRegion>], to: &[Arc<GuestRegion>]) {
        let mut page = vec![0; PAGE_SIZE];
        for (from, to) in from.iter().zip(to) {
            for offset in (0..from.len()).step_by(PAGE_SIZE) {
                from.read(offset, &mut page).expect("read");
                to.write(offset, &page).expect("write");
            }
        }
    }

    /// The guest boots, runs, and its own check passes; a page changed behind its back makes
    /// the guest's verdict fail and name that page.
    #[test]
    fn the_guest_checks_itself_and_notices_a_bad_page() {
        if !kvm_for_tests() {
            return;
        }
        let regions = ram(&[512, 512]);
        let mut guest = KvmGuest::new(regions.clone(), 2, 16 << 20).expect("boots");
        guest.start().expect("runs");
        assert!(guest.wait_writes(guest.writes() + 64, WAIT), "the guest writes");
        let verdict = guest.self_check().expect("verdict");
        assert!(verdict.passed, "{verdict}");
        assert_eq!(verdict.mismatches, 0);
        // Each vCPU owns (1024 - 1) / 2 = 511 pages: a status page and 510 data pages.
        assert_eq!(verdict.pages_checked, 2 * 510);

        guest.pause().expect("pauses");
        // A data page of the second vCPU: page 1 + 511 is its status page.
        let bad = (1 + 511 + 7) * PAGE_SIZE;
        regions[1]
            .write(bad - 512 * PAGE_SIZE, &[0xee; 8])
            .expect("corrupt a page");
        guest.resume().expect("resumes");
        let verdict = guest.self_check().expect("verdict");
        assert!(!verdict.passed, "{verdict}");
        assert!(verdict.mismatches >= 1);
        assert_eq!(verdict.first_bad, Some(bad as u32));
    }

    /// The vCPUs' state moves to another VM over a copy of the memory, and the guest goes on
    /// there from where it stopped: its check passes and it keeps writing.
    #[test]
    fn the_guest_continues_from_its_saved_state_in_another_vm() {
        if !kvm_for_tests() {
            return;
        }
        let source = ram(&[300, 200]);
        let mut guest = KvmGuest::new(source.clone(), 3, 32 << 20).expect("boots");
        // Memory as it was at boot, before the writes to come.
        let stale = ram(&[300, 200]);
        copy(&source, &stale);
        guest.start().expect("runs");
        assert!(guest.wait_writes(guest.writes() + 256, WAIT), "the guest writes");
        guest.pause().expect("pauses");
        let state = guest.save_device_state().expect("saves");
        assert!(is_kvm_state(&state));

        let moved_ram = ram(&[300, 200]);
        copy(&source, &moved_ram);
        let mut moved = KvmGuest::destination(moved_ram);
        assert_eq!(moved.vcpus(), 0);
        moved.load_device_state(&state).expect("loads");
        assert_eq!(moved.vcpus(), 3);
        moved.resume().expect("runs");
        assert!(moved.wait_writes(64, WAIT), "the moved guest writes");
        let verdict = moved.self_check().expect("verdict");
        assert!(verdict.passed, "{verdict}");
        drop(guest);

        // The same state over memory that missed the writes since boot: the guest notices.
        let mut stale_guest = KvmGuest::destination(stale);
        stale_guest.load_device_state(&state).expect("loads");
        stale_guest.resume().expect("runs");
        let verdict = stale_guest.self_check().expect("verdict");
        assert!(!verdict.passed, "stale memory passed the guest's check: {verdict}");
        assert!(verdict.mismatches >= 256, "{verdict}");
    }

    /// KVM's dirty log, read through the engine's trait, reports the pages the vCPUs wrote
    /// and nothing while they are paused; the program's page is never among them.
    #[test]
    fn the_kvm_dirty_log_sees_what_the_vcpus_write() {
        use migration_core::{DirtyLog, KvmDirtyLog, Ram, RamBlock};
        if !kvm_for_tests() {
            return;
        }
        let regions = ram(&[256, 256]);
        let mut guest = KvmGuest::new(regions.clone(), 2, 8 << 20).expect("boots");
        let blocks = Ram::new(
            regions
                .iter()
                .enumerate()
                .map(|(i, r)| RamBlock::new(format!("b{i}"), Arc::clone(r)))
                .collect(),
        );
        let memory = guest.memory().expect("built");
        let mut log = KvmDirtyLog::start(Arc::clone(&memory), &blocks).expect("logging starts");
        let mut pages = std::collections::BTreeSet::new();
        let collect = |log: &mut KvmDirtyLog, pages: &mut std::collections::BTreeSet<u64>| {
            log.collect(&mut |block, first, count| {
                pages.extend((first..first + count).map(|p| u64::from(block.0) * 256 + p));
            })
            .expect("collect")
        };
        assert_eq!(collect(&mut log, &mut pages), 0, "a paused guest writes nothing");
        let before = guest.writes();
        guest.start().expect("runs");
        assert!(guest.wait_writes(before + 128, WAIT));
        guest.pause().expect("pauses");
        let written = guest.writes() - before;
        collect(&mut log, &mut pages);
        // Every page written is reported (status pages too, so at least as many).
        assert!(
            pages.len() as u64 >= written,
            "{} reported, {written} written",
            pages.len()
        );
        assert!(!pages.contains(&0), "the program's page is never written");
        assert!(pages.iter().all(|&p| p < 512));
        assert_eq!(
            collect(&mut log, &mut pages.clone()),
            0,
            "nothing is written while paused"
        );
        assert!(log.manual_protect() || memory.check_extension(168) == 0);
        drop(log);
        assert!(
            memory.slot_list().iter().all(|s| !s.logging),
            "logging stops with the log"
        );
    }

    #[test]
    fn refuses_layouts_it_cannot_run() {
        assert!(matches!(Layout::new(&ram(&[2]), 1), Err(KvmError::Invalid(_))));
        assert!(matches!(Layout::new(&ram(&[4]), 0), Err(KvmError::Invalid(_))));
        assert!(matches!(
            Layout::new(&ram(&[4]), MAX_VCPUS + 1),
            Err(KvmError::Invalid(_))
        ));
        assert_eq!(Layout::new(&ram(&[3]), 1).expect("fits").share, 2);
    }
}
