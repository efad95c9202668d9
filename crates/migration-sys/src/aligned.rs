//! [`AlignedBuf`]: a private heap buffer aligned for `O_DIRECT` I/O.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: enough for `O_DIRECT` on the file systems here.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// A zero-initialised heap buffer whose start is [`DIRECT_IO_ALIGN`]-aligned, so that it can
/// be the source or target of an `O_DIRECT` read or write. It is private memory, not guest
/// memory: it derefs to an ordinary slice.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`; shared access only
// reads it through `&[u8]`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above: `&AlignedBuf` gives only `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least one alignment unit is allocated).
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (at least `DIRECT_IO_ALIGN`).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        let size = len.max(1).next_multiple_of(DIRECT_IO_ALIGN);
        Layout::from_size_align(size, DIRECT_IO_ALIGN).expect("a buffer size below isize::MAX")
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at an initialised (zeroed at allocation) block of at least
        // `len` bytes that this value owns; the borrow ties the slice to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

/// What `O_DIRECT` on `file` requires, as `statx` reports it (`STATX_DIOALIGN`): the
/// alignment of memory buffers and of file offsets and lengths, in bytes; `(0, 0)` when the
/// file system does not support `O_DIRECT`; `None` when the kernel does not say.
pub fn direct_io_alignment(file: &std::fs::File) -> std::io::Result<Option<(u32, u32)>> {
    use std::os::fd::AsRawFd;
    // SAFETY: `statx` is plain integers (and padding), for which all-zero bytes are valid.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty NUL-terminated path with AT_EMPTY_PATH names `file` itself, whose
    // descriptor is open for the call; the kernel writes only into `buf`.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut buf,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if buf.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some((buf.stx_dio_mem_align, buf.stx_dio_offset_align)))
}

/// `len` atomics, all zero, from zeroed memory the kernel supplies on first write: a large
/// table of per-page values costs nothing until its entries are used (first-touching fresh
/// memory is slow on hosts that take freed memory back).
pub fn zeroed_atomics(len: usize) -> Box<[std::sync::atomic::AtomicU64]> {
    let zeros: Box<[u64]> = vec![0u64; len].into_boxed_slice();
    let raw = Box::into_raw(zeros) as *mut [std::sync::atomic::AtomicU64];
    // SAFETY: `AtomicU64` has the same size, alignment (8 on every target with 64-bit
    // atomics) and bit validity as `u64`, so a boxed slice of zeroed `u64`s is a valid boxed
    // slice of `AtomicU64`s of the same length, allocated with the same layout.
    unsafe { Box::from_raw(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_atomics_start_at_zero_and_work() {
        let table = zeroed_atomics(1 << 20);
        assert_eq!(table.len(), 1 << 20);
        assert!(
            table
                .iter()
                .step_by(4097)
                .all(|a| a.load(std::sync::atomic::Ordering::Relaxed) == 0)
        );
        table[12345].store(7, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(table[12345].fetch_or(8, std::sync::atomic::Ordering::Relaxed), 7);
        assert_eq!(table[12345].load(std::sync::atomic::Ordering::Relaxed), 15);
    }

    #[test]
    fn direct_io_alignment_is_reported_for_a_disk_file() {
        let path = std::env::temp_dir().join(format!("dio-align-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let alignment = direct_io_alignment(&file).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Where the kernel says, both alignments are powers of two (or zero: no O_DIRECT).
        if let Some((mem, offset)) = alignment {
            assert!(mem == 0 || mem.is_power_of_two(), "{mem}");
            assert!(offset == 0 || offset.is_power_of_two(), "{offset}");
        }
    }

    #[test]
    fn aligned_zeroed_and_writable() {
        for len in [0, 1, 4096, 5000, 1 << 20] {
            let mut buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|&b| b == 0));
            buf.fill(7);
            assert!(buf.iter().all(|&b| b == 7));
        }
    }
}
