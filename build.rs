//! Builds the pinned, patched llama.cpp and generates its raw bindings.
//!
//! 1. `cargo fetch` the checksum-pinned `llama-cpp-sys-2` crate named in
//!    `vendor/llama.cpp/Cargo.lock` (used only as a carrier of llama.cpp's source).
//! 2. Copy its `llama.cpp/` tree to `<target>/llama.cpp/source` and apply
//!    `patches/*.patch` in order. That tree stays there for builds elsewhere
//!    (see `docs/gpu-host.md`).
//! 3. Build it with cmake, in Release whatever the cargo profile, into a build
//!    directory keyed by source and options, so dev and release profiles share it.
//!    `CHUNKKV_LLAMA_LIB_DIR` skips this and links prebuilt shared libraries.
//! 4. Run bindgen over the patched `llama.h`.

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

#[path = "build/cpu_features.rs"]
mod cpu_features;
#[path = "build/options.rs"]
mod options;
use options::CpuTuning;

const CARRIER_PACKAGE: &str = "llama-cpp-sys-2";

/// Environment variables of our own that change what is built.
const OWN_ENV: &[&str] = &[
    "CHUNKKV_LLAMA_LIB_DIR",
    "CHUNKKV_LLAMA_SHARED",
    "CHUNKKV_NATIVE",
    "CHUNKKV_AMX",
    "CUDA_PATH",
];

/// Cache-variable prefixes passed through from the environment to cmake.
const PASSTHROUGH_PREFIXES: &[&str] = &["CMAKE_", "GGML_"];

/// Variables the `cmake` crate or cmake itself read from the environment directly.
const NOT_DEFINES: &[&str] = &[
    "CMAKE_GENERATOR",
    "CMAKE_TOOLCHAIN_FILE",
    "CMAKE_BUILD_PARALLEL_LEVEL",
];

fn main() {
    if let Err(msg) = run() {
        eprintln!("\nchunkkv build error: {msg}\n");
        exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .ok_or("unexpected OUT_DIR layout")?
        .to_path_buf();
    let llama_root = target_dir.join("llama.cpp");
    fs::create_dir_all(&llama_root).map_err(|e| format!("create {}: {e}", llama_root.display()))?;

    let carrier = manifest_dir.join("vendor/llama.cpp");
    let patches_dir = manifest_dir.join("patches");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=patches");
    println!("cargo:rerun-if-changed=vendor/llama.cpp/Cargo.toml");
    println!("cargo:rerun-if-changed=vendor/llama.cpp/Cargo.lock");
    for var in OWN_ENV {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let (carrier_version, upstream) = locate_carrier(&carrier)?;
    let patches = list_patches(&patches_dir)?;
    let source = llama_root.join("source");
    let stamp = source_stamp(&carrier_version, &patches)?;
    materialize(&upstream, &source, &patches, &stamp)?;

    // Cargo re-runs this script for a variable only if the previous run named it,
    // so every option the pinned CMakeLists declare is named, set or not.
    let options = options::cmake_option_names(&source)
        .map_err(|e| format!("read cmake options of {}: {e}", source.display()))?;
    for name in options
        .iter()
        .map(String::as_str)
        .chain(options::EXTRA_BUILD_VARS.iter().copied())
    {
        println!("cargo:rerun-if-env-changed={name}");
    }

    let backends = backends();
    let tuning = match env::var_os("CHUNKKV_LLAMA_LIB_DIR") {
        Some(dir) => {
            link_prebuilt(Path::new(&dir), &backends);
            println!("cargo:rustc-env=CHUNKKV_CPU_REQUIRES=");
            "prebuilt"
        }
        None => tuning_name(&build_with_cmake(&source, &llama_root, &stamp, &backends)?),
    };
    println!("cargo:rustc-env=CHUNKKV_CPU_TUNING={tuning}");

    generate_bindings(&source, &out_dir)?;

    let ggml_version = ggml_version(&source).unwrap_or_else(|| "unknown".into());
    let patch_names: Vec<String> = patches.iter().map(|p| file_name(p)).collect();
    println!("cargo:rustc-env=CHUNKKV_CARRIER_VERSION={carrier_version}");
    println!("cargo:rustc-env=CHUNKKV_GGML_VERSION={ggml_version}");
    println!("cargo:rustc-env=CHUNKKV_PATCHES={}", patch_names.join(","));
    println!("cargo:rustc-env=CHUNKKV_BACKENDS={}", backends.join(","));
    println!("cargo:rustc-env=CHUNKKV_LLAMA_SOURCE={}", source.display());
    Ok(())
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("{name} is not set"))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// Fetches the carrier crate and returns (its version, its `llama.cpp/` directory).
fn locate_carrier(carrier: &Path) -> Result<(String, PathBuf), String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = carrier.join("Cargo.toml");
    let fetch = |offline: bool| {
        let mut cmd = Command::new(&cargo);
        cmd.args(["fetch", "--locked", "--manifest-path"])
            .arg(&manifest);
        if offline {
            cmd.arg("--offline");
        }
        cmd.status().map(|s| s.success()).unwrap_or(false)
    };
    if !fetch(false) && !fetch(true) {
        return Err(format!(
            "could not fetch the llama.cpp source carrier `{CARRIER_PACKAGE}` listed in {} \
             (needs crates.io once; afterwards Cargo's cache is enough)",
            manifest.display()
        ));
    }
    let output = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo metadata on {} failed: {}",
            manifest.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cargo metadata output: {e}"))?;
    let package = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == CARRIER_PACKAGE))
        .ok_or_else(|| format!("`{CARRIER_PACKAGE}` not in the carrier's metadata"))?;
    let version = package["version"].as_str().unwrap_or("?").to_string();
    let manifest_path = package["manifest_path"]
        .as_str()
        .ok_or("carrier manifest_path missing")?;
    let dir = Path::new(manifest_path)
        .parent()
        .ok_or("carrier manifest has no parent")?
        .join("llama.cpp");
    if !dir.join("CMakeLists.txt").is_file() {
        return Err(format!("{} holds no llama.cpp tree", dir.display()));
    }
    Ok((version, dir))
}

fn list_patches(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut patches: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "patch"))
        .collect();
    patches.sort();
    Ok(patches)
}

/// FNV-1a: a stable hash for naming directories (std's hasher is not stable across releases).
fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

const FNV_SEED: u64 = 0xcbf2_9ce4_8422_2325;

fn source_stamp(version: &str, patches: &[PathBuf]) -> Result<String, String> {
    let mut h = fnv1a(version.as_bytes(), FNV_SEED);
    for p in patches {
        h = fnv1a(file_name(p).as_bytes(), h);
        let body = fs::read(p).map_err(|e| format!("read {}: {e}", p.display()))?;
        h = fnv1a(&body, h);
    }
    Ok(format!("{version}-{h:016x}"))
}

/// Directories of the upstream tree we never need (documentation, conversion scripts).
const SKIP_DIRS: &[&str] = &["docs", "gguf-py", "models", "pocs", ".github"];

/// Copies the upstream tree to `dest` and applies the patches, unless `dest` already
/// holds exactly this source (same carrier version and patch bytes).
fn materialize(
    upstream: &Path,
    dest: &Path,
    patches: &[PathBuf],
    stamp: &str,
) -> Result<(), String> {
    let stamp_file = dest.join(".chunkkv-stamp");
    if fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
        return Ok(());
    }
    let staging = dest.with_extension("staging");
    let _ = fs::remove_dir_all(&staging);
    copy_tree(upstream, &staging, true).map_err(|e| format!("copy llama.cpp source: {e}"))?;
    for patch in patches {
        apply_patch(&staging, patch)?;
    }
    // Sync rather than replace: unchanged files keep their mtimes, so cmake rebuilds
    // only what a patch touched.
    let _ = fs::remove_file(&stamp_file);
    sync_tree(&staging, dest).map_err(|e| format!("update {}: {e}", dest.display()))?;
    fs::write(&stamp_file, stamp).map_err(|e| e.to_string())?;
    let _ = fs::remove_dir_all(&staging);
    Ok(())
}

/// Makes `to` hold exactly the files of `from`, writing only files whose bytes differ.
fn sync_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    let mut wanted = std::collections::BTreeSet::new();
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let (src, dst) = (entry.path(), to.join(&name));
        wanted.insert(name);
        if entry.file_type()?.is_dir() {
            if dst.is_file() {
                fs::remove_file(&dst)?;
            }
            sync_tree(&src, &dst)?;
        } else {
            let body = fs::read(&src)?;
            if fs::read(&dst).ok().as_deref() != Some(&body[..]) {
                if dst.is_dir() {
                    fs::remove_dir_all(&dst)?;
                }
                fs::write(&dst, body)?;
            }
        }
    }
    for entry in fs::read_dir(to)? {
        let entry = entry?;
        if !wanted.contains(&entry.file_name()) && entry.file_name() != ".chunkkv-stamp" {
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path, top: bool) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if top && SKIP_DIRS.iter().any(|s| name == *s) {
            continue;
        }
        let ty = entry.file_type()?;
        if ty.is_dir() {
            copy_tree(&entry.path(), &to.join(&name), false)?;
        } else {
            fs::copy(entry.path(), to.join(&name))?;
        }
    }
    Ok(())
}

fn apply_patch(tree: &Path, patch: &Path) -> Result<(), String> {
    let name = file_name(patch);
    let output = Command::new("patch")
        .args([
            "-p1",
            "--forward",
            "--batch",
            "--no-backup-if-mismatch",
            "-d",
        ])
        .arg(tree)
        .arg("-i")
        .arg(patch)
        .output()
        .map_err(|e| {
            format!("cannot run `patch` for {name}: {e} (install it: apt-get install patch)")
        })?;
    if !output.status.success() {
        return Err(format!(
            "patch {name} does not apply to the pinned llama.cpp:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// ggml backends compiled in, from cargo features and the target.
fn backends() -> Vec<&'static str> {
    let mut b = vec!["cpu"];
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        b.push("cuda");
    }
    let apple_silicon = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos")
        && env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("aarch64");
    if env::var_os("CARGO_FEATURE_METAL").is_some() || apple_silicon {
        b.push("metal");
    }
    b
}

/// `CMAKE_*` / `GGML_*` variables of the environment, passed to cmake as cache entries.
fn passthrough_defines() -> BTreeMap<String, String> {
    env::vars()
        .filter(|(k, _)| {
            PASSTHROUGH_PREFIXES.iter().any(|p| k.starts_with(p))
                && !NOT_DEFINES.contains(&k.as_str())
        })
        .collect()
}

fn build_with_cmake(
    source: &Path,
    llama_root: &Path,
    stamp: &str,
    backends: &[&str],
) -> Result<CpuTuning, String> {
    let shared = env::var("CHUNKKV_LLAMA_SHARED").is_ok_and(|v| v == "1");
    let target = env_var("TARGET")?;
    let mut defines: BTreeMap<String, String> = [
        ("BUILD_SHARED_LIBS", if shared { "ON" } else { "OFF" }),
        ("LLAMA_BUILD_TESTS", "OFF"),
        ("LLAMA_BUILD_EXAMPLES", "OFF"),
        ("LLAMA_BUILD_TOOLS", "OFF"),
        ("LLAMA_BUILD_SERVER", "OFF"),
        ("LLAMA_BUILD_APP", "OFF"),
        ("LLAMA_BUILD_COMMON", "OFF"),
        ("LLAMA_CURL", "OFF"),
        ("LLAMA_OPENSSL", "OFF"),
        ("GGML_OPENMP", "OFF"),
        // ggml's RPC backend: `--rpc` and `chunkkv rpc-server`.
        ("GGML_RPC", "ON"),
        (
            "GGML_CUDA",
            if backends.contains(&"cuda") {
                "ON"
            } else {
                "OFF"
            },
        ),
        (
            "GGML_METAL",
            if backends.contains(&"metal") {
                "ON"
            } else {
                "OFF"
            },
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if backends.contains(&"cuda") {
        // llama.cpp's default FlashAttention K-V pairs plus q8_0 K with q4_0 V
        // (docs/serve.md): without its kernel CUDA converts such a cache to f16
        // at every step. GGML_CUDA_FA_QUANTS in the environment overrides it.
        // The same list as .ci/gpu-build's (a CUDA host without Rust).
        defines.insert(
            "GGML_CUDA_FA_QUANTS".into(),
            "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16,q8_0-q4_0".into(),
        );
    }
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let tuning = options::cpu_tuning(&arch, &|k| env::var(k).ok());
    defines.extend(options::cpu_defines(&tuning));
    for (k, v) in passthrough_defines() {
        println!("cargo:rerun-if-env-changed={k}");
        defines.insert(k, v);
    }
    let on = |k: &str| defines.get(k).is_some_and(|v| options::is_on(v));
    let required = options::required_features(&tuning, &on, &build_host_features());
    println!(
        "cargo:rustc-env=CHUNKKV_CPU_REQUIRES={}",
        required.join(",")
    );
    if tuning == (CpuTuning::Native { amx: false }) {
        for var in ["CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS"] {
            let flags = options::without_amx(defines.get(var).map(String::as_str));
            defines.insert(var.to_string(), flags);
        }
    }

    let mut key = fnv1a(stamp.as_bytes(), FNV_SEED);
    key = fnv1a(target.as_bytes(), key);
    for (k, v) in &defines {
        key = fnv1a(format!("{k}={v};").as_bytes(), key);
    }
    let build_dir = llama_root.join(format!("build-{key:016x}"));

    if Command::new("cmake").arg("--version").output().is_err() {
        return Err("cmake not found: run `.ci/setup` (or apt-get install cmake)".into());
    }
    let mut cfg = cmake::Config::new(source);
    cfg.profile("Release").out_dir(&build_dir);
    for (k, v) in &defines {
        cfg.define(k, v);
    }
    let dst = cfg.build();

    let kind = if shared { "dylib" } else { "static" };
    for sub in ["lib", "lib64"] {
        println!("cargo:rustc-link-search=native={}", dst.join(sub).display());
    }
    link_libraries(kind, backends);
    if shared {
        println!(
            "cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}",
            dst.join("lib").display()
        );
    }
    Ok(tuning)
}

/// The build machine's CPU features, for a native build's run-time check
/// (empty when cross-compiling).
fn build_host_features() -> Vec<&'static str> {
    if env::var("HOST") == env::var("TARGET") {
        cpu_features::detect()
    } else {
        Vec::new()
    }
}

fn tuning_name(t: &CpuTuning) -> &'static str {
    match t {
        CpuTuning::Portable => "x86-64-v3",
        CpuTuning::Native { amx: false } => "native (no AMX)",
        CpuTuning::Native { amx: true } => "native",
        CpuTuning::Other => "ggml default",
    }
}

fn link_prebuilt(dir: &Path, backends: &[&str]) {
    println!("cargo:rustc-link-search=native={}", dir.display());
    // libllama, the ggml core and ggml-rpc (called directly) are needed at link time: the
    // other backend libraries (CPU, CUDA, ...) are dependencies of libggml and come from
    // LD_LIBRARY_PATH at run time.
    for lib in ["llama", "ggml", "ggml-base", "ggml-rpc"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    let _ = backends;
}

fn link_libraries(kind: &str, backends: &[&str]) {
    let mut libs = vec!["llama", "ggml", "ggml-base", "ggml-cpu", "ggml-rpc"];
    if backends.contains(&"cuda") {
        libs.push("ggml-cuda");
    }
    if backends.contains(&"metal") {
        libs.extend(["ggml-metal", "ggml-blas"]);
    }
    for lib in libs {
        println!("cargo:rustc-link-lib={kind}={lib}");
    }
    if kind == "static" {
        let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
        if os == "macos" {
            println!("cargo:rustc-link-lib=c++");
            for fw in ["Foundation", "Metal", "MetalKit", "Accelerate"] {
                println!("cargo:rustc-link-lib=framework={fw}");
            }
        } else {
            println!("cargo:rustc-link-lib=stdc++");
        }
        if backends.contains(&"cuda") {
            let cuda = env::var("CUDA_PATH").unwrap_or_else(|_| "/usr/local/cuda".into());
            println!("cargo:rustc-link-search=native={cuda}/lib64");
            println!("cargo:rustc-link-search=native={cuda}/lib64/stubs");
            for lib in ["cudart", "cublas", "cublasLt", "cuda"] {
                println!("cargo:rustc-link-lib=dylib={lib}");
            }
        }
    }
}

fn generate_bindings(source: &Path, out_dir: &Path) -> Result<(), String> {
    let header = source.join("include/llama.h");
    let rpc = source.join("ggml/include/ggml-rpc.h");
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .header(rpc.to_string_lossy())
        .clang_arg(format!("-I{}", source.join("ggml/include").display()))
        .allowlist_function("llama_.*")
        .allowlist_type("llama_.*")
        .allowlist_function(
            "ggml_backend_(dev|reg)_.*|ggml_backend_buft_alloc_buffer|ggml_backend_buffer_(get_base|free)|ggml_backend_load_all|ggml_backend_register|ggml_backend_rpc_.*|ggml_type_name|ggml_log_set|ggml_set_abort_callback",
        )
        .allowlist_type("ggml_type|ggml_log_level|ggml_backend_dev_type|ggml_backend_feature")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .map_err(|e| {
            format!(
                "bindgen on {}: {e} (needs libclang: run `.ci/setup`)",
                header.display()
            )
        })?;
    bindings
        .write_to_file(out_dir.join("bindings.rs"))
        .map_err(|e| format!("write bindings: {e}"))
}

fn ggml_version(source: &Path) -> Option<String> {
    let text = fs::read_to_string(source.join("ggml/CMakeLists.txt")).ok()?;
    let part = |name: &str| {
        text.lines().find_map(|l| {
            l.trim()
                .strip_prefix(&format!("set({name} "))?
                .strip_suffix(')')
                .map(str::to_string)
        })
    };
    Some(format!(
        "{}.{}.{}",
        part("GGML_VERSION_MAJOR")?,
        part("GGML_VERSION_MINOR")?,
        part("GGML_VERSION_PATCH")?
    ))
}
