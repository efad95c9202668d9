//! The verbs model the transport is written against: remote keys and
//! addresses, queue pairs that post one-sided writes, completion queues the
//! sender polls, and [`Writes`], which keeps every buffer handed to the NIC
//! borrowed until its completion came back.

use crate::faults::Faults;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why an RDMA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// The operating system reported an error.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A write the destination's NIC refused: no such key, outside the
    /// region, or access revoked.
    #[error("the NIC refused a write: {0}")]
    RemoteAccess(String),
    /// The queue pair is in error; nothing more goes through it.
    #[error("queue pair {qp} is in error: {reason}")]
    QpError {
        /// The queue pair.
        qp: u32,
        /// What put it in error.
        reason: String,
    },
    /// The NIC link dropped: writes in flight were lost.
    #[error("the NIC link dropped{0}")]
    LinkDown(String),
    /// A completion did not come within the timeout.
    #[error("no completion for {pending} write(s) within {timeout:?}")]
    TimedOut {
        /// Writes still without completion.
        pending: usize,
        /// The wait.
        timeout: Duration,
    },
    /// The peer sent a record or link message that does not decode.
    #[error("malformed RDMA message: {0}")]
    Wire(#[from] migration_wire::WireError),
    /// Mapping or touching memory failed.
    #[error("memory: {0}")]
    Memory(#[from] migration_sys::SysError),
    /// The two sides do not agree on how to set the NIC up.
    #[error("{0}")]
    Setup(String),
}

impl RdmaError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Where a one-sided write goes: a registered region (by its remote key)
/// and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr {
    /// The region's remote key.
    pub rkey: u32,
    /// Byte offset in the region.
    pub offset: u64,
}

/// How a work request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    /// The bytes are in the remote region.
    Success,
    /// The remote NIC refused the write (key, bounds or access).
    RemoteAccess,
    /// The queue pair was in error before the request ran.
    Flushed,
    /// The queue pair went into error on this request.
    QpError,
    /// The link dropped before the request completed.
    LinkDown,
}

/// A completion: which request, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The id the request was posted with.
    pub wr_id: u64,
    /// How it ended.
    pub status: WcStatus,
}

/// A completion queue: NICs push completions, the sender polls them.
/// Faults, if any, hold completions back for a few polls or shuffle them.
#[derive(Debug)]
pub struct CompletionQueue {
    state: Mutex<CqState>,
    arrived: Condvar,
    faults: Option<Arc<Faults>>,
}

#[derive(Debug, Default)]
struct CqState {
    ready: VecDeque<WorkCompletion>,
    /// Held back by a fault: polls left, and the completion.
    held: Vec<(u32, WorkCompletion)>,
}

impl CompletionQueue {
    /// An empty queue, with faults injected from `faults`.
    pub fn new(faults: Option<Arc<Faults>>) -> Self {
        Self {
            state: Mutex::new(CqState::default()),
            arrived: Condvar::new(),
            faults,
        }
    }

    /// Adds a completion (a NIC's side).
    pub fn push(&self, wc: WorkCompletion) {
        let hold = self.faults.as_ref().map_or(0, |f| f.hold());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if hold > 0 {
            state.held.push((hold, wc));
        } else {
            state.ready.push_back(wc);
        }
        drop(state);
        self.arrived.notify_all();
    }

    /// Moves the completions there are into `out` (appending), waiting up
    /// to `timeout` for the first when there are none. Completions held
    /// back come due one poll at a time; while any is held, a poll does not
    /// wait. Returns how many it moved.
    pub fn poll(&self, out: &mut Vec<WorkCompletion>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut due = Vec::new();
            state.held.retain_mut(|(polls, wc)| {
                *polls -= 1;
                if *polls == 0 {
                    due.push(*wc);
                }
                *polls > 0
            });
            state.ready.extend(due);
            if !state.ready.is_empty() || !state.held.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return 0;
            }
            state = self
                .arrived
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let from = out.len();
        out.extend(state.ready.drain(..));
        if let Some(faults) = &self.faults {
            faults.maybe_shuffle(&mut out[from..]);
        }
        out.len() - from
    }
}

/// A queue pair: one-sided writes into the peer's registered memory, their
/// completions in [`QueuePair::completions`].
///
/// Post through [`Writes`], which keeps each buffer borrowed until its
/// completion: a NIC may read a posted buffer until then (a real one does,
/// by DMA; the simulated ones have consumed it when `post_write` returns).
pub trait QueuePair: Send + std::fmt::Debug {
    /// This queue pair's number on the destination.
    fn number(&self) -> u32;

    /// Posts a write of `local` to `remote`. An `Err` means the request was
    /// not posted (the queue pair is in error); otherwise exactly one
    /// completion with `wr_id` follows. The caller keeps `local` untouched
    /// until then ([`Writes`] does).
    fn post_write(&mut self, wr_id: u64, local: &[u8], remote: RemoteAddr) -> Result<(), RdmaError>;

    /// The completion queue of this queue pair's writes.
    fn completions(&self) -> &CompletionQueue;

    /// Puts the queue pair in error and drops its link, as a pulled cable
    /// does: requests in flight complete with [`WcStatus::LinkDown`].
    fn drop_link(&mut self);

    /// Bytes written one-sided so far (posted and completed successfully).
    fn bytes_written(&self) -> u64;
}

/// Writes posted on a queue pair whose buffers (`'buf`) stay borrowed until
/// every completion came back: [`Writes::complete`] waits for them, and so
/// does dropping the value (bounded; a queue pair whose completions do not
/// come has its link dropped, and its flushed completions are awaited).
/// Forgetting the value (`mem::forget`) would end the borrow early: fine
/// for the simulated NICs, which consume a buffer when it is posted, not
/// for a DMA backend.
#[derive(Debug)]
pub struct Writes<'q, 'buf> {
    qp: &'q mut dyn QueuePair,
    next_id: u64,
    pending: Vec<u64>,
    failure: Option<RdmaError>,
    _buffers: PhantomData<&'buf [u8]>,
}

/// How long dropping an unfinished [`Writes`] waits for its completions.
const DROP_WAIT: Duration = Duration::from_secs(5);

impl<'q, 'buf> Writes<'q, 'buf> {
    /// Starts posting on `qp`; work request ids count from `first_id`.
    pub fn new(qp: &'q mut dyn QueuePair, first_id: u64) -> Self {
        Self {
            qp,
            next_id: first_id,
            pending: Vec::new(),
            failure: None,
            _buffers: PhantomData,
        }
    }

    /// Posts a write of `local` to `remote`; `local` stays borrowed until
    /// the completion.
    pub fn post(&mut self, local: &'buf [u8], remote: RemoteAddr) -> Result<(), RdmaError> {
        let id = self.next_id;
        self.next_id += 1;
        self.qp.post_write(id, local, remote)?;
        self.pending.push(id);
        Ok(())
    }

    /// Waits (each wait at most `timeout` without a completion) until every
    /// posted write completed; the first failure wins.
    pub fn complete(mut self, timeout: Duration) -> Result<u64, RdmaError> {
        self.wait(timeout)?;
        Ok(self.next_id)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), RdmaError> {
        let mut done = Vec::new();
        let mut quiet_since = Instant::now();
        while !self.pending.is_empty() {
            done.clear();
            if self.qp.completions().poll(&mut done, timeout) == 0 {
                if quiet_since.elapsed() >= timeout {
                    let pending = self.pending.len();
                    self.flush();
                    return Err(RdmaError::TimedOut { pending, timeout });
                }
                continue;
            }
            quiet_since = Instant::now();
            for wc in &done {
                let Some(at) = self.pending.iter().position(|&id| id == wc.wr_id) else {
                    continue;
                };
                self.pending.swap_remove(at);
                if wc.status != WcStatus::Success && self.failure.is_none() {
                    let qp = self.qp.number();
                    self.failure = Some(match wc.status {
                        WcStatus::RemoteAccess => RdmaError::RemoteAccess(format!(
                            "work request {} on queue pair {qp}: no such key, outside the region, or access revoked",
                            wc.wr_id
                        )),
                        WcStatus::LinkDown => RdmaError::LinkDown(format!(" under work request {}", wc.wr_id)),
                        status => RdmaError::QpError {
                            qp,
                            reason: format!("work request {} completed {status:?}", wc.wr_id),
                        },
                    });
                }
            }
        }
        self.failure.take().map_or(Ok(()), Err)
    }
}

impl Writes<'_, '_> {
    /// Drops the queue pair's link, which makes its NIC complete every
    /// write still in flight (flushed), and waits for those completions:
    /// only then is no buffer the NIC's any more. A NIC that does not
    /// flush within [`DROP_WAIT`] is broken; its writes are given up then
    /// (the simulated NICs consumed every buffer when it was posted).
    fn flush(&mut self) {
        self.qp.drop_link();
        let deadline = Instant::now() + DROP_WAIT;
        let mut done = Vec::new();
        while !self.pending.is_empty() && Instant::now() < deadline {
            done.clear();
            self.qp.completions().poll(&mut done, Duration::from_millis(50));
            self.pending.retain(|id| !done.iter().any(|wc| wc.wr_id == *id));
        }
        self.pending.clear();
    }
}

impl Drop for Writes<'_, '_> {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let _ = self.wait(DROP_WAIT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultPlan;

    /// A queue pair whose NIC completes every write at once, refusing
    /// writes to key 0.
    #[derive(Debug)]
    struct Loopback {
        cq: CompletionQueue,
        seen: Vec<Vec<u8>>,
    }

    impl QueuePair for Loopback {
        fn number(&self) -> u32 {
            7
        }
        fn post_write(&mut self, wr_id: u64, local: &[u8], remote: RemoteAddr) -> Result<(), RdmaError> {
            self.seen.push(local.to_vec());
            let status = if remote.rkey == 0 {
                WcStatus::RemoteAccess
            } else {
                WcStatus::Success
            };
            self.cq.push(WorkCompletion { wr_id, status });
            Ok(())
        }
        fn completions(&self) -> &CompletionQueue {
            &self.cq
        }
        fn drop_link(&mut self) {}
        fn bytes_written(&self) -> u64 {
            0
        }
    }

    #[test]
    fn writes_complete_through_delays_and_reordering_and_a_refusal_is_reported() {
        let faults = Arc::new(Faults::new(FaultPlan {
            seed: 9,
            delay: 0.5,
            reorder: 0.5,
            ..FaultPlan::default()
        }));
        let mut qp = Loopback {
            cq: CompletionQueue::new(Some(Arc::clone(&faults))),
            seen: Vec::new(),
        };
        let buffers: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 16]).collect();
        let mut writes = Writes::new(&mut qp, 100);
        for buf in &buffers {
            writes.post(buf, RemoteAddr { rkey: 1, offset: 0 }).expect("post");
        }
        assert_eq!(writes.complete(Duration::from_secs(5)).expect("all complete"), 140);
        let counts = faults.counts();
        assert!(counts.delayed > 0 && counts.reordered > 0, "{counts:?}");
        assert_eq!(qp.seen, buffers);

        let mut writes = Writes::new(&mut qp, 0);
        writes
            .post(&buffers[0], RemoteAddr { rkey: 1, offset: 0 })
            .expect("post");
        writes
            .post(&buffers[1], RemoteAddr { rkey: 0, offset: 0 })
            .expect("post");
        let err = writes.complete(Duration::from_secs(5)).expect_err("refused");
        assert!(matches!(err, RdmaError::RemoteAccess(_)), "{err}");
    }

    #[test]
    fn a_completion_that_never_comes_times_out_and_the_flushed_writes_are_awaited() {
        /// A NIC that completes nothing until its link drops, then flushes
        /// every write in flight.
        #[derive(Debug)]
        struct Silent(CompletionQueue, Vec<u64>, bool);
        impl QueuePair for Silent {
            fn number(&self) -> u32 {
                1
            }
            fn post_write(&mut self, wr_id: u64, _: &[u8], _: RemoteAddr) -> Result<(), RdmaError> {
                self.1.push(wr_id);
                Ok(())
            }
            fn completions(&self) -> &CompletionQueue {
                &self.0
            }
            fn drop_link(&mut self) {
                self.2 = true;
                for wr_id in self.1.drain(..) {
                    self.0.push(WorkCompletion {
                        wr_id,
                        status: WcStatus::Flushed,
                    });
                }
            }
            fn bytes_written(&self) -> u64 {
                0
            }
        }
        let mut qp = Silent(CompletionQueue::new(None), Vec::new(), false);
        let mut writes = Writes::new(&mut qp, 0);
        writes.post(b"x", RemoteAddr { rkey: 1, offset: 0 }).expect("post");
        writes.post(b"y", RemoteAddr { rkey: 1, offset: 1 }).expect("post");
        let err = writes.complete(Duration::from_millis(20)).expect_err("times out");
        assert!(matches!(err, RdmaError::TimedOut { pending: 2, .. }), "{err}");
        assert!(qp.2, "the link was dropped so the NIC lets go of the buffers");
        let mut left = Vec::new();
        assert_eq!(
            qp.0.poll(&mut left, Duration::ZERO),
            0,
            "every flushed completion was taken"
        );
    }
}
