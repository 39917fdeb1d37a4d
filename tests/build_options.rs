//! The build script's handling of llama.cpp build options, on the pinned source.

#[path = "../build/options.rs"]
#[allow(dead_code)]
mod options;

use std::path::{Path, PathBuf};

fn pinned_source() -> PathBuf {
    PathBuf::from(env!("CHUNKKV_LLAMA_SOURCE"))
}

#[test]
fn option_names_are_read_from_cmake_syntax() {
    let text = r#"
option(GGML_NATIVE "ggml: optimize the build for the current system" ${GGML_NATIVE_DEFAULT})
    OPTION ( LLAMA_CURL "llama: use libcurl" OFF)
# option(COMMENTED_OUT "no" OFF)
cmake_dependent_option(NOT_AN_OPTION "x" ON "Y" OFF)
set(GGML_OPTION_LIKE ON) option(TWO_ON_A_LINE "y" ON)
"#;
    assert_eq!(
        options::option_names_in(text),
        ["GGML_NATIVE", "LLAMA_CURL", "TWO_ON_A_LINE"]
    );
}

#[test]
fn every_instruction_set_option_of_the_pinned_source_is_found() {
    let names = options::cmake_option_names(&pinned_source()).expect("read the pinned source");
    for must in [
        "GGML_NATIVE",
        "GGML_AVX2",
        "GGML_AVX512",
        "GGML_AMX_INT8",
        "GGML_CUDA",
        "GGML_RPC",
        "LLAMA_BUILD_TESTS",
    ] {
        assert!(names.contains(must), "{must} missing from {names:?}");
    }
    // Every switch the portable build sets is an option llama.cpp declares.
    for opt in options::X86_ISA_OPTIONS {
        assert!(names.contains(*opt), "{opt} is not a ggml option");
    }
    assert!(names.len() > 100, "only {} options", names.len());
}

/// The output of this package's build script, next to its OUT_DIR.
fn build_script_output() -> String {
    let out_dir = Path::new(env!("OUT_DIR"));
    let path = out_dir
        .parent()
        .expect("OUT_DIR has a parent")
        .join("output");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_build_script_reruns_when_any_build_option_changes() {
    let out = build_script_output();
    let watched: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("cargo:rerun-if-env-changed="))
        .collect();
    for var in [
        "GGML_NATIVE",
        "GGML_AVX512",
        "GGML_AMX_INT8",
        "CMAKE_CUDA_ARCHITECTURES",
        "CMAKE_C_FLAGS",
        "CMAKE_CXX_FLAGS",
        "CMAKE_BUILD_TYPE",
        "CHUNKKV_NATIVE",
    ] {
        assert!(watched.contains(&var), "{var} is not watched");
    }
}

#[test]
fn the_default_x86_build_is_portable_and_native_leaves_out_amx() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let none = env(&[]);
    assert_eq!(
        options::cpu_tuning("x86_64", &none),
        options::CpuTuning::Portable
    );
    let defines = options::cpu_defines(&options::CpuTuning::Portable);
    let get = |k: &str| {
        defines
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("GGML_NATIVE"), Some("OFF"));
    assert_eq!(get("GGML_AVX2"), Some("ON"));
    for off in [
        "GGML_AVX512",
        "GGML_AMX_TILE",
        "GGML_AMX_INT8",
        "GGML_AMX_BF16",
    ] {
        assert_eq!(get(off), Some("OFF"), "{off}");
    }
    let on = |k: &str| get(k) == Some("ON");
    assert_eq!(
        options::required_features(&options::CpuTuning::Portable, &on, &[]),
        ["SSE4.2", "AVX", "AVX2", "FMA", "F16C", "BMI2"]
    );

    let native = env(&[("CHUNKKV_NATIVE", "1")]);
    let tuning = options::cpu_tuning("x86_64", &native);
    assert_eq!(tuning, options::CpuTuning::Native { amx: false });
    assert_eq!(
        options::without_amx(Some("-O3")),
        "-O3 -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    );
    let host = ["AVX2", "AVX512F", "AMX_TILE", "AMX_INT8"];
    assert_eq!(
        options::required_features(&tuning, &|_| false, &host),
        ["AVX2", "AVX512F"]
    );
    let amx = env(&[("GGML_NATIVE", "ON"), ("GGML_AMX_INT8", "ON")]);
    assert_eq!(
        options::cpu_tuning("x86_64", &amx),
        options::CpuTuning::Native { amx: true }
    );
    assert_eq!(
        options::cpu_tuning("aarch64", &none),
        options::CpuTuning::Other
    );
}

/// The library the tests link was built as the build script said: no AMX
/// tile instruction unless AMX was asked for.
#[test]
fn the_linked_cpu_backend_reports_no_amx_unless_asked() {
    let backend = chunkkv::llama::Backend::init();
    let feats = backend.build_features();
    let cpu = feats
        .iter()
        .find(|(n, _)| n == "CPU")
        .map(|(_, f)| f.clone())
        .expect("a CPU backend");
    let amx_asked = chunkkv::hardware::cpu_build_requires()
        .iter()
        .any(|f| f.starts_with("AMX"));
    if !amx_asked {
        assert!(
            !cpu.iter().any(|f| f.starts_with("AMX")),
            "AMX compiled in: {cpu:?}"
        );
    }
    // Everything the build requires is something this test machine has (it runs).
    assert!(chunkkv::hardware::check_cpu().is_ok());
}
