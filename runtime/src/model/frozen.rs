//! Frozen weights held in bf16: with a LoRA adapter and `torch_dtype = "bfloat16"`, the base
//! model's weights do not train and were rounded to bf16 on load, so two bytes per value hold
//! them exactly. [`Model::hold_frozen_in_bf16`] moves them out of the model's f32 buffers; the
//! passes' [`Model::with_params`] makes a unit's held weights f32 just before the unit runs and
//! frees them after, so one unit's weights at a time exist in f32. The values the passes see are
//! the same bits as before, so training is bit for bit unchanged.

use std::sync::Mutex;

use half::bf16;

use super::io::Dtype;
use super::Model;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::{ParamBufs, Params};

/// The parameters held in bf16, and the f32 copies of those a unit is running with.
pub struct FrozenBf16<B: Backend> {
    /// Per parameter: its values, when held here (the model's buffer is then empty).
    half: Vec<Option<Vec<bf16>>>,
    expanded: Mutex<Vec<Option<B::Buf>>>,
}

impl<B: Backend> FrozenBf16<B> {
    /// Bytes held (two per value).
    pub fn bytes(&self) -> usize {
        self.half.iter().flatten().map(|h| 2 * h.len()).sum()
    }

    fn values(&self, i: usize) -> Option<Vec<f32>> {
        self.half.get(i)?.as_ref().map(|h| h.iter().map(|v| v.to_f32()).collect())
    }
}

impl<B: Backend> Model<B> {
    /// With a LoRA adapter on the CPU backend and bf16 weights (`torch_dtype = "bfloat16"`, or a
    /// bf16 checkpoint), holds the frozen base in bf16 ([`Model::hold_frozen_in_bf16`]); otherwise
    /// does nothing. Returns the bytes saved.
    pub fn hold_frozen_base(&mut self) -> Result<usize> {
        if self.lora.is_none() || self.dtype != Dtype::BF16 || self.backend.name() != "cpu" || self.residency.is_some() || self.frozen.is_some() {
            return Ok(0);
        }
        let saved = self.hold_frozen_in_bf16()?;
        tracing::info!("the frozen base weights are held in bf16 ({:.1} MiB less)", saved as f64 / (1 << 20) as f64);
        Ok(saved)
    }

    /// Moves every frozen parameter into bf16 storage and returns how many bytes that saves.
    /// Only for weights that are bf16 values already (`torch_dtype = "bfloat16"`): a value that
    /// bf16 does not hold exactly is an error, and nothing is moved.
    pub fn hold_frozen_in_bf16(&mut self) -> Result<usize> {
        if self.residency.is_some() {
            return Err(Error::Unsupported("bf16-held frozen weights with sharded weights (fsdp = \"full_shard\")".into()));
        }
        let be = &self.backend;
        let mut half = Vec::with_capacity(self.params.len());
        for (i, (p, &trains)) in self.params.iter().zip(&self.trainable).enumerate() {
            if trains || be.len(p) == 0 {
                half.push(None);
                continue;
            }
            let values = be.download(p)?;
            let h: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            if let Some(j) = h.iter().zip(&values).position(|(h, v)| h.to_f32().to_bits() != v.to_bits()) {
                return Err(Error::Invalid(format!(
                    "`{}` value {} at {j} is not a bf16 value: frozen weights are held in bf16 only when torch_dtype = \"bfloat16\" rounded them on load",
                    self.layout.specs[i].name, values[j]
                )));
            }
            half.push(Some(h));
        }
        for (p, h) in self.params.iter_mut().zip(&half) {
            if h.is_some() {
                *p = be.zeros(0)?;
            }
        }
        let n = half.len();
        let frozen = FrozenBf16 { half, expanded: Mutex::new((0..n).map(|_| None).collect()) };
        // two bytes a value instead of four
        let saved = frozen.bytes();
        self.frozen = Some(frozen);
        Ok(saved)
    }

    /// Parameter `i`'s values as host f32, wherever they are held.
    pub fn param_values(&self, i: usize) -> Result<Vec<f32>> {
        match self.frozen.as_ref().and_then(|f| f.values(i)) {
            Some(v) => Ok(v),
            None => self.backend.download(&self.params[i]),
        }
    }

    /// Runs `f` on the parameters with those of `idx` that are held in bf16 made f32 for the call.
    pub(super) fn with_expanded<T>(&self, frozen: &FrozenBf16<B>, idx: &[usize], f: impl FnOnce(&Params<B>) -> T) -> Result<T> {
        let mut exp = frozen.expanded.lock().map_err(|_| Error::Invalid("the bf16-held weights were left inconsistent by an earlier failure".into()))?;
        let mut made = Vec::new();
        for &i in idx {
            if exp[i].is_none() {
                if let Some(v) = frozen.values(i) {
                    exp[i] = Some(self.backend.upload_vec(v)?);
                    made.push(i);
                }
            }
        }
        let out = f(&Params { bufs: ParamBufs { own: &self.params, expanded: &exp }, trainable: &self.trainable });
        for i in made {
            exp[i] = None;
        }
        Ok(out)
    }
}
