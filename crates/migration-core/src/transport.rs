//! The channel boundary: what a transport must offer the runtime.
//!
//! A [`Channel`] carries whole messages, page batches and control frames,
//! not raw bytes: a stream transport encodes each message as a frame, a
//! file transport would write a batch at its fixed offset, an RDMA
//! transport would write it into the peer's registered memory. The runtime
//! only ever sees `Box<dyn Channel>`.

use migration_wire::{Message, WireError};
use std::time::Duration;

/// Why a channel failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The operating system reported an error.
    #[error("{context}: {source}")]
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

/// The sending half of a channel.
pub trait ChannelTx: Send {
    /// Sends one message. A [`Message::Pages`] batch's payload may be large;
    /// the transport writes it without another copy where it can.
    fn send(&mut self, message: &Message<'_>) -> Result<(), TransportError>;

    /// Wire bytes sent so far on this half.
    fn bytes_sent(&self) -> u64;

    /// Closes the sending direction; the peer sees end of stream.
    fn shutdown(&mut self);
}

/// The receiving half of a channel.
pub trait ChannelRx: Send {
    /// Receives the next message, borrowed from the channel's buffer until
    /// the next call. Fails with [`TransportError::TimedOut`] when nothing
    /// arrives within the receive timeout.
    fn recv(&mut self) -> Result<Message<'_>, TransportError>;

    /// Hands over the buffer holding the body of the message last received
    /// (a page batch's payload, say, so another thread can place it without
    /// a copy), and takes `replacement` to receive into from now on.
    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8>;

    /// Sets the receive timeout (`None`: wait forever).
    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), TransportError>;

    /// Wire bytes received so far on this half.
    fn bytes_received(&self) -> u64;
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
