//! Raw single-stream TCP between two processes: the baseline migration
//! throughput is quoted against.
//!
//! `tcp-baseline recv --listen ADDR [--into-memfd BYTES]` prints `listening on
//! ADDR`, reads until the stream ends and prints `received BYTES in SECONDS`;
//! with `--into-memfd` it also writes what it reads into a fresh memfd of that
//! size (the cost a destination pays to fill fresh guest RAM);
//! `tcp-baseline send --to ADDR --bytes N [--chunk BYTES]` writes N bytes in
//! chunks (default 1 MiB) and prints `sent BYTES in SECONDS`.

use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A fresh memfd of `size` bytes, through /proc so no unsafe is needed.
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
            let listener = TcpListener::bind(&listen)?;
            eprintln!("listening on {}", listener.local_addr()?);
            let fresh = match arg(&args, "--into-memfd") {
                Some(size) => {
                    let file = memfd(size.parse()?)?;
                    Some(file)
                }
                None => None,
            };
            let (mut stream, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            let mut start = None;
            loop {
                let n = stream.read(&mut buf)?;
                start.get_or_insert_with(Instant::now);
                if n == 0 {
                    break;
                }
                if let Some(file) = &fresh {
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&buf[..n], total)?;
                }
                total += n as u64;
            }
            let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
            println!("received {total} in {secs:.6}");
        }
        Some("send") => {
            let to = arg(&args, "--to").context("--to ADDR")?;
            let bytes: u64 = arg(&args, "--bytes").context("--bytes N")?.parse()?;
            let chunk: usize = arg(&args, "--chunk").map_or(Ok(1 << 20), |c| c.parse())?;
            let mut stream = TcpStream::connect(&to)?;
            stream.set_nodelay(true)?;
            let buf: Vec<u8> = (0..chunk).map(|i| (i * 131 % 251) as u8).collect();
            let start = Instant::now();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk as u64) as usize;
                stream.write_all(&buf[..n])?;
                left -= n as u64;
            }
            stream.shutdown(std::net::Shutdown::Write)?;
            // Wait for the receiver to finish reading.
            let mut sink = [0u8; 1];
            let _ = stream.read(&mut sink);
            println!("sent {bytes} in {:.6}", start.elapsed().as_secs_f64());
        }
        _ => bail!("usage: tcp-baseline recv --listen ADDR | send --to ADDR --bytes N [--chunk BYTES]"),
    }
    Ok(())
}
