//! Postcopy between two processes on loopback, with real userfaultfd: the
//! destination guest runs before its memory arrived and faults on what it
//! lacks; a link cut in postcopy is resumed with nothing lost; a side killed
//! in postcopy leaves the other reporting the VM state lost (exit 5).

use migration_tests::{
    FaultProxy, MIGRATION_WAIT, Toward, assert_pair_completed, error_text, field, lock, num, spawn_recv, spawn_send,
};
use migration_wire::MessageKind;
use serde_json::Value;

/// The `postcopy` object of a report, which must be there.
fn postcopy(json: &Value) -> &Value {
    let postcopy = field(json, "postcopy");
    assert!(postcopy.is_object(), "no postcopy figures: {json:#}");
    postcopy
}

#[test]
fn a_guest_outpacing_the_link_switches_to_postcopy_after_a_pass_and_completes_verified() {
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--json", "--run-for", "200ms"]);
    // The guest rewrites 256 MiB/s of its 64 MiB, the link is held to
    // 32 MB/s: precopy cannot converge.
    let send = spawn_send(
        addr,
        &[
            "--mem-size",
            "64M",
            "--dirty-rate",
            "256M",
            "--max-bandwidth",
            "32M",
            "--downtime-ms",
            "5",
            "--postcopy",
            "--json",
        ],
    );
    let (send, recv) = assert_pair_completed(send, recv);
    assert!(num(&send, "iterations") >= 1, "switched before a whole pass: {send:#}");
    assert_eq!(field(&recv, "guest_check"), "passed", "{recv:#}");
    let (src, dst) = (postcopy(&send), postcopy(&recv));
    assert!(num(src, "requested_pages") > 0, "{send:#}");
    assert!(num(src, "streamed_pages") > 0, "{send:#}");
    assert!(num(dst, "requested_pages") > 0, "{recv:#}");
    assert!(
        num(dst, "faults") > 0,
        "the destination guest never waited for a page: {recv:#}"
    );
    let (p50, p99, max) = (
        field(dst, "fault_p50_us").as_f64().unwrap(),
        field(dst, "fault_p99_us").as_f64().unwrap(),
        field(dst, "fault_max_us").as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{dst:#}");
}

#[test]
fn postcopy_at_once_the_destination_guest_reads_pages_that_have_not_arrived() {
    let _lock = lock();
    let (recv, addr) = spawn_recv(&["--json", "--run-for", "200ms"]);
    let send = spawn_send(
        addr,
        &[
            "--mem-size",
            "64M",
            "--dirty-rate",
            "16M",
            "--postcopy",
            "--postcopy-after",
            "0",
            "--channels",
            "2",
            "--json",
        ],
    );
    let (send, recv) = assert_pair_completed(send, recv);
    assert_eq!(num(&send, "iterations"), 0, "no pass before postcopy: {send:#}");
    // Every page of the guest came in postcopy, each checked by the guest
    // on its first access.
    assert_eq!(field(&recv, "guest_check"), "passed", "{recv:#}");
    let dst = postcopy(&recv);
    assert_eq!(
        num(dst, "requested_pages") + num(dst, "streamed_pages"),
        (64 << 20) / 4096,
        "{recv:#}"
    );
    assert!(num(dst, "faults") > 0, "{recv:#}");
}

#[test]
fn a_link_cut_in_postcopy_is_resumed_and_nothing_is_lost() {
    let _lock = lock();
    // The main connection breaks on the destination's second page request,
    // or the urgent-page connection (the third: main, one data channel,
    // urgent) on its second page batch: the guest there runs, and waits for
    // pages either way.
    let cuts = [
        ("main", 0, Toward::Source, MessageKind::PageRequest),
        ("urgent", 2, Toward::Destination, MessageKind::Pages),
    ];
    for (what, connection, toward, kind) in cuts {
        let (recv, addr) = spawn_recv(&["--json", "--run-for", "200ms", "--io-timeout", "10s"]);
        let proxy = FaultProxy::start(addr, connection, toward, kind, 2, migration_tests::Fault::Cut);
        let send = spawn_send(
            proxy.addr,
            &[
                "--mem-size",
                "64M",
                "--dirty-rate",
                "16M",
                "--postcopy",
                "--postcopy-after",
                "0",
                "--json",
                "--io-timeout",
                "10s",
            ],
        );
        let (send, recv) = assert_pair_completed(send, recv);
        assert!(
            proxy.fired.load(std::sync::atomic::Ordering::SeqCst),
            "{what}: the cut never happened"
        );
        assert_eq!(field(&recv, "guest_check"), "passed", "{what}: {recv:#}");
        for (side, json) in [("send", &send), ("recv", &recv)] {
            assert_eq!(num(postcopy(json), "recoveries"), 1, "{what}, {side}: {json:#}");
        }
    }
}

#[test]
fn a_side_killed_in_postcopy_leaves_the_other_reporting_the_vm_state_lost() {
    let _lock = lock();
    for kill_source in [true, false] {
        let what = if kill_source {
            "source killed"
        } else {
            "destination killed"
        };
        let (recv, addr) = spawn_recv(&["--json", "--resume-timeout", "2s"]);
        // Hold the main connection's stream at its third page batch: the
        // guest runs on the destination, its pages from the main connection
        // stop coming, and the kill finds them missing.
        let proxy = FaultProxy::start(
            addr,
            0,
            Toward::Destination,
            MessageKind::Pages,
            3,
            migration_tests::Fault::Hold,
        );
        let send = spawn_send(
            proxy.addr,
            &[
                "--mem-size",
                "64M",
                "--postcopy",
                "--postcopy-after",
                "0",
                "--resume-timeout",
                "2s",
                "--json",
            ],
        );
        proxy.wait_fired(what);
        let (killed, survivor) = if kill_source { (send, recv) } else { (recv, send) };
        let out = killed.kill();
        assert_eq!(out.code, None, "{what}\n{}", out.describe());
        let out = survivor.wait(MIGRATION_WAIT);
        assert_eq!(out.code, Some(5), "{what}\n{}", out.describe());
        let json = out.json();
        assert!(error_text(&json).contains("vm state lost"), "{what}: {json:#}");
        assert_eq!(field(&json, "status"), "failed", "{what}: {json:#}");
    }
}
