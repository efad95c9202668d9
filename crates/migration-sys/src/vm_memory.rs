//! Guest RAM that rust-vmm's `vm-memory` mapped, as [`GuestRegion`]s (feature `vm-memory`).
//!
//! A VMM built on rust-vmm crates holds guest RAM in a `GuestMemoryMmap`: regions
//! (`GuestRegionMmap`), each over a `MmapRegion`, a mapping in this process that vm-memory
//! unmaps when the last `Arc` of it is dropped. [`GuestRegion::from_vm_memory`] makes a region
//! over that same mapping, without a copy: the region holds an `Arc` of the `MmapRegion`, so
//! the mapping stays while either side uses it, and never unmaps it itself.

use std::any::Any;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestRegionMmap, MmapRegion};

use crate::{GuestRegion, SysError};

impl GuestRegion {
    /// The memory of vm-memory's `region`, shared: what the VMM writes through vm-memory shows
    /// in the returned region and the other way round. The region keeps `region`'s mapping
    /// alive (it holds the `Arc<MmapRegion>` of [`GuestRegionMmap::get_mmap`]) and never
    /// unmaps it.
    ///
    /// Refused ([`SysError::InvalidLength`], [`SysError::InvalidMapping`]): a mapping whose
    /// length is not a non-zero multiple of [`PAGE_SIZE`](crate::PAGE_SIZE), that does not
    /// start on a page boundary or has no address (Xen mappings made on demand), or whose
    /// protection is not read-write.
    ///
    /// Private anonymous mappings (vm-memory's default) are what the kernel dirty tracking,
    /// [`GuestRegion::discard`] and postcopy work on; a `MAP_SHARED` file mapping fills pages
    /// through its file ([`GuestRegion::place`]), like [`GuestRegion::shared_file_at`].
    pub fn from_vm_memory<B>(region: &GuestRegionMmap<B>) -> Result<Self, SysError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        Self::from_vm_memory_mapping(region.get_mmap())
    }

    /// The memory of vm-memory's `mapping`, as [`GuestRegion::from_vm_memory`] describes, for
    /// a VMM that holds the `MmapRegion` itself.
    pub fn from_vm_memory_mapping<B>(mapping: Arc<MmapRegion<B>>) -> Result<Self, SysError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let (ptr, len) = (mapping.as_ptr(), mapping.size());
        let read_write = libc::PROT_READ | libc::PROT_WRITE;
        if mapping.prot() & read_write != read_write {
            return Err(SysError::InvalidMapping {
                addr: ptr as usize,
                reason: "it is not mapped readable and writable",
            });
        }
        let map_shared = mapping.flags() & libc::MAP_SHARED != 0;
        let backing = match mapping.file_offset() {
            Some(file) if map_shared => Some((
                file.file()
                    .try_clone()
                    .map_err(|source| SysError::Os { op: "dup", source })?,
                file.start(),
            )),
            _ => None,
        };
        // Only private anonymous memory reads zeros where a page was dropped, and takes
        // missing-page faults; anything else counts as shared.
        let private_anonymous =
            !map_shared && mapping.flags() & libc::MAP_ANONYMOUS != 0 && mapping.file_offset().is_none();
        let shared = !private_anonymous;
        let owner: Arc<dyn Any + Send + Sync> = mapping;
        // SAFETY: `ptr..ptr + len` is mapped in this process for as long as its `MmapRegion`
        // lives: vm-memory made it with `mmap` (an owned `MmapRegion`, unmapped only by its
        // `Drop`), or the caller of the `unsafe` `MmapRegionBuilder::with_raw_mmap_pointer` or
        // `MmapRegion::build_raw` promised a valid mapping of that size, the promise vm-memory's
        // own safe accessors (`get_slice`) rely on for the `MmapRegion`'s whole life. `owner` is
        // that `MmapRegion`'s `Arc`, which the region holds until it is dropped, so the
        // `MmapRegion` cannot be dropped first, and the region never unmaps a mapping it has an
        // owner for. It is readable and writable: vm-memory passes `prot` to `mmap` as it is,
        // and it was checked above. vm-memory, and a VMM through its API, reach the bytes only
        // through raw pointers (the volatile accesses, copies and atomics of `VolatileSlice`),
        // never through Rust references to them. `borrowed` checks the start and the length.
        unsafe { GuestRegion::borrowed(ptr, len, shared, backing, owner) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use crate::test_util::ShmFile;
    use vm_memory::{Bytes, FileOffset, GuestAddress, MemoryRegionAddress};

    #[test]
    fn a_vm_memory_region_is_shared_both_ways_and_kept_mapped() {
        let vm = GuestRegionMmap::<()>::from_range(GuestAddress(1 << 30), 16 * PAGE_SIZE, None).unwrap();
        let mapping = vm.get_mmap();
        let region = GuestRegion::from_vm_memory(&vm).unwrap();
        assert_eq!(Arc::strong_count(&mapping), 3);
        assert_eq!(region.len(), 16 * PAGE_SIZE);
        assert_eq!(region.addr(), mapping.as_ptr() as usize);
        assert!(!region.is_shared());

        vm.write_slice(b"from vm-memory", MemoryRegionAddress(3 * PAGE_SIZE as u64 + 7))
            .unwrap();
        let mut bytes = [0u8; 14];
        region.read(3 * PAGE_SIZE + 7, &mut bytes).unwrap();
        assert_eq!(&bytes, b"from vm-memory");
        region.write(15 * PAGE_SIZE, b"from the region").unwrap();
        let mut back = [0u8; 15];
        vm.read_slice(&mut back, MemoryRegionAddress(15 * PAGE_SIZE as u64))
            .unwrap();
        assert_eq!(&back, b"from the region");

        // vm-memory's handles go; the region still reads the same mapping.
        drop((vm, mapping));
        region.read(3 * PAGE_SIZE + 7, &mut bytes).unwrap();
        assert_eq!(&bytes, b"from vm-memory");
        region.discard(0, 16 * PAGE_SIZE).unwrap();
        assert!(region.is_zero(0, region.len()).unwrap());
    }

    #[test]
    fn dropping_the_region_leaves_the_mapping_to_vm_memory() {
        let vm = GuestRegionMmap::<()>::from_range(GuestAddress(0), 4 * PAGE_SIZE, None).unwrap();
        let mapping = vm.get_mmap();
        drop(GuestRegion::from_vm_memory(&vm).unwrap());
        assert_eq!(Arc::strong_count(&mapping), 2);
        // Still mapped: vm-memory reads and writes it.
        vm.write_obj(0x1234_5678u32, MemoryRegionAddress(PAGE_SIZE as u64))
            .unwrap();
        assert_eq!(
            vm.read_obj::<u32>(MemoryRegionAddress(PAGE_SIZE as u64)).unwrap(),
            0x1234_5678
        );
    }

    #[test]
    fn refuses_lengths_that_are_not_whole_pages() {
        let vm = MmapRegion::<()>::new(PAGE_SIZE + 512).unwrap();
        assert!(matches!(
            GuestRegion::from_vm_memory_mapping(Arc::new(vm)),
            Err(SysError::InvalidLength { .. })
        ));
    }

    #[test]
    fn refuses_a_mapping_it_cannot_write() {
        let vm = MmapRegion::<()>::build(
            None,
            PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        )
        .unwrap();
        assert!(matches!(
            GuestRegion::from_vm_memory_mapping(Arc::new(vm)),
            Err(SysError::InvalidMapping { .. })
        ));
    }

    #[test]
    fn refuses_a_start_off_a_page_boundary() {
        // vm-memory's own constructors only make page-aligned mappings; the check is in
        // `borrowed`, which every foreign mapping goes through.
        let whole = Arc::new(GuestRegion::anonymous(2 * PAGE_SIZE).unwrap());
        let inside = (whole.addr() + 512) as *mut u8;
        // SAFETY: `inside..inside + PAGE_SIZE` lies in `whole`'s read-write mapping, which the
        // owner passed (`whole` itself) keeps mapped.
        let result = unsafe { GuestRegion::borrowed(inside, PAGE_SIZE, false, None, whole) };
        assert!(matches!(result, Err(SysError::InvalidMapping { .. })));
    }

    #[test]
    fn a_shared_file_mapping_places_through_its_file() {
        let shm = ShmFile::new(4 * PAGE_SIZE as u64);
        let file = shm.file.try_clone().unwrap();
        let vm = MmapRegion::<()>::from_file(FileOffset::new(file, 2 * PAGE_SIZE as u64), 2 * PAGE_SIZE).unwrap();
        let region = GuestRegion::from_vm_memory_mapping(Arc::new(vm)).unwrap();
        assert!(region.is_shared());
        region.place(PAGE_SIZE, &[0x5A; PAGE_SIZE]).unwrap();
        let contents = std::fs::read(&shm.path).unwrap();
        assert!(contents[3 * PAGE_SIZE..].iter().all(|&b| b == 0x5A));
        assert!(region.discard(0, PAGE_SIZE).is_err());
    }
}
