//! `migrate-cli`: live-migrate a VM's memory between processes and hosts.

mod demo;
mod dirty_rate;
mod guest;
mod memory;
mod rdma;
mod recv;
mod report;
mod send;
mod snapshot;
mod tls;
mod units;

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

/// Exit codes scripts rely on.
pub mod exit {
    /// The migration completed (and was verified).
    pub const OK: u8 = 0;
    /// The migration failed safely: the source runs, the destination discarded.
    pub const FAILED: u8 = 1;
    /// The command line was wrong.
    pub const USAGE: u8 = 2;
    /// The guest was handed over, but the destination's RAM does not match
    /// the source's, or the comparison could not be made.
    pub const MISMATCH: u8 = 3;
    /// The source guest is not running and the handover is not confirmed
    /// (GO was sent but the destination never said it runs, or the guest
    /// failed to resume): an operator must decide.
    pub const OPERATOR: u8 = 4;
    /// Postcopy failed after the guest ran on the destination (the link was
    /// not resumed in time, or the other side died): neither side holds the
    /// whole VM any more.
    pub const LOST: u8 = 5;
}

#[derive(Debug, Parser)]
#[command(
    name = "migrate-cli",
    version,
    about = "Live-migrate a VM's memory between processes and hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a running guest to a destination (the source side).
    Send(send::SendArgs),
    /// Receive one migration (the destination side).
    Recv(recv::RecvArgs),
    /// Run a receiver and a sender on loopback with a synthetic (or KVM) guest.
    Demo(demo::DemoArgs),
    /// Save a running guest to a snapshot file (live: pages dirtied meanwhile are rewritten in place).
    Save(snapshot::SaveArgs),
    /// Restore a guest from a snapshot file and run it.
    Restore(snapshot::RestoreArgs),
    /// Describe a snapshot file: format, blocks, pages stored, digests, complete or not.
    Inspect(snapshot::InspectArgs),
    /// Write a throwaway CA, server and client certificates for TLS tests and first tries.
    GenCerts(tls::GenCertsArgs),
    /// Measure how fast a running guest dirties its memory (pages per second, hot set).
    DirtyRate(dirty_rate::DirtyRateArgs),
}

fn main() -> ExitCode {
    // A write past a file size limit is an error to report, not a reason to die.
    migration_sys::ignore_file_size_signal();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    if let Some((name, problem)) = cli.command.problem() {
        let mut command = Cli::command();
        command.build();
        let kind = clap::error::ErrorKind::ArgumentConflict;
        let err = match command.find_subcommand_mut(name) {
            Some(sub) => sub.error(kind, problem),
            None => command.error(kind, problem),
        };
        let _ = err.print();
        return ExitCode::from(exit::USAGE);
    }
    let code = match cli.command {
        Command::Send(args) => send::run(args),
        Command::Recv(args) => recv::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Save(args) => snapshot::save(args),
        Command::Restore(args) => snapshot::restore(args),
        Command::Inspect(args) => snapshot::inspect(args),
        Command::GenCerts(args) => tls::gen_certs(args),
        Command::DirtyRate(args) => dirty_rate::run(args),
    };
    ExitCode::from(code)
}

impl Command {
    /// What is wrong with flags that clap checks one by one: the
    /// subcommand's name and the problem.
    fn problem(&self) -> Option<(&'static str, String)> {
        match self {
            Command::Send(args) => Some(("send", args.problem()?)),
            Command::Recv(args) => Some(("recv", args.problem()?)),
            Command::Save(args) => Some(("save", args.source.throttle.problem()?)),
            _ => None,
        }
    }
}

/// Prints an error chain on one line, the way every command reports it.
pub fn chain(err: &anyhow::Error) -> String {
    format!("{err:#}")
}
