//! The search space of `runtime hp-search`: one table per parameter under Optuna's names
//! (`type = "float"` with `low`, `high`, `log`, `step`; `type = "int"` with `low`, `high`, `step`,
//! `log`; `type = "categorical"` with `choices`), named by a `TrainingArguments` field or a dotted
//! path into the run config (`plugins.0.options.gamma`). And the three samplers: random, TPE
//! (the `tpe` crate: one estimator per parameter over the finished trials, as Optuna's
//! default, independent TPE) and grid.

use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::args::training::{closest_key, known_keys, read_config_file};
use crate::error::{Error, Result};

/// One parameter's distribution.
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    Float { low: f64, high: f64, log: bool, step: Option<f64> },
    Int { low: i64, high: i64, log: bool, step: i64 },
    Categorical { choices: Vec<Value> },
}

/// A parameter of the space.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// A `TrainingArguments` field, or a dotted path into the run config.
    pub name: String,
    pub dist: Distribution,
}

/// How the next trial's parameters are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    Tpe,
    Random,
    Grid,
}

impl SamplerKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tpe" => Ok(SamplerKind::Tpe),
            "random" => Ok(SamplerKind::Random),
            "grid" => Ok(SamplerKind::Grid),
            _ => Err(Error::Invalid(format!("--sampler `{s}`: expected tpe, random or grid"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Tpe => "tpe",
            SamplerKind::Random => "random",
            SamplerKind::Grid => "grid",
        }
    }
}

/// Reads a space file (TOML, JSON or YAML); an error names the file and the parameter.
pub fn read_space(path: &Path) -> Result<Vec<Param>> {
    let map = read_config_file(path)?;
    let mut params = Vec::new();
    collect(path, "", &map, &mut params)?;
    if params.is_empty() {
        return Err(Error::config(
            path,
            "the search space has no parameters (one table per parameter: [learning_rate] type = \"float\", low = 1e-5, high = 1e-3)",
        ));
    }
    Ok(params)
}

fn collect(path: &Path, prefix: &str, map: &Map<String, Value>, out: &mut Vec<Param>) -> Result<()> {
    for (key, v) in map {
        let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match v {
            Value::Object(t) if t.contains_key("type") => out.push(Param { dist: parse_dist(path, &name, t)?, name }),
            Value::Object(t) => collect(path, &name, t, out)?,
            _ => return Err(Error::config(path, format!("`{name}` is not a parameter table (give type = \"float\", \"int\" or \"categorical\")"))),
        }
    }
    Ok(())
}

fn parse_dist(path: &Path, name: &str, t: &Map<String, Value>) -> Result<Distribution> {
    let bad = |msg: String| Error::config(path, format!("parameter `{name}`: {msg}"));
    let kind = t["type"].as_str().ok_or_else(|| bad("`type` must be \"float\", \"int\" or \"categorical\"".into()))?;
    let allowed: &[&str] = match kind {
        "float" | "int" => &["type", "low", "high", "log", "step"],
        "categorical" => &["type", "choices"],
        other => return Err(bad(format!("unknown type `{other}` (expected float, int or categorical)"))),
    };
    if let Some(k) = t.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!("unknown key `{k}` for type {kind} (expected {})", allowed[1..].join(", "))));
    }
    let log = match t.get("log") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| bad("`log` must be true or false".into()))?,
    };
    let dist = match kind {
        "float" => {
            let num = |k: &str| t.get(k).and_then(Value::as_f64).ok_or_else(|| bad(format!("`{k}` must be a number")));
            let (low, high) = (num("low")?, num("high")?);
            let step = t.get("step").map(|_| num("step")).transpose()?;
            if low > high {
                return Err(bad(format!("low {low} is above high {high}")));
            }
            if log && low <= 0.0 {
                return Err(bad(format!("log = true needs low > 0, found {low}")));
            }
            if let Some(s) = step {
                if s.is_nan() || s <= 0.0 || log {
                    return Err(bad("`step` must be > 0, and cannot be combined with log = true".into()));
                }
            }
            Distribution::Float { low, high, log, step }
        }
        "int" => {
            let int = |k: &str| t.get(k).and_then(Value::as_i64).ok_or_else(|| bad(format!("`{k}` must be an integer")));
            let (low, high) = (int("low")?, int("high")?);
            let step = t.get("step").map(|_| int("step")).transpose()?.unwrap_or(1);
            if low > high {
                return Err(bad(format!("low {low} is above high {high}")));
            }
            if step < 1 || (log && step != 1) {
                return Err(bad("`step` must be >= 1, and 1 with log = true".into()));
            }
            if log && low < 1 {
                return Err(bad(format!("log = true needs low >= 1, found {low}")));
            }
            Distribution::Int { low, high, log, step }
        }
        _ => {
            let choices =
                t.get("choices").and_then(Value::as_array).filter(|c| !c.is_empty()).ok_or_else(|| bad("`choices` must be a non-empty list".into()))?;
            if let Some(c) = choices.iter().find(|c| c.is_object() || c.is_array()) {
                return Err(bad(format!("choice {c} is not a number, string, boolean or null")));
            }
            Distribution::Categorical { choices: choices.clone() }
        }
    };
    Ok(dist)
}

/// Checks that every parameter names a run setting: a `TrainingArguments` field (a typo names
/// the closest one), or a dotted path whose parent exists in `config` (so a plugin's options are
/// reached through `plugins.<index>.options.<name>`).
pub fn check_names(params: &[Param], config: &Map<String, Value>) -> Result<()> {
    let keys = known_keys();
    for p in params {
        let first = p.name.split('.').next().unwrap_or_default();
        if ["output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir"].contains(&first) {
            return Err(Error::Invalid(format!("search space: `{first}` is set by the search for each trial (run-N) and cannot be searched")));
        }
        if !keys.iter().any(|k| k == first) {
            let hint = closest_key(first).map(|k| format!(" (did you mean `{k}`?)")).unwrap_or_default();
            return Err(Error::Invalid(format!("search space: `{first}` is not a TrainingArguments field{hint}")));
        }
        if p.name.contains('.') {
            let mut probe = config.clone();
            set_path(&mut probe, &p.name, Value::Null).map_err(|e| Error::Invalid(format!("search space: `{}`: {e}", p.name)))?;
        }
    }
    Ok(())
}

/// Sets `value` at the dotted `path` of `map` (numbers index lists). The first name must be in
/// the map; a table on the way is made when missing (a plugin's `options`), and a plugin given as
/// a bare path string becomes `{ path = ... }` so that options can be set on it.
pub fn set_path(map: &mut Map<String, Value>, path: &str, value: Value) -> std::result::Result<(), String> {
    let parts: Vec<&str> = path.split('.').collect();
    let (first, rest) = parts.split_first().ok_or("empty name")?;
    if rest.is_empty() {
        map.insert((*first).to_string(), value);
        return Ok(());
    }
    let node = map.get_mut(*first).ok_or_else(|| format!("`{first}` is not in the run config"))?;
    set_in(node, rest, value, (*first).to_string())
}

fn set_in(node: &mut Value, parts: &[&str], value: Value, at: String) -> std::result::Result<(), String> {
    if let Value::String(s) = node {
        if at.strip_prefix("plugins.").is_some_and(|i| i.parse::<usize>().is_ok()) {
            *node = serde_json::json!({ "path": s.clone() });
        }
    }
    let Some((part, rest)) = parts.split_first() else { return Err("empty name".into()) };
    let child = match node {
        Value::Object(o) if rest.is_empty() => {
            o.insert((*part).to_string(), value);
            return Ok(());
        }
        Value::Object(o) => o.entry((*part).to_string()).or_insert_with(|| Value::Object(Map::new())),
        Value::Array(a) => {
            let slot = part.parse::<usize>().ok().and_then(|i| a.get_mut(i)).ok_or_else(|| format!("`{at}` has no element {part}"))?;
            if rest.is_empty() {
                *slot = value;
                return Ok(());
            }
            slot
        }
        _ => return Err(format!("`{at}` is not a table or a list")),
    };
    set_in(child, rest, value, format!("{at}.{part}"))
}

impl Param {
    /// The value for a point of the unit interval's transform: TPE and the random sampler work
    /// on `internal` values (the log for log scales, the index for categories).
    fn value_at(&self, x: f64) -> Value {
        match &self.dist {
            Distribution::Float { low, high, log, step } => {
                let v = if *log { x.exp() } else { x };
                let v = match step {
                    Some(s) => low + ((v - low) / s).round() * s,
                    None => v,
                };
                num(v.clamp(*low, *high))
            }
            Distribution::Int { low, high, log, step } => {
                let v = if *log { x.exp() } else { x };
                let k = ((v - *low as f64) / *step as f64).round() as i64;
                Value::from((low + k * step).clamp(*low, *high - (*high - *low) % step))
            }
            Distribution::Categorical { choices } => choices[(x.max(0.0) as usize).min(choices.len() - 1)].clone(),
        }
    }

    /// The internal value of a recorded value (None when it is not in the space).
    fn internal_of(&self, v: &Value) -> Option<f64> {
        match &self.dist {
            Distribution::Float { log, .. } | Distribution::Int { log, .. } => v.as_f64().map(|x| if *log { x.ln() } else { x }),
            Distribution::Categorical { choices } => choices.iter().position(|c| c == v).map(|i| i as f64),
        }
    }

    /// The internal interval: categories are indices, integers widened by half a step so each
    /// value has its share, logs for log scales.
    fn internal_range(&self) -> (f64, f64) {
        match &self.dist {
            Distribution::Float { low, high, log: true, .. } => (low.ln(), high.ln()),
            Distribution::Float { low, high, step: Some(s), .. } => (low - s / 2.0, high + s / 2.0),
            Distribution::Float { low, high, .. } => (*low, *high),
            Distribution::Int { low, high, log: true, .. } => ((*low as f64 - 0.5).max(0.5).ln(), (*high as f64 + 0.5).ln()),
            Distribution::Int { low, high, step, .. } => (*low as f64 - *step as f64 / 2.0, *high as f64 + *step as f64 / 2.0),
            Distribution::Categorical { choices } => (0.0, choices.len() as f64),
        }
    }

    fn random(&self, rng: &mut ChaCha8Rng) -> Value {
        let (lo, hi) = self.internal_range();
        let x = match &self.dist {
            Distribution::Categorical { choices } => rng.random_range(0..choices.len()) as f64,
            _ if hi > lo => rng.random_range(lo..hi),
            _ => lo,
        };
        self.value_at(x)
    }

    /// The grid's values: every category, every integer step, every float step (at most
    /// [`MAX_GRID_POINTS`], counted before they are built).
    fn grid_values(&self) -> Result<Vec<Value>> {
        let too_many = |n: f64| Error::Invalid(format!("--sampler grid: `{}` has {n:.3e} values; a grid holds at most {MAX_GRID_POINTS} points", self.name));
        Ok(match &self.dist {
            Distribution::Categorical { choices } => choices.clone(),
            Distribution::Int { low, high, step, .. } => {
                let n = (*high as i128 - *low as i128) / *step as i128 + 1;
                if n > MAX_GRID_POINTS as i128 {
                    return Err(too_many(n as f64));
                }
                (0..n).map(|k| Value::from((*low as i128 + k * *step as i128) as i64)).collect()
            }
            Distribution::Float { low, high, step: Some(s), .. } => {
                let n = (((high - low) / s) + 1e-9).floor() + 1.0;
                if n.is_nan() || n > MAX_GRID_POINTS as f64 {
                    return Err(too_many(n));
                }
                (0..n as i64).map(|k| num(low + k as f64 * s)).collect()
            }
            Distribution::Float { .. } => {
                return Err(Error::Invalid(format!("--sampler grid: `{}` is a continuous float; give it a step or choices", self.name)));
            }
        })
    }
}

fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// A finished trial, as the samplers see it: its parameters and the value to minimise (the
/// objective, negated when maximising; a pruned trial's last reported value).
pub struct Observation<'a> {
    pub params: &'a Map<String, Value>,
    pub value: f64,
}

/// The random stream of trial `number`'s parameter `index` in a study seeded `seed`: the same
/// on a rerun, whatever ran before.
fn rng_for(seed: u64, number: usize, index: usize) -> ChaCha8Rng {
    let mix = (number as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    ChaCha8Rng::seed_from_u64(seed ^ mix)
}

/// The most points a grid search may have (Optuna's `GridSampler` lists them all, as here).
const MAX_GRID_POINTS: usize = 1_000_000;

/// The grid's size (the product of every parameter's values), at most [`MAX_GRID_POINTS`].
pub fn grid_size(params: &[Param]) -> Result<usize> {
    params.iter().try_fold(1usize, |n, p| {
        n.checked_mul(p.grid_values()?.len())
            .filter(|&n| n <= MAX_GRID_POINTS)
            .ok_or_else(|| Error::Invalid(format!("--sampler grid: the grid has more than {MAX_GRID_POINTS} points")))
    })
}

/// Trial `number`'s parameters. `finished` are the complete and pruned trials so far;
/// `observed` the ones TPE learns from. TPE samples at random until `n_startup` trials have
/// finished, as Optuna's `TPESampler(n_startup_trials=...)`.
pub fn suggest(
    params: &[Param],
    kind: SamplerKind,
    seed: u64,
    number: usize,
    finished: usize,
    observed: &[Observation],
    n_startup: usize,
) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    if kind == SamplerKind::Grid {
        // the last parameter (in name order) varies fastest
        let mut rest = number;
        let values = params.iter().map(Param::grid_values).collect::<Result<Vec<_>>>()?;
        for (p, vals) in params.iter().zip(&values).rev() {
            out.insert(p.name.clone(), vals[rest % vals.len()].clone());
            rest /= vals.len();
        }
        return Ok(params.iter().map(|p| (p.name.clone(), out[&p.name].clone())).collect());
    }
    for (i, p) in params.iter().enumerate() {
        let mut rng = rng_for(seed, number, i);
        let use_tpe = kind == SamplerKind::Tpe && finished >= n_startup && !observed.is_empty();
        let v = if use_tpe { tpe_sample(p, observed, &mut rng)? } else { p.random(&mut rng) };
        out.insert(p.name.clone(), v);
    }
    Ok(out)
}

fn tpe_sample(p: &Param, observed: &[Observation], rng: &mut ChaCha8Rng) -> Result<Value> {
    let (lo, hi) = p.internal_range();
    if hi <= lo {
        return Ok(p.value_at(lo));
    }
    let err = |e: String| Error::Invalid(format!("TPE for `{}`: {e}", p.name));
    let (range, estimator) = match &p.dist {
        Distribution::Categorical { choices } => (tpe::categorical_range(choices.len()), tpe::histogram_estimator()),
        _ => (tpe::range(lo, hi), tpe::parzen_estimator()),
    };
    let mut opt = tpe::TpeOptimizer::new(estimator, range.map_err(|e| err(e.to_string()))?);
    for o in observed {
        if let Some(x) = o.params.get(&p.name).and_then(|v| p.internal_of(v)) {
            if o.value.is_finite() {
                opt.tell(x.clamp(lo, hi - 1e-12), o.value).map_err(|e| err(e.to_string()))?;
            }
        }
    }
    let x = opt.ask(rng).map_err(|e| err(e.to_string()))?;
    Ok(p.value_at(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(text: &str) -> Result<Vec<Param>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("space.toml");
        std::fs::write(&path, text).unwrap();
        read_space(&path)
    }

    #[test]
    fn values_stay_in_their_ranges_and_on_their_steps() {
        let params = space(
            "[learning_rate]\ntype = \"float\"\nlow = 1e-5\nhigh = 1e-2\nlog = true\n[warmup_steps]\ntype = \"int\"\nlow = 0\nhigh = 10\nstep = 5\n\
             [weight_decay]\ntype = \"float\"\nlow = 0.0\nhigh = 0.1\nstep = 0.05\n[lr_scheduler_type]\ntype = \"categorical\"\nchoices = [\"linear\", \"cosine\"]\n",
        )
        .unwrap();
        let mut seen_cosine = false;
        for n in 0..200 {
            let s = suggest(&params, SamplerKind::Random, 7, n, 0, &[], 10).unwrap();
            let lr = s["learning_rate"].as_f64().unwrap();
            assert!((1e-5..=1e-2).contains(&lr), "{lr}");
            assert!([0, 5, 10].contains(&s["warmup_steps"].as_i64().unwrap()), "{}", s["warmup_steps"]);
            let wd = s["weight_decay"].as_f64().unwrap();
            assert!([0.0, 0.05, 0.1].iter().any(|x| (x - wd).abs() < 1e-12), "{wd}");
            seen_cosine |= s["lr_scheduler_type"] == "cosine";
        }
        assert!(seen_cosine);
        // the same seed and trial number give the same parameters; another seed others
        let a = suggest(&params, SamplerKind::Random, 7, 3, 0, &[], 10).unwrap();
        assert_eq!(a, suggest(&params, SamplerKind::Random, 7, 3, 0, &[], 10).unwrap());
        assert_ne!(a, suggest(&params, SamplerKind::Random, 8, 3, 0, &[], 10).unwrap());
    }

    #[test]
    fn the_grid_visits_every_point_once() {
        let params = space("[a]\ntype = \"categorical\"\nchoices = [1, 2, 3]\n[b]\ntype = \"int\"\nlow = 0\nhigh = 1\n").unwrap();
        assert_eq!(grid_size(&params).unwrap(), 6);
        let points: Vec<_> = (0..6).map(|n| suggest(&params, SamplerKind::Grid, 0, n, 0, &[], 0).unwrap()).collect();
        for (i, p) in points.iter().enumerate() {
            assert!(points[..i].iter().all(|q| q != p), "{p:?} twice");
        }
        assert_eq!(points[1]["b"], 1, "the last parameter varies fastest");
        let cont = space("[a]\ntype = \"float\"\nlow = 0.0\nhigh = 1.0\n").unwrap();
        assert!(grid_size(&cont).unwrap_err().to_string().contains("continuous"));
    }

    #[test]
    fn tpe_moves_towards_the_good_region() {
        let params = space("[x]\ntype = \"float\"\nlow = 0.0\nhigh = 10.0\n").unwrap();
        let mut history: Vec<(Map<String, Value>, f64)> = Vec::new();
        for n in 0..40 {
            let obs: Vec<Observation> = history.iter().map(|(p, v)| Observation { params: p, value: *v }).collect();
            let s = suggest(&params, SamplerKind::Tpe, 1, n, history.len(), &obs, 10).unwrap();
            let x = s["x"].as_f64().unwrap();
            history.push((s, (x - 2.0).powi(2)));
        }
        let late: f64 = history[30..].iter().map(|(_, v)| v).sum::<f64>() / 10.0;
        let early: f64 = history[..10].iter().map(|(_, v)| v).sum::<f64>() / 10.0;
        assert!(late < early / 4.0, "TPE's late trials ({late}) are not better than the random start ({early})");
    }

    #[test]
    fn bad_spaces_are_one_clear_error() {
        let cases = [
            ("[lr]\ntype = \"float\"\nlow = 1.0\nhigh = 0.5\n", "above high"),
            ("[lr]\ntype = \"float\"\nlow = 0.0\nhigh = 1.0\nlog = true\n", "low > 0"),
            ("[lr]\ntype = \"real\"\n", "unknown type"),
            ("[lr]\ntype = \"int\"\nlow = 1\nhigh = 3\nstpe = 1\n", "unknown key `stpe`"),
            ("[lr]\ntype = \"categorical\"\nchoices = []\n", "non-empty"),
            ("lr = 3\n", "not a parameter table"),
        ];
        for (text, want) in cases {
            let e = space(text).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("space.toml"), "{text}: {e}");
        }
        let params = space("[learning_rat]\ntype = \"float\"\nlow = 0.1\nhigh = 0.2\n").unwrap();
        let e = check_names(&params, &Map::new()).unwrap_err().to_string();
        assert!(e.contains("did you mean `learning_rate`"), "{e}");
        let params = space("[plugins.0.options.gamma]\ntype = \"float\"\nlow = 0.1\nhigh = 0.2\n").unwrap();
        assert!(check_names(&params, &Map::new()).is_err());
        let mut config = Map::new();
        config.insert("plugins".into(), serde_json::json!(["loss.wasm"]));
        check_names(&params, &config).unwrap();
        set_path(&mut config, "plugins.0.options.gamma", serde_json::json!(0.5)).unwrap();
        assert_eq!(config["plugins"][0], serde_json::json!({"path": "loss.wasm", "options": {"gamma": 0.5}}));
    }
}
