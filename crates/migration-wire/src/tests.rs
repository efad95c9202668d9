//! Property tests of every codec: round trip, totality on arbitrary bytes,
//! and rejection of every truncation.

use crate::frame::{MessageKind, decode_frame};
use crate::*;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9 .:é]{0,40}").expect("valid regex")
}

fn block() -> impl Strategy<Value = Block> {
    (
        proptest::string::string_regex("[a-z.]{1,20}").expect("valid regex"),
        12u32..22,
        1u64..1024,
    )
        .prop_map(|(name, shift, pages)| Block {
            name,
            length: pages << shift,
            page_size: 1 << shift,
        })
}

/// A batch with owned buffers, built through the public constructor.
#[derive(Debug, Clone)]
struct OwnedBatch {
    block: u32,
    epoch: u64,
    entries: Vec<u8>,
    payload: Vec<u8>,
}

fn batch() -> impl Strategy<Value = OwnedBatch> {
    (
        any::<u32>(),
        any::<u64>(),
        proptest::collection::vec((1u64..1 << 30, any::<bool>(), any::<u8>()), 0..8),
    )
        .prop_map(|(block, epoch, pages)| {
            let mut entries = Vec::new();
            let mut payload = Vec::new();
            let mut page = 0;
            for (step, zero, fill) in pages {
                // Indices strictly increase within a batch.
                page += step;
                let encoding = if zero { PageEncoding::Zero } else { PageEncoding::Plain };
                PageEntry { page, encoding }.push_to(&mut entries);
                if !zero {
                    payload.extend(std::iter::repeat_n(fill, 4096));
                }
            }
            OwnedBatch {
                block,
                epoch,
                entries,
                payload,
            }
        })
}

fn encoded_message() -> impl Strategy<Value = Vec<u8>> {
    let owned = prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u64>(), any::<u64>(), 1u16..=64).prop_map(|(a, b, f, s, channels)| {
            Message::Hello(Hello {
                min_version: a.min(b).max(1),
                max_version: a.max(b).max(1),
                features: Features(f),
                session: SessionId(s),
                channels,
            })
        }),
        (1u16.., any::<u64>(), any::<u64>(), 1u16..=64).prop_map(|(version, f, s, channels)| {
            Message::HelloReply(HelloReply {
                version,
                features: Features(f),
                session: SessionId(s),
                channels,
            })
        }),
        proptest::collection::vec(block(), 1..5).prop_map(|blocks| Message::BlockList(BlockList { blocks })),
        Just(Message::BlocksAccepted),
        Just(Message::ChannelAccepted),
        (any::<u64>(), 2u16..=64)
            .prop_flat_map(|(s, channels)| (Just(s), Just(channels), 1..=channels))
            .prop_map(|(s, channels, index)| Message::ChannelHello(ChannelHello {
                session: SessionId(s),
                index,
                channels
            })),
        (any::<u64>(), any::<u64>()).prop_map(|(epoch, pages)| Message::SyncMarker(SyncMarker { epoch, pages })),
        any::<u64>().prop_map(|epochs| Message::EndOfRam(EndOfRam { epochs })),
        Just(Message::Go),
        proptest::collection::vec(any::<u64>(), 0..8).prop_map(|digests| Message::Complete(Complete { digests })),
        text().prop_map(Message::Abort),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(epoch, pages, bytes)| Message::Ack(Ack {
            epoch,
            pages,
            bytes
        })),
        Just(Message::Ready),
        Just(Message::Resumed),
        proptest::collection::vec(any::<u32>(), 0..8).prop_map(|mismatched| Message::Verdict(Verdict { mismatched })),
        (1u16..=6, text()).prop_map(|(code, message)| {
            let code = [
                ErrorCode::Protocol,
                ErrorCode::Version,
                ErrorCode::Limit,
                ErrorCode::Internal,
                ErrorCode::Verification,
                ErrorCode::Cancelled,
            ][usize::from(code - 1)];
            Message::Error(PeerError { code, message })
        }),
        (any::<u32>(), any::<u64>(), 1u32..).prop_map(|(block, page, count)| Message::PageRequest(PageRequest {
            block,
            page,
            count
        })),
    ]
    .prop_map(|m| {
        let mut out = Vec::new();
        m.encode(&mut out);
        out
    });
    let postcopy = prop_oneof![
        any::<u64>().prop_map(|epochs| Message::PostcopyStart(crate::PostcopyStart { epochs })),
        (any::<u64>(), any::<u32>()).prop_map(|(s, generation)| Message::Resume(crate::Resume {
            session: SessionId(s),
            generation
        })),
        Just(Message::ResumeAccepted),
        Just(Message::Pausing),
        Just(Message::Prepared),
    ]
    .prop_map(|m| {
        let mut out = Vec::new();
        m.encode(&mut out);
        out
    });
    let bitmap = (
        any::<u32>(),
        0u64..1 << 40,
        proptest::collection::vec(any::<u8>(), 1..64),
        1u32..8,
        any::<bool>(),
    )
        .prop_map(|(block, first, mut bits, spare, received)| {
            // The last byte holds `spare` pages: no bit past them.
            let count = (bits.len() as u32 - 1) * 8 + spare;
            let last = bits.len() - 1;
            bits[last] &= (1u8 << spare) - 1;
            let map = crate::PageBitmap::new(block, first * 8, count, &bits).expect("consistent bitmap");
            let mut out = Vec::new();
            if received {
                Message::ReceivedPages(map).encode(&mut out);
            } else {
                Message::Discard(map).encode(&mut out);
            }
            out
        });
    let blob = (proptest::collection::vec(any::<u8>(), 0..64), any::<bool>()).prop_map(|(blob, transport)| {
        let mut out = Vec::new();
        if transport {
            Message::Transport(&blob).encode(&mut out);
        } else {
            Message::DeviceState(&blob).encode(&mut out);
        }
        out
    });
    let pages = (batch(), any::<bool>()).prop_map(|(b, squeeze)| {
        let mut out = Vec::new();
        if squeeze && !b.payload.is_empty() {
            // A stand-in for compressed bytes: the wire only checks that
            // they are shorter than what they stand for.
            let short = &b.payload[..b.payload.len() / 3];
            let batch =
                PageBatch::with_codec(b.block, b.epoch, 4096, Codec::Lz4, &b.entries, short).expect("consistent batch");
            Message::Pages(batch).encode(&mut out);
        } else {
            let batch = PageBatch::new(b.block, b.epoch, 4096, &b.entries, &b.payload).expect("consistent batch");
            Message::Pages(batch).encode(&mut out);
        }
        out
    });
    let deltas = (
        any::<u32>(),
        any::<u64>(),
        proptest::collection::vec((1u64..1 << 30, proptest::collection::vec(any::<u8>(), 0..40)), 0..8),
    )
        .prop_map(|(block, epoch, pages)| {
            let (mut table, mut bytes, mut page) = (Vec::new(), Vec::new(), 0);
            for (step, delta) in pages {
                // Indices strictly increase within a batch.
                page += step;
                crate::push_delta_entry(&mut table, page, delta.len());
                bytes.extend_from_slice(&delta);
            }
            let mut out = Vec::new();
            Message::Deltas(DeltaBatch::new(block, epoch, 4096, &table, &bytes).expect("consistent batch"))
                .encode(&mut out);
            out
        });
    prop_oneof![8 => owned, 2 => postcopy, 2 => bitmap, 1 => blob, 2 => pages, 2 => deltas]
}

proptest! {
    #[test]
    fn plain_runs_are_the_plain_pages_in_maximal_runs(
        pages in proptest::collection::vec((1u64..3, any::<bool>()), 0..40),
    ) {
        let (mut entries, mut plain, mut page) = (Vec::new(), Vec::new(), 0);
        for (step, zero) in pages {
            page += step;
            let encoding = if zero { PageEncoding::Zero } else { PageEncoding::Plain };
            PageEntry { page, encoding }.push_to(&mut entries);
            if !zero {
                plain.push(page);
            }
        }
        let batch = PageBatch::placed(0, 0, 4096, &entries).expect("batch");
        let runs: Vec<_> = batch.plain_runs().collect();
        let expanded: Vec<u64> = runs.iter().flat_map(|&(first, n)| first..first + n).collect();
        prop_assert_eq!(expanded, plain);
        for pair in runs.windows(2) {
            prop_assert!(pair[0].0 + pair[0].1 < pair[1].0, "runs {:?} could merge", pair);
        }
    }

    #[test]
    fn page_hashes_of_bytes_in_pieces_equal_those_of_whole_pages(
        pages in 1usize..6,
        cuts in proptest::collection::vec(0usize..20_000, 0..8),
    ) {
        let bytes: Vec<u8> = (0..pages * 4096).map(|i| (i * 7 % 253) as u8).collect();
        let whole: Vec<u64> = bytes.chunks(4096).map(page::page_hash).collect();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % bytes.len()).collect();
        cuts.sort_unstable();
        let (mut hasher, mut hashes, mut at) = (page::PageHasher::new(4096), Vec::new(), 0);
        for cut in cuts.into_iter().chain([bytes.len()]) {
            hasher.feed(&bytes[at..cut], &mut hashes);
            at = cut;
        }
        prop_assert_eq!(hashes, whole);
    }

    #[test]
    fn round_trip(frame in encoded_message()) {
        let (message, used) = decode_frame(&frame).expect("valid frame decodes");
        prop_assert_eq!(used, frame.len());
        let mut again = Vec::new();
        message.encode(&mut again);
        prop_assert_eq!(again, frame);
    }

    #[test]
    fn every_truncation_is_an_error(frame in encoded_message()) {
        for cut in 0..frame.len() {
            prop_assert!(decode_frame(&frame[..cut]).is_err(), "cut at {} of {}", cut, frame.len());
        }
    }

    #[test]
    fn every_body_truncation_is_an_error(frame in encoded_message()) {
        // Cut the body and fix up the header, so the truncation reaches the
        // message decoder itself rather than the frame layer. Device-state
        // blobs and transport records are opaque and may be any length.
        let (message, _) = decode_frame(&frame).expect("valid");
        let kind = message.kind();
        prop_assume!(kind != MessageKind::DeviceState && kind != MessageKind::Transport);
        let body = &frame[FRAME_HEADER_LEN..];
        for cut in 0..body.len() {
            prop_assert!(Message::decode_body(kind, &body[..cut]).is_err(), "{:?} body cut at {}", kind, cut);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_frame(&bytes);
        for raw in 0..=40u16 {
            if let Ok(kind) = MessageKind::from_raw(raw) {
                let _ = Message::decode_body(kind, &bytes);
            }
        }
    }

    #[test]
    fn head_first_decoding_agrees_with_whole_frames(b in batch()) {
        // What a receiver that places page bytes as they arrive sees: the
        // lengths, then the head alone, then the checksum over page hashes.
        let whole = PageBatch::new(b.block, b.epoch, 4096, &b.entries, &b.payload).expect("valid");
        let mut frame = Vec::new();
        Message::Pages(whole.clone()).encode(&mut frame);
        let header = FrameHeader::decode(frame[..FRAME_HEADER_LEN].try_into().unwrap(), MAX_FRAME_BODY).unwrap();
        let body = &frame[FRAME_HEADER_LEN..];
        let (entries, payload) = page::batch_lengths(&body[..page::BATCH_HEADER_LEN]).expect("lengths");
        prop_assert_eq!(page::BATCH_HEADER_LEN + entries + payload, body.len());
        let head = &body[..page::BATCH_HEADER_LEN + entries];
        let placed = PageBatch::decode_head(head).expect("head decodes");
        prop_assert!(placed.is_placed());
        prop_assert!(placed.payload().is_empty());
        prop_assert_eq!(placed.len(), whole.len());
        prop_assert_eq!(placed.body_len(), body.len());
        prop_assert_eq!(placed.entries().collect::<Vec<_>>(), whole.entries().collect::<Vec<_>>());
        let hashes: Vec<u64> = b.payload.chunks_exact(4096).map(page::page_hash).collect();
        prop_assert_eq!(page::pages_checksum(head, &hashes), header.checksum);
        prop_assert_eq!(placed.with_hashes(&hashes).frame_checksum(), header.checksum);
    }

    #[test]
    fn head_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = page::batch_lengths(&bytes);
        let _ = PageBatch::decode_head(&bytes);
    }

    #[test]
    fn flipped_bit_is_detected(frame in encoded_message(), bit in any::<usize>()) {
        let mut bad = frame.clone();
        let bit = bit % (bad.len() * 8);
        bad[bit / 8] ^= 1 << (bit % 8);
        // Whatever decodes from a corrupted frame must not be the original.
        if let Ok((message, _)) = decode_frame(&bad) {
            let mut again = Vec::new();
            message.encode(&mut again);
            prop_assert_ne!(again, frame);
        }
    }
}

#[test]
fn a_compressed_batch_cannot_be_decoded_head_first() {
    let mut entries = Vec::new();
    PageEntry {
        page: 0,
        encoding: PageEncoding::Plain,
    }
    .push_to(&mut entries);
    let batch = PageBatch::with_codec(0, 0, 4096, Codec::Lz4, &entries, &[1, 2, 3]).expect("valid");
    let mut head = Vec::new();
    batch.encode_head(&mut head);
    assert!(PageBatch::decode_head(&head).is_err());
    // A head whose declared payload does not match its entries is refused too.
    let plain = PageBatch::new(0, 0, 4096, &entries, &[7; 4096]).expect("valid");
    let mut head = Vec::new();
    plain.encode_head(&mut head);
    head[24] ^= 1;
    assert!(PageBatch::decode_head(&head).is_err());
}

#[test]
fn wrong_magic_is_named() {
    let mut frame = Vec::new();
    Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        features: Features::default(),
        session: SessionId(7),
        channels: 1,
    })
    .encode(&mut frame);
    let body = &mut frame[FRAME_HEADER_LEN..];
    body[0] = b'X';
    let err = Message::decode_body(MessageKind::Hello, body).unwrap_err();
    assert!(matches!(err, WireError::BadMagic { .. }), "{err}");
}

#[test]
fn oversize_frame_is_refused_before_allocation() {
    let header = FrameHeader {
        kind: MessageKind::Pages,
        len: MAX_FRAME_BODY,
        checksum: 0,
    };
    let bytes = header.encode();
    assert!(FrameHeader::decode(&bytes, MAX_FRAME_BODY).is_ok());
    let err = FrameHeader::decode(&bytes, 1 << 20).unwrap_err();
    assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
}

#[test]
fn batch_rejects_payload_mismatch() {
    let mut entries = Vec::new();
    PageEntry {
        page: 3,
        encoding: PageEncoding::Plain,
    }
    .push_to(&mut entries);
    assert!(PageBatch::new(0, 0, 4096, &entries, &[0; 100]).is_err());
    assert!(PageBatch::new(0, 0, 4096, &entries, &[0; 4096]).is_ok());
    assert!(PageBatch::new(0, 0, 4095, &entries, &[0; 4095]).is_err());
}

#[test]
fn compressed_batches_must_be_smaller_than_their_pages() {
    let mut entries = Vec::new();
    PageEntry {
        page: 1,
        encoding: PageEncoding::Plain,
    }
    .push_to(&mut entries);
    assert!(PageBatch::with_codec(0, 0, 4096, Codec::Zstd, &entries, &[0; 100]).is_ok());
    assert!(PageBatch::with_codec(0, 0, 4096, Codec::Zstd, &entries, &[0; 4096]).is_err());
    assert!(PageBatch::with_codec(0, 0, 4096, Codec::Zstd, &entries, &[]).is_err());
    let mut zero = Vec::new();
    PageEntry {
        page: 1,
        encoding: PageEncoding::Zero,
    }
    .push_to(&mut zero);
    assert!(PageBatch::with_codec(0, 0, 4096, Codec::Lz4, &zero, &[]).is_ok());
    assert!(PageBatch::with_codec(0, 0, 4096, Codec::Lz4, &zero, &[1]).is_err());
}

#[test]
fn batch_rejects_repeated_or_decreasing_pages() {
    let mut entries = Vec::new();
    for page in [5, 5] {
        PageEntry {
            page,
            encoding: PageEncoding::Zero,
        }
        .push_to(&mut entries);
    }
    assert!(PageBatch::new(0, 0, 4096, &entries, &[]).is_err());
    let mut entries = Vec::new();
    for page in [6, 2] {
        PageEntry {
            page,
            encoding: PageEncoding::Zero,
        }
        .push_to(&mut entries);
    }
    assert!(PageBatch::new(0, 0, 4096, &entries, &[]).is_err());
}

#[test]
fn block_list_rejects_bad_blocks() {
    let encode = |blocks: Vec<Block>| {
        let mut out = Vec::new();
        Message::BlockList(BlockList { blocks }).encode_body(&mut out);
        out
    };
    let good = Block {
        name: "pc.ram".into(),
        length: 1 << 20,
        page_size: 4096,
    };
    assert!(BlockList::decode(&encode(vec![good.clone()])).is_ok());
    let odd = Block {
        length: (1 << 20) + 1,
        ..good.clone()
    };
    assert!(BlockList::decode(&encode(vec![odd])).is_err());
    assert!(BlockList::decode(&encode(vec![])).is_err());
    let unnamed = Block {
        name: String::new(),
        ..good
    };
    assert!(BlockList::decode(&encode(vec![unnamed])).is_err());
}
