//! The channel boundary: what a transport must offer the runtime.
//!
//! A [`Channel`] carries whole messages, page batches and control frames,
//! not raw bytes: a stream transport encodes each message as a frame, a
//! file transport would write a batch at its fixed offset, an RDMA
//! transport would write it into the peer's registered memory. The runtime
//! only ever sees `Box<dyn Channel>`.

use migration_sys::{GuestRegion, SysError};
use migration_wire::{Message, PageBatch, WireError};
use std::sync::Arc;
use std::time::Duration;

/// Why a channel failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The operating system reported an error.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("connection closed by the peer")]
    Closed,
    /// Nothing arrived within the timeout.
    #[error("timed out: peer silent for {0:?}")]
    TimedOut(Duration),
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame from the peer")]
    Malformed(#[from] WireError),
}

impl TransportError {
    /// An operating-system error met while doing `context`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TransportError::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the error is the link breaking under the channel (closed,
    /// reset, silent), which the peer may explain better, rather than a
    /// failure of this side's own.
    pub fn is_broken_link(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            TransportError::Closed | TransportError::TimedOut(_) => true,
            TransportError::Io { source, .. } => matches!(
                source.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected | TimedOut | WouldBlock
            ),
            TransportError::Malformed(_) => false,
        }
    }

    /// Bad data (a peer's or a file's), described by `what`, met while
    /// doing `context`.
    pub fn invalid_data(context: impl Into<String>, what: impl Into<String>) -> Self {
        Self::io(
            context,
            std::io::Error::new(std::io::ErrorKind::InvalidData, what.into()),
        )
    }
}

/// The sending half of a channel.
pub trait ChannelTx: Send {
    /// Sends one message. A [`Message::Pages`] batch's payload may be large;
    /// the transport writes it without another copy where it can.
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError>;

    /// Wire bytes sent so far on this half.
    fn bytes_sent(&self) -> u64;

    /// Closes the sending direction; the peer sees end of stream.
    fn shutdown(&mut self);

    /// This half carries few, small messages someone waits on (postcopy's
    /// page requests and requested pages): a transport may trade throughput
    /// for latency from now on. The default changes nothing.
    fn prefer_latency(&mut self) {}
}

/// A stretch of guest memory that consecutive page bytes of a batch go to.
#[derive(Debug, Clone, Copy)]
pub struct GuestRun<'a> {
    /// The memory.
    pub region: &'a GuestRegion,
    /// Byte offset in `region`.
    pub offset: usize,
    /// Length in bytes, whole pages.
    pub len: usize,
}

impl GuestRun<'_> {
    /// Hashes the pages of `page_size` bytes already placed in the run from
    /// byte `from` (of the run) on, each whole page ending at or before
    /// byte `to`, reading each back through `scratch` and appending its
    /// [`page_hash`](migration_wire::page::page_hash) to `hashes`. Returns
    /// where the pages hashed end: `from` plus whole pages, the start of
    /// the page to hash next.
    pub fn hash_pages(
        &self,
        from: usize,
        to: usize,
        page_size: usize,
        scratch: &mut Vec<u8>,
        hashes: &mut Vec<u64>,
    ) -> Result<usize, SysError> {
        assert_ne!(page_size, 0, "pages of no bytes");
        scratch.resize(page_size, 0);
        let mut at = from;
        while at + page_size <= to {
            self.region.read(self.offset + at, scratch)?;
            hashes.push(migration_wire::page::page_hash(scratch));
            at += page_size;
        }
        Ok(at)
    }
}

/// Where the plain pages of incoming batches belong in guest memory, for a
/// receiving transport that reads page bytes straight into place (one copy,
/// by the kernel) instead of into its buffer.
pub trait DirectPlacement: Send + Sync {
    /// For the head of a batch sent as is, whose payload is not read yet:
    /// appends to `runs` where its plain pages go, in payload order, and
    /// returns true. Returns false when the batch does not fit the announced
    /// memory (a block, page size or page it does not have): the transport
    /// then reads the payload into its buffer as usual, and the receiver's
    /// own checks report the error before anything is written.
    fn runs<'a>(&'a self, batch: &PageBatch<'_>, runs: &mut Vec<GuestRun<'a>>) -> bool;
}

/// The receiving half of a channel.
pub trait ChannelRx: Send {
    /// Receives the next message, borrowed from the channel's buffer until
    /// the next call. Fails with [`TransportError::TimedOut`] when nothing
    /// arrives within the receive timeout; a timeout in the middle of a
    /// message leaves the channel unusable (the part already read is gone),
    /// so callers treat any receive error as the end of the channel.
    fn recv(&mut self) -> Result<Message<'_>, TransportError>;

    /// Hands over the buffer holding the body of the message last received
    /// (a page batch's payload, say, so another thread can place it without
    /// a copy), and takes `replacement` to receive into from now on.
    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8>;

    /// Asks the transport to read the page bytes of batches sent as is
    /// straight into guest memory, as `target` says. A transport that can
    /// returns true and from then on returns such batches from
    /// [`ChannelRx::recv`] with their pages already in place
    /// ([`PageBatch::is_placed`], checked against the frame's checksum, page
    /// hashes attached). The bytes land before the frame's checksum is
    /// checked: a corrupt frame still fails the migration, but may leave
    /// corrupt bytes in memory that is discarded with it. The default keeps
    /// receiving into the buffer.
    fn place_directly(&mut self, target: Arc<dyn DirectPlacement>) -> bool {
        let _ = target;
        false
    }

    /// Sets the receive timeout (`None`: wait forever).
    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError>;

    /// Wire bytes received so far on this half.
    fn bytes_received(&self) -> u64;

    /// See [`ChannelTx::prefer_latency`].
    fn prefer_latency(&mut self) {}
}

/// Shuts a channel down in both directions from any thread, so that a
/// thread blocked sending or receiving on it returns at once.
pub type Closer = Box<dyn Fn() + Send + Sync>;

/// A channel split into its sending and receiving halves.
pub type ChannelHalves = (Box<dyn ChannelTx>, Box<dyn ChannelRx>);

/// A bidirectional message channel to the peer.
pub trait Channel: ChannelTx + ChannelRx {
    /// Splits the channel into halves that two threads use at once.
    fn split(self: Box<Self>) -> Result<ChannelHalves, TransportError>;

    /// The peer's address, for messages.
    fn peer(&self) -> String;

    /// A handle that shuts this channel down from another thread.
    fn closer(&self) -> Result<Closer, TransportError>;
}
