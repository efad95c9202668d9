//! `migrate-cli demo`: a receiver and a sender process on loopback.

use crate::exit;
use crate::units::{human_bytes, parse_size};
use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Guest RAM size.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub mem_size: u64,
    /// Bytes of page writes per second the guest makes while it migrates.
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    pub dirty_rate: u64,
    /// Which guest migrates: the synthetic guest or a KVM micro-VM (needs /dev/kvm).
    #[arg(long = "guest", value_enum, default_value = "synthetic")]
    pub kind: crate::guest::GuestKind,
    /// How pages travel: tcp, or rdma-sim (the simulated RDMA transport; on
    /// one host it picks the memfd NIC).
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: crate::rdma::Transport,
}

pub fn run(args: DemoArgs) -> u8 {
    match demo(&args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("demo: error: {}", crate::chain(&err));
            exit::FAILED
        }
    }
}

/// A child process killed and reaped on drop, unless taken back.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn demo(args: &DemoArgs) -> Result<u8> {
    let exe = std::env::current_exe().context("finding the migrate-cli binary")?;
    let mut recv = Reaped(Some(
        Command::new(&exe)
            .args(["recv", "--listen", "127.0.0.1:0", "--quiet", "--json"])
            .args(["--transport", transport_name(args.transport)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the receiver process")?,
    ));
    let stderr = recv.0.as_mut().and_then(|c| c.stderr.take()).expect("piped");
    let (lines, incoming) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let addr = loop {
        let line = incoming
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("the receiver did not start listening"))?;
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.to_string();
        }
        eprintln!("{line}");
    };
    eprintln!(
        "demo: receiver listening on {addr}; sending a {} {} guest that writes {}/s",
        human_bytes(args.mem_size as f64),
        match args.kind {
            crate::guest::GuestKind::Synthetic => "synthetic",
            crate::guest::GuestKind::Kvm => "KVM",
        },
        human_bytes(args.dirty_rate as f64)
    );
    std::thread::spawn(move || {
        for line in incoming {
            eprintln!("{line}");
        }
    });
    let send = Command::new(&exe)
        .args(["send", "--to", &addr, "--json"])
        .args(["--transport", transport_name(args.transport)])
        .args(["--mem-size", &args.mem_size.to_string()])
        .args(["--dirty-rate", &args.dirty_rate.to_string()])
        .args([
            "--guest",
            args.kind.to_possible_value().expect("no skipped variant").get_name(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the sender process")?
        .wait_with_output()
        .context("waiting for the sender")?;
    let sent: Value = parse(&send.stdout).context("reading the sender's report")?;
    if sent["status"] != "completed" {
        // The receiver may still wait for a connection: `recv` is killed on drop.
        bail!(
            "migration failed: {}",
            sent["error"].as_str().unwrap_or("unknown error")
        );
    }
    let recv_out = recv.0.take().expect("the receiver runs").wait_with_output()?;
    let received: Value = parse(&recv_out.stdout).context("reading the receiver's report")?;
    let num = |v: &Value, k: &str| v[k].as_f64();
    if sent["status"] != "completed" {
        bail!(
            "migration failed: {}",
            sent["error"].as_str().unwrap_or("unknown error")
        );
    }
    let over = match sent["rdma"]["nic"].as_str() {
        Some(nic) => format!("the simulated RDMA transport ({nic} NIC)"),
        None => "loopback".to_owned(),
    };
    println!(
        "demo: moved a {} guest live over {over} in {:.0} ms ({}/s of guest RAM, {}/s on the wire), {} passes",
        human_bytes(num(&sent, "ram_bytes").unwrap_or(0.0)),
        num(&sent, "total_ms").unwrap_or(0.0),
        human_bytes(num(&sent, "ram_bytes_per_sec").unwrap_or(0.0)),
        human_bytes(num(&sent, "throughput_bytes_per_sec").unwrap_or(0.0)),
        num(&sent, "iterations").unwrap_or(0.0),
    );
    println!(
        "demo: downtime {:.1} ms (expected {:.1} ms, limit 300 ms); digests {}; guest self-check {}",
        num(&sent, "downtime_ms").unwrap_or(f64::NAN),
        num(&sent, "expected_downtime_ms").unwrap_or(f64::NAN),
        if sent["verified"] == true && received["verified"] == true {
            "verified on both sides"
        } else {
            "NOT verified"
        },
        received["guest_check"].as_str().unwrap_or("unknown"),
    );
    let send_code = send.status.code().unwrap_or(1) as u8;
    let recv_code = recv_out.status.code().unwrap_or(1) as u8;
    Ok(send_code.max(recv_code))
}

fn transport_name(transport: crate::rdma::Transport) -> &'static str {
    match transport {
        crate::rdma::Transport::Tcp => "tcp",
        crate::rdma::Transport::RdmaSim => "rdma-sim",
    }
}

fn parse(stdout: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow!("no JSON report"))?;
    Ok(serde_json::from_str(line)?)
}
