//! # runtime-plugin
//!
//! Write what a `transformers` user overrides in Python — `compute_loss`, `compute_metrics`,
//! the tokenizer's `_pad`, a `TrainerCallback` — as a WebAssembly component the runtime loads
//! with `--plugin FILE.wasm`.
//!
//! A plugin is one type that implements [`Plugin`] (its name and version) and the hook traits it
//! needs: [`Loss`], [`LossLogits`], [`Metrics`], [`Padding`], [`Callbacks`]. Every method has a
//! documented default. [`export!`] names the type and the hooks it implements; the runtime calls
//! only those:
//!
//! ```ignore
//! use runtime_plugin::{export, Plugin, Metrics, EvalBatch, Metric};
//!
//! #[derive(Default)]
//! struct Accuracy { correct: u64, total: u64 }
//!
//! impl Plugin for Accuracy {
//!     const NAME: &'static str = "accuracy";
//!     const VERSION: &'static str = "0.1.0";
//! }
//!
//! impl Metrics for Accuracy {
//!     fn reset(&mut self) { *self = Self::default() }
//!     fn update(&mut self, batch: EvalBatch) -> Result<(), String> {
//!         for (&label, &pred) in batch.labels.iter().zip(&batch.predictions) {
//!             if label != -100 {
//!                 self.total += 1;
//!                 self.correct += (label as u32 == pred) as u64;
//!             }
//!         }
//!         Ok(())
//!     }
//!     fn compute(&mut self) -> Result<Vec<Metric>, String> {
//!         Ok(vec![Metric { name: "accuracy".into(), value: self.correct as f64 / self.total.max(1) as f64 }])
//!     }
//! }
//!
//! export!(Accuracy: Metrics);
//! ```
//!
//! The plugin's value is created with `Default` when the component is instantiated and lives
//! as long as the instance. Build with `cargo build --release --target wasm32-wasip2`.
//!
//! The interface is the WIT package `trainer:plugin@0.1.0` in `wit/0.1.0/plugin.wit`; the
//! runtime refuses components built for a version it does not support.

extern crate self as runtime_plugin;

#[doc(hidden)]
pub use wit_bindgen;

/// The bindings generated from the WIT (the types are re-exported at the crate root).
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit/0.1.0",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "runtime_plugin::bindings",
        runtime_path: "runtime_plugin::wit_bindgen::rt",
        bitflags_path: "runtime_plugin::wit_bindgen::rt::bitflags",
        generate_all,
    });
}

pub use bindings::exports::trainer::plugin::callbacks::{Event, Response, TrainerControl, TrainerState};
pub use bindings::exports::trainer::plugin::loss::{LossOutput, Statistics, TokenBatch};
pub use bindings::exports::trainer::plugin::loss_logits::{ChunkOutput, LogitsChunk};
pub use bindings::exports::trainer::plugin::metrics::{EvalBatch, PredictionKind};
pub use bindings::exports::trainer::plugin::padding::{Example, PadOptions, Padded, Side};
pub use bindings::trainer::plugin::types::{Column, Hook, LogLevel, Metric, PluginInfo};

/// The version of the interface this SDK builds against.
pub const INTERFACE_VERSION: &str = "0.1.0";

/// The label of a position without loss (transformers' `-100`).
pub const IGNORE_INDEX: i32 = -100;

/// What the runtime offers a plugin: its log, its tokenizer and the plugin's options.
pub mod host {
    use crate::bindings::trainer::plugin::host as imp;
    pub use crate::LogLevel;

    /// Writes a line into the runtime's log, tagged with the plugin's name.
    pub fn log(level: LogLevel, message: &str) {
        imp::log(level, message)
    }
    pub fn info(message: &str) {
        imp::log(LogLevel::Info, message)
    }
    pub fn warn(message: &str) {
        imp::log(LogLevel::Warn, message)
    }
    /// Token ids to text with the run's tokenizer.
    pub fn decode(ids: &[u32], skip_special_tokens: bool) -> Result<String, String> {
        imp::decode(ids, skip_special_tokens)
    }
    /// This plugin's option `key` from the run config, as written there.
    pub fn option(key: &str) -> Option<String> {
        imp::option(key)
    }
    /// This plugin's option `key` as a number, `default` when it is not set.
    pub fn option_f64(key: &str, default: f64) -> Result<f64, String> {
        match imp::option(key) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| format!("option `{key}` must be a number, found `{v}`")),
        }
    }
}

/// Who the plugin is. `NAME` appears in every log line and error about the plugin.
pub trait Plugin: Default + 'static {
    const NAME: &'static str;
    const VERSION: &'static str;
}

/// `Trainer.compute_loss` from per-token statistics (see the WIT's `loss` interface).
pub trait Loss {
    /// The statistics `compute_loss` reads. Default: the label's log-probability only.
    fn statistics(&mut self) -> Statistics {
        Statistics::LABEL_LOGPROB
    }
    /// The micro-batch's loss and its gradient with respect to each statistic. Default: the
    /// built-in cross-entropy, `-sum(log p[y]) / num_items_in_batch`.
    fn compute_loss(&mut self, batch: TokenBatch) -> Result<LossOutput, String> {
        let n = batch.num_items_in_batch.max(1) as f32;
        let mut loss = 0.0f64;
        let mut d = vec![0.0f32; batch.labels.len()];
        for (i, &y) in batch.labels.iter().enumerate() {
            if y != IGNORE_INDEX {
                loss -= batch.label_logprob[i] as f64;
                d[i] = -1.0 / n;
            }
        }
        Ok(LossOutput { loss: (loss / n as f64) as f32, d_label_logprob: d, d_logsumexp: vec![], d_mean_logprob: vec![], d_entropy: vec![] })
    }
}

/// A loss over whole rows of logits (see the WIT's `loss-logits` interface).
pub trait LossLogits {
    /// One chunk's loss and `d loss / d logits`. Default: cross-entropy divided by
    /// `num_items_in_batch`.
    fn compute_chunk(&mut self, chunk: LogitsChunk) -> Result<ChunkOutput, String> {
        let v = chunk.vocab_size as usize;
        let n = chunk.num_items_in_batch.max(1) as f32;
        let mut loss = 0.0f64;
        let mut d = vec![0.0f32; chunk.logits.len()];
        for (r, &y) in chunk.labels.iter().enumerate() {
            let z = &chunk.logits[r * v..(r + 1) * v];
            let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let s: f32 = z.iter().map(|&x| (x - m).exp()).sum();
            let lse = m + s.ln();
            loss += (lse - z[y as usize]) as f64;
            for (g, &x) in d[r * v..(r + 1) * v].iter_mut().zip(z) {
                *g = (x - lse).exp() / n;
            }
            d[r * v + y as usize] -= 1.0 / n;
        }
        Ok(ChunkOutput { loss: (loss / n as f64) as f32, d_logits: d })
    }
}

/// `compute_metrics`, streaming (see the WIT's `metrics` interface).
pub trait Metrics {
    /// Before each evaluation. Default: nothing.
    fn reset(&mut self) {}
    /// Once per evaluation batch. Default: nothing.
    fn update(&mut self, _batch: EvalBatch) -> Result<(), String> {
        Ok(())
    }
    /// The evaluation's metrics; the runtime prefixes them with `eval_`. Default: none.
    fn compute(&mut self) -> Result<Vec<Metric>, String> {
        Ok(Vec::new())
    }
}

/// `tokenizer._pad` (see the WIT's `padding` interface).
pub trait Padding {
    /// Default: [`pad_default`], what the runtime does without a plugin.
    fn pad(&mut self, examples: Vec<Example>, options: PadOptions) -> Result<Padded, String> {
        pad_default(&examples, &options, false)
    }
}

/// `TrainerCallback` (see the WIT's `callbacks` interface).
pub trait Callbacks {
    /// Every event. Default: the control flags unchanged, no extra log entries.
    fn on_event(&mut self, _event: Event, _state: TrainerState, control: TrainerControl) -> Result<Response, String> {
        Ok(Response { control, logs: Vec::new() })
    }
    /// Bytes stored in checkpoints and handed to [`Callbacks::load_state`] on resume. Default:
    /// none.
    fn save_state(&mut self) -> Vec<u8> {
        Vec::new()
    }
    /// Default: ignores the bytes.
    fn load_state(&mut self, _state: Vec<u8>) -> Result<(), String> {
        Ok(())
    }
}

/// Pads to the longest example (or `max_length`, truncating), rounded up to
/// `pad_to_multiple_of`, on `options.side`; labels are padded with -100. With `position_ids`,
/// each row's positions count its real tokens from 0 (the padding gets 0), which is what a
/// left-padded batch needs.
pub fn pad_default(examples: &[Example], options: &PadOptions, position_ids: bool) -> Result<Padded, String> {
    let longest = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let mut len = options.max_length.map_or(longest, |m| longest.min(m as usize));
    if let Some(k) = options.pad_to_multiple_of.filter(|&k| k > 0) {
        len = len.div_ceil(k as usize) * k as usize;
    }
    let rows = examples.len();
    let mut out = Padded {
        batch_size: rows as u32,
        seq_len: len as u32,
        input_ids: vec![options.pad_token_id; rows * len],
        attention_mask: vec![0; rows * len],
        labels: vec![IGNORE_INDEX; rows * len],
        position_ids: position_ids.then(|| vec![0; rows * len]),
    };
    for (r, e) in examples.iter().enumerate() {
        if e.labels.len() != e.input_ids.len() {
            return Err(format!("example {r}: {} labels for {} input ids", e.labels.len(), e.input_ids.len()));
        }
        let n = e.input_ids.len().min(len);
        let start = match options.side {
            Side::Left => r * len + len - n,
            Side::Right => r * len,
        };
        out.input_ids[start..start + n].copy_from_slice(&e.input_ids[..n]);
        out.labels[start..start + n].copy_from_slice(&e.labels[..n]);
        out.attention_mask[start..start + n].fill(1);
        if let Some(p) = &mut out.position_ids {
            for (i, x) in p[start..start + n].iter_mut().enumerate() {
                *x = i as u32;
            }
        }
    }
    Ok(out)
}

/// Exports a plugin type and the hooks it implements:
/// `export!(MyPlugin: Loss, Metrics);`. The type implements [`Plugin`] and the named hook
/// traits; the other hooks get their defaults and are never called.
#[macro_export]
macro_rules! export {
    ($ty:ident : $($hook:ident),+ $(,)?) => {
        $crate::__default_loss!($ty; $($hook),+);
        $crate::__default_loss_logits!($ty; $($hook),+);
        $crate::__default_metrics!($ty; $($hook),+);
        $crate::__default_padding!($ty; $($hook),+);
        $crate::__default_callbacks!($ty; $($hook),+);

        const _: () = {
            use $crate::bindings::exports::trainer::plugin as __x;

            ::std::thread_local! {
                static __PLUGIN: ::core::cell::RefCell<$ty> = ::core::cell::RefCell::new(<$ty as ::core::default::Default>::default());
            }
            fn __with<R>(f: impl FnOnce(&mut $ty) -> R) -> R {
                __PLUGIN.with(|p| f(&mut p.borrow_mut()))
            }

            struct __Exports;

            impl __x::info::Guest for __Exports {
                fn describe() -> $crate::PluginInfo {
                    $crate::PluginInfo {
                        name: <$ty as $crate::Plugin>::NAME.into(),
                        version: <$ty as $crate::Plugin>::VERSION.into(),
                        hooks: ::std::vec![$($crate::Hook::$hook),+],
                    }
                }
            }
            impl __x::loss::Guest for __Exports {
                fn requested_statistics() -> $crate::Statistics {
                    __with(|p| <$ty as $crate::Loss>::statistics(p))
                }
                fn compute_loss(batch: $crate::TokenBatch) -> ::core::result::Result<$crate::LossOutput, ::std::string::String> {
                    __with(|p| <$ty as $crate::Loss>::compute_loss(p, batch))
                }
            }
            impl __x::loss_logits::Guest for __Exports {
                fn compute_chunk(chunk: $crate::LogitsChunk) -> ::core::result::Result<$crate::ChunkOutput, ::std::string::String> {
                    __with(|p| <$ty as $crate::LossLogits>::compute_chunk(p, chunk))
                }
            }
            impl __x::metrics::Guest for __Exports {
                fn reset() {
                    __with(|p| <$ty as $crate::Metrics>::reset(p))
                }
                fn update(batch: $crate::EvalBatch) -> ::core::result::Result<(), ::std::string::String> {
                    __with(|p| <$ty as $crate::Metrics>::update(p, batch))
                }
                fn compute() -> ::core::result::Result<::std::vec::Vec<$crate::Metric>, ::std::string::String> {
                    __with(|p| <$ty as $crate::Metrics>::compute(p))
                }
            }
            impl __x::padding::Guest for __Exports {
                fn pad(examples: ::std::vec::Vec<$crate::Example>, options: $crate::PadOptions) -> ::core::result::Result<$crate::Padded, ::std::string::String> {
                    __with(|p| <$ty as $crate::Padding>::pad(p, examples, options))
                }
            }
            impl __x::callbacks::Guest for __Exports {
                fn on_event(event: $crate::Event, state: $crate::TrainerState, control: $crate::TrainerControl) -> ::core::result::Result<$crate::Response, ::std::string::String> {
                    __with(|p| <$ty as $crate::Callbacks>::on_event(p, event, state, control))
                }
                fn save_state() -> ::std::vec::Vec<u8> {
                    __with(|p| <$ty as $crate::Callbacks>::save_state(p))
                }
                fn load_state(state: ::std::vec::Vec<u8>) -> ::core::result::Result<(), ::std::string::String> {
                    __with(|p| <$ty as $crate::Callbacks>::load_state(p, state))
                }
            }

            $crate::bindings::__export_world!(__Exports with_types_in $crate::bindings);
        };
    };
}

// One helper per hook: implements the hook's trait with its defaults unless the hook is listed.
#[doc(hidden)]
#[macro_export]
macro_rules! __default_loss {
    ($ty:ident;) => { impl $crate::Loss for $ty {} };
    ($ty:ident; Loss $(, $rest:ident)*) => {};
    ($ty:ident; $other:ident $(, $rest:ident)*) => { $crate::__default_loss!($ty; $($rest),*); };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __default_loss_logits {
    ($ty:ident;) => { impl $crate::LossLogits for $ty {} };
    ($ty:ident; LossLogits $(, $rest:ident)*) => {};
    ($ty:ident; $other:ident $(, $rest:ident)*) => { $crate::__default_loss_logits!($ty; $($rest),*); };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __default_metrics {
    ($ty:ident;) => { impl $crate::Metrics for $ty {} };
    ($ty:ident; Metrics $(, $rest:ident)*) => {};
    ($ty:ident; $other:ident $(, $rest:ident)*) => { $crate::__default_metrics!($ty; $($rest),*); };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __default_padding {
    ($ty:ident;) => { impl $crate::Padding for $ty {} };
    ($ty:ident; Padding $(, $rest:ident)*) => {};
    ($ty:ident; $other:ident $(, $rest:ident)*) => { $crate::__default_padding!($ty; $($rest),*); };
}
#[doc(hidden)]
#[macro_export]
macro_rules! __default_callbacks {
    ($ty:ident;) => { impl $crate::Callbacks for $ty {} };
    ($ty:ident; Callbacks $(, $rest:ident)*) => {};
    ($ty:ident; $other:ident $(, $rest:ident)*) => { $crate::__default_callbacks!($ty; $($rest),*); };
}
