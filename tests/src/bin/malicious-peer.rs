//! A malicious migration peer, for the hostile-input tests (and for anyone
//! who wants to see how `migrate-cli` answers one).
//!
//! It completes the handshake properly, then sends frames that are well
//! formed on the wire (right checksums) but lie: pages outside the
//! announced RAM, counts and lengths far past any cap, pages twice in one
//! batch or out of order, markers that miscount, phases out of order, a
//! peer's own messages.
//!
//! ```text
//! malicious-peer source ADDR LIE   connect to a destination (`migrate-cli recv`)
//!                                  and lie; prints each error it is sent back
//!                                  as `told: MESSAGE` on stdout
//! malicious-peer destination LIE   listen on 127.0.0.1 (prints `listening on
//!                                  ADDR` on stderr), take one source
//!                                  (`migrate-cli send`), lie, read until it
//!                                  hangs up
//! malicious-peer list              the lies, `source NAME` or `destination NAME`
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use migration_tests::read_until_closed;
use migration_wire::frame::decode_frame;
use migration_wire::{
    Ack, Block, BlockList, EndOfRam, FRAME_HEADER_LEN, Features, FrameHeader, Hello, HelloReply, Message, MessageKind,
    PROTOCOL_VERSION, PageBatch, PageEncoding, PageEntry, SessionId, SyncMarker, Verdict,
};

/// Pages per block of the malicious source's two blocks.
const PAGES: u64 = 16;
/// How long it waits for the other side before giving up.
const WAIT: Duration = Duration::from_secs(60);

/// What a malicious source can send after the handshake.
const SOURCE_LIES: &[&str] = &[
    "page-past-the-block",
    "no-such-block",
    "a-million-pages",
    "a-4-gib-frame",
    "a-page-twice",
    "pages-out-of-order",
    "a-later-epoch-first",
    "a-marker-that-miscounts",
    "end-of-ram-with-pages-missing",
    "a-second-block-list",
    "the-destinations-own-message",
];

/// What a malicious destination can answer after the handshake.
const DESTINATION_LIES: &[&str] = &[
    "an-ack-of-an-epoch-not-sent",
    "ready-at-once",
    "resumed-before-go",
    "a-verdict-before-the-digests",
    "a-sources-own-message",
];

fn frame(message: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    message.encode(&mut out);
    out
}

/// A frame whose body is `body` and whose checksum is right for it, for
/// bodies no valid message encodes to.
fn raw_frame(kind: MessageKind, body: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        kind,
        len: body.len() as u32,
        checksum: migration_wire::frame::checksum(&[body]),
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(body);
    out
}

fn batch(block: u32, epoch: u64, pages: &[u64]) -> Vec<u8> {
    let mut entries = Vec::new();
    for &page in pages {
        PageEntry {
            page,
            encoding: PageEncoding::Plain,
        }
        .push_to(&mut entries);
    }
    let payload = vec![0xa5; pages.len() * 4096];
    frame(&Message::Pages(
        PageBatch::new(block, epoch, 4096, &entries, &payload).expect("a batch"),
    ))
}

/// A batch body with entries in the order given (strictly increasing or
/// not), which `PageBatch::new` would refuse to build.
fn raw_batch(block: u32, epoch: u64, pages: &[u64]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&block.to_le_bytes());
    body.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    body.extend_from_slice(&4096u32.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes()); // codec none
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&epoch.to_le_bytes());
    body.extend_from_slice(&((pages.len() * 4096) as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for &page in pages {
        body.extend_from_slice(&((page << 8) | 2).to_le_bytes());
    }
    body.extend(std::iter::repeat_n(0x5a, pages.len() * 4096));
    raw_frame(MessageKind::Pages, &body)
}

/// The frames a malicious source sends for `lie`.
fn source_lie(lie: &str) -> Option<Vec<Vec<u8>>> {
    Some(match lie {
        "page-past-the-block" => vec![batch(0, 0, &[PAGES])],
        "no-such-block" => vec![batch(7, 0, &[0])],
        "a-million-pages" => {
            let mut f = raw_batch(0, 0, &[1]);
            // A million entries in the batch header (bytes 4..8 of the body).
            f[FRAME_HEADER_LEN + 4..FRAME_HEADER_LEN + 8].copy_from_slice(&1_000_000u32.to_le_bytes());
            vec![raw_frame(MessageKind::Pages, &f[FRAME_HEADER_LEN..])]
        }
        "a-4-gib-frame" => {
            let mut head = FrameHeader {
                kind: MessageKind::Pages,
                len: 0,
                checksum: 0,
            }
            .encode();
            head[..4].copy_from_slice(&u32::MAX.to_le_bytes());
            vec![head.to_vec()]
        }
        "a-page-twice" => vec![raw_batch(0, 0, &[3, 3])],
        "pages-out-of-order" => vec![raw_batch(0, 0, &[5, 2])],
        "a-later-epoch-first" => vec![batch(0, 1, &[0])],
        "a-marker-that-miscounts" => vec![
            batch(0, 0, &[0]),
            frame(&Message::SyncMarker(SyncMarker { epoch: 0, pages: 9 })),
        ],
        "end-of-ram-with-pages-missing" => vec![
            frame(&Message::SyncMarker(SyncMarker { epoch: 0, pages: 0 })),
            frame(&Message::EndOfRam(EndOfRam { epochs: 1 })),
        ],
        "a-second-block-list" => vec![frame(&Message::BlockList(BlockList {
            blocks: vec![Block {
                name: "more".into(),
                length: 4096,
                page_size: 4096,
            }],
        }))],
        "the-destinations-own-message" => vec![frame(&Message::Ready)],
        _ => return None,
    })
}

/// The message a malicious destination answers with for `lie`.
fn destination_lie(lie: &str) -> Option<Message<'static>> {
    Some(match lie {
        "an-ack-of-an-epoch-not-sent" => Message::Ack(Ack {
            epoch: 5,
            pages: 0,
            bytes: 0,
        }),
        "ready-at-once" => Message::Ready,
        "resumed-before-go" => Message::Resumed,
        "a-verdict-before-the-digests" => Message::Verdict(Verdict { mismatched: vec![] }),
        "a-sources-own-message" => Message::Go,
        _ => return None,
    })
}

/// Reads one frame.
fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    stream
        .read_exact(&mut head)
        .map_err(|e| format!("reading a frame header: {e}"))?;
    let header = FrameHeader::decode(&head, migration_wire::MAX_FRAME_BODY).map_err(|e| e.to_string())?;
    let mut all = head.to_vec();
    all.resize(FRAME_HEADER_LEN + header.len as usize, 0);
    stream
        .read_exact(&mut all[FRAME_HEADER_LEN..])
        .map_err(|e| format!("reading a frame body: {e}"))?;
    Ok(all)
}

/// Reads one message and hands it to `take`.
fn read_message<T>(stream: &mut TcpStream, take: impl FnOnce(Message<'_>) -> Result<T, String>) -> Result<T, String> {
    let bytes = read_frame(stream)?;
    let (message, _) = decode_frame(&bytes).map_err(|e| e.to_string())?;
    take(message)
}

/// Opens a migration as a real source would (one channel, two blocks),
/// sends the lie, and prints every error the destination sends back.
fn source(addr: &str, lies: &[Vec<u8>]) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let hello = Message::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        features: Features::ZERO_PAGES,
        session: SessionId(0xbad),
        channels: 1,
    });
    stream.write_all(&frame(&hello)).map_err(|e| e.to_string())?;
    read_message(&mut stream, |m| match m {
        Message::HelloReply(_) => Ok(()),
        other => Err(format!("wanted a hello reply, got {other:?}")),
    })?;
    let blocks = BlockList {
        blocks: ["low", "high"]
            .iter()
            .map(|name| Block {
                name: (*name).into(),
                length: PAGES * 4096,
                page_size: 4096,
            })
            .collect(),
    };
    stream
        .write_all(&frame(&Message::BlockList(blocks)))
        .map_err(|e| e.to_string())?;
    read_message(&mut stream, |m| match m {
        Message::BlocksAccepted => Ok(()),
        other => Err(format!("wanted the blocks accepted, got {other:?}")),
    })?;
    for lie in lies {
        // The destination may hang up at the first lie.
        if stream.write_all(lie).is_err() {
            break;
        }
    }
    let reply = read_until_closed(&mut stream);
    let mut rest = &reply[..];
    while let Ok((message, used)) = decode_frame(rest) {
        if let Message::Error(err) = message {
            println!("told: {}", err.message);
        }
        rest = &rest[used..];
    }
    Ok(())
}

/// Answers one source's handshake properly, then lies.
fn destination(lie: &Message<'_>) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    eprintln!("listening on {}", listener.local_addr().map_err(|e| e.to_string())?);
    let (mut stream, _) = listener.accept().map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let hello = read_message(&mut stream, |m| match m {
        Message::Hello(hello) => Ok(hello),
        other => Err(format!("wanted a hello, got {other:?}")),
    })?;
    let reply = Message::HelloReply(HelloReply {
        version: PROTOCOL_VERSION,
        features: hello.features.intersect(Features::ZERO_PAGES),
        session: hello.session,
        channels: 1,
    });
    stream.write_all(&frame(&reply)).map_err(|e| e.to_string())?;
    read_message(&mut stream, |m| match m {
        Message::BlockList(_) => Ok(()),
        other => Err(format!("wanted a block list, got {other:?}")),
    })?;
    stream
        .write_all(&frame(&Message::BlocksAccepted))
        .map_err(|e| e.to_string())?;
    stream.write_all(&frame(lie)).map_err(|e| e.to_string())?;
    // Take what the source sends until it hangs up.
    read_until_closed(&mut stream);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args[..] {
        ["source", addr, lie] => match source_lie(lie) {
            Some(frames) => source(addr, &frames),
            None => Err(format!("no source lie {lie:?} (see `malicious-peer list`)")),
        },
        ["destination", lie] => match destination_lie(lie) {
            Some(message) => destination(&message),
            None => Err(format!("no destination lie {lie:?} (see `malicious-peer list`)")),
        },
        ["list"] => {
            SOURCE_LIES.iter().for_each(|lie| println!("source {lie}"));
            DESTINATION_LIES.iter().for_each(|lie| println!("destination {lie}"));
            Ok(())
        }
        _ => Err("usage: malicious-peer source ADDR LIE | destination LIE | list".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("malicious-peer: {e}");
            ExitCode::FAILURE
        }
    }
}
