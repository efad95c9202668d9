//! The per-page work of the channel threads, in GB/s per core: the zero
//! check (on all-zero pages, and on pages whose only non-zero byte is the
//! last, so it cannot exit early), and compression of each content mix,
//! with its ratio printed.
//!
//! `cargo bench -p migration-bench --bench encoders`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use migration_core::Compression;
use migration_core::compress::decompress;
use migration_sys::{PAGE_SIZE, is_zero_buf};
use reference_guest::{Content, fill_content};
use std::hint::black_box;

const PAGES: usize = 256; // 1 MiB, one batch

fn pages(content: Content) -> Vec<u8> {
    let mut buf = vec![0u8; PAGES * PAGE_SIZE];
    for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_content(7, i as u64, 1, content, page.try_into().expect("a page"));
    }
    buf
}

fn zero_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("zero_check");
    group.throughput(Throughput::Bytes((PAGES * PAGE_SIZE) as u64));
    let zero = vec![0u8; PAGES * PAGE_SIZE];
    let mut last = zero.clone();
    for page in last.chunks_exact_mut(PAGE_SIZE) {
        page[PAGE_SIZE - 1] = 1;
    }
    for (name, buf) in [("all_zero", &zero), ("last_byte_set", &last)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                buf.chunks_exact(PAGE_SIZE)
                    .filter(|p| is_zero_buf(black_box(p)))
                    .count()
            })
        });
    }
    group.finish();
}

fn compression(c: &mut Criterion) {
    let mut group = c.benchmark_group("compression");
    group.throughput(Throughput::Bytes((PAGES * PAGE_SIZE) as u64));
    for (label, content) in [
        ("random", Content::Random),
        ("text", Content::Text),
        ("zero_heavy", Content::ZeroHeavy),
    ] {
        let input = pages(content);
        for compression in [Compression::Lz4, Compression::Zstd(1), Compression::Zstd(3)] {
            let mut packed = Vec::new();
            let shrank = compression.compress(&input, &mut packed);
            let ratio = if shrank {
                input.len() as f64 / packed.len() as f64
            } else {
                1.0
            };
            println!("ratio {compression} on {label}: {ratio:.2}");
            group.bench_function(format!("compress/{compression}/{label}"), |b| {
                let mut out = Vec::new();
                b.iter(|| compression.compress(black_box(&input), &mut out))
            });
            if shrank {
                group.bench_function(format!("decompress/{compression}/{label}"), |b| {
                    let mut out = vec![0u8; input.len()];
                    b.iter(|| decompress(compression.codec(), black_box(&packed), &mut out))
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, zero_check, compression);
criterion_main!(benches);
