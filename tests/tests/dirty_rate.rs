//! `migrate-cli dirty-rate` against a synthetic guest of known write rate.

use migration_tests::{MIGRATION_WAIT, Proc, field, lock};

fn probe(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["dirty-rate", "--json", "--seconds", "1"];
    all.extend_from_slice(args);
    let out = Proc::spawn("dirty-rate", &all).wait(MIGRATION_WAIT);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    out.json()
}

#[test]
fn the_probe_reports_a_known_writer_within_20_percent_and_its_hot_set() {
    let _lock = lock();
    // 16 MiB/s of 4 KiB pages spread over 256 MiB: few repeats per interval.
    let json = probe(&["--mem-size", "256M", "--dirty-rate", "16M"]);
    let rate = field(&json, "dirty_bytes_per_sec").as_f64().unwrap();
    let want = 16.0 * (1 << 20) as f64;
    assert!(
        (rate - want).abs() <= want * 0.2,
        "{rate} bytes/s, wanted {want}: {json:#}"
    );
    // A 4 MiB hot set rewritten at 16 MiB/s in random order: almost all of
    // it is dirty within a second (1 - e^-4 of it, expected), none beyond.
    let json = probe(&[
        "--mem-size",
        "256M",
        "--dirty-rate",
        "16M",
        "--pattern",
        "hotset",
        "--hot-set",
        "4M",
    ]);
    let hot = field(&json, "hot_set_bytes").as_u64().unwrap();
    assert!(((4 << 20) * 9 / 10..=4 << 20).contains(&hot), "{json:#}");
}
