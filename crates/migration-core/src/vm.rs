//! The control surface a VMM implements so the runtime can pause, resume and
//! move its device state.

use std::fmt;

/// A failure reported by the VMM through the [`Vm`] trait.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct VmError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl VmError {
    /// An error with a message only.
    pub fn new(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            source: None,
        }
    }

    /// An error with a message and the cause behind it.
    pub fn with_source(message: impl fmt::Display, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            message: message.to_string(),
            source: Some(Box::new(source)),
        }
    }
}

/// What the migration runtime needs from a virtual machine.
///
/// On the source the runtime pauses the VM at switchover, saves its device
/// state, and resumes it on every failure before the handover. On the
/// destination it loads the device state once every page is placed and
/// resumes the VM only when the source said GO.
pub trait Vm: Send {
    /// Stops every vCPU and device that can write guest RAM. Returns once
    /// nothing writes guest memory any more.
    fn pause(&mut self) -> Result<(), VmError>;

    /// Lets the VM run again (the source after a failed migration, the
    /// destination after the handover).
    fn resume(&mut self) -> Result<(), VmError>;

    /// The device state (vCPU registers, device models) of a paused VM, as an
    /// opaque blob that [`Vm::load_device_state`] on the destination accepts.
    fn save_device_state(&mut self) -> Result<Vec<u8>, VmError>;

    /// Loads the blob the source saved. Called on the destination, paused,
    /// with every page of guest RAM in place; in postcopy, with guest RAM
    /// registered for missing-page faults and only part of it there, so it
    /// (and [`Vm::resume`] after it) must not touch guest memory: a page not
    /// yet there would wait until the guest runs, which is after this.
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), VmError>;

    /// Slows the VM's vCPUs to `percent` of their time being throttled
    /// (0 lifts the throttle). VMs that cannot throttle ignore it. The
    /// source runtime calls it for auto-converge, and lifts the throttle
    /// when the migration ends: before [`Vm::resume`] after a failure.
    fn throttle(&mut self, percent: u8) -> Result<(), VmError> {
        let _ = percent;
        Ok(())
    }
}
