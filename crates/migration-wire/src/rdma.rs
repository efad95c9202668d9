//! The simulated RDMA transport's formats: the records it carries in band on
//! a migration channel ([`Message::Transport`](crate::Message::Transport)),
//! and what its simulated NICs say to each other on their own link.
//!
//! ```text
//!   source                                          destination
//!   control channel (the migration's TCP connection):
//!     <---- RdmaRecord::Regions {nic, qp, token, link, [block, rkey, len]}
//!     ----> RdmaRecord::Placed {checksum, batch head}   (after its writes completed)
//!   NIC link (unix socket for the memfd NIC, TCP for the TCP NIC):
//!     ----> LinkHello {token, qp}
//!     <---- MemfdGrant {[rkey, file offset]} + one fd per region   (memfd NIC)
//!     ----> WriteRequest {wr_id, rkey, offset, len} + len bytes    (TCP NIC)
//!     <---- WriteAck {wr_id, status}
//! ```
//!
//! Every decoder here is total: any bytes give a value or an error.

use crate::WireError;
use crate::codec::{Reader, cap, put, reserved_zero};
use crate::handshake::MAX_BLOCKS;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First bytes of every record and of a NIC link's hello.
const RECORD_MAGIC: [u8; 4] = *b"RDMA";
/// First bytes of a NIC link's hello.
const LINK_MAGIC: [u8; 8] = *b"RDMASIM1";
/// Longest link address (a unix socket path or `host:port`).
pub const MAX_LINK_ADDRESS: usize = 256;
/// Longest one-sided write (the largest page batch's payload fits).
pub const MAX_WRITE_LEN: u32 = crate::MAX_FRAME_BODY;

/// Which simulated NIC a destination offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NicKind {
    /// Same host: guest RAM shared as file descriptors over a unix socket.
    Memfd = 1,
    /// A NIC thread on each side of a TCP link.
    Tcp = 2,
}

impl NicKind {
    fn from_raw(raw: u8) -> Result<Self, WireError> {
        match raw {
            1 => Ok(Self::Memfd),
            2 => Ok(Self::Tcp),
            other => Err(WireError::Invalid {
                what: "NIC kind",
                value: other.into(),
            }),
        }
    }

    /// The name the CLI uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Memfd => "memfd",
            Self::Tcp => "tcp",
        }
    }
}

/// A registered region of destination memory: one RAM block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionKey {
    /// The block (index in the block list).
    pub block: u32,
    /// The remote key a write must name.
    pub rkey: u32,
    /// Length in bytes: a write must end within it.
    pub len: u64,
}

/// What a destination channel announces before its first message once
/// guest RAM is registered: how to reach its NIC and where writes may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    /// The NIC that serves the regions.
    pub nic: NicKind,
    /// The queue pair this channel's writes use.
    pub qp: u32,
    /// The secret a NIC link must present.
    pub token: u64,
    /// Where the NIC listens: a unix socket path or `host:port`.
    pub link: String,
    /// The registered regions.
    pub regions: Vec<RegionKey>,
}

/// A record of the simulated RDMA transport, carried in band.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RdmaRecord<'a> {
    /// Destination → source, see [`RegionTable`].
    Regions(RegionTable),
    /// Source → destination: the plain pages of a batch were written into
    /// the destination's memory, and every write completed. `head` is the
    /// batch's header and entry table
    /// ([`PageBatch::encode_head`](crate::PageBatch::encode_head)),
    /// `checksum` its frame checksum, which the destination checks against
    /// the pages as they landed.
    Placed {
        /// The batch's frame checksum.
        checksum: u64,
        /// The batch's header and entry table.
        head: &'a [u8],
    },
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRecordHeader {
    magic: [u8; 4],
    tag: U16,
    reserved: U16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRegions {
    nic: u8,
    reserved: [u8; 3],
    qp: U32,
    token: U64,
    link_len: U16,
    count: U16,
    reserved2: U32,
}
const _: () = assert!(size_of::<RawRegions>() == 24);

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRegionKey {
    block: U32,
    rkey: U32,
    len: U64,
}

const TAG_REGIONS: u16 = 1;
const TAG_PLACED: u16 = 2;

impl RdmaRecord<'_> {
    /// Appends the record's bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let tag = match self {
            Self::Regions(_) => TAG_REGIONS,
            Self::Placed { .. } => TAG_PLACED,
        };
        put(
            out,
            &RawRecordHeader {
                magic: RECORD_MAGIC,
                tag: tag.into(),
                reserved: 0.into(),
            },
        );
        match self {
            Self::Regions(table) => {
                put(
                    out,
                    &RawRegions {
                        nic: table.nic as u8,
                        reserved: [0; 3],
                        qp: table.qp.into(),
                        token: table.token.into(),
                        link_len: (table.link.len() as u16).into(),
                        count: (table.regions.len() as u16).into(),
                        reserved2: 0.into(),
                    },
                );
                out.extend_from_slice(table.link.as_bytes());
                for region in &table.regions {
                    put(
                        out,
                        &RawRegionKey {
                            block: region.block.into(),
                            rkey: region.rkey.into(),
                            len: region.len.into(),
                        },
                    );
                }
            }
            Self::Placed { checksum, head } => {
                out.extend_from_slice(&checksum.to_le_bytes());
                out.extend_from_slice(head);
            }
        }
    }
}

impl<'a> RdmaRecord<'a> {
    /// Decodes a record.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes, "rdma record");
        let header: RawRecordHeader = r.read()?;
        if header.magic != RECORD_MAGIC {
            let mut found = [0u8; 8];
            found[..4].copy_from_slice(&header.magic);
            return Err(WireError::BadMagic { found });
        }
        reserved_zero("rdma record reserved field", header.reserved.get().into())?;
        match header.tag.get() {
            TAG_REGIONS => {
                let raw: RawRegions = r.read()?;
                reserved_zero("region table reserved field", u64::from(raw.reserved2.get()))?;
                if raw.reserved != [0; 3] {
                    return Err(WireError::Invalid {
                        what: "region table reserved field",
                        value: 1,
                    });
                }
                let nic = NicKind::from_raw(raw.nic)?;
                let link_len = usize::from(raw.link_len.get());
                cap("link address length", link_len as u64, MAX_LINK_ADDRESS as u64)?;
                let count = u64::from(raw.count.get());
                cap("registered regions", count, MAX_BLOCKS as u64)?;
                let link = r.take_str(link_len, "link address")?.to_owned();
                let mut regions = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let key: RawRegionKey = r.read()?;
                    regions.push(RegionKey {
                        block: key.block.get(),
                        rkey: key.rkey.get(),
                        len: key.len.get(),
                    });
                }
                r.finish()?;
                Ok(Self::Regions(RegionTable {
                    nic,
                    qp: raw.qp.get(),
                    token: raw.token.get(),
                    link,
                    regions,
                }))
            }
            TAG_PLACED => {
                let checksum: U64 = r.read()?;
                let head = r.take_rest();
                r.finish()?;
                Ok(Self::Placed {
                    checksum: checksum.get(),
                    head,
                })
            }
            other => Err(WireError::Invalid {
                what: "rdma record tag",
                value: other.into(),
            }),
        }
    }
}

/// The first message on a NIC link: which queue pair, and the secret from
/// the [`RegionTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkHello {
    /// The secret.
    pub token: u64,
    /// The queue pair.
    pub qp: u32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawLinkHello {
    magic: [u8; 8],
    token: U64,
    qp: U32,
    reserved: U32,
}

/// Length of an encoded [`LinkHello`].
pub const LINK_HELLO_LEN: usize = size_of::<RawLinkHello>();
const _: () = assert!(LINK_HELLO_LEN == 24);

impl LinkHello {
    /// The hello's bytes.
    pub fn encode(&self) -> [u8; LINK_HELLO_LEN] {
        let raw = RawLinkHello {
            magic: LINK_MAGIC,
            token: self.token.into(),
            qp: self.qp.into(),
            reserved: 0.into(),
        };
        let mut out = [0u8; LINK_HELLO_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes a hello.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes, "NIC link hello");
        let raw: RawLinkHello = r.read()?;
        r.finish()?;
        if raw.magic != LINK_MAGIC {
            return Err(WireError::BadMagic { found: raw.magic });
        }
        reserved_zero("NIC link hello reserved field", raw.reserved.get().into())?;
        Ok(Self {
            token: raw.token.get(),
            qp: raw.qp.get(),
        })
    }
}

/// Where the memfd NIC's file descriptors start: one per region, in the
/// order of the [`RegionTable`], each the region's file and the offset its
/// bytes start at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemfdGrant {
    /// Per region: its remote key and its offset in the file passed for it.
    pub regions: Vec<(u32, u64)>,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawGrantRegion {
    rkey: U32,
    reserved: U32,
    offset: U64,
}

impl MemfdGrant {
    /// The grant's bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for &(rkey, offset) in &self.regions {
            put(
                out,
                &RawGrantRegion {
                    rkey: rkey.into(),
                    reserved: 0.into(),
                    offset: offset.into(),
                },
            );
        }
    }

    /// Decodes a grant.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes, "memfd grant");
        let count: U32 = r.read()?;
        cap("granted regions", count.get().into(), MAX_BLOCKS as u64)?;
        let mut regions = Vec::with_capacity(count.get() as usize);
        for _ in 0..count.get() {
            let raw: RawGrantRegion = r.read()?;
            reserved_zero("memfd grant reserved field", raw.reserved.get().into())?;
            regions.push((raw.rkey.get(), raw.offset.get()));
        }
        r.finish()?;
        Ok(Self { regions })
    }

    /// Longest encoded grant.
    pub const MAX_LEN: usize = 4 + MAX_BLOCKS * size_of::<RawGrantRegion>();
}

/// A one-sided write on the TCP NIC's link; `len` bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRequest {
    /// The sender's work request id, echoed in the [`WriteAck`].
    pub wr_id: u64,
    /// The region's remote key.
    pub rkey: u32,
    /// Byte offset in the region.
    pub offset: u64,
    /// Bytes that follow.
    pub len: u32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawWrite {
    opcode: U32,
    rkey: U32,
    wr_id: U64,
    offset: U64,
    len: U32,
    reserved: U32,
}

/// Length of an encoded [`WriteRequest`].
pub const WRITE_REQUEST_LEN: usize = size_of::<RawWrite>();
const _: () = assert!(WRITE_REQUEST_LEN == 32);
const OPCODE_WRITE: u32 = 1;

impl WriteRequest {
    /// The request's bytes.
    pub fn encode(&self) -> [u8; WRITE_REQUEST_LEN] {
        let raw = RawWrite {
            opcode: OPCODE_WRITE.into(),
            rkey: self.rkey.into(),
            wr_id: self.wr_id.into(),
            offset: self.offset.into(),
            len: self.len.into(),
            reserved: 0.into(),
        };
        let mut out = [0u8; WRITE_REQUEST_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes a request. Where the bytes may go is the NIC's check, not
    /// this one's.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes, "rdma write request");
        let raw: RawWrite = r.read()?;
        r.finish()?;
        if raw.opcode.get() != OPCODE_WRITE {
            return Err(WireError::Invalid {
                what: "rdma opcode",
                value: raw.opcode.get().into(),
            });
        }
        reserved_zero("rdma write reserved field", raw.reserved.get().into())?;
        cap("rdma write length", raw.len.get().into(), MAX_WRITE_LEN.into())?;
        Ok(Self {
            wr_id: raw.wr_id.get(),
            rkey: raw.rkey.get(),
            offset: raw.offset.get(),
            len: raw.len.get(),
        })
    }
}

/// How the destination's NIC took a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    /// The bytes are in the region.
    Done = 0,
    /// Refused: no such key, outside the region, or access revoked. The
    /// queue pair is in error from then on.
    RemoteAccess = 1,
}

/// The TCP NIC's answer to a [`WriteRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAck {
    /// The request's id.
    pub wr_id: u64,
    /// What became of it.
    pub status: AckStatus,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawAck {
    wr_id: U64,
    status: U32,
    reserved: U32,
}

/// Length of an encoded [`WriteAck`].
pub const WRITE_ACK_LEN: usize = size_of::<RawAck>();

impl WriteAck {
    /// The ack's bytes.
    pub fn encode(&self) -> [u8; WRITE_ACK_LEN] {
        let raw = RawAck {
            wr_id: self.wr_id.into(),
            status: (self.status as u32).into(),
            reserved: 0.into(),
        };
        let mut out = [0u8; WRITE_ACK_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes an ack.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes, "rdma write ack");
        let raw: RawAck = r.read()?;
        r.finish()?;
        reserved_zero("rdma ack reserved field", raw.reserved.get().into())?;
        let status = match raw.status.get() {
            0 => AckStatus::Done,
            1 => AckStatus::RemoteAccess,
            other => {
                return Err(WireError::Invalid {
                    what: "rdma ack status",
                    value: other.into(),
                });
            }
        };
        Ok(Self {
            wr_id: raw.wr_id.get(),
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table() -> impl Strategy<Value = RegionTable> {
        (
            any::<bool>(),
            any::<u32>(),
            any::<u64>(),
            "[a-z0-9/:.]{0,40}",
            proptest::collection::vec((any::<u32>(), any::<u32>(), any::<u64>()), 0..6),
        )
            .prop_map(|(memfd, qp, token, link, regions)| RegionTable {
                nic: if memfd { NicKind::Memfd } else { NicKind::Tcp },
                qp,
                token,
                link,
                regions: regions
                    .into_iter()
                    .map(|(block, rkey, len)| RegionKey { block, rkey, len })
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn records_round_trip_and_every_truncation_is_an_error(
            table in table(),
            checksum in any::<u64>(),
            head in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let records = [RdmaRecord::Regions(table), RdmaRecord::Placed { checksum, head: &head }];
            for record in records {
                let mut bytes = Vec::new();
                record.encode(&mut bytes);
                prop_assert_eq!(RdmaRecord::decode(&bytes).expect("decodes"), record.clone());
                // A placed record's head is the rest of the bytes: cutting
                // it still decodes (the head's own decoder checks it).
                let min = match record {
                    RdmaRecord::Regions(_) => bytes.len(),
                    RdmaRecord::Placed { .. } => 16,
                };
                for cut in 0..min {
                    prop_assert!(RdmaRecord::decode(&bytes[..cut]).is_err(), "cut at {}", cut);
                }
            }
        }

        #[test]
        fn link_messages_round_trip(
            token in any::<u64>(),
            qp in any::<u32>(),
            wr_id in any::<u64>(),
            rkey in any::<u32>(),
            offset in any::<u64>(),
            len in 0..=MAX_WRITE_LEN,
            refused in any::<bool>(),
            grants in proptest::collection::vec((any::<u32>(), any::<u64>()), 0..8),
        ) {
            let hello = LinkHello { token, qp };
            prop_assert_eq!(LinkHello::decode(&hello.encode()).expect("hello"), hello);
            let write = WriteRequest { wr_id, rkey, offset, len };
            prop_assert_eq!(WriteRequest::decode(&write.encode()).expect("write"), write);
            let status = if refused { AckStatus::RemoteAccess } else { AckStatus::Done };
            let ack = WriteAck { wr_id, status };
            prop_assert_eq!(WriteAck::decode(&ack.encode()).expect("ack"), ack);
            let grant = MemfdGrant { regions: grants };
            let mut bytes = Vec::new();
            grant.encode(&mut bytes);
            prop_assert!(bytes.len() <= MemfdGrant::MAX_LEN);
            prop_assert_eq!(MemfdGrant::decode(&bytes).expect("grant"), grant);
            for cut in 0..bytes.len() {
                prop_assert!(MemfdGrant::decode(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128), tag in 0u16..4) {
            let _ = LinkHello::decode(&bytes);
            let _ = WriteRequest::decode(&bytes);
            let _ = WriteAck::decode(&bytes);
            let _ = MemfdGrant::decode(&bytes);
            let _ = RdmaRecord::decode(&bytes);
            // With a valid header, so the body decoders see the bytes.
            let mut framed = Vec::new();
            put(&mut framed, &RawRecordHeader { magic: RECORD_MAGIC, tag: tag.into(), reserved: 0.into() });
            framed.extend_from_slice(&bytes);
            let _ = RdmaRecord::decode(&framed);
        }
    }

    #[test]
    fn a_write_longer_than_any_batch_and_unknown_values_are_refused() {
        let mut raw = WriteRequest {
            wr_id: 1,
            rkey: 2,
            offset: 3,
            len: MAX_WRITE_LEN,
        }
        .encode();
        raw[24..28].copy_from_slice(&(MAX_WRITE_LEN + 1).to_le_bytes());
        assert!(matches!(WriteRequest::decode(&raw), Err(WireError::TooLarge { .. })));
        let mut ack = WriteAck {
            wr_id: 1,
            status: AckStatus::Done,
        }
        .encode();
        ack[8] = 7;
        assert!(WriteAck::decode(&ack).is_err());
        let mut hello = LinkHello { token: 1, qp: 2 }.encode();
        hello[0] = b'X';
        assert!(matches!(LinkHello::decode(&hello), Err(WireError::BadMagic { .. })));
    }
}
