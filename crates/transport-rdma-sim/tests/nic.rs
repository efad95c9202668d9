//! The simulated NICs over real memory and real sockets: writes land in
//! registered regions, a write outside one is refused, a hostile link gets
//! nothing, and the channels carry page batches as one-sided writes.

use migration_core::{ChannelRx, ChannelTx, TransportError};
use migration_sys::{GuestRegion, PAGE_SIZE};
use migration_wire::rdma::{LinkHello, RdmaRecord, WRITE_ACK_LEN, WriteAck, WriteRequest};
use migration_wire::{Message, PageBatch, PageEncoding, PageEntry};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::sync::Arc;
use std::time::Duration;
use transport_rdma_sim::{
    DestChannel, DestNic, FaultPlan, Faults, NicKind, RdmaError, RemoteAddr, SourceChannel, SourceNic, Writes,
};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const TIMEOUT: Duration = Duration::from_secs(10);

/// Two memfd blocks of 16 and 8 pages, registered with a NIC of `kind`.
fn registered(kind: NicKind) -> (DestNic, Vec<Arc<GuestRegion>>) {
    let blocks: Vec<Arc<GuestRegion>> = [16, 8]
        .iter()
        .map(|pages| Arc::new(GuestRegion::memfd("rdma-test", pages * PAGE_SIZE).expect("memfd")))
        .collect();
    let nic = DestNic::start(kind, LOOPBACK).expect("NIC");
    nic.register(&blocks, kind == NicKind::Tcp).expect("register");
    (nic, blocks)
}

fn lens(blocks: &[Arc<GuestRegion>]) -> Vec<u64> {
    blocks.iter().map(|b| b.len() as u64).collect()
}

fn read(region: &GuestRegion, offset: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    region.read(offset, &mut out).expect("read");
    out
}

#[test]
fn writes_land_in_the_registered_regions_over_both_nics() {
    for kind in [NicKind::Memfd, NicKind::Tcp] {
        let (nic, blocks) = registered(kind);
        let table = nic.announce().expect("registered memory is announced");
        assert_eq!(table.nic, kind);
        let source = SourceNic::new(Some(kind), lens(&blocks), TIMEOUT, None);
        let mut qp = source.queue_pair(0, &table, Some(LOOPBACK)).expect("queue pair");
        let (a, b) = (vec![0xa5u8; 3 * PAGE_SIZE], vec![0x5au8; PAGE_SIZE]);
        let mut writes = Writes::new(qp.as_mut(), 0);
        let first = RemoteAddr {
            rkey: table.regions[0].rkey,
            offset: 2 * PAGE_SIZE as u64,
        };
        writes.post(&a, first).expect("post");
        let last = RemoteAddr {
            rkey: table.regions[1].rkey,
            offset: 7 * PAGE_SIZE as u64,
        };
        writes.post(&b, last).expect("post");
        writes.complete(TIMEOUT).expect("both complete");
        assert_eq!(read(&blocks[0], 2 * PAGE_SIZE, 3 * PAGE_SIZE), a, "{kind:?}");
        assert_eq!(read(&blocks[1], 7 * PAGE_SIZE, PAGE_SIZE), b, "{kind:?}");
        assert_eq!(
            read(&blocks[0], PAGE_SIZE, PAGE_SIZE),
            vec![0; PAGE_SIZE],
            "{kind:?}: neighbours untouched"
        );
        assert_eq!(qp.bytes_written(), 4 * PAGE_SIZE as u64, "{kind:?}");
    }
}

#[test]
fn a_write_outside_a_registered_region_is_refused_and_the_queue_pair_fails() {
    for kind in [NicKind::Memfd, NicKind::Tcp] {
        let (nic, blocks) = registered(kind);
        let table = nic.announce().expect("announced");
        let source = SourceNic::new(None, lens(&blocks), TIMEOUT, None);
        let before = read(&blocks[1], 0, blocks[1].len());
        let page = vec![0xffu8; 2 * PAGE_SIZE];
        let rkey = table.regions[1].rkey;
        // Straddling the end, wholly past it, and under a key never issued.
        let refusals = [
            RemoteAddr {
                rkey,
                offset: 7 * PAGE_SIZE as u64,
            },
            RemoteAddr {
                rkey,
                offset: u64::MAX - 100,
            },
            RemoteAddr {
                rkey: rkey ^ table.regions[0].rkey ^ 1,
                offset: 0,
            },
        ];
        for remote in refusals {
            let mut qp = source.queue_pair(0, &table, Some(LOOPBACK)).expect("queue pair");
            let mut writes = Writes::new(qp.as_mut(), 0);
            writes.post(&page, remote).expect("posted");
            let err = writes.complete(TIMEOUT).expect_err("refused");
            assert!(matches!(err, RdmaError::RemoteAccess(_)), "{kind:?} {remote:?}: {err}");
            // In error from then on: the next write does not go through.
            let mut writes = Writes::new(qp.as_mut(), 10);
            writes
                .post(&page[..PAGE_SIZE], RemoteAddr { rkey, offset: 0 })
                .expect("posted");
            assert!(
                writes.complete(TIMEOUT).is_err(),
                "{kind:?}: a queue pair in error writes nothing"
            );
        }
        assert_eq!(
            read(&blocks[1], 0, blocks[1].len()),
            before,
            "{kind:?}: nothing written"
        );
        if kind == NicKind::Tcp {
            assert_eq!(nic.stats().refused_writes, 3);
        }
    }
}

#[test]
fn a_revoked_queue_pair_may_not_write() {
    let (nic, blocks) = registered(NicKind::Tcp);
    let table = nic.announce().expect("announced");
    let source = SourceNic::new(None, lens(&blocks), TIMEOUT, None);
    let mut qp = source.queue_pair(0, &table, Some(LOOPBACK)).expect("queue pair");
    nic.revoke(table.qp);
    assert!(
        nic.announce().is_none(),
        "no queue pair is announced after the end of precopy"
    );
    let mut writes = Writes::new(qp.as_mut(), 0);
    writes
        .post(
            &[1u8; PAGE_SIZE],
            RemoteAddr {
                rkey: table.regions[0].rkey,
                offset: 0,
            },
        )
        .expect("posted");
    // Refused, or its link already shut down by the revocation.
    let err = writes.complete(TIMEOUT).expect_err("revoked");
    assert!(
        matches!(err, RdmaError::RemoteAccess(_) | RdmaError::LinkDown(_)),
        "{err}"
    );
    assert_eq!(read(&blocks[0], 0, PAGE_SIZE), vec![0; PAGE_SIZE]);
}

/// A raw TCP link to the NIC that says `hello`, then (if it gets that far)
/// asks for `request` with `len` bytes; returns the ack, if any.
fn raw_tcp_write(link: &str, hello: LinkHello, request: WriteRequest) -> Option<WriteAck> {
    let mut stream = TcpStream::connect(link).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    stream.write_all(&hello.encode()).expect("hello");
    let _ = stream.write_all(&request.encode());
    let _ = stream.write_all(&vec![0xeeu8; request.len as usize]);
    let mut raw = [0u8; WRITE_ACK_LEN];
    match stream.read_exact(&mut raw) {
        Ok(()) => Some(WriteAck::decode(&raw).expect("an ack decodes")),
        Err(_) => None,
    }
}

#[test]
fn a_hostile_link_to_the_tcp_nic_writes_nothing() {
    let (nic, blocks) = registered(NicKind::Tcp);
    let table = nic.announce().expect("announced");
    let rkey = table.regions[0].rkey;
    let write = WriteRequest {
        wr_id: 1,
        rkey,
        offset: 0,
        len: PAGE_SIZE as u32,
    };
    let good = LinkHello {
        token: table.token,
        qp: table.qp,
    };
    // A wrong token, and a queue pair never announced: the link closes
    // without an answer.
    let wrong_token = LinkHello {
        token: table.token ^ 1,
        ..good
    };
    assert_eq!(raw_tcp_write(nic.link(), wrong_token, write), None);
    let unannounced = LinkHello {
        qp: table.qp + 5,
        ..good
    };
    assert_eq!(raw_tcp_write(nic.link(), unannounced, write), None);
    // A valid link asking past the end of the block is refused.
    let past_end = WriteRequest {
        offset: 15 * PAGE_SIZE as u64 + 1,
        ..write
    };
    let ack = raw_tcp_write(nic.link(), good, past_end).expect("an answer");
    assert_eq!(ack.status, migration_wire::rdma::AckStatus::RemoteAccess);
    assert_eq!(read(&blocks[0], 0, blocks[0].len()), vec![0; blocks[0].len()]);
    // The same link, asking within bounds, writes.
    let ack = raw_tcp_write(nic.link(), good, write).expect("an answer");
    assert_eq!(ack.status, migration_wire::rdma::AckStatus::Done);
    assert_eq!(read(&blocks[0], 0, PAGE_SIZE), vec![0xee; PAGE_SIZE]);
}

#[test]
fn the_memfd_nic_grants_nothing_without_the_token_and_needs_file_backed_memory() {
    let (nic, blocks) = registered(NicKind::Memfd);
    let mut table = nic.announce().expect("announced");
    table.token ^= 1;
    let source = SourceNic::new(None, lens(&blocks), TIMEOUT, None);
    let err = source.queue_pair(0, &table, Some(LOOPBACK)).expect_err("refused");
    assert!(err.to_string().contains("without a grant"), "{err}");

    let private = Arc::new(GuestRegion::anonymous(4 * PAGE_SIZE).expect("anonymous"));
    let nic = DestNic::start(NicKind::Memfd, LOOPBACK).expect("NIC");
    let err = nic
        .register(&[private], false)
        .expect_err("private memory cannot be shared");
    assert!(err.to_string().contains("--rdma-nic tcp"), "{err}");
}

#[test]
fn a_source_checks_the_announcement_against_guest_ram_and_the_nic_asked_for() {
    let (nic, blocks) = registered(NicKind::Tcp);
    let table = nic.announce().expect("announced");
    let wrong_size = SourceNic::new(None, vec![blocks[0].len() as u64], TIMEOUT, None);
    assert!(wrong_size.queue_pair(0, &table, Some(LOOPBACK)).is_err());
    let wants_memfd = SourceNic::new(Some(NicKind::Memfd), lens(&blocks), TIMEOUT, None);
    let err = wants_memfd
        .queue_pair(0, &table, Some(LOOPBACK))
        .expect_err("other NIC");
    assert!(err.to_string().contains("--rdma-nic"), "{err}");
}

/// An error and its sources, as the CLI prints them.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        text = format!("{text}: {cause}");
        next = cause.source();
    }
    text
}

/// A source and a destination channel over loopback TCP, memory registered.
fn channel_pair(kind: NicKind, faults: Option<FaultPlan>) -> (SourceChannel, DestChannel, Vec<Arc<GuestRegion>>) {
    let (nic, blocks) = registered(kind);
    let slot = Arc::new(transport_rdma_sim::DestNicSlot::new());
    slot.set(Arc::new(nic)).expect("empty slot");
    let listener = transport_tcp::TcpListener::bind("127.0.0.1:0", transport_tcp::TcpOptions::default()).expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let client = std::thread::spawn(move || transport_tcp::connect(&addr, &transport_tcp::TcpOptions::default()));
    let server = listener.accept().expect("accept");
    let source = Arc::new(SourceNic::new(
        Some(kind),
        lens(&blocks),
        TIMEOUT,
        faults.map(|p| Arc::new(Faults::new(p))),
    ));
    let src = SourceChannel::new(client.join().expect("join").expect("connect"), 0, source).expect("source");
    let dst = DestChannel::new(server, slot).expect("destination");
    (src, dst, blocks)
}

/// A batch of block 0: pages 3, 4 (plain), 5 (zero), 6 (plain).
fn batch_parts() -> (Vec<u8>, Vec<u8>, Vec<u64>) {
    let mut entries = Vec::new();
    for (page, zero) in [(3, false), (4, false), (5, true), (6, false)] {
        PageEntry {
            page,
            encoding: if zero { PageEncoding::Zero } else { PageEncoding::Plain },
        }
        .push_to(&mut entries);
    }
    let payload: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i / 7) as u8).collect();
    let hashes = payload.chunks(PAGE_SIZE).map(migration_wire::page::page_hash).collect();
    (entries, payload, hashes)
}

/// The notice a source sends once `batch`'s writes completed, sent here by
/// hand (no write behind it).
fn placed_notice(batch: &PageBatch<'_>) -> Vec<u8> {
    let mut head = Vec::new();
    batch.encode_head(&mut head);
    let mut record = Vec::new();
    RdmaRecord::Placed {
        checksum: batch.frame_checksum(),
        head: &head,
    }
    .encode(&mut record);
    record
}

#[test]
fn a_batch_crosses_as_one_sided_writes_and_arrives_placed_with_its_hashes() {
    for kind in [NicKind::Memfd, NicKind::Tcp] {
        let (mut src, mut dst, blocks) = channel_pair(kind, None);
        // The destination announces before its first message.
        dst.send(&Message::BlocksAccepted).expect("send");
        assert!(matches!(src.recv().expect("recv"), Message::BlocksAccepted));
        let (entries, payload, hashes) = batch_parts();
        let batch = PageBatch::new(0, 0, PAGE_SIZE as u32, &entries, &payload)
            .expect("batch")
            .with_hashes(&hashes);
        src.send(&Message::Pages(batch.clone())).expect("send");
        let sent = src.bytes_sent();
        match dst.recv().expect("recv") {
            Message::Pages(placed) => {
                assert!(placed.is_placed(), "{kind:?}");
                assert_eq!(placed.page_hashes(), Some(&hashes[..]), "{kind:?}");
            }
            other => panic!("{kind:?}: {other:?}"),
        }
        assert_eq!(read(&blocks[0], 3 * PAGE_SIZE, 2 * PAGE_SIZE), payload[..2 * PAGE_SIZE]);
        assert_eq!(read(&blocks[0], 6 * PAGE_SIZE, PAGE_SIZE), payload[2 * PAGE_SIZE..]);
        assert!(sent >= payload.len() as u64, "one-sided bytes count as sent");
        assert!(dst.bytes_received() >= payload.len() as u64);
        // The end of precopy revokes the queue pair: a later notice is refused.
        src.send(&Message::EndOfRam(migration_wire::EndOfRam { epochs: 1 }))
            .expect("send");
        assert!(matches!(dst.recv().expect("recv"), Message::EndOfRam(_)));
        src.send(&Message::Transport(&placed_notice(&batch))).expect("send");
        assert!(dst.recv().is_err(), "{kind:?}: a placed batch after the end of precopy");
    }
}

#[test]
fn a_notice_whose_pages_did_not_land_fails_its_checksum() {
    let (mut src, mut dst, _blocks) = channel_pair(NicKind::Tcp, None);
    dst.send(&Message::BlocksAccepted).expect("send");
    src.recv().expect("recv");
    let (entries, payload, hashes) = batch_parts();
    let batch = PageBatch::new(0, 0, PAGE_SIZE as u32, &entries, &payload)
        .expect("batch")
        .with_hashes(&hashes);
    // A notice for pages never written: the destination hashes what is
    // really there and refuses it.
    src.send(&Message::Transport(&placed_notice(&batch))).expect("send");
    assert!(matches!(dst.recv(), Err(TransportError::Malformed(_))));
}

#[test]
fn a_plain_destination_is_refused_and_injected_faults_fail_the_channel() {
    // A destination that announced nothing: pages cannot go one-sided.
    let (mut src, _dst, _blocks) = channel_pair(NicKind::Memfd, None);
    let (entries, payload, hashes) = batch_parts();
    let batch = PageBatch::new(0, 0, PAGE_SIZE as u32, &entries, &payload)
        .expect("batch")
        .with_hashes(&hashes);
    let err = src
        .send(&Message::Pages(batch.clone()))
        .expect_err("no memory announced");
    assert!(
        chain(&err).contains("announced no registered memory"),
        "{}",
        chain(&err)
    );

    for (kind, plan, says) in [
        (NicKind::Memfd, "qp-error=0@2", "QpError"),
        (NicKind::Tcp, "qp-error=0@1", "QpError"),
        (NicKind::Tcp, "drop-link=0@3", "injected fault: the link dropped"),
    ] {
        let (mut src, mut dst, _blocks) = channel_pair(kind, Some(plan.parse().expect("plan")));
        dst.send(&Message::BlocksAccepted).expect("send");
        src.recv().expect("recv");
        let mut failed = None;
        for _ in 0..4 {
            if let Err(err) = src.send(&Message::Pages(batch.clone())) {
                failed = Some(err);
                break;
            }
            assert!(matches!(dst.recv().expect("recv"), Message::Pages(_)));
        }
        let err = failed.unwrap_or_else(|| panic!("{kind:?} {plan}: the fault never fired"));
        assert!(chain(&err).contains(says), "{kind:?} {plan}: {}", chain(&err));
        if plan.starts_with("drop-link") {
            // The link is gone both ways: the destination sees it end.
            assert!(dst.recv().is_err(), "{kind:?} {plan}");
        }
    }
}

#[test]
fn the_memfd_nic_grants_nothing_to_a_queue_pair_whose_precopy_ended() {
    let (nic, blocks) = registered(NicKind::Memfd);
    let table = nic.announce().expect("announced");
    nic.revoke(table.qp);
    let source = SourceNic::new(None, lens(&blocks), TIMEOUT, None);
    let err = source.queue_pair(0, &table, Some(LOOPBACK)).expect_err("no grant");
    assert!(err.to_string().contains("without a grant"), "{err}");
}

#[test]
fn postcopy_urgent_channel_gets_no_queue_pair_and_carries_its_pages_as_messages() {
    for kind in [NicKind::Memfd, NicKind::Tcp] {
        let (mut src, mut dst, _blocks) = channel_pair(kind, None);
        // The urgent-page channel's hello: index == channels.
        let hello = migration_wire::ChannelHello {
            session: migration_wire::SessionId(1),
            index: 2,
            channels: 2,
        };
        src.send(&Message::ChannelHello(hello)).expect("send");
        assert!(matches!(dst.recv().expect("recv"), Message::ChannelHello(_)));
        dst.send(&Message::ChannelAccepted).expect("send");
        assert!(
            matches!(
                src.recv().expect("accepted without a queue pair"),
                Message::ChannelAccepted
            ),
            "{kind:?}"
        );
        let (entries, payload, hashes) = batch_parts();
        let batch = PageBatch::new(0, 0, PAGE_SIZE as u32, &entries, &payload)
            .expect("batch")
            .with_hashes(&hashes);
        src.send(&Message::Pages(batch)).expect("send");
        match dst.recv().expect("recv") {
            Message::Pages(got) => assert!(!got.is_placed(), "{kind:?}: sent as a message"),
            other => panic!("{kind:?}: {other:?}"),
        }
    }
}
