//! The source's worker threads: a channel thread per connection (the data
//! path: pages read once from guest RAM, classified, compressed, sent) and
//! the reader of the return path.

use super::{Job, Returned};
use crate::compress::Compression;
use crate::engine::PageRun;
use crate::ram::Ram;
use crate::transport::{ChannelRx, ChannelTx, TransportError};
use crossbeam_channel::{Receiver, Sender, bounded};
use migration_sys::PAGE_SIZE;
use migration_wire::{Message, PageBatch, PageEncoding, PageEntry, SyncMarker};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Counters the channel thread updates and the control loop reads.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Payload bytes compression saved.
    pub(super) compression_saved: AtomicU64,
    pub(super) ram_bytes: AtomicU64,
    pub(super) wire_bytes: AtomicU64,
    pub(super) zero_pages: AtomicU64,
    pub(super) plain_pages: AtomicU64,
}

/// Why the channel thread stopped.
pub(super) enum ChannelFailure {
    Transport(TransportError),
    Memory(migration_sys::SysError),
}

impl From<TransportError> for ChannelFailure {
    fn from(err: TransportError) -> Self {
        ChannelFailure::Transport(err)
    }
}

pub(super) type ChannelThread = (Sender<Job>, JoinHandle<()>, Arc<Mutex<Option<ChannelFailure>>>);

/// The data path: reads pages from guest RAM into its own buffer once,
/// classifies them, and sends batches.
pub(super) fn spawn_channel_thread(
    index: usize,
    mut tx: Box<dyn ChannelTx>,
    ram: Ram,
    abandon: Arc<std::sync::atomic::AtomicBool>,
    counters: Arc<Counters>,
    mut encoder: PageEncoder,
) -> ChannelThread {
    let (jobs, queue) = bounded::<Job>(16);
    let error = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&error);
    let handle = std::thread::Builder::new()
        .name(format!("migration-channel-{index}"))
        .spawn(move || {
            let mut pages_in_epoch = 0u64;
            let base = tx.bytes_sent();
            let result = (|| -> Result<(), ChannelFailure> {
                for job in queue {
                    match job {
                        Job::Pages(_) | Job::EndEpoch { .. } if abandon.load(Ordering::Acquire) => {}
                        Job::Pages(run) => {
                            encoder.send_run(tx.as_mut(), &ram, run, &counters)?;
                            pages_in_epoch += run.count;
                        }
                        Job::EndEpoch { epoch, done } => {
                            tx.send(&Message::SyncMarker(SyncMarker {
                                epoch,
                                pages: pages_in_epoch,
                            }))?;
                            pages_in_epoch = 0;
                            let _ = done.send(());
                        }
                        Job::Control(message) => tx.send(&message)?,
                        Job::DeviceState(state) => tx.send(&Message::DeviceState(&state))?,
                        Job::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                    counters.wire_bytes.store(tx.bytes_sent() - base, Ordering::Relaxed);
                }
                Ok(())
            })();
            counters.wire_bytes.store(tx.bytes_sent() - base, Ordering::Relaxed);
            if let Err(err) = result {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
            }
            tx.shutdown();
        })
        .expect("spawning the channel thread");
    (jobs, handle, error)
}

/// What a channel thread does to pages between guest memory and the wire,
/// with the buffers it reuses: a zero page is recognised where it lies and
/// never copied; every other page is copied once from guest RAM into
/// `payload`, hashed there, and (optionally) compressed from there.
pub(super) struct PageEncoder {
    zero_pages: bool,
    compression: Compression,
    entries: Vec<u8>,
    payload: Vec<u8>,
    packed: Vec<u8>,
    /// xxh3-64 of each plain page, taken while it is in cache: the frame
    /// checksum of a batch sent as is is built from them.
    hashes: Vec<u64>,
}

impl PageEncoder {
    pub(super) fn new(zero_pages: bool, compression: Compression) -> Self {
        Self {
            zero_pages,
            compression,
            entries: Vec::new(),
            payload: Vec::new(),
            packed: Vec::new(),
            hashes: Vec::new(),
        }
    }

    fn send_run(
        &mut self,
        tx: &mut dyn ChannelTx,
        ram: &Ram,
        run: PageRun,
        counters: &Counters,
    ) -> Result<(), ChannelFailure> {
        let block = ram.block(run.block).expect("the engine only names announced blocks");
        let page_size = block.page_size() as usize;
        debug_assert_eq!(page_size, PAGE_SIZE);
        self.entries.clear();
        self.hashes.clear();
        // The buffer keeps its length between runs, so pages are read into
        // initialised memory without zeroing it again each time.
        let need = run.count as usize * page_size;
        if self.payload.len() < need {
            self.payload.resize(need, 0);
        }
        let mut filled = 0;
        let mut zero = 0;
        for page in run.first..run.first + run.count {
            let offset = page as usize * page_size;
            // A zero page is recognised where it lies (a read at several
            // times the speed of a copy) and never copied. A write racing
            // with the check is in the dirty log, so the page goes again.
            let zero_in_place = self.zero_pages
                && block
                    .region()
                    .is_zero(offset, page_size)
                    .map_err(ChannelFailure::Memory)?;
            let encoding = if zero_in_place {
                zero += 1;
                PageEncoding::Zero
            } else {
                let slot = &mut self.payload[filled..filled + page_size];
                block.region().read(offset, slot).map_err(ChannelFailure::Memory)?;
                if self.compression == Compression::None {
                    self.hashes.push(migration_wire::page::page_hash(slot));
                }
                filled += page_size;
                PageEncoding::Plain
            };
            PageEntry { page, encoding }.push_to(&mut self.entries);
        }
        let plain = &self.payload[..filled];
        let compressed = filled > 0 && self.compression.compress(plain, &mut self.packed);
        let batch = if compressed {
            counters
                .compression_saved
                .fetch_add((filled - self.packed.len()) as u64, Ordering::Relaxed);
            PageBatch::with_codec(
                run.block.0,
                run.epoch,
                page_size as u32,
                self.compression.codec(),
                &self.entries,
                &self.packed,
            )
        } else {
            PageBatch::new(run.block.0, run.epoch, page_size as u32, &self.entries, plain).map(|batch| {
                if self.compression == Compression::None {
                    batch.with_hashes(&self.hashes)
                } else {
                    batch
                }
            })
        }
        .expect("a batch built from the engine's runs is consistent");
        tx.send(&Message::Pages(batch))?;
        counters
            .ram_bytes
            .fetch_add(run.count * page_size as u64, Ordering::Relaxed);
        counters.zero_pages.fetch_add(zero, Ordering::Relaxed);
        counters.plain_pages.fetch_add(run.count - zero, Ordering::Relaxed);
        Ok(())
    }
}

/// The return path: forwards what the destination says.
pub(super) fn spawn_reader_thread(mut rx: Box<dyn ChannelRx>) -> Receiver<Returned> {
    let (forward, returned) = bounded(1024);
    std::thread::Builder::new()
        .name("migration-return-path".into())
        .spawn(move || {
            // The destination may be quiet for long stretches (a long pass).
            if let Err(err) = rx.set_timeout(None) {
                let _ = forward.send(Returned::Failed(err));
                return;
            }
            loop {
                let message = match rx.recv() {
                    Ok(Message::Ack(ack)) => Returned::Ack(ack.epoch),
                    Ok(Message::Ready) => Returned::Ready,
                    Ok(Message::Resumed) => Returned::Resumed,
                    Ok(Message::Verdict(v)) => Returned::Verdict(v),
                    Ok(Message::Error(e)) => Returned::Error(e),
                    Ok(other) => Returned::Unexpected(other.kind().name()),
                    Err(err) => Returned::Failed(err),
                };
                let last = matches!(message, Returned::Failed(_) | Returned::Error(_) | Returned::Verdict(_));
                if forward.send(message).is_err() || last {
                    return;
                }
            }
        })
        .expect("spawning the return-path thread");
    returned
}
