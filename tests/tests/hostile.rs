//! Hostile peers, played by the suite's `malicious-peer` binary
//! (`src/bin/malicious-peer.rs`): after a proper handshake it sends frames
//! that are well formed on the wire (right checksums) but lie.
//!
//! A lying source: the destination refuses each lie with a protocol error
//! that names it, never completes, never runs a guest, writes nothing
//! outside the announced RAM (every block sits between inaccessible pages,
//! `--guard-pages`), and stays small: it runs with 1 GiB of address space,
//! far less than the lies claim, and reports its peak resident memory.
//!
//! A lying destination: the source refuses each lie by name and resumes
//! its guest.

use std::path::Path;

use migration_tests::{MIGRATION_WAIT, Proc, field, lock};

/// Runs the suite's malicious peer with `args`.
fn malicious_peer(args: &[&str]) -> Proc {
    Proc::spawn_program(Path::new(env!("CARGO_BIN_EXE_malicious-peer")), args[0], args, None)
}

#[test]
fn every_lie_is_refused_by_name_and_nothing_runs() {
    let _lock = lock();
    let cases = [
        ("page-past-the-block", "outside block"),
        ("no-such-block", "blocks were announced"),
        ("a-million-pages", "exceeds the limit"),
        ("a-4-gib-frame", "exceeds the limit"),
        ("a-page-twice", "indices must increase"),
        ("pages-out-of-order", "indices must increase"),
        ("a-later-epoch-first", "epoch"),
        ("a-marker-that-miscounts", "counts 9 pages"),
        ("end-of-ram-with-pages-missing", "never"),
        ("a-second-block-list", "unexpected"),
        ("the-destinations-own-message", "unexpected"),
    ];
    let listed = malicious_peer(&["list"]).wait(MIGRATION_WAIT).stdout;
    for (lie, _) in &cases {
        assert!(
            listed.contains(&format!("source {lie}\n")),
            "{lie} is a lie the peer knows: {listed}"
        );
    }
    for (lie, problem) in cases {
        let (recv, addr) = migration_tests::spawn_hardened_recv(&[]);
        let peer = malicious_peer(&["source", &addr.to_string(), lie]).wait(MIGRATION_WAIT);
        assert_eq!(peer.code, Some(0), "{lie}: the peer ran its lie\n{}", peer.describe());
        let out = recv.wait(MIGRATION_WAIT);
        // Exit 1 with a report: not a crash (a write into a guard page
        // would have killed it with SIGSEGV).
        assert_eq!(
            out.code,
            Some(1),
            "{lie}: the destination fails cleanly\n{}",
            out.describe()
        );
        let json = out.json();
        assert_eq!(field(&json, "status"), "failed", "{lie}: {json:#}");
        assert!(field(&json, "guest_check").is_null(), "{lie}: no guest ran: {json:#}");
        let error = migration_tests::error_text(&json);
        assert!(
            error.contains(&problem.to_lowercase()),
            "{lie}: wanted {problem:?} in the destination's error: {json:#}"
        );
        let told: Vec<&str> = peer.stdout.lines().filter_map(|l| l.strip_prefix("told: ")).collect();
        assert!(
            told.iter().any(|t| t.to_lowercase().contains(&problem.to_lowercase())) || told.is_empty(),
            "{lie}: what the source was told names the lie: {told:?}"
        );
        // The lies claim gigabytes; the guest RAM is 128 KiB.
        let peak = field(&json, "peak_resident_bytes")
            .as_u64()
            .expect("peak resident bytes");
        assert!(peak < 64 << 20, "{lie}: the destination grew to {peak} bytes resident");
    }
}

#[test]
fn a_lying_destination_is_caught_and_the_source_resumes() {
    let _lock = lock();
    let cases = [
        ("an-ack-of-an-epoch-not-sent", "not sent yet"),
        ("ready-at-once", "before the stream ended"),
        ("resumed-before-go", "before go"),
        ("a-verdict-before-the-digests", "before the block digests"),
        ("a-sources-own-message", "unexpected"),
    ];
    for (lie, problem) in cases {
        let mut peer = malicious_peer(&["destination", lie]);
        let addr = peer.wait_listening();
        let out =
            migration_tests::spawn_send(addr, &["--mem-size", "16M", "--channels", "1", "--json"]).wait(MIGRATION_WAIT);
        let json = migration_tests::assert_send_failed_resumed(&out);
        let error = migration_tests::error_text(&json);
        assert!(error.contains(problem), "{lie}: wanted {problem:?}: {json:#}");
        let peer = peer.wait(MIGRATION_WAIT);
        assert_eq!(peer.code, Some(0), "{lie}: the peer ran its lie\n{}", peer.describe());
    }
}
