//! Frames: the 16-byte header that precedes every message, and [`Message`],
//! the sum of every message kind.

use crate::codec::{Reader, reserved_zero};
use crate::control::{Complete, EndOfRam, SyncMarker};
use crate::delta::DeltaBatch;
use crate::handshake::{BlockList, ChannelHello, Hello, HelloReply};
use crate::page::PageBatch;
use crate::postcopy::{PageBitmap, PostcopyStart, Resume};
use crate::return_path::{Ack, PageRequest, PeerError, Verdict};
use crate::{WireError, codec};
use xxhash_rust::xxh3::Xxh3;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Length of a frame header on the wire.
pub const FRAME_HEADER_LEN: usize = 16;

/// The largest frame body this version sends or accepts. A receiver never
/// allocates more than this on a peer's word.
pub const MAX_FRAME_BODY: u32 = 64 << 20;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawFrameHeader {
    len: U32,
    kind: U16,
    reserved: U16,
    checksum: U64,
}
const _: () = assert!(size_of::<RawFrameHeader>() == FRAME_HEADER_LEN);

/// The kind of a message, as carried in its frame header. `0` is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageKind {
    /// Source → destination: versions, features, session.
    Hello = 1,
    /// Destination → source: the agreed version and features.
    HelloReply = 2,
    /// Source → destination: the RAM blocks.
    BlockList = 3,
    /// Destination → source: the block list fits.
    BlocksAccepted = 4,
    /// Source → destination: a batch of pages.
    Pages = 5,
    /// Source → destination: every page of an epoch was sent.
    SyncMarker = 6,
    /// Source → destination: the VM's device state blob.
    DeviceState = 7,
    /// Source → destination: all RAM and device state is sent.
    EndOfRam = 8,
    /// Source → destination: the source handed the VM over.
    Go = 9,
    /// Source → destination: digests of every block of the frozen source RAM.
    Complete = 10,
    /// Source → destination: the source gives up; the destination discards.
    Abort = 11,
    /// Source → destination: the first message of an extra channel.
    ChannelHello = 12,
    /// Destination → source: the extra channel is accepted.
    ChannelAccepted = 13,
    /// Source → destination, every channel: precopy ends, postcopy follows.
    PostcopyStart = 14,
    /// Source → destination: pages to drop before the guest runs (postcopy).
    Discard = 15,
    /// Source → destination: the first message of a new main connection
    /// that resumes a postcopy migration after a lost link.
    Resume = 16,
    /// Source → destination: the discards sent while the source ran are
    /// all; it pauses once they are applied.
    Pausing = 17,
    /// Source → destination: pages sent as XBZRLE deltas.
    Deltas = 18,
    /// Either way: a record of the transport's own (the simulated RDMA
    /// transport's keys and placed-batch notices), never seen by the engine.
    Transport = 19,
    /// Destination → source: progress acknowledgement.
    Ack = 32,
    /// Destination → source: everything is placed; waiting for GO.
    Ready = 33,
    /// Destination → source: the VM runs on the destination.
    Resumed = 34,
    /// Destination → source: result of comparing block digests.
    Verdict = 35,
    /// Destination → source: the destination failed or refused.
    Error = 36,
    /// Destination → source: pages the guest waits for (postcopy).
    PageRequest = 37,
    /// Destination → source: pages held, when a lost link is resumed.
    ReceivedPages = 38,
    /// Destination → source: the resumed link is accepted; its pages were
    /// all listed.
    ResumeAccepted = 39,
    /// Destination → source: ready for the switch to postcopy (the discards
    /// so far applied, guest RAM registered for faults): pause now.
    Prepared = 40,
}

impl MessageKind {
    /// Maps a raw kind to a known one.
    pub fn from_raw(raw: u16) -> Result<Self, WireError> {
        use MessageKind::*;
        Ok(match raw {
            1 => Hello,
            2 => HelloReply,
            3 => BlockList,
            4 => BlocksAccepted,
            5 => Pages,
            6 => SyncMarker,
            7 => DeviceState,
            8 => EndOfRam,
            9 => Go,
            10 => Complete,
            11 => Abort,
            12 => ChannelHello,
            13 => ChannelAccepted,
            14 => PostcopyStart,
            15 => Discard,
            16 => Resume,
            17 => Pausing,
            18 => Deltas,
            19 => Transport,
            32 => Ack,
            33 => Ready,
            34 => Resumed,
            35 => Verdict,
            36 => Error,
            37 => PageRequest,
            38 => ReceivedPages,
            39 => ResumeAccepted,
            40 => Prepared,
            other => return Err(WireError::UnknownKind(other)),
        })
    }

    /// The name used in error messages.
    pub fn name(self) -> &'static str {
        use MessageKind::*;
        match self {
            Hello => "hello",
            HelloReply => "hello-reply",
            BlockList => "block-list",
            BlocksAccepted => "blocks-accepted",
            Pages => "pages",
            SyncMarker => "sync-marker",
            DeviceState => "device-state",
            EndOfRam => "end-of-ram",
            Go => "go",
            Complete => "complete",
            Abort => "abort",
            ChannelHello => "channel-hello",
            ChannelAccepted => "channel-accepted",
            Ack => "ack",
            Ready => "ready",
            Resumed => "resumed",
            Verdict => "verdict",
            Error => "error",
            PageRequest => "page-request",
            PostcopyStart => "postcopy-start",
            Discard => "discard",
            Resume => "resume",
            ReceivedPages => "received-pages",
            ResumeAccepted => "resume-accepted",
            Pausing => "pausing",
            Prepared => "prepared",
            Deltas => "deltas",
            Transport => "transport-record",
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the body holds.
    pub kind: MessageKind,
    /// Length of the body in bytes (at most [`MAX_FRAME_BODY`]).
    pub len: u32,
    /// xxh3-64 of the body.
    pub checksum: u64,
}

impl FrameHeader {
    /// Decodes a header, rejecting unknown kinds and bodies over `max_body`
    /// bytes (which is itself capped at [`MAX_FRAME_BODY`]).
    pub fn decode(bytes: &[u8; FRAME_HEADER_LEN], max_body: u32) -> Result<Self, WireError> {
        let mut reader = Reader::new(bytes, "frame header");
        let raw: RawFrameHeader = reader.read()?;
        let kind = MessageKind::from_raw(raw.kind.get())?;
        reserved_zero("frame header reserved field", raw.reserved.get().into())?;
        let max = max_body.min(MAX_FRAME_BODY);
        codec::cap("frame body length", raw.len.get().into(), max.into())?;
        Ok(Self {
            kind,
            len: raw.len.get(),
            checksum: raw.checksum.get(),
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let raw = RawFrameHeader {
            len: self.len.into(),
            kind: (self.kind as u16).into(),
            reserved: 0.into(),
            checksum: self.checksum.into(),
        };
        let mut out = [0; FRAME_HEADER_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Checks `body` against the header's checksum, whatever the kind.
    pub fn verify(&self, body: &[u8]) -> Result<(), WireError> {
        if self.kind == MessageKind::Pages {
            return crate::page::check_pages(self, body, &mut Vec::new()).map(|_| ());
        }
        self.verify_plain(body)
    }

    /// Checks `body` against the header's checksum as xxh3-64 of the body
    /// (every kind but a pages frame sent as is).
    fn verify_plain(&self, body: &[u8]) -> Result<(), WireError> {
        let actual = checksum(&[body]);
        if actual == self.checksum {
            Ok(())
        } else {
            Err(WireError::Checksum {
                kind: self.kind.name(),
                expected: self.checksum,
                actual,
            })
        }
    }
}

/// xxh3-64 over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u64 {
    let mut hasher = Xxh3::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.digest()
}

/// Every message of protocol version 1. Borrowed variants point into the
/// buffer they were decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloReply`].
    HelloReply(HelloReply),
    /// See [`BlockList`].
    BlockList(BlockList),
    /// The destination accepted the block list.
    BlocksAccepted,
    /// See [`PageBatch`].
    Pages(PageBatch<'a>),
    /// See [`DeltaBatch`].
    Deltas(DeltaBatch<'a>),
    /// See [`SyncMarker`].
    SyncMarker(SyncMarker),
    /// The VM's device state, opaque to the migration stack.
    DeviceState(&'a [u8]),
    /// See [`EndOfRam`].
    EndOfRam(EndOfRam),
    /// The source handed the VM over: the destination may run it.
    Go,
    /// See [`Complete`].
    Complete(Complete),
    /// The source gives up, with its reason.
    Abort(String),
    /// See [`ChannelHello`].
    ChannelHello(ChannelHello),
    /// The destination accepted an extra channel.
    ChannelAccepted,
    /// See [`Ack`].
    Ack(Ack),
    /// The destination has placed everything and waits for GO.
    Ready,
    /// The VM runs on the destination.
    Resumed,
    /// See [`Verdict`].
    Verdict(Verdict),
    /// See [`PeerError`].
    Error(PeerError),
    /// See [`PageRequest`].
    PageRequest(PageRequest),
    /// See [`PostcopyStart`].
    PostcopyStart(PostcopyStart),
    /// Pages the destination drops before its guest runs: they changed
    /// since they were sent.
    Discard(PageBitmap<'a>),
    /// See [`Resume`].
    Resume(Resume),
    /// Pages the destination holds (after a lost link).
    ReceivedPages(PageBitmap<'a>),
    /// The destination accepted the resumed link.
    ResumeAccepted,
    /// The source pauses once the discards so far are applied.
    Pausing,
    /// The destination is ready for the switch to postcopy.
    Prepared,
    /// A record of the transport's own, opaque here (see
    /// [`MessageKind::Transport`]): a transport that sends one takes it out
    /// of the stream again on the other side.
    Transport(&'a [u8]),
}

impl<'a> Message<'a> {
    /// The kind in this message's frame header.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::HelloReply(_) => MessageKind::HelloReply,
            Message::BlockList(_) => MessageKind::BlockList,
            Message::BlocksAccepted => MessageKind::BlocksAccepted,
            Message::Pages(_) => MessageKind::Pages,
            Message::Deltas(_) => MessageKind::Deltas,
            Message::SyncMarker(_) => MessageKind::SyncMarker,
            Message::DeviceState(_) => MessageKind::DeviceState,
            Message::EndOfRam(_) => MessageKind::EndOfRam,
            Message::Go => MessageKind::Go,
            Message::Complete(_) => MessageKind::Complete,
            Message::Abort(_) => MessageKind::Abort,
            Message::ChannelHello(_) => MessageKind::ChannelHello,
            Message::ChannelAccepted => MessageKind::ChannelAccepted,
            Message::Ack(_) => MessageKind::Ack,
            Message::Ready => MessageKind::Ready,
            Message::Resumed => MessageKind::Resumed,
            Message::Verdict(_) => MessageKind::Verdict,
            Message::Error(_) => MessageKind::Error,
            Message::PageRequest(_) => MessageKind::PageRequest,
            Message::PostcopyStart(_) => MessageKind::PostcopyStart,
            Message::Discard(_) => MessageKind::Discard,
            Message::Resume(_) => MessageKind::Resume,
            Message::ReceivedPages(_) => MessageKind::ReceivedPages,
            Message::ResumeAccepted => MessageKind::ResumeAccepted,
            Message::Pausing => MessageKind::Pausing,
            Message::Prepared => MessageKind::Prepared,
            Message::Transport(_) => MessageKind::Transport,
        }
    }

    /// Appends the body of this message (without frame header) to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(m) => m.encode(out),
            Message::HelloReply(m) => m.encode(out),
            Message::BlockList(m) => m.encode(out),
            Message::Pages(m) => {
                m.encode_head(out);
                out.extend_from_slice(m.payload());
            }
            Message::Deltas(m) => m.encode(out),
            Message::SyncMarker(m) => m.encode(out),
            Message::DeviceState(blob) | Message::Transport(blob) => out.extend_from_slice(blob),
            Message::EndOfRam(m) => m.encode(out),
            Message::Complete(m) => m.encode(out),
            Message::Abort(reason) => crate::return_path::encode_text(reason, out),
            Message::ChannelHello(m) => m.encode(out),
            Message::Ack(m) => m.encode(out),
            Message::Verdict(m) => m.encode(out),
            Message::Error(m) => m.encode(out),
            Message::PageRequest(m) => m.encode(out),
            Message::PostcopyStart(m) => m.encode(out),
            Message::Discard(m) | Message::ReceivedPages(m) => m.encode(out),
            Message::Resume(m) => m.encode(out),
            Message::BlocksAccepted
            | Message::ChannelAccepted
            | Message::Go
            | Message::Ready
            | Message::Resumed
            | Message::ResumeAccepted
            | Message::Pausing
            | Message::Prepared => {}
        }
    }

    /// Appends the whole frame (header and body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let payload = self.encode_head(out);
        out.extend_from_slice(payload);
    }

    /// Appends the frame to `out` but for a page batch's payload, which it
    /// returns (empty for other messages): the frame is what `out` gained
    /// followed by that payload, so a writer sends the page bytes from
    /// where they are instead of copying them after the head.
    pub fn encode_head(&self, out: &mut Vec<u8>) -> &'a [u8] {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        let (payload, checksum) = match self {
            Message::Pages(batch) => {
                batch.encode_head(out);
                let payload = batch.payload();
                (payload, batch.checksum_with_head(&out[start + FRAME_HEADER_LEN..]))
            }
            _ => {
                self.encode_body(out);
                (&[][..], checksum(&[&out[start + FRAME_HEADER_LEN..]]))
            }
        };
        let header = FrameHeader {
            kind: self.kind(),
            len: (out.len() - start - FRAME_HEADER_LEN + payload.len()) as u32,
            checksum,
        };
        out[start..start + FRAME_HEADER_LEN].copy_from_slice(&header.encode());
        payload
    }

    /// Decodes a body of the given kind. The checksum is not checked here
    /// (see [`FrameHeader::verify`] and [`decode_frame`]).
    pub fn decode_body(kind: MessageKind, body: &'a [u8]) -> Result<Self, WireError> {
        let empty = |what| Reader::new(body, what).finish();
        Ok(match kind {
            MessageKind::Hello => Message::Hello(Hello::decode(body)?),
            MessageKind::HelloReply => Message::HelloReply(HelloReply::decode(body)?),
            MessageKind::BlockList => Message::BlockList(BlockList::decode(body)?),
            MessageKind::BlocksAccepted => {
                empty("blocks-accepted")?;
                Message::BlocksAccepted
            }
            MessageKind::Pages => Message::Pages(PageBatch::decode(body)?),
            MessageKind::Deltas => Message::Deltas(DeltaBatch::decode(body)?),
            MessageKind::SyncMarker => Message::SyncMarker(SyncMarker::decode(body)?),
            MessageKind::DeviceState => Message::DeviceState(body),
            MessageKind::Transport => Message::Transport(body),
            MessageKind::EndOfRam => Message::EndOfRam(EndOfRam::decode(body)?),
            MessageKind::Go => {
                empty("go")?;
                Message::Go
            }
            MessageKind::Complete => Message::Complete(Complete::decode(body)?),
            MessageKind::Abort => Message::Abort(crate::return_path::decode_text(body, "abort reason")?),
            MessageKind::ChannelHello => Message::ChannelHello(ChannelHello::decode(body)?),
            MessageKind::ChannelAccepted => {
                empty("channel-accepted")?;
                Message::ChannelAccepted
            }
            MessageKind::Ack => Message::Ack(Ack::decode(body)?),
            MessageKind::Ready => {
                empty("ready")?;
                Message::Ready
            }
            MessageKind::Resumed => {
                empty("resumed")?;
                Message::Resumed
            }
            MessageKind::Verdict => Message::Verdict(Verdict::decode(body)?),
            MessageKind::Error => Message::Error(PeerError::decode(body)?),
            MessageKind::PageRequest => Message::PageRequest(PageRequest::decode(body)?),
            MessageKind::PostcopyStart => Message::PostcopyStart(PostcopyStart::decode(body)?),
            MessageKind::Discard => Message::Discard(PageBitmap::decode(body)?),
            MessageKind::Resume => Message::Resume(Resume::decode(body)?),
            MessageKind::ReceivedPages => Message::ReceivedPages(PageBitmap::decode(body)?),
            MessageKind::ResumeAccepted => {
                empty("resume-accepted")?;
                Message::ResumeAccepted
            }
            MessageKind::Pausing => {
                empty("pausing")?;
                Message::Pausing
            }
            MessageKind::Prepared => {
                empty("prepared")?;
                Message::Prepared
            }
        })
    }
}

/// Decodes one whole frame from the front of `bytes`: header, checksum and
/// body. Returns the message and the number of bytes it took.
pub fn decode_frame(bytes: &[u8]) -> Result<(Message<'_>, usize), WireError> {
    let Some(head) = bytes.first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(WireError::Truncated {
            what: "frame header",
            need: FRAME_HEADER_LEN,
            have: bytes.len(),
        });
    };
    let header = FrameHeader::decode(head, MAX_FRAME_BODY)?;
    let total = FRAME_HEADER_LEN + header.len as usize;
    let Some(body) = bytes.get(FRAME_HEADER_LEN..total) else {
        return Err(WireError::Truncated {
            what: header.kind.name(),
            need: total,
            have: bytes.len(),
        });
    };
    if header.kind == MessageKind::Pages {
        let batch = crate::page::check_pages(&header, body, &mut Vec::new())?;
        return Ok((Message::Pages(batch), total));
    }
    header.verify(body)?;
    Ok((Message::decode_body(header.kind, body)?, total))
}
