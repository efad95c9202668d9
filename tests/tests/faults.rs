//! Faults injected from outside at every phase of a migration: a proxy that
//! reads the frames with `migration-wire` cuts the link at, or corrupts, a
//! named message, or holds it while the test kills one side (SIGKILL).
//! Before GO the source guest runs on and the destination discards; a GO
//! that never arrives leaves both sides stopped, and the source says an
//! operator must decide.

use migration_tests::{
    FaultProxy, MIGRATION_WAIT, Proc, Toward, assert_send_failed_resumed, error_text, field, lock, spawn_recv,
    spawn_send,
};
use migration_wire::MessageKind;

/// The phases, as the frame that marks each: (name, direction, kind, nth).
const PHASES: &[(&str, Toward, MessageKind, usize)] = &[
    ("handshake", Toward::Destination, MessageKind::Hello, 1),
    ("block list", Toward::Destination, MessageKind::BlockList, 1),
    ("bulk pass", Toward::Destination, MessageKind::Pages, 3),
    ("second pass", Toward::Destination, MessageKind::SyncMarker, 2),
    ("acknowledgement", Toward::Source, MessageKind::Ack, 1),
    ("device state", Toward::Destination, MessageKind::DeviceState, 1),
    ("end of RAM", Toward::Destination, MessageKind::EndOfRam, 1),
    ("READY", Toward::Source, MessageKind::Ready, 1),
    ("GO", Toward::Destination, MessageKind::Go, 1),
];

/// The destination never claims a migration that failed.
fn assert_recv_discarded(recv: Proc, phase: &str, before_accept: bool) {
    if before_accept {
        // A connection that fails its handshake is refused; the
        // destination keeps listening.
        let mut recv = recv;
        let line = recv.wait_stderr_prefix("refused connection from ");
        assert!(!line.is_empty(), "{phase}");
        recv.kill();
        return;
    }
    let out = recv.wait(MIGRATION_WAIT);
    assert_ne!(out.code, Some(0), "{phase}: recv claimed success\n{}", out.describe());
    let json = out.json();
    assert_ne!(field(&json, "status"), "completed", "{phase}: {json:#}");
    assert_ne!(
        field(&json, "guest_check"),
        "passed",
        "{phase}: the guest ran: {json:#}"
    );
}

fn run_matrix(fault: migration_tests::Fault) {
    for &(phase, toward, kind, nth) in PHASES {
        let (recv, addr) = spawn_recv(&["--json", "--run-for", "0s"]);
        let proxy = FaultProxy::start(addr, 0, toward, kind, nth, fault);
        let send = spawn_send(
            proxy.addr,
            &["--mem-size", "32M", "--dirty-rate", "8M", "--channels", "2", "--json"],
        );
        let out = send.wait(MIGRATION_WAIT);
        assert!(
            proxy.fired.load(std::sync::atomic::Ordering::SeqCst),
            "{phase}: the fault never fired\n{}",
            out.describe()
        );
        let before_accept = matches!(kind, MessageKind::Hello | MessageKind::BlockList);
        if kind == MessageKind::Go {
            // GO left the source: it handed over and cannot take the guest
            // back; the destination never got GO and never ran it.
            assert_eq!(out.code, Some(4), "{phase} {fault:?}\n{}", out.describe());
            let json = out.json();
            assert_eq!(field(&json, "source_resumed"), false, "{json:#}");
            assert!(!error_text(&json).is_empty(), "{json:#}");
        } else {
            let json = assert_send_failed_resumed(&out);
            assert!(!error_text(&json).is_empty(), "{phase}: {json:#}");
        }
        assert_recv_discarded(recv, phase, before_accept);
    }
}

#[test]
fn a_link_cut_at_any_phase_loses_nothing() {
    let _lock = lock();
    run_matrix(migration_tests::Fault::Cut);
}

#[test]
fn a_frame_corrupted_at_any_phase_is_caught_and_loses_nothing() {
    let _lock = lock();
    run_matrix(migration_tests::Fault::Corrupt);
}

#[test]
fn a_side_killed_at_any_phase_loses_nothing() {
    let _lock = lock();
    for &(phase, toward, kind, nth) in PHASES {
        let before_accept = matches!(kind, MessageKind::Hello | MessageKind::BlockList);
        for kill_source in [true, false] {
            let what = format!("{phase}, {} killed", if kill_source { "source" } else { "destination" });
            let (recv, addr) = spawn_recv(&["--json", "--run-for", "0s"]);
            let proxy = FaultProxy::start(addr, 0, toward, kind, nth, migration_tests::Fault::Hold);
            let send = spawn_send(
                proxy.addr,
                &["--mem-size", "32M", "--dirty-rate", "8M", "--channels", "2", "--json"],
            );
            proxy.wait_fired(&what);
            if kill_source {
                let out = send.kill();
                assert_eq!(out.code, None, "{what}: killed\n{}", out.describe());
                assert_recv_discarded(recv, &what, before_accept);
                continue;
            }
            let out = recv.kill();
            assert_eq!(out.code, None, "{what}: killed\n{}", out.describe());
            let out = send.wait(MIGRATION_WAIT);
            if kind == MessageKind::Go {
                // GO left the source: it cannot take the guest back, and
                // says an operator must decide.
                assert_eq!(out.code, Some(4), "{what}\n{}", out.describe());
            } else {
                let json = assert_send_failed_resumed(&out);
                assert!(!error_text(&json).is_empty(), "{what}: {json:#}");
            }
        }
    }
}
