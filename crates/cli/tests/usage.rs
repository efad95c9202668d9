//! The command line itself: usage errors, help, and the exit codes scripts
//! rely on. (Also makes `cargo test` build the `migrate-cli` binary that the
//! end-to-end tests in `tests/` spawn.)

use std::process::Command;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_migrate-cli"))
}

#[test]
fn send_without_destination_is_a_usage_error() {
    let out = cli().args(["send", "--mem-size", "1M"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--to"));
}

#[test]
fn bad_size_is_a_usage_error() {
    let out = cli()
        .args(["send", "--to", "127.0.0.1:1", "--mem-size", "12Q"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("suffix"));
}

#[test]
fn mem_file_and_mem_size_conflict() {
    let out = cli()
        .args([
            "send",
            "--to",
            "127.0.0.1:1",
            "--mem-size",
            "1M",
            "--mem-file",
            "/nonexistent",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_lists_the_commands() {
    let out = cli().arg("--help").output().expect("runs");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["send", "recv", "demo"] {
        assert!(text.contains(command), "{command} missing from help");
    }
}

#[test]
fn unreachable_destination_fails_safely_with_json() {
    // A port nobody listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let out = cli()
        .args([
            "send",
            "--to",
            &format!("127.0.0.1:{port}"),
            "--mem-size",
            "1M",
            "--connect-timeout",
            "200ms",
            "--json",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["status"], "failed");
    assert_eq!(report["source_resumed"], true);
    assert!(report["error"].as_str().expect("error text").contains("connecting"));
}
