//! What the CLI tells people and scripts: a progress bar or progress lines
//! on stderr while it runs, and one JSON object (or a summary) at the end.

use crate::units::human_bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use migration_core::{Event, Stats};
use serde::Serialize;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// The outcome of a migration.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Completed,
    Failed,
    Cancelled,
}

/// The JSON object both sides print with `--json`: the same schema,
/// `null` where a side cannot know a value.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub role: &'static str,
    pub status: Status,
    pub error: Option<String>,
    pub verified: Option<bool>,
    pub total_ms: Option<f64>,
    pub setup_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub expected_downtime_ms: Option<f64>,
    /// Source: wall-clock time (microseconds since the Unix epoch) the guest
    /// was paused for the switchover (or the switch to postcopy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_unix_us: Option<u64>,
    /// Destination: wall-clock time of the guest's first completed access
    /// to its memory after it resumed. On one host, minus the source's
    /// `paused_unix_us`: the guest's own gap (its blackout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_access_unix_us: Option<u64>,
    /// Source, precopy: where the downtime went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_parts: Option<DowntimePartsReport>,
    pub transferred_bytes: Option<u64>,
    pub ram_bytes: Option<u64>,
    pub iterations: Option<u64>,
    pub throughput_bytes_per_sec: Option<f64>,
    pub ram_bytes_per_sec: Option<f64>,
    pub zero_pages: Option<u64>,
    pub plain_pages: Option<u64>,
    /// Bytes zero pages did not put on the wire (4 KiB each).
    pub zero_page_saved_bytes: Option<u64>,
    /// Bytes compression took off the plain pages (source).
    pub compression_saved_bytes: Option<u64>,
    /// Channels used (the main connection included).
    pub channels: Option<usize>,
    /// Wire bytes per channel, main connection first (source).
    pub channel_bytes: Option<Vec<u64>>,
    /// Source: the VM runs on the source again after a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_resumed: Option<bool>,
    /// Source: page writes the guest made after it resumed on the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes_after_resume: Option<Option<u64>>,
    /// Source: the guest's write rate (bytes per second) measured over a
    /// short window after it resumed on the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_write_rate_after: Option<Option<f64>>,
    /// Source: the highest CPU throttle auto-converge applied to the guest,
    /// in percent (`null` without `--auto-converge`).
    pub throttle_percent: Option<u8>,
    /// Destination: the guest's own check of its pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_check: Option<Option<&'static str>>,
    /// Destination: which guest arrived ("synthetic" or "kvm").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<&'static str>,
    /// Destination, KVM guest: the data pages its own check compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_pages_checked: Option<u64>,
    /// Blocks whose digests differ.
    pub mismatched_blocks: Vec<u32>,
    /// Lazy restore: pages loaded on first touch and in the background.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyStats>,
    /// Postcopy: present once the migration switched to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyReport>,
    /// XBZRLE: present where deltas were agreed (source) or arrived
    /// (destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle: Option<XbzrleReport>,
    /// `--transport rdma-sim`: what the simulated NIC did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma: Option<crate::rdma::RdmaReport>,
    /// The most memory this process had resident at any time (`VmHWM`).
    pub peak_resident_bytes: Option<u64>,
    /// Print the JSON object on stderr (stdout carries a stream).
    #[serde(skip)]
    pub json_to_stderr: bool,
}

/// The parts of a precopy downtime, in order (see
/// [`migration_core::stats::DowntimeParts`]).
#[derive(Debug, Clone, Serialize)]
pub struct DowntimePartsReport {
    pub pause_ms: f64,
    pub sync_ms: f64,
    pub transfer_ms: f64,
    pub handover_ms: f64,
    pub final_bytes: u64,
}

/// How pages sent again fared against the XBZRLE cache; the destination
/// knows only `pages`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct XbzrleReport {
    pub cache_bytes: Option<u64>,
    /// Pages sent or placed as deltas (unchanged pages included).
    pub pages: u64,
    /// Bytes of those deltas.
    pub bytes: Option<u64>,
    /// Pages found in the cache (sent as deltas, or whole when the delta
    /// was too long).
    pub cache_hits: Option<u64>,
    /// Pages looked up and not found (sent whole).
    pub cache_misses: Option<u64>,
    /// Pages found whose delta was too long (sent whole).
    pub overflows: Option<u64>,
    /// Guest bytes the deltas stand for, per delta byte.
    pub encoding_rate: Option<f64>,
}

/// What a postcopy migration reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopyReport {
    /// Destination: guest accesses that found their page absent (not
    /// arrived yet), timed by the guest thread from the access to its
    /// completion; percentiles and maximum in microseconds.
    pub faults: Option<u64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    pub fault_max_us: Option<f64>,
    /// Destination: per guest thread, the time it spent blocked on absent
    /// pages (milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_ms: Option<std::collections::BTreeMap<String, f64>>,
    /// Pages sent (source) or placed (destination) because the destination
    /// asked for them.
    pub requested_pages: u64,
    /// Pages sent or placed by the background stream.
    pub streamed_pages: u64,
    /// Destination: faults the runtime's fault handler saw on pages not
    /// placed yet, and the time from reading each to the page placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_max_us: Option<f64>,
    /// Times a lost link was resumed, and the time it was down.
    pub recoveries: u64,
    pub link_down_ms: f64,
    /// From the first handshake byte to the destination holding every page
    /// (`total_ms` is to the guest running there).
    pub completed_ms: Option<f64>,
}

impl PostcopyReport {
    /// The runtime's figures; `destination` adds the fault handler's.
    pub fn new(stats: &migration_core::PostcopyStats, destination: bool) -> Self {
        Self {
            requested_pages: stats.requested_pages,
            streamed_pages: stats.streamed_pages,
            handler_faults: destination.then_some(stats.faults),
            service_p50_us: destination.then_some(stats.service.p50_us),
            service_p99_us: destination.then_some(stats.service.p99_us),
            service_max_us: destination.then_some(stats.service.max_us),
            recoveries: stats.recoveries,
            link_down_ms: ms(stats.paused),
            completed_ms: stats.completed.map(ms),
            ..Self::default()
        }
    }
}

/// Microseconds since the Unix epoch of `at`, a moment of this process.
pub fn unix_us(at: Instant) -> Option<u64> {
    let ago = Instant::now().checked_duration_since(at)?;
    let then = std::time::SystemTime::now().checked_sub(ago)?;
    Some(then.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros() as u64)
}

/// What a lazy restore reports.
#[derive(Debug, Clone, Serialize)]
pub struct LazyStats {
    /// Faults served (pages loaded because the guest touched them).
    pub faults: u64,
    /// Pages the prefetcher loaded.
    pub prefetched_pages: u64,
    /// Fault service time: median, 99th percentile, longest (microseconds).
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
    pub fault_max_us: f64,
    /// From the command's start to the guest's first completed access to its memory.
    pub first_access_ms: Option<f64>,
    /// From the command's start to every page loaded.
    pub all_loaded_ms: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Report {
    /// A report of `role` with nothing known yet.
    pub fn new(role: &'static str) -> Self {
        Self {
            role,
            status: Status::Failed,
            error: None,
            verified: None,
            total_ms: None,
            setup_ms: None,
            downtime_ms: None,
            expected_downtime_ms: None,
            downtime_parts: None,
            paused_unix_us: None,
            first_access_unix_us: None,
            transferred_bytes: None,
            ram_bytes: None,
            iterations: None,
            throughput_bytes_per_sec: None,
            ram_bytes_per_sec: None,
            zero_pages: None,
            plain_pages: None,
            zero_page_saved_bytes: None,
            compression_saved_bytes: None,
            channels: None,
            channel_bytes: None,
            source_resumed: None,
            writes_after_resume: None,
            guest_write_rate_after: None,
            throttle_percent: None,
            guest_check: None,
            guest: None,
            guest_pages_checked: None,
            mismatched_blocks: Vec::new(),
            lazy: None,
            postcopy: None,
            xbzrle: None,
            rdma: None,
            peak_resident_bytes: None,
            json_to_stderr: false,
        }
    }

    /// Fills the figures from `stats`; `total` is first handshake byte to
    /// the handover.
    pub fn fill(&mut self, stats: &Stats, total: Duration) {
        self.total_ms = Some(ms(total));
        self.downtime_ms = stats.downtime.map(ms);
        self.expected_downtime_ms = stats.expected_downtime.map(ms);
        self.downtime_parts = stats.downtime_parts.map(|p| DowntimePartsReport {
            pause_ms: ms(p.pause),
            sync_ms: ms(p.sync),
            transfer_ms: ms(p.transfer),
            handover_ms: ms(p.handover),
            final_bytes: p.final_bytes,
        });
        self.transferred_bytes = Some(stats.transferred_bytes);
        self.ram_bytes = Some(stats.ram_bytes);
        self.iterations = Some(stats.iterations);
        let secs = total.as_secs_f64();
        if secs > 0.0 {
            self.throughput_bytes_per_sec = Some((stats.transferred_bytes as f64 / secs).round());
            self.ram_bytes_per_sec = Some((stats.ram_transferred as f64 / secs).round());
        }
        self.zero_pages = Some(stats.zero_pages);
        self.plain_pages = Some(stats.plain_pages);
        self.zero_page_saved_bytes = Some(stats.zero_pages * 4096);
        if let Some(postcopy) = &stats.postcopy {
            let destination = self.role == "recv";
            let keep = self.postcopy.take().unwrap_or_default();
            self.postcopy = Some(PostcopyReport {
                faults: keep.faults,
                fault_p50_us: keep.fault_p50_us,
                fault_p99_us: keep.fault_p99_us,
                fault_max_us: keep.fault_max_us,
                blocked_ms: keep.blocked_ms,
                ..PostcopyReport::new(postcopy, destination)
            });
        }
        if let Some(x) = &stats.xbzrle {
            let source = self.role != "recv";
            self.xbzrle = Some(XbzrleReport {
                cache_bytes: source.then_some(x.cache_bytes),
                pages: x.pages,
                bytes: source.then_some(x.bytes),
                cache_hits: source.then_some(x.cache_hits),
                cache_misses: source.then_some(x.cache_misses),
                overflows: source.then_some(x.overflows),
                encoding_rate: (source && x.bytes > 0).then(|| (x.pages * 4096) as f64 / x.bytes as f64),
            });
        }
        if !stats.channel_bytes.is_empty() {
            self.compression_saved_bytes = Some(stats.compression_saved);
            self.channels = Some(stats.channel_bytes.len());
            self.channel_bytes = Some(stats.channel_bytes.clone());
        }
    }

    /// Records the setup time.
    pub fn setup(&mut self, setup: Duration) {
        self.setup_ms = Some(ms(setup));
    }

    /// Prints the report: JSON on stdout, or a summary for people on stderr.
    pub fn print(&self, json: bool) {
        if json {
            let text = serde_json::to_string(self).expect("a report serialises");
            if self.json_to_stderr {
                eprintln!("{text}");
            } else {
                println!("{text}");
            }
            return;
        }
        let mut line = match self.status {
            Status::Completed => format!("{}: migration completed", self.role),
            Status::Failed => format!("{}: migration failed", self.role),
            Status::Cancelled => format!("{}: migration cancelled", self.role),
        };
        if let (Some(ram), Some(rate), Some(total)) = (self.ram_bytes, self.ram_bytes_per_sec, self.total_ms) {
            line += &format!(
                ", {} of RAM in {:.0} ms ({}/s)",
                human_bytes(ram as f64),
                total,
                human_bytes(rate)
            );
        }
        if let Some(iterations) = self.iterations {
            line += &format!(", {iterations} passes");
        }
        if let Some(downtime) = self.downtime_ms {
            line += &format!(", downtime {downtime:.1} ms");
            if let Some(expected) = self.expected_downtime_ms {
                line += &format!(" (expected {expected:.1} ms)");
            }
        }
        match self.verified {
            Some(true) => line += ", verified",
            Some(false) => line += ", VERIFICATION FAILED",
            None => {}
        }
        if let Some(Some(check)) = self.guest_check {
            line += &format!(", guest check {check}");
        }
        if let Some(throttle) = self.throttle_percent.filter(|&t| t > 0) {
            line += &format!(", throttled to {throttle}%");
        }
        if let Some(true) = self.source_resumed {
            line += ", source resumed";
        }
        if let Some(x) = &self.xbzrle {
            line += &format!(", {} pages as XBZRLE deltas", x.pages);
            if let (Some(hits), Some(misses)) = (x.cache_hits, x.cache_misses) {
                line += &format!(" ({hits} cache hits, {misses} misses)");
            }
        }
        if let Some(postcopy) = &self.postcopy {
            line += &format!(
                ", postcopy: {} pages requested, {} streamed",
                postcopy.requested_pages, postcopy.streamed_pages
            );
            if let (Some(faults), Some(p50), Some(p99), Some(max)) = (
                postcopy.faults,
                postcopy.fault_p50_us,
                postcopy.fault_p99_us,
                postcopy.fault_max_us,
            ) {
                line += &format!(", {faults} guest faults (p50 {p50:.0} us, p99 {p99:.0} us, max {max:.0} us)");
            }
            if postcopy.recoveries > 0 {
                line += &format!(
                    ", link resumed {} times ({:.0} ms down)",
                    postcopy.recoveries, postcopy.link_down_ms
                );
            }
        }
        eprintln!("{line}");
        if let Some(error) = &self.error {
            eprintln!("{}: error: {error}", self.role);
        }
    }
}

/// Ends a command: a failure before the migration could report itself
/// becomes the report's error and exit code 1; then the report is printed.
pub fn finish(mut report: Report, json: bool, outcome: anyhow::Result<u8>) -> u8 {
    let code = outcome.unwrap_or_else(|err| {
        report.status = Status::Failed;
        report.error = Some(crate::chain(&err));
        crate::exit::FAILED
    });
    report.peak_resident_bytes = peak_resident_bytes();
    report.print(json);
    code
}

/// This process's peak resident memory, from `/proc/self/status`.
fn peak_resident_bytes() -> Option<u64> {
    Some(proc_kib("/proc/self/status", "VmHWM")? * 1024)
}

/// The value of `key` in a `/proc` file of `key: value kB` lines, such as
/// `/proc/meminfo`, in KiB.
pub fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// Renders events on stderr: a progress bar on a terminal, plain
/// `progress ...` lines otherwise (so scripts and tests can follow along).
pub struct Progress {
    role: &'static str,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
}

impl Progress {
    pub fn new(role: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{elapsed_precise}] {wide_msg}")
                    .expect("a valid template"),
            );
            bar.set_prefix(role);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            role,
            bar,
            last_line: None,
        }
    }

    pub fn event(&mut self, event: &Event) {
        match event {
            Event::Progress(stats) => self.progress(stats, None),
            Event::PassEnded { epoch, stats } => self.progress(stats, Some(*epoch)),
            Event::Switchover {
                reason,
                expected_downtime,
            } => self.say(&format!(
                "switching over ({reason:?}), expected downtime {:.1} ms",
                expected_downtime.as_secs_f64() * 1e3
            )),
            Event::Paused => self.say("source paused"),
            Event::Throttled { percent: 0 } => self.say("guest throttle lifted"),
            Event::Throttled { percent } => self.say(&format!("guest throttled to {percent}%")),
            Event::ThrottleFailed { percent, reason } => self.say(&format!(
                "throttling the guest to {percent}% failed ({reason}); going on without it"
            )),
            Event::Ready => self.say("destination ready"),
            Event::HandedOver => self.say("handed over (GO)"),
            Event::Resumed => self.say("guest running on the destination"),
            Event::Verified(ok) => self.say(if *ok { "digests verified" } else { "digests DIFFER" }),
            Event::SourceResumed => self.say("source guest resumed"),
            Event::Started => self.say("handshake done, transferring"),
            Event::ChannelRefused { peer, reason } => self.say(&format!("refused connection from {peer}: {reason}")),
            Event::PostcopyStarting { reason, remaining } => self.say(&format!(
                "switching to postcopy ({reason:?}), {} left to send",
                human_bytes(*remaining as f64)
            )),
            Event::PostcopyPaused { reason } => self.say(&format!(
                "postcopy paused, link lost ({reason}); waiting for it to be resumed"
            )),
            Event::PostcopyResumed { after } => {
                self.say(&format!("postcopy resumed after {:.0} ms", after.as_secs_f64() * 1e3))
            }
        }
    }

    fn progress(&mut self, stats: &Stats, pass_ended: Option<u64>) {
        let rate = stats.ram_rate();
        let mut fields = format!(
            "ram_transferred={} transferred_bytes={} iterations={} ram_bytes_per_sec={:.0}",
            stats.ram_transferred, stats.transferred_bytes, stats.iterations, rate
        );
        if let Some(remaining) = stats.remaining_bytes {
            fields += &format!(" remaining={remaining}");
        }
        if let Some(expected) = stats.expected_downtime {
            fields += &format!(" expected_downtime_ms={:.1}", expected.as_secs_f64() * 1e3);
        }
        if let Some(dirty) = stats.dirty_rate {
            fields += &format!(" dirty_rate={dirty:.0}");
        }
        if let Some(throttle) = stats.throttle_percent {
            fields += &format!(" throttle_percent={throttle}");
        }
        if stats.channel_bytes.len() > 1 {
            let per: Vec<String> = stats.channel_bytes.iter().map(u64::to_string).collect();
            fields += &format!(" channel_bytes={}", per.join(","));
        }
        if let Some(postcopy) = &stats.postcopy {
            fields += &format!(
                " postcopy_requested_pages={} postcopy_streamed_pages={}",
                postcopy.requested_pages, postcopy.streamed_pages
            );
            if postcopy.faults > 0 {
                fields += &format!(
                    " postcopy_faults={} service_p50_us={:.0} service_p99_us={:.0}",
                    postcopy.faults, postcopy.service.p50_us, postcopy.service.p99_us
                );
            }
        }
        if let Some(bar) = &self.bar {
            let mut msg = format!(
                "pass {}  {} sent  {}/s",
                stats.iterations + 1,
                human_bytes(stats.ram_transferred as f64),
                human_bytes(rate)
            );
            if let Some(remaining) = stats.remaining_bytes {
                msg += &format!("  {} dirty", human_bytes(remaining as f64));
            }
            if let Some(throttle) = stats.throttle_percent.filter(|&t| t > 0) {
                msg += &format!("  throttled {throttle}%");
            }
            if let Some(postcopy) = &stats.postcopy {
                msg += &format!(
                    "  postcopy: {} requested, {} streamed",
                    postcopy.requested_pages, postcopy.streamed_pages
                );
                if postcopy.faults > 0 {
                    msg += &format!(", fault p50 {:.0} us", postcopy.service.p50_us);
                }
            }
            if let Some(expected) = stats.expected_downtime {
                msg += &format!("  expected downtime {:.0} ms", expected.as_secs_f64() * 1e3);
            }
            bar.set_message(msg);
        } else if pass_ended.is_some() || self.last_line.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
            eprintln!("progress {} {fields}", self.role);
            self.last_line = Some(Instant::now());
        }
    }

    pub fn say(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("{}: {text}", self.role)),
            None => eprintln!("{}: {text}", self.role),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
