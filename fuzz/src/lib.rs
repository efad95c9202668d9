//! Fuzz targets: every decoder of untrusted bytes, and a stateful target
//! that drives the precopy engine with arbitrary sequences of dirty-log
//! syncs, guest writes, progress reports, pauses and time, checking the
//! invariants of `DESIGN.md` (no write is lost, no page leaves its block,
//! phases only move along the phase table).
//!
//! This toolchain is stable Rust only, so coverage-guided engines (which
//! need nightly's sanitizer flags) are out; `src/main.rs` drives the targets
//! with seeded mutations of a seed corpus (`fuzz/corpus/TARGET/`), and the
//! tests replay the corpus, every saved crash (`fuzz/regressions/`) and a
//! short deterministic run of each target.
#![forbid(unsafe_code)]

use migration_core::engine::{Action, AutoConverge, PostcopyWhen, PrecopyConfig, PrecopyEngine};
use migration_core::source::pause_vm;
use migration_core::{BlockId, Vm, VmError};
use migration_wire::frame::decode_frame;
use migration_wire::mapped_ram::{self, CommitRecord, FileHeader, Layout};
use migration_wire::xbzrle;
use migration_wire::{
    Block, BlockList, Complete, EndOfRam, Features, Hello, Message, MessageKind, PageBatch, PageEncoding, PageEntry,
    SessionId, SyncMarker,
};
use std::time::{Duration, Instant};

/// A target: a name and a function that must not panic on any bytes
/// (a panic is a finding; an invariant check panics too).
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("frame", frame),
    ("bodies", bodies),
    ("page-head", page_head),
    ("mapped-ram", mapped_ram_file),
    ("engine", engine),
    ("destination", destination),
    ("xbzrle", xbzrle),
    ("rdma", rdma),
];

/// Whole frames: decoding is total, and what decodes re-encodes to the same
/// bytes (so no two encodings mean one message).
fn frame(data: &[u8]) {
    if let Ok((message, used)) = decode_frame(data) {
        let mut again = Vec::new();
        message.encode(&mut again);
        assert_eq!(again, data[..used], "a decoded frame re-encodes to its bytes");
    }
}

/// Every message body decoder, on the same bytes.
fn bodies(data: &[u8]) {
    for raw in 0..=64u16 {
        if let Ok(kind) = MessageKind::from_raw(raw) {
            let _ = Message::decode_body(kind, data);
        }
    }
}

/// The head-first page batch decoders a receiver uses to place pages.
fn page_head(data: &[u8]) {
    if data.len() >= migration_wire::page::BATCH_HEADER_LEN
        && let Ok((entries, payload)) =
            migration_wire::page::batch_lengths(&data[..migration_wire::page::BATCH_HEADER_LEN])
    {
        assert!(entries <= migration_wire::MAX_PAGES_PER_BATCH as usize * 8);
        let _ = payload;
    }
    if let Ok(batch) = PageBatch::decode_head(data) {
        assert!(batch.is_placed());
        assert!(batch.entries().all(|e| e.is_ok()));
    }
}

/// The simulated RDMA transport's records and NIC link messages: decoding
/// is total, and what decodes re-encodes to the same bytes.
fn rdma(data: &[u8]) {
    use migration_wire::rdma::{LinkHello, MemfdGrant, RdmaRecord, WriteAck, WriteRequest};
    if let Ok(record) = RdmaRecord::decode(data) {
        let mut again = Vec::new();
        record.encode(&mut again);
        assert_eq!(again, data, "a decoded record re-encodes to its bytes");
        if let RdmaRecord::Placed { head, .. } = record {
            page_head(head);
        }
    }
    if let Ok(grant) = MemfdGrant::decode(data) {
        let mut again = Vec::new();
        grant.encode(&mut again);
        assert_eq!(again, data, "a decoded grant re-encodes to its bytes");
    }
    if let Ok(hello) = LinkHello::decode(data) {
        assert_eq!(hello.encode()[..], *data);
    }
    if let Ok(write) = WriteRequest::decode(data) {
        assert_eq!(write.encode()[..], *data);
    }
    if let Ok(ack) = WriteAck::decode(data) {
        assert_eq!(ack.encode()[..], *data);
    }
}

/// A two-block layout the mapped-ram target reads commit records against.
fn fixed_header() -> FileHeader {
    let layout = Layout::new(&BlockList {
        blocks: vec![
            Block {
                name: "pc.ram".into(),
                length: 9 * 4096,
                page_size: 4096,
            },
            Block {
                name: "pc.ram.high".into(),
                length: 3 * 4096,
                page_size: 4096,
            },
        ],
    })
    .expect("layout");
    FileHeader::decode(&layout.encode_header(SessionId(1))).expect("header")
}

/// The mapped-ram file header, commit record and bitmap checks.
fn mapped_ram_file(data: &[u8]) {
    if let Ok(header) = FileHeader::decode(data) {
        // A header that decodes has a layout its own blocks give.
        let again = Layout::new(&BlockList {
            blocks: header.layout.blocks.iter().map(|b| b.block.clone()).collect(),
        })
        .expect("a decoded layout lays out again");
        assert_eq!(again, header.layout);
    }
    let _ = mapped_ram::header_len(data);
    let header = fixed_header();
    let _ = CommitRecord::decode(&header, data.len() as u64, data);
    for block in &header.layout.blocks {
        if let Ok(stored) = mapped_ram::check_bitmap(block, data) {
            assert!(stored <= block.pages());
        }
    }
}

/// The page the xbzrle target decodes deltas onto.
fn xbzrle_page() -> Vec<u8> {
    (0..4096u32).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect()
}

/// XBZRLE deltas: decoding arbitrary bytes onto a 4096-byte page is total
/// and leaves the page alone when it fails; what decodes re-encodes to a
/// delta that gives the same page. Then the input's two halves, as old and
/// new page, round-trip through encode and decode, and encoding within a
/// limit succeeds exactly when the unlimited encoding fits.
fn xbzrle(data: &[u8]) {
    let old = xbzrle_page();
    let mut page = old.clone();
    match xbzrle::decode(data, &mut page) {
        Ok(()) => {
            assert_eq!(page.len(), old.len());
            let mut delta = Vec::new();
            assert!(xbzrle::encode(&old, &page, usize::MAX, &mut delta));
            let mut again = old.clone();
            xbzrle::decode(&delta, &mut again).expect("an encoding decodes");
            assert_eq!(again, page, "a decoded page re-encodes to itself");
        }
        Err(_) => assert_eq!(page, old, "a failed decode leaves the page alone"),
    }

    let half = (data.len() / 2).min(xbzrle::MAX_PAGE_LEN);
    let (old, new) = (&data[..half], &data[half..2 * half]);
    let mut whole = Vec::new();
    assert!(xbzrle::encode(old, new, usize::MAX, &mut whole));
    assert_eq!(whole.is_empty(), old == new);
    let mut page = old.to_vec();
    xbzrle::decode(&whole, &mut page).expect("an encoding decodes");
    assert_eq!(page, new, "encode then decode gives the new page");
    let mut limited = Vec::new();
    let fits = xbzrle::encode(old, new, half, &mut limited);
    assert_eq!(fits, whole.len() <= half);
    if fits {
        assert_eq!(limited, whole);
    }
}

/// A VM that pauses at once (the engine's pause token needs one).
struct Paused;

impl Vm for Paused {
    fn pause(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn save_device_state(&mut self) -> Result<Vec<u8>, VmError> {
        Ok(Vec::new())
    }
    fn load_device_state(&mut self, _: &[u8]) -> Result<(), VmError> {
        Ok(())
    }
}

/// Reads the input a byte at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.byte()) | (u16::from(self.byte()) << 8)
    }

    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// Drives the engine as a runtime would, with the guest's writes, the
/// clock, progress and the dirty log chosen by the input. Checks that every
/// write reaches a later send before the engine finishes, that every run
/// lies inside its block and is of the current epoch, that no page goes
/// twice in one epoch, and that phases only move along the phase table.
fn engine(data: &[u8]) {
    let _ = engine_outcome(data);
}

/// How a run of the engine target ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineOutcome {
    /// Precopy finished: every write reached a later send.
    Finished,
    /// The engine gave up (an iteration or time limit, as configured).
    Failed,
    /// The step budget ran out first.
    Unfinished,
    /// The engine switched to postcopy: every write after a page's last
    /// send is in the set of pages it hands to postcopy.
    Postcopy,
}

/// The engine target, telling how the run ended.
pub fn engine_outcome(data: &[u8]) -> EngineOutcome {
    let mut input = Input(data);
    let blocks: Vec<(u64, u64)> = (0..1 + input.byte() % 3)
        .map(|_| (1 + u64::from(input.byte() % 200), 4096))
        .collect();
    let downtime_limit = Duration::from_millis(u64::from(input.byte()));
    let max_iterations = Some(1 + u64::from(input.byte() % 8));
    let batch_pages = 1 + u32::from(input.byte() % 64);
    let shape = input.byte();
    let config = PrecopyConfig {
        downtime_limit,
        max_iterations,
        batch_pages,
        max_bandwidth: (shape % 4 == 0).then_some(1 << 20),
        postcopy: match shape / 4 % 4 {
            0 => Some(PostcopyWhen::NotConverging),
            1 => Some(PostcopyWhen::AfterPasses(u64::from(shape / 16 % 3))),
            _ => None,
        },
        auto_converge: (shape & 0x40 != 0).then_some(AutoConverge {
            tailslow: shape & 0x80 != 0,
            ..AutoConverge::default()
        }),
        ..PrecopyConfig::default()
    };
    let start = Instant::now();
    let mut now = start;
    let mut engine = PrecopyEngine::with_pages(blocks.clone(), config, now);
    let mut seq = 0u64;
    // Per page: the last write and the last send (operation counters).
    let mut written: Vec<Vec<u64>> = blocks.iter().map(|&(p, _)| vec![0; p as usize]).collect();
    let mut sent: Vec<Vec<Option<u64>>> = blocks.iter().map(|&(p, _)| vec![None; p as usize]).collect();
    // Writes the dirty log has not reported yet.
    let mut unreported: Vec<Vec<bool>> = blocks.iter().map(|&(p, _)| vec![false; p as usize]).collect();
    let mut sent_in_epoch: Vec<Vec<bool>> = blocks.iter().map(|&(p, _)| vec![false; p as usize]).collect();
    let mut paused = false;
    let mut ram_bytes = 0u64;
    let mut phase = engine.phase();
    let report = |engine: &mut PrecopyEngine, unreported: &mut Vec<Vec<bool>>| {
        for (b, pages) in unreported.iter_mut().enumerate() {
            for (p, dirty) in pages.iter_mut().enumerate() {
                if std::mem::take(dirty) {
                    engine.handle_dirty(BlockId(b as u32), p as u64, 1);
                }
            }
        }
    };
    for _ in 0..10_000 {
        seq += 1;
        // Once the input runs out, the runtime just keeps driving.
        let op = if input.done() { 3 } else { input.byte() };
        match op % 4 {
            // The guest writes a page (not once paused).
            0 if !paused => {
                let b = usize::from(input.byte()) % blocks.len();
                let p = usize::from(input.u16()) % written[b].len();
                written[b][p] = seq;
                unreported[b][p] = true;
            }
            // Time passes.
            1 => now += Duration::from_millis(u64::from(input.byte())),
            // Progress is reported (monotonic, as the runtime does).
            2 => engine.handle_progress(ram_bytes, ram_bytes),
            _ => {
                let action = engine.poll(now);
                let next = engine.phase();
                assert!(phase == next || phase.can_become(next), "{phase:?} -> {next:?}");
                phase = next;
                match action {
                    Action::Send(run) => {
                        let b = run.block.0 as usize;
                        assert!(b < blocks.len(), "run of block {b}");
                        assert!(run.count >= 1 && run.first + run.count <= blocks[b].0, "{run:?}");
                        assert_eq!(run.epoch, engine.epoch(), "{run:?}");
                        for p in run.pages() {
                            assert!(!sent_in_epoch[b][p as usize], "page {p} twice in epoch {}", run.epoch);
                            sent_in_epoch[b][p as usize] = true;
                            sent[b][p as usize] = Some(seq);
                        }
                        ram_bytes += run.len() * 4096;
                    }
                    Action::EndEpoch { epoch } => {
                        assert_eq!(epoch, engine.epoch());
                        sent_in_epoch.iter_mut().for_each(|m| m.fill(false));
                    }
                    Action::SyncDirtyLog => {
                        report(&mut engine, &mut unreported);
                        engine.handle_sync_done(now);
                    }
                    Action::Pause { .. } => {
                        paused = true;
                        let token = pause_vm(&mut Paused).expect("pause");
                        report(&mut engine, &mut unreported);
                        engine.handle_paused(&token, now);
                    }
                    Action::Finish => {
                        assert!(paused, "finished without pausing");
                        for (b, pages) in written.iter().enumerate() {
                            for (p, &w) in pages.iter().enumerate() {
                                let s = sent[b][p].unwrap_or_else(|| panic!("page {p} of block {b} never sent"));
                                assert!(s > w, "page {p} of block {b} written at {w} after its last send at {s}");
                            }
                        }
                        return EngineOutcome::Finished;
                    }
                    Action::Postcopy { .. } => {
                        let token = pause_vm(&mut Paused).expect("pause");
                        report(&mut engine, &mut unreported);
                        let left = engine.handle_postcopy_paused(&token);
                        assert_eq!(engine.phase(), migration_core::engine::Phase::Postcopy);
                        for (b, pages) in written.iter().enumerate() {
                            for (p, &w) in pages.iter().enumerate() {
                                let stale = sent[b][p].is_none_or(|s| s < w);
                                assert!(
                                    !stale || left[b].get(p as u64),
                                    "page {p} of block {b} written at {w} after its last send is not left for postcopy"
                                );
                            }
                        }
                        return EngineOutcome::Postcopy;
                    }
                    Action::Throttle { percent } => assert!((1..=99).contains(&percent), "throttle {percent}"),
                    Action::Fail(_) => return EngineOutcome::Failed,
                    Action::Wait(until) => {
                        now = match until {
                            Some(until) => now.max(until),
                            None => now + Duration::from_millis(10),
                        };
                    }
                }
                // Inputs move the phase too (a sync done, the pause).
                let next = engine.phase();
                assert!(phase == next || phase.can_become(next), "{phase:?} -> {next:?}");
                phase = next;
            }
        }
    }
    EngineOutcome::Unfinished
}

/// A channel that plays frames from the fuzz input, as a (hostile) source
/// would send them; what the destination sends back is dropped.
struct Played {
    frames: std::collections::VecDeque<Vec<u8>>,
    current: Vec<u8>,
}

impl Played {
    /// Splits `data` into frames (each led by its frame header); trailing
    /// bytes that are no frame are played as they are, and fail to decode.
    fn new(data: &[u8]) -> Self {
        let mut frames = std::collections::VecDeque::new();
        let mut rest = data;
        while !rest.is_empty() {
            let len = rest
                .first_chunk::<{ migration_wire::FRAME_HEADER_LEN }>()
                .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize + migration_wire::FRAME_HEADER_LEN)
                .unwrap_or(rest.len())
                .min(rest.len());
            frames.push_back(rest[..len].to_vec());
            rest = &rest[len..];
        }
        Self {
            frames,
            current: Vec::new(),
        }
    }
}

impl migration_core::ChannelTx for Played {
    fn send(&mut self, _: &Message<'_>) -> Result<(), migration_core::TransportError> {
        Ok(())
    }
    fn bytes_sent(&self) -> u64 {
        0
    }
    fn shutdown(&mut self) {}
}

impl migration_core::ChannelRx for Played {
    fn recv(&mut self) -> Result<Message<'_>, migration_core::TransportError> {
        self.current = self.frames.pop_front().ok_or(migration_core::TransportError::Closed)?;
        Ok(decode_frame(&self.current)?.0)
    }
    fn take_body(&mut self, replacement: Vec<u8>) -> Vec<u8> {
        // The placement wants the frame body: drop the header.
        let body = self
            .current
            .split_off(migration_wire::FRAME_HEADER_LEN.min(self.current.len()));
        self.current = replacement;
        body
    }
    fn set_timeout(&mut self, _: Option<Duration>) -> Result<(), migration_core::TransportError> {
        Ok(())
    }
    fn bytes_received(&self) -> u64 {
        0
    }
}

impl migration_core::Channel for Played {
    fn split(self: Box<Self>) -> Result<migration_core::transport::ChannelHalves, migration_core::TransportError> {
        Err(migration_core::TransportError::Closed)
    }
    fn peer(&self) -> String {
        "fuzz input".into()
    }
    fn closer(&self) -> Result<migration_core::transport::Closer, migration_core::TransportError> {
        Ok(Box::new(|| {}))
    }
}

/// The destination runtime fed a stream from the input on one channel:
/// whatever it is, the runtime returns (no panic, no hang: every wait is
/// bounded), never writes outside guest RAM (each block sits between
/// inaccessible pages, so a stray write kills the run), and never lets a
/// guest run without a complete, consistent stream.
fn destination(data: &[u8]) {
    let _ = destination_resumed(data);
}

/// The destination target, telling whether the guest was resumed (the
/// stream was complete and consistent up to GO).
pub fn destination_resumed(data: &[u8]) -> bool {
    use migration_core::dest::{DestOptions, FreshMemory, accept, run_destination};
    let options = DestOptions {
        max_ram: 1 << 20,
        max_channels: 1,
        io_timeout: Duration::from_millis(20),
        ..DestOptions::default()
    };
    let Ok(incoming) = accept(Box::new(Played::new(data)), &options) else {
        return false;
    };
    let blocks: Vec<migration_core::RamBlock> = incoming
        .blocks()
        .blocks
        .iter()
        .map(|b| {
            let region = migration_sys::GuestRegion::anonymous_guarded(b.length as usize).expect("guarded memory");
            migration_core::RamBlock::new(b.name.clone(), std::sync::Arc::new(region))
        })
        .collect();
    let ram = migration_core::Ram::new(blocks);
    let mut vm = Paused;
    let mut no_more = |_: Duration| -> Result<Box<dyn migration_core::Channel>, migration_core::TransportError> {
        Err(migration_core::TransportError::Closed)
    };
    match run_destination(
        incoming,
        &mut no_more,
        &ram,
        FreshMemory::Zeroed,
        &mut vm,
        &options,
        &mut |_| {},
    ) {
        Ok(_) => true,
        Err(failure) => failure.resumed,
    }
}

/// Valid inputs each target starts from.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut entries = Vec::new();
    PageEntry {
        page: 3,
        encoding: PageEncoding::Plain,
    }
    .push_to(&mut entries);
    PageEntry {
        page: 4,
        encoding: PageEncoding::Zero,
    }
    .push_to(&mut entries);
    let payload = vec![0x5a; 4096];
    let batch = PageBatch::new(1, 2, 4096, &entries, &payload).expect("batch");
    let mut delta_table = Vec::new();
    migration_wire::push_delta_entry(&mut delta_table, 3, 6);
    let messages = [
        Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            features: Features::ZERO_PAGES.union(Features::LZ4),
            session: SessionId(7),
            channels: 2,
        }),
        Message::BlockList(BlockList {
            blocks: vec![Block {
                name: "pc.ram".into(),
                length: 1 << 20,
                page_size: 4096,
            }],
        }),
        Message::Pages(batch.clone()),
        Message::Deltas(
            migration_wire::DeltaBatch::new(0, 2, 4096, &delta_table, b"\x10\x04abcd").expect("delta batch"),
        ),
        Message::SyncMarker(SyncMarker { epoch: 2, pages: 2 }),
        Message::EndOfRam(EndOfRam { epochs: 3 }),
        Message::Complete(Complete { digests: vec![1, 2] }),
        Message::Ready,
    ];
    for message in &messages {
        let mut frame = Vec::new();
        message.encode(&mut frame);
        frames.push(frame);
    }
    match target {
        "frame" => frames,
        "bodies" => frames
            .iter()
            .map(|f| f[migration_wire::FRAME_HEADER_LEN..].to_vec())
            .collect(),
        "page-head" => {
            let mut head = Vec::new();
            batch.encode_head(&mut head);
            vec![head]
        }
        "mapped-ram" => {
            let header = fixed_header();
            let commit = CommitRecord {
                state_len: 10,
                state_hash: 1,
                header_hash: header.checksum,
                epochs: 2,
                blocks: vec![Default::default(); 2],
            };
            vec![
                header.layout.encode_header(SessionId(1)),
                commit.encode(&header.layout),
                vec![0b0000_0101, 0],
            ]
        }
        "destination" => {
            let blocks = BlockList {
                blocks: vec![Block {
                    name: "ram".into(),
                    length: 8 * 4096,
                    page_size: 4096,
                }],
            };
            let mut entries = Vec::new();
            for page in 0..8 {
                PageEntry {
                    page,
                    encoding: if page % 2 == 0 {
                        PageEncoding::Plain
                    } else {
                        PageEncoding::Zero
                    },
                }
                .push_to(&mut entries);
            }
            let mut delta_table = Vec::new();
            migration_wire::push_delta_entry(&mut delta_table, 2, 6);
            let payload = vec![0x42; 4 * 4096];
            let stream = [
                Message::Hello(Hello {
                    min_version: 1,
                    max_version: 1,
                    features: Features::ZERO_PAGES.union(Features::XBZRLE),
                    session: SessionId(3),
                    channels: 1,
                }),
                Message::BlockList(blocks),
                Message::Pages(PageBatch::new(0, 0, 4096, &entries, &payload).expect("batch")),
                Message::SyncMarker(SyncMarker { epoch: 0, pages: 8 }),
                // Page 2 again, as a delta: 4 bytes changed at offset 16.
                Message::Deltas(
                    migration_wire::DeltaBatch::new(0, 1, 4096, &delta_table, b"\x10\x04abcd").expect("delta batch"),
                ),
                Message::SyncMarker(SyncMarker { epoch: 1, pages: 1 }),
                Message::DeviceState(b"state"),
                Message::EndOfRam(EndOfRam { epochs: 2 }),
                Message::Go,
                Message::Complete(Complete { digests: vec![0] }),
            ];
            let mut whole = Vec::new();
            for message in &stream {
                message.encode(&mut whole);
            }
            vec![whole]
        }
        "xbzrle" => {
            // Deltas onto the target's page: one pair, then several with
            // two- and three-byte lengths reaching the page's end.
            let old = xbzrle_page();
            let mut one = old.clone();
            one[100..108].copy_from_slice(b"changed!");
            let mut many = old.clone();
            for at in [0, 1, 2, 200, 201, 1000, 3000, 4095] {
                many[at] ^= 0xff;
            }
            many[2048..2048 + 300].fill(0);
            let deltas = [one, many].map(|new| {
                let mut delta = Vec::new();
                xbzrle::encode(&old, &new, usize::MAX, &mut delta);
                delta
            });
            // Old and new page as halves: a sparse change.
            let old: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
            let mut new = old.clone();
            new[..16].fill(0xee);
            new[300..364].iter_mut().for_each(|b| *b = !*b);
            let [one, many] = deltas;
            vec![one, many, [old, new].concat()]
        }
        "rdma" => {
            use migration_wire::rdma::{
                AckStatus, LinkHello, MemfdGrant, NicKind, RdmaRecord, RegionKey, RegionTable, WriteAck, WriteRequest,
            };
            let mut head = Vec::new();
            batch.encode_head(&mut head);
            let records = [
                RdmaRecord::Regions(RegionTable {
                    nic: NicKind::Tcp,
                    qp: 3,
                    token: 0x1234,
                    link: "127.0.0.1:40000".into(),
                    regions: vec![
                        RegionKey {
                            block: 0,
                            rkey: 0xdead,
                            len: 1 << 20,
                        },
                        RegionKey {
                            block: 1,
                            rkey: 0xbeef,
                            len: 1 << 21,
                        },
                    ],
                }),
                RdmaRecord::Placed {
                    checksum: batch.frame_checksum(),
                    head: &head,
                },
            ];
            let mut seeds: Vec<Vec<u8>> = records
                .iter()
                .map(|r| {
                    let mut out = Vec::new();
                    r.encode(&mut out);
                    out
                })
                .collect();
            let mut grant = Vec::new();
            MemfdGrant {
                regions: vec![(0xdead, 0), (0xbeef, 1 << 20)],
            }
            .encode(&mut grant);
            seeds.push(grant);
            seeds.push(LinkHello { token: 99, qp: 1 }.encode().to_vec());
            seeds.push(
                WriteRequest {
                    wr_id: 7,
                    rkey: 0xdead,
                    offset: 4096,
                    len: 4096,
                }
                .encode()
                .to_vec(),
            );
            seeds.push(
                WriteAck {
                    wr_id: 7,
                    status: AckStatus::RemoteAccess,
                }
                .encode()
                .to_vec(),
            );
            seeds
        }
        "engine" => vec![
            vec![1, 50, 10, 3, 16, 1],
            vec![
                2, 20, 30, 0, 4, 8, 1, 0, 0, 3, 3, 3, 0, 1, 5, 0, 3, 3, 3, 1, 200, 3, 3, 3, 3,
            ],
            (0..=255).collect(),
        ],
        _ => Vec::new(),
    }
}

/// A small seeded generator (xorshift64*).
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// One mutation of `input`: bit flips, byte sets, interesting values,
/// truncation, duplication of a slice, or a splice with `other`.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next_u64() as u8;
            }
            2 if !out.is_empty() => {
                let i = rng.below(out.len());
                let values = [0u8, 1, 0x7f, 0x80, 0xff];
                out[i] = values[rng.below(values.len())];
            }
            3 if !out.is_empty() => {
                let keep = rng.below(out.len());
                out.truncate(keep);
            }
            4 if !out.is_empty() && out.len() < 1 << 16 => {
                let from = rng.below(out.len());
                let len = rng.below(out.len() - from).max(1);
                let at = rng.below(out.len());
                let slice = out[from..from + len].to_vec();
                out.splice(at..at, slice);
            }
            5 if !other.is_empty() => {
                let cut = rng.below(out.len() + 1);
                let from = rng.below(other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            _ => {
                // Overwrite a little-endian word with a boundary value.
                if out.len() >= 4 {
                    let i = rng.below(out.len() - 3);
                    let values = [0u32, 1, u32::MAX, 4096, 1 << 30];
                    out[i..i + 4].copy_from_slice(&values[rng.below(values.len())].to_le_bytes());
                }
            }
        }
    }
    out
}
