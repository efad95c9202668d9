//! Thread scheduling: how a migration keeps its latency-critical threads
//! (postcopy's fault path) ahead of its bulk threads on a busy machine.

use crate::SysError;

/// Nice value of a thread that moves bulk data while latency-critical
/// threads wait for the CPU (postcopy's background stream): it still gets
/// about a tenth of a contended core, the threads at the default get the rest.
pub const BACKGROUND_NICE: i32 = 10;

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
