//! Several channels: pages fan out over parallel connections, the
//! destination's `--channels` is a limit, and connections that do not
//! belong to the migration are refused while it goes on.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};

use migration_tests::{
    MIGRATION_WAIT, WAIT, assert_pair_completed, error_text, field, lock, num, spawn_recv, spawn_send,
};
use migration_wire::frame::decode_frame;
use migration_wire::{
    Block, BlockList, ChannelHello, ErrorCode, Features, Hello, Message, PROTOCOL_VERSION, SessionId,
};

#[test]
fn four_channels_carry_pages_and_verify() {
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--json"]);
    let send = spawn_send(
        addr,
        &["--mem-size", "64M", "--dirty-rate", "16M", "--channels", "4", "--json"],
    );
    let (send_json, _recv_json) = assert_pair_completed(send, recv);
    assert_eq!(field(&send_json, "channels"), 4, "{send_json:#}");
    let per_channel = field(&send_json, "channel_bytes")
        .as_array()
        .unwrap_or_else(|| panic!("channel_bytes is an array: {send_json:#}"));
    assert_eq!(per_channel.len(), 4, "{send_json:#}");
    // Every channel carried a fair share of 64 MiB of pages.
    for bytes in per_channel {
        let bytes = bytes.as_u64().expect("a number");
        assert!(bytes > 8 << 20, "a channel carried only {bytes} bytes: {send_json:#}");
    }
}

#[test]
fn more_channels_than_the_destination_allows_fails_naming_both() {
    let _lock = lock();
    let (mut recv, addr) = spawn_recv(&["--channels", "2", "--json"]);
    let send = spawn_send(addr, &["--mem-size", "16M", "--channels", "4", "--json"]);
    let out = send.wait(MIGRATION_WAIT);
    assert_eq!(out.code, Some(1), "send fails safely\n{}", out.describe());
    let json = out.json();
    let error = error_text(&json);
    assert!(
        error.contains('4') && error.contains('2') && error.contains("channels"),
        "the error names both channel counts: {json:#}"
    );
    assert_eq!(field(&json, "source_resumed"), true, "{json:#}");
    recv.wait_stderr_prefix("refused connection from ");
    let _ = recv.kill();
}

fn frame(message: &Message<'_>) -> Vec<u8> {
    let mut bytes = Vec::new();
    message.encode(&mut bytes);
    bytes
}

/// Reads one frame (bounded by [`WAIT`]).
fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if decode_frame(&bytes).is_ok() {
            return bytes;
        }
        match stream.read(&mut buf) {
            Ok(0) => return bytes,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return bytes,
            Err(e) => panic!("no frame from recv: {e}"),
        }
    }
}

fn extra(addr: SocketAddr, session: u64, index: u16) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .write_all(&frame(&Message::ChannelHello(ChannelHello {
            session: SessionId(session),
            index,
            channels: 3,
        })))
        .expect("write");
    let reply = read_frame(&mut stream);
    (stream, reply)
}

fn is_error(reply: &[u8]) -> bool {
    matches!(decode_frame(reply), Ok((Message::Error(err), _)) if err.code == ErrorCode::Protocol)
}

#[test]
fn stray_and_duplicate_channels_are_refused_while_the_migration_waits() {
    let _lock = lock();
    let (mut recv, addr) = spawn_recv(&["--json"]);
    let session = 0x5e55_1011;
    let mut main = TcpStream::connect(addr).expect("connect");
    main.write_all(&frame(&Message::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        // Not postcopy: its urgent-page channel would be a fourth.
        features: Features(Features::KNOWN.0 & !Features::POSTCOPY.0),
        session: SessionId(session),
        channels: 3,
    })))
    .expect("hello");
    assert!(
        matches!(decode_frame(&read_frame(&mut main)), Ok((Message::HelloReply(r), _)) if r.channels == 3),
        "hello accepted with 3 channels"
    );
    main.write_all(&frame(&Message::BlockList(BlockList {
        blocks: vec![Block {
            name: "ram".into(),
            length: 1 << 20,
            page_size: 4096,
        }],
    })))
    .expect("block list");
    assert!(
        matches!(decode_frame(&read_frame(&mut main)), Ok((Message::BlocksAccepted, _))),
        "blocks accepted"
    );

    // Another session's channel: refused, and said so.
    let (_foreign, reply) = extra(addr, session + 1, 1);
    assert!(is_error(&reply), "a foreign session is refused: {reply:02x?}");
    let refused = recv.wait_stderr_prefix("refused connection from ");
    assert!(refused.contains("session"), "{refused}");
    // Channel 1 joins; channel 1 again is refused as a duplicate.
    let (_one, reply) = extra(addr, session, 1);
    assert!(
        matches!(decode_frame(&reply), Ok((Message::ChannelAccepted, _))),
        "channel 1 joins"
    );
    let (_again, reply) = extra(addr, session, 1);
    assert!(is_error(&reply), "a duplicate index is refused: {reply:02x?}");
    let refused = recv.wait_stderr_prefix("refused connection from ");
    assert!(refused.contains("twice"), "{refused}");
    let (_two, reply) = extra(addr, session, 2);
    assert!(
        matches!(decode_frame(&reply), Ok((Message::ChannelAccepted, _))),
        "channel 2 joins"
    );

    // The source gives up: the destination discards and says why.
    main.write_all(&frame(&Message::Abort("test over".into())))
        .expect("abort");
    let out = recv.wait(MIGRATION_WAIT);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    let json = out.json();
    assert_eq!(field(&json, "status"), "failed", "{json:#}");
    assert!(error_text(&json).contains("test over"), "{json:#}");
}

#[test]
fn plain_system_calls_work_as_well_as_io_uring() {
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--io", "plain", "--json"]);
    let send = spawn_send(
        addr,
        &[
            "--mem-size",
            "32M",
            "--dirty-rate",
            "8M",
            "--channels",
            "3",
            "--io",
            "plain",
            "--json",
        ],
    );
    let (send_json, _) = assert_pair_completed(send, recv);
    assert_eq!(field(&send_json, "channels"), 3, "{send_json:#}");
}

#[test]
fn one_channel_still_works() {
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--json"]);
    let send = spawn_send(
        addr,
        &["--mem-size", "32M", "--dirty-rate", "8M", "--channels", "1", "--json"],
    );
    let (send_json, _) = assert_pair_completed(send, recv);
    assert_eq!(field(&send_json, "channels"), 1, "{send_json:#}");
}

#[test]
fn one_channel_dropping_fails_cleanly_and_the_source_runs_on() {
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--json"]);
    // Connection 1 is the first extra channel: cut it 2 MiB into the bulk pass.
    let proxy = migration_tests::CutProxy::start(addr, 1, 2 << 20);
    let send = spawn_send(
        proxy.addr,
        &[
            "--mem-size",
            "64M",
            "--dirty-rate",
            "16M",
            "--max-bandwidth",
            "16M",
            "--channels",
            "2",
            "--json",
        ],
    );
    let out = send.wait(MIGRATION_WAIT);
    assert!(
        proxy.cut.load(std::sync::atomic::Ordering::SeqCst),
        "the proxy cut the channel"
    );
    let json = migration_tests::assert_send_failed_resumed(&out);
    assert!(num(&json, "writes_after_resume") > 0, "the guest runs on: {json:#}");
    let recv_out = recv.wait(MIGRATION_WAIT);
    assert_eq!(recv_out.code, Some(1), "{}", recv_out.describe());
    let recv_json = recv_out.json();
    assert_eq!(field(&recv_json, "status"), "failed", "{recv_json:#}");
}
