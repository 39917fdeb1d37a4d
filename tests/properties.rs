//! Property tests of the host-side pieces: budgets, ChunkKV's selection, the
//! whole host plan of a compression, PyramidKV's counts and the slot table.

use proptest::prelude::*;

use chunkkv::compress::baselines::pyramid_counts;
use chunkkv::compress::slots::SlotTable;
use chunkkv::compress::{Budget, ChunkKv, Compressor};
use chunkkv::llama::{LayerImportance, Pos};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any text parses or is refused with a message; never a panic, never a
    /// budget outside (0, 1] or below one token.
    #[test]
    fn budgets_parse_in_range_or_not_at_all(s in "\\PC{0,12}") {
        if let Ok(b) = s.parse::<Budget>() {
            match b {
                Budget::Ratio(r) => prop_assert!(r > 0.0 && r <= 1.0),
                Budget::Tokens(t) => prop_assert!(t >= 2),
            }
        }
    }

    #[test]
    fn shares_and_percentages_round_trip(r in 0.0001f64..=1.0) {
        prop_assert_eq!(r.to_string().parse::<Budget>().unwrap(), Budget::Ratio(r));
        let pct = format!("{}%", r * 100.0);
        match pct.parse::<Budget>().unwrap() {
            Budget::Ratio(x) => prop_assert!((x - r).abs() < 1e-12),
            other => prop_assert!(false, "{other:?}"),
        }
        for n in [1usize, 7, 4096] {
            let c = Budget::Ratio(r).cells_for(n);
            prop_assert!(c >= 1 && c <= n);
        }
    }

    /// ChunkKV keeps exactly the budget, in order, and every kept chunk is
    /// whole except at most one (the one the budget cuts).
    #[test]
    fn chunkkv_keeps_whole_chunks_and_the_exact_count(
        scores in prop::collection::vec(0.0f32..10.0, 1..1500),
        chunk_size in 1usize..40,
        frac in 0.0f64..=1.0,
    ) {
        let n = scores.len();
        let n_select = ((n as f64) * frac) as usize;
        let chunk: Vec<u32> = (0..n).map(|i| (i / chunk_size) as u32).collect();
        let ckv = ChunkKv { chunk_size, ..ChunkKv::default() };
        let keep = ckv.select_tokens(&scores, &chunk, n_select);
        prop_assert_eq!(keep.len(), n_select.min(n));
        prop_assert!(keep.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(keep.iter().all(|&i| i < n));
        if n_select > chunk_size {
            let mut partial = 0;
            for c in 0..=chunk[n - 1] {
                let size = chunk.iter().filter(|&&x| x == c).count();
                let kept = keep.iter().filter(|&&i| chunk[i] == c).count();
                if kept > 0 && kept < size {
                    partial += 1;
                }
            }
            prop_assert!(partial <= 1, "{partial} partial chunks");
        } else {
            // Too small a budget for one chunk: the most recent tokens.
            prop_assert_eq!(keep, (n - n_select.min(n)..n).collect::<Vec<_>>());
        }
    }

    /// The whole host plan: every storage layer and head keeps exactly
    /// `n_keep` distinct positions, sorted, the window among them, and the
    /// layers of one reuse group keep the same positions.
    #[test]
    fn the_plan_keeps_the_budget_and_the_window_in_every_layer_and_head(
        n in 64usize..1200,
        n_layers in 1usize..7,
        heads in 1usize..4,
        reuse in 1usize..4,
        window in 1usize..40,
        frac in 0.05f64..1.0,
        seed in any::<u64>(),
    ) {
        let window = window.min(n - 1);
        let n_keep = ((n as f64 * frac) as usize).clamp(window + 1, n);
        let comp = Compressor::for_layers(
            Box::new(ChunkKv::default()),
            window,
            reuse,
            (0..n_layers as u32).collect(),
            vec![heads; n_layers],
        )
        .unwrap();
        let meta: Vec<Option<Pos>> = (0..n as Pos).map(Some).collect();
        let mut s = seed | 1;
        let imp: Vec<LayerImportance> = (0..n_layers as u32)
            .step_by(reuse)
            .map(|l| {
                let scores = (0..heads * n)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        (s % 1000) as f32
                    })
                    .collect();
                LayerImportance::new(l, n, scores)
            })
            .collect();
        let plan = comp.plan(&meta, &imp, n_keep).unwrap();
        prop_assert_eq!(plan.len(), n_layers);
        for (l, layer) in plan.iter().enumerate() {
            for head in layer {
                prop_assert_eq!(head.len(), n_keep);
                prop_assert!(head.windows(2).all(|w| w[0] < w[1]));
                for p in (n - window) as Pos..n as Pos {
                    prop_assert!(head.contains(&p), "layer {l} lost window position {p}");
                }
            }
            prop_assert_eq!(layer, &plan[l / reuse * reuse]);
        }
    }

    /// PyramidKV's counts never exceed the cap, decrease from the bottom, and
    /// sum to the layers times the mean whenever the cap allows.
    #[test]
    fn pyramid_counts_hold_the_budget(
        n_layers in 1usize..80,
        mean in 0usize..5000,
        cap in 0usize..8000,
        beta in 1.0f64..40.0,
    ) {
        let c = pyramid_counts(n_layers, mean, cap, beta);
        prop_assert_eq!(c.len(), n_layers);
        prop_assert!(c.iter().all(|&x| x <= cap));
        prop_assert_eq!(c.iter().sum::<usize>(), (n_layers * mean).min(n_layers * cap));
        if cap >= 2 * mean {
            prop_assert!(c.windows(2).all(|w| w[0] + 1 >= w[1]), "{c:?}");
        }
    }

    /// The slot table answers what it was given, dead slots hold nothing, and
    /// cells past the slots fall back to llama.cpp's metadata.
    #[test]
    fn the_slot_table_maps_back_what_was_kept(
        kept in prop::collection::vec(prop::collection::vec(
            prop::collection::vec(-1i32..100_000, 50), 1..4), 1..6),
        extra in 0usize..20,
    ) {
        let mut t = SlotTable::default();
        t.replace(kept.clone());
        prop_assert_eq!(t.n_slots(), 50);
        let meta: Vec<Option<Pos>> = (0..(50 + extra) as Pos).map(|c| Some(c * 3)).collect();
        for (l, layer) in kept.iter().enumerate() {
            for (h, head) in layer.iter().enumerate() {
                for (cell, &p) in head.iter().enumerate() {
                    prop_assert_eq!(t.position(l, h, cell, &meta), (p >= 0).then_some(p));
                    prop_assert!(t.is_compacted(cell));
                }
                for cell in 50..50 + extra {
                    prop_assert_eq!(t.position(l, h, cell, &meta), Some(cell as Pos * 3));
                }
            }
        }
    }
}
