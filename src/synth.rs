//! Random-weights GGUF files of a real architecture's shape.
//!
//! A benchmark host that cannot receive a multi-gigabyte model can still
//! measure speed and memory on one of the same shape: [`write_random_gguf`]
//! writes a `llama`-architecture GGUF whose hyperparameters, tensor shapes and
//! quantization (Q4_0) match the real model, with pseudo-random weights and a
//! placeholder SentencePiece vocabulary. Its text output is noise.
//!
//! File layout (GGUF v3, little-endian):
//!
//! - header: magic, version, tensor count, key-value count;
//! - key-values: `general.*`, the `llama.*` hyperparameters, an SPM vocabulary
//!   (`<unk>`, `<s>`, `</s>`, the 256 byte tokens `<0x00>`..`<0xFF>`, then
//!   filler tokens `▁tok<i>` up to `n_vocab`), with scores and token types;
//! - tensor infos in llama.cpp's usual order: `token_embd`, the blocks
//!   `blk.N.*`, `output_norm`, `output`;
//! - tensor data, each tensor starting on a 32-byte boundary.
//!
//! Norm weights are F32 ones. Every 2-D weight is Q4_0 with random nibbles and
//! a per-tensor f16 scale magnitude chosen so a matrix-vector product roughly
//! keeps the RMS of its input (`1 / (4.64 * sqrt(row length))`), which keeps
//! activations finite through any number of layers; `token_embd` rows have an
//! RMS near 1. The scale's sign alternates between blocks so the weights have
//! no shared offset.
//!
//! Everything follows from the seed: the same shape and seed give the same
//! bytes.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Shape of a llama-architecture model to synthesize.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthShape {
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_ff: u32,
    pub n_vocab: u32,
    pub n_ctx_train: u32,
    pub rope_freq_base: f32,
    /// Declares ALiBi (`llama.attention.max_alibi_bias`) when above 0; llama
    /// itself ignores it, it exists to test that compression refuses
    /// per-head selection on models that declare it.
    pub max_alibi_bias: f32,
}

impl SynthShape {
    /// Names accepted by [`SynthShape::by_name`].
    pub const NAMES: &'static [&'static str] = &["llama3-8b", "tiny"];

    /// Llama-3-8B: 32 layers, 4096 embd, 32 heads, 8 KV heads, 14336 ff,
    /// 128256 vocab, ctx 131072, rope base 500000.
    pub fn llama3_8b() -> Self {
        Self {
            n_layer: 32,
            n_embd: 4096,
            n_head: 32,
            n_head_kv: 8,
            n_ff: 14336,
            n_vocab: 128_256,
            n_ctx_train: 131_072,
            rope_freq_base: 500_000.0,
            max_alibi_bias: 0.0,
        }
    }

    /// A tiny shape for tests: 2 layers, 256 embd, 4 heads, 2 KV heads,
    /// 512 ff, 1024 vocab, ctx 4096.
    pub fn tiny() -> Self {
        Self {
            n_layer: 2,
            n_embd: 256,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 512,
            n_vocab: 1024,
            n_ctx_train: 4096,
            rope_freq_base: 10_000.0,
            max_alibi_bias: 0.0,
        }
    }

    /// A built-in shape by name (see [`SynthShape::NAMES`]).
    pub fn by_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama3-8b" => Some(Self::llama3_8b()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> u32 {
        self.n_embd / self.n_head
    }

    /// Width of the K (and V) projection: KV heads times head width.
    pub fn n_embd_kv(&self) -> u32 {
        self.head_dim() * self.n_head_kv
    }

    /// Checks that llama.cpp will accept the shape.
    fn validate(&self) -> io::Result<()> {
        let bad = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        if self.n_layer == 0 || self.n_layer > 512 {
            return bad(format!("n_layer {} not in 1..=512", self.n_layer));
        }
        if self.n_head == 0 || self.n_head_kv == 0 {
            return bad("n_head and n_head_kv must be positive".into());
        }
        if self.n_embd % self.n_head != 0 {
            return bad(format!(
                "n_embd {} not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if self.n_head % self.n_head_kv != 0 {
            return bad(format!(
                "n_head {} not a multiple of n_head_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head width {} is odd (RoPE needs pairs)",
                self.head_dim()
            ));
        }
        for (what, n) in [
            ("n_embd", self.n_embd),
            ("n_ff", self.n_ff),
            ("n_embd_kv", self.n_embd_kv()),
        ] {
            if n == 0 || n % QK4_0 as u32 != 0 {
                return bad(format!(
                    "{what} {n} not a positive multiple of {QK4_0} (Q4_0 block)"
                ));
            }
        }
        if self.n_vocab < N_FIXED_TOKENS {
            return bad(format!(
                "n_vocab {} below {N_FIXED_TOKENS} (3 special + 256 byte tokens)",
                self.n_vocab
            ));
        }
        if self.n_ctx_train == 0 {
            return bad("n_ctx_train must be positive".into());
        }
        if !(self.rope_freq_base.is_finite() && self.rope_freq_base > 0.0) {
            return bad(format!(
                "rope_freq_base {} not positive",
                self.rope_freq_base
            ));
        }
        Ok(())
    }
}

/// Writes the GGUF to `path` (via a temp file beside it, then a rename).
/// Returns the bytes written.
pub fn write_random_gguf(path: &Path, shape: &SynthShape, seed: u64) -> io::Result<u64> {
    shape.validate()?;
    let tmp = temp_path(path);
    let result = write_to(&tmp, shape, seed).and_then(|n| std::fs::rename(&tmp, path).map(|()| n));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "synth.gguf".into());
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

// ---- GGUF constants (ggml/include/gguf.h, ggml.h) ----

const GGUF_VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;

const GGUF_TYPE_UINT32: u32 = 4;
const GGUF_TYPE_INT32: u32 = 5;
const GGUF_TYPE_FLOAT32: u32 = 6;
const GGUF_TYPE_BOOL: u32 = 7;
const GGUF_TYPE_STRING: u32 = 8;
const GGUF_TYPE_ARRAY: u32 = 9;

const GGML_TYPE_F32: u32 = 0;
const GGML_TYPE_Q4_0: u32 = 2;

/// llama_ftype MOSTLY_Q4_0.
const FILE_TYPE_MOSTLY_Q4_0: u32 = 2;

/// Elements per Q4_0 block, and its bytes: an f16 scale and 16 bytes of nibbles.
const QK4_0: u64 = 32;
const Q4_0_BLOCK_BYTES: usize = 18;

/// `<unk>`, `<s>`, `</s>` and the 256 byte tokens.
const N_FIXED_TOKENS: u32 = 3 + 256;

/// llama_token_type values.
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_BYTE: i32 = 6;

/// RMS of a Q4_0 weight in scale units: nibbles 0..=15 minus 8 are uniform on
/// -8..=7, so E[q^2] = 21.5.
const Q4_0_UNIT_RMS: f64 = 4.636_809_247_747_852; // sqrt(21.5)

// ---- tensors ----

#[derive(Debug, Clone, Copy)]
enum Fill {
    /// F32, every element 1.0.
    Ones,
    /// Q4_0, random nibbles, one f16 scale for the whole tensor.
    Q4_0 { scale: u16 },
}

#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    /// ne[0] is the row length (contiguous), ne[1] the number of rows.
    ne: Vec<u64>,
    fill: Fill,
}

impl TensorSpec {
    fn norm(name: String, n: u32) -> Self {
        Self {
            name,
            ne: vec![n as u64],
            fill: Fill::Ones,
        }
    }

    /// A Q4_0 matrix of `rows` rows of `row_len`. With `dot` (a projection),
    /// a row dotted with a unit-RMS input gives about unit RMS; without (an
    /// embedding table), each row itself has about unit RMS.
    fn matrix(name: String, row_len: u32, rows: u32, dot: bool) -> Self {
        let per_weight = if dot {
            1.0 / (row_len as f64).sqrt()
        } else {
            1.0
        };
        let scale = f32_to_f16_bits((per_weight / Q4_0_UNIT_RMS) as f32);
        Self {
            name,
            ne: vec![row_len as u64, rows as u64],
            fill: Fill::Q4_0 { scale },
        }
    }

    fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    fn ggml_type(&self) -> u32 {
        match self.fill {
            Fill::Ones => GGML_TYPE_F32,
            Fill::Q4_0 { .. } => GGML_TYPE_Q4_0,
        }
    }

    fn n_bytes(&self) -> u64 {
        match self.fill {
            Fill::Ones => self.n_elements() * 4,
            Fill::Q4_0 { .. } => self.n_elements() / QK4_0 * Q4_0_BLOCK_BYTES as u64,
        }
    }
}

/// The tensors of a llama model, in the order convert_hf_to_gguf writes them.
fn tensors(s: &SynthShape) -> Vec<TensorSpec> {
    let mut v = Vec::with_capacity(3 + 9 * s.n_layer as usize);
    v.push(TensorSpec::matrix(
        "token_embd.weight".into(),
        s.n_embd,
        s.n_vocab,
        false,
    ));
    for il in 0..s.n_layer {
        let n = |t: &str| format!("blk.{il}.{t}.weight");
        v.push(TensorSpec::norm(n("attn_norm"), s.n_embd));
        v.push(TensorSpec::matrix(n("attn_q"), s.n_embd, s.n_embd, true));
        v.push(TensorSpec::matrix(
            n("attn_k"),
            s.n_embd,
            s.n_embd_kv(),
            true,
        ));
        v.push(TensorSpec::matrix(
            n("attn_v"),
            s.n_embd,
            s.n_embd_kv(),
            true,
        ));
        v.push(TensorSpec::matrix(
            n("attn_output"),
            s.n_embd,
            s.n_embd,
            true,
        ));
        v.push(TensorSpec::norm(n("ffn_norm"), s.n_embd));
        v.push(TensorSpec::matrix(n("ffn_gate"), s.n_embd, s.n_ff, true));
        v.push(TensorSpec::matrix(n("ffn_up"), s.n_embd, s.n_ff, true));
        v.push(TensorSpec::matrix(n("ffn_down"), s.n_ff, s.n_embd, true));
    }
    v.push(TensorSpec::norm("output_norm.weight".into(), s.n_embd));
    v.push(TensorSpec::matrix(
        "output.weight".into(),
        s.n_embd,
        s.n_vocab,
        true,
    ));
    v
}

fn pad_to(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

// ---- key-value section ----

/// Serializes GGUF key-value pairs and counts them.
#[derive(Default)]
struct KvWriter {
    buf: Vec<u8>,
    n: u64,
}

impl KvWriter {
    fn key(&mut self, key: &str, ty: u32) {
        put_str(&mut self.buf, key);
        self.buf.extend_from_slice(&ty.to_le_bytes());
        self.n += 1;
    }

    fn u32(&mut self, key: &str, v: u32) {
        self.key(key, GGUF_TYPE_UINT32);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn f32(&mut self, key: &str, v: f32) {
        self.key(key, GGUF_TYPE_FLOAT32);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn bool(&mut self, key: &str, v: bool) {
        self.key(key, GGUF_TYPE_BOOL);
        self.buf.push(v as u8);
    }

    fn str(&mut self, key: &str, v: &str) {
        self.key(key, GGUF_TYPE_STRING);
        put_str(&mut self.buf, v);
    }

    fn array_header(&mut self, key: &str, elem_ty: u32, len: usize) {
        self.key(key, GGUF_TYPE_ARRAY);
        self.buf.extend_from_slice(&elem_ty.to_le_bytes());
        self.buf.extend_from_slice(&(len as u64).to_le_bytes());
    }

    fn str_array(&mut self, key: &str, v: &[String]) {
        self.array_header(key, GGUF_TYPE_STRING, v.len());
        for s in v {
            put_str(&mut self.buf, s);
        }
    }

    fn f32_array(&mut self, key: &str, v: &[f32]) {
        self.array_header(key, GGUF_TYPE_FLOAT32, v.len());
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }

    fn i32_array(&mut self, key: &str, v: &[i32]) {
        self.array_header(key, GGUF_TYPE_INT32, v.len());
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// The placeholder SPM vocabulary: tokens, scores, token types.
fn vocabulary(n_vocab: u32) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let n = n_vocab as usize;
    let mut tokens = Vec::with_capacity(n);
    let mut scores = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for (t, ty) in [
        ("<unk>", TOKEN_TYPE_UNKNOWN),
        ("<s>", TOKEN_TYPE_CONTROL),
        ("</s>", TOKEN_TYPE_CONTROL),
    ] {
        tokens.push(t.to_string());
        scores.push(0.0);
        types.push(ty);
    }
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(TOKEN_TYPE_BYTE);
    }
    for i in 0..n - N_FIXED_TOKENS as usize {
        tokens.push(format!("\u{2581}tok{i}"));
        scores.push(-(i as f32) - 1.0);
        types.push(TOKEN_TYPE_NORMAL);
    }
    (tokens, scores, types)
}

fn metadata(s: &SynthShape) -> KvWriter {
    let mut kv = KvWriter::default();
    kv.str("general.architecture", "llama");
    kv.str(
        "general.name",
        &format!(
            "chunkkv synthetic llama {}L {}d (random weights)",
            s.n_layer, s.n_embd
        ),
    );
    kv.u32("general.file_type", FILE_TYPE_MOSTLY_Q4_0);
    kv.u32("general.quantization_version", 2);
    kv.u32("general.alignment", ALIGNMENT as u32);

    kv.u32("llama.context_length", s.n_ctx_train);
    kv.u32("llama.embedding_length", s.n_embd);
    kv.u32("llama.block_count", s.n_layer);
    kv.u32("llama.feed_forward_length", s.n_ff);
    kv.u32("llama.attention.head_count", s.n_head);
    kv.u32("llama.attention.head_count_kv", s.n_head_kv);
    if s.max_alibi_bias > 0.0 {
        kv.f32("llama.attention.max_alibi_bias", s.max_alibi_bias);
    }
    kv.f32("llama.rope.freq_base", s.rope_freq_base);
    kv.f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    kv.u32("llama.rope.dimension_count", s.head_dim());
    kv.u32("llama.vocab_size", s.n_vocab);

    let (tokens, scores, types) = vocabulary(s.n_vocab);
    kv.str("tokenizer.ggml.model", "llama");
    kv.str_array("tokenizer.ggml.tokens", &tokens);
    kv.f32_array("tokenizer.ggml.scores", &scores);
    kv.i32_array("tokenizer.ggml.token_type", &types);
    kv.u32("tokenizer.ggml.unknown_token_id", 0);
    kv.u32("tokenizer.ggml.bos_token_id", 1);
    kv.u32("tokenizer.ggml.eos_token_id", 2);
    kv.bool("tokenizer.ggml.add_bos_token", true);
    kv.bool("tokenizer.ggml.add_eos_token", false);
    kv
}

fn tensor_infos(specs: &[TensorSpec]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut offset = 0u64;
    for t in specs {
        put_str(&mut buf, &t.name);
        buf.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for &ne in &t.ne {
            buf.extend_from_slice(&(ne as i64).to_le_bytes());
        }
        buf.extend_from_slice(&t.ggml_type().to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
        offset += pad_to(t.n_bytes(), ALIGNMENT);
    }
    buf
}

// ---- writing ----

/// Q4_0 blocks generated per write: about 4.7 MB. Even, so the alternating
/// scale sign of [`fill_q4_0`] runs on across chunks.
const CHUNK_BLOCKS: usize = 1 << 18;

fn write_to(path: &Path, s: &SynthShape, seed: u64) -> io::Result<u64> {
    let specs = tensors(s);
    let kv = metadata(s);
    let infos = tensor_infos(&specs);

    let mut out = BufWriter::with_capacity(8 << 20, File::create(path)?);
    let mut written = 0u64;
    let mut put = |out: &mut BufWriter<File>, bytes: &[u8]| -> io::Result<()> {
        out.write_all(bytes)?;
        written += bytes.len() as u64;
        Ok(())
    };

    let mut header = Vec::with_capacity(24);
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    header.extend_from_slice(&(specs.len() as u64).to_le_bytes());
    header.extend_from_slice(&kv.n.to_le_bytes());
    put(&mut out, &header)?;
    put(&mut out, &kv.buf)?;
    put(&mut out, &infos)?;

    let zeros = [0u8; ALIGNMENT as usize];
    let head_len = (header.len() + kv.buf.len() + infos.len()) as u64;
    put(
        &mut out,
        &zeros[..(pad_to(head_len, ALIGNMENT) - head_len) as usize],
    )?;

    let mut chunk = vec![0u8; CHUNK_BLOCKS * Q4_0_BLOCK_BYTES];
    for t in &specs {
        let n_bytes = t.n_bytes();
        match t.fill {
            Fill::Ones => {
                let ones: Vec<u8> = (0..t.n_elements())
                    .flat_map(|_| 1.0f32.to_le_bytes())
                    .collect();
                put(&mut out, &ones)?;
            }
            Fill::Q4_0 { scale } => {
                let mut rng = SplitMix64::new(seed ^ fnv1a(t.name.as_bytes()));
                let mut left = t.n_elements() / QK4_0;
                while left > 0 {
                    let n = left.min(CHUNK_BLOCKS as u64) as usize;
                    let buf = &mut chunk[..n * Q4_0_BLOCK_BYTES];
                    fill_q4_0(buf, scale, &mut rng);
                    put(&mut out, buf)?;
                    left -= n as u64;
                }
            }
        }
        put(
            &mut out,
            &zeros[..(pad_to(n_bytes, ALIGNMENT) - n_bytes) as usize],
        )?;
    }
    out.into_inner().map_err(|e| e.into_error())?;
    Ok(written)
}

/// Fills whole Q4_0 blocks: the scale, then 16 random bytes of nibbles.
///
/// Uniform nibbles dequantize to -8..=7, whose mean is -0.5 scale units; a
/// shared offset like that would act on the all-ones direction of the hidden
/// state with a gain of several per layer. So the scale's sign alternates from
/// block to block (llama.cpp's quantizer writes negative scales too) and the
/// offsets cancel along each row. `buf` must start on an even block.
fn fill_q4_0(buf: &mut [u8], scale: u16, rng: &mut SplitMix64) {
    let scales = [scale.to_le_bytes(), (scale ^ 0x8000).to_le_bytes()];
    for (i, block) in buf.chunks_exact_mut(Q4_0_BLOCK_BYTES).enumerate() {
        block[0..2].copy_from_slice(&scales[i & 1]);
        block[2..10].copy_from_slice(&rng.next_u64().to_le_bytes());
        block[10..18].copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

/// SplitMix64: a tiny, fast generator, plenty for random weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        let mut r = Self(seed);
        // Decorrelate nearby seeds before use.
        r.next_u64();
        r
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// FNV-1a, to give every tensor its own stream from one seed.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// IEEE half-precision bits of `x`, rounded to nearest even. Handles normal,
/// subnormal, overflowing (to infinity) and non-finite inputs.
fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xFF) as i32;
    let mant = bits & 0x7F_FFFF;
    if exp == 0xFF {
        // Inf stays Inf; NaN keeps a quiet-NaN payload.
        return sign | 0x7C00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1F {
        return sign | 0x7C00;
    }
    if e <= 0 {
        // Subnormal half (or zero): shift the full significand into place.
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let round = rem > halfway || (rem == halfway && half & 1 == 1);
        return sign | (half + round as u32) as u16;
    }
    let half = ((e as u32) << 10) | (mant >> 13);
    let rem = mant & 0x1FFF;
    let round = rem > 0x1000 || (rem == 0x1000 && half & 1 == 1);
    // A carry out of the mantissa correctly bumps the exponent (up to Inf).
    sign | (half + round as u32) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion() {
        assert_eq!(f32_to_f16_bits(1.0), 0x3C00);
        assert_eq!(f32_to_f16_bits(-2.0), 0xC000);
        assert_eq!(f32_to_f16_bits(0.0), 0x0000);
        assert_eq!(f32_to_f16_bits(65504.0), 0x7BFF);
        assert_eq!(f32_to_f16_bits(1e6), 0x7C00);
        assert_eq!(f32_to_f16_bits(f32::NAN) & 0x7C00, 0x7C00);
        assert_eq!(f32_to_f16_bits(6.103_515_6e-5), 0x0400); // smallest normal
        assert_eq!(f32_to_f16_bits(5.960_464_5e-8), 0x0001); // smallest subnormal
                                                             // 0.01 is 0x211F in half precision.
        assert_eq!(f32_to_f16_bits(0.01), 0x211F);
    }

    #[test]
    fn shapes_are_valid_and_sized() {
        for name in SynthShape::NAMES {
            let s = SynthShape::by_name(name).unwrap();
            s.validate().unwrap();
            let specs = tensors(&s);
            assert_eq!(specs.len(), 3 + 9 * s.n_layer as usize);
            for t in &specs {
                if let Fill::Q4_0 { scale } = t.fill {
                    // Finite, positive, small.
                    assert!(scale > 0 && scale < 0x3C00, "{} scale {scale:#x}", t.name);
                }
            }
        }
        assert!(SynthShape::by_name("nope").is_none());
        let mut bad = SynthShape::tiny();
        bad.n_embd = 250;
        assert!(bad.validate().is_err());
        bad = SynthShape::tiny();
        bad.n_vocab = 100;
        assert!(bad.validate().is_err());
    }

    /// Half-precision bits to f32, for normal numbers only.
    fn f16_normal_to_f32(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exp = ((h >> 10) & 0x1F) as i32 - 15;
        let mant = 1.0 + (h & 0x3FF) as f32 / 1024.0;
        sign * mant * 2f32.powi(exp)
    }

    #[test]
    fn q4_0_weights_are_centred_with_the_intended_rms() {
        let d = 0.01f32;
        let n_blocks = 4096;
        let mut buf = vec![0u8; n_blocks * Q4_0_BLOCK_BYTES];
        fill_q4_0(&mut buf, f32_to_f16_bits(d), &mut SplitMix64::new(3));
        let (mut sum, mut sq, mut n) = (0f64, 0f64, 0f64);
        for block in buf.chunks_exact(Q4_0_BLOCK_BYTES) {
            let scale = f16_normal_to_f32(u16::from_le_bytes([block[0], block[1]]));
            assert!((scale.abs() - d).abs() < 1e-5);
            for &b in &block[2..] {
                for q in [b & 0x0F, b >> 4] {
                    let w = ((q as i32 - 8) as f32 * scale) as f64;
                    sum += w;
                    sq += w * w;
                    n += 1.0;
                }
            }
        }
        let (mean, rms) = (sum / n, (sq / n).sqrt());
        assert!(mean.abs() < 0.05 * d as f64, "mean {mean}");
        assert!(
            (rms / d as f64 / Q4_0_UNIT_RMS - 1.0).abs() < 0.02,
            "rms {rms}"
        );
    }

    #[test]
    fn vocabulary_is_unique() {
        let (tokens, scores, types) = vocabulary(1024);
        assert_eq!(
            (tokens.len(), scores.len(), types.len()),
            (1024, 1024, 1024)
        );
        let set: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(set.len(), tokens.len());
        assert_eq!(tokens[3], "<0x00>");
        assert_eq!(tokens[258], "<0xFF>");
    }
}
