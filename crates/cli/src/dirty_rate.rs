//! `migrate-cli dirty-rate`: how fast a running guest dirties its memory,
//! measured with the same kernel dirty tracking a migration uses (as QEMU's
//! `calc-dirty-rate`), to choose settings before migrating it.

use crate::send::GuestArgs;
use crate::units::human_bytes;
use anyhow::{Context, Result};
use migration_core::dirty_rate::measure_dirty_rate;
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct DirtyRateArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// How long to measure, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// How often the dirty log is collected, in milliseconds: a page
    /// written several times within one interval counts once, as a pass
    /// would send it once.
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
    /// Print one JSON object with the figures on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The figures, as `--json` prints them.
#[derive(Debug, Serialize)]
struct Figures {
    role: &'static str,
    ram_bytes: u64,
    window_ms: f64,
    intervals: u64,
    /// Pages dirtied per second (each once per interval).
    dirty_pages_per_sec: f64,
    dirty_bytes_per_sec: f64,
    /// Pages written at least once in the window.
    hot_set_pages: u64,
    hot_set_bytes: u64,
    /// The guest's own count of its page writes per second, for comparison.
    guest_writes_per_sec: f64,
}

pub fn run(args: DirtyRateArgs) -> u8 {
    match probe(&args) {
        Ok(()) => crate::exit::OK,
        Err(err) => {
            eprintln!("dirty-rate: error: {}", crate::chain(&err));
            crate::exit::FAILED
        }
    }
}

fn probe(args: &DirtyRateArgs) -> Result<()> {
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0,
        "--seconds must be a positive number"
    );
    let (memory, mut guest) = args.guest.build()?;
    // Track writes before the guest runs, so none goes unseen.
    let mut log = guest.dirty_log(&memory.ram)?;
    guest.start()?;
    let writes_before = guest.writes();
    let rate = measure_dirty_rate(
        &memory.ram,
        log.as_mut(),
        Duration::from_secs_f64(args.seconds),
        Duration::from_millis(args.interval_ms),
    )
    .context("measuring the dirty rate")?;
    let writes = guest.writes() - writes_before;
    let figures = Figures {
        role: "dirty-rate",
        ram_bytes: memory.ram.total_bytes(),
        window_ms: rate.window.as_secs_f64() * 1e3,
        intervals: rate.intervals,
        dirty_pages_per_sec: rate.pages_per_sec.round(),
        dirty_bytes_per_sec: rate.bytes_per_sec.round(),
        hot_set_pages: rate.hot_set_pages,
        hot_set_bytes: rate.hot_set_bytes,
        guest_writes_per_sec: (writes as f64 / rate.window.as_secs_f64()).round(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        eprintln!(
            "dirty-rate: {:.0} pages/s ({}/s) over {:.2} s, hot set {} of {}",
            figures.dirty_pages_per_sec,
            human_bytes(figures.dirty_bytes_per_sec),
            rate.window.as_secs_f64(),
            human_bytes(figures.hot_set_bytes as f64),
            human_bytes(figures.ram_bytes as f64)
        );
    }
    Ok(())
}
