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
//!                                  (`migrate-cli send`) and its extra
//!                                  channels, lie, read until it hangs up
//! malicious-peer list              the lies, `source NAME` or `destination NAME`
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::Duration;

use migration_tests::read_until_closed;
use migration_wire::frame::decode_frame;
use migration_wire::{
    Ack, Block, BlockList, ChannelHello, EndOfRam, FRAME_HEADER_LEN, Features, FrameHeader, Hello, HelloReply,
    MAX_PAGES_PER_BATCH, Message, MessageKind, PROTOCOL_VERSION, PageBatch, PageBitmap, PageEncoding, PageEntry,
    PageRequest, PostcopyStart, SessionId, SyncMarker, Verdict,
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

/// What a malicious source can do around the switch to postcopy (see
/// [`postcopy_source_plan`]).
const POSTCOPY_SOURCE_LIES: &[&str] = &[
    "postcopy-not-agreed",
    "postcopy-discard-past-the-block",
    "postcopy-page-past-the-block",
];

/// What a malicious destination can ask for on the return path (see
/// [`postcopy_asking`]).
const POSTCOPY_DESTINATION_LIES: &[&str] = &[
    "postcopy-request-before-the-switch",
    "postcopy-request-past-the-block",
    "postcopy-request-no-such-block",
    "postcopy-request-too-many-pages",
    "postcopy-request-flood",
];

/// Page requests in `postcopy-request-flood`: far more than a source queues
/// (and, at one page each, about 800 MB of answers).
const FLOOD_REQUESTS: u64 = 200_000;

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

/// How a malicious source plays after the handshake.
struct SourcePlan {
    /// The features its hello proposes.
    features: Features,
    /// Frames for the main connection, once the blocks are accepted (and,
    /// when postcopy was agreed, the urgent-page channel opened).
    main: Vec<Vec<u8>>,
    /// Frames for the urgent-page channel once the destination said its
    /// guest runs (`Resumed`); empty: nothing waits for it.
    after_resumed: Vec<Vec<u8>>,
}

impl SourcePlan {
    /// A precopy lie: frames on the main connection, nothing else.
    fn precopy(main: Vec<Vec<u8>>) -> Self {
        Self {
            features: Features::ZERO_PAGES,
            main,
            after_resumed: Vec::new(),
        }
    }
}

/// The plan of a malicious source for a postcopy `lie`. Each switches at
/// once (no precopy epoch), as `send --postcopy-after 0` does.
fn postcopy_source_plan(lie: &str) -> Option<SourcePlan> {
    let postcopy = Features::ZERO_PAGES.union(Features::POSTCOPY);
    let start = frame(&Message::PostcopyStart(PostcopyStart { epochs: 0 }));
    let state = frame(&Message::DeviceState(&synthetic_guest_state(2 * PAGES)));
    let go = frame(&Message::Go);
    Some(match lie {
        // The switch, complete with device state and GO, on a migration
        // whose handshake did not agree postcopy: no urgent-page channel, and
        // nothing the destination prepared for page faults.
        "postcopy-not-agreed" => SourcePlan {
            features: Features::ZERO_PAGES,
            main: vec![start, state, go],
            after_resumed: Vec::new(),
        },
        // A well-formed bitmap of pages 16..24 of a 16-page block, followed
        // by what would start the guest if the destination let it pass.
        "postcopy-discard-past-the-block" => {
            let discard = frame(&Message::Discard(
                PageBitmap::new(0, PAGES, 8, &[1]).expect("a bitmap of 8 pages"),
            ));
            SourcePlan {
                features: postcopy,
                main: vec![start, discard, state, go],
                after_resumed: Vec::new(),
            }
        }
        // A proper switch; then, once the guest runs there, a page past the
        // end of block 0 on the urgent-page channel.
        "postcopy-page-past-the-block" => SourcePlan {
            features: postcopy,
            main: vec![start, state, go],
            after_resumed: vec![batch(0, 0, &[PAGES])],
        },
        _ => return None,
    })
}

/// A device state the suite's synthetic guest (`reference-guest`, what
/// `migrate-cli recv` runs) loads, for a guest of `pages` pages: one idle
/// writer, every page of unknown content (so its self-check checks none).
/// Built by hand from the layout `reference-guest/src/state.rs` documents,
/// because this crate depends on the wire format only; without a state the
/// guest loads, no lie reaches the phase where the destination's guest runs.
fn synthetic_guest_state(pages: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"RGUEST\0\x01");
    out.extend_from_slice(&1u16.to_le_bytes()); // version
    out.extend_from_slice(&0u16.to_le_bytes()); // reserved
    out.extend_from_slice(&1u64.to_le_bytes()); // seed
    out.extend_from_slice(&0u64.to_le_bytes()); // dirty rate: idle
    out.extend_from_slice(&0u64.to_le_bytes()); // hot set
    out.push(1); // pattern: uniform
    out.push(1); // content: random
    out.extend_from_slice(&0u16.to_le_bytes()); // reserved
    out.extend_from_slice(&1u32.to_le_bytes()); // writers
    out.extend_from_slice(&0u64.to_le_bytes()); // the writer's position
    out.extend_from_slice(&1u64.to_le_bytes()); // the writer's prng state
    out.extend_from_slice(&0u64.to_le_bytes()); // writes so far
    out.extend_from_slice(&pages.to_le_bytes());
    for _ in 0..pages {
        out.extend_from_slice(&u32::MAX.to_le_bytes()); // unknown content
    }
    // The guest's checksum is xxh3-64, as the wire's.
    let checksum = migration_wire::frame::checksum(&[&out]);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// When a malicious postcopy destination sends its page requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// Right after accepting the blocks: the source is in precopy.
    BeforeTheSwitch,
    /// Once it said its guest runs (after GO).
    AfterResumed,
}

/// What a malicious postcopy destination asks the source for.
struct Asking {
    when: Asked,
    requests: Vec<PageRequest>,
    /// Hang up (the sending half of) the main connection after the
    /// requests: the source finds the destination gone once it read them.
    then_vanish: bool,
}

/// What a malicious destination asks for in a postcopy `lie`, given the
/// pages of block 0 as the source announced them.
fn postcopy_asking(lie: &str, block_pages: u64) -> Option<Asking> {
    let one = |block, page| PageRequest { block, page, count: 1 };
    let after_resumed = |requests| Asking {
        when: Asked::AfterResumed,
        requests,
        then_vanish: false,
    };
    Some(match lie {
        "postcopy-request-before-the-switch" => Asking {
            when: Asked::BeforeTheSwitch,
            requests: vec![one(0, 0)],
            then_vanish: false,
        },
        "postcopy-request-past-the-block" => after_resumed(vec![one(0, block_pages)]),
        "postcopy-request-no-such-block" => after_resumed(vec![one(99, 0)]),
        "postcopy-request-too-many-pages" => after_resumed(vec![PageRequest {
            block: 0,
            page: 0,
            count: MAX_PAGES_PER_BATCH + 1,
        }]),
        // Every one valid: the pages of block 0, round and round.
        "postcopy-request-flood" => Asking {
            then_vanish: true,
            ..after_resumed((0..FLOOD_REQUESTS).map(|i| one(0, i % block_pages)).collect())
        },
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

/// The session id of a malicious source.
const SESSION: SessionId = SessionId(0xbad);

/// Opens a migration as a real source would (one channel, two blocks, and
/// the urgent-page channel when postcopy is agreed), plays `plan`, and
/// prints every error the destination sends back.
fn source(addr: &str, plan: &SourcePlan) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let hello = Message::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        features: plan.features,
        session: SESSION,
        channels: 1,
    });
    stream.write_all(&frame(&hello)).map_err(|e| e.to_string())?;
    let agreed = read_message(&mut stream, |m| match m {
        Message::HelloReply(reply) => Ok(reply.features),
        other => Err(format!("wanted a hello reply, got {other:?}")),
    })?;
    let postcopy = plan.features.contains(Features::POSTCOPY);
    if postcopy && !agreed.contains(Features::POSTCOPY) {
        return Err("the destination did not agree postcopy (is it `recv` without --mem-file?)".into());
    }
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
    // Held open until the destination hangs up the main connection.
    let mut urgent = if postcopy {
        Some(open_urgent_channel(addr)?)
    } else {
        None
    };
    // The destination may hang up at the first lie.
    let sent = plan.main.iter().all(|lie| stream.write_all(lie).is_ok());
    if sent
        && !plan.after_resumed.is_empty()
        && let Some(urgent) = urgent.as_mut()
        && wait_for_resumed(&mut stream)?
    {
        let _ = plan.after_resumed.iter().all(|lie| urgent.write_all(lie).is_ok());
    }
    print_errors(&read_until_closed(&mut stream));
    Ok(())
}

/// Opens the urgent-page channel of a one-channel migration (index 1).
fn open_urgent_channel(addr: &str) -> Result<TcpStream, String> {
    let mut urgent = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    urgent.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let hello = ChannelHello {
        session: SESSION,
        index: 1,
        channels: 1,
    };
    urgent
        .write_all(&frame(&Message::ChannelHello(hello)))
        .map_err(|e| e.to_string())?;
    read_message(&mut urgent, |m| match m {
        Message::ChannelAccepted => Ok(()),
        other => Err(format!("wanted the urgent-page channel accepted, got {other:?}")),
    })?;
    Ok(urgent)
}

/// Reads the main connection until the destination says its guest runs
/// (true), skipping the page requests its guest makes; false if it hangs up
/// first (an error it sends is printed).
fn wait_for_resumed(stream: &mut TcpStream) -> Result<bool, String> {
    loop {
        let Ok(bytes) = read_frame(stream) else {
            return Ok(false);
        };
        let (message, _) = decode_frame(&bytes).map_err(|e| e.to_string())?;
        match message {
            Message::Resumed => return Ok(true),
            Message::PageRequest(_) => {}
            Message::Error(err) => {
                println!("told: {}", err.message);
                return Ok(false);
            }
            other => return Err(format!("wanted resumed, got {other:?}")),
        }
    }
}

/// Prints, as `told: MESSAGE`, every error among the frames in `bytes`.
fn print_errors(bytes: &[u8]) {
    let mut rest = bytes;
    while let Ok((message, used)) = decode_frame(rest) {
        if let Message::Error(err) = message {
            println!("told: {}", err.message);
        }
        rest = &rest[used..];
    }
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

/// Answers one source's handshake as a destination that agrees postcopy,
/// takes its extra channels, and asks for the pages of `lie`: at once, or
/// once the source switched to postcopy and it said its guest runs.
fn postcopy_destination(lie: &str) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    eprintln!("listening on {}", listener.local_addr().map_err(|e| e.to_string())?);
    let (mut main, _) = listener.accept().map_err(|e| e.to_string())?;
    main.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let hello = read_message(&mut main, |m| match m {
        Message::Hello(hello) => Ok(hello),
        other => Err(format!("wanted a hello, got {other:?}")),
    })?;
    let features = hello.features.intersect(Features::ZERO_PAGES.union(Features::POSTCOPY));
    let reply = Message::HelloReply(HelloReply {
        version: PROTOCOL_VERSION,
        features,
        session: hello.session,
        channels: hello.channels,
    });
    main.write_all(&frame(&reply)).map_err(|e| e.to_string())?;
    let blocks = read_message(&mut main, |m| match m {
        Message::BlockList(blocks) => Ok(blocks),
        other => Err(format!("wanted a block list, got {other:?}")),
    })?;
    main.write_all(&frame(&Message::BlocksAccepted))
        .map_err(|e| e.to_string())?;
    // The source now opens its data channels and, postcopy agreed, the
    // urgent-page channel; they are taken (and drained) beside this thread.
    let extra = usize::from(hello.channels) - 1 + usize::from(features.contains(Features::POSTCOPY));
    std::thread::spawn(move || accept_channels(listener, extra));
    let block_pages = blocks.blocks[0].pages();
    let asking = postcopy_asking(lie, block_pages).ok_or_else(|| format!("no postcopy lie {lie:?}"))?;
    if asking.when == Asked::AfterResumed {
        // The switch: postcopy-start, discards, `pausing` (answered: the
        // source pauses once told this side is prepared), device state, GO.
        loop {
            match read_message(&mut main, |m| Ok(m.kind()))? {
                MessageKind::Go => break,
                MessageKind::Pausing => main.write_all(&frame(&Message::Prepared)).map_err(|e| e.to_string())?,
                _ => {}
            }
        }
        main.write_all(&frame(&Message::Resumed)).map_err(|e| e.to_string())?;
    }
    // The source streams pages on the main connection too: take them
    // meanwhile, or neither side could write.
    let reader = drain(main.try_clone().map_err(|e| e.to_string())?);
    let mut asked = Vec::with_capacity(asking.requests.len() * (FRAME_HEADER_LEN + 16));
    for request in asking.requests {
        Message::PageRequest(request).encode(&mut asked);
    }
    // The source may hang up at the first bad request.
    let _ = main.write_all(&asked);
    if asking.then_vanish {
        let _ = main.shutdown(Shutdown::Write);
    }
    // The source hangs up: after failing, or after finding this side gone.
    reader.join().map_err(|_| "the reader panicked".to_string())?;
    Ok(())
}

/// Takes `count` extra channels of one migration (whatever their index)
/// and drains each on a thread of its own; then stops listening, so that a
/// source trying to resume a lost link finds nobody.
fn accept_channels(listener: TcpListener, count: usize) {
    for _ in 0..count {
        let Ok((mut channel, _)) = listener.accept() else {
            return;
        };
        if channel.set_read_timeout(Some(WAIT)).is_err() {
            return;
        }
        let joined = read_message(&mut channel, |m| match m {
            Message::ChannelHello(_) => Ok(()),
            other => Err(format!("wanted a channel hello, got {other:?}")),
        });
        if joined.is_err() || channel.write_all(&frame(&Message::ChannelAccepted)).is_err() {
            return;
        }
        drain(channel);
    }
}

/// Reads `stream` on a thread of its own, throwing the bytes away, until
/// the peer hangs up or goes quiet for the stream's read timeout.
fn drain(mut stream: TcpStream) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args[..] {
        ["source", addr, lie] => match source_lie(lie)
            .map(SourcePlan::precopy)
            .or_else(|| postcopy_source_plan(lie))
        {
            Some(plan) => source(addr, &plan),
            None => Err(format!("no source lie {lie:?} (see `malicious-peer list`)")),
        },
        ["destination", lie] => match destination_lie(lie) {
            Some(message) => destination(&message),
            None if POSTCOPY_DESTINATION_LIES.contains(&lie) => postcopy_destination(lie),
            None => Err(format!("no destination lie {lie:?} (see `malicious-peer list`)")),
        },
        ["list"] => {
            let sources = SOURCE_LIES.iter().chain(POSTCOPY_SOURCE_LIES);
            sources.for_each(|lie| println!("source {lie}"));
            let destinations = DESTINATION_LIES.iter().chain(POSTCOPY_DESTINATION_LIES);
            destinations.for_each(|lie| println!("destination {lie}"));
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
