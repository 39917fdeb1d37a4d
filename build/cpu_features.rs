//! The CPU extensions ggml's CPU kernels use, as the running machine reports
//! them. Shared by `build.rs` (the build machine, for native builds) and
//! `chunkkv::hardware` (the machine it runs on), so both name them alike.

/// Extensions this CPU has, in ggml's spelling.
pub fn detect() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt => $name:expr),* $(,)?) => {
                $(if std::arch::is_x86_feature_detected!($f) { out.push($name); })*
            };
        }
        probe!(
            "sse4.2" => "SSE4.2", "avx" => "AVX", "avx2" => "AVX2", "fma" => "FMA",
            "f16c" => "F16C", "bmi2" => "BMI2", "avxvnni" => "AVX_VNNI",
            "avx512f" => "AVX512F", "avx512bw" => "AVX512BW", "avx512vl" => "AVX512VL",
            "avx512vbmi" => "AVX512_VBMI", "avx512vnni" => "AVX512_VNNI",
            "avx512bf16" => "AVX512_BF16",
        );
        // std cannot name AMX yet (unstable): CPUID leaf 7, EDX bits 22, 24, 25.
        // SAFETY: CPUID is on every x86-64 CPU; a leaf beyond the maximum returns
        // another leaf's data, never faults. (Safe to call since Rust 1.87.)
        #[allow(unused_unsafe)]
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        for (bit, name) in [(24, "AMX_TILE"), (25, "AMX_INT8"), (22, "AMX_BF16")] {
            if edx & (1 << bit) != 0 {
                out.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($f:tt => $name:expr),* $(,)?) => {
                $(if std::arch::is_aarch64_feature_detected!($f) { out.push($name); })*
            };
        }
        probe!("neon" => "NEON", "dotprod" => "DOTPROD", "i8mm" => "I8MM", "sve" => "SVE", "fp16" => "FP16");
    }
    out
}
