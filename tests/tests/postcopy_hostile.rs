//! Hostile peers in postcopy, played by the suite's `malicious-peer`
//! binary (`src/bin/malicious-peer.rs`, the `postcopy-*` lies).
//!
//! Before GO the source owns the VM: a lie found then costs nothing but the
//! migration. The destination refuses it by name and never runs its guest
//! (exit 1); the source resumes its guest (exit 1). After GO the guest runs
//! on the destination with part of its memory and the rest is on the
//! source: a lie found then loses the VM's state, and the side that finds it
//! says so and why (exit 5). Either way nothing crashes: every exit is a
//! code, never a signal, and memory stays bounded.

use std::path::Path;

use migration_tests::{MIGRATION_WAIT, Output, Proc, error_text, field, lock, num, spawn_send};
use migration_wire::MAX_PAGES_PER_BATCH;

/// Runs the suite's malicious peer with `args`.
fn malicious_peer(args: &[&str]) -> Proc {
    Proc::spawn_program(Path::new(env!("CARGO_BIN_EXE_malicious-peer")), args[0], args, None)
}

/// Checks that the peer knows `lies` as lies of `role`.
fn assert_listed(role: &str, lies: &[&str]) {
    let listed = malicious_peer(&["list"]).wait(MIGRATION_WAIT).stdout;
    for lie in lies {
        assert!(
            listed.contains(&format!("{role} {lie}\n")),
            "{lie} is a {role} lie the peer knows: {listed}"
        );
    }
}

/// Checks that `out` ended with `code` (not a signal), reporting a failure
/// whose error names every one of `problem` (lower case).
fn assert_failed_naming(what: &str, out: &Output, code: i32, problem: &[&str]) -> serde_json::Value {
    assert_eq!(out.code, Some(code), "{what}: exit code\n{}", out.describe());
    let json = out.json();
    assert_eq!(field(&json, "status"), "failed", "{what}: {json:#}");
    let error = error_text(&json);
    for part in problem {
        assert!(error.contains(part), "{what}: wanted {part:?} in the error: {json:#}");
    }
    json
}

#[test]
fn a_lying_postcopy_source_is_refused_by_name() {
    let _lock = lock();
    // (lie, exit code, what the destination's error names, whether its
    // guest ran). The first two are found before GO: the guest never runs.
    // The last is a proper switch (with a device state the guest loads),
    // then a page past its block once the guest runs.
    let cases: [(&str, i32, &[&str], bool); 3] = [
        ("postcopy-not-agreed", 1, &["did not agree"], false),
        (
            "postcopy-discard-past-the-block",
            1,
            &["discard of pages 16..24 of block low of 16 pages"],
            false,
        ),
        (
            "postcopy-page-past-the-block",
            5,
            &["vm state lost", "page 16 is outside block low of 16 pages"],
            true,
        ),
    ];
    assert_listed("source", &cases.map(|(lie, ..)| lie));
    for (lie, code, problem, guest_ran) in cases {
        // Guard pages around every block: a write outside the announced
        // RAM would kill the destination with SIGSEGV, not end in a report.
        let (recv, addr) = migration_tests::spawn_hardened_recv(&["--io-timeout", "10s"]);
        let peer = malicious_peer(&["source", &addr.to_string(), lie]).wait(MIGRATION_WAIT);
        assert_eq!(peer.code, Some(0), "{lie}: the peer ran its lie\n{}", peer.describe());
        let out = recv.wait(MIGRATION_WAIT);
        let json = assert_failed_naming(lie, &out, code, problem);
        assert_eq!(
            out.stderr_has("recv: guest running"),
            guest_ran,
            "{lie}: whether the guest ran\n{}",
            out.describe()
        );
        if !guest_ran {
            assert!(field(&json, "guest_check").is_null(), "{lie}: no guest ran: {json:#}");
            assert!(!error_text(&json).contains("vm state lost"), "{lie}: {json:#}");
        }
        // What the source was told names the lie, before GO and after (a
        // destination that loses the VM state says why before it hangs up).
        let told: Vec<&str> = peer.stdout.lines().filter_map(|l| l.strip_prefix("told: ")).collect();
        let named = problem.last().expect("a problem to name");
        assert!(
            told.iter().any(|t| t.to_lowercase().contains(named)),
            "{lie}: what the source was told names the lie: {told:?}"
        );
        // The guest RAM is 128 KiB.
        let peak = num(&json, "peak_resident_bytes");
        assert!(peak < 64 << 20, "{lie}: the destination grew to {peak} bytes resident");
    }
}

#[test]
fn a_lying_postcopy_destination_is_caught_by_name() {
    let _lock = lock();
    let postcopy_at_once: &[&str] = &["--postcopy", "--postcopy-after", "0"];
    let too_many = format!(
        "asked for {} pages from page 0 of block 0 of 8192 pages (outside it, or more than {MAX_PAGES_PER_BATCH} at once)",
        MAX_PAGES_PER_BATCH + 1
    );
    // (lie, extra `send` arguments, exit code, what the source's error names).
    let cases: [(&str, &[&str], i32, &[&str]); 4] = [
        // Postcopy is agreed (the urgent-page channel is open, requests have
        // a route), but `--postcopy` without `--postcopy-after 0` switches
        // no earlier than after a pass, which the peer never acknowledges:
        // the source is in precopy when the request comes, which makes it a
        // lie about the phase, not about the feature.
        (
            "postcopy-request-before-the-switch",
            &["--postcopy"],
            1,
            &["unexpected page-request"],
        ),
        (
            "postcopy-request-past-the-block",
            postcopy_at_once,
            5,
            &["vm state lost", "of block 0 of 8192 pages (outside it"],
        ),
        (
            "postcopy-request-no-such-block",
            postcopy_at_once,
            5,
            &["vm state lost", "block 99, but there are 2 blocks"],
        ),
        (
            "postcopy-request-too-many-pages",
            postcopy_at_once,
            5,
            &["vm state lost", &too_many],
        ),
    ];
    assert_listed("destination", &cases.map(|(lie, ..)| lie));
    for (lie, postcopy, code, problem) in cases {
        let mut peer = malicious_peer(&["destination", lie]);
        let addr = peer.wait_listening();
        let mut args = vec!["--mem-size", "64M", "--channels", "1", "--json", "--io-timeout", "10s"];
        args.extend_from_slice(postcopy);
        let out = spawn_send(addr, &args).wait(MIGRATION_WAIT);
        let json = assert_failed_naming(lie, &out, code, problem);
        // Before GO the source runs its guest again; after GO it must not.
        let resumed = code == 1;
        assert_eq!(field(&json, "source_resumed"), resumed, "{lie}: {json:#}");
        if resumed {
            migration_tests::assert_send_failed_resumed(&out);
        }
        let peer = peer.wait(MIGRATION_WAIT);
        assert_eq!(peer.code, Some(0), "{lie}: the peer ran its lie\n{}", peer.describe());
    }
}

#[test]
fn a_flood_of_page_requests_is_served_in_bounded_memory_until_the_destination_vanishes() {
    let _lock = lock();
    assert_listed("destination", &["postcopy-request-flood"]);
    let mut peer = malicious_peer(&["destination", "postcopy-request-flood"]);
    let addr = peer.wait_listening();
    // The peer asks for 200 000 pages (about 800 MB of answers), then hangs
    // up and stops listening: a link the source cannot resume. One re-dial
    // lasts up to --connect-timeout (10 s by default) even past
    // --resume-timeout, so the first is kept below the second.
    let out = spawn_send(
        addr,
        &[
            "--mem-size",
            "64M",
            "--channels",
            "2",
            "--postcopy",
            "--postcopy-after",
            "0",
            "--resume-timeout",
            "2s",
            "--connect-timeout",
            "1s",
            "--json",
        ],
    )
    .wait(MIGRATION_WAIT);
    let json = assert_failed_naming("flood", &out, 5, &["vm state lost", "could not be resumed within 2s"]);
    assert_eq!(field(&json, "source_resumed"), false, "{json:#}");
    // It answered requests at the pace of its urgent-page channel (the
    // return path waits on a bounded queue) rather than pile them up: its
    // memory is its guest's and little more.
    let requested = num(field(&json, "postcopy"), "requested_pages");
    assert!(
        (1..=200_000).contains(&requested),
        "served {requested} pages of 200 000 asked for: {json:#}"
    );
    let peak = num(&json, "peak_resident_bytes");
    assert!(
        peak < (64 << 20) + (64 << 20),
        "the source grew to {peak} bytes resident for a 64 MiB guest: {json:#}"
    );
    let peer = peer.wait(MIGRATION_WAIT);
    assert_eq!(peer.code, Some(0), "the peer ran its flood\n{}", peer.describe());
}
