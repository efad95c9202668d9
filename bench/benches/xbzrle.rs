//! XBZRLE delta encoding and decoding of 4 KiB pages, in GB/s of page per
//! core, over 16 MiB of pages so that caches do not flatter it. Three
//! cases: unchanged pages, a sparse change (a 16-byte header and one
//! 64-byte window at an offset that varies from page to page), and fully
//! random pages, which overflow the 2048-byte limit (the encoder's early
//! exit; their decode figure is of deltas made without a limit, the literal
//! copy). `compare` (slice equality of the two pages) is the baseline the
//! figures are quoted against, as this machine's speed drifts.
//!
//! `cargo bench -p migration-bench --bench xbzrle`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use migration_wire::xbzrle::{decode, encode};
use std::hint::black_box;

const PAGE: usize = 4096;
const PAGES: usize = 4096; // 16 MiB
const LIMIT: usize = PAGE / 2;

/// Random bytes (xorshift64*), the same on every run.
fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `old` with, in every page, the first 16 bytes and a 64-byte window
/// changed (every byte of them).
fn sparse(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    for (i, page) in new.chunks_exact_mut(PAGE).enumerate() {
        page[..16].iter_mut().for_each(|b| *b ^= 0xa5);
        let at = 16 + (i * 328 + 40) % (PAGE - 16 - 64);
        page[at..at + 64].iter_mut().for_each(|b| *b = !*b);
    }
    new
}

fn pages(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes.chunks_exact(PAGE)
}

fn xbzrle(c: &mut Criterion) {
    let mut group = c.benchmark_group("xbzrle");
    group.throughput(Throughput::Bytes((PAGES * PAGE) as u64));
    let old = random(PAGES * PAGE, 1);
    let cases = [
        ("unchanged", old.clone()),
        ("sparse", sparse(&old)),
        ("random", random(PAGES * PAGE, 2)),
    ];
    let unchanged = &cases[0].1;
    group.bench_function("compare", |b| {
        b.iter(|| {
            pages(&old)
                .zip(pages(unchanged))
                .filter(|(o, n)| black_box(o) == black_box(n))
                .count()
        })
    });
    for (label, new) in &cases {
        let mut out = Vec::with_capacity(PAGE);
        let fit = pages(&old)
            .zip(pages(new))
            .filter(|(o, n)| encode(o, n, LIMIT, &mut out))
            .count();
        println!("{label}: {fit} of {PAGES} pages fit in {LIMIT} bytes");
        group.bench_function(format!("encode/{label}"), |b| {
            b.iter(|| {
                pages(&old)
                    .zip(pages(new))
                    .filter(|(o, n)| encode(black_box(o), black_box(n), LIMIT, &mut out))
                    .count()
            })
        });
        let deltas: Vec<Vec<u8>> = pages(&old)
            .zip(pages(new))
            .map(|(o, n)| {
                let mut delta = Vec::new();
                assert!(encode(o, n, usize::MAX, &mut delta));
                delta
            })
            .collect();
        let bytes: usize = deltas.iter().map(Vec::len).sum();
        println!(
            "{label}: {:.1} delta bytes a page without a limit",
            bytes as f64 / PAGES as f64
        );
        let decode_all = |target: &mut [u8]| {
            for (delta, page) in deltas.iter().zip(target.chunks_exact_mut(PAGE)) {
                decode(black_box(delta), page).expect("a delta of our own");
            }
        };
        let mut target = old.clone();
        decode_all(&mut target);
        assert!(target == *new, "{label}: the deltas decode to the new pages");
        // Decoding the same deltas again writes the same bytes: the pages
        // can be reused from one iteration to the next.
        group.bench_function(format!("decode/{label}"), |b| b.iter(|| decode_all(&mut target)));
    }
    group.finish();
}

criterion_group!(benches, xbzrle);
criterion_main!(benches);
