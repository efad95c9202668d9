//! `--transport rdma-sim`: the flags of the simulated RDMA transport and
//! what it reports.

use anyhow::{Result, bail};
use clap::ValueEnum;
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use transport_rdma_sim::{DestStats, NicKind, SourceStats};

/// How pages travel between `send` and `recv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// Messages on the TCP connections.
    Tcp,
    /// A simulated RDMA transport (no RDMA hardware is used): pages go as
    /// one-sided writes into the destination's registered memory.
    RdmaSim,
}

/// Which simulated NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NicChoice {
    /// The destination offers memfd to a source on its own host when the
    /// migration has no postcopy and guest RAM is a memfd or a file, tcp
    /// otherwise; the source takes either.
    Auto,
    /// Same host: guest RAM shared as a memfd over a unix socket (a
    /// `--prealloc` is then made a memfd).
    Memfd,
    /// A NIC thread on each side of a TCP link of its own.
    Tcp,
}

impl NicChoice {
    /// The NIC asked for, if one.
    pub fn kind(self) -> Option<NicKind> {
        match self {
            NicChoice::Auto => None,
            NicChoice::Memfd => Some(NicKind::Memfd),
            NicChoice::Tcp => Some(NicKind::Tcp),
        }
    }
}

/// The transport flags `send` and `recv` share.
#[derive(Debug, clap::Args)]
pub struct TransportArgs {
    /// How pages travel: tcp, or rdma-sim, a SIMULATION of an RDMA transport
    /// (no RDMA hardware is used): each channel's page batches go as
    /// one-sided writes into the destination's registered guest RAM through
    /// a simulated NIC (see --rdma-nic), and the connection to --to/--listen
    /// carries the control exchange (registered regions, notices of placed
    /// batches, sync markers). Both sides must use it. See docs/rdma-sim.md.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// The simulated NIC of --transport rdma-sim: memfd (same host: the
    /// destination's guest RAM is shared as a memfd over a unix socket, so
    /// writes land with no copy on the destination; no postcopy), tcp (a
    /// NIC thread on each side of its own TCP link writes straight into
    /// registered memory), or auto (the destination offers memfd to a
    /// source on its host when there is no postcopy and its guest RAM is a
    /// memfd or a file, tcp otherwise).
    #[arg(long, value_enum, default_value = "auto")]
    pub rdma_nic: NicChoice,
}

impl TransportArgs {
    /// Whether the simulated RDMA transport is in use.
    pub fn rdma(&self) -> bool {
        self.transport == Transport::RdmaSim
    }
}

/// The destination's choice of NIC for a source at `peer` reached on
/// `local`, with or without postcopy, for guest RAM that is or is not
/// `shareable` by file descriptor (a memfd or a file).
pub fn choose_nic(
    choice: NicChoice,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    postcopy: bool,
    shareable: bool,
) -> Result<NicKind> {
    let same_host = match (peer, local) {
        (Some(peer), Some(local)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
        _ => false,
    };
    match choice {
        NicChoice::Memfd if postcopy => bail!(
            "the memfd NIC writes into memory the guest would run on in postcopy; \
             use --rdma-nic tcp (or auto) for a migration that may switch to postcopy"
        ),
        NicChoice::Memfd if !same_host => bail!(
            "the memfd NIC shares memory on one host, and the source connected from {}",
            peer.map_or_else(|| "an unknown address".to_owned(), |p| p.to_string())
        ),
        NicChoice::Memfd => Ok(NicKind::Memfd),
        NicChoice::Tcp => Ok(NicKind::Tcp),
        NicChoice::Auto if same_host && !postcopy && shareable => Ok(NicKind::Memfd),
        NicChoice::Auto => Ok(NicKind::Tcp),
    }
}

/// Where the TCP NIC listens: the address the source reached this side on.
pub fn nic_ip(local: Option<SocketAddr>) -> IpAddr {
    local.map_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), |l| l.ip())
}

/// What `--json` reports of the simulated RDMA transport.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RdmaReport {
    /// "memfd" or "tcp" (`null` until the destination chose).
    pub nic: Option<&'static str>,
    /// Source: bytes of pages written one-sided, the writes and the batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_sided_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batches: Option<u64>,
    /// Source, memfd NIC: connecting to it and receiving its region files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<f64>,
    /// Source: faults injected by --rdma-faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultsReport>,
    /// Destination: guest RAM registered (pinned), and how long it took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registered_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub register_ms: Option<f64>,
    /// Destination: bytes of pages that arrived one-sided, checked where
    /// they landed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placed_bytes: Option<u64>,
    /// Destination, TCP NIC: bytes its NIC threads wrote, and writes refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nic_bytes_written: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_writes: Option<u64>,
}

/// Faults that fired.
#[derive(Debug, Clone, Serialize)]
pub struct FaultsReport {
    pub delayed_completions: u64,
    pub reordered_polls: u64,
    pub qp_errors: u64,
    pub link_drops: u64,
}

impl RdmaReport {
    pub fn source(stats: &SourceStats) -> Self {
        Self {
            nic: stats.nic.map(NicKind::name),
            one_sided_bytes: Some(stats.bytes_written),
            writes: Some(stats.writes),
            batches: Some(stats.batches),
            connect_ms: (stats.nic == Some(NicKind::Memfd)).then_some(stats.connect_time.as_secs_f64() * 1e3),
            faults: stats.faults.map(|faults| FaultsReport {
                delayed_completions: faults.delayed,
                reordered_polls: faults.reordered,
                qp_errors: faults.qp_errors,
                link_drops: faults.link_drops,
            }),
            ..Self::default()
        }
    }

    pub fn destination(kind: NicKind, stats: &DestStats) -> Self {
        Self {
            nic: Some(kind.name()),
            registered_bytes: Some(stats.registered_bytes),
            register_ms: Some(stats.register_time.as_secs_f64() * 1e3),
            placed_bytes: Some(stats.placed_bytes),
            nic_bytes_written: (kind == NicKind::Tcp).then_some(stats.nic_bytes_written),
            refused_writes: (kind == NicKind::Tcp).then_some(stats.refused_writes),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_memfd_on_one_host_without_postcopy_for_shareable_ram_and_memfd_refuses_the_rest() {
        let here: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let lan: SocketAddr = "10.0.0.2:4000".parse().expect("addr");
        let other: SocketAddr = "10.0.0.9:5000".parse().expect("addr");
        let pick = |choice, peer, postcopy| choose_nic(choice, Some(peer), Some(lan), postcopy, true);
        assert_eq!(pick(NicChoice::Auto, here, false).expect("auto"), NicKind::Memfd);
        assert_eq!(
            choose_nic(NicChoice::Auto, Some(lan), Some(lan), false, true).expect("auto"),
            NicKind::Memfd
        );
        let private = choose_nic(NicChoice::Auto, Some(here), Some(lan), false, false).expect("auto");
        assert_eq!(private, NicKind::Tcp, "private guest RAM cannot be shared");
        assert_eq!(pick(NicChoice::Auto, other, false).expect("auto"), NicKind::Tcp);
        assert_eq!(pick(NicChoice::Auto, here, true).expect("auto"), NicKind::Tcp);
        assert!(pick(NicChoice::Memfd, here, true).is_err());
        assert!(pick(NicChoice::Memfd, other, false).is_err());
        assert_eq!(pick(NicChoice::Tcp, here, true).expect("tcp"), NicKind::Tcp);
    }
}
