//! The guest's device state: a versioned little-endian blob.
//!
//! ```text
//! magic      8  b"RGUEST\0\x01"
//! version    u16  (1)
//! reserved   u16  (0)
//! seed       u64
//! dirty_rate u64
//! hot_set    u64
//! pattern    u8   (1 uniform, 2 hotset, 3 sequential; 0 invalid)
//! content    u8   (1 random, 2 text, 3 zero-heavy, 4 sparse; 0 invalid)
//! reserved   u16  (0)
//! writers    u32, then per writer: position u64, prng state u64
//! writes     u64  total page writes so far
//! pages      u64, then per page: generation u32 (u32::MAX: unknown content)
//! checksum   u64  xxh3-64 of every byte before it
//! ```
//!
//! Decoding is total: any byte string gives either a state that fits the destination's page
//! count or an error.

use xxhash_rust::xxh3::xxh3_64;

use crate::spec::{MAX_WRITERS, owned_pages};
use crate::{Content, GuestSpec, Pattern};

const MAGIC: [u8; 8] = *b"RGUEST\0\x01";
const VERSION: u16 = 1;
const CHECKSUM_LEN: usize = 8;

/// A device-state blob that cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The blob does not start with the guest's magic.
    #[error("not a synthetic guest state (bad magic)")]
    BadMagic,
    /// The blob was written by a version this build cannot read.
    #[error("unsupported guest state version {0}")]
    UnsupportedVersion(u16),
    /// The blob ends before its fields do.
    #[error("guest state is truncated")]
    Truncated,
    /// The checksum does not match the bytes.
    #[error("guest state checksum mismatch")]
    Checksum,
    /// A field holds a value it cannot have.
    #[error("invalid guest state field {0}")]
    Invalid(&'static str),
    /// The blob describes a guest of another size.
    #[error("guest state has {found} pages but guest ram has {expected}")]
    PageCount {
        /// Pages of the destination's RAM blocks.
        expected: u64,
        /// Pages the blob describes.
        found: u64,
    },
    /// Bytes follow the last field.
    #[error("guest state has {0} trailing bytes")]
    TrailingBytes(usize),
}

/// Where one writer is: its next sequential position and its PRNG state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriterState {
    pub(crate) position: u64,
    pub(crate) rng: u64,
}

/// Everything a guest carries across a migration besides its RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceState {
    pub(crate) spec: GuestSpec,
    pub(crate) writers: Vec<WriterState>,
    pub(crate) writes: u64,
    pub(crate) generations: Vec<u32>,
}

impl DeviceState {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(80 + self.writers.len() * 16 + self.generations.len() * 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.spec.seed.to_le_bytes());
        out.extend_from_slice(&self.spec.dirty_rate.to_le_bytes());
        out.extend_from_slice(&self.spec.hot_set.to_le_bytes());
        out.push(self.spec.pattern.to_wire());
        out.push(self.spec.content.to_wire());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.writers.len() as u32).to_le_bytes());
        for w in &self.writers {
            out.extend_from_slice(&w.position.to_le_bytes());
            out.extend_from_slice(&w.rng.to_le_bytes());
        }
        out.extend_from_slice(&self.writes.to_le_bytes());
        out.extend_from_slice(&(self.generations.len() as u64).to_le_bytes());
        for g in &self.generations {
            out.extend_from_slice(&g.to_le_bytes());
        }
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Decodes a blob for a guest of `expected_pages` pages.
    pub(crate) fn decode(bytes: &[u8], expected_pages: u64) -> Result<Self, StateError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(StateError::BadMagic);
        }
        let mut r = Reader(&bytes[MAGIC.len()..]);
        let version = r.u16()?;
        if version != VERSION {
            return Err(StateError::UnsupportedVersion(version));
        }
        let Some(body_len) = bytes.len().checked_sub(CHECKSUM_LEN) else {
            return Err(StateError::Truncated);
        };
        let (body, sum) = bytes.split_at(body_len);
        if body_len < MAGIC.len() + 2 {
            return Err(StateError::Truncated);
        }
        if xxh3_64(body).to_le_bytes() != sum {
            return Err(StateError::Checksum);
        }

        let mut r = Reader(&body[MAGIC.len() + 2..]);
        if r.u16()? != 0 {
            return Err(StateError::Invalid("reserved"));
        }
        let seed = r.u64()?;
        let dirty_rate = r.u64()?;
        let hot_set = r.u64()?;
        let pattern = Pattern::from_wire(r.u8()?).ok_or(StateError::Invalid("pattern"))?;
        let content = Content::from_wire(r.u8()?).ok_or(StateError::Invalid("content"))?;
        if r.u16()? != 0 {
            return Err(StateError::Invalid("reserved"));
        }
        let writer_count = r.u32()? as usize;
        if writer_count > MAX_WRITERS {
            return Err(StateError::Invalid("writers"));
        }
        let spec = GuestSpec {
            dirty_rate,
            pattern,
            hot_set,
            content,
            writers: writer_count,
            seed,
        };
        if spec.problem().is_some() {
            return Err(StateError::Invalid("spec"));
        }
        let in_play = spec.pages_in_play(expected_pages);
        let mut writers = Vec::with_capacity(writer_count);
        for w in 0..writer_count {
            let position = r.u64()?;
            let rng = r.u64()?;
            let owned = owned_pages(in_play, w, writer_count);
            if position >= owned.max(1) {
                return Err(StateError::Invalid("writer position"));
            }
            writers.push(WriterState { position, rng });
        }
        let writes = r.u64()?;
        let found = r.u64()?;
        if found != expected_pages {
            return Err(StateError::PageCount {
                expected: expected_pages,
                found,
            });
        }
        let table_len = usize::try_from(found)
            .ok()
            .and_then(|n| n.checked_mul(4))
            .ok_or(StateError::Truncated)?;
        let table = r.take(table_len)?;
        if !r.0.is_empty() {
            return Err(StateError::TrailingBytes(r.0.len()));
        }
        let generations = table
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self {
            spec,
            writers,
            writes,
            generations,
        })
    }
}

/// A cursor over untrusted bytes: every read checks the length first.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(StateError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceState {
        DeviceState {
            spec: GuestSpec {
                dirty_rate: 1 << 20,
                pattern: Pattern::Sequential,
                hot_set: 0,
                content: Content::Text,
                writers: 3,
                seed: 99,
            },
            writers: vec![
                WriterState { position: 3, rng: 1 },
                WriterState { position: 0, rng: 2 },
                WriterState { position: 2, rng: 3 },
            ],
            writes: 12345,
            generations: (0..10).map(|i| if i == 4 { u32::MAX } else { i * 3 }).collect(),
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(DeviceState::decode(&s.encode(), 10).unwrap(), s);
    }

    #[test]
    fn wrong_page_count_is_refused() {
        assert_eq!(
            DeviceState::decode(&sample().encode(), 11),
            Err(StateError::PageCount {
                expected: 11,
                found: 10
            })
        );
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let blob = sample().encode();
        for len in 0..blob.len() {
            assert!(DeviceState::decode(&blob[..len], 10).is_err(), "len {len}");
        }
        for i in 0..blob.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = blob.clone();
                bad[i] ^= bit;
                assert!(DeviceState::decode(&bad, 10).is_err(), "byte {i}");
            }
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(DeviceState::decode(&long, 10).is_err());
    }

    /// Fields that are wrong but correctly checksummed still fail cleanly.
    #[test]
    fn resealed_garbage_is_an_error() {
        let blob = sample().encode();
        let body = &blob[..blob.len() - CHECKSUM_LEN];
        let mut rng = crate::prng::WyRand(5);
        for _ in 0..2000 {
            let mut bad = body.to_vec();
            let i = MAGIC.len() + 2 + rng.below((bad.len() - MAGIC.len() - 2) as u64) as usize;
            bad[i] = rng.next_u64() as u8;
            let cut = bad.len() - rng.below(4) as usize;
            bad.truncate(cut);
            let sum = xxh3_64(&bad);
            bad.extend_from_slice(&sum.to_le_bytes());
            let _ = DeviceState::decode(&bad, 10);
        }
        // A position beyond the writer's pages is refused.
        let mut s = sample();
        s.writers[0].position = 4;
        assert_eq!(
            DeviceState::decode(&s.encode(), 10),
            Err(StateError::Invalid("writer position"))
        );
    }

    #[test]
    fn arbitrary_bytes_are_errors() {
        let mut rng = crate::prng::WyRand(11);
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            assert!(DeviceState::decode(&bytes, 10).is_err());
        }
    }
}
