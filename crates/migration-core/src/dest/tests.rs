//! The destination runtime driven over scripted in-memory channels.

use super::place::{Placer, Prefault, RamTargets};
use super::receive::{EpochBarrier, Shared, receive};
use super::*;
use crate::ram::RamBlock;
use crate::transport::{ChannelHalves, ChannelRx, ChannelTx};
use crate::transport::{DirectPlacement, GuestRun};
use migration_sys::GuestRegion;
use migration_wire::{EndOfRam, MessageKind, PageBatch, PageEncoding, PageEntry, SyncMarker};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// A channel that replays encoded frames and records when each is taken.
struct Scripted {
    index: usize,
    frames: VecDeque<Vec<u8>>,
    current: Vec<u8>,
    log: Arc<Mutex<Vec<(usize, usize)>>>,
    taken: usize,
    /// Before handing out this frame, wait (bounded) for this log entry.
    wait_for: Option<(usize, (usize, usize))>,
    /// Fail instead of handing out this frame, as a corrupt frame would.
    corrupt_at: Option<usize>,
}

impl Scripted {
    fn new(index: usize, messages: Vec<Message<'_>>, log: Arc<Mutex<Vec<(usize, usize)>>>) -> Self {
        let frames = messages
            .iter()
            .map(|m| {
                let mut body = Vec::new();
                m.encode_body(&mut body);
                let mut frame = vec![m.kind() as u8, (m.kind() as u16 >> 8) as u8];
                frame.extend(body);
                frame
            })
            .collect();
        Self {
            index,
            frames,
            current: Vec::new(),
            log,
            taken: 0,
            wait_for: None,
            corrupt_at: None,
        }
    }
}

impl ChannelTx for Scripted {
    fn send(&mut self, _: &Message<'_>) -> Result<(), TransportError> {
        Ok(())
    }
    fn bytes_sent(&self) -> u64 {
        0
    }
    fn shutdown(&mut self) {}
}

impl ChannelRx for Scripted {
    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        if let Some((at, entry)) = self.wait_for
            && self.taken == at
        {
            // Give the other channel every chance to run ahead (it must
            // not: it waits at the epoch barrier).
            let deadline = Instant::now() + Duration::from_millis(300);
            while Instant::now() < deadline && !self.log.lock().expect("log").contains(&entry) {
                std::thread::yield_now();
            }
        }
        if self.corrupt_at == Some(self.taken) {
            return Err(TransportError::Malformed(migration_wire::WireError::Checksum {
                kind: "pages",
                expected: 1,
                actual: 2,
            }));
        }
        let frame = self.frames.pop_front().ok_or(TransportError::Closed)?;
        self.log.lock().expect("log").push((self.index, self.taken));
        self.taken += 1;
        self.current = frame;
        let kind = MessageKind::from_raw(u16::from_le_bytes([self.current[0], self.current[1]]))?;
        Ok(Message::decode_body(kind, &self.current[2..])?)
    }
    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        // The body starts after the two kind bytes.
        let mut body = std::mem::replace(&mut self.current, replacement);
        body.drain(..2);
        body
    }
    fn set_timeout(&mut self, _: Option<Duration>) -> Result<(), TransportError> {
        Ok(())
    }
    fn bytes_received(&self) -> u64 {
        0
    }
}

impl Channel for Scripted {
    fn split(self: Box<Self>) -> Result<ChannelHalves, TransportError> {
        unreachable!("the destination does not split")
    }
    fn peer(&self) -> String {
        format!("scripted-{}", self.index)
    }
    fn closer(&self) -> Result<Closer, TransportError> {
        Ok(Box::new(|| {}))
    }
}

/// What the channel threads share, for `channels` channels into `ram`.
fn shared_for(ram: &Ram, channels: usize) -> Shared {
    Shared {
        placer: Placer::new(ram, FreshMemory::Zeroed),
        barrier: EpochBarrier::new(channels),
        prefault: Prefault::start(ram, FreshMemory::Zeroed),
        direct: None,
        io_timeout: Duration::from_secs(30),
        codecs: migration_wire::Features::default(),
        deltas: true,
    }
}

/// The entry table and payload of a batch holding one plain page.
fn one_page(page: u64, fill: u8) -> (Vec<u8>, Vec<u8>) {
    let mut entries = Vec::new();
    PageEntry {
        page,
        encoding: PageEncoding::Plain,
    }
    .push_to(&mut entries);
    (entries, vec![fill; 4096])
}

/// Invariant 3: page 5 is sent in epoch 0 on channel 1 (old bytes) and in
/// epoch 1 on channel 0 (new bytes). Channel 1 holds its epoch-0 copy back
/// until channel 0 asks for its epoch-1 frame; without the barrier the old
/// copy would land last.
#[test]
fn a_page_resent_on_another_channel_never_lands_before_its_older_copy() {
    let region = Arc::new(GuestRegion::anonymous(16 * 4096).expect("mmap"));
    let ram = Ram::new(vec![RamBlock::new("ram", Arc::clone(&region))]);
    let (old_entries, old_bytes) = one_page(5, 0x01);
    let (new_entries, new_bytes) = one_page(5, 0x02);
    let old = PageBatch::new(0, 0, 4096, &old_entries, &old_bytes).expect("batch");
    let new = PageBatch::new(0, 1, 4096, &new_entries, &new_bytes).expect("batch");
    let log = Arc::new(Mutex::new(Vec::new()));
    // Channel 0: marker 0, then the new copy in epoch 1, marker 1, end.
    let mut zero = Scripted::new(
        0,
        vec![
            Message::SyncMarker(SyncMarker { epoch: 0, pages: 0 }),
            Message::Pages(new),
            Message::SyncMarker(SyncMarker { epoch: 1, pages: 1 }),
            Message::EndOfRam(EndOfRam { epochs: 2 }),
        ],
        Arc::clone(&log),
    );
    // Channel 1: the old copy in epoch 0 (held back until channel 0 takes
    // its epoch-1 frame, or a while), marker 0, marker 1, end.
    let mut one = Scripted::new(
        1,
        vec![
            Message::Pages(old),
            Message::SyncMarker(SyncMarker { epoch: 0, pages: 1 }),
            Message::SyncMarker(SyncMarker { epoch: 1, pages: 0 }),
            Message::EndOfRam(EndOfRam { epochs: 2 }),
        ],
        Arc::clone(&log),
    );
    one.wait_for = Some((0, (0, 1)));
    let shared = shared_for(&ram, 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| receive(1, &mut one, &shared));
        receive(0, &mut zero, &shared).expect("channel 0");
        other.join().expect("join").expect("channel 1");
    });
    let log = log.lock().expect("log").clone();
    let old_taken = log.iter().position(|e| *e == (1, 0)).expect("old copy taken");
    let new_taken = log.iter().position(|e| *e == (0, 1)).expect("new copy taken");
    assert!(
        old_taken < new_taken,
        "epoch 1 began before every channel finished epoch 0: {log:?}"
    );
    let mut page = vec![0u8; 4096];
    region.read(5 * 4096, &mut page).expect("read");
    assert!(page.iter().all(|&b| b == 0x02), "the older copy landed last");
}

#[test]
fn a_bad_batch_on_one_channel_stops_the_others() {
    let region = Arc::new(GuestRegion::anonymous(4 * 4096).expect("mmap"));
    let ram = Ram::new(vec![RamBlock::new("ram", region)]);
    let (entries, bytes) = one_page(9, 0x01); // page 9 of a 4-page block
    let bad = PageBatch::new(0, 0, 4096, &entries, &bytes).expect("batch");
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut zero = Scripted::new(
        0,
        vec![Message::SyncMarker(SyncMarker { epoch: 0, pages: 0 })],
        Arc::clone(&log),
    );
    let mut one = Scripted::new(1, vec![Message::Pages(bad)], Arc::clone(&log));
    let shared = shared_for(&ram, 2);
    let (first, second) = std::thread::scope(|scope| {
        let other = scope.spawn(|| {
            let result = receive(1, &mut one, &shared);
            if result.is_err() {
                shared.barrier.fail();
            }
            result
        });
        let first = receive(0, &mut zero, &shared);
        (first, other.join().expect("join"))
    });
    let err = second.expect_err("page outside the block");
    assert!(err.to_string().contains("outside block"), "{err}");
    assert!(matches!(first, Err(DestError::OtherChannelFailed)), "{first:?}");
}

#[test]
fn a_corrupt_frame_is_named_with_its_channel() {
    let region = Arc::new(GuestRegion::anonymous(4 * 4096).expect("mmap"));
    let ram = Ram::new(vec![RamBlock::new("ram", region)]);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut one = Scripted::new(1, vec![], Arc::clone(&log));
    one.corrupt_at = Some(0);
    let shared = shared_for(&ram, 2);
    let err = receive(1, &mut one, &shared).expect_err("corrupt frame");
    let text = ErrorChain(&err).to_string();
    assert!(text.starts_with("channel 1: malformed frame"), "{text}");
    assert!(text.contains("checksum mismatch in pages frame"), "{text}");
}

/// The head of a batch with `pages` (index, zero?), decoded the way a
/// transport that places page bytes itself decodes it.
fn head_of(pages: &[(u64, bool)], block: u32, page_size: u32) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut plain = 0;
    for &(page, zero) in pages {
        let encoding = if zero { PageEncoding::Zero } else { PageEncoding::Plain };
        PageEntry { page, encoding }.push_to(&mut entries);
        plain += usize::from(!zero);
    }
    let payload = vec![1u8; plain * page_size as usize];
    let batch = PageBatch::new(block, 0, page_size, &entries, &payload).expect("batch");
    let mut head = Vec::new();
    batch.encode_head(&mut head);
    head
}

#[test]
fn direct_targets_join_adjacent_pages_and_refuse_what_the_ram_lacks() {
    let region = Arc::new(GuestRegion::anonymous(8 * 4096).expect("mmap"));
    let ram = Ram::new(vec![RamBlock::new("ram", Arc::clone(&region))]);
    let targets = RamTargets::new(&ram, FreshMemory::Zeroed);
    let head = head_of(&[(1, false), (2, false), (3, true), (4, false), (5, false)], 0, 4096);
    let mut runs: Vec<GuestRun<'_>> = Vec::new();
    assert!(targets.runs(&PageBatch::decode_head(&head).expect("head"), &mut runs));
    let got: Vec<(usize, usize)> = runs.iter().map(|r| (r.offset, r.len)).collect();
    assert_eq!(got, vec![(4096, 2 * 4096), (4 * 4096, 2 * 4096)]);
    for refused in [
        head_of(&[(8, false)], 0, 4096), // past the block's end
        head_of(&[(0, false)], 1, 4096), // no such block
        head_of(&[(0, false)], 0, 8192), // another page size
    ] {
        let mut runs = Vec::new();
        assert!(!targets.runs(&PageBatch::decode_head(&refused).expect("head"), &mut runs));
    }
}

#[test]
fn fresh_file_backed_memory_is_filled_through_its_file_and_preallocated_memory_directly() {
    let shm = memfd_region(4 * 4096);
    let ram = Ram::new(vec![RamBlock::new("ram", shm)]);
    let head = head_of(&[(0, false)], 0, 4096);
    let batch = PageBatch::decode_head(&head).expect("head");
    for (fresh, direct) in [
        (FreshMemory::Zeroed, false),
        (FreshMemory::Unknown, false),
        (FreshMemory::Preallocated, true),
    ] {
        let targets = RamTargets::new(&ram, fresh);
        let mut runs = Vec::new();
        assert_eq!(targets.runs(&batch, &mut runs), direct, "{fresh:?}");
        assert_eq!(runs.len(), usize::from(direct));
    }
}

fn memfd_region(len: usize) -> Arc<GuestRegion> {
    Arc::new(GuestRegion::memfd("dest-test", len).expect("memfd"))
}

#[test]
fn a_placed_batch_is_recorded_from_its_hashes_and_needs_them() {
    let region = Arc::new(GuestRegion::anonymous(4 * 4096).expect("mmap"));
    let ram = Ram::new(vec![RamBlock::new("ram", Arc::clone(&region))]);
    let placer = Placer::new(&ram, FreshMemory::Zeroed);
    let head = head_of(&[(0, true), (2, false)], 0, 4096);
    let batch = PageBatch::decode_head(&head).expect("head");
    let err = placer.plan(&batch).err().expect("no hashes");
    assert!(err.to_string().contains("without its page hashes"), "{err}");
    // The transport wrote page 2 and hashed it there.
    region.fill(2 * 4096, 4096, 0x5a).expect("fill");
    let hash = crate::verify::page_hash(&[0x5a; 4096]);
    let placement = placer.plan(&batch.with_hashes(&[hash])).expect("plan");
    assert!(placement.is_empty(), "nothing left to write");
    let zero = crate::verify::page_hash(&[0; 4096]);
    assert_eq!(placer.digests(), vec![crate::verify::block_digest(&[zero, 0, hash, 0])]);
}

/// Guest RAM between inaccessible pages: a write past a block's edge would
/// fault, so a test that runs to its end proves none happened.
fn guarded_ram(blocks: usize, pages: usize) -> (Ram, Vec<Arc<GuestRegion>>) {
    let regions: Vec<_> = (0..blocks)
        .map(|_| Arc::new(GuestRegion::anonymous_guarded(pages * 4096).expect("guarded mmap")))
        .collect();
    let ram = Ram::new(
        regions
            .iter()
            .enumerate()
            .map(|(i, r)| RamBlock::new(format!("b{i}"), Arc::clone(r)))
            .collect(),
    );
    (ram, regions)
}

#[test]
fn hostile_batches_never_write_outside_guarded_guest_ram() {
    let (ram, regions) = guarded_ram(2, 4);
    // The edges are fair game: the last page of each block, plain and zero.
    let (last, bytes) = one_page(3, 0x77);
    let mut zero = Vec::new();
    PageEntry {
        page: 0,
        encoding: PageEncoding::Zero,
    }
    .push_to(&mut zero);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut channel = Scripted::new(
        0,
        vec![
            Message::Pages(PageBatch::new(0, 0, 4096, &last, &bytes).expect("batch")),
            Message::Pages(PageBatch::new(1, 0, 4096, &last, &bytes).expect("batch")),
            Message::Pages(PageBatch::new(1, 0, 4096, &zero, &[]).expect("batch")),
            Message::SyncMarker(SyncMarker { epoch: 0, pages: 3 }),
            Message::EndOfRam(EndOfRam { epochs: 1 }),
        ],
        Arc::clone(&log),
    );
    let shared = Shared {
        placer: Placer::new(&ram, FreshMemory::Unknown),
        ..shared_for(&ram, 1)
    };
    receive(0, &mut channel, &shared).expect("edge pages are placed");
    let mut page = vec![0u8; 4096];
    for region in &regions {
        region.read(3 * 4096, &mut page).expect("read");
        assert!(page.iter().all(|&b| b == 0x77));
    }
    // Past the edges: every lie is refused before anything is written.
    for (block, page_index) in [(0u32, 4u64), (1, 4), (1, 1 << 40), (2, 0)] {
        let (entries, bytes) = one_page(page_index, 0x66);
        let mut liar = Scripted::new(
            0,
            vec![Message::Pages(
                PageBatch::new(block, 0, 4096, &entries, &bytes).expect("batch"),
            )],
            Arc::clone(&log),
        );
        let shared = shared_for(&ram, 1);
        let err = receive(0, &mut liar, &shared).expect_err("refused");
        assert!(matches!(err, DestError::Protocol(_)), "{err}");
    }
}

/// A delta batch of one page: `delta` applied to page `page`.
fn one_delta(page: u64, delta: &[u8]) -> Vec<u8> {
    let mut table = Vec::new();
    migration_wire::push_delta_entry(&mut table, page, delta.len());
    table
}

/// Receives `messages` on a single channel into a 4-page block; returns
/// the outcome and the block's page 2.
fn receive_deltas(
    messages: Vec<Message<'_>>,
    deltas: bool,
) -> (Result<super::receive::ChannelEnd, DestError>, Vec<u8>) {
    let region = Arc::new(GuestRegion::anonymous(4 * 4096).expect("mmap"));
    let ram = Ram::new(vec![RamBlock::new("ram", Arc::clone(&region))]);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut channel = Scripted::new(0, messages, log);
    let shared = Shared {
        deltas,
        ..shared_for(&ram, 1)
    };
    let result = receive(0, &mut channel, &shared);
    let mut page = vec![0u8; 4096];
    region.read(2 * 4096, &mut page).expect("read");
    (result, page)
}

#[test]
fn a_delta_applies_to_the_copy_held_and_its_hash_follows() {
    let (entries, bytes) = one_page(2, 0x11);
    let mut new = vec![0x11u8; 4096];
    new[100..104].copy_from_slice(b"abcd");
    let mut delta = Vec::new();
    assert!(migration_wire::xbzrle::encode(
        &vec![0x11u8; 4096],
        &new,
        2048,
        &mut delta
    ));
    let table = one_delta(2, &delta);
    let messages = vec![
        Message::Pages(PageBatch::new(0, 0, 4096, &entries, &bytes).expect("batch")),
        Message::SyncMarker(SyncMarker { epoch: 0, pages: 1 }),
        Message::Deltas(migration_wire::DeltaBatch::new(0, 1, 4096, &table, &delta).expect("batch")),
        Message::SyncMarker(SyncMarker { epoch: 1, pages: 1 }),
        Message::EndOfRam(EndOfRam { epochs: 2 }),
    ];
    let (result, page) = receive_deltas(messages, true);
    result.expect("received");
    assert_eq!(page, new, "the delta landed on the page held");
}

#[test]
fn a_delta_for_a_page_never_sent_or_not_agreed_or_corrupt_is_refused() {
    let mut delta = Vec::new();
    let mut changed = [0u8; 4096];
    changed[..64].fill(1);
    assert!(migration_wire::xbzrle::encode(&[0u8; 4096], &changed, 2048, &mut delta));
    let table = one_delta(2, &delta);
    let batch = migration_wire::DeltaBatch::new(0, 0, 4096, &table, &delta).expect("batch");
    let (result, page) = receive_deltas(vec![Message::Deltas(batch.clone())], true);
    let err = result.expect_err("never sent whole");
    assert!(err.to_string().contains("never sent whole"), "{err}");
    assert!(page.iter().all(|&b| b == 0), "nothing written");

    let (result, _) = receive_deltas(vec![Message::Deltas(batch)], false);
    let err = result.expect_err("not agreed");
    assert!(err.to_string().contains("did not agree"), "{err}");

    // A delta that runs past the page: refused, and the page held stays.
    let (entries, bytes) = one_page(2, 0x11);
    let bad = [0x00, 0x7f, 0x7f];
    let table = one_delta(2, &bad);
    let messages = vec![
        Message::Pages(PageBatch::new(0, 0, 4096, &entries, &bytes).expect("batch")),
        Message::SyncMarker(SyncMarker { epoch: 0, pages: 1 }),
        Message::Deltas(migration_wire::DeltaBatch::new(0, 1, 4096, &table, &bad).expect("batch")),
    ];
    let (result, page) = receive_deltas(messages, true);
    let err = result.expect_err("corrupt delta");
    assert!(err.to_string().contains("delta for page 2"), "{err}");
    assert!(page.iter().all(|&b| b == 0x11), "the page held is untouched");
}
