//! Per-batch compression of page bytes, done on the channel threads.

use migration_wire::Codec;
use std::fmt;
use std::str::FromStr;

/// How a source compresses page batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Pages travel as they are.
    #[default]
    None,
    /// lz4: fast, a moderate ratio.
    Lz4,
    /// zstd at a level (1 fastest .. 19; negative levels trade ratio for speed).
    Zstd(i32),
}

impl Compression {
    /// The codec on the wire.
    pub fn codec(self) -> Codec {
        match self {
            Compression::None => Codec::None,
            Compression::Lz4 => Codec::Lz4,
            Compression::Zstd(_) => Codec::Zstd,
        }
    }

    /// Compresses `input` into `out` (cleared first). Returns false, with
    /// `out` unspecified, when the result would not be smaller, so the
    /// caller sends the bytes as they are.
    pub fn compress(self, input: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        match self {
            Compression::None => false,
            Compression::Lz4 => {
                out.resize(lz4_flex::block::get_maximum_output_size(input.len()), 0);
                match lz4_flex::block::compress_into(input, out) {
                    Ok(len) if len < input.len() => {
                        out.truncate(len);
                        true
                    }
                    _ => false,
                }
            }
            Compression::Zstd(level) => {
                out.resize(zstd::zstd_safe::compress_bound(input.len()), 0);
                match zstd::bulk::compress_to_buffer(input, out, level) {
                    Ok(len) if len < input.len() => {
                        out.truncate(len);
                        true
                    }
                    _ => false,
                }
            }
        }
    }
}

/// Why compressed bytes could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{codec:?} payload does not expand to {expected} bytes: {reason}")]
pub struct DecompressError {
    /// The codec.
    pub codec: Codec,
    /// The size the entries announce.
    pub expected: usize,
    /// What went wrong.
    pub reason: String,
}

/// Expands `input`, compressed with `codec`, into exactly `out.len()` bytes.
/// Never writes past `out`, whatever `input` holds.
pub fn decompress(codec: Codec, input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let expected = out.len();
    let fail = |reason: String| DecompressError {
        codec,
        expected,
        reason,
    };
    let len = match codec {
        Codec::None => {
            if input.len() != expected {
                return Err(fail(format!("{} bytes", input.len())));
            }
            out.copy_from_slice(input);
            expected
        }
        Codec::Lz4 => lz4_flex::block::decompress_into(input, out).map_err(|e| fail(e.to_string()))?,
        Codec::Zstd => zstd::bulk::decompress_to_buffer(input, out).map_err(|e| fail(e.to_string()))?,
    };
    if len == expected {
        Ok(())
    } else {
        Err(fail(format!("it expands to {len} bytes")))
    }
}

/// Parses `none`, `lz4`, `zstd` or `zstd:LEVEL`.
impl FromStr for Compression {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(1)),
            other => match other.strip_prefix("zstd:") {
                Some(level) => {
                    let level: i32 = level.parse().map_err(|_| format!("not a zstd level: {level:?}"))?;
                    if !(-7..=19).contains(&level) {
                        return Err(format!("zstd level {level} is outside -7..=19"));
                    }
                    Ok(Compression::Zstd(level))
                }
                None => Err(format!("unknown compression {other:?} (none, lz4, zstd or zstd:LEVEL)")),
            },
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => write!(f, "none"),
            Compression::Lz4 => write!(f, "lz4"),
            Compression::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog "
            .iter()
            .cycle()
            .take(len)
            .copied()
            .collect()
    }

    #[test]
    fn round_trips_and_refuses_to_grow() {
        for compression in [Compression::Lz4, Compression::Zstd(1), Compression::Zstd(-3)] {
            let input = text(64 << 10);
            let mut packed = Vec::new();
            assert!(compression.compress(&input, &mut packed), "{compression}");
            assert!(packed.len() < input.len() / 4, "{compression}: {}", packed.len());
            let mut out = vec![0u8; input.len()];
            decompress(compression.codec(), &packed, &mut out).expect("expands");
            assert_eq!(out, input);
            // Incompressible bytes are sent as they are.
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let noise: Vec<u8> = (0..4096)
                .map(|_| {
                    // xorshift64*
                    state ^= state >> 12;
                    state ^= state << 25;
                    state ^= state >> 27;
                    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
                })
                .collect();
            assert!(!compression.compress(&noise, &mut packed), "{compression}");
            // A wrong size is an error, not a short page.
            let mut short = vec![0u8; input.len() - 1];
            assert!(decompress(compression.codec(), &packed_of(compression, &input), &mut short).is_err());
        }
    }

    fn packed_of(compression: Compression, input: &[u8]) -> Vec<u8> {
        let mut packed = Vec::new();
        assert!(compression.compress(input, &mut packed));
        packed
    }

    #[test]
    fn parses_names() {
        assert_eq!("none".parse(), Ok(Compression::None));
        assert_eq!("lz4".parse(), Ok(Compression::Lz4));
        assert_eq!("zstd".parse(), Ok(Compression::Zstd(1)));
        assert_eq!("zstd:9".parse(), Ok(Compression::Zstd(9)));
        assert!("zstd:99".parse::<Compression>().is_err());
        assert!("gzip".parse::<Compression>().is_err());
        assert_eq!(Compression::Zstd(3).to_string(), "zstd:3");
    }

    proptest! {
        /// Hostile compressed bytes give an error or exactly the size asked
        /// for, never a panic or a write past the buffer.
        #[test]
        fn decompress_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..512), len in 0usize..8192) {
            for codec in [Codec::Lz4, Codec::Zstd, Codec::None] {
                let mut out = vec![0u8; len];
                let _ = decompress(codec, &bytes, &mut out);
            }
        }
    }
}
