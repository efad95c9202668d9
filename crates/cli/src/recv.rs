//! `migrate-cli recv`: the destination side.

use crate::exit;
use crate::guest::{DestGuest, Verdict};
use crate::memory;
use crate::report::{Progress, Report, Status};
use crate::units::{parse_duration, parse_size};
use anyhow::{Context, Result};
use migration_core::dest::{self, DestOptions, run_destination};
use migration_core::{Channel, Event, TransportError};
use migration_wire::{ErrorCode, Features};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport_rdma_sim::{DestChannel, DestNic, DestNicSlot};
use transport_tcp::{TcpChannel, TcpListener, TcpOptions};

#[derive(Debug, clap::Args)]
pub struct RecvArgs {
    /// Address to listen on (HOST:PORT; port 0 picks a free one, printed on stderr).
    #[arg(long)]
    pub listen: String,
    /// Back guest RAM with this file (created or resized), which holds the
    /// migrated RAM afterwards.
    #[arg(long)]
    pub mem_file: Option<PathBuf>,
    /// Allocate this much guest RAM (e.g. 2G) before listening, as a VMM
    /// that preallocates its memory; a source whose RAM is another size is
    /// refused.
    #[arg(long, value_parser = parse_size, conflicts_with = "mem_file")]
    pub prealloc: Option<u64>,
    /// Put an inaccessible page right before and right after every RAM
    /// block (anonymous memory), so that a write outside guest RAM faults
    /// instead of landing in other memory: hardening, and how the tests
    /// prove hostile input writes nothing outside the announced RAM.
    #[arg(long, conflicts_with_all = ["mem_file", "prealloc"])]
    pub guard_pages: bool,
    /// Largest guest RAM accepted (e.g. 8G; default: this host's memory).
    #[arg(long, value_parser = parse_size)]
    pub max_mem: Option<u64>,
    /// How long the resumed guest runs before the command exits.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub run_for: Duration,
    /// Longest silence from the source before the migration fails.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub io_timeout: Duration,
    /// Most parallel channels accepted from a source.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: u16,
    /// Compression a source may use: any, none, lz4 or zstd.
    #[arg(long, default_value = "any", value_parser = ["any", "none", "lz4", "zstd"])]
    pub compress: String,
    /// How channel threads move bytes: io_uring (a ring per thread; plain
    /// calls where the kernel refuses it) or plain system calls.
    #[arg(long, default_value = "uring", value_parser = ["uring", "plain"])]
    pub io: String,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Accept only sources whose certificate is valid for this name
    /// (repeatable; default: any the CA signed).
    #[arg(long, requires = "tls_cert")]
    pub tls_allow: Vec<String>,
    /// In postcopy, how long to wait for the source to resume a lost link
    /// before the migration (and the VM's state) is given up.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub resume_timeout: Duration,
    #[command(flatten)]
    pub transport: crate::rdma::TransportArgs,
    /// With --transport rdma-sim: pin all of guest RAM when registering it
    /// (every page populated up front, as QEMU's rdma-pin-all), instead of
    /// letting the NIC's writes allocate pages as they reach them.
    #[arg(long)]
    pub rdma_pin_all: bool,
    /// Print no progress lines (errors and the result still print).
    #[arg(long)]
    pub quiet: bool,
    /// Print one JSON object with the outcome on stdout.
    #[arg(long)]
    pub json: bool,
}

impl RecvArgs {
    /// What is wrong with the flags together, for a usage error.
    pub fn problem(&self) -> Option<String> {
        let rdma = self.transport.rdma();
        if !rdma && (self.transport.rdma_nic != crate::rdma::NicChoice::Auto || self.rdma_pin_all) {
            return Some("--rdma-nic and --rdma-pin-all go with --transport rdma-sim".into());
        }
        if rdma && self.tls.tls_cert.is_some() {
            return Some("--transport rdma-sim has no TLS (RDMA traffic is not encrypted either)".into());
        }
        None
    }
}

pub fn run(args: RecvArgs) -> u8 {
    let mut report = Report::new("recv");
    report.guest_check = Some(None);
    let outcome = recv(&args, &mut report);
    crate::report::finish(report, args.json, outcome)
}

fn recv(args: &RecvArgs, report: &mut Report) -> Result<u8> {
    let tcp = TcpOptions {
        io_timeout: args.io_timeout,
        io_uring: args.io == "uring",
        tls: args.tls.server(&args.tls_allow)?,
        ..TcpOptions::default()
    };
    let prealloc = args
        .prealloc
        // The memfd NIC shares guest RAM by file descriptor; otherwise
        // private memory, which postcopy can place pages into.
        .map(|size| {
            memory::Preallocated::new(
                size,
                args.transport.rdma() && args.transport.rdma_nic == crate::rdma::NicChoice::Memfd,
            )
        })
        .transpose()
        .context("preallocating guest RAM (--prealloc)")?;
    let options = DestOptions {
        max_ram: args.max_mem.unwrap_or_else(host_memory),
        // A source whose RAM is of another size is refused in the handshake.
        ram_size: prealloc.as_ref().map(memory::Preallocated::size),
        max_channels: args.channels,
        compression: match args.compress.as_str() {
            "none" => Features::default(),
            "lz4" => Features::LZ4,
            "zstd" => Features::ZSTD,
            _ => Features::LZ4.union(Features::ZSTD),
        },
        io_timeout: args.io_timeout,
        // Postcopy places pages with userfaultfd into private anonymous
        // memory: not into a file.
        postcopy: args.mem_file.is_none(),
        resume_timeout: args.resume_timeout,
        ..DestOptions::default()
    };
    let listener = TcpListener::bind(&args.listen, tcp).with_context(|| format!("listening on {}", args.listen))?;
    eprintln!("listening on {}", listener.local_addr()?);

    // The simulated RDMA NIC, once chosen: every channel announces its
    // registered memory.
    let rdma = args.transport.rdma().then(|| Arc::new(DestNicSlot::new()));
    let wrap = |channel: TcpChannel| -> Result<Box<dyn Channel>, TransportError> {
        Ok(match &rdma {
            Some(slot) => Box::new(DestChannel::new(channel, Arc::clone(slot))?),
            None => Box::new(channel),
        })
    };

    // Serve one migration: a connection that fails the handshake is
    // refused and reported, and the wait goes on.
    let (incoming, addrs) = loop {
        let accepted = listener.accept().and_then(|channel| {
            let peer = migration_core::Channel::peer(&channel);
            let addrs = (peer.parse::<SocketAddr>().ok(), channel.local_addr().ok());
            Ok((wrap(channel)?, peer, addrs))
        });
        let (channel, peer, addrs) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("accept failed: {}", crate::chain(&err.into()));
                continue;
            }
        };
        match dest::accept(channel, &options) {
            Ok(incoming) => break (incoming, addrs),
            Err(err) => eprintln!("refused connection from {peer}: {}", crate::chain(&err.into())),
        }
    };

    let setup_start = Instant::now();
    let memory = match memory::destination(
        incoming.blocks(),
        args.mem_file.as_deref(),
        prealloc.as_ref(),
        args.guard_pages,
        incoming.postcopy(),
    ) {
        Ok(memory) => memory,
        Err(err) => {
            incoming.refuse(
                ErrorCode::Internal,
                &format!("destination cannot prepare guest RAM: {err:#}"),
            );
            return Err(err.context("preparing guest RAM"));
        }
    };
    let nic = match &rdma {
        Some(slot) => match start_nic(args, &memory, addrs, incoming.postcopy()) {
            Ok(nic) => {
                let _ = slot.set(Arc::clone(&nic));
                Some(nic)
            }
            Err(err) => {
                incoming.refuse(ErrorCode::Internal, &format!("{err:#}"));
                return Err(err.context("setting up the simulated RDMA NIC"));
            }
        },
        None => None,
    };
    report.setup(setup_start.elapsed());
    let mut accept =
        |wait: Duration| -> Result<Box<dyn Channel>, TransportError> { wrap(listener.accept_within(Some(wait))?) };
    let outcome = receive(
        incoming,
        &mut accept,
        memory,
        &options,
        args.quiet,
        args.run_for,
        report,
    );
    if let Some(nic) = nic {
        report.rdma = Some(crate::rdma::RdmaReport::destination(nic.kind(), &nic.stats()));
    }
    outcome
}

/// Chooses the simulated NIC for a source at `addrs` (its address, and the
/// one it reached), starts it and registers guest RAM with it.
fn start_nic(
    args: &RecvArgs,
    memory: &memory::GuestMemory,
    (peer, local): (Option<SocketAddr>, Option<SocketAddr>),
    postcopy: bool,
) -> Result<Arc<DestNic>> {
    let shareable = memory.regions().iter().all(|r| r.backing().is_some());
    let kind = crate::rdma::choose_nic(args.transport.rdma_nic, peer, local, postcopy, shareable)?;
    let nic = DestNic::start(kind, crate::rdma::nic_ip(local))?;
    nic.register(&memory.regions(), args.rdma_pin_all)?;
    Ok(Arc::new(nic))
}

/// Receives an accepted migration into `memory`, runs the guest for
/// `run_for` once it resumed and reports; shared by `recv` and `restore`.
pub fn receive(
    incoming: dest::Incoming,
    accept: &mut dyn FnMut(Duration) -> Result<Box<dyn Channel>, TransportError>,
    memory: memory::GuestMemory,
    options: &DestOptions,
    quiet: bool,
    run_for: Duration,
    report: &mut Report,
) -> Result<u8> {
    report.ram_bytes = Some(memory.ram.total_bytes());
    let mut guest = DestGuest::new(memory.regions());
    let mut progress = Progress::new(report.role);
    let result = run_destination(
        incoming,
        accept,
        &memory.ram,
        memory.fresh,
        &mut guest,
        options,
        &mut |event| match event {
            Event::ChannelRefused { peer, reason } => eprintln!("refused connection from {peer}: {reason}"),
            _ if !quiet => progress.event(event),
            _ => {}
        },
    );
    progress.finish();
    let (resumed, verified) = match result {
        Ok(done) => {
            report.fill(&done.stats, done.until_handover);
            report.status = Status::Completed;
            report.verified = done.verified;
            report.mismatched_blocks = done.mismatched_blocks.clone();
            if done.verified == Some(false) {
                report.error = Some(format!(
                    "guest RAM differs from the source in blocks {:?}",
                    done.mismatched_blocks
                ));
            }
            (true, done.verified == Some(true))
        }
        Err(failure) => {
            report.fill(&failure.stats, failure.stats.elapsed);
            let lost = matches!(failure.error, dest::DestError::StateLost(_));
            // Once resumed, the guest lives here: the migration completed,
            // only its verification failed (unless postcopy lost the state).
            report.status = if failure.resumed && !lost {
                Status::Completed
            } else {
                Status::Failed
            };
            report.error = Some(format!("{:#}", anyhow::Error::new(failure.error)));
            if lost {
                // The guest here waits for pages that will never come: its
                // threads blocked on them never stop, so it is not dropped
                // (which would wait for them); the process ends with them.
                std::mem::forget(guest);
                return Ok(exit::LOST);
            }
            (failure.resumed, false)
        }
    };
    if !resumed {
        // Never ran: the source keeps the VM; discard.
        return Ok(exit::FAILED);
    }
    report.guest = guest.kind();
    let code = run_resumed(guest.verdict(), verified, run_for, report);
    if let Some(guest) = guest.synthetic() {
        report.first_access_unix_us = guest.first_access().and_then(crate::report::unix_us);
        if let Some(postcopy) = &mut report.postcopy {
            // The guest's own view of its waits for pages that had not arrived.
            let faults = guest.fault_stats();
            postcopy.faults = Some(faults.faults);
            postcopy.fault_p50_us = Some(faults.p50_us);
            postcopy.fault_p99_us = Some(faults.p99_us);
            postcopy.fault_max_us = Some(faults.max_us);
            postcopy.blocked_ms = Some(
                faults
                    .blocked
                    .iter()
                    .map(|(thread, blocked)| (thread.clone(), blocked.as_secs_f64() * 1e3))
                    .collect(),
            );
        }
    }
    Ok(code)
}

/// The guest runs here now: records its own verdict, lets it run for
/// `run_for`, and returns the exit code.
pub fn run_resumed(verdict: Verdict, verified: bool, run_for: Duration, report: &mut Report) -> u8 {
    report.guest_check = Some(Some(verdict.word()));
    if let Verdict::Kvm(Ok(kvm)) = &verdict {
        report.guest_pages_checked = Some(kvm.pages_checked);
    }
    if let Some(text) = verdict.problem() {
        report.error = Some(report.error.take().map_or(text.clone(), |e| format!("{e}; {text}")));
    }
    // Let the guest run for a moment, as a VMM would keep it running.
    std::thread::sleep(run_for);
    if verified && verdict.word() == "passed" {
        exit::OK
    } else {
        exit::MISMATCH
    }
}

/// Physical memory of this host (`MemTotal`), the default limit on what a
/// source may announce.
fn host_memory() -> u64 {
    crate::report::proc_kib("/proc/meminfo", "MemTotal").map_or(64 << 30, |kib| kib * 1024)
}
