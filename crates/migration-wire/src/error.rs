//! Decoding errors.

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended before the message did.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Bytes were left over after a complete message.
    #[error("{count} trailing bytes after {what}")]
    TrailingBytes {
        /// What was decoded.
        what: &'static str,
        /// Bytes left over.
        count: usize,
    },
    /// The stream does not start with the migration magic.
    #[error("wrong magic {found:02x?}: not a migration stream")]
    BadMagic {
        /// The bytes found instead.
        found: [u8; 8],
    },
    /// A frame header names a message kind this version does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// A length or count is above its cap.
    #[error("{what} of {value} exceeds the limit of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The value found.
        value: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// A field holds a value that is not allowed.
    #[error("invalid {what}: {value}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// The value found.
        value: u64,
    },
    /// The body does not match the checksum in its frame header.
    #[error("checksum mismatch in {kind} frame: header says {expected:#018x}, body hashes to {actual:#018x}")]
    Checksum {
        /// The message kind of the frame.
        kind: &'static str,
        /// The checksum in the header.
        expected: u64,
        /// The checksum of the body received.
        actual: u64,
    },
    /// A text field is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    Utf8 {
        /// Which field.
        what: &'static str,
    },
}
