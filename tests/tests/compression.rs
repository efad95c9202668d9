//! Compression on the channel threads: text-like pages shrink on the wire
//! and arrive intact; the destination's `--compress` is a limit.

use migration_tests::{MIGRATION_WAIT, assert_pair_completed, error_text, field, lock, num, spawn_recv, spawn_send};

fn compressed_migration(codec: &str) -> serde_json::Value {
    let (recv, addr) = spawn_recv(&["--json"]);
    let send = spawn_send(
        addr,
        &[
            "--mem-size",
            "32M",
            "--content",
            "text",
            "--dirty-rate",
            "8M",
            "--channels",
            "2",
            "--compress",
            codec,
            "--json",
        ],
    );
    let (send_json, _recv_json) = assert_pair_completed(send, recv);
    send_json
}

#[test]
fn lz4_and_zstd_shrink_text_pages_and_verify() {
    let _lock = lock();
    for codec in ["lz4", "zstd", "zstd:5"] {
        let json = compressed_migration(codec);
        let ram = num(&json, "ram_bytes");
        let wire = num(&json, "transferred_bytes");
        let saved = num(&json, "compression_saved_bytes");
        // Text-like pages compress at least 1.8x with lz4: well under the RAM size.
        assert!(
            wire < ram * 2 / 3,
            "{codec}: {wire} bytes on the wire for {ram} of RAM: {json:#}"
        );
        assert!(
            saved > ram / 3,
            "{codec}: compression saved only {saved} bytes: {json:#}"
        );
    }
}

#[test]
fn a_codec_the_destination_does_not_allow_fails_naming_both() {
    let _lock = lock();
    let (mut recv, addr) = spawn_recv(&["--compress", "none", "--json"]);
    let send = spawn_send(addr, &["--mem-size", "16M", "--compress", "lz4", "--json"]);
    let out = send.wait(MIGRATION_WAIT);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    let json = out.json();
    let error = error_text(&json);
    assert!(
        error.contains("lz4") && error.contains("none") && error.contains("compress"),
        "the error names both sides' compression: {json:#}"
    );
    assert_eq!(field(&json, "source_resumed"), true, "{json:#}");
    recv.wait_stderr_prefix("refused connection from ");
    let _ = recv.kill();
}
