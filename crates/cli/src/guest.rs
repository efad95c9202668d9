//! The guests the CLI migrates: the synthetic guest (writer threads) or the
//! KVM micro-VM (real vCPUs), on either side.

use anyhow::{Context, Result};
use clap::ValueEnum;
use migration_core::{DirtyLog, KernelDirtyLog, KvmDirtyLog, Ram, Vm, VmError};
use migration_sys::GuestRegion;
use reference_guest::SyntheticGuest;
use reference_guest::kvm::{KvmGuest, KvmVerdict, is_kvm_state};
use std::sync::Arc;
use std::time::Duration;

/// Which guest runs over guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestKind {
    /// Writer threads standing in for vCPUs; the kernel tracks their writes.
    Synthetic,
    /// A KVM micro-VM: real vCPUs running a 32-bit program that checks its
    /// own pages; KVM's dirty log tracks them. Needs /dev/kvm.
    Kvm,
}

/// The source's guest.
pub enum SourceGuest {
    Synthetic(SyntheticGuest),
    Kvm(KvmGuest),
}

impl SourceGuest {
    /// Starts tracking the guest's writes to `ram` (before it runs: none goes unseen).
    pub fn dirty_log(&self, ram: &Ram) -> Result<Box<dyn DirtyLog>> {
        Ok(match self {
            Self::Synthetic(_) => Box::new(KernelDirtyLog::start(ram).context("starting kernel dirty tracking")?),
            Self::Kvm(guest) => {
                let memory = guest.memory().context("the KVM guest has no memory slots")?;
                Box::new(KvmDirtyLog::start(memory, ram).context("starting KVM dirty logging")?)
            }
        })
    }

    /// Lets the guest run.
    pub fn start(&mut self) -> Result<()> {
        match self {
            Self::Synthetic(guest) => guest.start().context("starting the synthetic guest"),
            Self::Kvm(guest) => guest.start().context("starting the KVM guest"),
        }
    }

    /// Pages written so far.
    pub fn writes(&self) -> u64 {
        match self {
            Self::Synthetic(guest) => guest.writes(),
            Self::Kvm(guest) => guest.writes(),
        }
    }

    /// Waits (bounded) until `at_least` pages were written.
    pub fn wait_writes(&self, at_least: u64, timeout: Duration) -> bool {
        match self {
            Self::Synthetic(guest) => guest.wait_writes(at_least, timeout),
            Self::Kvm(guest) => guest.wait_writes(at_least, timeout),
        }
    }

    fn vm(&mut self) -> &mut dyn Vm {
        match self {
            Self::Synthetic(guest) => guest,
            Self::Kvm(guest) => guest,
        }
    }
}

impl Vm for SourceGuest {
    fn pause(&mut self) -> Result<(), VmError> {
        self.vm().pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.vm().resume()
    }
    fn save_device_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.vm().save_device_state()
    }
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.vm().load_device_state(state)
    }
    fn throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.vm().throttle(percent)
    }
}

/// The destination's guest: which kind it is shows in the device state the
/// source sends. The synthetic guest is built ahead (its page table takes a
/// while for a large guest, which must not count as downtime); a KVM guest
/// is built when its state arrives.
pub enum DestGuest {
    Waiting(Box<SyntheticGuest>, Vec<Arc<GuestRegion>>),
    Synthetic(SyntheticGuest),
    Kvm(KvmGuest),
}

/// What the destination's guest says of itself after it ran.
pub enum Verdict {
    /// The synthetic guest's check of every page against its generation table.
    Synthetic(Option<reference_guest::CheckReport>),
    /// The KVM guest's own report, through its I/O ports.
    Kvm(Result<KvmVerdict>),
}

impl Verdict {
    /// Whether the guest checked itself and passed.
    pub fn passed(&self) -> bool {
        match self {
            Self::Synthetic(check) => check.is_some_and(|c| c.is_ok()),
            Self::Kvm(verdict) => verdict.as_ref().is_ok_and(|v| v.passed),
        }
    }

    /// "passed", "failed" or "skipped" (no verdict came).
    pub fn word(&self) -> &'static str {
        match self {
            _ if self.passed() => "passed",
            Self::Synthetic(None) | Self::Kvm(Err(_)) => "skipped",
            _ => "failed",
        }
    }

    /// What went wrong, if anything.
    pub fn problem(&self) -> Option<String> {
        match self {
            Self::Synthetic(Some(check)) if !check.is_ok() => Some(format!("guest self-check failed: {check}")),
            Self::Kvm(Ok(verdict)) if !verdict.passed => Some(format!("the KVM guest's own check failed: {verdict}")),
            Self::Kvm(Err(err)) => Some(format!("no verdict from the KVM guest: {err:#}")),
            _ => None,
        }
    }
}

impl DestGuest {
    pub fn new(regions: Vec<Arc<GuestRegion>>) -> Self {
        Self::Waiting(Box::new(SyntheticGuest::destination(regions.clone())), regions)
    }

    /// "synthetic" or "kvm" once the state arrived.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            Self::Waiting(..) => None,
            Self::Synthetic(_) => Some("synthetic"),
            Self::Kvm(_) => Some("kvm"),
        }
    }

    pub fn synthetic(&self) -> Option<&SyntheticGuest> {
        match self {
            Self::Synthetic(guest) => Some(guest),
            _ => None,
        }
    }

    /// The guest's own verdict once it ran: the synthetic guest's first-run
    /// check, or a self-check the KVM guest runs now.
    pub fn verdict(&self) -> Verdict {
        match self {
            Self::Waiting(..) => Verdict::Synthetic(None),
            Self::Synthetic(guest) => Verdict::Synthetic(guest.wait_check(Duration::from_secs(600))),
            Self::Kvm(guest) => Verdict::Kvm(guest.self_check().context("asking the KVM guest for its check")),
        }
    }

    fn vm(&mut self) -> Result<&mut dyn Vm, VmError> {
        match self {
            Self::Waiting(..) => Err(VmError::new("the guest has no device state yet")),
            Self::Synthetic(guest) => Ok(guest),
            Self::Kvm(guest) => Ok(guest),
        }
    }
}

impl Vm for DestGuest {
    fn pause(&mut self) -> Result<(), VmError> {
        self.vm()?.pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.vm()?.resume()
    }
    fn save_device_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.vm()?.save_device_state()
    }
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        if matches!(self, Self::Waiting(..)) {
            let empty = Self::Waiting(Box::new(SyntheticGuest::destination(Vec::new())), Vec::new());
            let Self::Waiting(synthetic, regions) = std::mem::replace(self, empty) else {
                unreachable!("matched above")
            };
            *self = if is_kvm_state(state) {
                Self::Kvm(KvmGuest::destination(regions))
            } else {
                Self::Synthetic(*synthetic)
            };
        }
        self.vm()?.load_device_state(state)
    }
    fn throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.vm()?.throttle(percent)
    }
}
