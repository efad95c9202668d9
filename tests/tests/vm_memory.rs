//! A VMM built on rust-vmm's vm-memory migrates its guest memory with no glue: its
//! `GuestMemoryMmap<AtomicBitmap>` becomes the migration's RAM (`migration_core::vm_memory::ram`)
//! and the regions' bitmaps a dirty log of the writes its devices make through vm-memory
//! (`VmMemoryDirtyLog`). Both sides run in this process, over TCP on 127.0.0.1, with a device
//! thread writing guest memory through vm-memory until the source pauses.

use migration_core::dest::{self, DestOptions, DestReport, FreshMemory, run_destination};
use migration_core::source::{SourceOptions, SourceReport, run_source};
use migration_core::vm_memory::{VmMemoryDirtyLog, block_name, ram};
use migration_core::{
    BlockId, Channel, CombinedDirtyLog, DirtyLog, Event, KernelDirtyLog, Ram, TransportError, Vm, VmError,
};
use migration_wire::SessionId;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;
use transport_tcp::{TcpListener, TcpOptions};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: u64 = 4096;
/// Each region's size: 4 MiB.
const REGION: usize = 4 << 20;
/// Where the second region starts: 1 GiB, past a hole as on a PC.
const HIGH: u64 = 1 << 30;
/// Bound on every wait of these tests.
const WAIT: Duration = Duration::from_secs(60);

type Memory = GuestMemoryMmap<AtomicBitmap>;

/// Guest memory as a rust-vmm VMM makes it: 4 MiB at 0 and 4 MiB at 1 GiB, with dirty bitmaps.
fn guest_memory() -> Memory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION), (GuestAddress(HIGH), REGION)])
        .expect("vm-memory maps guest memory")
}

/// What the page at guest address `gpa` holds after [`fill`]: its address, then bytes
/// that differ from page to page.
fn pattern(gpa: u64) -> Vec<u8> {
    let mut page: Vec<u8> = (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(31) ^ (gpa >> 12) as u8)
        .collect();
    page[..8].copy_from_slice(&gpa.to_le_bytes());
    page
}

/// Writes [`pattern`] to every page, through vm-memory's API.
fn fill(memory: &Memory) {
    for region in memory.iter() {
        let start = region.start_addr().0;
        for gpa in (start..start + region.len()).step_by(PAGE as usize) {
            memory.write_slice(&pattern(gpa), GuestAddress(gpa)).expect("write");
        }
    }
}

/// Every byte of each region, as vm-memory reads it.
fn contents(memory: &Memory) -> Vec<Vec<u8>> {
    memory
        .iter()
        .map(|region| {
            let mut bytes = vec![0u8; region.len() as usize];
            memory.read_slice(&mut bytes, region.start_addr()).expect("read");
            bytes
        })
        .collect()
}

/// The pages `log` reports, as `(block, page)`, in the order it reports them.
fn collect(log: &mut dyn DirtyLog) -> Vec<(u32, u64)> {
    let mut pages = Vec::new();
    log.collect(&mut |block: BlockId, first, count| pages.extend((first..first + count).map(|p| (block.0, p))))
        .expect("collect");
    pages
}

#[test]
fn ram_is_the_memory_vm_memory_sees_and_the_log_its_writes() {
    let memory = guest_memory();
    fill(&memory);
    let ram = ram(&memory).expect("vm-memory regions make RAM blocks");
    let names: Vec<_> = ram.blocks().iter().map(|b| b.name().to_owned()).collect();
    assert_eq!(names, ["ram@0x0", "ram@0x40000000"]);
    assert_eq!(ram.total_bytes(), 2 * REGION as u64);
    for (block, seen) in ram.blocks().iter().zip(contents(&memory)) {
        let mut bytes = vec![0u8; block.len() as usize];
        block.region().read(0, &mut bytes).expect("read");
        assert!(bytes == seen, "block {} differs from vm-memory's view", block.name());
    }
    let mut page = vec![0u8; PAGE as usize];
    ram.blocks()[1]
        .region()
        .read(7 * PAGE as usize, &mut page)
        .expect("read");
    assert_eq!(page, pattern(HIGH + 7 * PAGE));

    let mut log = VmMemoryDirtyLog::new(&memory).expect("the bitmaps cover the regions");
    // The fill was before the log: nothing to report.
    assert!(collect(&mut log).is_empty());
    memory
        .write_obj(0xfeed_u64, GuestAddress(HIGH + 5 * PAGE + 100))
        .expect("write");
    // 8 bytes across the end of page 9 of the low region.
    memory
        .write_slice(&[0xAA; 8], GuestAddress(10 * PAGE - 4))
        .expect("write");
    memory
        .write_slice(&[0x55; 2 * PAGE as usize], GuestAddress(100 * PAGE))
        .expect("write");
    memory
        .store(7u32, GuestAddress(HIGH + 1023 * PAGE), Ordering::SeqCst)
        .expect("store");
    assert_eq!(
        collect(&mut log),
        [(0, 9), (0, 10), (0, 100), (0, 101), (1, 5), (1, 1023)]
    );
    assert!(collect(&mut log).is_empty(), "a collect clears what it reported");
}

/// The source VM: a device model thread that writes guest memory through vm-memory until
/// the VM pauses.
struct DeviceVm {
    stop: Arc<AtomicBool>,
    device: Option<JoinHandle<u64>>,
    /// Page writes the device made, known once it stopped.
    device_writes: u64,
}

impl DeviceVm {
    /// Starts the device; returns once it has written guest memory.
    fn start(memory: &Memory) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (wrote, first_write) = mpsc::channel();
        let device = {
            let (memory, stop) = (memory.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut writes = 0u64;
                while !stop.load(Ordering::Acquire) {
                    // A hot set of 64 pages in each region, rewritten with a running count.
                    let page = writes * 13 % 64;
                    let base = if writes % 2 == 0 { 0 } else { HIGH };
                    let gpa = GuestAddress(base + (page + 200) * PAGE + writes % 512 * 8);
                    memory.write_obj(writes, gpa).expect("device write");
                    writes += 1;
                    if writes == 1 {
                        let _ = wrote.send(());
                    }
                    std::thread::yield_now();
                }
                writes
            })
        };
        first_write.recv_timeout(WAIT).expect("the device writes");
        Self {
            stop,
            device: Some(device),
            device_writes: 0,
        }
    }

    fn device_state(&self) -> Vec<u8> {
        let mut state = b"device-state ".to_vec();
        state.extend_from_slice(&self.device_writes.to_le_bytes());
        state
    }
}

impl Vm for DeviceVm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.stop.store(true, Ordering::Release);
        if let Some(device) = self.device.take() {
            self.device_writes = device.join().map_err(|_| VmError::new("the device thread panicked"))?;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        // Only after a failed migration, which fails the test anyway.
        Ok(())
    }

    fn save_device_state(&mut self) -> Result<Vec<u8>, VmError> {
        // Paused: the device made its last write.
        Ok(self.device_state())
    }

    fn load_device_state(&mut self, _: &[u8]) -> Result<(), VmError> {
        Err(VmError::new("a source loads no state"))
    }
}

/// The destination VM: records the device state and whether it runs.
#[derive(Default)]
struct DestVm {
    state: Option<Vec<u8>>,
    running: bool,
}

impl Vm for DestVm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.running = false;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.running = true;
        Ok(())
    }

    fn save_device_state(&mut self) -> Result<Vec<u8>, VmError> {
        Err(VmError::new("a destination saves no state"))
    }

    fn load_device_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.state = Some(state.to_vec());
        Ok(())
    }
}

/// What the destination thread hands back.
struct Received {
    report: DestReport,
    memory: Memory,
    vm: DestVm,
}

/// Listens on 127.0.0.1 and receives one migration into fresh vm-memory guest memory of the
/// same layout, made into RAM the same way.
fn spawn_destination() -> (String, JoinHandle<Received>) {
    let tcp = TcpOptions {
        io_timeout: WAIT,
        ..TcpOptions::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0", tcp).expect("listen");
    let addr = listener.local_addr().expect("bound address").to_string();
    let destination = std::thread::spawn(move || {
        let options = DestOptions {
            io_timeout: WAIT,
            ..DestOptions::default()
        };
        let channel = listener.accept_within(Some(WAIT)).expect("the source connects");
        let incoming = dest::accept(Box::new(channel), &options).expect("handshake");
        let memory = guest_memory();
        let ram = ram(&memory).expect("destination RAM");
        assert_eq!(incoming.blocks(), &ram.block_list(), "the same layout on both sides");
        let mut vm = DestVm::default();
        let mut accept = |wait: Duration| -> Result<Box<dyn Channel>, TransportError> {
            Ok(Box::new(listener.accept_within(Some(wait))?))
        };
        let report = run_destination(
            incoming,
            &mut accept,
            &ram,
            FreshMemory::Zeroed,
            &mut vm,
            &options,
            &mut |_| {},
        )
        .unwrap_or_else(|failure| panic!("destination failed: {}", failure.error));
        Received { report, memory, vm }
    });
    (addr, destination)
}

/// Migrates `memory` (filled) to a destination in this process, the device writing through
/// vm-memory until the pause, and a marker page written in each region after the first pass.
/// `with_kernel_log`: the kernel's tracking combined with the vm-memory log, else that log
/// alone.
fn migrate(memory: &Memory, with_kernel_log: bool) -> (SourceReport, DeviceVm, Received) {
    let ram: Ram = ram(memory).expect("source RAM");
    // Tracking starts before the device does, so none of its writes goes unseen.
    let vm_log = VmMemoryDirtyLog::new(memory).expect("the bitmaps cover the regions");
    let mut dirty: Box<dyn DirtyLog> = if with_kernel_log {
        let kernel = KernelDirtyLog::start(&ram).expect("kernel dirty tracking on vm-memory's mappings");
        Box::new(CombinedDirtyLog::new(vec![Box::new(kernel), Box::new(vm_log)]))
    } else {
        Box::new(vm_log)
    };
    let mut vm = DeviceVm::start(memory);
    let (addr, destination) = spawn_destination();

    let tcp = TcpOptions {
        connect_timeout: WAIT,
        io_timeout: WAIT,
        ..TcpOptions::default()
    };
    let mut connect = |_: u16, wait: Duration| -> Result<Box<dyn Channel>, TransportError> {
        let tcp = TcpOptions {
            connect_timeout: wait.min(WAIT),
            ..tcp.clone()
        };
        Ok(Box::new(transport_tcp::connect(&addr, &tcp)?))
    };
    let channel = connect(0, WAIT).expect("connect");
    let options = SourceOptions {
        session: SessionId(0x0076_6d6d_656d),
        reply_timeout: WAIT,
        channels: 2,
        ..SourceOptions::default()
    };
    let mut marked = false;
    let report = run_source(
        channel,
        &mut connect,
        &ram,
        &mut vm,
        dirty.as_mut(),
        &options,
        &mut |event| {
            // After the first pass's sync: only the dirty log can carry these.
            if matches!(event, Event::PassEnded { .. }) && !marked {
                marked = true;
                for base in [0, HIGH] {
                    let gpa = base + 900 * PAGE;
                    memory
                        .write_slice(&[0xC3; PAGE as usize], GuestAddress(gpa))
                        .expect("marker write");
                }
            }
        },
    )
    .unwrap_or_else(|failure| panic!("source failed: {}", failure.error));
    assert!(marked, "a pass ended");
    let received = destination.join().expect("destination thread");
    (report, vm, received)
}

fn check_migrated(memory: &Memory, with_kernel_log: bool) {
    fill(memory);
    let (report, vm, received) = migrate(memory, with_kernel_log);
    assert_eq!(report.verified, Some(true), "source verdict: {report:?}");
    assert_eq!(received.report.verified, Some(true), "destination verdict");
    assert!(vm.device_writes > 0, "the device wrote while migrating");
    assert!(received.vm.running, "the destination VM runs");
    assert_eq!(received.vm.state.as_deref(), Some(vm.device_state().as_slice()));
    // Compared directly: every byte, as vm-memory sees it on each side.
    let (here, there) = (contents(memory), contents(&received.memory));
    for ((name, here), there) in [block_name(GuestAddress(0)), block_name(GuestAddress(HIGH))]
        .iter()
        .zip(&here)
        .zip(&there)
    {
        let differing = here
            .chunks(PAGE as usize)
            .zip(there.chunks(PAGE as usize))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, 0, "pages of {name} differ");
    }
    let mut marker = vec![0u8; PAGE as usize];
    received
        .memory
        .read_slice(&mut marker, GuestAddress(HIGH + 900 * PAGE))
        .expect("read");
    assert!(
        marker.iter().all(|&b| b == 0xC3),
        "the marker page written after the first pass arrived"
    );
}

#[test]
fn migrates_over_tcp_with_the_kernel_and_vm_memory_logs() {
    check_migrated(&guest_memory(), true);
}

#[test]
fn the_vm_memory_log_alone_carries_the_device_writes() {
    check_migrated(&guest_memory(), false);
}
