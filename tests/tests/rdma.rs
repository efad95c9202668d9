//! Live migrations over the simulated RDMA transport (`--transport
//! rdma-sim`) between real processes: over both simulated NICs, with
//! postcopy, and with every fault the NICs inject ending as the same fault
//! ends on TCP: a clean failure with the source running, or, in postcopy, a
//! resumed link.

use migration_tests::{
    MIGRATION_WAIT, assert_pair_completed, assert_recv_not_completed, assert_send_failed_resumed, error_text, field,
    lock, num, run, spawn_recv, spawn_send,
};
use serde_json::Value;

const RDMA: [&str; 2] = ["--transport", "rdma-sim"];

/// The `rdma` object of a report.
fn rdma(json: &Value) -> &Value {
    field(json, "rdma")
}

/// `recv --transport rdma-sim ARGS` and `send --transport rdma-sim` of a
/// 64 MiB guest dirtying 16 MB/s, with `send_args` on top (a flag given in
/// the arguments replaces its default).
fn migrate(recv_args: &[&str], send_args: &[&str]) -> (migration_tests::Proc, migration_tests::Proc) {
    let mut recv: Vec<&str> = RDMA.to_vec();
    recv.extend(["--json", "--run-for", "100ms"]);
    if !recv_args.contains(&"--io-timeout") {
        recv.extend(["--io-timeout", "10s"]);
    }
    recv.extend_from_slice(recv_args);
    let (recv, addr) = spawn_recv(&recv);
    let mut send: Vec<&str> = RDMA.to_vec();
    send.extend(["--mem-size", "64M", "--json", "--io-timeout", "10s"]);
    if !send_args.contains(&"--dirty-rate") {
        send.extend(["--dirty-rate", "16M"]);
    }
    send.extend_from_slice(send_args);
    (spawn_send(addr, &send), recv)
}

#[test]
fn live_migration_over_each_simulated_nic_lands_every_page_one_sided_and_verifies() {
    let _lock = lock();
    // Registered on demand (memfd), and pinned up front (tcp).
    for (nic, pin) in [("memfd", None), ("tcp", Some("--rdma-pin-all"))] {
        let mut recv_args = vec!["--rdma-nic", nic];
        recv_args.extend(pin);
        let (send, recv) = migrate(&recv_args, &["--rdma-nic", nic, "--channels", "3"]);
        let (send, recv) = assert_pair_completed(send, recv);
        assert_eq!(field(rdma(&send), "nic"), nic, "{send:#}");
        assert_eq!(field(rdma(&recv), "nic"), nic, "{recv:#}");
        assert_eq!(field(&recv, "guest_check"), "passed", "{recv:#}");
        // Every plain page went as a one-sided write, and the destination
        // checked each where it landed.
        let written = num(rdma(&send), "one_sided_bytes");
        assert_eq!(written, num(&send, "plain_pages") * 4096, "{nic}: {send:#}");
        assert!(written >= num(&send, "ram_bytes") / 2, "{nic}: {send:#}");
        assert_eq!(num(rdma(&recv), "placed_bytes"), written, "{nic}: {recv:#}");
        assert_eq!(num(rdma(&recv), "registered_bytes"), 64 << 20, "{nic}: {recv:#}");
        if nic == "tcp" {
            // The destination's NIC threads wrote them, outside the receiver.
            assert_eq!(num(rdma(&recv), "nic_bytes_written"), written, "{recv:#}");
            assert_eq!(num(rdma(&recv), "refused_writes"), 0, "{recv:#}");
        }
    }
}

#[test]
fn postcopy_runs_over_the_tcp_nic_the_default_on_one_host_with_postcopy() {
    let _lock = lock();
    // The guest outpaces a capped link: a precopy pass goes one-sided, then
    // the guest runs on the destination and the rest follows on request.
    let (send, recv) = migrate(
        &[],
        &[
            "--dirty-rate",
            "64M",
            "--max-bandwidth",
            "64M",
            "--postcopy",
            "--postcopy-after",
            "1",
        ],
    );
    let (send, recv) = assert_pair_completed(send, recv);
    assert_eq!(
        field(rdma(&recv), "nic"),
        "tcp",
        "auto picks tcp for postcopy: {recv:#}"
    );
    assert!(field(&send, "postcopy").is_object(), "switched to postcopy: {send:#}");
    assert!(num(rdma(&send), "one_sided_bytes") > 0, "{send:#}");
    assert_eq!(field(&recv, "guest_check"), "passed", "{recv:#}");
}

#[test]
fn delayed_and_reordered_completions_still_complete_verified() {
    let _lock = lock();
    for nic in ["memfd", "tcp"] {
        let (send, recv) = migrate(
            &["--rdma-nic", nic],
            &["--rdma-faults", "seed=5,delay=0.3,reorder=0.5", "--channels", "3"],
        );
        let (send, _) = assert_pair_completed(send, recv);
        let faults = field(rdma(&send), "faults");
        assert!(num(faults, "delayed_completions") > 0, "{nic}: {send:#}");
        assert_eq!(
            num(faults, "qp_errors") + num(faults, "link_drops"),
            0,
            "{nic}: {send:#}"
        );
    }
}

#[test]
fn a_queue_pair_error_or_a_dropped_link_in_precopy_fails_cleanly_with_the_source_running() {
    let _lock = lock();
    for nic in ["memfd", "tcp"] {
        for (fault, counter) in [("qp-error=1@5", "qp_errors"), ("drop-link=0@8", "link_drops")] {
            let (send, recv) = migrate(&["--rdma-nic", nic], &["--rdma-faults", fault]);
            let send = send.wait(MIGRATION_WAIT);
            let recv = recv.wait(MIGRATION_WAIT);
            // As when a TCP connection breaks: the source resumes and its
            // guest writes on, the destination discards.
            let json = assert_send_failed_resumed(&send);
            assert!(num(&json, "writes_after_resume") > 0, "{nic} {fault}: {json:#}");
            assert_eq!(num(field(rdma(&json), "faults"), counter), 1, "{nic} {fault}: {json:#}");
            assert_recv_not_completed(&recv);
            assert_eq!(recv.code, Some(1), "{nic} {fault}\n{}", recv.describe());
        }
    }
}

#[test]
fn a_link_dropped_in_postcopy_is_resumed_and_nothing_is_lost() {
    let _lock = lock();
    // Channel 1's tenth operation is a page batch in postcopy: the guest
    // runs on the destination by then.
    let (send, recv) = migrate(
        &[],
        &["--postcopy", "--postcopy-after", "0", "--rdma-faults", "drop-link=1@10"],
    );
    let (send, recv) = assert_pair_completed(send, recv);
    assert_eq!(num(field(rdma(&send), "faults"), "link_drops"), 1, "{send:#}");
    for json in [&send, &recv] {
        assert_eq!(num(field(json, "postcopy"), "recoveries"), 1, "{json:#}");
    }
    assert_eq!(field(&recv, "guest_check"), "passed", "{recv:#}");
}

#[test]
fn mismatched_transports_and_nics_fail_cleanly_with_the_source_running() {
    let _lock = lock();
    // A destination left waiting for channels the source never opens gives
    // up after its --io-timeout.
    let quick = ["--io-timeout", "2s"];
    // A source on rdma-sim, a destination on plain TCP.
    let (recv, addr) = spawn_recv(&["--json", "--run-for", "0s", quick[0], quick[1]]);
    let send = spawn_send(addr, &["--transport", "rdma-sim", "--mem-size", "16M", "--json"]);
    let json = assert_send_failed_resumed(&send.wait(MIGRATION_WAIT));
    assert!(error_text(&json).contains("announced no registered memory"), "{json:#}");
    assert_recv_not_completed(&recv.wait(MIGRATION_WAIT));
    // The other way round.
    let (recv, addr) = spawn_recv(&[
        "--transport",
        "rdma-sim",
        "--json",
        "--run-for",
        "0s",
        quick[0],
        quick[1],
    ]);
    let send = spawn_send(addr, &["--mem-size", "16M", "--json"]);
    let json = assert_send_failed_resumed(&send.wait(MIGRATION_WAIT));
    assert!(error_text(&json).contains("transport-record"), "{json:#}");
    assert_recv_not_completed(&recv.wait(MIGRATION_WAIT));
    // A source insisting on memfd, a destination offering tcp.
    let (send, recv) = migrate(&["--rdma-nic", "tcp", quick[0], quick[1]], &["--rdma-nic", "memfd"]);
    let json = assert_send_failed_resumed(&send.wait(MIGRATION_WAIT));
    assert!(error_text(&json).contains("--rdma-nic"), "{json:#}");
    assert_recv_not_completed(&recv.wait(MIGRATION_WAIT));
    // A destination told memfd, a source that may switch to postcopy.
    let (send, recv) = migrate(&["--rdma-nic", "memfd", quick[0], quick[1]], &["--postcopy"]);
    let json = assert_send_failed_resumed(&send.wait(MIGRATION_WAIT));
    assert!(error_text(&json).contains("--rdma-nic tcp"), "{json:#}");
    assert_recv_not_completed(&recv.wait(MIGRATION_WAIT));
}

#[test]
fn flags_that_do_not_go_together_are_usage_errors() {
    for args in [
        &["send", "--to", "127.0.0.1:1", "--rdma-nic", "tcp"][..],
        &[
            "send",
            "--to",
            "127.0.0.1:1",
            "--transport",
            "rdma-sim",
            "--rdma-nic",
            "memfd",
            "--postcopy",
        ],
        &[
            "send",
            "--to",
            "127.0.0.1:1",
            "--transport",
            "rdma-sim",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--tls-ca",
            "a",
        ],
        &[
            "send",
            "--to",
            "127.0.0.1:1",
            "--transport",
            "rdma-sim",
            "--rdma-faults",
            "qp-error=1",
        ],
        &["recv", "--listen", "127.0.0.1:0", "--rdma-nic", "memfd"],
    ] {
        let out = run(args);
        assert_eq!(out.code, Some(2), "{args:?}\n{}", out.describe());
    }
}

#[test]
fn the_demo_runs_over_the_simulated_transport() {
    let _lock = lock();
    let out = run(&[
        "demo",
        "--transport",
        "rdma-sim",
        "--mem-size",
        "64M",
        "--dirty-rate",
        "8M",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("simulated RDMA transport (memfd NIC)") && out.stdout.contains("verified on both sides"),
        "{}",
        out.describe()
    );
}

#[test]
fn private_destination_ram_takes_the_tcp_nic_and_postcopy_into_preallocated_ram_works() {
    let _lock = lock();
    // Preallocated RAM (private unless --rdma-nic memfd asks otherwise),
    // with postcopy; and RAM between guard pages.
    for (recv_args, send_args) in [
        (&["--prealloc", "64M"][..], &["--postcopy", "--postcopy-after", "0"][..]),
        (&["--guard-pages"][..], &[][..]),
    ] {
        let (send, recv) = migrate(recv_args, send_args);
        let (_, recv) = assert_pair_completed(send, recv);
        assert_eq!(field(rdma(&recv), "nic"), "tcp", "{recv_args:?}: {recv:#}");
        assert_eq!(field(&recv, "guest_check"), "passed", "{recv_args:?}: {recv:#}");
    }
}
