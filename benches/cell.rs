//! Cell envelope speed: seal and open at 64 B, 1 KiB and 64 KiB, with
//! throughput. Targets: 64 B ≤ 1 µs; 64 KiB open ≥ 1 GiB/s.

use cmk_proxy::crypto::{open, seal, CellAad, Dek};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use uuid::Uuid;

const SIZES: [usize; 3] = [64, 1024, 64 * 1024];

fn aad() -> CellAad<'static> {
    CellAad {
        tenant_id: "acme",
        table: "public.patients",
        column: "notes",
    }
}

fn bench_seal(c: &mut Criterion) {
    let dek = Dek::generate();
    let dek_id = Uuid::new_v4();
    let mut group = c.benchmark_group("seal");
    for size in SIZES {
        let plaintext = vec![0x5Au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &plaintext, |b, pt| {
            b.iter(|| seal(&dek, dek_id, &aad(), black_box(pt)))
        });
    }
    group.finish();
}

fn bench_open(c: &mut Criterion) {
    let dek = Dek::generate();
    let dek_id = Uuid::new_v4();
    let mut group = c.benchmark_group("open");
    for size in SIZES {
        let cell = seal(&dek, dek_id, &aad(), &vec![0x5Au8; size]);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &cell, |b, cell| {
            b.iter(|| open(&dek, &aad(), black_box(cell)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_seal, bench_open);
criterion_main!(benches);
