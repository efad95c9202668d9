//! Messages from the destination back to the source: acknowledgements,
//! verdicts, errors, and (reserved for postcopy) page requests.

use crate::WireError;
use crate::codec::{Reader, cap, put};
use crate::handshake::MAX_BLOCKS;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Longest text (error message, abort reason) on the wire.
pub const MAX_TEXT: usize = 4096;

pub(crate) fn encode_text(text: &str, out: &mut Vec<u8>) {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

pub(crate) fn decode_text(body: &[u8], what: &'static str) -> Result<String, WireError> {
    let mut r = Reader::new(body, what);
    let text = read_text(&mut r, what)?;
    r.finish()?;
    Ok(text)
}

fn read_text(r: &mut Reader<'_>, what: &'static str) -> Result<String, WireError> {
    let len: U16 = r.read()?;
    cap(what, len.get().into(), MAX_TEXT as u64)?;
    Ok(r.take_str(len.get().into(), what)?.to_owned())
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawAck {
    epoch: U64,
    pages: U64,
    bytes: U64,
}
const _: () = assert!(size_of::<RawAck>() == 24);

/// Progress as the destination sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The last epoch fully received.
    pub epoch: u64,
    /// Pages placed so far.
    pub pages: u64,
    /// Frame bytes received so far.
    pub bytes: u64,
}

impl Ack {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawAck {
                epoch: self.epoch.into(),
                pages: self.pages.into(),
                bytes: self.bytes.into(),
            },
        );
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "ack");
        let raw: RawAck = r.read()?;
        r.finish()?;
        Ok(Self {
            epoch: raw.epoch.get(),
            pages: raw.pages.get(),
            bytes: raw.bytes.get(),
        })
    }
}

/// The destination's comparison of block digests: the blocks that differ.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Indices of the blocks whose digests differ; empty when verified.
    pub mismatched: Vec<u32>,
}

impl Verdict {
    /// Whether every block matched.
    pub fn is_verified(&self) -> bool {
        self.mismatched.is_empty()
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.mismatched.len() as u32).to_le_bytes());
        for block in &self.mismatched {
            out.extend_from_slice(&block.to_le_bytes());
        }
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "verdict");
        let count: U32 = r.read()?;
        cap("mismatched block count", count.get().into(), MAX_BLOCKS as u64)?;
        let mut mismatched = Vec::with_capacity(count.get() as usize);
        for _ in 0..count.get() {
            let block: U32 = r.read()?;
            mismatched.push(block.get());
        }
        r.finish()?;
        Ok(Self { mismatched })
    }
}

/// Why the destination stopped. `0` is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer broke the protocol.
    Protocol = 1,
    /// No protocol version in common.
    Version = 2,
    /// A limit of the destination was exceeded (memory, sizes).
    Limit = 3,
    /// The destination failed on its own side.
    Internal = 4,
    /// The destination's RAM does not match the source's.
    Verification = 5,
    /// The destination was cancelled.
    Cancelled = 6,
}

impl ErrorCode {
    fn from_raw(raw: u16) -> Result<Self, WireError> {
        Ok(match raw {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Version,
            3 => ErrorCode::Limit,
            4 => ErrorCode::Internal,
            5 => ErrorCode::Verification,
            6 => ErrorCode::Cancelled,
            other => {
                return Err(WireError::Invalid {
                    what: "error code",
                    value: other.into(),
                });
            }
        })
    }
}

/// An error the destination reports before it closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerError {
    /// The class of failure.
    pub code: ErrorCode,
    /// A one-line message for people.
    pub message: String,
}

impl PeerError {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.code as u16).to_le_bytes());
        encode_text(&self.message, out);
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "error");
        let code: U16 = r.read()?;
        let code = ErrorCode::from_raw(code.get())?;
        let message = read_text(&mut r, "error message")?;
        r.finish()?;
        Ok(Self { code, message })
    }
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawPageRequest {
    block: U32,
    count: U32,
    page: U64,
}
const _: () = assert!(size_of::<RawPageRequest>() == 16);

/// Pages the destination needs now (reserved for postcopy; version 1
/// destinations do not send it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Index of the block.
    pub block: u32,
    /// First page wanted.
    pub page: u64,
    /// Number of pages wanted, at least 1.
    pub count: u32,
}

impl PageRequest {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put(
            out,
            &RawPageRequest {
                block: self.block.into(),
                count: self.count.into(),
                page: self.page.into(),
            },
        );
    }

    pub(crate) fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "page-request");
        let raw: RawPageRequest = r.read()?;
        if raw.count.get() == 0 {
            return Err(WireError::Invalid {
                what: "page-request count",
                value: 0,
            });
        }
        r.finish()?;
        Ok(Self {
            block: raw.block.get(),
            page: raw.page.get(),
            count: raw.count.get(),
        })
    }
}
