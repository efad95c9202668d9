//! Migrations that must fail safely: the source resumes, the destination
//! never reports a completed migration.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;

use migration_tests::{
    MIGRATION_WAIT, WAIT, assert_pair_completed, assert_recv_not_completed, assert_send_failed_resumed, error_text,
    field, garbage, lock, num, run, spawn_recv, spawn_send,
};

#[test]
fn non_converging_guest_fails_when_told_and_source_resumes() {
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--json"]);
    let send = spawn_send(
        addr,
        &[
            "--mem-size",
            "64M",
            "--dirty-rate",
            "256M",
            "--max-bandwidth",
            "32M",
            "--max-iterations",
            "3",
            "--downtime-ms",
            "1",
            "--on-limit",
            "fail",
            "--json",
        ],
    );
    let send_out = send.wait(MIGRATION_WAIT);
    let json = assert_send_failed_resumed(&send_out);
    assert!(
        error_text(&json).contains("converge"),
        "error should say the guest did not converge: {json:#}"
    );
    assert!(
        num(&json, "iterations") >= 3,
        "failed only at --max-iterations: {json:#}"
    );
    // The destination either failed on its own or is still waiting: it must
    // not have completed. Kill it now (a no-op if it already exited).
    let recv_out = recv.kill();
    assert_recv_not_completed(&recv_out);
}

#[test]
fn receiver_killed_mid_transfer_source_resumes() {
    let _lock = lock();
    let (mut recv, addr) = spawn_recv(&[]);
    let send = spawn_send(
        addr,
        &[
            "--mem-size",
            "64M",
            "--dirty-rate",
            "64M",
            "--max-bandwidth",
            "16M",
            "--json",
        ],
    );
    let progress = recv.wait_stderr_prefix("progress ");
    assert!(
        progress.len() > "progress ".len(),
        "progress line has content: {progress:?}"
    );
    let recv_out = recv.kill();
    assert_eq!(
        recv_out.code,
        None,
        "recv was killed by the signal\n{}",
        recv_out.describe()
    );

    let send_out = send.wait(MIGRATION_WAIT);
    let json = assert_send_failed_resumed(&send_out);
    let writes = field(&json, "writes_after_resume")
        .as_u64()
        .unwrap_or_else(|| panic!("writes_after_resume not a number: {json:#}"));
    assert!(writes > 0, "the resumed guest kept writing: {json:#}");
}

#[test]
fn oversize_block_list_is_refused_and_recv_keeps_listening() {
    let _lock = lock();
    let (mut recv, addr) = spawn_recv(&["--max-mem", "16M", "--json"]);
    let send = spawn_send(addr, &["--mem-size", "64M", "--json"]);
    let send_out = send.wait(MIGRATION_WAIT);
    let json = assert_send_failed_resumed(&send_out);
    let error = error_text(&json);
    assert!(
        error.contains("limit") || error.contains("max-mem") || error.contains("max_mem"),
        "error should name the destination's memory limit: {json:#}"
    );
    let refused = recv.wait_stderr_prefix("refused connection from ");
    assert!(
        refused.contains("127.0.0.1:"),
        "refused line names the peer: {refused:?}"
    );

    // Still listening: a migration that fits completes.
    let send = spawn_send(addr, &["--mem-size", "16M", "--json"]);
    let (_send_json, recv_json) = assert_pair_completed(send, recv);
    assert_eq!(num(&recv_json, "ram_bytes"), 16 << 20, "{recv_json:#}");
}

/// Accepts one connection on `listener` (bounded by [`WAIT`]).
fn accept_one(listener: TcpListener, send: &migration_tests::Proc) -> TcpStream {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept().map(|(stream, _)| stream));
    });
    match rx.recv_timeout(WAIT) {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => panic!("accept: {e}"),
        Err(_) => panic!(
            "send did not connect within {WAIT:?}\n--- stderr ---\n{}",
            send.stderr_so_far().join("\n")
        ),
    }
}

#[test]
fn garbage_from_receiver_fails_send_and_source_resumes() {
    let _lock = lock();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let send = spawn_send(addr, &["--mem-size", "16M", "--io-timeout", "30s", "--json"]);
    let mut stream = accept_one(listener, &send);
    // Garbage that cannot be a frame header; the connection stays open, so
    // send must reject the bytes, not an EOF or a timeout.
    let _ = stream.write_all(&garbage(64, 0x5eed_0001));
    let out = send.wait(MIGRATION_WAIT);
    let json = assert_send_failed_resumed(&out);
    let error = error_text(&json);
    assert!(
        !["timed out", "timeout", "silent"].iter().any(|w| error.contains(w)),
        "garbage must be rejected as garbage, not by the timeout: {json:#}"
    );
    drop(stream);
}

#[test]
fn silent_receiver_times_out_and_source_resumes() {
    let _lock = lock();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let send = spawn_send(addr, &["--mem-size", "16M", "--io-timeout", "1s", "--json"]);
    let stream = accept_one(listener, &send);
    let out = send.wait(WAIT);
    let json = assert_send_failed_resumed(&out);
    let error = error_text(&json);
    assert!(
        ["timed out", "timeout", "time out", "silent"]
            .iter()
            .any(|w| error.contains(w)),
        "error should be a timeout: {json:#}"
    );
    drop(stream);
}

#[test]
fn send_without_to_is_a_usage_error() {
    let _lock = lock();
    let out = run(&["send", "--mem-size", "16M"]);
    assert_eq!(out.code, Some(2), "usage error exit code\n{}", out.describe());
    assert!(
        out.stderr.iter().any(|l| l.contains("--to")),
        "the usage error names the missing flag\n{}",
        out.describe()
    );
    let out = run(&["send", "--to", "127.0.0.1:9", "--mem-size", "16Q"]);
    assert_eq!(out.code, Some(2), "a bad size is a usage error\n{}", out.describe());
}

#[test]
fn interrupted_sender_cancels_resumes_and_destination_discards() {
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--json"]);
    let mut send = spawn_send(
        addr,
        &[
            "--mem-size",
            "64M",
            "--dirty-rate",
            "32M",
            "--max-bandwidth",
            "8M",
            "--json",
        ],
    );
    // Interrupt once pages flow, as an operator pressing Ctrl-C would.
    send.wait_stderr_prefix("progress ");
    let rc = unsafe_free_kill(send.pid(), libc::SIGINT);
    assert_eq!(rc, 0, "sending SIGINT");
    let send_out = send.wait(MIGRATION_WAIT);
    assert_eq!(
        send_out.code,
        Some(1),
        "cancelled send exits 1\n{}",
        send_out.describe()
    );
    let json = send_out.json();
    assert_eq!(field(&json, "status"), "cancelled", "{json:#}");
    assert_eq!(field(&json, "source_resumed"), true, "{json:#}");
    assert!(num(&json, "writes_after_resume") > 0, "the guest runs again: {json:#}");
    // The destination was told to discard and says why.
    let recv_out = recv.wait(MIGRATION_WAIT);
    assert_recv_not_completed(&recv_out);
    let recv_json = recv_out.json();
    assert!(
        error_text(&recv_json).contains("abort"),
        "destination names the source's abort: {recv_json:#}"
    );
}

/// Sends `signal` to `pid` through the `kill` command, keeping this crate
/// free of `unsafe`.
fn unsafe_free_kill(pid: u32, signal: i32) -> i32 {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("running kill");
    status.code().unwrap_or(-1)
}
