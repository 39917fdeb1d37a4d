//! The process-wide llama.cpp backend: initialized once, never freed, and the
//! route by which llama.cpp's log reaches `tracing`.

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

use super::error::RpcError;
use crate::sys;

/// `HOST:PORT` answers a TCP connection within five seconds.
fn check_reachable(endpoint: &str) -> Result<(), RpcError> {
    use std::net::ToSocketAddrs;
    let (host, port) = endpoint
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .ok_or_else(|| RpcError::BadEndpoint(endpoint.into()))?;
    let unreachable = |reason: String| RpcError::Unreachable {
        endpoint: endpoint.into(),
        reason,
    };
    let addrs: Vec<_> = (
        host.trim_matches(|c| c == '[' || c == ']'),
        port.parse::<u16>().unwrap_or(0),
    )
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .collect();
    let mut last = "no address".to_string();
    for addr in addrs {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable(last))
}

/// ggml's last word before it aborts (a lost RPC server, a failed
/// allocation deep in a backend): one `error:` line and exit 1, instead of a
/// backtrace and SIGABRT. Nothing can be recovered at that point.
unsafe extern "C" fn abort_cleanly(message: *const c_char) {
    let text = if message.is_null() {
        String::from("unknown error")
    } else {
        CStr::from_ptr(message).to_string_lossy().into_owned()
    };
    // The message starts with ggml's source location: keep what it says.
    let what = text
        .split_once(": ")
        .filter(|(loc, _)| loc.contains(':'))
        .map_or(text.as_str(), |(_, rest)| rest)
        .trim();
    // Straight to file descriptor 2: another thread may hold Rust's stdout or
    // stderr lock (a streamed reply), and this one must not wait for it.
    let line = format!("error: llama.cpp stopped: {what}\n");
    extern "C" {
        fn write(fd: i32, buf: *const c_void, count: usize) -> isize;
        fn _exit(code: i32) -> !;
    }
    write(2, line.as_ptr().cast(), line.len());
    _exit(1);
}

/// Proof that llama.cpp's backend is initialized. Model loading takes one, so
/// nothing can touch llama.cpp before `llama_backend_init` ran.
#[derive(Debug)]
pub struct Backend {
    _private: (),
}

static BACKEND: OnceLock<Backend> = OnceLock::new();

impl Backend {
    /// Initializes llama.cpp (once per process) and routes its log to `tracing`
    /// under the target `llama.cpp`.
    pub fn init() -> &'static Backend {
        BACKEND.get_or_init(|| {
            // SAFETY: called once, before any other llama.cpp call; the callbacks are 'static.
            unsafe {
                sys::llama_log_set(Some(log_to_tracing), std::ptr::null_mut());
                sys::ggml_set_abort_callback(Some(abort_cleanly));
                sys::llama_backend_init();
            }
            Backend { _private: () }
        })
    }

    /// The compute devices ggml registered (CPU, CUDA GPUs, Metal, ...).
    pub fn devices(&self) -> Vec<Device> {
        // SAFETY: the registry is initialized; pointers returned are owned by ggml and live forever.
        unsafe {
            (0..sys::ggml_backend_dev_count())
                .map(|i| {
                    let dev = sys::ggml_backend_dev_get(i);
                    let (mut free, mut total) = (0usize, 0usize);
                    sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
                    Device {
                        name: cstr(sys::ggml_backend_dev_name(dev)),
                        description: cstr(sys::ggml_backend_dev_description(dev)),
                        kind: match sys::ggml_backend_dev_type(dev) {
                            sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
                            sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
                            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
                            _ => DeviceKind::Accelerator,
                        },
                        memory_free: free as u64,
                        memory_total: total as u64,
                    }
                })
                .collect()
        }
    }

    /// Whether any device besides the CPU can hold layers.
    pub fn has_gpu(&self) -> bool {
        self.devices()
            .iter()
            .any(|d| matches!(d.kind, DeviceKind::Gpu | DeviceKind::IntegratedGpu))
    }

    /// What each registered backend was compiled to use, as ggml reports it
    /// (`("CPU", ["AVX2", "FMA", ...])`): the build's instruction set, not the host's.
    pub fn build_features(&self) -> Vec<(String, Vec<String>)> {
        // SAFETY: registry entries are owned by ggml and live forever; the feature
        // list is a static array terminated by a null name.
        unsafe {
            (0..sys::ggml_backend_reg_count())
                .map(|i| {
                    let reg = sys::ggml_backend_reg_get(i);
                    let name = cstr(sys::ggml_backend_reg_name(reg));
                    let mut feats = Vec::new();
                    let f = sys::ggml_backend_reg_get_proc_address(
                        reg,
                        c"ggml_backend_get_features".as_ptr(),
                    );
                    if !f.is_null() {
                        type GetFeatures = unsafe extern "C" fn(
                            sys::ggml_backend_reg_t,
                        )
                            -> *const sys::ggml_backend_feature;
                        let get: GetFeatures = std::mem::transmute(f);
                        let mut p = get(reg);
                        while !p.is_null() && !(*p).name.is_null() {
                            let (n, v) = (cstr((*p).name), cstr((*p).value));
                            feats.push(if v == "1" { n } else { format!("{n}={v}") });
                            p = p.add(1);
                        }
                    }
                    (name, feats)
                })
                .collect()
        }
    }

    /// Registers a ggml RPC server's devices (llama.cpp's `--rpc`), after
    /// checking that something answers there: ggml-rpc aborts the process on a
    /// failed connection. Registering the same endpoint twice does nothing.
    pub fn add_rpc_server(&self, endpoint: &str) -> Result<(), RpcError> {
        static ADDED: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let mut added = ADDED.lock().unwrap_or_else(|e| e.into_inner());
        if added.iter().any(|e| e == endpoint) {
            return Ok(());
        }
        check_reachable(endpoint)?;
        let c = CString::new(endpoint).map_err(|_| RpcError::BadEndpoint(endpoint.into()))?;
        // SAFETY: the endpoint string outlives the call; ggml keeps its own copy.
        unsafe {
            let reg = sys::ggml_backend_rpc_add_server(c.as_ptr());
            if reg.is_null() {
                return Err(RpcError::NoBackend);
            }
            sys::ggml_backend_register(reg);
        }
        added.push(endpoint.to_string());
        Ok(())
    }

    /// Serves this machine's `devices` (names as `chunkkv info` lists them;
    /// empty: the CPU) to ggml RPC clients on `endpoint` until the process
    /// ends. `cache_dir` keeps received tensors on disk between runs.
    pub fn serve_rpc(
        &self,
        endpoint: &str,
        devices: &[String],
        cache_dir: Option<&std::path::Path>,
        threads: usize,
    ) -> Result<std::convert::Infallible, RpcError> {
        let c_endpoint =
            CString::new(endpoint).map_err(|_| RpcError::BadEndpoint(endpoint.into()))?;
        let names: Vec<String> = if devices.is_empty() {
            vec!["CPU".to_string()]
        } else {
            devices.to_vec()
        };
        let mut devs = Vec::with_capacity(names.len());
        for name in &names {
            let c =
                CString::new(name.as_str()).map_err(|_| RpcError::UnknownDevice(name.clone()))?;
            // SAFETY: the name outlives the call; the device lives as long as ggml.
            let dev = unsafe { sys::ggml_backend_dev_by_name(c.as_ptr()) };
            if dev.is_null() {
                return Err(RpcError::UnknownDevice(name.clone()));
            }
            devs.push(dev);
        }
        let cache = cache_dir
            .map(|d| CString::new(d.to_string_lossy().as_bytes()))
            .transpose()
            .map_err(|_| RpcError::BadEndpoint(endpoint.into()))?;
        // SAFETY: every pointer outlives the call, which serves until the process ends.
        unsafe {
            sys::ggml_backend_rpc_start_server(
                c_endpoint.as_ptr(),
                cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                threads,
                devs.len(),
                devs.as_mut_ptr(),
            );
        }
        Err(RpcError::Unreachable {
            endpoint: endpoint.into(),
            reason: "the server stopped (port in use?)".into(),
        })
    }

    /// llama.cpp's one-line summary of CPU features and backends.
    pub fn system_info(&self) -> String {
        // SAFETY: returns a static C string.
        unsafe { cstr(sys::llama_print_system_info()) }
    }
}

/// A ggml compute device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Device {
    pub name: String,
    pub description: String,
    pub kind: DeviceKind,
    pub memory_free: u64,
    pub memory_total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
}

pub(crate) unsafe fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// llama.cpp logs in fragments (level CONT continues the previous line), so
/// whole lines are assembled here before they reach `tracing`.
static LOG_LINE: Mutex<(String, u32)> = Mutex::new((String::new(), 0));

unsafe extern "C" fn log_to_tracing(
    level: sys::ggml_log_level,
    text: *const c_char,
    _: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    let text = CStr::from_ptr(text).to_string_lossy();
    // Never unwind into C: a panicking subscriber loses the line, nothing more.
    let _ = std::panic::catch_unwind(|| {
        let Ok(mut line) = LOG_LINE.lock() else {
            return;
        };
        if level != sys::GGML_LOG_LEVEL_CONT {
            line.1 = level;
        }
        line.0.push_str(&text);
        while let Some(end) = line.0.find('\n') {
            let msg: String = line.0.drain(..=end).collect();
            emit(line.1, msg.trim_end());
        }
    });
}

fn emit(level: u32, msg: &str) {
    if msg.is_empty() {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "llama.cpp", "{msg}"),
        sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama.cpp", "{msg}"),
        sys::GGML_LOG_LEVEL_INFO => tracing::info!(target: "llama.cpp", "{msg}"),
        _ => tracing::debug!(target: "llama.cpp", "{msg}"),
    }
}
