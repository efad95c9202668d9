//! Foreign peers connecting to `recv`: refused with a reason, and the
//! receiver keeps waiting for a real migration.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use migration_tests::{WAIT, assert_pair_completed, garbage, lock, num, spawn_recv, spawn_send};
use migration_wire::frame::decode_frame;
use migration_wire::{ErrorCode, Features, Hello, Message, SessionId};

/// Connects to `addr`, writes `bytes`, and reads until the receiver closes
/// (bounded by [`WAIT`]). A reset counts as a close. Returns our local
/// address and what the receiver sent.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> (SocketAddr, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("connect to recv");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let local = stream.local_addr().expect("local addr");
    stream.write_all(bytes).expect("write to recv");
    let reply = migration_tests::read_until_closed(&mut stream);
    (local, reply)
}

/// A real migration through `addr` completes on both sides.
fn real_migration_completes(recv: migration_tests::Proc, addr: SocketAddr) {
    let send = spawn_send(addr, &["--mem-size", "16M", "--json"]);
    let (_send_json, recv_json) = assert_pair_completed(send, recv);
    assert_eq!(num(&recv_json, "ram_bytes"), 16 << 20, "{recv_json:#}");
}

#[test]
fn garbage_peer_is_refused_and_recv_still_serves() {
    let _lock = lock();
    let (mut recv, addr) = spawn_recv(&["--json"]);
    let (local, _reply) = exchange(addr, &garbage(64, 0x5eed_0007));
    let refused = recv.wait_stderr_prefix("refused connection from ");
    assert!(
        refused.contains(&local.to_string()),
        "refused line names the peer {local}: {refused:?}"
    );
    assert!(
        refused.len() > "refused connection from ".len() + local.to_string().len() + 1,
        "refused line gives a reason: {refused:?}"
    );
    real_migration_completes(recv, addr);
}

#[test]
fn version_mismatch_is_refused_with_a_version_error() {
    let _lock = lock();
    let (mut recv, addr) = spawn_recv(&["--json"]);
    let hello = Message::Hello(Hello {
        min_version: 99,
        max_version: 99,
        features: Features::KNOWN,
        session: SessionId(0x7e57_0099),
        channels: 1,
    });
    let mut bytes = Vec::new();
    hello.encode(&mut bytes);
    let (local, reply) = exchange(addr, &bytes);
    let (message, _len) =
        decode_frame(&reply).unwrap_or_else(|e| panic!("recv's reply is not a frame ({e}): {reply:02x?}"));
    match message {
        Message::Error(err) => {
            assert_eq!(err.code, ErrorCode::Version, "error code: {err:?}");
            assert!(err.message.contains("99"), "message names the peer's version: {err:?}");
        }
        other => panic!("expected an Error frame, got {other:?}"),
    }
    let refused = recv.wait_stderr_prefix("refused connection from ");
    assert!(
        refused.contains(&local.to_string()),
        "refused line names the peer {local}: {refused:?}"
    );
    real_migration_completes(recv, addr);
}
