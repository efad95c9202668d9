//! XBZRLE between two `migrate-cli` processes: a hot set rewritten with
//! small changes converges with deltas where plain precopy cannot, and
//! deltas over several channels (with compression) verify.

use migration_tests::{
    MIGRATION_WAIT, assert_pair_completed, assert_send_failed_resumed, error_text, field, lock, num, spawn_recv,
    spawn_send,
};

/// A guest whose 8 MiB hot set is rewritten at 64 MiB/s, 64 bytes a write,
/// over a link capped at 24 MB/s: almost all of the hot set is dirty after
/// every pass, and sent whole it takes ~0.3 s, far over a 50 ms limit.
const HOT_GUEST: &[&str] = &[
    "--mem-size",
    "32M",
    "--dirty-rate",
    "64M",
    "--pattern",
    "hotset",
    "--hot-set",
    "8M",
    "--content",
    "sparse",
    "--max-bandwidth",
    "24M",
    "--downtime-ms",
    "50",
    "--max-iterations",
    "8",
    "--on-limit",
    "fail",
];

fn send_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--json"];
    args.extend_from_slice(HOT_GUEST);
    args.extend_from_slice(extra);
    args
}

#[test]
fn a_hot_set_with_small_changes_converges_with_xbzrle_where_plain_precopy_does_not() {
    let _lock = lock();
    // Plain precopy gives up: the source keeps its guest.
    let (recv, addr) = spawn_recv(&["--json"]);
    let out = spawn_send(addr, &send_args(&[])).wait(MIGRATION_WAIT);
    let json = assert_send_failed_resumed(&out);
    assert!(
        error_text(&json).contains("did not converge"),
        "plain precopy should not converge: {json:#}"
    );
    assert!(json.get("xbzrle").is_none(), "no deltas without a cache: {json:#}");
    drop(recv.kill());

    // With a cache, pages sent again go as deltas and it converges.
    let (recv, addr) = spawn_recv(&["--json"]);
    let send = spawn_send(addr, &send_args(&["--xbzrle-cache", "16M"]));
    let (send, recv) = assert_pair_completed(send, recv);
    assert_eq!(field(&recv, "guest_check"), "passed", "{recv:#}");
    let xbzrle = field(&send, "xbzrle");
    let pages = num(xbzrle, "pages");
    assert!(pages > 0, "delta-encoded pages: {send:#}");
    assert!(num(xbzrle, "cache_hits") >= pages, "{send:#}");
    assert!(
        num(xbzrle, "cache_misses") > 0,
        "the second pass fills the cache: {send:#}"
    );
    // Small changes make small deltas: far below a page each.
    assert!(
        num(xbzrle, "bytes") < pages * 512,
        "{} delta bytes for {pages} pages: {send:#}",
        num(xbzrle, "bytes")
    );
    assert_eq!(
        num(field(&recv, "xbzrle"), "pages"),
        pages,
        "the destination applied every delta: {recv:#}"
    );
}

#[test]
fn deltas_over_several_channels_with_compression_verify() {
    let _lock = lock();
    // A cache smaller than the hot set: slots collide and pages move in and
    // out of it; four channels each own a quarter of the pages.
    let (recv, addr) = spawn_recv(&["--json"]);
    let send = spawn_send(
        addr,
        &[
            "--json",
            "--mem-size",
            "64M",
            "--dirty-rate",
            "64M",
            "--pattern",
            "hotset",
            "--hot-set",
            "16M",
            "--content",
            "sparse",
            "--max-bandwidth",
            "48M",
            "--max-iterations",
            "5",
            "--downtime-ms",
            "20",
            "--channels",
            "4",
            "--compress",
            "lz4",
            "--xbzrle-cache",
            "8M",
        ],
    );
    let (send, recv) = assert_pair_completed(send, recv);
    assert_eq!(field(&recv, "guest_check"), "passed", "{recv:#}");
    assert_eq!(num(&send, "channels"), 4, "{send:#}");
    let xbzrle = field(&send, "xbzrle");
    assert!(num(xbzrle, "pages") > 0, "{send:#}");
    assert!(num(xbzrle, "cache_misses") > 0, "{send:#}");
    assert_eq!(num(field(&recv, "xbzrle"), "pages"), num(xbzrle, "pages"), "{recv:#}");
}
