//! `chunkkv info`: what this build is and, with -m, what a model looks like.

use clap::Args;

use crate::hardware;
use crate::llama::{version, Backend};

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Also describe this model (.gguf path or built-in name).
    #[arg(short = 'm', long = "model")]
    pub model: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let backend = Backend::init();
    let devices = backend.devices();
    let model = match &args.model {
        Some(m) => {
            let margs = super::ModelArgs {
                model: m.clone(),
                n_gpu_layers: 0,
                split_mode: crate::llama::SplitMode::Layer,
                tensor_split: Vec::new(),
                main_gpu: 0,
                rpc: Vec::new(),
            };
            Some(margs.load()?.info())
        }
        None => None,
    };
    let build_features = backend.build_features();
    let cpu = serde_json::json!({
        "model": hardware::cpu_model(),
        "physical_cores": hardware::physical_cores(),
        "usable_cores": hardware::usable_cores(),
        "features": hardware::cpu_features(),
        "build_tuning": hardware::CPU_TUNING,
        "build_requires": hardware::cpu_build_requires(),
        "build_check": hardware::check_cpu().err(),
    });
    if args.json {
        let v = serde_json::json!({
            "cpu": cpu,
            "build_features": build_features.iter().map(|(n, f)| (n.clone(), f.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            "chunkkv": env!("CARGO_PKG_VERSION"),
            "llama_cpp_carrier": format!("llama-cpp-sys-2 {}", version::CARRIER),
            "ggml": version::GGML,
            "patches": version::PATCHES.split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>(),
            "backends": version::BACKENDS.split(',').collect::<Vec<_>>(),
            "devices": devices,
            "model": model,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("chunkkv {}", env!("CARGO_PKG_VERSION"));
    println!(
        "llama.cpp: from llama-cpp-sys-2 {} (ggml {})",
        version::CARRIER,
        version::GGML
    );
    println!("patches: {}", version::PATCHES.replace(',', ", "));
    println!("backends: {}", version::BACKENDS.replace(',', ", "));
    println!(
        "cpu: {} ({} physical cores, {} usable)",
        hardware::cpu_model(),
        hardware::physical_cores(),
        hardware::usable_cores()
    );
    println!("  has:        {}", hardware::cpu_features().join(" "));
    println!("  build:      {}", hardware::CPU_TUNING);
    for (name, feats) in &build_features {
        if !feats.is_empty() {
            println!("  {name} uses: {}", feats.join(" "));
        }
    }
    if let Err(e) = hardware::check_cpu() {
        println!("  warning:    {e}");
    }
    println!("devices:");
    for d in &devices {
        let mem = if d.memory_total > 0 {
            format!(", {:.1} GiB", d.memory_total as f64 / (1u64 << 30) as f64)
        } else {
            String::new()
        };
        println!("  {} ({:?}): {}{mem}", d.name, d.kind, d.description);
    }
    if let Some(m) = model {
        println!("model: {}", m.description);
        println!("  architecture: {}", m.architecture);
        println!("  parameters:   {}", m.n_params);
        println!(
            "  size:         {:.1} MiB",
            m.size_bytes as f64 / (1u64 << 20) as f64
        );
        println!("  layers:       {}", m.n_layer);
        println!(
            "  heads:        {} (KV heads {}, head dim {})",
            m.n_head, m.n_head_kv, m.head_dim
        );
        println!("  context:      {} (training)", m.n_ctx_train);
        if m.swa_layers.is_empty() {
            println!("  sliding-window layers: none");
        } else {
            println!(
                "  sliding-window layers: {} of {} (window {}): {:?}",
                m.swa_layers.len(),
                m.n_layer,
                m.n_swa,
                m.swa_layers
            );
        }
    }
    Ok(())
}
