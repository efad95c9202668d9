//! A destination guest over real userfaultfd, as postcopy runs it: it resumes with half its
//! pages missing, verifies each page before writing it, and times its own waits for the pages
//! a fault handler places on demand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use migration_core::Vm;
use migration_sys::uffd::{MissingPages, Placed};
use migration_sys::{GuestRegion, PAGE_SIZE, SysError};
use reference_guest::{Content, GuestSpec, Pattern, SyntheticGuest};

const WAIT: Duration = Duration::from_secs(20);
const PAGES: usize = 2048;

/// Serves missing-page faults from a copy of the source's RAM, on a thread of its own, until
/// stopped. It never touches the region itself: it only places pages with `UFFDIO_COPY`.
struct FaultServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, SysError>>>,
}

impl FaultServer {
    fn start(missing: MissingPages, ram: Vec<u8>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("fault-server".into())
            .spawn({
                let stop = Arc::clone(&stop);
                // `missing` lives (and keeps the region registered) only as long as this
                // thread: if serving fails, the registration goes and no guest thread waits
                // forever for a page (it reads zeros, which its check reports).
                move || serve(&missing, &ram, &stop)
            })
            .expect("spawning the fault server");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops serving and returns the pages placed on demand. Only once no guest thread can
    /// fault any more.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().expect("running");
        thread
            .join()
            .expect("the fault server panicked")
            .expect("serving faults")
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(missing: &MissingPages, ram: &[u8], stop: &AtomicBool) -> Result<u64, SysError> {
    let mut placed = 0;
    while !stop.load(Ordering::Acquire) {
        let Some(offset) = missing.next_fault(Duration::from_millis(20))? else {
            continue;
        };
        match missing.copy(offset, &ram[offset..offset + PAGE_SIZE])? {
            Placed::All => placed += 1,
            // Placed already for an earlier fault on it: wake whoever still waits.
            Placed::UpTo(_) => missing.wake(offset, PAGE_SIZE)?,
        }
    }
    Ok(placed)
}

fn uffd_unavailable(err: &SysError) -> bool {
    match err {
        SysError::Unsupported(_) => true,
        SysError::Os { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
        _ => false,
    }
}

#[test]
fn destination_runs_and_verifies_while_pages_arrive_on_demand() {
    let spec = GuestSpec {
        dirty_rate: 64 << 20,
        pattern: Pattern::Uniform,
        hot_set: 0,
        content: Content::Random,
        writers: 2,
        seed: 0x9057,
    };
    let source_ram = Arc::new(GuestRegion::anonymous(PAGES * PAGE_SIZE).expect("anonymous region"));
    let mut source = SyntheticGuest::new(vec![Arc::clone(&source_ram)], spec, true).unwrap();
    source.start().unwrap();
    assert!(
        source.wait_writes(500, WAIT),
        "the source made {} writes",
        source.writes()
    );
    source.pause().unwrap();
    let state = source.save_device_state().unwrap();
    let writes = source.writes();
    let mut ram = vec![0u8; PAGES * PAGE_SIZE];
    source_ram.read(0, &mut ram).unwrap();
    drop(source);

    let dest_ram = Arc::new(GuestRegion::anonymous(PAGES * PAGE_SIZE).expect("anonymous region"));
    let missing = match MissingPages::register(Arc::clone(&dest_ram)) {
        Ok(missing) => missing,
        Err(err) if uffd_unavailable(&err) => {
            eprintln!("skipping: userfaultfd is unavailable here: {err}");
            return;
        }
        Err(err) => panic!("registering for missing-page faults: {err}"),
    };
    // Even pages arrive before the guest resumes; odd pages only when it touches them.
    for offset in (0..PAGES * PAGE_SIZE).step_by(2 * PAGE_SIZE) {
        let page = &ram[offset..offset + PAGE_SIZE];
        assert_eq!(missing.copy(offset, page).unwrap(), Placed::All);
    }
    // Declared before the guest, so a failed assertion drops the guest first: its threads'
    // faults are still served while they stop.
    let server = FaultServer::start(missing, ram);

    let mut guest = SyntheticGuest::destination(vec![dest_ram]);
    guest.load_device_state(&state).unwrap();
    guest.resume().unwrap();
    let report = guest.wait_check(WAIT).expect("every page verified in time");
    assert!(report.is_ok(), "{report}");
    assert_eq!((report.pages_checked, report.pages_unknown), (PAGES as u64, 0));
    assert!(
        guest.wait_writes(writes + 500, WAIT),
        "the destination made only {} writes after {writes}",
        guest.writes()
    );

    let stats = guest.fault_stats();
    eprintln!("{stats:?}");
    // Every missing page's first access (its verifying read) found it absent, and no
    // placed page did.
    assert_eq!(stats.faults, PAGES as u64 / 2, "{stats:?}");
    assert!(
        0.0 < stats.p50_us && stats.p50_us <= stats.p99_us && stats.p99_us <= stats.max_us,
        "{stats:?}"
    );
    let names: Vec<&str> = stats.blocked.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["guest-writer-0", "guest-writer-1", "guest-check"]);
    let blocked: Duration = stats.blocked.iter().map(|(_, d)| *d).sum();
    assert!(
        blocked > Duration::ZERO && blocked.as_secs_f64() * 1e6 >= stats.max_us,
        "{stats:?}"
    );

    guest.pause().unwrap();
    assert!(guest.check().is_ok(), "{}", guest.check());
    drop(guest);
    assert_eq!(server.stop(), PAGES as u64 / 2, "pages placed on demand");
}
