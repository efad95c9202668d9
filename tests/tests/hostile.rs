//! A hostile source: it completes the handshake properly, then sends frames
//! that are well formed on the wire (right checksums) but lie: pages outside
//! the announced RAM, counts and lengths far past any cap, pages twice in
//! one batch or out of order, markers that miscount, phases out of order.
//! The destination refuses each with a protocol error that names the lie,
//! never completes, never runs a guest, and never needs more memory than a
//! small address-space limit allows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use migration_tests::{MIGRATION_WAIT, Proc, WAIT, field, lock};
use migration_wire::frame::decode_frame;
use migration_wire::{
    Block, BlockList, EndOfRam, FRAME_HEADER_LEN, Features, FrameHeader, Hello, Message, MessageKind, PROTOCOL_VERSION,
    PageBatch, PageEncoding, PageEntry, SessionId, SyncMarker,
};

/// Pages per block of the hostile source's two blocks.
const PAGES: u64 = 16;

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

/// Reads one frame from `stream`.
fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut head).expect("a reply header");
    let header = FrameHeader::decode(&head, migration_wire::MAX_FRAME_BODY).expect("a reply");
    let mut all = head.to_vec();
    all.resize(FRAME_HEADER_LEN + header.len as usize, 0);
    stream.read_exact(&mut all[FRAME_HEADER_LEN..]).expect("a reply body");
    all
}

/// Opens a migration as a real source would (one channel, two blocks),
/// then sends `lies` and reads until the destination closes; returns the
/// messages of any `Error` frames it sent back.
fn lie(addr: SocketAddr, lies: &[Vec<u8>]) -> Vec<String> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream
        .write_all(&frame(&Message::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            features: Features::ZERO_PAGES,
            session: SessionId(0xbad),
            channels: 1,
        })))
        .expect("hello");
    assert!(matches!(
        decode_frame(&read_frame(&mut stream)).expect("reply").0,
        Message::HelloReply(_)
    ));
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
    stream.write_all(&frame(&Message::BlockList(blocks))).expect("blocks");
    assert!(matches!(
        decode_frame(&read_frame(&mut stream)).expect("reply").0,
        Message::BlocksAccepted
    ));
    for lie in lies {
        // The destination may hang up at the first lie.
        if stream.write_all(lie).is_err() {
            break;
        }
    }
    let reply = migration_tests::read_until_closed(&mut stream);
    let mut errors = Vec::new();
    let mut rest = &reply[..];
    while let Ok((message, used)) = decode_frame(rest) {
        if let Message::Error(err) = message {
            errors.push(err.message);
        }
        rest = &rest[used..];
    }
    errors
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

/// A batch body with entries in the order given (strictly increasing or not).
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

#[test]
fn every_lie_is_refused_by_name_and_nothing_runs() {
    let _lock = lock();
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        ("page past the block", vec![batch(0, 0, &[PAGES])], "outside block"),
        ("no such block", vec![batch(7, 0, &[0])], "blocks were announced"),
        (
            "a huge page count",
            vec![{
                let mut f = raw_batch(0, 0, &[1]);
                // Claim a million entries in the batch header (bytes 4..8 of the body).
                f[FRAME_HEADER_LEN + 4..FRAME_HEADER_LEN + 8].copy_from_slice(&1_000_000u32.to_le_bytes());
                let body = f[FRAME_HEADER_LEN..].to_vec();
                raw_frame(MessageKind::Pages, &body)
            }],
            "exceeds the limit",
        ),
        (
            "a frame of 4 GiB",
            vec![{
                let mut head = FrameHeader {
                    kind: MessageKind::Pages,
                    len: 0,
                    checksum: 0,
                }
                .encode();
                head[..4].copy_from_slice(&u32::MAX.to_le_bytes());
                head.to_vec()
            }],
            "exceeds the limit",
        ),
        (
            "a page twice in a batch",
            vec![raw_batch(0, 0, &[3, 3])],
            "indices must increase",
        ),
        (
            "pages out of order",
            vec![raw_batch(0, 0, &[5, 2])],
            "indices must increase",
        ),
        ("a later epoch first", vec![batch(0, 1, &[0])], "epoch"),
        (
            "a marker that miscounts",
            vec![
                batch(0, 0, &[0]),
                frame(&Message::SyncMarker(SyncMarker { epoch: 0, pages: 9 })),
            ],
            "counts 9 pages",
        ),
        (
            "end of RAM with pages missing",
            vec![
                frame(&Message::SyncMarker(SyncMarker { epoch: 0, pages: 0 })),
                frame(&Message::EndOfRam(EndOfRam { epochs: 1 })),
            ],
            "never",
        ),
        (
            "a second block list",
            vec![frame(&Message::BlockList(BlockList {
                blocks: vec![Block {
                    name: "more".into(),
                    length: 4096,
                    page_size: 4096,
                }],
            }))],
            "unexpected",
        ),
        (
            "the destination's own messages",
            vec![frame(&Message::Ready)],
            "unexpected",
        ),
    ];
    for (name, lies, problem) in cases {
        // Memory stays bounded: the destination runs with 1 GiB of address
        // space, far less than the lies claim (a 4 GiB frame, a million pages).
        let mut recv = Proc::spawn_limited(
            "recv",
            &["recv", "--listen", "127.0.0.1:0", "--json", "--run-for", "0s"],
            Some(1 << 20),
        );
        let line = recv.wait_stderr_prefix("listening on ");
        let addr: SocketAddr = line["listening on ".len()..].trim().parse().expect("address");
        let told = lie(addr, &lies);
        let out = recv.wait(MIGRATION_WAIT);
        assert_eq!(out.code, Some(1), "{name}: the destination fails\n{}", out.describe());
        let json = out.json();
        assert_eq!(field(&json, "status"), "failed", "{name}: {json:#}");
        assert!(field(&json, "guest_check").is_null(), "{name}: no guest ran: {json:#}");
        let error = migration_tests::error_text(&json);
        assert!(
            error.contains(&problem.to_lowercase()),
            "{name}: wanted {problem:?} in the destination's error: {json:#}"
        );
        assert!(
            told.iter().any(|t| t.to_lowercase().contains(&problem.to_lowercase())) || told.is_empty(),
            "{name}: what the source was told names the lie: {told:?}"
        );
    }
}

/// A destination that answers the handshake properly, then lies with
/// `lie`; returns what the source reported.
fn lying_destination(lie: Message<'_>) -> migration_tests::Output {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let send = migration_tests::spawn_send(addr, &["--mem-size", "16M", "--channels", "1", "--json"]);
    let (mut stream, _) = listener.accept().expect("the source connects");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let hello = match decode_frame(&read_frame(&mut stream)).expect("hello").0 {
        Message::Hello(hello) => hello,
        other => panic!("wanted a hello, got {other:?}"),
    };
    stream
        .write_all(&frame(&Message::HelloReply(migration_wire::HelloReply {
            version: PROTOCOL_VERSION,
            features: hello.features.intersect(Features::ZERO_PAGES),
            session: hello.session,
            channels: 1,
        })))
        .expect("reply");
    assert!(matches!(
        decode_frame(&read_frame(&mut stream)).expect("blocks").0,
        Message::BlockList(_)
    ));
    stream.write_all(&frame(&Message::BlocksAccepted)).expect("accepted");
    stream.write_all(&frame(&lie)).expect("the lie");
    // Keep reading what the source sends until it hangs up.
    let _ = migration_tests::read_until_closed(&mut stream);
    send.wait(MIGRATION_WAIT)
}

#[test]
fn a_lying_destination_is_caught_and_the_source_resumes() {
    let _lock = lock();
    let cases: Vec<(&str, Message<'_>, &str)> = vec![
        (
            "an acknowledgement of an epoch not sent",
            Message::Ack(migration_wire::Ack {
                epoch: 5,
                pages: 0,
                bytes: 0,
            }),
            "not sent yet",
        ),
        ("READY at once", Message::Ready, "before the stream ended"),
        ("RESUMED before GO", Message::Resumed, "before go"),
        (
            "a verdict before the digests",
            Message::Verdict(migration_wire::Verdict { mismatched: vec![] }),
            "before the block digests",
        ),
        ("a source's message", Message::Go, "unexpected"),
    ];
    for (name, lie, problem) in cases {
        let out = lying_destination(lie);
        let json = migration_tests::assert_send_failed_resumed(&out);
        let error = migration_tests::error_text(&json);
        assert!(error.contains(problem), "{name}: wanted {problem:?}: {json:#}");
    }
}
