//! The `memcpy` bandwidth migration figures of the simulated RDMA
//! transport are quoted against, measured on this machine in the same run:
//!
//! - `warm`: one thread copies N bytes between two buffers whose pages are
//!   all present (the copy alone);
//! - `fresh`: one thread copies N bytes into a fresh memfd mapping (the copy
//!   plus the first touch of every destination page, which this machine's
//!   host makes slow);
//! - `fresh_2`: the same with two threads, each half.
//!
//! `memcpy-baseline --bytes N` prints one JSON line with each in bytes per
//! second.

use anyhow::{Context, Result};
use migration_sys::GuestRegion;
use std::time::Instant;

/// Bytes copied per call.
const CHUNK: usize = 64 << 20;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let bytes: usize = args
        .iter()
        .position(|a| a == "--bytes")
        .and_then(|i| args.get(i + 1))
        .context("--bytes N")?
        .parse()?;
    let bytes = bytes.next_multiple_of(CHUNK);
    // The source: every page written (not zero, so nothing is shared).
    let mut src = vec![0u8; bytes];
    for (i, chunk) in src.chunks_mut(4096).enumerate() {
        chunk.fill(i as u8 | 1);
    }
    let mut dst = vec![0u8; bytes];
    dst.iter_mut().step_by(4096).for_each(|b| *b = 1);
    // Best of three warm copies: the copy alone.
    let mut warm = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        for (d, s) in dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)) {
            d.copy_from_slice(s);
        }
        warm = warm.min(start.elapsed().as_secs_f64());
    }
    drop(dst);
    let fresh = |threads: usize| -> Result<f64> {
        let region = GuestRegion::memfd("memcpy-baseline", bytes)?;
        let per = bytes / threads;
        let start = Instant::now();
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (region, src) = (&region, &src);
                    scope.spawn(move || -> Result<()> {
                        for at in (t * per..(t + 1) * per).step_by(CHUNK) {
                            let len = CHUNK.min((t + 1) * per - at);
                            region.write(at, &src[at..at + len])?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for worker in workers {
                worker.join().expect("copying thread")?;
            }
            Ok(())
        })?;
        Ok(start.elapsed().as_secs_f64())
    };
    let fresh_1 = fresh(1)?;
    let fresh_2 = fresh(2)?;
    let rate = |secs: f64| (bytes as f64 / secs).round();
    println!(
        "{{\"bytes\": {bytes}, \"warm\": {}, \"fresh\": {}, \"fresh_2\": {}}}",
        rate(warm),
        rate(fresh_1),
        rate(fresh_2)
    );
    Ok(())
}
