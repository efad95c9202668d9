//! Guest RAM as the engine sees it: named blocks over real memory.

use migration_sys::{GuestRegion, PAGE_SIZE};
use migration_wire::{Block, BlockList};
use std::sync::Arc;

/// Index of a block in the block list, as carried in page packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// One RAM block: a name and the memory behind it.
#[derive(Debug, Clone)]
pub struct RamBlock {
    name: String,
    region: Arc<GuestRegion>,
}

impl RamBlock {
    /// A block named `name` over `region`. The wire page size is 4 KiB.
    pub fn new(name: impl Into<String>, region: Arc<GuestRegion>) -> Self {
        Self {
            name: name.into(),
            region,
        }
    }

    /// The block's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The memory behind the block.
    pub fn region(&self) -> &Arc<GuestRegion> {
        &self.region
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.region.len() as u64
    }

    /// Whether the block has no bytes.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    /// Page size on the wire.
    pub fn page_size(&self) -> u32 {
        PAGE_SIZE as u32
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len() / u64::from(self.page_size())
    }
}

/// Every RAM block of a VM, in block-id order.
#[derive(Debug, Clone, Default)]
pub struct Ram {
    blocks: Vec<RamBlock>,
}

impl Ram {
    /// RAM made of `blocks`.
    pub fn new(blocks: Vec<RamBlock>) -> Self {
        Self { blocks }
    }

    /// The blocks.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// The block with id `id`.
    pub fn block(&self, id: BlockId) -> Option<&RamBlock> {
        self.blocks.get(id.0 as usize)
    }

    /// Total bytes of guest RAM.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(RamBlock::len).sum()
    }

    /// Total pages of guest RAM.
    pub fn total_pages(&self) -> u64 {
        self.blocks.iter().map(RamBlock::pages).sum()
    }

    /// The block list announced to the destination.
    pub fn block_list(&self) -> BlockList {
        BlockList {
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    name: b.name.clone(),
                    length: b.len(),
                    page_size: b.page_size(),
                })
                .collect(),
        }
    }
}
