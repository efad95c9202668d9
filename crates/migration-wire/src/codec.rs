//! A bounds-checked reader over untrusted bytes and the helpers every
//! message codec shares.

use crate::WireError;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Reads fixed-layout values and byte strings off the front of a slice,
/// returning errors instead of panicking.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, what }
    }

    /// Reads a zerocopy header by value.
    pub(crate) fn read<T: FromBytes + KnownLayout + Immutable>(&mut self) -> Result<T, WireError> {
        let need = size_of::<T>();
        match T::read_from_prefix(self.bytes) {
            Ok((value, rest)) => {
                self.bytes = rest;
                Ok(value)
            }
            Err(_) => Err(WireError::Truncated {
                what: self.what,
                need,
                have: self.bytes.len(),
            }),
        }
    }

    /// Takes exactly `len` bytes.
    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < len {
            return Err(WireError::Truncated {
                what: self.what,
                need: len,
                have: self.bytes.len(),
            });
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    /// Takes every byte left.
    pub(crate) fn take_rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// Takes a UTF-8 string of `len` bytes.
    pub(crate) fn take_str(&mut self, len: usize, what: &'static str) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.take(len)?).map_err(|_| WireError::Utf8 { what })
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                what: self.what,
                count: self.bytes.len(),
            })
        }
    }
}

/// Appends a zerocopy header's bytes.
pub(crate) fn put<T: IntoBytes + Immutable>(out: &mut Vec<u8>, value: &T) {
    out.extend_from_slice(value.as_bytes());
}

/// Rejects a reserved field that is not zero.
pub(crate) fn reserved_zero(what: &'static str, value: u64) -> Result<(), WireError> {
    if value == 0 {
        Ok(())
    } else {
        Err(WireError::Invalid { what, value })
    }
}

/// Rejects a count above its cap.
pub(crate) fn cap(what: &'static str, value: u64, max: u64) -> Result<(), WireError> {
    if value > max {
        Err(WireError::TooLarge { what, value, max })
    } else {
        Ok(())
    }
}
