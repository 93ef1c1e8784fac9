//! The plugin host: WebAssembly components (the Component Model) that implement the WIT package
//! `trainer:plugin` in `plugin-sdk/wit/`, run by wasmtime in a sandbox.
//!
//! - One instance per plugin, with WASI but no files, network, environment or arguments; its
//!   stdout/stderr go into the runtime's log. Host imports: `log`, `decode`, `option`.
//! - A memory cap per instance and a time cap per call (epoch interruption). A trap, timeout,
//!   memory-cap hit or invalid result becomes one error naming the plugin, the hook and the
//!   reason; the failed instance is dropped and a fresh one is made for the next call, so the
//!   host's own state is never touched.
//! - Compiled components are cached by content hash and engine (see [`cache`]).

pub mod cache;
mod capture;
pub mod hooks;
pub mod roles;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::error::{Error, Result};
use crate::protocol::TokenDecoder;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugin-sdk/wit/0.1.0",
        world: "plugin",
    });
}

pub use bindings::exports::trainer::plugin::callbacks::{Event as WitEvent, Response, TrainerControl as WitControl, TrainerState as WitState};
pub use bindings::exports::trainer::plugin::loss::{LossOutput, Statistics, TokenBatch};
pub use bindings::exports::trainer::plugin::loss_logits::{ChunkOutput, LogitsChunk};
pub use bindings::exports::trainer::plugin::metrics::{EvalBatch, PredictionKind};
pub use bindings::exports::trainer::plugin::padding::{Example as PadExample, PadOptions as WitPadOptions, Padded, Side};
pub use bindings::trainer::plugin::types::{Column, Hook, LogLevel, Metric, PluginInfo};

/// The WIT package this host implements.
pub const PACKAGE: &str = "trainer:plugin";
/// The interface versions this host supports.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.1.0"];

/// How often the epoch ticks; the time cap is counted in ticks.
const TICK: Duration = Duration::from_millis(5);

/// Limits for one plugin instance.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Linear memory the instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Wall-clock time one hook call may take.
    pub call_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory_bytes: 512 << 20, call_timeout: Duration::from_secs(30) }
    }
}

/// What a run does when a plugin fails (a trap, a timeout, a cap, an invalid result, a reported
/// error): `stop` (the default) ends the run with the error; `continue` logs it, gets a fresh
/// instance for the next call, and goes on without that call's result (a loss plugin's step is
/// skipped, a metrics plugin's results are left out of that evaluation, a callback's answer is
/// ignored, a padding plugin's batch is padded by the runtime).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    #[default]
    Stop,
    Continue,
}

/// A plugin as the run config names it: `[[plugins]] path = "focal.wasm"`, with its options,
/// optional limits (`memory_limit_mb`, `call_timeout_s`) and failure policy (`on_error`).
#[derive(Clone, Debug, Default)]
pub struct PluginSpec {
    pub path: PathBuf,
    pub options: BTreeMap<String, String>,
    pub limits: Limits,
    pub on_error: OnError,
}

impl PluginSpec {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        PluginSpec { path: path.into(), ..Default::default() }
    }

    /// One entry of `plugins` in the run config: a path, or a table with `path`, `options`,
    /// `memory_limit_mb` and `call_timeout_s`.
    pub fn from_value(v: &serde_json::Value) -> Result<Self> {
        use serde_json::Value;
        let bad = |msg: String| Error::Invalid(format!("plugins: {msg}"));
        match v {
            Value::String(s) => Ok(PluginSpec::new(s)),
            Value::Object(m) => {
                let mut spec = PluginSpec::default();
                for (k, val) in m {
                    match k.as_str() {
                        "path" => spec.path = PathBuf::from(val.as_str().ok_or_else(|| bad(format!("`path` must be a string, found {val}")))?),
                        "options" => {
                            let opts = val.as_object().ok_or_else(|| bad(format!("`options` must be a table, found {val}")))?;
                            for (ok, ov) in opts {
                                let s = match ov {
                                    Value::String(s) => s.clone(),
                                    Value::Number(_) | Value::Bool(_) => ov.to_string(),
                                    _ => return Err(bad(format!("option `{ok}` must be a string, number or boolean, found {ov}"))),
                                };
                                spec.options.insert(ok.clone(), s);
                            }
                        }
                        "memory_limit_mb" => {
                            let mb =
                                val.as_u64().filter(|&x| x > 0).ok_or_else(|| bad(format!("`memory_limit_mb` must be a positive integer, found {val}")))?;
                            spec.limits.memory_bytes = (mb as usize) << 20;
                        }
                        "call_timeout_s" => {
                            let s = val.as_f64().filter(|&x| x > 0.0).ok_or_else(|| bad(format!("`call_timeout_s` must be a positive number, found {val}")))?;
                            spec.limits.call_timeout = Duration::from_secs_f64(s);
                        }
                        "on_error" => {
                            spec.on_error = match val.as_str() {
                                Some("stop") => OnError::Stop,
                                Some("continue") => OnError::Continue,
                                _ => return Err(bad(format!("`on_error` must be \"stop\" or \"continue\", found {val}"))),
                            }
                        }
                        other => {
                            return Err(bad(format!("unknown key `{other}` (known: path, options, memory_limit_mb, call_timeout_s, on_error)")));
                        }
                    }
                }
                if spec.path.as_os_str().is_empty() {
                    return Err(bad("an entry has no `path`".into()));
                }
                Ok(spec)
            }
            _ => Err(bad(format!("each entry must be a path or a table with `path`, found {v}"))),
        }
    }
}

/// The process-wide engine: Component Model on, epoch interruption on, with a thread that
/// advances the epoch every [`TICK`].
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        let engine = Engine::new(&config).expect("the plugin engine's configuration is valid");
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                ticker.increment_epoch();
            })
            .expect("spawning the plugin epoch thread");
        engine
    })
}

/// Raised by the limiter when an instance asks for more memory than its cap.
#[derive(Debug)]
struct MemoryCapHit {
    desired: usize,
    cap: usize,
}

impl std::fmt::Display for MemoryCapHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exceeded its memory cap of {} MiB (asked for {} MiB)", self.cap >> 20, self.desired >> 20)
    }
}

impl std::error::Error for MemoryCapHit {}

struct Limiter {
    memory_bytes: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            return Err(wasmtime::Error::new(MemoryCapHit { desired, cap: self.memory_bytes }));
        }
        Ok(true)
    }
    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// What a plugin's instance holds: its WASI context (nothing granted), its limits, its options
/// and the run's tokenizer.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    name: Arc<str>,
    options: Arc<BTreeMap<String, String>>,
    tokenizer: Option<Arc<dyn TokenDecoder>>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bindings::trainer::plugin::types::Host for HostState {}

impl bindings::trainer::plugin::host::Host for HostState {
    fn log(&mut self, level: LogLevel, message: String) {
        let mut message = message;
        if message.len() > 4096 {
            let mut cut = 4096;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [truncated]");
        }
        let name = &*self.name;
        match level {
            LogLevel::Trace => tracing::trace!(plugin = name, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin = name, "{message}"),
            LogLevel::Info => tracing::info!(plugin = name, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin = name, "{message}"),
            LogLevel::Error => tracing::error!(plugin = name, "{message}"),
        }
    }

    fn decode(&mut self, ids: Vec<u32>, skip_special_tokens: bool) -> std::result::Result<String, String> {
        match &self.tokenizer {
            Some(t) => t.decode(&ids, skip_special_tokens).map_err(|e| e.to_string()),
            None => Err("this run has no tokenizer to decode with (for `runtime plugin check`, pass --tokenizer DIR: a model or tokenizer folder)".into()),
        }
    }

    fn option(&mut self, key: String) -> Option<String> {
        self.options.get(&key).cloned()
    }
}

impl EvalBatch {
    /// An evaluation batch of argmax predictions and label log-probabilities (from
    /// the backend's `token_stats`) aligned with the shifted `labels`, `[rows, seq]`.
    pub fn argmax(rows: usize, seq: usize, labels: Vec<i32>, stats: crate::protocol::TokenStats, inputs: Option<Vec<u32>>, pad_token_id: Option<u32>) -> Self {
        EvalBatch {
            kind: PredictionKind::Argmax,
            batch_size: rows as u32,
            label_len: seq as u32,
            labels,
            prediction_len: seq as u32,
            predictions: stats.argmax,
            label_logprob: stats.label_logprob,
            inputs,
            input_len: seq as u32,
            pad_token_id,
        }
    }
}

/// What `runtime plugin inspect` shows.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub interface_versions: Vec<String>,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
}

/// The `trainer:plugin` versions a component was built for, its exports and imports, read from
/// its type without running it.
pub fn inspect_component(component: &Component) -> Inspection {
    let ty = component.component_type();
    let engine = engine();
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let mut versions: Vec<String> = exports
        .iter()
        .chain(&imports)
        .filter_map(|n| n.strip_prefix(PACKAGE).and_then(|r| r.strip_prefix('/')))
        .filter_map(|r| r.split_once('@').map(|(_, v)| v.to_string()))
        .collect();
    versions.sort();
    versions.dedup();
    Inspection { interface_versions: versions, exports, imports }
}

/// One loaded plugin: its compiled component, the pre-linked instance factory, and its live
/// instance.
pub struct Plugin {
    pub info: PluginInfo,
    pub path: PathBuf,
    spec: PluginSpec,
    pre: bindings::PluginPre<HostState>,
    name: Arc<str>,
    options: Arc<BTreeMap<String, String>>,
    tokenizer: Option<Arc<dyn TokenDecoder>>,
    store: Store<HostState>,
    instance: bindings::Plugin,
    /// The live instance failed; the next call makes a fresh one.
    poisoned: bool,
    output: capture::Captured,
    /// Compile (or cache load) and first instantiation, for reports.
    pub load_time: Duration,
    pub cache_hit: bool,
}

fn short(path: &Path) -> String {
    path.display().to_string()
}

/// The largest plugin file the runtime reads (a component is a few MiB).
const MAX_PLUGIN_BYTES: u64 = 256 << 20;

/// A plugin file's bytes, after checking that it is a regular file of a plausible size that
/// starts as WebAssembly does, before reading it whole (a FIFO, a folder or a 2 GB file of
/// anything gets one clear error instead of a hang or a read of all of it).
pub fn read_plugin_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Plugin(format!("{}: not a regular file (a plugin is a .wasm file)", short(path))));
    }
    if meta.len() > MAX_PLUGIN_BYTES {
        return Err(Error::Plugin(format!("{}: {} bytes; a plugin file is at most {MAX_PLUGIN_BYTES} bytes", short(path), meta.len())));
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || &magic != b"\0asm" {
        return Err(Error::Plugin(format!("{}: not a WebAssembly file (it does not start with `\\0asm`)", short(path))));
    }
    let mut bytes = magic.to_vec();
    f.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

impl Plugin {
    /// Loads, checks and instantiates a plugin, then asks it to `describe` itself.
    pub fn load(spec: &PluginSpec, tokenizer: Option<Arc<dyn TokenDecoder>>) -> Result<Self> {
        let t = Instant::now();
        let path = &spec.path;
        let bytes = read_plugin_file(path)?;
        let (component, cache_hit) =
            cache::compile(engine(), &bytes).map_err(|e| Error::Plugin(format!("{}: not a loadable WebAssembly component: {e:#}", short(path))))?;
        let ins = inspect_component(&component);
        if ins.interface_versions.is_empty() {
            return Err(Error::Plugin(format!(
                "{}: not a runtime plugin: it exports no `{PACKAGE}` interface (exports: {})",
                short(path),
                if ins.exports.is_empty() { "none".to_string() } else { ins.exports.join(", ") }
            )));
        }
        if let Some(v) = ins.interface_versions.iter().find(|v| !SUPPORTED_VERSIONS.contains(&v.as_str())) {
            return Err(Error::Plugin(format!(
                "{}: built for {PACKAGE}@{v}, which this runtime does not support; it supports {}",
                short(path),
                SUPPORTED_VERSIONS.iter().map(|s| format!("{PACKAGE}@{s}")).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut linker = Linker::<HostState>::new(engine());
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| Error::Plugin(format!("linking WASI: {e}")))?;
        bindings::Plugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| Error::Plugin(format!("linking the host interface: {e}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(bindings::PluginPre::new)
            .map_err(|e| Error::Plugin(format!("{}: does not fit the {PACKAGE} world: {e:#}", short(path))))?;
        let name: Arc<str> = path.file_stem().map_or("plugin".into(), |s| s.to_string_lossy().into());
        let options = Arc::new(spec.options.clone());
        let output = capture::Captured::default();
        let (store, instance) = Self::instantiate(&pre, spec, &name, &options, &tokenizer, &output)
            .map_err(|e| Error::Plugin(format!("{}: instantiation failed: {}", short(path), failure(&e, spec.limits, &output.take()))))?;
        let mut p = Plugin {
            info: PluginInfo { name: name.to_string(), version: String::new(), hooks: Vec::new() },
            path: path.clone(),
            spec: spec.clone(),
            pre,
            name,
            options,
            tokenizer,
            store,
            instance,
            poisoned: false,
            output,
            load_time: Duration::ZERO,
            cache_hit,
        };
        let info = p.call("describe", |i, s| i.trainer_plugin_info().call_describe(s))?;
        if info.name.is_empty() {
            return Err(p.invalid("describe", "the plugin's name is empty"));
        }
        p.name = info.name.as_str().into();
        p.store.data_mut().name = p.name.clone();
        p.info = info;
        p.load_time = t.elapsed();
        Ok(p)
    }

    fn instantiate(
        pre: &bindings::PluginPre<HostState>,
        spec: &PluginSpec,
        name: &Arc<str>,
        options: &Arc<BTreeMap<String, String>>,
        tokenizer: &Option<Arc<dyn TokenDecoder>>,
        output: &capture::Captured,
    ) -> wasmtime::Result<(Store<HostState>, bindings::Plugin)> {
        // no preopened directories, no environment, no arguments, no sockets, no stdin
        let wasi = WasiCtx::builder().stdout(output.clone()).stderr(output.clone()).allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false).build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter { memory_bytes: spec.limits.memory_bytes },
            name: name.clone(),
            options: options.clone(),
            tokenizer: tokenizer.clone(),
        };
        let mut store = Store::new(engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(spec.limits.call_timeout));
        let instance = pre.instantiate(&mut store)?;
        Ok((store, instance))
    }

    /// The plugin's name (from `describe`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the run goes on after this plugin fails (`on_error = "continue"`).
    pub fn continues(&self) -> bool {
        self.spec.on_error == OnError::Continue
    }

    pub fn has_hook(&self, hook: Hook) -> bool {
        self.info.hooks.contains(&hook)
    }

    /// An error about this plugin and hook.
    pub fn invalid(&self, hook: &str, reason: impl std::fmt::Display) -> Error {
        Error::Plugin(format!("plugin `{}` ({}), hook {hook}: {reason}", self.name, short(&self.path)))
    }

    /// Runs one call into the instance under the time cap; maps a trap, a timeout or a
    /// memory-cap hit into an error naming the plugin and hook, and marks the instance for
    /// replacement.
    fn call<R>(&mut self, hook: &str, f: impl FnOnce(&bindings::Plugin, &mut Store<HostState>) -> wasmtime::Result<R>) -> Result<R> {
        if self.poisoned {
            let (store, instance) = Self::instantiate(&self.pre, &self.spec, &self.name, &self.options, &self.tokenizer, &self.output)
                .map_err(|e| self.invalid(hook, format!("re-instantiation failed: {}", failure(&e, self.spec.limits, &self.output.take()))))?;
            (self.store, self.instance, self.poisoned) = (store, instance, false);
        }
        self.store.set_epoch_deadline(ticks(self.spec.limits.call_timeout));
        let r = f(&self.instance, &mut self.store);
        let out = self.output.take();
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(plugin = &*self.name, "{line}");
        }
        r.map_err(|e| {
            self.poisoned = true;
            self.invalid(hook, failure(&e, self.spec.limits, &out))
        })
    }

    /// A plugin-reported error (`Err(message)` from a hook).
    fn reported<R>(&self, hook: &str, r: std::result::Result<R, String>) -> Result<R> {
        r.map_err(|msg| self.invalid(hook, format!("the plugin reported an error: {msg}")))
    }
}

fn ticks(d: Duration) -> u64 {
    (d.as_nanos() / TICK.as_nanos()).max(1) as u64 + 1
}

/// Why a call failed, in words.
fn failure(e: &wasmtime::Error, limits: Limits, output: &str) -> String {
    if let Some(cap) = e.chain().find_map(|c| c.downcast_ref::<MemoryCapHit>()) {
        return cap.to_string();
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        if *trap == Trap::Interrupt {
            return format!("exceeded its time cap of {:.3} s per call", limits.call_timeout.as_secs_f64());
        }
        let tail: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(5)..].join(" | ");
        return if tail.is_empty() { format!("trapped: {trap}") } else { format!("trapped: {trap} (plugin output: {tail})") };
    }
    format!("failed: {e:#}")
}
