//! Thread scheduling: how a migration keeps its latency-critical threads
//! (postcopy's fault path) ahead of its bulk threads on a busy machine.

use crate::SysError;

/// Nice value of a thread that moves bulk data while latency-critical
/// threads wait for the CPU (postcopy's background stream): it still gets
/// a sliver of a contended core (the weight of nice 19 is 15, against 1024
/// for the default), and the threads at the default run first.
pub const BACKGROUND_NICE: i32 = 19;

/// Lowers the calling thread's priority to `target` (0 is the default, 19
/// the lowest); a thread already at `target` or lower stays as it is (raising
/// priority needs privileges, lowering it never does). On Linux the nice
/// value belongs to the thread, not the process, so only the caller is
/// affected.
pub fn lower_priority(target: i32) -> Result<(), SysError> {
    if nice()? >= target {
        return Ok(());
    }
    // SAFETY: setpriority takes plain integers and touches no memory of ours;
    // with PRIO_PROCESS and 0 it applies to the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, target) };
    if rc != 0 {
        return Err(SysError::last_os("setpriority"));
    }
    Ok(())
}

/// `struct sched_attr` (`SCHED_ATTR_SIZE_VER1`, 56 bytes), as far as the fair scheduler
/// reads it.
#[repr(C)]
#[derive(Debug, Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}
const _: () = assert!(size_of::<SchedAttr>() == 56);

/// The slice a latency-critical thread asks for: the fair scheduler's
/// shortest (0.1 ms).
pub const SHORT_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

/// Asks the fair scheduler (EEVDF, Linux 6.12 and later) for a short slice
/// for the calling thread, keeping its nice value: a thread that wakes to
/// serve a request then gets an earlier deadline than the threads that use
/// their whole slice, so it runs at once instead of waiting behind them
/// (a guest's vCPUs, say). It changes how soon the thread runs, not how much
/// CPU it gets. Kernels without custom slices refuse or ignore it.
pub fn prefer_latency() -> Result<(), SysError> {
    let attr = SchedAttr {
        size: size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice()?,
        sched_runtime: SHORT_SLICE.as_nanos() as u64,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr reads `size` bytes of `attr`, a live `struct sched_attr` of that
    // size, for the calling thread (pid 0); it changes only scheduling parameters.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::from_ref(&attr), 0) };
    if rc != 0 {
        return Err(SysError::last_os("sched_setattr"));
    }
    Ok(())
}

/// The calling thread's nice value.
pub fn nice() -> Result<i32, SysError> {
    // getpriority can return -1 as a value: clear errno first to tell.
    // SAFETY: errno is this thread's own; getpriority takes plain integers.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: as above.
    let value = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if value == -1 && std::io::Error::last_os_error().raw_os_error().unwrap_or(0) != 0 {
        return Err(SysError::last_os("getpriority"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_slice_keeps_the_nice_value() {
        let kept = std::thread::spawn(|| {
            lower_priority(3).unwrap();
            // Best effort by design: an old kernel may refuse.
            if let Err(err) = prefer_latency() {
                eprintln!("no custom slice here: {err}");
            }
            nice().unwrap()
        })
        .join()
        .unwrap();
        assert!(kept >= 3, "nice {kept}");
    }

    #[test]
    fn lowering_applies_to_the_calling_thread_only() {
        let before = nice().unwrap();
        let lowered = std::thread::spawn(|| {
            lower_priority(BACKGROUND_NICE).unwrap();
            // Never back up.
            lower_priority(0).unwrap();
            nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, BACKGROUND_NICE.max(before));
        assert_eq!(nice().unwrap(), before, "the spawning thread is untouched");
    }
}
