//! [`KvmVm`]: the memory side of a KVM virtual machine: guest RAM slots and
//! their dirty logs.
//!
//! The VMM creates the VM and its vCPUs as it likes (with `kvm-ioctls`, say)
//! and hands its VM file descriptor to [`KvmVm::from_vm_fd`], which checks
//! that it is a KVM VM and keeps a duplicate. Memory slots are registered
//! here, over [`GuestRegion`]s that the slot keeps mapped for as long as this
//! value lives, so the bitmaps KVM writes are always sized from slots this
//! type knows: that is what makes the dirty-log calls safe.
//!
//! Dirty logging follows the manual-protect protocol
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) when the kernel offers it:
//! `KVM_GET_DIRTY_LOG` reads the bitmap without touching the pages, and
//! `KVM_CLEAR_DIRTY_LOG` clears the bits read and write-protects those pages
//! again. Without it, `KVM_GET_DIRTY_LOG` does both at once.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::uffd::{IOC_READ, IOC_WRITE, ioc, ioctl};
use crate::{GuestRegion, PAGE_SIZE, SysError};

const KVMIO: u32 = 0xAE;

/// `struct kvm_userspace_memory_region`.
#[repr(C)]
struct UserspaceMemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

/// `struct kvm_dirty_log`.
#[repr(C)]
struct DirtyLogArg {
    slot: u32,
    padding: u32,
    dirty_bitmap: u64,
}

/// `struct kvm_clear_dirty_log`.
#[repr(C)]
struct ClearDirtyLogArg {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    dirty_bitmap: u64,
}

/// `struct kvm_enable_cap`.
#[repr(C)]
struct EnableCap {
    cap: u32,
    flags: u32,
    args: [u64; 4],
    pad: [u8; 64],
}

const KVM_CHECK_EXTENSION: u64 = ioc(0, KVMIO, 0x03, 0);
const KVM_SET_USER_MEMORY_REGION: u64 = ioc(IOC_WRITE, KVMIO, 0x46, size_of::<UserspaceMemoryRegion>());
const KVM_GET_DIRTY_LOG: u64 = ioc(IOC_WRITE, KVMIO, 0x42, size_of::<DirtyLogArg>());
const KVM_CLEAR_DIRTY_LOG: u64 = ioc(IOC_READ | IOC_WRITE, KVMIO, 0xc0, size_of::<ClearDirtyLogArg>());
const KVM_ENABLE_CAP: u64 = ioc(IOC_WRITE, KVMIO, 0xa3, size_of::<EnableCap>());

const _: () = assert!(KVM_CHECK_EXTENSION == 0xAE03);
const _: () = assert!(KVM_SET_USER_MEMORY_REGION == 0x4020_AE46);
const _: () = assert!(KVM_GET_DIRTY_LOG == 0x4010_AE42);
const _: () = assert!(KVM_CLEAR_DIRTY_LOG == 0xC018_AEC0);
const _: () = assert!(KVM_ENABLE_CAP == 0x4068_AEA3);

const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;
const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;

/// One memory slot: where it sits in guest-physical memory and the region
/// behind it.
#[derive(Debug, Clone)]
pub struct KvmSlot {
    /// The slot number KVM knows it by.
    pub id: u32,
    /// Guest-physical address of its first byte.
    pub guest_addr: u64,
    /// The host memory behind it, kept mapped while the slot exists.
    pub region: Arc<GuestRegion>,
    /// Whether KVM logs writes to it.
    pub logging: bool,
}

impl KvmSlot {
    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.region.pages() as u64
    }
}

/// The memory side of a KVM VM: slots over [`GuestRegion`]s and their dirty logs.
#[derive(Debug)]
pub struct KvmVm {
    fd: OwnedFd,
    slots: Mutex<Vec<KvmSlot>>,
    manual_protect: Mutex<bool>,
}

impl KvmVm {
    /// Takes a duplicate of `fd`, which must be a KVM VM (`anon_inode:kvm-vm`,
    /// checked through `/proc/self/fd`); the caller keeps its own.
    pub fn from_vm_fd(fd: RawFd) -> Result<Self, SysError> {
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|source| SysError::Os {
            op: "readlink of the KVM VM fd",
            source,
        })?;
        if link.as_os_str() != "anon_inode:kvm-vm" {
            return Err(SysError::Unsupported(
                "a KVM VM file descriptor (got another kind of file)",
            ));
        }
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor number only creates a new descriptor; it
        // touches no memory of ours.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(SysError::last_os("fcntl(F_DUPFD_CLOEXEC)"));
        }
        // SAFETY: `dup` is a descriptor fcntl just created for us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        Ok(Self {
            fd,
            slots: Mutex::new(Vec::new()),
            manual_protect: Mutex::new(false),
        })
    }

    fn slots(&self) -> MutexGuard<'_, Vec<KvmSlot>> {
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The slots registered so far, in registration order.
    pub fn slot_list(&self) -> Vec<KvmSlot> {
        self.slots().clone()
    }

    /// Whether the kernel offers `cap` (`KVM_CHECK_EXTENSION` on the VM): its value, 0 if not.
    pub fn check_extension(&self, cap: u32) -> i32 {
        // SAFETY: KVM_CHECK_EXTENSION takes its argument by value and writes no memory.
        unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                KVM_CHECK_EXTENSION as libc::Ioctl,
                libc::c_ulong::from(cap),
            )
        }
        .max(0)
    }

    fn register(&self, slot: &KvmSlot) -> Result<(), SysError> {
        let mut arg = UserspaceMemoryRegion {
            slot: slot.id,
            flags: if slot.logging { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: slot.guest_addr,
            memory_size: slot.region.len() as u64,
            userspace_addr: slot.region.addr() as u64,
        };
        // SAFETY: the argument is a valid `kvm_userspace_memory_region` KVM only reads. The
        // memory it names is the region's own mapping, which the slot list keeps alive (the
        // `Arc`) for as long as this VM descriptor; guest accesses to it are the guest's,
        // which every user of a `GuestRegion` already tolerates (volatile access only).
        unsafe {
            ioctl(
                &self.fd,
                KVM_SET_USER_MEMORY_REGION,
                &mut arg,
                "KVM_SET_USER_MEMORY_REGION",
            )
        }
    }

    /// Maps `region` into guest-physical memory at `guest_addr` as slot `id`,
    /// without dirty logging. `guest_addr` must be page aligned; a slot id
    /// already registered is refused.
    pub fn add_slot(&self, id: u32, guest_addr: u64, region: Arc<GuestRegion>) -> Result<(), SysError> {
        if guest_addr % PAGE_SIZE as u64 != 0 {
            return Err(SysError::InvalidLength {
                len: guest_addr as usize,
                reason: "guest address of a KVM slot must be page aligned",
            });
        }
        let mut slots = self.slots();
        if slots.iter().any(|s| s.id == id) {
            return Err(SysError::Unsupported("registering a KVM slot twice"));
        }
        let slot = KvmSlot {
            id,
            guest_addr,
            region,
            logging: false,
        };
        self.register(&slot)?;
        slots.push(slot);
        Ok(())
    }

    /// Turns dirty logging of slot `id` on or off. Turning it on makes KVM
    /// write-protect the slot; writes from then on are logged.
    pub fn set_dirty_logging(&self, id: u32, on: bool) -> Result<(), SysError> {
        let mut slots = self.slots();
        let slot = slots
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or(SysError::Unsupported("dirty logging of a KVM slot never registered"))?;
        if slot.logging == on {
            return Ok(());
        }
        let mut changed = slot.clone();
        changed.logging = on;
        self.register(&changed)?;
        *slot = changed;
        Ok(())
    }

    /// Asks for the manual-protect protocol (reading the log leaves pages
    /// writable until [`KvmVm::clear_dirty_log`]). Returns whether it is on;
    /// `false` where the kernel lacks it, and reading the log then clears it.
    pub fn enable_manual_protect(&self) -> Result<bool, SysError> {
        let mut on = self.manual_protect.lock().unwrap_or_else(|p| p.into_inner());
        if *on {
            return Ok(true);
        }
        if self.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & 1 == 0 {
            return Ok(false);
        }
        let mut arg = EnableCap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            flags: 0,
            args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, 0, 0, 0],
            pad: [0; 64],
        };
        // SAFETY: the argument is a valid `kvm_enable_cap` that KVM only reads.
        unsafe {
            ioctl(
                &self.fd,
                KVM_ENABLE_CAP,
                &mut arg,
                "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
            )?
        };
        *on = true;
        Ok(true)
    }

    /// The words of slot `id`'s dirty bitmap (`KVM_GET_DIRTY_LOG`) into
    /// `bitmap`, which is resized to one bit per page; bit `i` is page `i`
    /// of the slot. With manual protect on, the log is left as it is.
    pub fn dirty_log(&self, id: u32, bitmap: &mut Vec<u64>) -> Result<(), SysError> {
        let pages = self.logging_slot_pages(id)?;
        // KVM overwrites every word: only new ones need initialising.
        bitmap.resize(pages.div_ceil(64) as usize, 0);
        let mut arg = DirtyLogArg {
            slot: id,
            padding: 0,
            dirty_bitmap: bitmap.as_mut_ptr() as u64,
        };
        // SAFETY: KVM writes one bit per page of the slot, rounded up to whole 64-bit words
        // (the kernel's `kvm_dirty_bitmap_bytes`), into the buffer; `bitmap` holds exactly that
        // many words for the slot's length, which this type registered itself.
        unsafe { ioctl(&self.fd, KVM_GET_DIRTY_LOG, &mut arg, "KVM_GET_DIRTY_LOG") }
    }

    /// Clears the bits of `bitmap` (as [`KvmVm::dirty_log`] read it) in
    /// slot `id`'s log and write-protects those pages again
    /// (`KVM_CLEAR_DIRTY_LOG`). Needs manual protect on.
    pub fn clear_dirty_log(&self, id: u32, bitmap: &[u64]) -> Result<(), SysError> {
        let pages = self.logging_slot_pages(id)?;
        if bitmap.len() as u64 != pages.div_ceil(64) {
            return Err(SysError::InvalidLength {
                len: bitmap.len(),
                reason: "a KVM dirty bitmap must have one bit per page of its slot",
            });
        }
        let num_pages =
            u32::try_from(pages).map_err(|_| SysError::Unsupported("clearing a slot of 2^32 pages or more at once"))?;
        let mut arg = ClearDirtyLogArg {
            slot: id,
            num_pages,
            first_page: 0,
            dirty_bitmap: bitmap.as_ptr() as u64,
        };
        // SAFETY: KVM reads `num_pages` bits from the buffer, which holds that many rounded up
        // to whole words (checked above); it writes nothing into it.
        unsafe { ioctl(&self.fd, KVM_CLEAR_DIRTY_LOG, &mut arg, "KVM_CLEAR_DIRTY_LOG") }
    }

    fn logging_slot_pages(&self, id: u32) -> Result<u64, SysError> {
        self.slots()
            .iter()
            .find(|s| s.id == id && s.logging)
            .map(KvmSlot::pages)
            .ok_or(SysError::Unsupported("the dirty log of a KVM slot that does not log"))
    }
}
