//! Edge cases of the hook on the real library: random compactions checked row
//! by row, the dead-slot mask kept with the sequence, refused operations that
//! would corrupt a compacted cache, and a method switch mid-conversation.

mod common;

use chunkkv::compress::baselines::{PyramidKv, SnapKv};
use chunkkv::compress::{Budget, ChunkKv, Compressor, Keep, Scorer};
use chunkkv::llama::{
    CacheType, CompactError, Context, ContextParams, FlashAttn, KvPart, Model, Pos,
};
use common::{default_model, essays, parse_kv_state};

fn ctx(model: &Model, n_ctx: u32, fa: FlashAttn, k: CacheType, v: CacheType) -> Context<'_> {
    let p = ContextParams::default()
        .with_n_ctx(n_ctx)
        .with_n_threads(2)
        .with_flash_attn(fa)
        .with_type_k(k)
        .with_type_v(v);
    Context::new(model, &p).expect("context")
}

/// A small xorshift for reproducible random sets.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    /// `k` distinct values of `0..n`, in random order.
    fn subset(&mut self, n: usize, k: usize) -> Vec<i32> {
        let mut all: Vec<i32> = (0..n as i32).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

/// 200 random kept sets per storage layer and KV head (each layer and head
/// its own set, slot order random too), compacted and read back: every kept
/// row must be byte-identical to the uncompressed twin's row of its source.
fn random_compactions(fa: FlashAttn, k: CacheType, v: CacheType) {
    let model = default_model();
    let tokens = model.tokenize(&essays(1200), true, false).unwrap();
    let n = tokens.len();
    let mut twin = ctx(model, 512, fa, k, v);
    twin.decode_tokens(&tokens, 0, 0, false).unwrap();
    let state = twin.state_seq_get(0).unwrap();
    let reference = parse_kv_state(&state);
    let layers = twin.kv_layers(KvPart::Base);
    let heads: Vec<usize> = layers
        .iter()
        .map(|&il| model.layer_n_head_kv(il) as usize)
        .collect();
    let mut work = ctx(model, 512, fa, k, v);
    let mut rng = Rng(0x5eed ^ n as u64);
    // 200 sets; `.ci/memcheck` runs fewer under valgrind (CHUNKKV_TRIALS).
    let trials: usize = std::env::var("CHUNKKV_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(200);
    for trial in 0..trials {
        let n_keep = 1 + rng.below(n);
        let src: Vec<Vec<Vec<i32>>> = heads
            .iter()
            .map(|&nh| (0..nh).map(|_| rng.subset(n, n_keep)).collect())
            .collect();
        let slot_pos: Vec<Pos> = rng.subset(100_000, n_keep);
        work.memory_clear(true);
        work.state_seq_set(0, &state).unwrap();
        work.kv_compact(KvPart::Base, 0, &src, &slot_pos).unwrap();
        let after = parse_kv_state(&work.state_seq_get(0).unwrap());
        assert_eq!(after.pos.len(), n_keep, "trial {trial}");
        for (l, layer) in src.iter().enumerate() {
            for (h, head) in layer.iter().enumerate() {
                for (slot, &cell) in head.iter().enumerate() {
                    let c = cell as usize;
                    assert_eq!(
                        after.k_head(l, slot, h, heads[l]),
                        reference.k_head(l, c, h, heads[l]),
                        "{fa:?} {k} trial {trial}: K of layer {l} head {h} slot {slot}"
                    );
                    assert_eq!(
                        after.v_head(l, slot, h, heads[l]),
                        reference.v_head(l, c, h, heads[l]),
                        "{fa:?} {v} trial {trial}: V of layer {l} head {h} slot {slot}"
                    );
                }
            }
        }
    }
}

#[test]
fn random_compactions_f16_flash_attention_on() {
    random_compactions(FlashAttn::On, CacheType::F16, CacheType::F16);
}

#[test]
fn random_compactions_q8_0_flash_attention_on() {
    random_compactions(FlashAttn::On, CacheType::Q8_0, CacheType::Q8_0);
}

#[test]
fn random_compactions_f16_transposed_v() {
    random_compactions(FlashAttn::Off, CacheType::F16, CacheType::F16);
}

#[test]
fn random_compactions_q8_0_k_transposed_f16_v() {
    random_compactions(FlashAttn::Off, CacheType::Q8_0, CacheType::F16);
}

/// PyramidKV's cache: its mask travels with the saved sequence, the restored
/// copy predicts exactly what the original does, and a refused compaction
/// leaves the cache and its mask as they were.
#[test]
fn the_dead_slot_mask_travels_with_the_sequence() {
    let model = default_model();
    let tokens = model.tokenize(&essays(3000), true, false).unwrap();
    let n = tokens.len();
    let mut a = ctx(model, 1024, FlashAttn::Off, CacheType::F16, CacheType::F16);
    let mut c = Compressor::new(&a, Box::new(PyramidKv::default()), 32, 1).unwrap();
    let n_keep = Budget::Ratio(0.3).cells_for(n);
    c.prefill(&mut a, &tokens, 0, n_keep, serde_json::json!(0.3))
        .unwrap();
    assert!(
        !a.dead_slots().is_empty(),
        "PyramidKV masks its short layers"
    );
    let logits_a = a.logits_ith(-1).unwrap().to_vec();

    let saved = a.save_seq(0).unwrap();
    assert_eq!(saved.dead_slots(), a.dead_slots());
    let mut b = ctx(model, 1024, FlashAttn::Off, CacheType::F16, CacheType::F16);
    b.restore_seq(0, &saved).unwrap();
    assert_eq!(b.dead_slots(), a.dead_slots());
    // The same next step from both: decode one token on each and compare.
    let next = tokens[10];
    a.decode_tokens(&[next], n as i32, 0, true).unwrap();
    b.decode_tokens(&[next], n as i32, 0, true).unwrap();
    assert_eq!(a.logits_ith(-1).unwrap(), b.logits_ith(-1).unwrap());
    assert!(!logits_a.is_empty());

    // A refused re-compaction (duplicate slot positions) changes nothing.
    let layers = b.kv_layers(KvPart::Base);
    let kept = b.kv_stats(KvPart::Base).unwrap().cells_used as usize;
    let src: Vec<Vec<Vec<i32>>> = layers
        .iter()
        .map(|&il| vec![(0..2).collect(); model.layer_n_head_kv(il) as usize])
        .collect();
    let before = b.state_seq_get(0).unwrap();
    let mask = b.dead_slots().to_vec();
    assert_eq!(
        b.kv_compact(KvPart::Base, 0, &src, &[5, 5]),
        Err(CompactError::BadArguments)
    );
    assert_eq!(
        b.kv_compact(KvPart::Base, 0, &src, &[-1, 7]),
        Err(CompactError::BadArguments)
    );
    assert_eq!(b.dead_slots(), &mask[..]);
    assert_eq!(b.state_seq_get(0).unwrap(), before);
    assert_eq!(b.kv_stats(KvPart::Base).unwrap().cells_used as usize, kept);
}

/// Removing or shifting positions held by compacted slots is refused (each
/// layer may hold another token in a slot); tokens decoded afterwards, or
/// the whole sequence, can still go.
#[test]
fn partial_removal_over_compacted_slots_is_refused() {
    let model = default_model();
    let tokens = model.tokenize(&essays(2000), true, false).unwrap();
    let n = tokens.len();
    let mut x = ctx(model, 1024, FlashAttn::On, CacheType::F16, CacheType::F16);
    let mut c = Compressor::new(&x, Box::new(SnapKv::default()), 32, 1).unwrap();
    c.prefill(&mut x, &tokens, 0, n / 4, serde_json::json!(0.25))
        .unwrap();
    let cells = x.kv_stats(KvPart::Base).unwrap().cells_used;
    assert!(!x.seq_rm(0, 10, 20), "a range inside compacted slots");
    assert!(!x.seq_rm(0, 100, -1), "a suffix reaching into them");
    assert!(!x.seq_add(0, 0, 50, 3), "a shift of them");
    assert_eq!(x.kv_stats(KvPart::Base).unwrap().cells_used, cells);
    // Fresh tokens after the compaction may be removed again.
    x.decode_tokens(&tokens[..4], n as i32, 0, true).unwrap();
    assert!(x.seq_rm(0, n as i32, -1));
    assert_eq!(x.kv_stats(KvPart::Base).unwrap().cells_used, cells);
    assert!(x.seq_rm(0, -1, -1), "the whole sequence");
    assert_eq!(x.kv_stats(KvPart::Base).unwrap().cells_used, 0);
}

/// History compacted per head by SnapKV, then ChunkKV with reuse groups asked
/// to compress harder (re-ranking that history): followers that no longer
/// hold their leader's positions take the nearest ones they hold.
#[test]
fn switching_methods_keeps_compressing_across_reuse_groups() {
    let model = default_model();
    let text = essays(5000);
    let tokens = model.tokenize(&text, true, false).unwrap();
    let half = tokens.len() / 2;
    let mut x = ctx(model, 2048, FlashAttn::On, CacheType::F16, CacheType::F16);
    let mut c = Compressor::new(&x, Box::new(SnapKv::default()), 32, 1).unwrap();
    let keep = Keep {
        from: Pos::MAX,
        history: true,
        short: true,
        recall: false,
    };
    c.prefill_turn(
        &mut x,
        &tokens[..half],
        0,
        half / 3,
        keep,
        Scorer::Window,
        serde_json::json!(0.33),
    )
    .unwrap();
    c.set_policy(Box::new(ChunkKv::default()), 2);
    let rest = &tokens[half..];
    let harder = Keep {
        history: false,
        ..keep
    };
    let n_keep = (half / 3 + rest.len()) / 4;
    let done = c
        .prefill_turn(
            &mut x,
            rest,
            half as i32,
            n_keep,
            harder,
            Scorer::Window,
            serde_json::json!(0.25),
        )
        .unwrap();
    assert!(done.compressed);
    assert_eq!(done.report.cells_after as usize, n_keep);
    // Every layer keeps distinct positions, the window among them.
    let last = tokens.len() as Pos - 1;
    for l in 0..x.kv_layers(KvPart::Base).len() {
        let kept = c.slot_table().positions(l, 0);
        let mut sorted = kept.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), kept.len(), "layer {l}");
        assert!(kept.contains(&last), "layer {l}");
    }
}

/// A model that declares ALiBi: per-head policies would bias attention by the
/// wrong distances and are refused; ChunkKV keeps one set for all layers.
#[test]
fn alibi_models_refuse_per_head_sets_and_share_one_set() {
    use chunkkv::compress::baselines::H2o;
    use chunkkv::llama::{Backend, ModelParams};
    use chunkkv::synth::{write_random_gguf, SynthShape};
    let path = std::env::temp_dir().join(format!("chunkkv-alibi-{}.gguf", std::process::id()));
    let shape = SynthShape {
        n_layer: 4,
        max_alibi_bias: 8.0,
        ..SynthShape::tiny()
    };
    write_random_gguf(&path, &shape, 3).unwrap();
    let model = Model::load(
        Backend::init(),
        &path,
        &ModelParams::default().with_n_gpu_layers(0),
    )
    .unwrap();
    let x = ctx(&model, 512, FlashAttn::Off, CacheType::F16, CacheType::F16);
    for policy in [
        Box::new(SnapKv::default()) as Box<dyn chunkkv::compress::Policy>,
        Box::new(H2o),
        Box::new(PyramidKv::default()),
    ] {
        let e = Compressor::new(&x, policy, 32, 1).unwrap_err().to_string();
        assert!(e.contains("ALiBi"), "{e}");
    }
    let c = Compressor::new(&x, Box::new(ChunkKv::default()), 32, 2).unwrap();
    assert_eq!(c.leader_layers().len(), 1, "one kept set for all 4 layers");
    let _ = std::fs::remove_file(&path);
}
