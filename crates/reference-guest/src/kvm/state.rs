//! The KVM micro-VM's device state: the vCPUs' registers as a versioned
//! little-endian blob.
//!
//! ```text
//! magic      8  b"KVMGUEST"
//! version    u16  (1)
//! reserved   u16  (0)
//! vcpus      u32  (1..=MAX_VCPUS)
//! dirty_rate u64  bytes per second the guest is paced to (0: idle)
//! throttle   u8   reserved, 0
//! reserved   7 bytes (0)
//! per vCPU: struct kvm_regs, then struct kvm_sregs, as KVM lays them out
//! checksum   u64  xxh3-64 of every byte before it
//! ```
//!
//! Decoding is total: any byte string gives a state or an error.

use kvm_bindings::{kvm_regs, kvm_sregs};
use xxhash_rust::xxh3::xxh3_64;
use zerocopy::{FromBytes, IntoBytes};

use crate::StateError;

const MAGIC: [u8; 8] = *b"KVMGUEST";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 8 + 2 + 2 + 4 + 8 + 8;
const CHECKSUM_LEN: usize = 8;
const VCPU_LEN: usize = size_of::<kvm_regs>() + size_of::<kvm_sregs>();

/// Most vCPUs a KVM micro-VM runs.
pub const MAX_VCPUS: usize = 64;

/// What a paused KVM micro-VM carries to its destination.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KvmState {
    /// Page-write bytes per second the guest is paced to.
    pub dirty_rate: u64,
    /// Every vCPU's registers and special registers, in vCPU order.
    pub vcpus: Vec<(kvm_regs, kvm_sregs)>,
}

/// Whether `blob` looks like a KVM micro-VM's state (its magic), so a
/// destination can tell it from another guest's before it builds one.
pub fn is_kvm_state(blob: &[u8]) -> bool {
    blob.starts_with(&MAGIC)
}

impl KvmState {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.vcpus.len() * VCPU_LEN + CHECKSUM_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.dirty_rate.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        for (regs, sregs) in &self.vcpus {
            out.extend_from_slice(regs.as_bytes());
            out.extend_from_slice(sregs.as_bytes());
        }
        let checksum = xxh3_64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    pub(crate) fn decode(blob: &[u8]) -> Result<Self, StateError> {
        if !is_kvm_state(blob) {
            return Err(StateError::BadMagic);
        }
        if blob.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(StateError::Truncated);
        }
        let (body, checksum) = blob.split_at(blob.len() - CHECKSUM_LEN);
        let u16_at = |at: usize| u16::from_le_bytes([body[at], body[at + 1]]);
        let version = u16_at(8);
        if version != VERSION {
            return Err(StateError::UnsupportedVersion(version));
        }
        if checksum != xxh3_64(body).to_le_bytes() {
            return Err(StateError::Checksum);
        }
        if u16_at(10) != 0 || body[24..32].iter().any(|&b| b != 0) {
            return Err(StateError::Invalid("reserved"));
        }
        let vcpus = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(StateError::Invalid("vcpus"));
        }
        let dirty_rate = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
        let rest = &body[HEADER_LEN..];
        let expected = vcpus * VCPU_LEN;
        if rest.len() < expected {
            return Err(StateError::Truncated);
        }
        if rest.len() > expected {
            return Err(StateError::TrailingBytes(rest.len() - expected));
        }
        let vcpus = rest
            .chunks_exact(VCPU_LEN)
            .map(|chunk| {
                let (regs, sregs) = chunk.split_at(size_of::<kvm_regs>());
                let regs = kvm_regs::read_from_bytes(regs).map_err(|_| StateError::Truncated)?;
                let sregs = kvm_sregs::read_from_bytes(sregs).map_err(|_| StateError::Truncated)?;
                Ok((regs, sregs))
            })
            .collect::<Result<_, StateError>>()?;
        Ok(Self { dirty_rate, vcpus })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state(vcpus: usize) -> KvmState {
        KvmState {
            dirty_rate: 32 << 20,
            vcpus: (0..vcpus)
                .map(|i| {
                    let regs = kvm_regs {
                        rip: 0x20 + i as u64,
                        rbx: 0x1000 * (i as u64 + 1),
                        rflags: 2,
                        ..Default::default()
                    };
                    let mut sregs = kvm_sregs {
                        cr0: 1,
                        ..Default::default()
                    };
                    sregs.cs.selector = 8;
                    (regs, sregs)
                })
                .collect(),
        }
    }

    #[test]
    fn round_trips() {
        for vcpus in [1, 2, MAX_VCPUS] {
            let state = state(vcpus);
            assert_eq!(KvmState::decode(&state.encode()), Ok(state));
        }
    }

    #[test]
    fn refuses_what_it_cannot_load() {
        let blob = state(2).encode();
        assert_eq!(KvmState::decode(b"RGUEST\0\x01"), Err(StateError::BadMagic));
        assert_eq!(KvmState::decode(&blob[..20]), Err(StateError::Truncated));
        let mut flipped = blob.clone();
        flipped[HEADER_LEN + 3] ^= 1;
        assert_eq!(KvmState::decode(&flipped), Err(StateError::Checksum));
        let mut version = blob.clone();
        version[8] = 9;
        assert_eq!(KvmState::decode(&version), Err(StateError::UnsupportedVersion(9)));
        let reseal = |mut body: Vec<u8>| {
            let checksum = xxh3_64(&body);
            body.extend_from_slice(&checksum.to_le_bytes());
            body
        };
        let body = &blob[..blob.len() - CHECKSUM_LEN];
        let mut none = body.to_vec();
        none[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(KvmState::decode(&reseal(none)), Err(StateError::Invalid("vcpus")));
        let mut three = body.to_vec();
        three[12..16].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(KvmState::decode(&reseal(three)), Err(StateError::Truncated));
        let mut long = body.to_vec();
        long.push(0);
        assert_eq!(KvmState::decode(&reseal(long)), Err(StateError::TrailingBytes(1)));
    }

    proptest! {
        /// Decoding never panics, and whatever it accepts encodes back to the same bytes.
        #[test]
        fn decoding_is_total(mut bytes in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
            if magic && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&MAGIC);
            }
            if let Ok(state) = KvmState::decode(&bytes) {
                prop_assert_eq!(state.encode(), bytes);
            }
        }

        /// A real state with any one byte changed is refused.
        #[test]
        fn any_flipped_byte_is_refused(at in 0usize..10_000, bit in 0u8..8) {
            let blob = state(2).encode();
            let mut bad = blob.clone();
            let at = at % blob.len();
            bad[at] ^= 1 << bit;
            prop_assert!(KvmState::decode(&bad).is_err());
        }
    }
}
