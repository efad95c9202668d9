//! The unsafe OS primitives of the migration stack, behind safe types.
//!
//! This is the one crate of the workspace that holds `unsafe` code. It offers:
//!
//! - [`GuestRegion`]: a mapping of guest RAM that many threads share. It never hands out
//!   references to guest bytes; every access is a volatile copy (see [`region`]).
//! - [`WriteTracker`]: the kernel-tracked write log of one region, built from userfaultfd in
//!   asynchronous write-protect mode ([`uffd`]) and the `PAGEMAP_SCAN` ioctl ([`pagemap`]).
//! - [`is_zero_buf`]: a fast zero check of a private buffer.
//! - [`AlignedBuf`]: a private buffer aligned for `O_DIRECT` file I/O.
//! - [`KvmVm`]: the memory slots of a KVM VM and their dirty logs.
//! - [`fdpass`]: file descriptors sent over a unix socket (`SCM_RIGHTS`).
//! - With feature `vm-memory`: `GuestRegion::from_vm_memory`, guest RAM that rust-vmm's
//!   `vm-memory` mapped, shared without a copy (module `vm_memory`).
//!
//! Every `unsafe` block carries a `// SAFETY:` comment, and every ioctl number is checked at
//! compile time against the `_IOC` computation it comes from.

pub mod aligned;
pub mod fdpass;
pub mod kvm;
pub mod pagemap;
pub mod region;
pub mod thread;
pub mod tracker;
pub mod uffd;
pub mod uring;
#[cfg(feature = "vm-memory")]
pub mod vm_memory;
mod volatile;

pub use aligned::{AlignedBuf, direct_io_alignment, zeroed_atomics};
pub use kvm::{KvmSlot, KvmVm};
pub use region::GuestRegion;
pub use tracker::WriteTracker;

/// The page size every index in this crate counts in (the base page size of x86_64 Linux).
pub const PAGE_SIZE: usize = 4096;

/// Errors of the OS primitives.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation that failed, e.g. `"mmap"` or `"UFFDIO_REGISTER"`.
        op: &'static str,
        /// The error the kernel returned.
        #[source]
        source: std::io::Error,
    },
    /// An access reaches outside the region (or its end overflows `usize`).
    #[error("range {offset}+{len} is outside the region of {size} bytes")]
    OutOfBounds {
        /// First byte of the range.
        offset: usize,
        /// Length of the range in bytes.
        len: usize,
        /// Size of the region in bytes.
        size: usize,
    },
    /// The running kernel lacks a feature this crate needs.
    #[error("the kernel lacks {0}")]
    Unsupported(&'static str),
    /// A mapping made elsewhere cannot serve as a region.
    #[error("the mapping at {addr:#x} cannot be guest RAM: {reason}")]
    InvalidMapping {
        /// Start of the mapping in this process (0: none).
        addr: usize,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A region was asked for with a length it cannot have.
    #[error("invalid region length {len}: {reason}")]
    InvalidLength {
        /// The length asked for, in bytes.
        len: usize,
        /// Why it is refused.
        reason: &'static str,
    },
}

impl SysError {
    /// Wraps the calling thread's last OS error (`errno`) as the failure of `op`.
    pub(crate) fn last_os(op: &'static str) -> Self {
        SysError::Os {
            op,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// Returns whether `buf` holds only zero bytes.
///
/// Meant for private buffers (a page already copied out of guest memory); compares 64 bytes at
/// a time so the compiler vectorises the loop.
#[inline]
pub fn is_zero_buf(buf: &[u8]) -> bool {
    let chunks = buf.chunks_exact(64);
    let tail = chunks.remainder();
    for chunk in chunks {
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Helpers shared by the unit tests.

    use std::fs::File;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A file under /dev/shm with a unique name, removed on drop.
    pub(crate) struct ShmFile {
        pub(crate) path: std::path::PathBuf,
        pub(crate) file: File,
    }

    impl ShmFile {
        pub(crate) fn new(len: u64) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::path::PathBuf::from(format!("/dev/shm/migration-sys-test-{}-{n}", std::process::id()));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .expect("create shm file");
            file.set_len(len).expect("set_len");
            Self { path, file }
        }
    }

    impl Drop for ShmFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_buf_finds_any_nonzero_byte() {
        for len in [0usize, 1, 7, 63, 64, 65, 4096, 4099] {
            let mut buf = vec![0u8; len];
            assert!(is_zero_buf(&buf), "len {len}");
            for i in 0..len {
                buf[i] = 1;
                assert!(!is_zero_buf(&buf), "len {len} byte {i}");
                buf[i] = 0;
            }
        }
    }

    #[test]
    fn errors_read_lowercase_without_period() {
        let e = SysError::OutOfBounds {
            offset: 4096,
            len: 8,
            size: 4096,
        };
        assert_eq!(e.to_string(), "range 4096+8 is outside the region of 4096 bytes");
        assert_eq!(
            SysError::Unsupported("UFFD_FEATURE_WP_ASYNC").to_string(),
            "the kernel lacks UFFD_FEATURE_WP_ASYNC"
        );
    }
}

/// Makes writes past the process's file size limit (`RLIMIT_FSIZE`) fail with `EFBIG`
/// instead of killing the process with `SIGXFSZ`, so a save that outgrows its limit reports
/// the error and cleans up like any other failed write.
pub fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code; it only
    // changes what the kernel does on SIGXFSZ (the write then fails with EFBIG).
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}
