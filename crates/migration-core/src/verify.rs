//! Per-page hashes and block digests, to prove the destination's RAM equals
//! the source's.
//!
//! A block's digest is xxh3-64 over the little-endian xxh3-64 of each page,
//! in page order. The destination computes page hashes from the bytes it
//! places (so the check costs no downtime and survives the guest running
//! afterwards); the source hashes its frozen RAM after the handover, never
//! the send path.

use crate::ram::Ram;
use migration_sys::SysError;
use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::Xxh3;

/// Hash of one page's bytes: the wire's, so hashes a transport took while
/// checking a frame serve the digest comparison too.
pub use migration_wire::page::page_hash;

/// The hash of a 4 KiB page of zeros (computed once): what every side
/// records for a page that travels as a zero flag.
pub fn zero_page_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| page_hash(&[0; 4096]))
}

/// The digest of a block from its page hashes.
pub fn block_digest(page_hashes: &[u64]) -> u64 {
    digest_of(page_hashes.iter().copied())
}

/// [`block_digest`] of page hashes kept in atomics (each read `Relaxed`).
pub fn block_digest_atomic(page_hashes: &[AtomicU64]) -> u64 {
    digest_of(page_hashes.iter().map(|hash| hash.load(Ordering::Relaxed)))
}

fn digest_of(page_hashes: impl Iterator<Item = u64>) -> u64 {
    let mut hasher = Xxh3::new();
    for hash in page_hashes {
        hasher.update(&hash.to_le_bytes());
    }
    hasher.digest()
}

/// Hashes every page of every block of `ram` (which must not change
/// meanwhile: the VM is paused), on `threads` threads.
pub fn ram_digests(ram: &Ram, threads: usize) -> Result<Vec<u64>, SysError> {
    let mut digests = Vec::with_capacity(ram.blocks().len());
    for block in ram.blocks() {
        let page_size = block.page_size() as usize;
        let pages = block.pages() as usize;
        let mut hashes = vec![0u64; pages];
        let chunk = pages.div_ceil(threads.max(1)).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = hashes
                .chunks_mut(chunk)
                .enumerate()
                .map(|(i, out)| {
                    let region = block.region();
                    scope.spawn(move || -> Result<(), SysError> {
                        let mut buf = vec![0u8; page_size * 64];
                        let first = i * chunk;
                        for (j, group) in out.chunks_mut(64).enumerate() {
                            let offset = (first + j * 64) * page_size;
                            let bytes = &mut buf[..group.len() * page_size];
                            region.read(offset, bytes)?;
                            for (hash, page) in group.iter_mut().zip(bytes.chunks_exact(page_size)) {
                                *hash = page_hash(page);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })?;
        digests.push(block_digest(&hashes));
    }
    Ok(digests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::RamBlock;
    use migration_sys::GuestRegion;
    use std::sync::Arc;

    #[test]
    fn digests_follow_content_and_agree_across_thread_counts() {
        let region = Arc::new(GuestRegion::anonymous(300 * 4096).expect("mmap"));
        let ram = Ram::new(vec![RamBlock::new("a", Arc::clone(&region))]);
        let zero = ram_digests(&ram, 1).expect("hash");
        let hashes = vec![page_hash(&[0; 4096]); 300];
        assert_eq!(zero, vec![block_digest(&hashes)]);
        region.write(299 * 4096 + 7, &[1]).expect("write");
        let one = ram_digests(&ram, 1).expect("hash");
        assert_ne!(one, zero);
        assert_eq!(ram_digests(&ram, 2).expect("hash"), one);
        assert_eq!(ram_digests(&ram, 7).expect("hash"), one);
    }

    #[test]
    fn atomic_digest_agrees_with_the_plain_one() {
        for hashes in [
            vec![],
            vec![7],
            (0..300u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect(),
        ] {
            let atomics: Vec<AtomicU64> = hashes.iter().map(|&h| AtomicU64::new(h)).collect();
            assert_eq!(block_digest_atomic(&atomics), block_digest(&hashes));
        }
    }
}
