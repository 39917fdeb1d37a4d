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
    }
    Ok(())
}
