//! Snapshots: `save` of a running guest into a mapped-ram file, `restore`
//! and `inspect`, and what a broken file gets. Files live on a disk file
//! system (`/var/tmp`), where O_DIRECT means something.

use migration_tests::{Limit, MIGRATION_WAIT, Output, Proc, TempDir, field, lock, num, run};
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A directory on disk (`/var/tmp`, else the temp dir), removed on drop.
fn disk_dir(tag: &str) -> TempDir {
    TempDir::new_in(Path::new("/var/tmp"), tag).create()
}

/// `save` arguments for a mapped-ram snapshot or a stream file.
fn save_args<'a>(file: &'a str, mapped_ram: bool, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["save"];
    if mapped_ram {
        args.push("--mapped-ram");
    }
    args.extend(["--to", file, "--json"]);
    args.extend_from_slice(extra);
    args
}

/// Saves a mapped-ram snapshot.
fn save(file: &str, extra: &[&str]) -> Value {
    save_with(&save_args(file, true, extra))
}

/// Saves a stream file.
fn save_stream(file: &str, extra: &[&str]) -> Value {
    save_with(&save_args(file, false, extra))
}

fn save_with(args: &[&str]) -> Value {
    let out = Proc::spawn("save", args).wait(MIGRATION_WAIT);
    assert_eq!(out.code, Some(0), "save\n{}", out.describe());
    let json = out.json();
    assert_eq!(field(&json, "status"), "completed", "{json:#}");
    assert_eq!(
        field(&json, "verified"),
        true,
        "the file holds the frozen RAM: {json:#}"
    );
    json
}

fn restore(file: &str, extra: &[&str]) -> Output {
    let mut args = vec!["restore", "--from", file, "--json", "--run-for", "0s"];
    args.extend_from_slice(extra);
    Proc::spawn("restore", &args).wait(MIGRATION_WAIT)
}

fn assert_restored(out: &Output) -> Value {
    assert_eq!(out.code, Some(0), "restore\n{}", out.describe());
    let json = out.json();
    assert_eq!(field(&json, "status"), "completed", "{json:#}");
    assert_eq!(field(&json, "verified"), true, "{json:#}");
    assert_eq!(field(&json, "guest_check"), "passed", "{json:#}");
    json
}

fn inspect(file: &str) -> (Option<i32>, Value) {
    let out = run(&["inspect", file, "--json"]);
    let json = out.json();
    (out.code, json)
}

#[test]
fn a_dirtying_guest_saves_live_and_restores_verified_every_way() {
    let _lock = lock();
    let dir = disk_dir("roundtrip");
    let file = dir.file("guest.snap");
    let saved = save(
        &file,
        &[
            "--mem-size",
            "48M",
            "--dirty-rate",
            "32M",
            "--content",
            "zero-heavy",
            "--channels",
            "2",
            "--direct-io",
        ],
    );
    assert!(num(&saved, "zero_pages") > 0, "{saved:#}");
    let (code, info) = inspect(&file);
    assert_eq!(code, Some(0), "{info:#}");
    assert_eq!(field(&info, "complete"), true, "{info:#}");
    assert_eq!(num(&info, "ram_bytes"), 48 << 20, "{info:#}");
    let blocks = field(&info, "blocks").as_array().expect("blocks");
    let mut stored = 0;
    for block in blocks {
        assert_eq!(
            num(block, "stored_pages") + num(block, "zero_pages"),
            num(block, "pages")
        );
        stored += num(block, "stored_pages");
    }
    assert!(stored > 0, "{info:#}");
    // Zero pages are holes: the file takes less disk than the guest's RAM.
    let on_disk = std::fs::metadata(&file).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
    assert!(on_disk.expect("metadata") < 48 << 20, "a sparse file");
    // Straight into anonymous memory, through O_DIRECT, with another
    // number of readers; then into a file-backed guest through its file.
    assert_restored(&restore(&file, &["--channels", "3", "--direct-io"]));
    let mem = dir.file("restored.ram");
    assert_restored(&restore(&file, &["--mem-file", &mem, "--channels", "1"]));
    // No temporary file is left beside the snapshot.
    let names: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("listing")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_lazy_restore_runs_the_guest_first_and_loads_every_page_verified() {
    let _lock = lock();
    let dir = disk_dir("lazy");
    let file = dir.file("guest.snap");
    save(
        &file,
        &["--mem-size", "32M", "--dirty-rate", "16M", "--content", "text"],
    );
    for extra in [&[][..], &["--direct-io", "--channels", "1"][..]] {
        let mut args = vec!["--lazy"];
        args.extend_from_slice(extra);
        let json = assert_restored(&restore(&file, &args));
        let lazy = field(&json, "lazy");
        let pages = (32u64 << 20) / 4096;
        assert_eq!(num(lazy, "faults") + num(lazy, "prefetched_pages"), pages, "{json:#}");
        for key in [
            "fault_p50_us",
            "fault_p99_us",
            "fault_max_us",
            "first_access_ms",
            "all_loaded_ms",
        ] {
            assert!(field(lazy, key).is_number(), "{key}: {json:#}");
        }
    }
}

/// A good small snapshot to break, with block 0 of 2050 pages (so its
/// bitmap's last byte has unused bits).
fn good_snapshot(dir: &TempDir) -> String {
    let file = dir.file("good.snap");
    let size = ((4100 * 4096) as u64).to_string();
    save(&file, &["--mem-size", &size, "--channels", "1"]);
    file
}

fn broken_copy(dir: &TempDir, good: &str, name: &str, damage: impl FnOnce(&std::fs::File, u64)) -> String {
    let path = dir.file(name);
    std::fs::copy(good, &path).expect("copying the snapshot");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let len = file.metadata().expect("metadata").len();
    damage(&file, len);
    path
}

fn assert_refused(file: &str, problem: &str) {
    let out = restore(file, &[]);
    assert_eq!(out.code, Some(1), "restore of a broken file\n{}", out.describe());
    let json = out.json();
    assert_eq!(field(&json, "status"), "failed", "{json:#}");
    let error = migration_tests::error_text(&json);
    assert!(error.contains(problem), "wanted {problem:?} in the error: {json:#}");
    assert!(
        field(&json, "guest_check").is_null(),
        "nothing ran from a broken file: {json:#}"
    );
    let (code, info) = inspect(file);
    assert_eq!(code, Some(1), "{info:#}");
    assert_eq!(field(&info, "complete"), false, "{info:#}");
}

#[test]
fn broken_files_are_refused_naming_the_problem() {
    let _lock = lock();
    let dir = disk_dir("broken");
    let good = good_snapshot(&dir);
    let header_len = 4096u64;
    let cases: Vec<(&str, String)> = vec![
        (
            "not a finished snapshot",
            broken_copy(&dir, &good, "truncated", |f, len| {
                f.set_len(len - 4096).expect("truncate")
            }),
        ),
        (
            "not a finished snapshot",
            broken_copy(&dir, &good, "uncommitted", |f, len| {
                f.write_all_at(&[0; 4096], len - 4096).expect("write")
            }),
        ),
        (
            "magic",
            broken_copy(&dir, &good, "magic", |f, _| f.write_all_at(b"XX", 0).expect("write")),
        ),
        (
            "version",
            broken_copy(&dir, &good, "version", |f, _| f.write_all_at(&[9], 8).expect("write")),
        ),
        (
            "checksum",
            broken_copy(&dir, &good, "header", |f, _| {
                f.write_all_at(&[0x7f], 100).expect("write")
            }),
        ),
        (
            // Block 0 has 2050 pages: bit 7 of its bitmap's byte 256 is past the end.
            "past the end of its block",
            broken_copy(&dir, &good, "bitmap", |f, _| {
                let mut byte = [0u8];
                f.read_exact_at(&mut byte, header_len + 256).expect("read");
                f.write_all_at(&[byte[0] | 0x80], header_len + 256).expect("write")
            }),
        ),
        (
            "bitmap changed",
            broken_copy(&dir, &good, "bitmap-bit", |f, _| {
                let mut byte = [0u8];
                f.read_exact_at(&mut byte, header_len).expect("read");
                f.write_all_at(&[byte[0] ^ 1], header_len).expect("write")
            }),
        ),
        ("opening", dir.file("missing.snap")),
    ];
    for (problem, file) in &cases {
        assert_refused(file, problem);
    }
    let (code, info) = inspect(&good);
    assert_eq!(code, Some(0), "{info:#}");
}

#[test]
fn a_damaged_page_never_passes_for_a_good_restore() {
    let _lock = lock();
    let dir = disk_dir("damaged-page");
    let good = good_snapshot(&dir);
    // Page 0 of block 0 (random content: stored) starts at 1 MiB.
    let bad = broken_copy(&dir, &good, "page", |f, _| {
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, 1 << 20).expect("read");
        f.write_all_at(&[byte[0] ^ 0xff], 1 << 20).expect("write")
    });
    let out = restore(&bad, &[]);
    assert_eq!(out.code, Some(3), "a restore that does not verify\n{}", out.describe());
    let json = out.json();
    assert_eq!(field(&json, "verified"), false, "{json:#}");
    assert_eq!(field(&json, "mismatched_blocks"), &serde_json::json!([0]), "{json:#}");
}

#[test]
fn an_unfinished_save_never_replaces_a_good_snapshot() {
    let _lock = lock();
    let dir = disk_dir("unfinished");
    let file = dir.file("guest.snap");
    save(&file, &["--mem-size", "16M"]);
    let (_, before) = inspect(&file);
    // A guest that dirties faster than the save may write keeps passing;
    // kill it mid-save.
    let mut saving = Proc::spawn(
        "save",
        &[
            "save",
            "--mapped-ram",
            "--to",
            &file,
            "--mem-size",
            "64M",
            "--dirty-rate",
            "64M",
            "--max-bandwidth",
            "16M",
            "--max-iterations",
            "0",
            "--json",
        ],
    );
    saving.wait_stderr_prefix("progress save");
    saving.kill();
    let (code, after) = inspect(&file);
    assert_eq!(code, Some(0), "{after:#}");
    assert_eq!(before, after, "the good snapshot is untouched");
    // What the killed save left is named as unfinished, never a snapshot.
    for entry in std::fs::read_dir(&dir.0).expect("listing") {
        let path = entry.expect("entry").path();
        if path != Path::new(&file) {
            let (code, info) = inspect(path.to_str().expect("utf-8"));
            assert_eq!(code, Some(1), "{info:#}");
            assert_eq!(field(&info, "complete"), false, "{info:#}");
        }
    }
}

#[test]
fn a_stream_file_saves_compressed_and_restores_verified() {
    let _lock = lock();
    let dir = disk_dir("stream");
    let file = dir.file("guest.stream");
    let saved = save_stream(
        &file,
        &[
            "--mem-size",
            "32M",
            "--dirty-rate",
            "16M",
            "--content",
            "text",
            "--compress",
            "lz4",
        ],
    );
    assert!(num(&saved, "compression_saved_bytes") > 0, "{saved:#}");
    assert_eq!(num(&saved, "channels"), 1, "a stream has one channel: {saved:#}");
    let (code, info) = inspect(&file);
    assert_eq!(code, Some(0), "{info:#}");
    assert_eq!(field(&info, "format"), "stream", "{info:#}");
    assert_eq!(num(&info, "ram_bytes"), 32 << 20, "{info:#}");
    assert_restored(&restore(&file, &[]));
    // A stream cut short is an unfinished save, never a restore.
    let cut = dir.file("cut.stream");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let out = restore(&cut, &[]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    let json = out.json();
    assert!(
        migration_tests::error_text(&json).contains("the stream ends"),
        "{json:#}"
    );
    let (code, info) = inspect(&cut);
    assert_eq!(
        (code, field(&info, "complete")),
        (Some(1), &Value::Bool(false)),
        "{info:#}"
    );
    // Nor does a stream without its final digests (16 bytes of frame header
    // and 20 of body for two blocks): refused before its guest runs.
    let headless = dir.file("nodigests.stream");
    std::fs::write(&headless, &bytes[..bytes.len() - 36]).expect("write");
    let out = restore(&headless, &[]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    let json = out.json();
    assert!(field(&json, "guest_check").is_null(), "no guest ran: {json:#}");
    assert!(
        migration_tests::error_text(&json).contains("the stream ends"),
        "{json:#}"
    );
}

#[test]
fn a_stream_goes_through_a_pipe() {
    let _lock = lock();
    let cli = migration_tests::cli_path();
    let cli = cli.to_str().expect("utf-8");
    let script = format!(
        "set -o pipefail; '{cli}' save --to - --mem-size 16M --dirty-rate 8M --json 2>save.err \\
         | '{cli}' restore --from - --json --run-for 0s 2>/dev/null"
    );
    let dir = disk_dir("pipe");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&dir.0)
        .output()
        .expect("running the pipe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pipe failed: {stdout}");
    let json: Value = serde_json::from_str(stdout.trim()).expect("restore's JSON");
    assert_eq!(field(&json, "verified"), true, "{json:#}");
    assert_eq!(field(&json, "guest_check"), "passed", "{json:#}");
    // The save's report went to stderr, leaving stdout to the stream.
    let save_err = std::fs::read_to_string(dir.0.join("save.err")).expect("save.err");
    let report = save_err.lines().last().expect("a report line");
    let report: Value = serde_json::from_str(report).expect("save's JSON on stderr");
    assert_eq!(field(&report, "verified"), true, "{report:#}");
}

/// A save that cannot write (here: past the process's file size limit,
/// the same failed-write path as a full disk) fails with the OS error,
/// resumes the guest, leaves no partial file and keeps a good snapshot.
#[test]
fn a_save_that_cannot_write_fails_cleanly_and_keeps_the_good_snapshot() {
    let _lock = lock();
    let dir = disk_dir("full");
    for (file, mapped_ram) in [("guest.stream", false), ("guest.snap", true)] {
        let path = dir.file(file);
        save_with(&save_args(&path, mapped_ram, &["--mem-size", "16M"]));
        let before = std::fs::read(&path).expect("the good snapshot");
        // 8 MiB of file at most, for a 32 MiB guest.
        let args = save_args(&path, mapped_ram, &["--mem-size", "32M", "--dirty-rate", "8M"]);
        let out = Proc::spawn_limited("save", &args, Some(Limit::FileSizeKib(8192))).wait(MIGRATION_WAIT);
        let json = migration_tests::assert_send_failed_resumed(&out);
        assert!(
            migration_tests::error_text(&json).contains("file too large"),
            "{json:#}"
        );
        assert_eq!(
            std::fs::read(&path).expect("still there"),
            before,
            "{file}: the good snapshot is untouched"
        );
        let names: Vec<_> = std::fs::read_dir(&dir.0)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(
            names.iter().all(|n| !n.to_string_lossy().contains("partial")),
            "no partial file left: {names:?}"
        );
    }
}

#[test]
fn inspect_counts_only_the_pages_inside_their_block() {
    use migration_wire::{Block, BlockList, Features, Hello, Message, PROTOCOL_VERSION, PageBatch, SessionId};
    let _lock = lock();
    let dir = disk_dir("inspect-outside");
    let file = dir.file("outside.stream");
    // A one-page block, and a batch of two pages past its end.
    let mut bytes = Vec::new();
    Message::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        features: Features::ZERO_PAGES,
        session: SessionId(1),
        channels: 1,
    })
    .encode(&mut bytes);
    Message::BlockList(BlockList {
        blocks: vec![Block {
            name: "ram".into(),
            length: 4096,
            page_size: 4096,
        }],
    })
    .encode(&mut bytes);
    let mut entries = Vec::new();
    for page in [1, 2] {
        migration_wire::PageEntry {
            page,
            encoding: migration_wire::PageEncoding::Plain,
        }
        .push_to(&mut entries);
    }
    let payload = vec![7u8; 2 * 4096];
    Message::Pages(PageBatch::new(0, 0, 4096, &entries, &payload).expect("batch")).encode(&mut bytes);
    std::fs::write(&file, bytes).expect("write");
    let (code, info) = inspect(&file);
    assert_eq!(code, Some(1), "an unfinished stream: {info:#}");
    let blocks = field(&info, "blocks").as_array().expect("blocks");
    assert_eq!(num(&blocks[0], "stored_pages"), 0, "{info:#}");
    assert_eq!(num(&blocks[0], "zero_pages"), 1, "{info:#}");
}
