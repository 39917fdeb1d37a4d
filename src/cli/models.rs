//! `chunkkv models list|pull`.

use clap::Subcommand;

use crate::models::{cache_dir, find_builtin, BUILTIN};

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Built-in models and whether they are cached.
    List,
    /// Fetch a built-in model into the cache (verifying its SHA-256).
    Pull {
        /// Model name.
        name: String,
    },
    /// Write a random-weights GGUF of a real architecture's shape, for speed
    /// and memory benchmarks where real weights cannot travel (its text is noise).
    Synth {
        /// Shape: llama3-8b or tiny.
        shape: String,
        /// Output file.
        #[arg(short = 'o', long = "output")]
        output: std::path::PathBuf,
        #[arg(short = 's', long = "seed", default_value_t = 1)]
        seed: u64,
    },
}

pub fn run(cmd: ModelsCommand) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::List => {
            println!("cache: {}", cache_dir().display());
            println!("{:<14} {:>9}  {:<7} description", "name", "size", "cached");
            for m in BUILTIN {
                println!(
                    "{:<14} {:>6} MB  {:<7} {}",
                    m.name,
                    m.size_bytes / 1_000_000,
                    if m.is_cached() { "yes" } else { "no" },
                    m.description
                );
            }
        }
        ModelsCommand::Pull { name } => {
            let m = find_builtin(&name).ok_or(crate::models::ModelRefError::Unknown { name })?;
            let path = m.ensure()?;
            println!("{}", path.display());
        }
        ModelsCommand::Synth {
            shape,
            output,
            seed,
        } => {
            let s = crate::synth::SynthShape::by_name(&shape).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown shape `{shape}` (expected one of: {})",
                    crate::synth::SynthShape::NAMES.join(", ")
                )
            })?;
            let bytes = crate::synth::write_random_gguf(&output, &s, seed)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?;
            println!(
                "{} ({:.2} GiB)",
                output.display(),
                bytes as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}
