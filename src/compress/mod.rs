//! KV-cache compression: budgets, selection policies (ChunkKV), layer-wise
//! index reuse, the slot→position table, and the hook that compacts the cache.

pub mod baselines;
pub mod budget;
pub mod chunkkv;
pub mod compressor;
pub mod policy;
pub mod recall;
pub mod reconstruct;
pub mod reuse;
pub mod sentences;
pub mod slots;
pub mod stream;
pub mod verify;

pub use budget::Budget;
pub use chunkkv::{ChunkKv, ChunkScore, Chunking};
pub use compressor::{
    CompressError, CompressionReport, Compressor, CompressorMark, Keep, Prefilled, StageMs,
};
pub use policy::{HeadCandidates, LayerCandidates, Policy};
pub use recall::{RankMs, RecallError, RecallMode, RecallStore, RecallTurn};
pub use reconstruct::{Reconstruction, TurnState};

/// `--kv-score`: where importance comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scorer {
    /// The observation window: the prompt's last tokens (its question, if any) score the rest.
    #[default]
    Window,
    /// Context reconstruction (KVzip): query-agnostic; one more pass over the
    /// context in which every query scores (2.6–3× the prefill on a 2-core CPU).
    Reconstruct,
}

/// `--kv-method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// llama.cpp's cache, uncompressed.
    None,
    /// ChunkKV: whole chunks ranked by window attention, reused across layer groups.
    #[default]
    Chunkkv,
    /// StreamingLLM: 4 sink tokens and the most recent.
    Streaming,
    /// H2O (prefill variant): attention of every prompt query, top per KV head.
    H2o,
    /// SnapKV: window attention, max-pooled, top per KV head.
    Snapkv,
    /// PyramidKV: SnapKV scores, per-layer budgets decreasing from bottom to top.
    Pyramidkv,
    /// A seeded random subset: the floor.
    Random,
    /// KVzip: context-reconstruction scores, top per KV head (token level).
    Kvzip,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Chunkkv => "chunkkv",
            Method::Streaming => "streaming",
            Method::H2o => "h2o",
            Method::Snapkv => "snapkv",
            Method::Pyramidkv => "pyramidkv",
            Method::Random => "random",
            Method::Kvzip => "kvzip",
        }
    }

    /// Whether the method ranks by attention scores (window or reconstruction).
    pub fn scores(self) -> bool {
        !matches!(self, Method::None | Method::Streaming | Method::Random)
    }

    /// The selection policy of a compressing method (`None` has none).
    /// `shape` is ChunkKV's (chunk size, window, chunk score, pooling); the
    /// baselines take its window.
    pub fn policy(self, shape: &ChunkKv, seed: u64) -> Result<Box<dyn Policy>, CompressError> {
        shape.check()?;
        let window = shape.window;
        Ok(match self {
            Method::None => {
                return Err(CompressError::Config(
                    "method `none` does not compress".into(),
                ))
            }
            Method::Chunkkv => Box::new(shape.clone()),
            Method::Streaming => Box::new(baselines::Streaming::default()),
            Method::H2o => Box::new(baselines::H2o),
            Method::Snapkv => Box::new(baselines::SnapKv { window, kernel: 7 }),
            Method::Random => Box::new(baselines::RandomKeep { seed }),
            Method::Kvzip => Box::new(baselines::KvZip),
            Method::Pyramidkv => Box::new(baselines::PyramidKv {
                snap: baselines::SnapKv { window, kernel: 7 },
                ..baselines::PyramidKv::default()
            }),
        })
    }
}

/// A method with the scores it ranks by, as eval's `--methods` spells it:
/// `chunkkv` (the observation window), `chunkkv:reconstruct`, `kvzip`
/// (always reconstruction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodSpec {
    pub method: Method,
    /// `None`: the run's default (`--kv-score`).
    pub scorer: Option<Scorer>,
    /// `+recall`: evicted rows are kept and each later turn (each question
    /// in eval) may bring them back.
    pub recall: bool,
}

impl MethodSpec {
    /// The scorer this spec uses when the run's default is `default`.
    pub fn scorer_or(self, default: Scorer) -> Scorer {
        if self.method == Method::Kvzip {
            Scorer::Reconstruct
        } else {
            self.scorer.unwrap_or(default)
        }
    }

    /// The label of results: the method, with `:reconstruct` when a method
    /// that defaults to its window reconstructs instead.
    pub fn label(self, default: Scorer) -> String {
        let scored = self.method.scores() && self.method != Method::Kvzip;
        let base = match self.scorer_or(default) {
            Scorer::Reconstruct if scored => format!("{}:reconstruct", self.method.name()),
            _ => self.method.name().to_string(),
        };
        if self.recall {
            base + "+recall"
        } else {
            base
        }
    }
}

impl std::str::FromStr for MethodSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        use clap::ValueEnum;
        let (s, recall) = match s.trim().strip_suffix("+recall") {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let (name, scorer) = match s.split_once(':') {
            Some((n, sc)) => (n, Some(sc)),
            None => (s, None),
        };
        let method = Method::from_str(name.trim(), true).map_err(|_| {
            let names: Vec<&str> = Method::value_variants().iter().map(|m| m.name()).collect();
            format!("unknown method `{name}` (expected {})", names.join(", "))
        })?;
        let scorer = scorer
            .map(|sc| {
                Scorer::from_str(sc.trim(), true).map_err(|_| {
                    format!("unknown scorer `{sc}` in `{s}` (expected window or reconstruct)")
                })
            })
            .transpose()?;
        if method == Method::Kvzip && scorer == Some(Scorer::Window) {
            return Err(
                "kvzip is defined on reconstruction scores: `kvzip:window` is not a method".into(),
            );
        }
        if recall && method != Method::Chunkkv {
            return Err(format!(
                "`+recall` brings back whole chunks: it needs chunkkv, not {}",
                method.name()
            ));
        }
        Ok(MethodSpec {
            method,
            scorer,
            recall,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_specs_parse_and_label() {
        let p = |s: &str| s.parse::<MethodSpec>();
        let c = p("chunkkv:reconstruct").unwrap();
        assert_eq!(
            (c.method, c.scorer),
            (Method::Chunkkv, Some(Scorer::Reconstruct))
        );
        assert_eq!(c.label(Scorer::Window), "chunkkv:reconstruct");
        assert_eq!(p("chunkkv").unwrap().label(Scorer::Window), "chunkkv");
        assert_eq!(
            p("chunkkv").unwrap().label(Scorer::Reconstruct),
            "chunkkv:reconstruct"
        );
        assert_eq!(p("kvzip").unwrap().label(Scorer::Window), "kvzip");
        assert_eq!(
            p("streaming").unwrap().label(Scorer::Reconstruct),
            "streaming"
        );
        assert!(p("kvzip:window").is_err());
        assert!(p("chunkkv:psychic").unwrap_err().contains("scorer"));
        assert!(p("snapkvv").unwrap_err().contains("unknown method"));
    }
}
