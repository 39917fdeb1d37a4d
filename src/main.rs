fn main() {
    let cli = chunkkv::cli::Cli::parse_args();
    init_logging(cli.verbose);
    if let Err(e) = cli.run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Quiet by default (chunkkv's own warnings only); -v adds llama.cpp's info
/// log, -vv its debug log. Always to stderr, so stdout stays clean.
fn init_logging(verbose: u8) {
    use tracing::level_filters::LevelFilter;
    use tracing_subscriber::prelude::*;
    let llama = match verbose {
        0 => LevelFilter::OFF,
        1 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    };
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("llama.cpp", llama)
        .with_target(
            "chunkkv",
            if verbose > 0 {
                LevelFilter::DEBUG
            } else {
                LevelFilter::WARN
            },
        );
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    // With -v, wall-clock times (UTC): a server's phase log lines up with
    // its clients' timings (benches/serve_load.py records its start too).
    let layer = if verbose > 0 {
        layer
            .with_timer(tracing_subscriber::fmt::time::SystemTime)
            .boxed()
    } else {
        layer.without_time().boxed()
    };
    tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .init();
}
