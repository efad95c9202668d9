//! What a file channel "receives": the answers it gives itself, queued as
//! encoded frames until the runtime reads them.

use migration_core::TransportError;
use migration_wire::Message;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub(crate) struct Replies {
    state: Mutex<(VecDeque<Vec<u8>>, bool)>,
    ready: Condvar,
}

impl Replies {
    /// Queues `message` for the next receive.
    pub(crate) fn push(&self, message: &Message<'_>) {
        let mut frame = Vec::new();
        message.encode(&mut frame);
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0.push_back(frame);
        self.ready.notify_all();
    }

    /// Ends the stream: a receive with nothing queued reports it closed.
    pub(crate) fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.ready.notify_all();
    }

    /// The next queued frame, waiting at most `timeout` (`None`: forever).
    pub(crate) fn pop(&self, timeout: Option<Duration>) -> Result<Vec<u8>, TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(frame) = state.0.pop_front() {
                return Ok(frame);
            }
            if state.1 {
                return Err(TransportError::Closed);
            }
            state = match deadline {
                None => self.ready.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(TransportError::TimedOut(timeout.unwrap_or_default()));
                    }
                    self.ready
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// Decodes a frame this crate encoded itself.
pub(crate) fn decode(frame: &[u8]) -> Result<Message<'_>, TransportError> {
    Ok(migration_wire::frame::decode_frame(frame)?.0)
}

/// The receiving half of a file channel: the answers it queued itself.
#[derive(Debug)]
pub(crate) struct ReplyRx {
    replies: std::sync::Arc<Replies>,
    current: Vec<u8>,
    timeout: Option<Duration>,
    received: u64,
}

impl ReplyRx {
    pub(crate) fn new(replies: std::sync::Arc<Replies>) -> Self {
        Self {
            replies,
            current: Vec::new(),
            timeout: None,
            received: 0,
        }
    }
}

impl migration_core::ChannelRx for ReplyRx {
    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        self.current = self.replies.pop(self.timeout)?;
        self.received += self.current.len() as u64;
        decode(&self.current)
    }

    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.current, replacement)
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        self.timeout = timeout;
        Ok(())
    }

    fn bytes_received(&self) -> u64 {
        self.received
    }
}
