//! Token samplers: greedy, or a llama.cpp chain of top-k / top-p / min-p /
//! temperature ending in a seeded draw.

use std::ptr::NonNull;

use super::context::Context;
use super::model::Token;
use crate::sys;

/// Sampling settings, as llama.cpp's CLI names them.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) samples greedily.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: i32,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    pub seed: u32,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            seed: 0xFFFF_FFFF,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// A llama.cpp sampler chain.
pub struct Sampler {
    ptr: NonNull<sys::llama_sampler>,
}

// SAFETY: a sampler chain owns plain state and can move between threads.
unsafe impl Send for Sampler {}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: we own the chain, which owns its samplers.
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) }
    }
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Sampler {
        // SAFETY: the chain takes ownership of every sampler added to it.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            let add = |s: *mut sys::llama_sampler| sys::llama_sampler_chain_add(chain, s);
            if p.temperature <= 0.0 {
                add(sys::llama_sampler_init_greedy());
            } else {
                if p.top_k > 0 {
                    add(sys::llama_sampler_init_top_k(p.top_k));
                }
                if p.top_p < 1.0 {
                    add(sys::llama_sampler_init_top_p(p.top_p, 1));
                }
                if p.min_p > 0.0 {
                    add(sys::llama_sampler_init_min_p(p.min_p, 1));
                }
                add(sys::llama_sampler_init_temp(p.temperature));
                add(sys::llama_sampler_init_dist(p.seed));
            }
            Sampler {
                ptr: NonNull::new(chain).expect("llama_sampler_chain_init returned NULL"),
            }
        }
    }

    /// Samples from the logits of output row `idx` of the last decode (-1: last)
    /// and accepts the token into the chain's state.
    pub fn sample(&mut self, ctx: &Context<'_>, idx: i32) -> Token {
        // SAFETY: valid sampler and context; llama_sampler_sample accepts the token.
        Token(unsafe { sys::llama_sampler_sample(self.ptr.as_ptr(), ctx.as_ptr(), idx) })
    }
}
