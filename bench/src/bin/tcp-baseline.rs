//! Raw single-stream TCP between two processes: the baseline migration
//! throughput is quoted against.
//!
//! `tcp-baseline recv --listen ADDR [--into-memfd BYTES]` prints `listening on
//! ADDR`, reads until the stream ends and prints `received BYTES in SECONDS`;
//! with `--into-memfd` it also writes what it reads into a fresh memfd of that
//! size (the cost a destination pays to fill fresh guest RAM);
//! `tcp-baseline send --to ADDR --bytes N [--chunk BYTES]` writes N bytes in
//! chunks (default 1 MiB) and prints `sent BYTES in SECONDS`. With
//! `--streams S` on both sides, the bytes go over S connections at once,
//! a thread each.

use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A fresh file of `size` bytes in /dev/shm, unlinked at once: fresh
/// shared memory, like a memfd, without unsafe code.
fn memfd(size: u64) -> Result<std::fs::File> {
    let path = format!("/dev/shm/tcp-baseline-{}", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    file.set_len(size)?;
    Ok(file)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("recv") => {
            let listen = arg(&args, "--listen").context("--listen ADDR")?;
            let streams: usize = arg(&args, "--streams").map_or(Ok(1), |s| s.parse())?;
            let listener = TcpListener::bind(&listen)?;
            eprintln!("listening on {}", listener.local_addr()?);
            let (fresh, stripe) = match arg(&args, "--into-memfd") {
                Some(size) => {
                    let size: u64 = size.parse()?;
                    (Some(std::sync::Arc::new(memfd(size)?)), size.div_ceil(streams as u64))
                }
                None => (None, 0),
            };
            let accepted: Vec<TcpStream> = (0..streams)
                .map(|_| listener.accept().map(|(s, _)| s))
                .collect::<Result<_, _>>()?;
            let start = Instant::now();
            let readers: Vec<_> = accepted
                .into_iter()
                .enumerate()
                .map(|(i, mut stream)| {
                    let fresh = fresh.clone();
                    std::thread::spawn(move || -> Result<u64> {
                        let mut buf = vec![0u8; 1 << 20];
                        let mut total = 0u64;
                        // Each stream fills its own stripe of the memfd.
                        let base = i as u64 * stripe;
                        loop {
                            let n = stream.read(&mut buf)?;
                            if n == 0 {
                                return Ok(total);
                            }
                            if let Some(file) = &fresh {
                                use std::os::unix::fs::FileExt;
                                file.write_all_at(&buf[..n], base + total)?;
                            }
                            total += n as u64;
                        }
                    })
                })
                .collect();
            let mut total = 0;
            for reader in readers {
                total += reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
            }
            println!("received {total} in {:.6}", start.elapsed().as_secs_f64());
        }
        Some("send") => {
            let to = arg(&args, "--to").context("--to ADDR")?;
            let bytes: u64 = arg(&args, "--bytes").context("--bytes N")?.parse()?;
            let chunk: usize = arg(&args, "--chunk").map_or(Ok(1 << 20), |c| c.parse())?;
            let streams: u64 = arg(&args, "--streams").map_or(Ok(1), |s| s.parse())?;
            let connections: Vec<TcpStream> = (0..streams)
                .map(|_| {
                    let stream = TcpStream::connect(&to)?;
                    stream.set_nodelay(true)?;
                    Ok(stream)
                })
                .collect::<Result<_>>()?;
            let start = Instant::now();
            let writers: Vec<_> = connections
                .into_iter()
                .enumerate()
                .map(|(i, mut stream)| {
                    let share = bytes / streams + u64::from((i as u64) < bytes % streams);
                    std::thread::spawn(move || -> Result<()> {
                        let buf: Vec<u8> = (0..chunk).map(|i| (i * 131 % 251) as u8).collect();
                        let mut left = share;
                        while left > 0 {
                            let n = left.min(chunk as u64) as usize;
                            stream.write_all(&buf[..n])?;
                            left -= n as u64;
                        }
                        stream.shutdown(std::net::Shutdown::Write)?;
                        // Wait for the receiver to finish reading.
                        let mut sink = [0u8; 1];
                        let _ = stream.read(&mut sink);
                        Ok(())
                    })
                })
                .collect();
            for writer in writers {
                writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
            }
            println!("sent {bytes} in {:.6}", start.elapsed().as_secs_f64());
        }
        _ => bail!("usage: tcp-baseline recv --listen ADDR | send --to ADDR --bytes N [--chunk BYTES]"),
    }
    Ok(())
}
