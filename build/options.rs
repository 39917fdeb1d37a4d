//! llama.cpp build options: which environment variables reach cmake, and the
//! CPU instruction set of the default build. Shared by `build.rs` and its tests
//! (`tests/build_options.rs`), so the extraction is tested on the pinned source.

use std::collections::BTreeSet;
use std::path::Path;

/// Every `option(NAME ...)` declared by a CMakeLists.txt under `source`.
///
/// Cargo re-runs a build script for `rerun-if-env-changed` variables only if the
/// previous run declared them, so the full list must be declared up front: a
/// `GGML_NATIVE=OFF` set for the first time would otherwise keep old libraries.
pub fn cmake_option_names(source: &Path) -> std::io::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    collect_options(source, &mut names)?;
    Ok(names)
}

fn collect_options(dir: &Path, names: &mut BTreeSet<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_options(&path, names)?;
        } else if entry.file_name() == "CMakeLists.txt"
            || path.extension().is_some_and(|e| e == "cmake")
        {
            names.extend(option_names_in(&std::fs::read_to_string(&path)?));
        }
    }
    Ok(())
}

/// Option names in one CMake file: `option(NAME "doc" default)`, any case,
/// whitespace before the parenthesis allowed, comments skipped.
pub fn option_names_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = find_ci(rest, "option") {
            let before = rest[..at].chars().next_back();
            let after = rest[at + "option".len()..].trim_start();
            rest = &rest[at + "option".len()..];
            // `cmake_dependent_option(` and `GGML_OPTION(` are other words.
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let Some(args) = after.strip_prefix('(') else {
                continue;
            };
            let name: String = args
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit()) {
                out.push(name);
            }
        }
    }
    out
}

fn find_ci(hay: &str, needle: &str) -> Option<usize> {
    hay.to_ascii_lowercase().find(needle)
}

/// Cache variables besides the options that change the libraries built.
pub const EXTRA_BUILD_VARS: &[&str] = &[
    "CMAKE_C_FLAGS",
    "CMAKE_CXX_FLAGS",
    "CMAKE_CUDA_FLAGS",
    "CMAKE_CUDA_ARCHITECTURES",
    "CMAKE_BUILD_TYPE",
    "CMAKE_C_COMPILER",
    "CMAKE_CXX_COMPILER",
    "CMAKE_CUDA_COMPILER",
];

/// x86-64 instruction-set switches of ggml's CPU backend.
pub const X86_ISA_OPTIONS: &[&str] = &[
    "GGML_SSE42",
    "GGML_AVX",
    "GGML_AVX2",
    "GGML_BMI2",
    "GGML_FMA",
    "GGML_F16C",
    "GGML_AVX_VNNI",
    "GGML_AVX512",
    "GGML_AVX512_VBMI",
    "GGML_AVX512_VNNI",
    "GGML_AVX512_BF16",
    "GGML_AMX_TILE",
    "GGML_AMX_INT8",
    "GGML_AMX_BF16",
];

/// The default x86-64 build: x86-64-v3 (AVX2, FMA, F16C, BMI2), which every
/// x86-64 CPU since 2013-2015 has. Nothing of the build machine is asked.
pub const X86_64_V3: &[&str] = &[
    "GGML_SSE42",
    "GGML_AVX",
    "GGML_AVX2",
    "GGML_BMI2",
    "GGML_FMA",
    "GGML_F16C",
];

/// Compiler flags that take AMX out of `-march=native` (ggml's AMX matmul
/// crashed with SIGILL on an Intel Xeon VM whose CPU reports AMX).
pub const NO_AMX_FLAGS: &str = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";

/// How the CPU backend is tuned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuTuning {
    /// x86-64-v3, whatever machine builds it (the default).
    Portable,
    /// `-march=native` of the build machine (`CHUNKKV_NATIVE=1` or `GGML_NATIVE=ON`);
    /// AMX only with `amx`.
    Native { amx: bool },
    /// Not x86: ggml's own default for that architecture.
    Other,
}

/// Truthy cmake / shell values.
pub fn is_on(v: &str) -> bool {
    matches!(
        v.to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE" | "Y"
    )
}

/// Decides the CPU tuning from the target and the environment (`get` reads a variable).
pub fn cpu_tuning(target_arch: &str, get: &dyn Fn(&str) -> Option<String>) -> CpuTuning {
    if target_arch != "x86_64" {
        return CpuTuning::Other;
    }
    let on = |k: &str| get(k).is_some_and(|v| is_on(&v));
    let amx = on("CHUNKKV_AMX")
        || ["GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"]
            .iter()
            .any(|k| on(k));
    if on("CHUNKKV_NATIVE") || on("GGML_NATIVE") {
        CpuTuning::Native { amx }
    } else {
        CpuTuning::Portable
    }
}

/// cmake cache entries for a tuning's instruction set. Entries the user set in
/// the environment are applied after these and win.
pub fn cpu_defines(tuning: &CpuTuning) -> Vec<(String, String)> {
    match tuning {
        CpuTuning::Other => Vec::new(),
        CpuTuning::Native { .. } => vec![("GGML_NATIVE".into(), "ON".into())],
        CpuTuning::Portable => std::iter::once(("GGML_NATIVE".to_string(), "OFF".to_string()))
            .chain(X86_ISA_OPTIONS.iter().map(|k| {
                let v = if X86_64_V3.contains(k) { "ON" } else { "OFF" };
                (k.to_string(), v.to_string())
            }))
            .collect(),
    }
}

/// Appends the flags that keep AMX out of a native build to user C/C++ flags.
pub fn without_amx(user_flags: Option<&str>) -> String {
    format!("{} {NO_AMX_FLAGS}", user_flags.unwrap_or_default())
        .trim()
        .to_string()
}

/// The CPU features a build needs at run time, named as
/// `chunkkv::hardware::cpu_features` names them. `defines` are the final
/// cmake entries; `build_host` the build machine's features (for native builds).
pub fn required_features(
    tuning: &CpuTuning,
    defines: &dyn Fn(&str) -> bool,
    build_host: &[&'static str],
) -> Vec<&'static str> {
    const BY_OPTION: &[(&str, &[&str])] = &[
        ("GGML_SSE42", &["SSE4.2"]),
        ("GGML_AVX", &["AVX"]),
        ("GGML_AVX2", &["AVX2"]),
        ("GGML_FMA", &["FMA"]),
        ("GGML_F16C", &["F16C"]),
        ("GGML_BMI2", &["BMI2"]),
        ("GGML_AVX_VNNI", &["AVX_VNNI"]),
        ("GGML_AVX512", &["AVX512F", "AVX512BW", "AVX512VL"]),
        ("GGML_AVX512_VBMI", &["AVX512_VBMI"]),
        ("GGML_AVX512_VNNI", &["AVX512_VNNI"]),
        ("GGML_AVX512_BF16", &["AVX512_BF16"]),
        ("GGML_AMX_TILE", &["AMX_TILE"]),
        ("GGML_AMX_INT8", &["AMX_INT8"]),
        ("GGML_AMX_BF16", &["AMX_BF16"]),
    ];
    match tuning {
        CpuTuning::Other => Vec::new(),
        CpuTuning::Native { amx } => build_host
            .iter()
            .copied()
            .filter(|f| *amx || !f.starts_with("AMX"))
            .collect(),
        CpuTuning::Portable => BY_OPTION
            .iter()
            .filter(|(k, _)| defines(k))
            .flat_map(|(_, fs)| fs.iter().copied())
            .collect(),
    }
}
