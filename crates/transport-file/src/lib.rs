//! Snapshot files: guest RAM and device state saved to a file and restored
//! from it, through the same channel boundary as a live migration.
//!
//! A save is a live migration whose destination is a file. [`SaveTarget`]
//! hands the source runtime (`migration_core::source::run_source`) channels
//! that answer the handshake, acknowledge epochs and confirm the handover
//! themselves, and write every page at its fixed offset of a mapped-ram file
//! (format in [`migration_wire::mapped_ram`]). Several channels write in
//! parallel, a page dirtied again is rewritten in place, so the file never
//! outgrows the guest's RAM, and zero pages are never written (their bit
//! stays clear and the file stays sparse). The save commits in this order:
//! data, `fdatasync`, bitmaps, device state and the commit record,
//! `fdatasync`, rename over the final name, `fsync` of the directory; until
//! the rename the file has a temporary name, so an unfinished save never
//! replaces a good snapshot.
//!
//! A restore is a live migration whose source is a file. [`RestoreSource`]
//! checks the file (header, commit record, bitmaps) before anything is
//! placed and hands the destination runtime
//! (`migration_core::dest::run_destination`) channels that produce the
//! stream a source would: every page, each channel reading its share with
//! positional reads, the device state, and the digests kept in the commit
//! record, which the destination compares with the pages it placed.
//!
//! A stream file ([`stream`]) is the other format: the migration stream
//! itself, frame after frame, to a file or a pipe, played back the same way.
//!
//! A lazy restore ([`LazyRestore`]) lets the guest run before its pages
//! are loaded: each is loaded on first touch through userfaultfd, while a
//! prefetcher loads the rest.
#![forbid(unsafe_code)]

pub mod lazy;
mod replies;
pub mod restore;
pub mod save;
pub mod stream;

pub use lazy::{LazyReport, LazyRestore};
pub use restore::{RestoreSource, Snapshot};
pub use save::{SaveOptions, SaveTarget};
pub use stream::{StreamSource, StreamTarget};

/// Why a snapshot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The operating system reported an error.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid snapshot.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The file was never committed (the save did not finish), or was
    /// truncated or damaged at its end since.
    #[error("{path}: not a finished snapshot ({problem})")]
    Unfinished {
        /// The file.
        path: String,
        /// What was found instead of a valid commit record.
        problem: String,
    },
}

/// Puts a finished file in place: renames `partial` over `path`, then syncs
/// the directory so the rename survives a crash.
fn install(partial: &std::path::Path, path: &std::path::Path) -> std::io::Result<()> {
    std::fs::rename(partial, path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::File::open(&dir)?.sync_all()
}

/// The temporary name a file is written under beside `path` until it is
/// complete (`fallback` names a path without a file name).
fn partial_path(path: &std::path::Path, fallback: &str) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| fallback.into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Opens `path` for page writes (`write`) or page reads, with `O_DIRECT`
/// when `direct_io` (checked against what the file system requires); a
/// failure becomes `error(what was being done, the OS error)`.
fn open_pages<E>(
    path: &std::path::Path,
    write: bool,
    direct_io: bool,
    error: impl Fn(String, std::io::Error) -> E,
) -> Result<std::fs::File, E> {
    use std::os::unix::fs::OpenOptionsExt;
    let (io, doing) = if write {
        ("writes", "writing")
    } else {
        ("reads", "reading")
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(!write).write(write);
    if direct_io {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options
        .open(path)
        .map_err(|e| error(format!("opening {} for page {io}", path.display()), e))?;
    if direct_io {
        check_direct_io(&file, path).map_err(|e| error(format!("{doing} {} with O_DIRECT", path.display()), e))?;
    }
    Ok(file)
}

fn io_error(context: impl Into<String>, source: std::io::Error) -> FileError {
    FileError::Io {
        context: context.into(),
        source,
    }
}

/// Checks that `file` (opened for `O_DIRECT`) accepts what the snapshot's
/// I/O uses: buffers and offsets aligned to whole 4 KiB pages. The rule is
/// the larger of 4096 and what the file system reports (`statx`).
fn check_direct_io(file: &std::fs::File, path: &std::path::Path) -> std::io::Result<()> {
    const PAGE: u32 = migration_sys::aligned::DIRECT_IO_ALIGN as u32;
    match migration_sys::direct_io_alignment(file)? {
        Some((0, 0)) => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!(
                "{} is on a file system without O_DIRECT: leave out --direct-io",
                path.display()
            ),
        )),
        Some((mem, offset)) if mem.max(offset) > PAGE => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!(
                "O_DIRECT on {} needs {}-byte alignment, more than the {PAGE}-byte pages a snapshot is written in: leave out --direct-io",
                path.display(),
                mem.max(offset)
            ),
        )),
        _ => Ok(()),
    }
}
