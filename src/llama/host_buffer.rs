//! Host memory a GPU copies from at full bus speed (CUDA: pinned pages).
//! Writing rows into the cache from ordinary (pageable) memory makes the
//! driver stage them through its own pinned buffer first: on an H100 that
//! halves the rate of the recall store's uploads.

use std::ptr::NonNull;

use super::Backend;
use crate::sys;

/// A buffer from the first GPU's host buffer type, freed on drop.
pub struct HostBuffer {
    buf: NonNull<sys::ggml_backend_buffer>,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain host memory owned by this value alone; ggml
// frees it from any thread.
unsafe impl Send for HostBuffer {}

impl HostBuffer {
    /// `len` bytes of the first GPU's host memory, or `None` when no device
    /// offers any (a CPU-only or RPC build) or the allocation fails: callers
    /// then use ordinary memory.
    pub fn for_gpu(_backend: &Backend, len: usize) -> Option<HostBuffer> {
        if len == 0 {
            return None;
        }
        // SAFETY: the registry is initialized (a Backend exists); devices and
        // buffer types are owned by ggml and live forever; the buffer is ours
        // until freed in Drop.
        unsafe {
            let buft = (0..sys::ggml_backend_dev_count())
                .map(|i| sys::ggml_backend_dev_get(i))
                .filter(|&d| sys::ggml_backend_dev_type(d) == sys::GGML_BACKEND_DEVICE_TYPE_GPU)
                .map(|d| sys::ggml_backend_dev_host_buffer_type(d))
                .find(|b| !b.is_null())?;
            let buf = NonNull::new(sys::ggml_backend_buft_alloc_buffer(buft, len))?;
            let Some(base) = NonNull::new(sys::ggml_backend_buffer_get_base(buf.as_ptr()).cast())
            else {
                sys::ggml_backend_buffer_free(buf.as_ptr());
                return None;
            };
            Some(HostBuffer { buf, base, len })
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: base points to len bytes that only this value reaches.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in for_gpu and freed once, here.
        unsafe { sys::ggml_backend_buffer_free(self.buf.as_ptr()) }
    }
}
