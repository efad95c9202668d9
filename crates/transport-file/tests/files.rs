//! Snapshot files written and read through their channels, without a
//! migration runtime: what lands in the file, what a restore reads back,
//! and pages loaded on first touch.

use migration_core::verify::{block_digest, page_hash};
use migration_core::{Channel, ChannelRx, ChannelTx, Ram, RamBlock};
use migration_sys::GuestRegion;
use migration_wire::{
    Block, BlockList, Complete, EndOfRam, Features, Hello, Message, PROTOCOL_VERSION, PageBatch, PageEncoding,
    PageEntry, SessionId, SyncMarker,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use transport_file::{LazyRestore, SaveOptions, SaveTarget, Snapshot};

const PAGES: u64 = 40;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let base = PathBuf::from("/var/tmp");
        let base = if base.is_dir() { base } else { std::env::temp_dir() };
        let dir = base.join(format!("transport-file-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        Self(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Page `i`'s bytes in the saved guest: every third page zero.
fn page(i: u64) -> Option<Vec<u8>> {
    (i % 3 != 0).then(|| (0..4096).map(|b| (b as u64 * 7 + i) as u8).collect())
}

fn expect(channel: &mut dyn Channel, what: &str) -> String {
    let message = channel.recv().unwrap_or_else(|e| panic!("{what}: {e}"));
    message.kind().name().to_owned()
}

/// Saves one block of `PAGES` pages through a save channel, as the source
/// runtime would: page 1 first saved with other bytes, then rewritten.
fn save(path: &std::path::Path, direct_io: bool) -> u64 {
    save_with(
        path,
        SaveOptions {
            direct_io,
            io_uring: true,
        },
    )
}

fn save_with(path: &std::path::Path, options: SaveOptions) -> u64 {
    let target = SaveTarget::new(path, options);
    let mut channel = target.channel(0);
    channel
        .send(&Message::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            features: Features::ZERO_PAGES,
            session: SessionId(9),
            channels: 1,
        }))
        .expect("hello");
    assert_eq!(expect(&mut channel, "hello reply"), "hello-reply");
    let blocks = BlockList {
        blocks: vec![Block {
            name: "ram".into(),
            length: PAGES * 4096,
            page_size: 4096,
        }],
    };
    channel.send(&Message::BlockList(blocks)).expect("blocks");
    assert_eq!(expect(&mut channel, "blocks accepted"), "blocks-accepted");
    // Epoch 0: page 1 with stale bytes.
    let mut entries = Vec::new();
    PageEntry {
        page: 1,
        encoding: PageEncoding::Plain,
    }
    .push_to(&mut entries);
    let stale = vec![0xeeu8; 4096];
    channel
        .send(&Message::Pages(
            PageBatch::new(0, 0, 4096, &entries, &stale).expect("batch"),
        ))
        .expect("pages");
    channel
        .send(&Message::SyncMarker(SyncMarker { epoch: 0, pages: 1 }))
        .expect("marker");
    assert_eq!(expect(&mut channel, "ack"), "ack");
    // Epoch 1: every page.
    let mut entries = Vec::new();
    let mut payload = Vec::new();
    let mut hashes = Vec::new();
    for i in 0..PAGES {
        match page(i) {
            Some(bytes) => {
                PageEntry {
                    page: i,
                    encoding: PageEncoding::Plain,
                }
                .push_to(&mut entries);
                hashes.push(page_hash(&bytes));
                payload.extend(bytes);
            }
            None => {
                PageEntry {
                    page: i,
                    encoding: PageEncoding::Zero,
                }
                .push_to(&mut entries);
                hashes.push(page_hash(&[0; 4096]));
            }
        }
    }
    channel
        .send(&Message::Pages(
            PageBatch::new(0, 1, 4096, &entries, &payload).expect("batch"),
        ))
        .expect("pages");
    channel
        .send(&Message::SyncMarker(SyncMarker { epoch: 1, pages: PAGES }))
        .expect("marker");
    assert_eq!(expect(&mut channel, "ack"), "ack");
    channel.send(&Message::DeviceState(b"device")).expect("state");
    channel.send(&Message::EndOfRam(EndOfRam { epochs: 2 })).expect("end");
    assert_eq!(expect(&mut channel, "ready"), "ready");
    assert!(target.committed());
    channel.send(&Message::Go).expect("go");
    assert_eq!(expect(&mut channel, "resumed"), "resumed");
    let digest = block_digest(&hashes);
    channel
        .send(&Message::Complete(Complete { digests: vec![digest] }))
        .expect("complete");
    match channel.recv().expect("verdict") {
        Message::Verdict(v) => assert!(v.is_verified(), "{v:?}"),
        other => panic!("{other:?}"),
    }
    digest
}

#[test]
fn a_save_lands_at_fixed_offsets_with_holes_for_zero_pages() {
    for (direct_io, io_uring) in [(false, true), (true, true), (true, false), (false, false)] {
        let dir = Dir::new(&format!("write-{direct_io}-{io_uring}"));
        let path = dir.0.join("s.snap");
        let digest = save_with(&path, SaveOptions { direct_io, io_uring });
        let snapshot = Snapshot::open(&path).expect("a finished snapshot");
        assert_eq!(snapshot.commit.blocks[0].digest, digest);
        assert_eq!(snapshot.commit.epochs, 2);
        let stored = (0..PAGES).filter(|&i| page(i).is_some()).count() as u64;
        assert_eq!(snapshot.commit.blocks[0].stored_pages, stored);
        let laid = &snapshot.header.layout.blocks[0];
        let file = std::fs::File::open(&path).expect("open");
        for i in 0..PAGES {
            assert_eq!(snapshot.stored(0, i), page(i).is_some(), "page {i}");
            if let Some(bytes) = page(i) {
                let mut got = vec![0u8; 4096];
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, laid.page_offset(i)).expect("read");
                assert_eq!(got, bytes, "page {i} at its fixed offset, rewritten in place");
            }
        }
        // Nothing but the snapshot in the directory: the temporary name is gone.
        assert_eq!(std::fs::read_dir(&dir.0).expect("ls").count(), 1);
    }
}

fn lazy_guest() -> (Ram, Arc<GuestRegion>) {
    let region = Arc::new(GuestRegion::anonymous((PAGES * 4096) as usize).expect("mmap"));
    (Ram::new(vec![RamBlock::new("ram", Arc::clone(&region))]), region)
}

#[test]
fn pages_load_on_first_touch_with_the_saved_bytes() {
    let dir = Dir::new("lazy-touch");
    let path = dir.0.join("s.snap");
    save(&path, false);
    let (ram, region) = lazy_guest();
    // No prefetcher: every page loads because it is touched.
    let lazy = LazyRestore::start(Snapshot::open(&path).expect("open"), &ram, 0, false).expect("start");
    assert_eq!(lazy.device_state(), b"device");
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 4096];
        for i in (0..PAGES).rev() {
            region.read(i as usize * 4096, &mut got).expect("read");
            assert_eq!(
                Some(got.clone()).filter(|g| g.iter().any(|&b| b != 0)),
                page(i),
                "page {i}"
            );
        }
    });
    let report = lazy.wait(Duration::from_secs(60)).expect("every page loaded");
    reader.join().expect("the guest read every page");
    assert_eq!(report.faulted_pages, PAGES);
    assert_eq!(report.prefetched_pages, 0);
    assert!(report.mismatched_blocks.is_empty(), "{report:?}");
    assert!(report.fault_max_us > 0.0);
}

#[test]
fn the_prefetcher_loads_what_is_not_touched() {
    let dir = Dir::new("lazy-prefetch");
    let path = dir.0.join("s.snap");
    save(&path, true);
    let (ram, region) = lazy_guest();
    let lazy = LazyRestore::start(Snapshot::open(&path).expect("open"), &ram, 2, true).expect("start");
    let report = lazy.wait(Duration::from_secs(60)).expect("every page loaded");
    assert_eq!(report.faulted_pages + report.prefetched_pages, PAGES);
    assert!(report.mismatched_blocks.is_empty(), "{report:?}");
    let mut got = vec![0u8; 4096];
    for i in 0..PAGES {
        region.read(i as usize * 4096, &mut got).expect("read");
        assert_eq!(got, page(i).unwrap_or_else(|| vec![0; 4096]), "page {i}");
    }
}

#[test]
fn after_a_failed_lazy_restore_pages_never_loaded_stay_unreadable() {
    let dir = Dir::new("lazy-fail");
    let path = dir.0.join("s.snap");
    save(&path, false);
    let (ram, region) = lazy_guest();
    // Nobody prefetches or touches: the wait times out, and the restore is
    // dropped with every page still missing.
    let lazy = LazyRestore::start(Snapshot::open(&path).expect("open"), &ram, 0, false).expect("start");
    assert!(lazy.wait(Duration::from_millis(50)).is_err(), "nothing loaded in time");
    drop(ram);
    // A guest thread touching a page now must not read zeros in place of
    // the saved bytes: it waits for good. (It can only pass late, never
    // fail spuriously: a wrong read would complete at once.)
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut page = vec![0u8; 4096];
        let _ = region.read(4096, &mut page);
        let _ = tx.send(page);
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a page never loaded was read after the restore failed"
    );
}
