//! LoRA adapters as PEFT makes them: the configuration under `LoraConfig`'s field names (the run
//! config's `peft` table or an `adapter_config.json`), which of the model's linear modules a
//! configuration adapts (PEFT's `target_modules` rules), the adapters' tensors in the engine (one
//! `lora_A` / `lora_B` pair per transformers module, also inside the engine's fused maps), and
//! the adapter folder (`adapter_config.json`, `adapter_model.safetensors` under PEFT's key names).

use std::collections::BTreeMap;
use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::config::Arch;
use super::layout::{HfPart, Init, ParamSpec};
use super::Model;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::{LoraDims, LoraPart, MAX_LORA_PARTS};

/// The engine's linear maps of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Qkv,
    O,
    Fc,
    Proj,
}

/// One transformers linear module and where it sits in the engine: layer, map, and its rows of
/// the map's output.
#[derive(Clone, Debug)]
pub struct LinearModule {
    pub name: String,
    pub layer: usize,
    pub unit: Unit,
    pub off: usize,
    pub rows: usize,
    pub in_features: usize,
}

/// `init_lora_weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: A kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B zero.
    Default,
    /// `"gaussian"`: A normal with std 1/r, B zero.
    Gaussian,
    /// `false`: both as `nn.Linear` initialises them (an adapter that changes the model).
    Random,
}

/// Which modules to adapt (`target_modules`).
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Names: a module matches one equal to its name or to a `.`-suffix of it.
    List(Vec<String>),
    /// A regular expression that must match the whole name.
    Regex(String),
    /// `"all-linear"`: every linear module but the output head.
    AllLinear,
}

/// An adapter's tensors as read from its file: PEFT key -> (shape, values).
pub type AdapterTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// `LoraConfig`, the fields this build implements.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub targets: Targets,
    /// `none`, `all` or `lora_only`.
    pub bias: String,
    pub use_rslora: bool,
    pub modules_to_save: Vec<String>,
    pub init: LoraInit,
    pub layers_to_transform: Option<Vec<usize>>,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub use_dora: bool,
}

/// `LoraConfig` fields accepted with any value (bookkeeping), and fields of features this build
/// does not implement, accepted only at their default (given as the accepted values).
const BOOKKEEPING: &[&str] = &[
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
    "runtime_config",
    "fan_in_fan_out",
];
const DEFAULT_ONLY: &[&str] = &[
    "layers_pattern",
    "exclude_modules",
    "lora_bias",
    "use_qalora",
    "layer_replication",
    "loftq_config",
    "megatron_config",
    "eva_config",
    "corda_config",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "ensure_weight_tying",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "use_bdlora",
    "velora_config",
];
const IMPLEMENTED: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
];

fn is_default(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl LoraConfig {
    /// Parses a `LoraConfig` (the run config's `peft` table, or an `adapter_config.json`);
    /// `source` names it in errors.
    pub fn from_map(map: &Map<String, Value>, source: &str) -> Result<Self> {
        let bad = |msg: String| Error::Invalid(format!("{source}: {msg}"));
        match map.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => return Err(bad(format!("peft_type `{other}` is not supported (supported: LORA)"))),
            None if map.contains_key("peft_type") => return Err(bad("peft_type must be a string".into())),
            None => {}
        }
        for (k, v) in map {
            if IMPLEMENTED.contains(&k.as_str()) || BOOKKEEPING.contains(&k.as_str()) {
                continue;
            }
            if DEFAULT_ONLY.contains(&k.as_str()) {
                if !is_default(v) {
                    return Err(bad(format!("`{k}` = {v} is a LoraConfig feature this build does not implement")));
                }
                continue;
            }
            let mut known: Vec<&str> = IMPLEMENTED.iter().chain(BOOKKEEPING).chain(DEFAULT_ONLY).copied().collect();
            known.sort_unstable();
            return Err(bad(format!("unknown LoraConfig field `{k}` (known: {})", known.join(", "))));
        }
        let uint = |k: &str, d: usize| -> Result<usize> {
            match map.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(v) => v.as_u64().filter(|&x| x >= 1).map(|x| x as usize).ok_or_else(|| bad(format!("`{k}` must be a positive integer, found {v}"))),
            }
        };
        let float = |k: &str, d: f64| -> Result<f64> {
            match map.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| bad(format!("`{k}` must be a number, found {v}"))),
            }
        };
        let flag = |k: &str| -> Result<bool> {
            match map.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(v) => v.as_bool().ok_or_else(|| bad(format!("`{k}` must be true or false, found {v}"))),
            }
        };
        let r = uint("r", 8)?;
        let lora_alpha = float("lora_alpha", 8.0)?;
        let lora_dropout = float("lora_dropout", 0.0)?;
        if !(0.0..1.0).contains(&lora_dropout) {
            return Err(bad(format!("lora_dropout must lie in [0, 1), found {lora_dropout}")));
        }
        let targets = match map.get("target_modules") {
            None | Some(Value::Null) => Targets::List(Vec::new()),
            Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(Value::String(s)) => {
                regex::Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| bad(format!("target_modules `{s}` is not a valid regular expression: {}", regex_error(&e))))?;
                Targets::Regex(s.clone())
            }
            Some(Value::Array(a)) => Targets::List(names(a).ok_or_else(|| bad("target_modules must be a list of names or a string".into()))?),
            Some(v) => return Err(bad(format!("target_modules must be a list of names or a string, found {v}"))),
        };
        let bias = map.get("bias").and_then(Value::as_str).unwrap_or("none").to_string();
        if !["none", "all", "lora_only"].contains(&bias.as_str()) {
            return Err(bad(format!("bias `{bias}`: expected none, all or lora_only")));
        }
        let modules_to_save = match map.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => names(a).ok_or_else(|| bad("modules_to_save must be a list of names".into()))?,
            Some(v) => return Err(bad(format!("modules_to_save must be a list of names, found {v}"))),
        };
        let init = match map.get("init_lora_weights") {
            None | Some(Value::Null) | Some(Value::Bool(true)) => LoraInit::Default,
            Some(Value::Bool(false)) => LoraInit::Random,
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            Some(v) => return Err(bad(format!("init_lora_weights {v} is not supported (supported: true, false, \"gaussian\")"))),
        };
        let layers_to_transform = match map.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(v) if v.is_u64() => Some(vec![v.as_u64().unwrap_or_default() as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("layers_to_transform must list layer indices".into()))?,
            ),
            Some(v) => return Err(bad(format!("layers_to_transform must be a layer index or a list of them, found {v}"))),
        };
        let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
            let Some(v) = map.get(k).filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
            let o = v.as_object().ok_or_else(|| bad(format!("`{k}` must be a table of pattern = value")))?;
            o.iter()
                .map(|(p, x)| {
                    regex::Regex::new(&format!("^(?:.*\\.)?(?:{p})$"))
                        .map_err(|e| bad(format!("{k}: `{p}` is not a valid regular expression: {}", regex_error(&e))))?;
                    x.as_f64()
                        .filter(|x| x.is_finite() && *x > 0.0)
                        .map(|x| (p.clone(), x))
                        .ok_or_else(|| bad(format!("{k}: `{p}` = {x} is not a positive number")))
                })
                .collect()
        };
        let rank_pattern = pattern("rank_pattern")?.into_iter().map(|(p, x)| (p, x as usize)).collect::<Vec<_>>();
        if let Some((p, _)) = rank_pattern.iter().find(|(_, r)| *r == 0) {
            return Err(bad(format!("rank_pattern: `{p}` must be a positive integer")));
        }
        Ok(LoraConfig {
            r,
            lora_alpha,
            lora_dropout,
            targets,
            bias,
            use_rslora: flag("use_rslora")?,
            modules_to_save,
            init,
            layers_to_transform,
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern")?,
            use_dora: flag("use_dora")?,
        })
    }

    /// The rank and the scale of the adapter of module `name` (`rank_pattern` / `alpha_pattern`
    /// as PEFT matches them: the first pattern that matches the end of the name at a `.`).
    pub fn rank_and_scale(&self, name: &str) -> (usize, f32) {
        let find = |pats: &[(String, f64)]| {
            pats.iter().find(|(p, _)| regex::Regex::new(&format!("^(?:.*\\.)?(?:{p})$")).is_ok_and(|re| re.is_match(name))).map(|x| x.1)
        };
        let ranks: Vec<(String, f64)> = self.rank_pattern.iter().map(|(p, r)| (p.clone(), *r as f64)).collect();
        let r = find(&ranks).map_or(self.r, |r| r as usize);
        let alpha = find(&self.alpha_pattern).unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, scale as f32)
    }

    /// `adapter_config.json` as PEFT writes it.
    pub fn to_json(&self, arch: Arch, base: Option<&Path>, targets: &[String]) -> Value {
        let pattern = |v: Vec<(String, Value)>| Value::Object(v.into_iter().collect());
        json!({
            "alpha_pattern": pattern(self.alpha_pattern.iter().map(|(p, a)| (p.clone(), json!(a))).collect()),
            "auto_mapping": null,
            "base_model_name_or_path": base.map(|p| p.display().to_string()),
            "bias": self.bias,
            "fan_in_fan_out": arch == Arch::Gpt2,
            "inference_mode": true,
            "init_lora_weights": match self.init { LoraInit::Default => json!(true), LoraInit::Gaussian => json!("gaussian"), LoraInit::Random => json!(false) },
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": pattern(self.rank_pattern.iter().map(|(p, r)| (p.clone(), json!(r))).collect()),
            "revision": null,
            "target_modules": match &self.targets { Targets::Regex(s) => json!(s), _ => json!(targets) },
            "task_type": "CAUSAL_LM",
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        })
    }
}

fn names(a: &[Value]) -> Option<Vec<String>> {
    a.iter().map(|x| x.as_str().map(str::to_string)).collect()
}

/// PEFT's default targets for a model type (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
fn default_targets(arch: Arch) -> Vec<String> {
    match arch {
        Arch::Gpt2 => vec!["c_attn".into()],
        Arch::Llama => vec!["q_proj".into(), "v_proj".into()],
    }
}

/// Whether `name` is `target` or ends with `.target`.
fn suffix_match(name: &str, target: &str) -> bool {
    name == target || name.ends_with(&format!(".{target}"))
}

/// The adapters of a model: the configuration and, per layer and map, the adapted parts.
#[derive(Clone, Debug)]
pub struct LoraState {
    pub config: LoraConfig,
    /// The adapted modules' names, in layout order (what `target_modules` became).
    pub modules: Vec<String>,
    /// `[layer][unit]`: the adapters of that map.
    pub parts: Vec<[[Option<LoraPart>; MAX_LORA_PARTS]; 4]>,
    /// The parameters `modules_to_save` trains, saved with the adapter.
    pub saved_modules: Vec<usize>,
}

impl LoraState {
    /// The adapters of layer `l`'s map `unit`.
    pub fn of(&self, l: usize, unit: Unit) -> [Option<LoraPart>; MAX_LORA_PARTS] {
        self.parts[l][unit as usize]
    }
}

impl<B: Backend> Model<B> {
    /// Every linear module of the blocks, as transformers names them, in layout order.
    pub fn linear_modules(&self) -> Vec<LinearModule> {
        let c = &self.config;
        let mut out = Vec::new();
        for (l, lp) in self.layout.layers.iter().enumerate() {
            let units = [
                (Unit::Qkv, lp.qkv_w, c.hidden_size),
                (Unit::O, lp.o_w, c.n_head * c.head_dim),
                (Unit::Fc, lp.fc_w, c.hidden_size),
                (Unit::Proj, lp.proj_w, c.intermediate_size),
            ];
            for (unit, w, in_features) in units {
                let spec = &self.layout.specs[w];
                let mut off = 0;
                for part in &spec.parts {
                    let rows = if spec.conv1d { part.shape[1] } else { part.shape[0] };
                    let name = part.name.strip_suffix(".weight").unwrap_or(&part.name).to_string();
                    out.push(LinearModule { name, layer: l, unit, off, rows, in_features });
                    off += rows;
                }
            }
        }
        out
    }

    /// The modules `config` adapts. An error when a target matches nothing, names the output
    /// head, or matches a module that is not a linear map of a block.
    pub fn lora_targets(&self, config: &LoraConfig) -> Result<Vec<LinearModule>> {
        let all = self.linear_modules();
        let listing = || all.iter().map(|m| m.name.clone()).collect::<Vec<_>>().join(", ");
        let layer_ok = |m: &LinearModule| config.layers_to_transform.as_ref().is_none_or(|ls| ls.contains(&m.layer));
        let chosen: Vec<LinearModule> = match &config.targets {
            Targets::AllLinear => all.iter().filter(|m| layer_ok(m)).cloned().collect(),
            Targets::Regex(s) => {
                let re = regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| Error::Invalid(format!("target_modules: {}", regex_error(&e))))?;
                if re.is_match("lm_head") {
                    return Err(Error::Unsupported("LoRA on lm_head is not supported; train it fully with modules_to_save = [\"lm_head\"]".into()));
                }
                let m: Vec<_> = all.iter().filter(|m| re.is_match(&m.name) && layer_ok(m)).cloned().collect();
                if m.is_empty() {
                    return Err(Error::Invalid(format!("target_modules `{s}` matches none of the model's linear modules: {}", listing())));
                }
                m
            }
            Targets::List(list) => {
                let list = if list.is_empty() { default_targets(self.config.arch) } else { list.clone() };
                for t in &list {
                    if t == "lm_head" {
                        return Err(Error::Unsupported("LoRA on lm_head is not supported; train it fully with modules_to_save = [\"lm_head\"]".into()));
                    }
                    if !all.iter().any(|m| suffix_match(&m.name, t)) {
                        return Err(Error::Invalid(format!("target_modules: `{t}` matches none of the model's linear modules: {}", listing())));
                    }
                }
                all.iter().filter(|m| list.iter().any(|t| suffix_match(&m.name, t)) && layer_ok(m)).cloned().collect()
            }
        };
        if chosen.is_empty() {
            return Err(Error::Invalid(format!("layers_to_transform leaves no module to adapt (the model has {} layers)", self.config.n_layer)));
        }
        Ok(chosen)
    }

    /// The parameters `modules_to_save` names: whole tensors (the output head, an embedding, a
    /// norm, an unfused linear), matched as target names are.
    fn modules_to_save(&self, config: &LoraConfig) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for name in &config.modules_to_save {
            if name == "lm_head" && self.layout.lm_head.is_none() {
                return Err(Error::Unsupported("modules_to_save lm_head: the output head is tied to the input embedding in this model".into()));
            }
            let mut found = false;
            for (i, spec) in self.layout.specs.iter().enumerate().filter(|(_, s)| !s.adapter) {
                let matched = spec.parts.iter().filter(|p| suffix_match(module_of(&p.name), name)).count();
                if matched == 0 {
                    continue;
                }
                if matched < spec.parts.len() {
                    return Err(Error::Unsupported(format!("modules_to_save `{name}`: it is fused with other modules in the engine ({})", spec.name)));
                }
                found = true;
                out.push(i);
            }
            if !found {
                return Err(Error::Invalid(format!("modules_to_save: `{name}` matches no module of the model")));
            }
        }
        Ok(out)
    }

    /// Adds LoRA adapters as `config` asks: the adapter tensors (`tensors`, by PEFT key, or
    /// initialised with `seed`), every base parameter frozen but the biases `bias` names and
    /// `modules_to_save`. A model holds one adapter.
    pub fn add_lora(&mut self, config: LoraConfig, mut tensors: Option<AdapterTensors>, seed: u64) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::Invalid("the model already has a LoRA adapter".into()));
        }
        let targets = self.lora_targets(&config)?;
        let saved_modules = self.modules_to_save(&config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut parts = vec![[[None; MAX_LORA_PARTS]; 4]; self.config.n_layer];
        for m in &targets {
            let (r, scale) = config.rank_and_scale(&m.name);
            if !scale.is_finite() {
                return Err(Error::Invalid(format!("{}: lora_alpha over r (rank {r}) is beyond the range of a 32-bit float", m.name)));
            }
            let key = |suffix: &str| format!("base_model.model.{}.{suffix}", m.name);
            // the shape itself, not only the count: a transposed lora_A would merge silently wrong
            let given = |tensors: &mut Option<AdapterTensors>, suffix: &str, shape: &[usize]| -> Result<Option<Vec<f32>>> {
                let key = key(suffix);
                match tensors.as_mut().map(|t| t.remove(&key)) {
                    Some(Some((s, v))) if s == shape => Ok(Some(v)),
                    Some(Some((s, _))) => Err(Error::Invalid(format!("adapter tensor `{key}` has shape {s:?}; the base model's {} needs {shape:?}", m.name))),
                    Some(None) => Err(Error::Invalid(format!("the adapter has no tensor `{key}`"))),
                    None => Ok(None),
                }
            };
            let (shape_a, shape_b) = (vec![r, m.in_features], vec![m.rows, r]);
            let (bound_a, bound_b) = (1.0 / (m.in_features as f32).sqrt(), 1.0 / (r as f32).sqrt());
            let gaussian = rand_distr::Normal::new(0.0f32, 1.0 / r as f32).map_err(|e| Error::Invalid(e.to_string()))?;
            let values_a = match given(&mut tensors, "lora_A.weight", &shape_a)? {
                Some(v) => v,
                None if config.init == LoraInit::Gaussian => (0..r * m.in_features).map(|_| rand_distr::Distribution::sample(&gaussian, &mut rng)).collect(),
                None => (0..r * m.in_features).map(|_| rng.random_range(-bound_a..bound_a)).collect(),
            };
            let a = self.push_adapter_tensor(key("lora_A.weight"), shape_a, &values_a)?;
            let values_b = match given(&mut tensors, "lora_B.weight", &shape_b)? {
                Some(v) => v,
                None if config.init == LoraInit::Random => (0..m.rows * r).map(|_| rng.random_range(-bound_b..bound_b)).collect(),
                None => vec![0.0; m.rows * r],
            };
            let b = self.push_adapter_tensor(key("lora_B.weight"), shape_b, &values_b)?;
            // DoRA's magnitude starts at the adapted weight's row norms, as PEFT's `dora_init`
            let mag = if config.use_dora {
                let values = match given(&mut tensors, "lora_magnitude_vector", &[m.rows])? {
                    Some(v) => v,
                    None => {
                        let w = self.block_linear(m.layer, m.unit).w;
                        let mut n = self.backend.zeros(m.rows)?;
                        self.backend.dora_norm(&mut n, &self.params[w], &self.params[a], &self.params[b], m.off, m.rows, m.in_features, r, scale);
                        self.backend.download(&n)?
                    }
                };
                Some(self.push_adapter_tensor(key("lora_magnitude_vector"), vec![m.rows], &values)?)
            } else {
                None
            };
            let slot =
                parts[m.layer][m.unit as usize].iter_mut().find(|p| p.is_none()).ok_or_else(|| Error::Invalid(format!("too many adapters on {}", m.name)))?;
            *slot = Some(LoraPart { a, b, r, off: m.off, cols: m.rows, scale, dropout: config.lora_dropout as f32, mag });
        }
        // the base freezes; biases and modules_to_save as asked
        let base = self.layout.specs.iter().take_while(|s| !s.adapter).count();
        let adapted: Vec<usize> = targets.iter().filter_map(|m| self.block_linear(m.layer, m.unit).b).collect();
        for i in 0..base {
            let is_bias = self.layout.specs[i].name.ends_with(".bias") || self.layout.specs[i].parts.iter().all(|p| p.name.ends_with(".bias"));
            self.trainable[i] = saved_modules.contains(&i) || (is_bias && (config.bias == "all" || (config.bias == "lora_only" && adapted.contains(&i))));
        }
        if config.bias == "lora_only" {
            for m in &targets {
                let lin = self.block_linear(m.layer, m.unit);
                if lin.b.is_some() && self.layout.specs[lin.w].parts.len() > parts[m.layer][m.unit as usize].iter().flatten().count() {
                    return Err(Error::Unsupported(format!("bias lora_only: the bias of {} is fused with modules that are not adapted", m.name)));
                }
            }
        }
        if let Some(rest) = tensors.as_ref().and_then(|t| t.keys().next()) {
            return Err(Error::Invalid(format!("the adapter tensor `{rest}` names no module this configuration adapts")));
        }
        let modules = targets.iter().map(|m| m.name.clone()).collect();
        self.lora = Some(LoraState { config, modules, parts, saved_modules });
        Ok(())
    }

    /// An adapter tensor (trainable, stored after the base's parameters); its index.
    fn push_adapter_tensor(&mut self, key: String, shape: Vec<usize>, values: &[f32]) -> Result<usize> {
        let spec = ParamSpec {
            name: key.clone(),
            shape: shape.clone(),
            parts: vec![HfPart { name: key, shape }],
            conv1d: false,
            decay: true,
            init: Init::Zeros,
            adapter: true,
        };
        self.params.push(self.backend.upload(values)?);
        self.layout.specs.push(spec);
        self.trainable.push(true);
        Ok(self.layout.specs.len() - 1)
    }

    /// The sizes of the adapters' scratch (all 0 without adapters).
    pub fn lora_dims(&self) -> LoraDims {
        let Some(state) = &self.lora else { return LoraDims::default() };
        let c = &self.config;
        let mut d = LoraDims { dora: state.config.use_dora, ..LoraDims::default() };
        for (l, layer) in state.parts.iter().enumerate() {
            for (u, unit) in layer.iter().enumerate() {
                let inp = [c.hidden_size, c.n_head * c.head_dim, c.hidden_size, c.intermediate_size][u];
                let out = self.block_linear(l, [Unit::Qkv, Unit::O, Unit::Fc, Unit::Proj][u]).out_features;
                for p in unit.iter().flatten() {
                    d = LoraDims { r: d.r.max(p.r), cols: d.cols.max(p.cols), inp: d.inp.max(inp), out: d.out.max(out), ..d };
                }
                if unit.iter().any(Option::is_some) {
                    d = d.merging(inp, out);
                }
            }
        }
        d
    }
}

/// A tensor name's module: the name without its last component (`.weight`, `.bias`).
pub(super) fn module_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(m, _)| m)
}

/// A regular expression's error in one line (its own message draws the pattern under a caret):
/// the last line, which says what is wrong.
fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("invalid").trim_start_matches("error: ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: Value) -> Result<LoraConfig> {
        LoraConfig::from_map(v.as_object().unwrap(), "peft")
    }

    #[test]
    fn peft_fields_parse_and_unknown_ones_are_named() {
        let c = cfg(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers\\.1\\..*": 4}})).unwrap();
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.q_proj"), (4, 4.0));
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.v_proj"), (2, 8.0));
        assert_eq!(c.rank_and_scale("model.layers.1.self_attn.q_proj"), (4, 1.0));
        let rs = cfg(json!({"r": 16, "lora_alpha": 8, "use_rslora": true})).unwrap();
        assert_eq!(rs.rank_and_scale("x").1, 2.0);
        let e = cfg(json!({"r": 4, "lora_alhpa": 8})).unwrap_err().to_string();
        assert!(e.contains("unknown LoraConfig field `lora_alhpa`") && e.contains("lora_alpha"), "{e}");
        let e = cfg(json!({"peft_type": "IA3"})).unwrap_err().to_string();
        assert!(e.contains("peft_type `IA3`"), "{e}");
        let e = cfg(json!({"loftq_config": {"loftq_bits": 4}})).unwrap_err().to_string();
        assert!(e.contains("loftq_config"), "{e}");
        assert!(cfg(json!({"loftq_config": {}, "megatron_core": "megatron.core", "task_type": "CAUSAL_LM"})).is_ok());
        assert!(cfg(json!({"init_lora_weights": "pissa"})).unwrap_err().to_string().contains("pissa"));
        assert_eq!(cfg(json!({"target_modules": "all-linear"})).unwrap().targets, Targets::AllLinear);
    }
}
