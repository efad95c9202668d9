//! `migrate-cli save`, `restore` and `inspect`: snapshots in mapped-ram
//! files.

use crate::exit;
use crate::memory;
use crate::recv::{receive, run_resumed};
use crate::report::{LazyStats, Report, Status};
use crate::send::{SourceArgs, Target, run_to};
use crate::units::parse_duration;
use anyhow::{Context, Result};
use migration_core::Compression;
use migration_core::Vm;
use migration_core::dest::{self, DestOptions};
use migration_core::{Channel, TransportError};
use reference_guest::SyntheticGuest;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use transport_file::{
    FileError, LazyRestore, RestoreSource, SaveOptions, SaveTarget, Snapshot, StreamSource, StreamTarget,
};

#[derive(Debug, clap::Args)]
pub struct SaveArgs {
    /// The snapshot file, or `-` for standard output (a stream only). A file
    /// is written under a temporary name beside it and renamed once
    /// committed, so an unfinished save never replaces a good snapshot.
    #[arg(long)]
    pub to: PathBuf,
    /// Write a mapped-ram file (every page at a fixed offset, written by
    /// `--channels` in parallel) instead of a stream of the migration's
    /// frames (one channel).
    #[arg(long)]
    pub mapped_ram: bool,
    /// Write page bytes with O_DIRECT (bypassing the page cache; mapped-ram).
    #[arg(long, requires = "mapped_ram")]
    pub direct_io: bool,
    /// How mapped-ram writers submit their writes: io_uring (a ring per
    /// writer; plain calls where the kernel refuses it) or plain system calls.
    #[arg(long, default_value = "uring", value_parser = ["uring", "plain"])]
    pub io: String,
    /// Compression of page batches in a stream: none, lz4, zstd or zstd:LEVEL.
    #[arg(long, default_value = "none", conflicts_with = "mapped_ram")]
    pub compress: Compression,
    #[command(flatten)]
    pub source: SourceArgs,
}

pub fn save(args: SaveArgs) -> u8 {
    if args.mapped_ram {
        if args.to == std::path::Path::new("-") {
            return fail(
                "save",
                args.source.json,
                anyhow::anyhow!("a mapped-ram file cannot go to standard output"),
            );
        }
        let target = SaveTarget::new(
            &args.to,
            SaveOptions {
                direct_io: args.direct_io,
                io_uring: args.io == "uring",
            },
        );
        return run_to("save", &args.source, Target::File(&target));
    }
    match StreamTarget::create(&args.to) {
        Ok(target) => run_to("save", &args.source, Target::Stream(&target, args.compress)),
        Err(err) => fail("save", args.source.json, err.into()),
    }
}

/// Ends a command that failed before it began.
fn fail(role: &'static str, json: bool, err: anyhow::Error) -> u8 {
    crate::report::finish(Report::new(role), json, Err(err))
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot file to restore.
    #[arg(long)]
    pub from: PathBuf,
    /// Back guest RAM with this file (created or resized) instead of
    /// anonymous memory.
    #[arg(long)]
    pub mem_file: Option<PathBuf>,
    /// Allocate and populate guest RAM of the snapshot's size before reading
    /// pages, as a VMM that preallocates its memory.
    #[arg(long, conflicts_with = "mem_file")]
    pub prealloc: bool,
    /// Parallel readers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: u16,
    /// Read page bytes with O_DIRECT (bypassing the page cache).
    #[arg(long)]
    pub direct_io: bool,
    /// Run the guest at once: pages load on first touch (userfaultfd) while
    /// `--channels` prefetch threads load the rest.
    #[arg(long, conflicts_with_all = ["mem_file", "prealloc"])]
    pub lazy: bool,
    /// How long the restored guest runs before the command exits.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub run_for: Duration,
    /// Print no progress lines (errors and the result still print).
    #[arg(long)]
    pub quiet: bool,
    /// Print one JSON object with the outcome on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn restore(args: RestoreArgs) -> u8 {
    let started = Instant::now();
    let mut report = Report::new("restore");
    report.guest_check = Some(None);
    let outcome = if args.lazy {
        restore_lazily(&args, started, &mut report)
    } else {
        restore_into(&args, &mut report)
    };
    crate::report::finish(report, args.json, outcome)
}

/// The guest resumes before its pages are loaded; see `transport_file::lazy`.
fn restore_lazily(args: &RestoreArgs, started: Instant, report: &mut Report) -> Result<u8> {
    let snapshot = Snapshot::open(&args.from).map_err(|err| match is_mapped_ram(&args.from) {
        Ok(false) => anyhow::anyhow!("a lazy restore needs a mapped-ram file (save --mapped-ram)"),
        _ => err.into(),
    })?;
    let memory = memory::anonymous(&memory::layout(&snapshot.blocks()))?;
    report.ram_bytes = Some(memory.ram.total_bytes());
    // The guest's own bookkeeping is built while the memory is registered.
    let regions = memory.regions();
    let building = std::thread::spawn(move || SyntheticGuest::destination(regions));
    let lazy = LazyRestore::start(snapshot, &memory.ram, usize::from(args.channels), args.direct_io)?;
    let mut guest = building
        .join()
        .map_err(|_| anyhow::anyhow!("building the guest failed"))?;
    guest
        .load_device_state(lazy.device_state())
        .map_err(anyhow::Error::new)
        .context("loading the snapshot's device state")?;
    guest
        .resume()
        .map_err(anyhow::Error::new)
        .context("running the restored guest")?;
    report.setup(started.elapsed());
    if !args.quiet {
        eprintln!("restore: guest running, pages load on first touch");
    }
    let loaded = lazy.wait(Duration::from_secs(600))?;
    let all_loaded = started.elapsed();
    report.status = Status::Completed;
    report.total_ms = Some(all_loaded.as_secs_f64() * 1e3);
    report.ram_bytes_per_sec = Some(memory.ram.total_bytes() as f64 / all_loaded.as_secs_f64());
    report.verified = Some(loaded.mismatched_blocks.is_empty());
    report.mismatched_blocks = loaded.mismatched_blocks.clone();
    if !loaded.mismatched_blocks.is_empty() {
        report.error = Some(format!(
            "guest RAM differs from the snapshot in blocks {:?}",
            loaded.mismatched_blocks
        ));
    }
    let verdict = crate::guest::Verdict::Synthetic(guest.wait_check(Duration::from_secs(600)));
    let code = run_resumed(verdict, loaded.mismatched_blocks.is_empty(), args.run_for, report);
    report.lazy = Some(LazyStats {
        faults: loaded.faulted_pages,
        prefetched_pages: loaded.prefetched_pages,
        fault_p50_us: loaded.fault_p50_us,
        fault_p99_us: loaded.fault_p99_us,
        fault_max_us: loaded.fault_max_us,
        first_access_ms: guest
            .first_access()
            .map(|at| at.saturating_duration_since(started).as_secs_f64() * 1e3),
        all_loaded_ms: all_loaded.as_secs_f64() * 1e3,
    });
    Ok(code)
}

/// The two formats, told apart by their first bytes: a mapped-ram file's
/// magic, or a stream's first frame (a hello carrying the stream magic).
/// Anything else is neither.
fn is_mapped_ram(path: &std::path::Path) -> Result<bool> {
    if path == std::path::Path::new("-") {
        return Ok(false);
    }
    // A stream's first frame header, then its hello's magic.
    const HEAD: usize = migration_wire::FRAME_HEADER_LEN + migration_wire::MAGIC.len();
    let mut head = Vec::new();
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(file, HEAD as u64), &mut head)
        .with_context(|| format!("reading {}", path.display()))?;
    if head.starts_with(&migration_wire::mapped_ram::FILE_MAGIC) {
        return Ok(true);
    }
    if head.len() == HEAD && head[migration_wire::FRAME_HEADER_LEN..] == migration_wire::MAGIC {
        return Ok(false);
    }
    anyhow::bail!(
        "{}: not a snapshot: the magic is neither a mapped-ram file's nor a stream's",
        path.display()
    )
}

/// Guest RAM for a restore: preallocated, a file, or (by default)
/// anonymous memory, which pages are read straight into.
fn restore_memory(
    args: &RestoreArgs,
    blocks: &migration_wire::BlockList,
    prealloc: Option<&memory::Preallocated>,
) -> Result<memory::GuestMemory> {
    if args.mem_file.is_none() && prealloc.is_none() {
        return memory::anonymous(&memory::layout(blocks));
    }
    memory::destination(blocks, args.mem_file.as_deref(), prealloc, false, false)
}

/// A restore from a stream file (never lazy: see [`restore`]).
fn restore_stream(args: &RestoreArgs, report: &mut Report) -> Result<u8> {
    anyhow::ensure!(!args.direct_io, "--direct-io applies to mapped-ram files");
    let setup_start = Instant::now();
    let source = StreamSource::open(&args.from, Vec::new())?;
    let mut accept = |_: Duration| -> Result<Box<dyn Channel>, TransportError> {
        Err(TransportError::io(
            "a stream has one channel",
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        ))
    };
    let options = DestOptions::default();
    restore_from(args, report, setup_start, Box::new(source), &options, &mut accept)
}

fn restore_into(args: &RestoreArgs, report: &mut Report) -> Result<u8> {
    if !is_mapped_ram(&args.from)? {
        return restore_stream(args, report);
    }
    let setup_start = Instant::now();
    let source = RestoreSource::open(&args.from, args.channels, args.direct_io)?;
    let options = DestOptions {
        max_channels: args.channels,
        ..DestOptions::default()
    };
    let mut next = 1u16;
    let mut accept = |_: Duration| -> Result<Box<dyn Channel>, TransportError> {
        let channel = source.channel(next);
        next += 1;
        Ok(Box::new(channel))
    };
    restore_from(
        args,
        report,
        setup_start,
        Box::new(source.channel(0)),
        &options,
        &mut accept,
    )
}

/// Receives a restore whose main channel is `main` and whose other
/// channels come from `accept`, into the guest RAM `args` ask for.
fn restore_from(
    args: &RestoreArgs,
    report: &mut Report,
    setup_start: Instant,
    main: Box<dyn Channel>,
    options: &DestOptions,
    accept: &mut dyn FnMut(Duration) -> Result<Box<dyn Channel>, TransportError>,
) -> Result<u8> {
    let incoming = dest::accept(main, options)
        .map_err(anyhow::Error::new)
        .context("reading the snapshot's handshake")?;
    let prealloc = args
        .prealloc
        .then(|| memory::Preallocated::new(incoming.blocks().total_bytes(), false))
        .transpose()
        .context("preallocating guest RAM (--prealloc)")?;
    let memory = restore_memory(args, incoming.blocks(), prealloc.as_ref())?;
    report.setup(setup_start.elapsed());
    receive(incoming, accept, memory, options, args.quiet, args.run_for, report)
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The snapshot file.
    pub file: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Inspection {
    file: String,
    format: &'static str,
    version: u32,
    complete: bool,
    error: Option<String>,
    file_bytes: Option<u64>,
    ram_bytes: Option<u64>,
    device_state_bytes: Option<u64>,
    passes: Option<u64>,
    blocks: Vec<InspectedBlock>,
}

#[derive(Debug, serde::Serialize)]
struct InspectedBlock {
    name: String,
    bytes: u64,
    page_size: u32,
    pages: u64,
    stored_pages: u64,
    zero_pages: u64,
    digest: String,
}

pub fn inspect(args: InspectArgs) -> u8 {
    let mut inspection = Inspection {
        file: args.file.display().to_string(),
        format: "mapped-ram",
        version: migration_wire::mapped_ram::FILE_VERSION,
        complete: false,
        error: None,
        file_bytes: None,
        ram_bytes: None,
        device_state_bytes: None,
        passes: None,
        blocks: Vec::new(),
    };
    match is_mapped_ram(&args.file) {
        Ok(true) => {}
        Ok(false) => {
            inspect_stream(&args.file, &mut inspection);
            return print_and_exit(&inspection, args.json);
        }
        Err(err) => {
            inspection.format = "unknown";
            inspection.error = Some(format!("{err:#}"));
            return print_and_exit(&inspection, args.json);
        }
    }
    match Snapshot::open(&args.file) {
        Ok(snapshot) => {
            inspection.complete = true;
            inspection.file_bytes = Some(snapshot.file_len);
            inspection.ram_bytes = Some(snapshot.blocks().total_bytes());
            inspection.device_state_bytes = Some(snapshot.commit.state_len);
            inspection.passes = Some(snapshot.commit.epochs);
            for (laid, summary) in snapshot.header.layout.blocks.iter().zip(&snapshot.commit.blocks) {
                inspection.blocks.push(InspectedBlock {
                    name: laid.block.name.clone(),
                    bytes: laid.block.length,
                    page_size: laid.block.page_size,
                    pages: laid.pages(),
                    stored_pages: summary.stored_pages,
                    zero_pages: laid.pages() - summary.stored_pages,
                    digest: format!("{:016x}", summary.digest),
                });
            }
        }
        Err(err) => {
            if matches!(err, FileError::Unfinished { .. }) {
                inspection.format = "mapped-ram (unfinished)";
            }
            inspection.error = Some(format!("{:#}", anyhow::Error::new(err)));
        }
    }
    print_and_exit(&inspection, args.json)
}

fn print_and_exit(inspection: &Inspection, json: bool) -> u8 {
    if json {
        match serde_json::to_string(inspection) {
            Ok(text) => println!("{text}"),
            Err(err) => eprintln!("inspect: {err}"),
        }
    } else {
        print_inspection(inspection);
    }
    if inspection.complete { exit::OK } else { exit::FAILED }
}

/// Reads a stream file to its end, as a restore would, counting what it
/// holds: complete when it ends with the digests after the end of RAM.
fn inspect_stream(path: &std::path::Path, inspection: &mut Inspection) {
    use migration_core::{ChannelRx, ChannelTx};
    use migration_wire::{Message, PageEncoding};
    inspection.format = "stream";
    inspection.file_bytes = std::fs::metadata(path).ok().map(|m| m.len());
    let mut source = match StreamSource::open(path, Vec::new()) {
        Ok(source) => source,
        Err(err) => {
            inspection.error = Some(format!("{:#}", anyhow::Error::new(err)));
            return;
        }
    };
    let mut blocks: Vec<InspectedBlock> = Vec::new();
    let mut stored: Vec<std::collections::BTreeSet<u64>> = Vec::new();
    let mut passes = 0;
    let outcome = (|| -> Result<(), TransportError> {
        loop {
            let reply = match source.recv()? {
                Message::BlockList(list) => {
                    for b in &list.blocks {
                        blocks.push(InspectedBlock {
                            name: b.name.clone(),
                            bytes: b.length,
                            page_size: b.page_size,
                            pages: b.pages(),
                            stored_pages: 0,
                            zero_pages: 0,
                            digest: String::new(),
                        });
                        stored.push(Default::default());
                    }
                    None
                }
                Message::Pages(batch) => {
                    if let (Some(set), Some(block)) =
                        (stored.get_mut(batch.block as usize), blocks.get(batch.block as usize))
                    {
                        // Pages past the block's end are not counted (a
                        // restore refuses them).
                        for entry in batch.entries().flatten().filter(|e| e.page < block.pages) {
                            match entry.encoding {
                                PageEncoding::Plain => set.insert(entry.page),
                                PageEncoding::Zero => set.remove(&entry.page),
                            };
                        }
                    }
                    None
                }
                Message::SyncMarker(_) => {
                    passes += 1;
                    None
                }
                Message::DeviceState(state) => {
                    inspection.device_state_bytes = Some(state.len() as u64);
                    None
                }
                Message::EndOfRam(_) => Some(Message::Ready),
                Message::Go => Some(Message::Resumed),
                Message::Complete(complete) => {
                    for (block, digest) in blocks.iter_mut().zip(&complete.digests) {
                        block.digest = format!("{digest:016x}");
                    }
                    return Ok(());
                }
                _ => None,
            };
            if let Some(reply) = reply {
                source.send(&reply)?;
            }
        }
    })();
    for (block, set) in blocks.iter_mut().zip(&stored) {
        block.stored_pages = set.len() as u64;
        block.zero_pages = block.pages - block.stored_pages;
    }
    inspection.ram_bytes = Some(blocks.iter().map(|b| b.bytes).sum());
    inspection.passes = Some(passes);
    inspection.blocks = blocks;
    match outcome {
        Ok(()) => inspection.complete = true,
        Err(err) => {
            inspection.format = "stream (unfinished or damaged)";
            inspection.error = Some(format!("{:#}", anyhow::Error::new(err)));
        }
    }
}

fn print_inspection(i: &Inspection) {
    println!("file: {}", i.file);
    if let Some(err) = &i.error {
        println!("error: {err}");
        return;
    }
    println!("format: {} version {}", i.format, i.version);
    println!("complete: {}", i.complete);
    println!(
        "size: {} bytes of file for {} bytes of RAM; device state {} bytes; {} passes",
        i.file_bytes.unwrap_or(0),
        i.ram_bytes.unwrap_or(0),
        i.device_state_bytes.unwrap_or(0),
        i.passes.unwrap_or(0)
    );
    for b in &i.blocks {
        println!(
            "block {}: {} bytes, {} pages of {} bytes, {} stored, {} zero, digest {}",
            b.name, b.bytes, b.pages, b.page_size, b.stored_pages, b.zero_pages, b.digest
        );
    }
}
