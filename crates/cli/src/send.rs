//! `migrate-cli send`: the source side.

use crate::exit;
use crate::guest::{GuestKind, SourceGuest};
use crate::memory::{self, GuestMemory};
use crate::report::{Progress, Report, Status};
use crate::units::{parse_duration, parse_size};
use anyhow::{Context, Result};
use clap::ValueEnum;
use migration_core::engine::AutoConverge;
use migration_core::source::SourceError;
use migration_core::source::{SourceOptions, run_source};
use migration_core::{Cancel, Channel, Compression, Event, LimitAction, PostcopyWhen, PrecopyConfig, TransportError};
use migration_wire::SessionId;
use reference_guest::kvm::KvmGuest;
use reference_guest::{Content, GuestSpec, Pattern, SyntheticGuest};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use transport_rdma_sim::{Faults, SourceChannel, SourceNic};
use transport_tcp::TcpOptions;

/// What to do when precopy does not converge within its limits.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnLimit {
    /// Switch over anyway (longer downtime).
    Switchover,
    /// Fail; the source keeps running.
    Fail,
}

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Destination address (HOST:PORT) where `migrate-cli recv` listens.
    #[arg(long)]
    pub to: String,
    /// Compression of page batches on the channel threads: none, lz4, zstd
    /// or zstd:LEVEL (a batch that would not shrink is sent as it is).
    #[arg(long, default_value = "none")]
    pub compress: Compression,
    /// How channel threads move bytes: io_uring (a ring per thread; plain
    /// calls where the kernel refuses it) or plain system calls.
    #[arg(long, default_value = "uring", value_parser = ["uring", "plain"])]
    pub io: String,
    /// How long to keep retrying the connection.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub connect_timeout: Duration,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// The name the destination's certificate must carry (default: the
    /// host of --to).
    #[arg(long, requires = "tls_cert")]
    pub tls_server_name: Option<String>,
    /// Allow postcopy: when precopy will not converge (the guest dirties
    /// memory faster than it is sent) the guest runs on the destination at
    /// once, and the pages it lacks follow, the ones it touches first. The
    /// destination needs anonymous memory (no --mem-file) and userfaultfd.
    #[arg(long)]
    pub postcopy: bool,
    /// Switch to postcopy after this many passes (0: at once, before any
    /// page is sent), or earlier where precopy will not converge.
    #[arg(long, requires = "postcopy")]
    pub postcopy_after: Option<u64>,
    /// In postcopy, how long to keep re-dialling a lost link before the
    /// migration (and the VM's state) is given up.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub resume_timeout: Duration,
    /// Send pages that go again as XBZRLE deltas against a cache of this
    /// size (e.g. 256M) of the copies last sent, shared out among the
    /// channels: a win for a hot set rewritten with small changes. Costs
    /// this much memory on the source; off by default.
    #[arg(long, value_parser = parse_size)]
    pub xbzrle_cache: Option<u64>,
    #[command(flatten)]
    pub transport: crate::rdma::TransportArgs,
    /// For testing --transport rdma-sim: faults the simulated NIC injects,
    /// as seed=N,delay=P,reorder=P,qp-error=CHANNEL@N,drop-link=CHANNEL@N
    /// (P: probability per completion or poll; CHANNEL@N: that channel's
    /// N-th write, or for drop-link its N-th message or page batch, once).
    #[arg(long, value_name = "SPEC")]
    pub rdma_faults: Option<transport_rdma_sim::FaultPlan>,
    #[command(flatten)]
    pub source: SourceArgs,
}

impl SendArgs {
    /// What is wrong with the flags together, for a usage error.
    pub fn problem(&self) -> Option<String> {
        if let Some(problem) = self.source.throttle.problem() {
            return Some(problem);
        }
        let rdma = self.transport.rdma();
        if !rdma && (self.rdma_faults.is_some() || self.transport.rdma_nic != crate::rdma::NicChoice::Auto) {
            return Some("--rdma-nic and --rdma-faults go with --transport rdma-sim".into());
        }
        if rdma && self.tls.tls_cert.is_some() {
            return Some("--transport rdma-sim has no TLS (RDMA traffic is not encrypted either)".into());
        }
        if rdma && self.postcopy && self.transport.rdma_nic == crate::rdma::NicChoice::Memfd {
            return Some(
                "--rdma-nic memfd cannot carry postcopy (it writes into memory the guest runs on); use --rdma-nic tcp"
                    .into(),
            );
        }
        None
    }
}

/// The guest, shared by `send`, `save` and `dirty-rate`.
#[derive(Debug, clap::Args)]
pub struct GuestArgs {
    /// Which guest runs: the synthetic guest (writer threads over guest RAM)
    /// or a KVM micro-VM (vCPUs running a 32-bit program that rewrites and
    /// checks its own pages; needs /dev/kvm, at most 3 GiB). --pattern,
    /// --hot-set, --content and --writers are the synthetic guest's.
    #[arg(long = "guest", value_enum, default_value = "synthetic")]
    pub kind: GuestKind,
    /// vCPUs of the KVM guest (1-64).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub vcpus: u16,
    /// Back guest RAM with this existing file (MAP_SHARED), keeping its content.
    #[arg(long, conflicts_with = "mem_size")]
    pub mem_file: Option<PathBuf>,
    /// Guest RAM size of an anonymous-memory guest (e.g. 512M, 2G).
    #[arg(long, value_parser = parse_size)]
    pub mem_size: Option<u64>,
    /// Bytes of 4 KiB page writes per second the guest makes (0: idle).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub dirty_rate: u64,
    /// Which pages the guest writes: uniform, hotset or sequential.
    #[arg(long, default_value = "uniform")]
    pub pattern: Pattern,
    /// Size of the hot set for --pattern hotset (default: a quarter of RAM).
    #[arg(long, value_parser = parse_size)]
    pub hot_set: Option<u64>,
    /// What the guest's pages hold: random, text, zero-heavy or sparse (each
    /// rewrite changes 64 bytes and the header).
    #[arg(long, default_value = "random")]
    pub content: Content,
    /// Writer threads of the synthetic guest.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Seed of the synthetic guest's contents and choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl GuestArgs {
    /// Guest RAM and the guest over it, not yet running (a KVM guest has
    /// booted: each of its pages written once).
    pub fn build(&self) -> Result<(GuestMemory, SourceGuest)> {
        let memory: GuestMemory = match &self.mem_file {
            Some(path) => memory::source_file(path)?,
            None => memory::anonymous(&memory::source_layout(self.mem_size.unwrap_or(256 << 20))?)?,
        };
        if self.kind == GuestKind::Kvm {
            anyhow::ensure!(
                self.hot_set.is_none() && self.pattern == Pattern::Uniform && self.content == Content::Random,
                "--pattern, --hot-set and --content are the synthetic guest's; the KVM guest rewrites its pages in order"
            );
            let guest = KvmGuest::new(memory.regions(), usize::from(self.vcpus), self.dirty_rate)
                .context("booting the KVM guest")?;
            return Ok((memory, SourceGuest::Kvm(guest)));
        }
        let spec = GuestSpec {
            dirty_rate: self.dirty_rate,
            pattern: self.pattern,
            hot_set: self.hot_set.unwrap_or(memory.ram.total_bytes() / 4),
            content: self.content,
            writers: self.writers,
            seed: self.seed,
        };
        let guest = SyntheticGuest::new(memory.regions(), spec, self.mem_file.is_none())
            .context("starting the synthetic guest")?;
        Ok((memory, SourceGuest::Synthetic(guest)))
    }
}

/// The guest and the precopy settings, shared by `send` and `save`.
#[derive(Debug, clap::Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Switch over once the expected downtime is at most this many milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Cap on wire bytes per second before the switchover (e.g. 100M).
    #[arg(long, value_parser = parse_size)]
    pub max_bandwidth: Option<u64>,
    /// Passes after which --on-limit applies (0: no limit).
    #[arg(long, default_value_t = 30)]
    pub max_iterations: u64,
    /// Time after which --on-limit applies (e.g. 60s; default: no limit).
    #[arg(long, value_parser = parse_duration)]
    pub max_time: Option<Duration>,
    /// When a limit is reached first: switch over anyway, or fail.
    #[arg(long, value_enum, default_value = "switchover")]
    pub on_limit: OnLimit,
    #[command(flatten)]
    pub throttle: ThrottleArgs,
    /// Parallel channels (connections or file writers, each with a thread
    /// of its own) that carry pages; a destination's `--channels` is the
    /// limit.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: u16,
    /// Longest wait for the destination's answers, and the TCP user timeout.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub io_timeout: Duration,
    /// Print one JSON object with the outcome on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Auto-converge, shared by `send` and `save`.
#[derive(Debug, clap::Args)]
pub struct ThrottleArgs {
    /// Slow the guest's vCPUs while it dirties memory faster than precopy
    /// sends it: when the guest dirtied more than half of what was sent over
    /// a second, twice, the throttle goes up (lifted when the migration ends).
    #[arg(long)]
    pub auto_converge: bool,
    /// The first throttle, in percent of the guest's CPU time (1-99).
    #[arg(long, value_name = "N", default_value_t = 20, requires = "auto_converge",
          value_parser = clap::value_parser!(u8).range(1..=99))]
    pub throttle_initial: u8,
    /// What each later step adds, in percent (1-99).
    #[arg(long, value_name = "N", default_value_t = 10, requires = "auto_converge",
          value_parser = clap::value_parser!(u8).range(1..=99))]
    pub throttle_increment: u8,
    /// The highest throttle, in percent (1-99, at least --throttle-initial).
    #[arg(long, value_name = "N", default_value_t = 99, requires = "auto_converge",
          value_parser = clap::value_parser!(u8).range(1..=99))]
    pub throttle_max: u8,
    /// Step by less than --throttle-increment where less would bring the
    /// guest's dirtying down to the trigger.
    #[arg(long, requires = "auto_converge")]
    pub throttle_tailslow: bool,
}

impl ThrottleArgs {
    /// What is wrong with the flags together, for a usage error.
    pub fn problem(&self) -> Option<String> {
        (self.throttle_initial > self.throttle_max).then(|| {
            format!(
                "--throttle-initial {} is above --throttle-max {}",
                self.throttle_initial, self.throttle_max
            )
        })
    }

    /// The engine's settings (`None`: no auto-converge).
    pub fn config(&self) -> Option<AutoConverge> {
        self.auto_converge.then(|| AutoConverge {
            initial: self.throttle_initial,
            increment: self.throttle_increment,
            max: self.throttle_max,
            tailslow: self.throttle_tailslow,
            ..AutoConverge::default()
        })
    }
}

/// Where the source sends its guest.
pub enum Target<'a> {
    /// A `migrate-cli recv` over TCP.
    Tcp(&'a SendArgs),
    /// A mapped-ram snapshot file.
    File(&'a transport_file::SaveTarget),
    /// A stream file (or pipe), pages compressed as asked.
    Stream(&'a transport_file::StreamTarget, Compression),
}

pub fn run(args: SendArgs) -> u8 {
    run_to("send", &args.source, Target::Tcp(&args))
}

/// Runs the source side into `target`, reporting as `role`.
pub fn run_to(role: &'static str, args: &SourceArgs, target: Target<'_>) -> u8 {
    let mut report = Report::new(role);
    // A stream to standard output owns stdout.
    report.json_to_stderr = matches!(target, Target::Stream(stream, _) if stream.to_stdout());
    report.writes_after_resume = Some(None);
    report.guest_write_rate_after = Some(None);
    report.source_resumed = Some(false);
    let outcome = send(args, target, &mut report);
    crate::report::finish(report, args.json, outcome)
}

fn session_id() -> SessionId {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    SessionId(nanos ^ (u64::from(std::process::id()) << 32))
}

fn send(args: &SourceArgs, target: Target<'_>, report: &mut Report) -> Result<u8> {
    let setup_start = Instant::now();
    let (memory, mut guest) = args.guest.build()?;
    report.ram_bytes = Some(memory.ram.total_bytes());
    // Track writes before the guest runs, so none goes unseen.
    let mut dirty = guest.dirty_log(&memory.ram)?;
    guest.start()?;
    report.source_resumed = Some(true);

    let tcp = match target {
        Target::Tcp(send) => TcpOptions {
            connect_timeout: send.connect_timeout,
            io_timeout: args.io_timeout,
            io_uring: send.io == "uring",
            tls: send.tls.client(send.tls_server_name.as_deref())?,
            ..TcpOptions::default()
        },
        Target::File(_) | Target::Stream(..) => TcpOptions::default(),
    };
    let rdma = match target {
        Target::Tcp(send) if send.transport.rdma() => Some(std::sync::Arc::new(SourceNic::new(
            send.transport.rdma_nic.kind(),
            memory.ram.blocks().iter().map(|b| b.region().len() as u64).collect(),
            args.io_timeout,
            send.rdma_faults
                .clone()
                .map(|plan| std::sync::Arc::new(Faults::new(plan))),
        ))),
        _ => None,
    };
    let mut connect = |index: u16, wait: Duration| -> Result<Box<dyn Channel>, TransportError> {
        Ok(match target {
            Target::Tcp(send) => {
                let tcp = TcpOptions {
                    connect_timeout: tcp.connect_timeout.min(wait),
                    ..tcp.clone()
                };
                let channel = transport_tcp::connect(&send.to, &tcp)?;
                match &rdma {
                    Some(nic) => Box::new(SourceChannel::new(channel, index, std::sync::Arc::clone(nic))?),
                    None => Box::new(channel),
                }
            }
            Target::File(file) => Box::new(file.channel(index)),
            Target::Stream(stream, _) => Box::new(stream.channel()),
        })
    };
    let first_wait = tcp.connect_timeout;
    let channel = match connect(0, first_wait) {
        Ok(channel) => channel,
        Err(err) => {
            record_resumed(report, &guest, args.guest.dirty_rate);
            return Err(err).context("connecting to the destination");
        }
    };
    report.setup(setup_start.elapsed());

    // Ctrl-C or SIGTERM before the handover cancels: the guest resumes here.
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, std::sync::Arc::clone(&cancel)).context("installing a signal handler")?;
    }
    let options = SourceOptions {
        precopy: PrecopyConfig {
            downtime_limit: Duration::from_millis(args.downtime_ms),
            max_iterations: (args.max_iterations > 0).then_some(args.max_iterations),
            max_time: args.max_time,
            on_limit: match args.on_limit {
                OnLimit::Switchover => LimitAction::Switchover,
                OnLimit::Fail => LimitAction::Fail,
            },
            max_bandwidth: args.max_bandwidth,
            postcopy: match target {
                Target::Tcp(send) if send.postcopy => Some(
                    send.postcopy_after
                        .map_or(PostcopyWhen::NotConverging, PostcopyWhen::AfterPasses),
                ),
                _ => None,
            },
            auto_converge: args.throttle.config(),
            ..PrecopyConfig::default()
        },
        resume_timeout: match target {
            Target::Tcp(send) => send.resume_timeout,
            _ => SourceOptions::default().resume_timeout,
        },
        // A file holds no earlier copy to apply a delta to.
        xbzrle_cache: match target {
            Target::Tcp(send) => send.xbzrle_cache,
            _ => None,
        },
        session: session_id(),
        reply_timeout: args.io_timeout,
        cancel: Cancel::from_flag(cancel),
        // A stream has one channel.
        channels: if matches!(target, Target::Stream(..)) {
            1
        } else {
            args.channels
        },
        compression: match target {
            Target::Tcp(send) => send.compress,
            // A mapped-ram file stores pages as they are.
            Target::File(_) => Compression::None,
            Target::Stream(_, compress) => compress,
        },
        ..SourceOptions::default()
    };
    let mut progress = Progress::new(report.role);
    let mut paused_at = None;
    let mut highest_throttle = 0;
    let result = run_source(
        channel,
        &mut connect,
        &memory.ram,
        &mut guest,
        dirty.as_mut(),
        &options,
        &mut |event| {
            match event {
                Event::Paused => paused_at = Some(Instant::now()),
                Event::Throttled { percent } => highest_throttle = highest_throttle.max(*percent),
                _ => {}
            }
            progress.event(event)
        },
    );
    progress.finish();
    report.rdma = rdma.map(|nic| crate::rdma::RdmaReport::source(&nic.stats()));
    report.throttle_percent = options.precopy.auto_converge.map(|_| highest_throttle);
    let paused_unix_us = paused_at.and_then(crate::report::unix_us);
    let mark_pause = |report: &mut Report| report.paused_unix_us = paused_unix_us;
    match result {
        Ok(done) => {
            report.fill(&done.stats, done.until_handover);
            mark_pause(report);
            report.source_resumed = Some(false);
            report.status = Status::Completed;
            report.verified = done.verified;
            report.mismatched_blocks = done.mismatched_blocks.clone();
            Ok(match done.verified {
                Some(true) => exit::OK,
                Some(false) => {
                    report.error = Some(format!(
                        "destination RAM differs from the source in blocks {:?}",
                        done.mismatched_blocks
                    ));
                    exit::MISMATCH
                }
                None => {
                    report.error = Some(format!(
                        "handed over, but not verified: {}",
                        done.verification_error.as_deref().unwrap_or("no verdict")
                    ));
                    exit::MISMATCH
                }
            })
        }
        Err(failure) => {
            report.fill(&failure.stats, failure.stats.elapsed);
            mark_pause(report);
            report.status = if matches!(failure.error, SourceError::Cancelled) {
                Status::Cancelled
            } else {
                Status::Failed
            };
            let lost = matches!(failure.error, SourceError::StateLost(_));
            report.error = Some(format!("{:#}", anyhow::Error::new(failure.error)));
            report.source_resumed = Some(failure.source_resumed);
            if failure.source_resumed {
                record_resumed(report, &guest, args.guest.dirty_rate);
            }
            Ok(if failure.source_resumed {
                exit::FAILED
            } else if lost {
                exit::LOST
            } else {
                // GO went out unconfirmed, or the guest would not resume:
                // nothing runs on this side, an operator decides.
                exit::OPERATOR
            })
        }
    }
}

/// Records how the guest runs after it resumed on the source: that it
/// writes at all, then its write rate (unthrottled, it is near its
/// `--dirty-rate`).
fn record_resumed(report: &mut Report, guest: &SourceGuest, dirty_rate: u64) {
    report.writes_after_resume = Some(Some(writes_while_running(guest, dirty_rate)));
    report.guest_write_rate_after = Some(Some(write_rate(guest, RATE_WINDOW)));
}

/// How long the resumed guest's write rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(200);

/// The guest's page writes over `window`, in bytes per second.
fn write_rate(guest: &SourceGuest, window: Duration) -> f64 {
    let (before, start) = (guest.writes(), Instant::now());
    std::thread::sleep(window);
    let bytes = (guest.writes() - before) as f64 * migration_sys::PAGE_SIZE as f64;
    (bytes / start.elapsed().as_secs_f64()).round()
}

/// Shows the resumed guest really runs: waits (bounded) for some writes of
/// a guest that writes at all, and returns how many it made.
fn writes_while_running(guest: &SourceGuest, dirty_rate: u64) -> u64 {
    let before = guest.writes();
    if dirty_rate > 0 {
        guest.wait_writes(before + 16, Duration::from_secs(5));
    }
    guest.writes() - before
}
