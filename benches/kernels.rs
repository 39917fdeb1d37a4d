//! Criterion benches of the host-side kernels of a compression, at the scale
//! of the H200 runs (128k tokens, a Llama-3-8B-shaped cache of 32 layers × 8
//! KV heads), and of one real compaction on the CPU backend.
//!
//! `cargo bench -- --quick` (or a name: `cargo bench -- select_chunkkv`).
//! Results and the machine they came from: docs/results/kernels.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use chunkkv::compress::baselines::{pyramid_counts, SnapKv};
use chunkkv::compress::slots::SlotTable;
use chunkkv::compress::{ChunkKv, Compressor};
use chunkkv::llama::{
    Backend, Context, ContextParams, FlashAttn, KvPart, LayerImportance, Model, ModelParams, Pos,
};

const TOKENS: usize = 131_072;
const LAYERS: usize = 32;
const KV_HEADS: usize = 8;
/// 10% of the tokens kept.
const KEEP: usize = TOKENS / 10;

/// Deterministic scores with attention's shape: mostly small, a few spikes.
fn scores(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            u * u * u * u
        })
        .collect()
}

fn importance(layers: impl Iterator<Item = u32>) -> Vec<LayerImportance> {
    layers
        .map(|l| {
            let heads = (0..KV_HEADS)
                .map(|h| scores(u64::from(l) * 31 + h as u64 + 1, TOKENS))
                .collect();
            LayerImportance::from_heads(l, heads)
        })
        .collect()
}

fn meta() -> Vec<Option<Pos>> {
    (0..TOKENS as Pos).map(Some).collect()
}

fn shape() -> (Vec<u32>, Vec<usize>) {
    ((0..LAYERS as u32).collect(), vec![KV_HEADS; LAYERS])
}

/// ChunkKV's selection with layer reuse 2 (16 leaders choose for 32 layers).
fn select_chunkkv(c: &mut Criterion) {
    let (layers, heads) = shape();
    let comp = Compressor::for_layers(Box::new(ChunkKv::default()), 32, 2, layers, heads).unwrap();
    let imp = importance((0..LAYERS as u32).step_by(2));
    let meta = meta();
    c.bench_function("select_chunkkv_128k", |b| {
        b.iter(|| black_box(comp.plan(&meta, &imp, KEEP).unwrap()))
    });
}

/// SnapKV's per-head selection, every layer scored.
fn select_snapkv(c: &mut Criterion) {
    let (layers, heads) = shape();
    let comp = Compressor::for_layers(Box::new(SnapKv::default()), 32, 1, layers, heads).unwrap();
    let imp = importance(0..LAYERS as u32);
    let meta = meta();
    c.bench_function("select_snapkv_128k", |b| {
        b.iter(|| black_box(comp.plan(&meta, &imp, KEEP).unwrap()))
    });
}

fn pyramid(c: &mut Criterion) {
    c.bench_function("pyramid_counts", |b| {
        b.iter(|| black_box(pyramid_counts(black_box(LAYERS), KEEP, TOKENS, 20.0)))
    });
}

/// Mapping every cell of a compacted cache back to its position, per layer
/// and head (what a second compression in a chat does).
fn slot_table(c: &mut Criterion) {
    let mut table = SlotTable::default();
    table.replace(
        (0..LAYERS)
            .map(|l| {
                (0..KV_HEADS)
                    .map(|h| {
                        (0..KEEP as Pos)
                            .map(|i| i * 10 + ((l + h) % 10) as Pos)
                            .collect()
                    })
                    .collect()
            })
            .collect(),
    );
    let meta: Vec<Option<Pos>> = (0..(KEEP + 4096) as Pos).map(Some).collect();
    c.bench_function("slot_table_map", |b| {
        b.iter(|| {
            let mut sum = 0i64;
            for l in 0..LAYERS {
                for h in 0..KV_HEADS {
                    for cell in 0..meta.len() {
                        sum += i64::from(table.position(l, h, cell, &meta).unwrap_or(0));
                    }
                }
            }
            black_box(sum)
        })
    });
}

/// Folding one layer's scores into another's (a reuse group's sum, or the
/// H2O head prefill's share added to the window's), over every layer.
fn accumulate(c: &mut Criterion) {
    let imp = importance(0..LAYERS as u32);
    let mut g = c.benchmark_group("importance_accumulate");
    g.throughput(Throughput::Elements((LAYERS * KV_HEADS * TOKENS) as u64));
    g.bench_function("128k", |b| {
        let mut acc = imp[0].clone();
        b.iter(|| {
            for l in &imp[1..] {
                acc.add(l);
            }
            black_box(&acc);
        })
    });
    g.finish();
}

/// One real compaction of SmolLM2's cache on the CPU backend (K/V rows of 30
/// layers moved by ggml_get_rows/ggml_set_rows), keeping every fifth cell.
fn compact(c: &mut Criterion) {
    let path = match chunkkv::models::resolve(chunkkv::models::DEFAULT_MODEL) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("compact_smollm2 skipped: {e}");
            return;
        }
    };
    let model = Model::load(
        Backend::init(),
        &path,
        &ModelParams::default().with_n_gpu_layers(0),
    )
    .expect("load SmolLM2");
    let mut g = c.benchmark_group("compact_smollm2");
    g.measurement_time(Duration::from_secs(10));
    for n in [2048usize, 4096] {
        let (ctx, state, src, slot_pos, bytes) = setup(&model, n);
        let mut ctx = ctx;
        g.throughput(Throughput::Bytes(bytes));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    ctx.memory_clear(true);
                    ctx.state_seq_set(0, &state).unwrap();
                    let t = Instant::now();
                    ctx.kv_compact(KvPart::Base, 0, &src, &slot_pos).unwrap();
                    spent += t.elapsed();
                }
                spent
            })
        });
    }
    g.finish();
}

type Setup<'m> = (Context<'m>, Vec<u8>, Vec<Vec<Vec<i32>>>, Vec<Pos>, u64);

fn setup(model: &Model, n: usize) -> Setup<'_> {
    let p = ContextParams::default()
        .with_n_ctx(n as u32)
        .with_n_threads(chunkkv::hardware::usable_cores() as i32)
        .with_flash_attn(FlashAttn::On);
    let mut ctx = Context::new(model, &p).unwrap();
    let tokens: Vec<_> = (0..n - 16)
        .map(|i| chunkkv::llama::Token(100 + (i * 7919 % 20000) as i32))
        .collect();
    ctx.decode_tokens(&tokens, 0, 0, false).unwrap();
    let state = ctx.state_seq_get(0).unwrap();
    let layers = ctx.kv_layers(KvPart::Base);
    let kept: Vec<i32> = (0..tokens.len() as i32).step_by(5).collect();
    let src: Vec<Vec<Vec<i32>>> = layers
        .iter()
        .map(|&il| vec![kept.clone(); model.layer_n_head_kv(il) as usize])
        .collect();
    let kv = ctx.kv_stats(KvPart::Base).unwrap();
    let bytes = kv.bytes_live / kv.cells_used as u64 * kept.len() as u64;
    (ctx, state, src, kept, bytes)
}

criterion_group!(
    benches,
    select_chunkkv,
    select_snapkv,
    pyramid,
    slot_table,
    accumulate,
    compact
);
criterion_main!(benches);
