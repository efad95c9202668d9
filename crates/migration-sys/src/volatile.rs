//! Volatile copies between guest memory and private buffers.
//!
//! Guest memory changes under our feet (vCPUs, writer threads), so it is only ever touched
//! through `read_volatile`/`write_volatile`: the compiler may neither elide, merge nor repeat
//! those accesses, and no reference to guest bytes ever exists. The bulk of each copy moves
//! aligned `u64` words, four per iteration; the unaligned head and tail go byte by byte.

/// Bytes moved per unrolled iteration (four `u64` words).
const BLOCK: usize = 32;
/// Size of one word.
const WORD: usize = size_of::<u64>();

/// Number of leading bytes to move one at a time so that `ptr + head` is 8-byte aligned,
/// capped at `len`.
#[inline]
fn head_len(addr: usize, len: usize) -> usize {
    (addr.wrapping_neg() % WORD).min(len)
}

/// Copies `dst.len()` bytes from guest memory at `src` into `dst`.
///
/// # Safety
///
/// `src..src + dst.len()` must lie inside one live mapping that stays mapped and readable
/// for the duration of the call. Other threads may write it concurrently.
#[inline]
pub(crate) unsafe fn copy_from_guest(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    let out = dst.as_mut_ptr();
    let head = head_len(src as usize, len);
    let mut i = 0;
    // SAFETY: the caller guarantees `src..src + len` is readable guest
    // memory, and `out..out + len` is `dst`, which we borrow mutably. Every offset below is
    // `< len` (or `+ BLOCK`/`+ WORD <= len`), so all pointers stay in both ranges. After the
    // head, `src + i` is 8-aligned, as `read_volatile::<u64>` requires; `dst` has no such
    // alignment, hence `write_unaligned`.
    unsafe {
        while i < head {
            out.add(i).write(src.add(i).read_volatile());
            i += 1;
        }
        while i + BLOCK <= len {
            let s = src.add(i).cast::<u64>();
            let a = s.read_volatile();
            let b = s.add(1).read_volatile();
            let c = s.add(2).read_volatile();
            let d = s.add(3).read_volatile();
            let o = out.add(i).cast::<u64>();
            o.write_unaligned(a);
            o.add(1).write_unaligned(b);
            o.add(2).write_unaligned(c);
            o.add(3).write_unaligned(d);
            i += BLOCK;
        }
        while i + WORD <= len {
            let w = src.add(i).cast::<u64>().read_volatile();
            out.add(i).cast::<u64>().write_unaligned(w);
            i += WORD;
        }
        while i < len {
            out.add(i).write(src.add(i).read_volatile());
            i += 1;
        }
    }
}

/// Copies `src` into guest memory at `dst`.
///
/// # Safety
///
/// `dst..dst + src.len()` must lie inside one live mapping that stays mapped and writable for
/// the duration of the call, and must not overlap `src`. Other threads may access it
/// concurrently.
#[inline]
pub(crate) unsafe fn copy_to_guest(src: &[u8], dst: *mut u8) {
    let len = src.len();
    let inp = src.as_ptr();
    let head = head_len(dst as usize, len);
    let mut i = 0;
    // SAFETY: the caller guarantees `dst..dst + len` is writable guest
    // memory; `inp..inp + len` is `src`, which we borrow. Offsets stay below `len` as in
    // `copy_from_guest`. After the head `dst + i` is 8-aligned for `write_volatile::<u64>`;
    // the private source has no alignment, hence `read_unaligned`.
    unsafe {
        while i < head {
            dst.add(i).write_volatile(inp.add(i).read());
            i += 1;
        }
        while i + BLOCK <= len {
            let s = inp.add(i).cast::<u64>();
            let a = s.read_unaligned();
            let b = s.add(1).read_unaligned();
            let c = s.add(2).read_unaligned();
            let d = s.add(3).read_unaligned();
            let o = dst.add(i).cast::<u64>();
            o.write_volatile(a);
            o.add(1).write_volatile(b);
            o.add(2).write_volatile(c);
            o.add(3).write_volatile(d);
            i += BLOCK;
        }
        while i + WORD <= len {
            let w = inp.add(i).cast::<u64>().read_unaligned();
            dst.add(i).cast::<u64>().write_volatile(w);
            i += WORD;
        }
        while i < len {
            dst.add(i).write_volatile(inp.add(i).read());
            i += 1;
        }
    }
}

/// Sets `len` bytes of guest memory at `dst` to `byte`.
///
/// # Safety
///
/// `dst..dst + len` must lie inside one live mapping that stays mapped and writable for the
/// duration of the call. Other threads may access it concurrently.
#[inline]
pub(crate) unsafe fn fill_guest(dst: *mut u8, len: usize, byte: u8) {
    let word = u64::from_ne_bytes([byte; WORD]);
    let head = head_len(dst as usize, len);
    let mut i = 0;
    // SAFETY: the caller guarantees `dst..dst + len` is writable guest
    // memory; every offset stays below `len`, and after the head `dst + i` is 8-aligned.
    unsafe {
        while i < head {
            dst.add(i).write_volatile(byte);
            i += 1;
        }
        while i + BLOCK <= len {
            let o = dst.add(i).cast::<u64>();
            o.write_volatile(word);
            o.add(1).write_volatile(word);
            o.add(2).write_volatile(word);
            o.add(3).write_volatile(word);
            i += BLOCK;
        }
        while i + WORD <= len {
            dst.add(i).cast::<u64>().write_volatile(word);
            i += WORD;
        }
        while i < len {
            dst.add(i).write_volatile(byte);
            i += 1;
        }
    }
}

/// Returns whether the `len` bytes of guest memory at `src` are all zero. Reads only.
///
/// # Safety
///
/// `src..src + len` must lie inside one live mapping that stays mapped and readable for the
/// duration of the call. Other threads may write it concurrently (the answer is then a
/// snapshot of no particular instant).
#[inline]
pub(crate) unsafe fn is_zero_guest(src: *const u8, len: usize) -> bool {
    let head = head_len(src as usize, len);
    let mut i = 0;
    // SAFETY: the caller guarantees `src..src + len` is readable guest
    // memory; every offset stays below `len`, and after the head `src + i` is 8-aligned.
    unsafe {
        let mut acc = 0u8;
        while i < head {
            acc |= src.add(i).read_volatile();
            i += 1;
        }
        if acc != 0 {
            return false;
        }
        while i + 2 * BLOCK <= len {
            let s = src.add(i).cast::<u64>();
            let w = s.read_volatile()
                | s.add(1).read_volatile()
                | s.add(2).read_volatile()
                | s.add(3).read_volatile()
                | s.add(4).read_volatile()
                | s.add(5).read_volatile()
                | s.add(6).read_volatile()
                | s.add(7).read_volatile();
            if w != 0 {
                return false;
            }
            i += 2 * BLOCK;
        }
        let mut w = 0u64;
        while i + WORD <= len {
            w |= src.add(i).cast::<u64>().read_volatile();
            i += WORD;
        }
        while i < len {
            acc |= src.add(i).read_volatile();
            i += 1;
        }
        w == 0 && acc == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Patterned bytes, distinct at every position mod 251.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed.wrapping_mul(31)).collect()
    }

    #[test]
    fn copies_round_trip_at_every_alignment() {
        let mut backing = vec![0u8; 512];
        for start in 0..9 {
            for len in [0usize, 1, 7, 8, 9, 31, 32, 33, 100, 300] {
                let src = pattern(len, (start + len) as u8);
                backing.iter_mut().for_each(|b| *b = 0xEE);
                let base = backing.as_mut_ptr();
                // SAFETY: `start + len <= 309 < 512`, inside `backing`, which no one else
                // touches during the call.
                unsafe { copy_to_guest(&src, base.add(start)) };
                assert_eq!(&backing[start..start + len], &src[..]);
                assert!(backing[..start].iter().all(|&b| b == 0xEE));
                assert!(backing[start + len..].iter().all(|&b| b == 0xEE));
                let mut out = vec![0u8; len];
                // SAFETY: as above, the range lies inside `backing`.
                unsafe { copy_from_guest(backing.as_ptr().add(start), &mut out) };
                assert_eq!(out, src);
            }
        }
    }

    #[test]
    fn fill_and_zero_check_at_every_alignment() {
        let mut backing = vec![0u8; 512];
        for start in 0..9 {
            for len in [0usize, 1, 7, 8, 9, 63, 64, 65, 130, 300] {
                backing.iter_mut().for_each(|b| *b = 0xEE);
                let base = backing.as_mut_ptr();
                // SAFETY: `start + len <= 308 < 512`, inside `backing`.
                unsafe { fill_guest(base.add(start), len, 0) };
                assert!(backing[start..start + len].iter().all(|&b| b == 0));
                assert!(backing[..start].iter().all(|&b| b == 0xEE));
                assert!(backing[start + len..].iter().all(|&b| b == 0xEE));
                // SAFETY: as above.
                assert!(unsafe { is_zero_guest(backing.as_ptr().add(start), len) });
                for k in 0..len {
                    backing[start + k] = 1;
                    // SAFETY: as above.
                    let zero = unsafe { is_zero_guest(backing.as_ptr().add(start), len) };
                    assert!(!zero, "start {start} len {len} byte {k}");
                    backing[start + k] = 0;
                }
            }
        }
    }
}
