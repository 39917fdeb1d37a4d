//! Facts about the machine that set defaults.

/// Physical CPU cores: llama.cpp decodes fastest with one thread per core
/// (on a 2-core machine, 4 threads decoded 2.7x slower than 2).
pub fn physical_cores() -> usize {
    num_cpus::get_physical().max(1)
}

/// A short description of this machine for result tables.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let mut out = format!(
        "{cpu}, {} physical cores, {}",
        physical_cores(),
        std::env::consts::OS
    );
    // Results from an offloaded run must say which accelerator made them.
    let accelerators: Vec<String> = crate::llama::Backend::init()
        .devices()
        .into_iter()
        .filter(|d| d.kind != crate::llama::DeviceKind::Cpu)
        .map(|d| format!("{} ({})", d.description, d.name))
        .collect();
    if !accelerators.is_empty() {
        out.push_str("; ");
        out.push_str(&accelerators.join(", "));
    }
    out
}

/// The git commit of the source tree this binary was run from, if known:
/// `$CHUNKKV_COMMIT`, else `git rev-parse` in the crate's directory.
pub fn commit() -> String {
    if let Ok(c) = std::env::var("CHUNKKV_COMMIT") {
        return c;
    }
    std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}
