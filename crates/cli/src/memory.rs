//! Guest RAM for the CLI: anonymous memory or a shared file, split into
//! blocks.

use anyhow::{Context, Result, bail};
use migration_core::dest::FreshMemory;
use migration_core::{Ram, RamBlock};
use migration_sys::{GuestRegion, PAGE_SIZE};
use migration_wire::BlockList;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

/// Guest RAM and how it is backed.
pub struct GuestMemory {
    pub ram: Ram,
    pub fresh: FreshMemory,
}

impl GuestMemory {
    /// The regions, in block order, for the guest.
    pub fn regions(&self) -> Vec<Arc<GuestRegion>> {
        self.ram.blocks().iter().map(|b| Arc::clone(b.region())).collect()
    }
}

/// The source's block layout: a low and a high block, as a PC has below
/// and above its PCI hole (one block when RAM is a single page).
pub fn source_layout(total: u64) -> Result<Vec<(String, u64)>> {
    let page = PAGE_SIZE as u64;
    if total == 0 || total % page != 0 {
        bail!("guest memory size {total} is not a positive multiple of {page} bytes");
    }
    let pages = total / page;
    if pages == 1 {
        return Ok(vec![("pc.ram".into(), total)]);
    }
    let low = pages.div_ceil(2) * page;
    Ok(vec![("pc.ram".into(), low), ("pc.ram.high".into(), total - low)])
}

/// The layout of the blocks of `blocks`: each one's name and length.
pub fn layout(blocks: &BlockList) -> Vec<(String, u64)> {
    blocks.blocks.iter().map(|b| (b.name.clone(), b.length)).collect()
}

/// Fresh memory (reads as zero) for the blocks of `layout`, each region
/// made by `make(name, len)`.
fn fresh_blocks(
    layout: &[(String, u64)],
    kind: &str,
    make: impl Fn(&str, usize) -> Result<GuestRegion, migration_sys::SysError>,
) -> Result<GuestMemory> {
    let blocks = layout
        .iter()
        .map(|(name, len)| {
            let region = make(name, usize::try_from(*len)?)
                .with_context(|| format!("mapping {len} bytes of {kind} for {name}"))?;
            Ok(RamBlock::new(name.clone(), Arc::new(region)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(GuestMemory {
        ram: Ram::new(blocks),
        fresh: FreshMemory::Zeroed,
    })
}

/// Anonymous memory for the blocks of `layout`.
pub fn anonymous(layout: &[(String, u64)]) -> Result<GuestMemory> {
    fresh_blocks(layout, "anonymous memory", |_, len| GuestRegion::anonymous(len))
}

/// Memfd-backed memory for the blocks of `layout`: what the destination
/// uses unless told to use a file, since incoming pages fill it through
/// the page cache without the kernel zeroing each page first.
pub fn shared_anonymous(layout: &[(String, u64)]) -> Result<GuestMemory> {
    fresh_blocks(layout, "shared memory (memfd)", GuestRegion::memfd)
}

/// The blocks of `layout` back to back, each region made by
/// `make(name, offset, len)`.
fn back_to_back(layout: &[(String, u64)], make: impl Fn(&str, u64, usize) -> Result<GuestRegion>) -> Result<Ram> {
    let mut offset = 0u64;
    let mut blocks = Vec::new();
    for (name, len) in layout {
        let region = make(name, offset, usize::try_from(*len)?)?;
        blocks.push(RamBlock::new(name.clone(), Arc::new(region)));
        offset += len;
    }
    Ok(Ram::new(blocks))
}

/// Maps the blocks of `layout` back to back from the start of `file`.
fn map_file(file: &File, path: &Path, layout: &[(String, u64)]) -> Result<GuestMemory> {
    let ram = back_to_back(layout, |name, offset, len| {
        GuestRegion::shared_file_at(file, offset, len)
            .with_context(|| format!("mapping {name} from {} at offset {offset}", path.display()))
    })?;
    Ok(GuestMemory {
        ram,
        fresh: FreshMemory::Unknown,
    })
}

/// The source's RAM from an existing file; its size is the guest's size.
pub fn source_file(path: &Path) -> Result<GuestMemory> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening --mem-file {}", path.display()))?;
    let len = file.metadata()?.len();
    let layout = source_layout(len).with_context(|| format!("--mem-file {}", path.display()))?;
    map_file(&file, path, &layout)
}

/// Guest RAM of a given size, every page allocated and mapped ahead of a
/// migration (as a VMM that preallocates guest RAM at start, like QEMU's
/// `prealloc=on`): anonymous memory (transparent huge pages where the
/// kernel gives them), populated on two threads, handed out as RAM blocks
/// once the source announces them.
pub struct Preallocated {
    whole: Arc<GuestRegion>,
}

impl Preallocated {
    /// Preallocates `size` bytes: anonymous memory, or a memfd when the
    /// memory is to be `shared` with another process.
    pub fn new(size: u64, shared: bool) -> Result<Self> {
        let len = usize::try_from(size)?;
        let whole = if shared {
            GuestRegion::memfd("guest-ram", len)
        } else {
            GuestRegion::anonymous(len)
        }
        .context("mapping preallocated memory")?;
        migration_sys::region::populate_all([&whole]).context("populating preallocated memory")?;
        Ok(Self { whole: Arc::new(whole) })
    }

    pub fn size(&self) -> u64 {
        self.whole.len() as u64
    }

    /// The blocks of `layout`, back to back.
    fn blocks(&self, layout: &[(String, u64)]) -> Result<GuestMemory> {
        let ram = back_to_back(layout, |name, offset, len| {
            GuestRegion::part(&self.whole, offset as usize, len)
                .with_context(|| format!("placing {name} in preallocated memory at offset {offset}"))
        })?;
        Ok(GuestMemory {
            ram,
            fresh: FreshMemory::Preallocated,
        })
    }
}

/// The destination's RAM for an announced block list: in preallocated
/// memory, in a file (created or resized to fit), in anonymous memory
/// between inaccessible pages (`guarded`), in private anonymous memory
/// where the migration may switch to `postcopy` (userfaultfd places pages
/// there), or in fresh shared memory.
pub fn destination(
    blocks: &BlockList,
    mem_file: Option<&Path>,
    prealloc: Option<&Preallocated>,
    guarded: bool,
    postcopy: bool,
) -> Result<GuestMemory> {
    let layout = layout(blocks);
    // A preallocation is of the announced size: the handshake refuses
    // another (`DestOptions::ram_size`), or it was made for these blocks.
    if let Some(memory) = prealloc {
        return memory.blocks(&layout);
    }
    if guarded {
        return fresh_blocks(&layout, "anonymous memory between guard pages", |_, len| {
            GuestRegion::anonymous_guarded(len)
        });
    }
    let Some(path) = mem_file else {
        return if postcopy {
            anonymous(&layout)
        } else {
            shared_anonymous(&layout)
        };
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening --mem-file {}", path.display()))?;
    let total = blocks.total_bytes();
    if file.metadata()?.len() != total {
        file.set_len(total)
            .with_context(|| format!("sizing --mem-file {} to {total} bytes", path.display()))?;
    }
    map_file(&file, path, &layout)
}
