//! A **simulated** RDMA transport: the shape of a verbs transport, with the
//! NIC simulated in software, because this machine has no RDMA hardware.
//!
//! # What it models
//!
//! Datacenter migrations use RDMA so that page data lands in the
//! destination's memory without the destination's CPU copying it. This
//! crate keeps that model:
//!
//! - **Memory registration.** The destination registers every RAM block
//!   ([`DestNic::register`]) and gives it an unguessable remote key; a
//!   region is its key and its bounds. Registration pins every page up
//!   front (as `ibv_reg_mr` does, QEMU's `rdma-pin-all`) or lets writes
//!   allocate pages as they reach them (as an on-demand paging
//!   registration does).
//! - **A control exchange in band.** On the migration's own TCP connection
//!   (`--listen`/`--to`), each destination channel announces its queue pair,
//!   the NIC's link address, a secret token and the region table before its
//!   first message ([`migration_wire::rdma::RdmaRecord::Regions`]); the
//!   engine's sync markers close each epoch on the same connection.
//! - **Queue pairs and one-sided writes.** Each source channel has a queue
//!   pair ([`QueuePair`]); a page batch sent as it is becomes one write per
//!   run of consecutive pages into the remote region, at the page's offset.
//!   Completions arrive in a [`CompletionQueue`] the sender polls. A buffer
//!   handed to the NIC stays borrowed and untouched until its completion:
//!   [`Writes`] holds the borrow until every completion came back. Only then
//!   does the source send a notice with the batch's head and checksum; the
//!   destination hashes the pages where they landed (no copy) and checks it.
//! - **The end of one-sided access.** At a channel's end of precopy
//!   (`EndOfRam`, or the switch to postcopy) its queue pair's access is
//!   revoked (the TCP NIC shuts its links down) and no new queue pair is
//!   announced; postcopy's urgent-page channel never gets one. Once the
//!   guest may run on the destination, pages are placed whole by the
//!   receiver (postcopy's atomic placement), never written under it.
//!
//! # The two simulated NICs
//!
//! - **memfd** (same host): the destination's guest RAM is a memfd (or a
//!   file); its NIC passes the descriptors over a unix socket in a private
//!   directory to a source that presents the token. A posted write is a
//!   bounds-checked `pwrite` into the region's file, whose pages the
//!   destination maps: the bytes land in the destination's memory with no
//!   receive-side copy. The copy is done by the posting thread, where a real
//!   NIC's DMA engine would spend no CPU. A descriptor cannot be taken
//!   back: the NIC grants none once precopy ended, the source's NIC checks
//!   its writes against the registration and stops at the end of precopy,
//!   and this NIC is for one host under one operator (the same trust as
//!   vhost-user's shared memory).
//! - **tcp**: a NIC thread per queue pair on the destination reads write
//!   requests from its own TCP link, checks key, bounds and access, reads
//!   the bytes straight into the registered region (one copy, by the
//!   kernel, outside the migration receiver's logic) and acknowledges; a
//!   completion thread on the source turns acknowledgements into
//!   completions. A refused write puts the queue pair in error.
//!
//! Both inject faults on demand from a seeded random source ([`FaultPlan`]):
//! a queue-pair error, delayed or reordered completions, a dropped link.
//!
//! # How a real verbs backend would slot in
//!
//! Implement [`QueuePair`] over `ibverbs`: `post_write` is
//! `ibv_post_send` with `IBV_WR_RDMA_WRITE` (the local buffer registered
//! once per channel thread), `completions` wraps `ibv_poll_cq`, `drop_link`
//! moves the QP to `IBV_QPS_ERR`. [`DestNic::register`] becomes
//! `ibv_reg_mr` per block, and the region table carries the real `rkey`s
//! and the QP's connection data (what RDMA CM's private data would). The
//! channels, the notices and the tests stay as they are.
//!
//! TLS is not offered: RDMA traffic is not encrypted either.

mod channel;
mod dest;
mod faults;
mod source;
mod verbs;

pub use channel::{DestChannel, DestNicSlot, DestRx, DestTx, SourceChannel, SourceRx, SourceTx};
pub use dest::{DestNic, DestStats};
pub use faults::{FaultCounts, FaultPlan, FaultPlanError, Faults};
pub use migration_wire::rdma::NicKind;
pub use source::{SourceNic, SourceStats};
pub use verbs::{CompletionQueue, QueuePair, RdmaError, RemoteAddr, WcStatus, WorkCompletion, Writes};

use std::io::Read;

/// Eight random bytes from the kernel, for tokens and keys.
fn random_u64() -> Result<u64, RdmaError> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| RdmaError::io("reading /dev/urandom", e))?;
    Ok(u64::from_le_bytes(bytes))
}
