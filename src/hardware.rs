//! Facts about the machine that set defaults.

/// Physical CPU cores: llama.cpp decodes fastest with one thread per core
/// (on a 2-core machine, 4 threads decoded 2.7x slower than 2).
pub fn physical_cores() -> usize {
    num_cpus::get_physical().max(1)
}

/// Cores this process may use: physical cores, fewer if the affinity mask
/// or a cgroup quota allows fewer CPUs.
pub fn usable_cores() -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores().min(allowed).max(1)
}

/// Usable cores not taken by other runnable tasks right now (Linux: from
/// `procs_running` in /proc/stat, the median of a few readings; elsewhere
/// all usable cores).
pub fn free_cores() -> usize {
    let usable = usable_cores();
    let mut samples: Vec<usize> = (0..5)
        .filter_map(|i| {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            procs_running()
        })
        .collect();
    if samples.is_empty() {
        return usable;
    }
    samples.sort_unstable();
    // The reading counts this thread too.
    let others = samples[samples.len() / 2].saturating_sub(1);
    usable.saturating_sub(others).max(1)
}

/// Other runnable tasks right now (one reading of `procs_running`, less this
/// thread); `None` where the kernel does not say.
pub fn others_running() -> Option<usize> {
    procs_running().map(|n| n.saturating_sub(1))
}

fn procs_running() -> Option<usize> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("procs_running "))
        .and_then(|v| v.trim().parse().ok())
}

#[path = "../build/cpu_features.rs"]
mod detect;

/// The CPU's instruction-set extensions that matter to ggml's CPU kernels,
/// as this machine reports them.
pub fn cpu_features() -> Vec<&'static str> {
    detect::detect()
}

/// Extensions the linked llama.cpp was compiled to use (fixed at build time).
pub fn cpu_build_requires() -> Vec<&'static str> {
    env!("CHUNKKV_CPU_REQUIRES")
        .split(',')
        .filter(|s| !s.is_empty())
        .collect()
}

/// How the linked llama.cpp's CPU code was tuned: `x86-64-v3`, `native (no AMX)`, ...
pub const CPU_TUNING: &str = env!("CHUNKKV_CPU_TUNING");

/// Refuses to run a build whose CPU code needs extensions this CPU lacks,
/// which would otherwise die of SIGILL inside llama.cpp.
pub fn check_cpu() -> Result<(), String> {
    let have = cpu_features();
    let missing: Vec<&str> = cpu_build_requires()
        .into_iter()
        .filter(|f| !have.contains(f))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "this chunkkv was built for CPUs with {} ({CPU_TUNING}), which this CPU ({}) lacks; \
             rebuild it here (the default build targets x86-64-v3; CHUNKKV_NATIVE=1 tunes for the build machine)",
            missing.join(", "),
            cpu_model()
        ))
    }
}

/// The CPU model name (`/proc/cpuinfo`), or the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// A short description of this machine for result tables.
pub fn machine_description() -> String {
    let cpu = cpu_model();
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
