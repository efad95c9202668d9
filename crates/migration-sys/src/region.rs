//! [`GuestRegion`]: a mapping of guest RAM shared by many threads.
//!
//! Guest RAM is written by vCPUs and writer threads while channel threads read it, so this type
//! never hands out `&[u8]` or `&mut [u8]` of it (that would be a data race, undefined
//! behaviour). All access goes through the volatile copies of the private `volatile` module,
//! the same contract as vm-memory's `VolatileSlice`: what is read is a snapshot copied once
//! into a private buffer, and the checksum and compression work on that copy. Two reads stay
//! in place: [`GuestRegion::is_zero`] (a page found zero is sent as a flag, never copied; a
//! write racing with the check is caught by dirty tracking, which sends the page again), and
//! the kernel's own writes of received bytes ([`GuestRegion::recv_from`]).

use std::any::Any;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::{PAGE_SIZE, SysError, volatile};

/// A mapping of guest RAM shared by many threads (vCPUs and writers, channel threads).
///
/// It is `Send + Sync` and never hands out `&[u8]`/`&mut [u8]` of guest memory: every access
/// is a volatile copy. Dropping it unmaps the memory, unless the mapping belongs to something
/// else it keeps alive (a part of a larger region, or a mapping another library made).
#[derive(Debug)]
pub struct GuestRegion {
    /// Start of the mapping; page aligned, never dangling while `self` lives.
    ptr: NonNull<u8>,
    /// Length of the mapping in bytes; a non-zero multiple of [`PAGE_SIZE`].
    len: usize,
    /// Whether the mapping is `MAP_SHARED` over a file (shmem or hugetlbfs), not anonymous; for
    /// a mapping made elsewhere, anything but private anonymous memory.
    shared: bool,
    /// The backing file and the offset the mapping starts at, for writes through the page
    /// cache ([`GuestRegion::place`]).
    backing: Option<(File, u64)>,
    /// What owns the mapping when `self` does not: for a part of a larger region
    /// ([`GuestRegion::part`]) the `Arc<GuestRegion>` of the whole, for a mapping another
    /// library made (vm-memory's, with feature `vm-memory`) that library's handle of it. Kept
    /// alive, and so mapped, while `self` lives; `None`: `self` owns the mapping and unmaps it
    /// on drop.
    owner: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: `GuestRegion` owns its mapping (it is unmapped only in `drop`, which needs ownership),
// or holds an `Arc` of what owns it (itself `Send + Sync`), and never gives out references to
// the bytes: every access is a volatile copy that tolerates
// concurrent access from other threads (the `VolatileSlice` contract). Moving the owner to
// another thread changes none of this.
unsafe impl Send for GuestRegion {}
// SAFETY: every method takes `&self` and touches guest memory only through volatile copies
// bounded by `len`; the pointer and length never change after construction.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Maps `len` bytes of private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS |
    /// MAP_NORESERVE`) and asks for transparent huge pages (`MADV_HUGEPAGE`, best effort).
    ///
    /// `len` must be a non-zero multiple of [`PAGE_SIZE`].
    pub fn anonymous(len: usize) -> Result<Self, SysError> {
        check_len(len)?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks overlaps nothing
        // that exists; the arguments are plain integers.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let region = Self::from_mmap(ptr, len, None)?;
        // SAFETY: the range is exactly the mapping we just created; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents. Failure (no THP) is harmless.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Ok(region)
    }

    /// Maps the first `len` bytes of `file` read-write with `MAP_SHARED`: the way a VMM backs
    /// guest RAM with a `/dev/shm`, memfd or hugetlbfs file.
    ///
    /// The file must already be at least `len` bytes long (the caller sets its length), and
    /// must not be truncated below `len` while the region lives: an access past the end of
    /// the file raises `SIGBUS`. `len` must be a non-zero multiple of [`PAGE_SIZE`] (and of
    /// the huge page size on hugetlbfs, which the kernel checks).
    pub fn shared_file(file: &File, len: usize) -> Result<Self, SysError> {
        Self::shared_file_at(file, 0, len)
    }

    /// Anonymous memory like [`GuestRegion::anonymous`], with an inaccessible page
    /// (`PROT_NONE`) right before and right after it, so that any access outside the region,
    /// by this process or by the kernel on its behalf, faults instead of landing in
    /// neighbouring memory. For `recv --guard-pages`, and the tests that prove hostile input
    /// never writes outside guest RAM.
    pub fn anonymous_guarded(len: usize) -> Result<Self, SysError> {
        check_len(len)?;
        let whole = std::sync::Arc::new(Self::anonymous(len + 2 * PAGE_SIZE)?);
        for guard in [0, PAGE_SIZE + len] {
            // SAFETY: `guard` is a page-aligned page inside the mapping `whole` owns (checked
            // by `range`); removing access to it changes no byte, and nothing holds a
            // reference to guest memory.
            let rc = unsafe { libc::mprotect(whole.range(guard, PAGE_SIZE)?.cast(), PAGE_SIZE, libc::PROT_NONE) };
            if rc != 0 {
                return Err(SysError::last_os("mprotect"));
            }
        }
        Self::part(&whole, PAGE_SIZE, len)
    }

    /// Maps `len` bytes of `file` from byte `offset` (a multiple of [`PAGE_SIZE`]) read-write
    /// with `MAP_SHARED`, so several RAM blocks can live in one backing file. The same rules
    /// as [`GuestRegion::shared_file`] apply to the range `offset..offset + len`.
    pub fn shared_file_at(file: &File, offset: u64, len: usize) -> Result<Self, SysError> {
        check_len(len)?;
        if offset % PAGE_SIZE as u64 != 0 {
            return Err(SysError::InvalidLength {
                len: offset as usize,
                reason: "the file offset is not a multiple of the page size",
            });
        }
        let Ok(map_offset) = libc::off_t::try_from(offset) else {
            return Err(SysError::InvalidLength {
                len: offset as usize,
                reason: "the file offset is too large",
            });
        };
        let file_len = file
            .metadata()
            .map_err(|source| SysError::Os { op: "fstat", source })?
            .len();
        if file_len < offset.saturating_add(len as u64) {
            return Err(SysError::InvalidLength {
                len,
                reason: "the file is shorter than the mapping",
            });
        }
        // SAFETY: a fresh shared mapping at an address the kernel picks overlaps nothing that
        // exists; the fd is valid for the call (borrowed from `file`), the offset is page
        // aligned and the file covers the range (checked above), and the mapping keeps its own
        // reference to the file after the fd is closed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                map_offset,
            )
        };
        let file = file.try_clone().map_err(|source| SysError::Os { op: "dup", source })?;
        Self::from_mmap(ptr, len, Some((file, offset)))
    }

    /// Anonymous shared memory: a fresh memfd of `len` bytes mapped with `MAP_SHARED`, the
    /// way VMMs back guest RAM they may share or hand to other processes. Pages written
    /// through [`GuestRegion::place`] land in the page cache without being zeroed first,
    /// which makes filling fresh memory about twice as fast as copying into a fresh
    /// anonymous mapping (where the kernel zeroes every page on first touch).
    pub fn memfd(name: &str, len: usize) -> Result<Self, SysError> {
        check_len(len)?;
        // With NUL bytes replaced the conversion cannot fail.
        let name = std::ffi::CString::new(name.replace('\0', "_")).unwrap_or_default();
        // SAFETY: `name` is a NUL-terminated string that outlives the call; the flags are
        // plain integers.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(SysError::last_os("memfd_create"));
        }
        // SAFETY: `fd` is a descriptor memfd_create just returned and nothing else owns it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(|source| SysError::Os {
            op: "ftruncate",
            source,
        })?;
        Self::shared_file(&file, len)
    }

    /// Wraps the result of `mmap`, turning `MAP_FAILED` into an error.
    fn from_mmap(ptr: *mut libc::c_void, len: usize, backing: Option<(File, u64)>) -> Result<Self, SysError> {
        if ptr == libc::MAP_FAILED {
            return Err(SysError::last_os("mmap"));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(SysError::Os {
            op: "mmap",
            source: std::io::Error::other("the kernel returned a null mapping"),
        })?;
        Ok(Self {
            ptr,
            len,
            shared: backing.is_some(),
            backing,
            owner: None,
        })
    }

    /// The bytes `[offset, offset + len)` of `whole` as a region of their own, sharing its
    /// mapping (which stays mapped while any part lives): how memory mapped and populated once
    /// for all of guest RAM is handed out as RAM blocks. `offset` and `len` must be multiples
    /// of [`PAGE_SIZE`], `len` non-zero, and the range inside `whole`.
    pub fn part(whole: &std::sync::Arc<GuestRegion>, offset: usize, len: usize) -> Result<Self, SysError> {
        check_len(len)?;
        if offset % PAGE_SIZE != 0 {
            return Err(SysError::InvalidLength {
                len: offset,
                reason: "the offset of a part is not a multiple of the page size",
            });
        }
        let start = whole.range(offset, len)?;
        let backing = match &whole.backing {
            Some((file, base)) => Some((
                file.try_clone().map_err(|source| SysError::Os { op: "dup", source })?,
                base + offset as u64,
            )),
            None => None,
        };
        Ok(Self {
            // `range` returned a pointer inside the (non-null) mapping.
            ptr: NonNull::new(start).ok_or(SysError::OutOfBounds {
                offset,
                len,
                size: whole.len,
            })?,
            len,
            shared: whole.shared,
            backing,
            owner: Some(Arc::clone(whole) as Arc<dyn Any + Send + Sync>),
        })
    }

    /// A region over `len` bytes at `ptr` of a mapping `owner` keeps alive: never unmapped by
    /// the region, which holds `owner` until it is dropped. `ptr` must be page aligned and
    /// non-null, and `len` a non-zero multiple of [`PAGE_SIZE`]; `shared` and `backing` as for
    /// the region's own mappings (`shared`: not private anonymous memory; `backing`: the file
    /// and offset of a `MAP_SHARED` file mapping, for [`GuestRegion::place`]).
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be mapped readable and writable in this process, and stay mapped
    /// (neither unmapped nor replaced) for as long as `owner` lives. Whoever else reaches the
    /// memory must not hold Rust references to it either: only volatile or atomic accesses,
    /// and the kernel's, as every access of this type is a volatile copy.
    #[cfg(feature = "vm-memory")]
    pub(crate) unsafe fn borrowed(
        ptr: *mut u8,
        len: usize,
        shared: bool,
        backing: Option<(File, u64)>,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<Self, SysError> {
        check_len(len)?;
        let Some(ptr) = NonNull::new(ptr) else {
            return Err(SysError::InvalidMapping {
                addr: 0,
                reason: "it has no address in this process",
            });
        };
        if ptr.as_ptr() as usize % PAGE_SIZE != 0 {
            return Err(SysError::InvalidMapping {
                addr: ptr.as_ptr() as usize,
                reason: "it does not start on a page boundary",
            });
        }
        Ok(Self {
            ptr,
            len,
            shared,
            backing,
            owner: Some(owner),
        })
    }

    /// Length of the region in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes (never true: regions are at least one page).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of [`PAGE_SIZE`] pages in the region.
    #[inline]
    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// Whether the region is a `MAP_SHARED` file mapping (from [`GuestRegion::shared_file`]),
    /// or, made over another library's mapping, anything but private anonymous memory.
    #[inline]
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The file a `MAP_SHARED` file mapping maps (a memfd, say) and the file offset the
    /// region starts at: what another process maps to share the same memory.
    pub fn backing(&self) -> Option<(&File, u64)> {
        self.backing.as_ref().map(|(file, offset)| (file, *offset))
    }

    /// Base address as an integer, for diagnostics and kernel registration inside this crate.
    #[inline]
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Checks that `[offset, offset + len)` lies inside the region and returns its start.
    #[inline]
    fn range(&self, offset: usize, len: usize) -> Result<*mut u8, SysError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: `offset <= end <= self.len`, so the result stays inside the mapping
                // or one past its end, as `add` requires.
                Ok(unsafe { self.ptr.as_ptr().add(offset) })
            }
            _ => Err(SysError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Volatile copy of guest bytes `[offset, offset + dst.len())` into a private buffer.
    #[inline]
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), SysError> {
        let src = self.range(offset, dst.len())?;
        // SAFETY: `range` checked that the bytes lie inside our mapping, which stays mapped
        // read-write while `&self` lives; `dst` is a private buffer, not guest memory.
        unsafe { volatile::copy_from_guest(src, dst) };
        Ok(())
    }

    /// Volatile copy of `src` into guest bytes at `offset`.
    #[inline]
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), SysError> {
        let dst = self.range(offset, src.len())?;
        // SAFETY: `range` checked the bounds, the mapping is read-write and lives while
        // `&self` does; `src` is a shared reference, so it cannot be guest memory (which is
        // never borrowed) and does not overlap.
        unsafe { volatile::copy_to_guest(src, dst) };
        Ok(())
    }

    /// Writes `src` into guest memory at `offset`, like [`GuestRegion::write`], but for a
    /// file-backed region through the file (`pwrite` into the page cache the mapping shares),
    /// which fills a page the first time without the kernel zeroing it first. Used to place
    /// incoming pages on a destination; anonymous regions fall back to the volatile copy.
    pub fn place(&self, offset: usize, src: &[u8]) -> Result<(), SysError> {
        self.range(offset, src.len())?;
        match &self.backing {
            Some((file, base)) => {
                use std::os::unix::fs::FileExt;
                file.write_all_at(src, base + offset as u64)
                    .map_err(|source| SysError::Os { op: "pwrite", source })
            }
            None => self.write(offset, src),
        }
    }

    /// Receives up to `len` bytes from the stream socket `socket` (one `recv(2)`) straight into
    /// guest memory at `offset`, so incoming page bytes are copied once, by the kernel. Returns
    /// the bytes received; 0 means the peer closed. The socket's receive timeout applies.
    pub fn recv_from(&self, socket: std::os::fd::BorrowedFd<'_>, offset: usize, len: usize) -> std::io::Result<usize> {
        let dst = self.range(offset, len).map_err(std::io::Error::other)?;
        // SAFETY: `range` checked that the bytes lie inside our read-write mapping, which
        // lives while `&self` does. The kernel writes them as any other writer of guest
        // memory would; nothing here holds a Rust reference to guest memory.
        let n = unsafe { libc::recv(std::os::fd::AsRawFd::as_raw_fd(&socket), dst.cast(), len, 0) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Reads up to `len` bytes of `file` from `file_offset` (one `pread(2)`) straight into
    /// guest memory at `offset`: a restore's one copy. With an `O_DIRECT` file the device
    /// writes guest memory itself; guest memory is page aligned, so page-aligned offsets and
    /// lengths meet its rules. Returns the bytes read; 0 means end of file.
    pub fn read_file_at(&self, file: &File, file_offset: u64, offset: usize, len: usize) -> std::io::Result<usize> {
        let dst = self.range(offset, len).map_err(std::io::Error::other)?;
        let Ok(at) = libc::off_t::try_from(file_offset) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: `range` checked that the bytes lie inside our read-write mapping, which
        // lives while `&self` does; the kernel writes them as any writer of guest memory
        // would, and nothing here holds a Rust reference to guest memory.
        let n = unsafe { libc::pread(file.as_raw_fd(), dst.cast(), len, at) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Start of `[offset, offset + len)` for the kernel to write into (io_uring receives).
    pub(crate) fn kernel_target(&self, offset: usize, len: usize) -> Result<*mut u8, SysError> {
        self.range(offset, len)
    }

    /// Volatile fill of `[offset, offset + len)` with `byte`.
    #[inline]
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), SysError> {
        let dst = self.range(offset, len)?;
        // SAFETY: `range` checked the bounds; the mapping is read-write and lives while
        // `&self` does.
        unsafe { volatile::fill_guest(dst, len, byte) };
        Ok(())
    }

    /// Volatile check whether `[offset, offset + len)` is all zero bytes (reads only).
    #[inline]
    pub fn is_zero(&self, offset: usize, len: usize) -> Result<bool, SysError> {
        let src = self.range(offset, len)?;
        // SAFETY: `range` checked the bounds; the mapping is readable and lives while `&self`
        // does.
        Ok(unsafe { volatile::is_zero_guest(src, len) })
    }

    /// Populates page tables for writing ahead of use (`MADV_POPULATE_WRITE`), so that later
    /// writes do not fault. Used to prefault destination memory in parallel, one range per
    /// thread. The range is widened to whole pages. A kernel without the advice (`EINVAL`)
    /// makes this a no-op.
    pub fn populate_write(&self, offset: usize, len: usize) -> Result<(), SysError> {
        self.range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let start = offset / PAGE_SIZE * PAGE_SIZE;
        // `offset + len <= self.len`, a multiple of PAGE_SIZE, so rounding up cannot pass it.
        let end = (offset + len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        // SAFETY: `start..end` is page aligned and inside our mapping (checked above).
        // MADV_POPULATE_WRITE only faults pages in as a write would, without changing their
        // contents (populating anonymous memory with zeros it would read as anyway).
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start).cast(),
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINVAL) {
            return Ok(());
        }
        Err(SysError::Os {
            op: "madvise(MADV_POPULATE_WRITE)",
            source: err,
        })
    }

    /// Drops the pages of `[offset, offset + len)` (whole, aligned pages) of private anonymous
    /// memory (`MADV_DONTNEED`): the next access finds them absent, which in a region
    /// registered for missing-page faults makes it fault (postcopy drops pages that went stale
    /// this way), and otherwise reads zeros.
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), SysError> {
        if self.shared {
            return Err(SysError::Unsupported("discarding pages of file-backed guest memory"));
        }
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(SysError::InvalidLength {
                len,
                reason: "discarding needs whole, aligned pages",
            });
        }
        let start = self.range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `start..start + len` is page aligned and inside our private anonymous
        // mapping (checked above). MADV_DONTNEED only frees the pages: the mapping stays, and
        // every later access goes through volatile copies that read zeros or fault, so no
        // reference to the old bytes can exist.
        let rc = unsafe { libc::madvise(start.cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(SysError::last_os("madvise(MADV_DONTNEED)"));
        }
        Ok(())
    }

    /// Drops every run `(offset, len)` of `runs` as [`GuestRegion::discard`] does, many runs
    /// per system call (`process_madvise`, which also flushes the TLB once per call rather
    /// than once per run), or one call per run where the kernel does not offer that
    /// (measured here: 131072 runs of 2 pages in 0.11 s, against 1.4 s one at a time).
    pub fn discard_runs(&self, runs: &[(usize, usize)]) -> Result<(), SysError> {
        if self.shared {
            return Err(SysError::Unsupported("discarding pages of file-backed guest memory"));
        }
        let mut iov = Vec::with_capacity(runs.len());
        for &(offset, len) in runs {
            if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                return Err(SysError::InvalidLength {
                    len,
                    reason: "discarding needs whole, aligned pages",
                });
            }
            let start = self.range(offset, len)?;
            if len > 0 {
                iov.push(libc::iovec {
                    iov_base: start.cast(),
                    iov_len: len,
                });
            }
        }
        if iov.is_empty() {
            return Ok(());
        }
        // SAFETY: pidfd_open of our own pid takes plain integers and returns a new descriptor
        // or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let pidfd = (pidfd >= 0).then(|| {
            // SAFETY: the system call just returned this descriptor; nothing else owns it.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd as libc::c_int) }
        });
        let mut done = 0;
        if let Some(pidfd) = &pidfd {
            // At most UIO_MAXIOV ranges per call.
            for chunk in iov.chunks(1024) {
                let want: usize = chunk.iter().map(|v| v.iov_len).sum();
                // SAFETY: every iovec of `chunk` is a page-aligned range inside our private
                // anonymous mapping (checked above); process_madvise on our own process
                // with MADV_DONTNEED only frees those pages, as `discard` argues, and reads
                // nothing but the iovec array.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_process_madvise,
                        std::os::fd::AsRawFd::as_raw_fd(pidfd),
                        chunk.as_ptr(),
                        chunk.len(),
                        libc::MADV_DONTNEED,
                        0,
                    )
                };
                if rc < 0 || rc as usize != want {
                    // Not offered for this advice (kernels before 6.13), or stopped part way:
                    // the rest goes one range at a time (dropping a page twice is harmless).
                    break;
                }
                done += chunk.len();
            }
        }
        for &(offset, len) in runs.iter().filter(|r| r.1 > 0).skip(done) {
            self.discard(offset, len)?;
        }
        Ok(())
    }

    /// Whether each page of `[offset, offset + len)` (whole, aligned pages) is resident now
    /// (`mincore`): one entry per page, appended to `out`. A page absent from a region
    /// registered for missing-page faults is one an access would wait for.
    pub fn resident(&self, offset: usize, len: usize, out: &mut Vec<bool>) -> Result<(), SysError> {
        if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(SysError::InvalidLength {
                len,
                reason: "residency is known for whole, aligned pages",
            });
        }
        let start = self.range(offset, len)?;
        let mut vec = vec![0u8; len / PAGE_SIZE];
        if len > 0 {
            // SAFETY: `start..start + len` is page aligned and inside our mapping (checked
            // above); `vec` has one byte per page of it, which is all mincore writes. mincore
            // reads no guest memory.
            let rc = unsafe { libc::mincore(start.cast(), len, vec.as_mut_ptr()) };
            if rc != 0 {
                return Err(SysError::last_os("mincore"));
            }
        }
        out.extend(vec.iter().map(|b| b & 1 == 1));
        Ok(())
    }
}

impl Drop for GuestRegion {
    fn drop(&mut self) {
        if self.owner.is_some() {
            // Not ours: the owner unmaps the mapping (if it is its to unmap) when the last
            // region over it is gone.
            return;
        }
        // SAFETY: we own the mapping `ptr..ptr + len` and nothing else can use it: every
        // access goes through `&self`, and `drop` has `&mut self`. munmap of our own mapping
        // cannot fail; if it did, leaking the mapping is the safe outcome.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Checks that a region length is a non-zero multiple of [`PAGE_SIZE`].
fn check_len(len: usize) -> Result<(), SysError> {
    if len == 0 || len % PAGE_SIZE != 0 {
        return Err(SysError::InvalidLength {
            len,
            reason: "not a non-zero multiple of the page size",
        });
    }
    Ok(())
}

/// How much of a region one thread populates at a time in [`populate_all`].
const POPULATE_CHUNK: usize = 64 << 20;

/// Populates every page of `regions` as a write would ([`GuestRegion::populate_write`]), on
/// two threads taking 64 MiB at a time: how memory is preallocated or pinned ahead of use.
pub fn populate_all<'a>(regions: impl IntoIterator<Item = &'a GuestRegion>) -> Result<(), SysError> {
    let mut chunks = Vec::new();
    for region in regions {
        let mut at = 0;
        while at < region.len() {
            let len = POPULATE_CHUNK.min(region.len() - at);
            chunks.push((region, at, len));
            at += len;
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || -> Result<(), SysError> {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&(region, at, len)) = chunks.get(i) else {
                return Ok(());
            };
            region.populate_write(at, len)?;
        }
    };
    std::thread::scope(|scope| {
        let other = scope.spawn(work);
        let mine = work();
        other.join().expect("populating thread")?;
        mine
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::ShmFile;
    use std::os::unix::fs::FileExt;

    #[test]
    fn rejects_bad_lengths() {
        for len in [0, 1, PAGE_SIZE - 1, PAGE_SIZE + 1] {
            assert!(matches!(
                GuestRegion::anonymous(len),
                Err(SysError::InvalidLength { .. })
            ));
        }
    }

    #[test]
    fn read_write_fill_round_trip() {
        let region = GuestRegion::anonymous(16 * PAGE_SIZE).unwrap();
        assert_eq!(region.len(), 16 * PAGE_SIZE);
        assert!(!region.is_empty());
        assert_eq!(region.pages(), 16);
        assert_eq!(region.addr() % PAGE_SIZE, 0);
        assert!(region.is_zero(0, region.len()).unwrap());

        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        region.write(4093, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        region.read(4093, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(region.is_zero(0, 4093).unwrap());
        assert!(!region.is_zero(0, 4094).unwrap());
        assert!(region.is_zero(4093 + data.len(), PAGE_SIZE).unwrap());

        region.fill(5 * PAGE_SIZE + 3, 2 * PAGE_SIZE, 0xAB).unwrap();
        let mut page = vec![0u8; 2 * PAGE_SIZE];
        region.read(5 * PAGE_SIZE + 3, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0xAB));
        region.fill(0, region.len(), 0).unwrap();
        assert!(region.is_zero(0, region.len()).unwrap());
        // Empty ranges are fine, even at the very end.
        region.read(region.len(), &mut []).unwrap();
        assert!(region.is_zero(region.len(), 0).unwrap());
    }

    #[test]
    fn out_of_bounds_is_an_error() {
        let region = GuestRegion::anonymous(2 * PAGE_SIZE).unwrap();
        let size = region.len();
        let mut buf = [0u8; 8];
        let oob = |r: Result<(), SysError>| matches!(r, Err(SysError::OutOfBounds { .. }));
        assert!(oob(region.read(size - 7, &mut buf)));
        assert!(oob(region.read(size + 1, &mut [])));
        assert!(oob(region.write(size - 4, &buf)));
        assert!(oob(region.fill(size, 1, 0)));
        assert!(oob(region.populate_write(0, size + 1)));
        assert!(matches!(region.is_zero(1, size), Err(SysError::OutOfBounds { .. })));
        // offset + len overflows usize.
        assert!(oob(region.fill(usize::MAX - 2, 8, 0)));
        assert!(oob(region.read(usize::MAX, &mut buf)));
        match region.write(size, &buf) {
            Err(SysError::OutOfBounds { offset, len, size: s }) => assert_eq!((offset, len, s), (size, 8, size)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn populate_write_keeps_contents() {
        let region = GuestRegion::anonymous(64 * PAGE_SIZE).unwrap();
        region.fill(PAGE_SIZE, 10, 7).unwrap();
        region.populate_write(100, 10 * PAGE_SIZE).unwrap();
        region.populate_write(0, region.len()).unwrap();
        region.populate_write(region.len(), 0).unwrap();
        let mut buf = [0u8; 11];
        region.read(PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(buf, [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);
        assert!(region.is_zero(2 * PAGE_SIZE, 62 * PAGE_SIZE).unwrap());
    }

    #[test]
    fn populate_all_makes_every_page_of_every_region_resident() {
        let regions = [
            GuestRegion::memfd("populate", 16 * PAGE_SIZE).unwrap(),
            GuestRegion::anonymous(8 * PAGE_SIZE).unwrap(),
        ];
        populate_all(&regions).unwrap();
        for region in &regions {
            let mut resident = Vec::new();
            region.resident(0, region.len(), &mut resident).unwrap();
            assert!(resident.iter().all(|&r| r), "{resident:?}");
        }
    }

    #[test]
    fn shared_file_writes_reach_the_file() {
        let len = 8 * PAGE_SIZE;
        let shm = ShmFile::new(len as u64);
        let region = GuestRegion::shared_file(&shm.file, len).unwrap();
        assert!(region.is_shared());
        region.write(3 * PAGE_SIZE + 5, b"hello guest").unwrap();
        region.fill(7 * PAGE_SIZE, PAGE_SIZE, 0x5A).unwrap();
        let contents = std::fs::read(&shm.path).unwrap();
        assert_eq!(contents.len(), len);
        assert_eq!(&contents[3 * PAGE_SIZE + 5..][..11], b"hello guest");
        assert!(contents[7 * PAGE_SIZE..].iter().all(|&b| b == 0x5A));
        assert!(crate::is_zero_buf(&contents[..3 * PAGE_SIZE]));

        // And writes to the file show through the mapping.
        shm.file.write_all_at(&[0x11u8; PAGE_SIZE], 0).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        region.read(0, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x11));
    }

    #[test]
    fn shared_file_must_cover_the_mapping() {
        let shm = ShmFile::new(PAGE_SIZE as u64);
        assert!(matches!(
            GuestRegion::shared_file(&shm.file, 2 * PAGE_SIZE),
            Err(SysError::InvalidLength { .. })
        ));
    }

    #[test]
    fn shared_file_at_maps_the_given_range() {
        let shm = ShmFile::new(4 * PAGE_SIZE as u64);
        let high = GuestRegion::shared_file_at(&shm.file, 2 * PAGE_SIZE as u64, 2 * PAGE_SIZE).unwrap();
        high.write(0, b"block two").unwrap();
        let contents = std::fs::read(&shm.path).unwrap();
        assert_eq!(&contents[2 * PAGE_SIZE..][..9], b"block two");
        assert!(GuestRegion::shared_file_at(&shm.file, 3 * PAGE_SIZE as u64, 2 * PAGE_SIZE).is_err());
        assert!(GuestRegion::shared_file_at(&shm.file, 100, PAGE_SIZE).is_err());
    }

    #[test]
    fn place_goes_through_the_file_and_shows_in_the_mapping() {
        let region = GuestRegion::memfd("test", 4 * PAGE_SIZE).unwrap();
        assert!(region.is_shared());
        assert!(region.is_zero(0, region.len()).unwrap());
        region.place(PAGE_SIZE, &[9u8; PAGE_SIZE]).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        region.read(PAGE_SIZE, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 9));
        assert!(region.place(3 * PAGE_SIZE, &[1u8; 2 * PAGE_SIZE]).is_err());

        let anon = GuestRegion::anonymous(PAGE_SIZE).unwrap();
        anon.place(10, b"abc").unwrap();
        let mut bytes = [0u8; 3];
        anon.read(10, &mut bytes).unwrap();
        assert_eq!(&bytes, b"abc");

        let shm = ShmFile::new(4 * PAGE_SIZE as u64);
        let high = GuestRegion::shared_file_at(&shm.file, 2 * PAGE_SIZE as u64, 2 * PAGE_SIZE).unwrap();
        high.place(PAGE_SIZE, b"at offset").unwrap();
        let contents = std::fs::read(&shm.path).unwrap();
        assert_eq!(&contents[3 * PAGE_SIZE..][..9], b"at offset");
    }

    #[test]
    fn file_bytes_are_read_straight_into_guest_memory() {
        let shm = ShmFile::new(2 * PAGE_SIZE as u64);
        shm.file.write_all_at(&[0x44; PAGE_SIZE], PAGE_SIZE as u64).unwrap();
        let region = GuestRegion::anonymous(4 * PAGE_SIZE).unwrap();
        let n = region
            .read_file_at(&shm.file, PAGE_SIZE as u64, 2 * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        assert_eq!(n, PAGE_SIZE);
        let mut page = vec![0u8; PAGE_SIZE];
        region.read(2 * PAGE_SIZE, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x44));
        assert_eq!(
            region
                .read_file_at(&shm.file, 2 * PAGE_SIZE as u64, 0, PAGE_SIZE)
                .unwrap(),
            0
        );
        assert!(region.read_file_at(&shm.file, 0, 4 * PAGE_SIZE, 1).is_err());
    }

    #[test]
    fn a_guarded_region_is_usable_to_its_edges_and_no_further() {
        let region = GuestRegion::anonymous_guarded(3 * PAGE_SIZE).unwrap();
        assert_eq!(region.len(), 3 * PAGE_SIZE);
        region.fill(0, 1, 0x11).unwrap();
        region.fill(3 * PAGE_SIZE - 1, 1, 0x22).unwrap();
        let mut byte = [0u8];
        region.read(3 * PAGE_SIZE - 1, &mut byte).unwrap();
        assert_eq!(byte, [0x22]);
        assert!(region.read(3 * PAGE_SIZE, &mut byte).is_err());
        assert!(region.fill(3 * PAGE_SIZE - 1, 2, 0).is_err());
    }

    #[test]
    fn parts_share_the_mapping_and_outlive_the_whole() {
        let whole = std::sync::Arc::new(GuestRegion::anonymous(4 * PAGE_SIZE).unwrap());
        whole.fill(PAGE_SIZE, PAGE_SIZE, 0x11).unwrap();
        let part = GuestRegion::part(&whole, PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert_eq!(part.len(), 2 * PAGE_SIZE);
        let mut page = vec![0u8; PAGE_SIZE];
        part.read(0, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x11));
        part.fill(PAGE_SIZE, PAGE_SIZE, 0x22).unwrap();
        whole.read(2 * PAGE_SIZE, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x22));
        // Bounded by the part, not the whole.
        assert!(part.read(2 * PAGE_SIZE, &mut page).is_err());
        assert!(GuestRegion::part(&whole, 3 * PAGE_SIZE, 2 * PAGE_SIZE).is_err());
        assert!(GuestRegion::part(&whole, 1, PAGE_SIZE).is_err());
        // The mapping stays while a part lives.
        drop(whole);
        part.read(PAGE_SIZE, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x22));
    }

    #[test]
    fn a_part_of_a_file_places_through_the_file_at_its_offset() {
        let shm = ShmFile::new(4 * PAGE_SIZE as u64);
        let whole = std::sync::Arc::new(GuestRegion::shared_file(&shm.file, 4 * PAGE_SIZE).unwrap());
        let part = GuestRegion::part(&whole, 2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert!(part.is_shared());
        part.place(0, &[0x33; PAGE_SIZE]).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        whole.read(2 * PAGE_SIZE, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x33));
        let contents = std::fs::read(&shm.path).unwrap();
        assert!(contents[2 * PAGE_SIZE..3 * PAGE_SIZE].iter().all(|&b| b == 0x33));
    }
}
