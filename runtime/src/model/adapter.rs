//! The adapter folder as PEFT reads and writes it: `adapter_config.json` and
//! `adapter_model.safetensors`, holding `base_model.model.<module>.lora_A.weight` / `lora_B.weight`
//! for every adapted module, the trained biases (`<module>.base_layer.bias` for an adapted module,
//! `<module>.bias` otherwise) and the `modules_to_save` tensors under `base_model.model.<name>`.
//! The base model's weights are not in it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use serde_json::{Map, Value};

use super::io::{self, Dtype};
use super::lora::{module_of, LoraConfig};
use super::Model;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::files::write_file;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// A tensor of the adapter file: key, shape, values.
pub type AdapterTensor = (String, Vec<usize>, Vec<f32>);

impl<B: Backend> Model<B> {
    /// The base parameters the adapter file carries (trained biases and `modules_to_save`), each
    /// with the key of every transformers part.
    fn adapter_extras(&self) -> Vec<(usize, Vec<String>)> {
        let Some(state) = &self.lora else { return Vec::new() };
        let adapted = |m: &str| state.modules.iter().any(|x| x == m);
        let mut out = Vec::new();
        for (i, spec) in self.layout.specs.iter().enumerate().filter(|(i, s)| !s.adapter && self.trainable[*i]) {
            let keys = if state.saved_modules.contains(&i) {
                spec.parts.iter().map(|p| format!("{PREFIX}{}", p.name)).collect()
            } else {
                spec.parts
                    .iter()
                    .map(|p| {
                        let m = module_of(&p.name);
                        if adapted(m) {
                            format!("{PREFIX}{m}.base_layer.bias")
                        } else {
                            format!("{PREFIX}{}", p.name)
                        }
                    })
                    .collect()
            };
            out.push((i, keys));
        }
        out
    }

    /// The adapter's tensors as PEFT saves them (key, shape, values), sorted by key.
    pub fn adapter_tensors(&self) -> Result<Vec<AdapterTensor>> {
        self.adapter_tensors_of(&self.params)
    }

    /// [`Model::adapter_tensors`] of other buffers laid out as the parameters (their gradients).
    pub fn adapter_tensors_of(&self, bufs: &[B::Buf]) -> Result<Vec<AdapterTensor>> {
        if self.lora.is_none() {
            return Err(Error::Invalid("the model has no adapter".into()));
        }
        let mut out = Vec::new();
        for (i, keys) in self.adapter_extras() {
            let sub = super::layout::Layout { specs: vec![self.layout.specs[i].clone()], ..self.layout.clone() };
            for ((_, shape, values), key) in io::hf_tensors(&sub, &[self.backend.download(&bufs[i])?]).into_iter().zip(keys) {
                out.push((key, shape, values));
            }
        }
        for (i, spec) in self.layout.specs.iter().enumerate().filter(|(_, s)| s.adapter) {
            out.push((spec.name.clone(), spec.shape.clone(), self.backend.download(&bufs[i])?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into the existing
    /// folder `dir`.
    pub fn write_adapter_into(&self, dir: &Path) -> Result<()> {
        let Some(state) = &self.lora else { return Err(Error::Invalid("the model has no adapter to save".into())) };
        let config = state.config.to_json(self.config.arch, self.source.as_deref(), &state.modules);
        let text = serde_json::to_string_pretty(&config).expect("JSON of JSON");
        write_file(&dir.join(ADAPTER_CONFIG), format!("{text}\n").as_bytes())?;
        let tensors = self.adapter_tensors()?;
        let path = dir.join(ADAPTER_WEIGHTS);
        let mut encoded = Vec::new();
        for (key, shape, values) in &tensors {
            if let Some(x) = values.iter().find(|x| !x.is_finite()) {
                return Err(Error::tensor(&path, key, format!("holds a non-finite value ({x}); refusing to write it")));
            }
            encoded.push((key, shape, values.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()));
        }
        let views = encoded
            .iter()
            .map(|(k, shape, bytes)| TensorView::new(safetensors::tensor::Dtype::F32, shape.to_vec(), bytes).map(|v| (k.to_string(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::weights(&path, e.to_string()))?;
        let metadata: Option<HashMap<String, String>> = Some([("format".to_string(), "pt".to_string())].into());
        let bytes = safetensors::serialize(views, metadata).map_err(|e| Error::weights(&path, e.to_string()))?;
        write_file(&path, &bytes)
    }

    /// `PeftModel.from_pretrained(model, dir)`: reads the adapter folder `dir` and attaches it
    /// (the base freezes). Errors name the folder and what does not fit: an unknown `peft_type`
    /// or field, a target the base does not have, a tensor of the wrong shape, a tensor that
    /// belongs to no module.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        if !cfg_path.is_file() {
            return Err(Error::Invalid(format!("{}: not a PEFT adapter folder (no {ADAPTER_CONFIG})", dir.display())));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        crate::files::check_unique_keys(&text, "json").map_err(|e| Error::config(&cfg_path, format!("not valid JSON: {e}")))?;
        let map: Map<String, Value> = serde_json::from_str(&text).map_err(|e| Error::config(&cfg_path, format!("not a JSON object: {e}")))?;
        let config = LoraConfig::from_map(&map, &cfg_path.display().to_string())?;
        let path = dir.join(ADAPTER_WEIGHTS);
        if !path.is_file() {
            let hint = if dir.join("adapter_model.bin").exists() { " (pickled adapter_model.bin is not read; save with safe_serialization=True)" } else { "" };
            return Err(Error::weights(dir, format!("no {ADAPTER_WEIGHTS}{hint}")));
        }
        let map = io::map_file(&path)?;
        let st = io::deserialize(&path, &map)?;
        let mut lora = BTreeMap::new();
        let mut extras = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dt = Dtype::from_st(view.dtype()).ok_or_else(|| Error::tensor(&path, &name, format!("dtype {:?} is not supported", view.dtype())))?;
            if name.contains(".lora_A.") || name.contains(".lora_B.") || name.ends_with(".lora_magnitude_vector") {
                let mut v = Vec::new();
                dt.decode(view.data(), &mut v);
                if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                    return Err(Error::tensor(&path, &name, format!("holds a non-finite value ({x})")));
                }
                lora.insert(name, (view.shape().to_vec(), v));
            } else {
                extras.insert(name, (view, dt));
            }
        }
        let arch = self.config.architecture_name();
        let context = |e: Error| Error::Invalid(format!("{}: adapter for another model? {e} (the base is {arch})", dir.display()));
        self.add_lora(config, Some(lora), 0).map_err(context)?;
        for (i, keys) in self.adapter_extras() {
            let data = self.decode_spec(i, &keys, &path, &mut |k| extras.remove(k))?;
            self.params[i] = self.backend.upload(&data)?;
        }
        if let Some(key) = extras.keys().next() {
            return Err(Error::tensor(&path, key, format!("names no tensor of the base model ({arch}) that this configuration trains")));
        }
        Ok(())
    }

    /// Parameter `i` from its transformers parts, stored under `keys`; a missing tensor or a
    /// wrong shape is an error naming the file and the key.
    fn decode_spec<'a>(&self, i: usize, keys: &[String], path: &Path, take: &mut dyn FnMut(&str) -> Option<(TensorView<'a>, Dtype)>) -> Result<Vec<f32>> {
        let spec = &self.layout.specs[i];
        let mut data = Vec::with_capacity(spec.numel());
        for (part, key) in spec.parts.iter().zip(keys) {
            let Some((view, dt)) = take(key) else {
                return Err(Error::tensor(path, key, "missing (the configuration trains it)"));
            };
            let want = &part.shape;
            if view.shape() != want.as_slice() {
                return Err(Error::tensor(path, key, format!("shape {:?} does not fit the base model, which needs {want:?}", view.shape())));
            }
            let one = super::layout::ParamSpec { parts: vec![part.clone()], ..spec.clone() };
            let start = data.len();
            io::decode_part(&one, &view, dt, &mut data);
            if let Some(x) = data[start..].iter().find(|x| !x.is_finite()) {
                return Err(Error::tensor(path, key, format!("holds a non-finite value ({x})")));
            }
        }
        Ok(data)
    }

    /// PEFT's `merge_and_unload`: every adapter folded into its base weight (`W[off.., :] +=
    /// scale * B A`, then with DoRA each row times `m / ||row||`, in the engine's `[out, in]` layout, so GPT-2's `Conv1D` is transposed back on
    /// save), the adapter tensors dropped, and every parameter trainable again. What the adapter
    /// trained besides (biases, `modules_to_save`) is already in the base's tensors.
    pub fn merge_adapter(&mut self) -> Result<()> {
        if self.frozen.is_some() {
            return Err(Error::Unsupported("merging an adapter into bf16-held frozen weights (load the base in f32 to merge)".into()));
        }
        let Some(state) = self.lora.take() else { return Err(Error::Invalid("the model has no adapter to merge".into())) };
        for (l, units) in state.parts.iter().enumerate() {
            for (u, parts) in units.iter().enumerate() {
                let unit = [super::lora::Unit::Qkv, super::lora::Unit::O, super::lora::Unit::Fc, super::lora::Unit::Proj][u];
                let w = self.block_linear(l, unit).w;
                let inp = self.layout.specs[w].shape[1];
                let mut weight = self.backend.download(&self.params[w])?;
                for p in parts.iter().flatten() {
                    let (a, b) = (self.backend.download(&self.params[p.a])?, self.backend.download(&self.params[p.b])?);
                    let mags = p.mag.map(|m| self.backend.download(&self.params[m])).transpose()?;
                    for i in 0..p.cols {
                        let row = &mut weight[(p.off + i) * inp..(p.off + i + 1) * inp];
                        // (B A)[i, :] in f32, summed over the rank in order, as torch's product
                        let mut delta = vec![0.0f32; inp];
                        for k in 0..p.r {
                            let bik = b[i * p.r + k];
                            for (d, x) in delta.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                                *d += bik * x;
                            }
                        }
                        for (x, d) in row.iter_mut().zip(&delta) {
                            *x += d * p.scale;
                        }
                        // DoRA: the merged row rescaled to its magnitude (`m / ||W + dW||`)
                        if let Some(m) = &mags {
                            let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
                            let factor = m[i] / norm;
                            row.iter_mut().for_each(|x| *x *= factor);
                        }
                    }
                }
                self.params[w] = self.backend.upload(&weight)?;
            }
        }
        let base = self.layout.specs.iter().take_while(|s| !s.adapter).count();
        self.layout.specs.truncate(base);
        self.params.truncate(base);
        self.trainable = vec![true; base];
        Ok(())
    }

    /// Reads the values of the attached adapter (its `lora_A` / `lora_B` tensors, trained biases
    /// and `modules_to_save`) from the adapter folder `dir` (a checkpoint of this run).
    pub fn reload_adapter(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(ADAPTER_WEIGHTS);
        let map = io::map_file(&path)?;
        let st = io::deserialize(&path, &map)?;
        let mut targets = self.adapter_extras();
        targets.extend(self.layout.specs.iter().enumerate().filter(|(_, s)| s.adapter).map(|(i, s)| (i, vec![s.name.clone()])));
        for (i, keys) in targets {
            let data = self.decode_spec(i, &keys, &path, &mut |k| st.tensor(k).ok().and_then(|v| Dtype::from_st(v.dtype()).map(|d| (v, d))))?;
            self.params[i] = self.backend.upload(&data)?;
        }
        Ok(())
    }
}
