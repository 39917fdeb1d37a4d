//! `chunkkv rpc-server`: ggml's RPC server from this build, so a machine can
//! lend its CPU or GPU to another chunkkv run (`--rpc HOST:PORT`) without any
//! llama.cpp tool.

use clap::Args;

use crate::llama::Backend;

#[derive(Debug, Args)]
pub struct RpcServerArgs {
    /// Address to listen on. RPC has no authentication: anything that can
    /// reach it can use this machine's devices.
    #[arg(long = "host", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 50052)]
    pub port: u16,
    /// Devices to serve, comma-separated, as `chunkkv info` names them (CPU, CUDA0, ...) [default: CPU].
    #[arg(short = 'd', long = "device", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Keep tensors received from clients in this directory, so a model is sent once.
    #[arg(short = 'c', long = "cache")]
    pub cache: Option<std::path::PathBuf>,
    /// CPU threads for the CPU device [default: physical cores].
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

pub fn run(args: RpcServerArgs) -> anyhow::Result<()> {
    let loopback = matches!(args.host.as_str(), "127.0.0.1" | "localhost" | "::1");
    if !loopback {
        eprintln!(
            "warning: RPC has no authentication; anyone who can reach {}:{} can run work on this machine's devices",
            args.host, args.port
        );
    }
    if let Some(dir) = &args.cache {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create cache directory {}: {e}", dir.display()))?;
    }
    let endpoint = if args.host.contains(':') {
        format!("[{}]:{}", args.host, args.port)
    } else {
        format!("{}:{}", args.host, args.port)
    };
    let devices = if args.devices.is_empty() {
        vec!["CPU".to_string()]
    } else {
        args.devices.clone()
    };
    eprintln!(
        "chunkkv rpc-server: serving {} on {endpoint}",
        devices.join(", ")
    );
    let threads = args.threads.unwrap_or_else(crate::hardware::usable_cores);
    Backend::init().serve_rpc(&endpoint, &devices, args.cache.as_deref(), threads)?;
    Ok(())
}
