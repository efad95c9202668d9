//! Raw userfaultfd: just what asynchronous write-protect tracking needs.
//!
//! The ABI (structs, ioctl numbers, feature bits) is from `linux/userfaultfd.h` and was checked
//! on this machine's Linux 6.18 (`shared/reference/machine-and-crates.md`, section 5). The
//! `userfaultfd` crate is not used: it lacks `WP_ASYNC`/`WP_UNPOPULATED`, hides the feature mask
//! the kernel grants, and defaults to `UFFD_USER_MODE_ONLY`, which would miss writes the kernel
//! makes on a process's behalf (KVM, `read(2)` into guest memory).
//!
//! The file descriptor is created without `UFFD_USER_MODE_ONLY`, through the `userfaultfd(2)`
//! system call, or through `/dev/userfaultfd` when the system call is refused
//! (`vm.unprivileged_userfaultfd=0` without `CAP_SYS_PTRACE`).
//!
//! Why registering is not an `unsafe fn` here: [`Userfaultfd::new`] only hands out descriptors
//! that negotiated `UFFD_FEATURE_WP_ASYNC`, and [`Userfaultfd::register_write_protect`] only
//! registers in write-protect mode. A write to a protected page is then resolved by the kernel
//! itself (it unprotects the page and records it as written), so no thread ever waits for a
//! fault handler, and no byte of memory changes.
//!
//! Missing-mode registration, which makes a faulting thread wait until someone supplies the
//! page, is offered only by [`MissingPages`], which owns the region it registers and places
//! pages with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` (a lazy restore, later postcopy).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::SysError;

/// The userfaultfd API version (`UFFD_API`).
pub const UFFD_API: u64 = 0xAA;
/// The ioctl type byte of userfaultfd (`UFFDIO`).
const UFFDIO: u32 = 0xAA;

/// Feature: write faults report `UFFD_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Feature: write-protect mode works on hugetlbfs and shmem (memfd, `/dev/shm`) mappings.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Feature: write-protecting also marks page table entries that are not populated yet.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Feature: the kernel resolves write-protect faults itself and records the page as written.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFDIO_REGISTER` mode: missing-page faults wait for a handler.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER` mode: track write-protect faults.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT` mode: protect (clear it to unprotect).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    /// Must be [`UFFD_API`].
    pub api: u64,
    /// Features requested; on return, the features granted.
    pub features: u64,
    /// On return, the ioctls the descriptor supports (a bitmask of ioctl numbers).
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    /// Start address, page aligned.
    pub start: u64,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    /// The range to register.
    pub range: UffdioRange,
    /// `UFFDIO_REGISTER_MODE_*` bits.
    pub mode: u64,
    /// On return, the ioctls available on the range.
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    /// The range to (un)protect.
    pub range: UffdioRange,
    /// `UFFDIO_WRITEPROTECT_MODE_*` bits.
    pub mode: u64,
}

/// `_IOC_WRITE`: userspace writes the argument.
pub(crate) const IOC_WRITE: u32 = 1;
/// `_IOC_READ`: userspace reads the argument back.
pub(crate) const IOC_READ: u32 = 2;

/// The kernel's `_IOC(dir, type, nr, size)` (x86_64 layout: 2 direction bits, 14 size bits,
/// 8 type bits, 8 number bits).
pub(crate) const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u64 {
    ((dir as u64) << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    /// Destination address, page aligned.
    pub dst: u64,
    /// Source address.
    pub src: u64,
    /// Length in bytes, a multiple of the page size.
    pub len: u64,
    /// `UFFDIO_COPY_MODE_*` bits.
    pub mode: u64,
    /// On return, bytes copied, or a negated errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    /// The range to map as zero pages.
    pub range: UffdioRange,
    /// Mode bits (`DONTWAKE` = 1).
    pub mode: u64,
    /// On return, bytes mapped, or a negated errno.
    pub zeropage: i64,
}

/// `struct uffd_msg` (32 bytes), as far as page faults need it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// For a page fault: `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// For a page fault: the faulting address.
    pub address: u64,
    /// For a page fault: the thread id, when asked for.
    pub ptid: u32,
    reserved4: u32,
}

/// `uffd_msg.event` of a page fault.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `_IOWR(UFFDIO, 0x03, struct uffdio_copy)`.
pub const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, size_of::<UffdioCopy>());
/// `_IOWR(UFFDIO, 0x04, struct uffdio_zeropage)`.
pub const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x04, size_of::<UffdioZeropage>());
/// `_IOR(UFFDIO, 0x02, struct uffdio_range)`.
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, size_of::<UffdioRange>());

const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioZeropage>() == 32);
const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(UFFDIO_COPY == 0xC028_AA03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xC020_AA04);
const _: () = assert!(UFFDIO_WAKE == 0x8010_AA02);

/// `_IOWR(UFFDIO, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
/// `_IOWR(UFFDIO, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x00, size_of::<UffdioRegister>());
/// `_IOR(UFFDIO, 0x01, struct uffdio_range)`.
pub const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>());
/// `_IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x06, size_of::<UffdioWriteprotect>());
/// `_IO(UFFDIO, 0x00)` on `/dev/userfaultfd`: creates a userfaultfd.
pub const USERFAULTFD_IOC_NEW: u64 = ioc(0, UFFDIO, 0x00, 0);

const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xAA00);

/// A userfaultfd in asynchronous write-protect mode (`UFFD_FEATURE_WP_ASYNC` negotiated).
#[derive(Debug)]
pub struct Userfaultfd {
    /// The descriptor, non-blocking and close-on-exec.
    fd: OwnedFd,
    /// The features enabled by the `UFFDIO_API` handshake.
    features: u64,
}

impl Userfaultfd {
    /// Returns the features this kernel offers, probed on a throwaway descriptor (a
    /// descriptor can do the `UFFDIO_API` handshake only once).
    pub fn available_features() -> Result<u64, SysError> {
        open_with(0).map(|(_, offered)| offered)
    }

    /// Creates a userfaultfd (without `UFFD_USER_MODE_ONLY`) and negotiates exactly
    /// `features`, which must include [`UFFD_FEATURE_WP_ASYNC`].
    pub fn new(features: u64) -> Result<Self, SysError> {
        if features & UFFD_FEATURE_WP_ASYNC == 0 {
            return Err(SysError::Os {
                op: "UFFDIO_API",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "only asynchronous write-protect descriptors are offered",
                ),
            });
        }
        let (fd, _) = open_with(features)?;
        // The descriptor enables only what was asked for (and WP_UNPOPULATED along with
        // WP_ASYNC, which needs it).
        Ok(Self {
            fd,
            features: features | UFFD_FEATURE_WP_UNPOPULATED,
        })
    }

    /// The features this descriptor enabled: those asked for, plus
    /// [`UFFD_FEATURE_WP_UNPOPULATED`], which the kernel always adds to `WP_ASYNC`.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[start, start + len)` in write-protect mode. The range must be page aligned
    /// and cover whole mappings the kernel allows (anonymous, or shmem/hugetlbfs with
    /// [`UFFD_FEATURE_WP_HUGETLBFS_SHMEM`]); the kernel checks all of that.
    pub fn register_write_protect(&self, start: usize, len: usize) -> Result<(), SysError> {
        let mut reg = UffdioRegister {
            range: range(start, len),
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `reg` is a `struct uffdio_register`, the argument of UFFDIO_REGISTER.
        // Registration in WP mode on a WP_ASYNC descriptor changes no memory and blocks no
        // thread (see the module docs); the kernel validates the range.
        unsafe { ioctl(&self.fd, UFFDIO_REGISTER, &mut reg, "UFFDIO_REGISTER") }
    }

    /// Write-protects (`protect`) or unprotects `[start, start + len)`. With
    /// [`UFFD_FEATURE_WP_UNPOPULATED`] this also marks pages not populated yet.
    pub fn write_protect(&self, start: usize, len: usize, protect: bool) -> Result<(), SysError> {
        let mut wp = UffdioWriteprotect {
            range: range(start, len),
            mode: if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: `wp` is a `struct uffdio_writeprotect`, the argument of
        // UFFDIO_WRITEPROTECT. Protection on a WP_ASYNC descriptor only changes how the kernel
        // records writes; it changes no memory and blocks no thread.
        unsafe { ioctl(&self.fd, UFFDIO_WRITEPROTECT, &mut wp, "UFFDIO_WRITEPROTECT") }
    }

    /// Unregisters `[start, start + len)`.
    pub fn unregister(&self, start: usize, len: usize) -> Result<(), SysError> {
        let mut r = range(start, len);
        // SAFETY: `r` is a `struct uffdio_range`, the argument of UFFDIO_UNREGISTER, which
        // stops tracking and changes no memory.
        unsafe { ioctl(&self.fd, UFFDIO_UNREGISTER, &mut r, "UFFDIO_UNREGISTER") }
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// A region whose pages are supplied on first touch: a userfaultfd in missing mode over the
/// whole of an untouched anonymous [`GuestRegion`](crate::GuestRegion). A thread that touches
/// a page not placed yet waits until [`MissingPages::copy`] or [`MissingPages::zero`] places
/// it. The handler must never touch the region itself (it would wait on its own fault).
#[derive(Debug)]
pub struct MissingPages {
    fd: OwnedFd,
    region: std::sync::Arc<crate::GuestRegion>,
}

/// What placing a range came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// Every byte was placed.
    All,
    /// The first `n` bytes were placed; the page after them was present already.
    UpTo(usize),
}

impl MissingPages {
    /// Registers all of `region` (private anonymous memory) for missing-page faults, kernel
    /// accesses included. Pages present already never fault: a region meant to fault
    /// everywhere is untouched, or has its pages dropped ([`crate::GuestRegion::discard`]).
    pub fn register(region: std::sync::Arc<crate::GuestRegion>) -> Result<Self, SysError> {
        if region.is_shared() {
            return Err(SysError::Unsupported("missing-page faults on file-backed guest memory"));
        }
        let (fd, _) = open_with(0)?;
        let mut reg = UffdioRegister {
            range: range(region.addr(), region.len()),
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: `reg` is a `struct uffdio_register`, the argument of UFFDIO_REGISTER, over
        // exactly the region's mapping, which `self` keeps alive (it holds the `Arc`) for as
        // long as the registration exists. Missing mode changes no memory; it makes threads
        // touching an absent page wait for `copy`/`zero`, which `self` offers.
        unsafe { ioctl(&fd, UFFDIO_REGISTER, &mut reg, "UFFDIO_REGISTER") }?;
        Ok(Self { fd, region })
    }

    /// The region.
    pub fn region(&self) -> &std::sync::Arc<crate::GuestRegion> {
        &self.region
    }

    /// Waits at most `timeout` for the next fault and returns its byte offset in the region
    /// (rounded down to the page), or `None` when none came.
    pub fn next_fault(&self, timeout: std::time::Duration) -> Result<Option<usize>, SysError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is one live `pollfd`, and we pass a count of 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(SysError::Os {
                op: "poll",
                source: err,
            });
        }
        if rc == 0 {
            return Ok(None);
        }
        let mut msg = UffdMsg::default();
        // SAFETY: we read at most `size_of::<UffdMsg>()` bytes into `msg`, a plain struct
        // for which any bytes are valid.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                std::ptr::from_mut(&mut msg).cast(),
                size_of::<UffdMsg>(),
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                return Ok(None);
            }
            return Err(SysError::Os {
                op: "read userfaultfd",
                source: err,
            });
        }
        if n as usize != size_of::<UffdMsg>() || msg.event != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let offset = (msg.address as usize).wrapping_sub(self.region.addr());
        if offset >= self.region.len() {
            return Ok(None);
        }
        Ok(Some(offset / crate::PAGE_SIZE * crate::PAGE_SIZE))
    }

    /// Places `src` (whole pages) at `offset` atomically and wakes any thread waiting on
    /// those pages. A page present already stops the copy there ([`Placed::UpTo`]).
    pub fn copy(&self, offset: usize, src: &[u8]) -> Result<Placed, SysError> {
        let mut done = 0;
        // EAGAIN (the address space changing under the copy) places part
        // or none of it: go on from where it stopped, a bounded number of times.
        for _ in 0..64 {
            let (at, rest) = (offset + done, &src[done..]);
            let start = self.page_range(at, rest.len())?;
            let mut copy = UffdioCopy {
                dst: start as u64,
                src: rest.as_ptr() as u64,
                len: rest.len() as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `copy` is a `struct uffdio_copy`, the argument of UFFDIO_COPY. The
            // kernel reads `rest` (a private buffer, borrowed for the call) and fills absent
            // pages of the registered range inside our region (checked by `page_range`); it
            // never replaces a present page.
            let result = unsafe { ioctl(&self.fd, UFFDIO_COPY, &mut copy, "UFFDIO_COPY") };
            match result {
                Err(SysError::Os { ref source, .. }) if source.raw_os_error() == Some(libc::EAGAIN) => {
                    done += copy.copy.max(0) as usize;
                    if done >= src.len() {
                        return Ok(Placed::All);
                    }
                }
                other => {
                    return match self.outcome(other, copy.copy)? {
                        Placed::All => Ok(Placed::All),
                        Placed::UpTo(n) => Ok(Placed::UpTo(done + n)),
                    };
                }
            }
        }
        Err(SysError::Os {
            op: "UFFDIO_COPY",
            source: std::io::Error::from_raw_os_error(libc::EAGAIN),
        })
    }

    /// Maps `len` bytes at `offset` as zero pages and wakes waiting threads; a present page
    /// stops it there ([`Placed::UpTo`]).
    pub fn zero(&self, offset: usize, len: usize) -> Result<Placed, SysError> {
        let start = self.page_range(offset, len)?;
        let mut zero = UffdioZeropage {
            range: range(start, len),
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `zero` is a `struct uffdio_zeropage`, the argument of UFFDIO_ZEROPAGE; the
        // kernel maps the zero page into absent pages of our registered range only.
        let result = unsafe { ioctl(&self.fd, UFFDIO_ZEROPAGE, &mut zero, "UFFDIO_ZEROPAGE") };
        self.outcome(result, zero.zeropage)
    }

    /// Wakes threads waiting on `[offset, offset + len)` (after a page they wait on turned out
    /// to be present already).
    pub fn wake(&self, offset: usize, len: usize) -> Result<(), SysError> {
        let mut r = range(self.page_range(offset, len)?, len);
        // SAFETY: `r` is a `struct uffdio_range`, the argument of UFFDIO_WAKE, which only
        // wakes threads.
        unsafe { ioctl(&self.fd, UFFDIO_WAKE, &mut r, "UFFDIO_WAKE") }
    }

    fn page_range(&self, offset: usize, len: usize) -> Result<usize, SysError> {
        if offset % crate::PAGE_SIZE != 0 || len % crate::PAGE_SIZE != 0 || len == 0 {
            return Err(SysError::InvalidLength {
                len,
                reason: "placing needs whole, aligned pages",
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.region.len() => Ok(self.region.addr() + offset),
            _ => Err(SysError::OutOfBounds {
                offset,
                len,
                size: self.region.len(),
            }),
        }
    }

    fn outcome(&self, result: Result<(), SysError>, done: i64) -> Result<Placed, SysError> {
        match result {
            Ok(()) => Ok(Placed::All),
            Err(SysError::Os { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(Placed::UpTo(done.max(0) as usize))
            }
            // Interrupted part way: report what was placed; the caller goes on from there.
            Err(SysError::Os { source, .. }) if source.raw_os_error() == Some(libc::EAGAIN) && done > 0 => {
                Ok(Placed::UpTo(done as usize))
            }
            Err(err) => Err(err),
        }
    }
}

impl MissingPages {
    /// Gives up serving faults but keeps the registration for good: a thread that touches a
    /// page never placed waits forever instead of reading zeros where guest data belonged.
    /// For a load that failed; the descriptor and the region stay allocated.
    pub fn keep_absent_pages_blocked(self) {
        std::mem::forget(self);
    }
}

impl Drop for MissingPages {
    fn drop(&mut self) {
        let mut r = range(self.region.addr(), self.region.len());
        // SAFETY: `r` is a `struct uffdio_range`, the argument of UFFDIO_UNREGISTER. After it,
        // absent pages fault in as zeros as usual; closing the descriptor would do the same.
        let _ = unsafe { ioctl(&self.fd, UFFDIO_UNREGISTER, &mut r, "UFFDIO_UNREGISTER") };
    }
}

/// Builds a `struct uffdio_range`.
fn range(start: usize, len: usize) -> UffdioRange {
    UffdioRange {
        start: start as u64,
        len: len as u64,
    }
}

/// Opens a new userfaultfd, `O_CLOEXEC | O_NONBLOCK`, without `UFFD_USER_MODE_ONLY`.
/// A new userfaultfd that did the `UFFDIO_API` handshake for `features`, and the features
/// the kernel offers (a descriptor does the handshake once).
fn open_with(features: u64) -> Result<(OwnedFd, u64), SysError> {
    let fd = open()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `fd` is a userfaultfd and `api` a `struct uffdio_api`, the argument of
    // UFFDIO_API; the handshake only configures the descriptor.
    unsafe { ioctl(&fd, UFFDIO_API, &mut api, "UFFDIO_API") }?;
    Ok((fd, api.features))
}

fn open() -> Result<OwnedFd, SysError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes one integer flag argument and returns a new descriptor or
    // -1; it touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if rc >= 0 {
        // SAFETY: the system call just returned this descriptor; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(rc as libc::c_int) });
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS) => return Err(SysError::Unsupported("userfaultfd")),
        Some(libc::EPERM) => {}
        _ => {
            return Err(SysError::Os {
                op: "userfaultfd",
                source: err,
            });
        }
    }
    // The system call is refused to this process; /dev/userfaultfd is governed by file
    // permissions instead.
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|source| SysError::Os {
            op: "open /dev/userfaultfd",
            source,
        })?;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer argument and returns a new
    // descriptor or -1; it touches no memory of ours.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW as libc::Ioctl,
            flags as libc::c_ulong,
        )
    };
    if rc < 0 {
        return Err(SysError::last_os("USERFAULTFD_IOC_NEW"));
    }
    // SAFETY: the ioctl just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(rc) })
}

/// Issues `request` on `fd` with a pointer to `arg`, turning -1 into the error of `op`.
///
/// # Safety
///
/// `T` must be the argument struct of `request` (the kernel then reads and writes only inside
/// `arg`), and what `request` does to `fd` and to the process must not break memory safety.
pub(crate) unsafe fn ioctl<T>(fd: &OwnedFd, request: u64, arg: &mut T, op: &'static str) -> Result<(), SysError> {
    // SAFETY: `fd` is open for the call; `arg` is a live, exclusively borrowed `T`, which the
    // caller guarantees is the argument of `request` (sizes checked by the const asserts
    // above), so the kernel stays inside it. The caller argues the request's other effects.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, std::ptr::from_mut(arg)) };
    if rc < 0 {
        return Err(SysError::last_os(op));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_offers_async_write_protect() {
        let features = Userfaultfd::available_features().unwrap();
        let needed = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        assert_eq!(features & needed, needed, "features {features:#x}");
        let uffd = Userfaultfd::new(needed).unwrap();
        assert_eq!(uffd.features() & needed, needed);
    }

    #[test]
    fn missing_pages_wait_until_placed() {
        use std::sync::Arc;
        let region = Arc::new(crate::GuestRegion::anonymous(8 * crate::PAGE_SIZE).unwrap());
        let missing = MissingPages::register(Arc::clone(&region)).unwrap();
        // Pages 0..2 placed ahead: no fault.
        let mut data = vec![0x5au8; 2 * crate::PAGE_SIZE];
        assert_eq!(missing.copy(0, &data).unwrap(), Placed::All);
        // A second copy over a present page stops there.
        data.fill(0x11);
        assert_eq!(missing.copy(crate::PAGE_SIZE, &data).unwrap(), Placed::UpTo(0));
        // A reader of page 5 waits for the handler, which serves it.
        let reader = {
            let region = Arc::clone(&region);
            std::thread::spawn(move || {
                let mut page = vec![0u8; crate::PAGE_SIZE];
                region.read(5 * crate::PAGE_SIZE, &mut page).unwrap();
                page
            })
        };
        let fault = loop {
            if let Some(offset) = missing.next_fault(std::time::Duration::from_secs(30)).unwrap() {
                break offset;
            }
        };
        assert_eq!(fault, 5 * crate::PAGE_SIZE);
        assert_eq!(missing.copy(fault, &[0x77; crate::PAGE_SIZE]).unwrap(), Placed::All);
        assert!(reader.join().unwrap().iter().all(|&b| b == 0x77));
        assert_eq!(
            missing.zero(6 * crate::PAGE_SIZE, 2 * crate::PAGE_SIZE).unwrap(),
            Placed::All
        );
        assert!(region.is_zero(6 * crate::PAGE_SIZE, 2 * crate::PAGE_SIZE).unwrap());
        let mut page = vec![0u8; crate::PAGE_SIZE];
        region.read(crate::PAGE_SIZE, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x5a), "the first copy stands");
        assert!(missing.copy(8 * crate::PAGE_SIZE, &data[..crate::PAGE_SIZE]).is_err());
        assert!(missing.copy(1, &data[..crate::PAGE_SIZE]).is_err());
    }

    #[test]
    fn only_async_descriptors_are_offered() {
        assert!(Userfaultfd::new(UFFD_FEATURE_WP_UNPOPULATED).is_err());
    }
}
