//! Reading and writing Hugging Face weight files: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`; f32, f16 or bf16 on disk, f32 in memory. Every problem with a
//! file is an error naming the file and the tensor. Saving writes a complete folder or nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Map, Value};

use super::layout::{ParamSpec, WeightSet};
use crate::error::{Error, Result};
use crate::files::write_file;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A floating-point storage type, under transformers' `torch_dtype` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s.strip_prefix("torch.").unwrap_or(s) {
            "float32" | "float" | "f32" => Some(Dtype::F32),
            "float16" | "half" | "f16" => Some(Dtype::F16),
            "bfloat16" | "bf16" => Some(Dtype::BF16),
            _ => None,
        }
    }
    pub fn hf_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            _ => 2,
        }
    }
    fn st(self) -> StDtype {
        match self {
            Dtype::F32 => StDtype::F32,
            Dtype::F16 => StDtype::F16,
            Dtype::BF16 => StDtype::BF16,
        }
    }
    pub(super) fn from_st(d: StDtype) -> Option<Self> {
        match d {
            StDtype::F32 => Some(Dtype::F32),
            StDtype::F16 => Some(Dtype::F16),
            StDtype::BF16 => Some(Dtype::BF16),
            _ => None,
        }
    }
    /// One f32 value rounded to this type's precision (round to nearest even).
    fn round_one(self, v: f32) -> f32 {
        match self {
            Dtype::F32 => v,
            Dtype::F16 => half::f16::from_f32(v).to_f32(),
            Dtype::BF16 => half::bf16::from_f32(v).to_f32(),
        }
    }
    /// Rounds f32 values to this type's precision (round to nearest even), in place.
    pub fn round(self, x: &mut [f32]) {
        if self != Dtype::F32 {
            x.iter_mut().for_each(|v| *v = self.round_one(*v));
        }
    }
    /// [`Dtype::round`], refusing a value the dtype cannot hold (float16 ends at 65504): the
    /// model would compute with an infinity. `name` is the tensor's, for the error.
    pub fn round_finite(self, x: &mut [f32], name: &str) -> Result<()> {
        for v in x.iter_mut() {
            let r = self.round_one(*v);
            if !r.is_finite() && v.is_finite() {
                return Err(Error::Invalid(format!("`{name}` holds {:e}, beyond the range of {} (torch_dtype)", *v, self.hf_name())));
            }
            *v = r;
        }
        Ok(())
    }
    fn encode(self, x: &[f32], out: &mut Vec<u8>) {
        match self {
            Dtype::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Dtype::F16 => x.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            Dtype::BF16 => x.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
    }
    pub(super) fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            Dtype::F16 => out.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
            Dtype::BF16 => out.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        }
    }
}

/// What `load_weights` found.
pub struct LoadedWeights {
    /// One f32 vector per [`ParamSpec`], in the engine's layout.
    pub tensors: Vec<Vec<f32>>,
    /// The storage type of the files (the first tensor's, when they differ).
    pub dtype: Dtype,
    /// The weight files read.
    pub files: Vec<PathBuf>,
}

/// The weight files of a model folder, in order: `model.safetensors` when it is there (as
/// transformers prefers it to an index), else the shards the index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    let index = dir.join(INDEX_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        crate::files::check_unique_keys(&text, "json").map_err(|e| Error::weights(&index, format!("not valid JSON: {e}")))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::weights(&index, format!("not valid JSON: {e}")))?;
        let map = value.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::weights(&index, "missing object `weight_map`"))?;
        let mut files: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| Error::weights(&index, format!("`weight_map.{name}` must be a file name")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(Error::weights(&index, format!("`weight_map.{name}` points outside the folder: {file}")));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    if !dir.is_dir() {
        return Err(Error::Invalid(format!("{}: no such model folder", dir.display())));
    }
    let hint = if dir.join("pytorch_model.bin").exists() {
        " (pickled `pytorch_model.bin` weights are not read; save the model with safe_serialization=True)"
    } else {
        ""
    };
    Err(Error::weights(dir, format!("no {SINGLE_FILE} or {INDEX_FILE} found{hint}")))
}

/// The file at `path`, memory-mapped read-only.
pub fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and private to this process for the duration of the load; a
    // file truncated underneath us by another process is outside what any reader can guard.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Parses the safetensors file `path` (its bytes). When the file is invalid, the error names the
/// tensor at fault where the header allows: a truncated file or a bad `data_offsets` entry names
/// the first tensor whose data lies outside the file, rather than the library's generic message.
pub fn deserialize<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| diagnose(path, bytes).unwrap_or_else(|| Error::weights(path, format!("not a valid safetensors file: {e}"))))
}

fn diagnose(path: &Path, bytes: &[u8]) -> Option<Error> {
    let len = bytes.len() as u64;
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))) else {
        return Some(Error::weights(path, format!("not a valid safetensors file: {len} bytes is too short for the 8-byte header length")));
    };
    if n > len - 8 {
        return Some(Error::weights(
            path,
            format!("not a valid safetensors file: the header length field says {n} bytes, but only {} follow it (truncated or corrupt file?)", len - 8),
        ));
    }
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n as usize]).ok()?;
    let data_len = len - 8 - n;
    let mut offsets: Vec<(&str, u64, u64)> = header
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .filter_map(|(name, info)| {
            let o = info.get("data_offsets")?.as_array()?;
            Some((name.as_str(), o.first()?.as_u64()?, o.get(1)?.as_u64()?))
        })
        .collect();
    offsets.sort_by_key(|&(name, s, e)| (s, e, name));
    let (name, s, e) = offsets.into_iter().find(|&(_, _, e)| e > data_len)?;
    Some(Error::tensor(path, name, format!("data_offsets [{s}, {e}] lie outside the file's {data_len} bytes of tensor data (truncated file?)")))
}

/// Reads every tensor of `layout` from the model folder `dir`.
pub fn load_weights(dir: &Path, layout: &dyn WeightSet) -> Result<LoadedWeights> {
    let mut tensors = Vec::with_capacity(layout.specs().len());
    let (dtype, files) = load_weights_each(dir, layout, &mut |_, t| {
        tensors.push(t);
        Ok(())
    })?;
    Ok(LoadedWeights { tensors, dtype, files })
}

/// [`load_weights`] a tensor at a time: `put(i, values)` for each parameter in layout order, as it
/// is decoded (at most one is held at once). Returns the files' storage type and the files.
pub fn load_weights_each(dir: &Path, layout: &dyn WeightSet, put: &mut dyn FnMut(usize, Vec<f32>) -> Result<()>) -> Result<(Dtype, Vec<PathBuf>)> {
    let files = weight_files(dir)?;
    let maps = files.iter().map(|f| map_file(f)).collect::<Result<Vec<_>>>()?;
    let mut tables = Vec::new();
    for (path, map) in files.iter().zip(&maps) {
        let st = deserialize(path, map)?;
        tables.push(st);
    }
    let mut location: HashMap<String, usize> = HashMap::new();
    for (i, st) in tables.iter().enumerate() {
        for name in st.names() {
            if let Some(prev) = location.insert(name.to_string(), i) {
                return Err(Error::tensor(&files[i], name, format!("also stored in {}", files[prev].display())));
            }
        }
    }
    let mut used: HashSet<&str> = HashSet::new();
    let mut dtype = None;
    for (i, spec) in layout.specs().iter().enumerate() {
        if let [part] = spec.parts.as_slice() {
            if !location.contains_key(&part.name) && layout.may_be_missing(&part.name) {
                continue;
            }
        }
        // allocated part by part once each part's stored shape matches: a config whose sizes
        // its files do not hold is an error, not an allocation of what it claims
        let mut data = Vec::new();
        for part in &spec.parts {
            let Some(&fi) = location.get(&part.name) else {
                let where_ = if files.len() == 1 { files[0].clone() } else { dir.join(INDEX_FILE) };
                return Err(Error::tensor(&where_, &part.name, "missing"));
            };
            let view = tables[fi].tensor(&part.name).map_err(|e| Error::tensor(&files[fi], &part.name, e.to_string()))?;
            let dt = Dtype::from_st(view.dtype())
                .ok_or_else(|| Error::tensor(&files[fi], &part.name, format!("dtype {:?} is not supported (expected F32, F16 or BF16)", view.dtype())))?;
            if view.shape() != part.shape.as_slice() {
                return Err(Error::tensor(
                    &files[fi],
                    &part.name,
                    format!("shape {:?} does not match the config, which implies {:?}", view.shape(), part.shape),
                ));
            }
            dtype.get_or_insert(dt);
            let start = data.len();
            data.reserve_exact(part.shape.iter().product());
            decode_part(spec, &view, dt, &mut data);
            if let Some(x) = data[start..].iter().find(|x| !x.is_finite()) {
                return Err(Error::tensor(&files[fi], &part.name, format!("holds a non-finite value ({x}); a model's weights must be finite")));
            }
            used.insert(part.name.as_str());
        }
        put(i, data)?;
    }
    for (i, st) in tables.iter().enumerate() {
        let mut extra: Vec<&str> = st.names().into_iter().filter(|n| !used.contains(n) && !layout.tolerates_extra(n)).collect();
        if !extra.is_empty() {
            extra.sort();
            let shown: Vec<_> = extra.iter().take(5).copied().collect();
            let more = if extra.len() > 5 { format!(" and {} more", extra.len() - 5) } else { String::new() };
            return Err(Error::weights(&files[i], format!("unexpected tensor(s) for this config: {}{more}", shown.join(", "))));
        }
    }
    Ok((dtype.unwrap_or(Dtype::F32), files))
}

pub(super) fn decode_part(spec: &ParamSpec, view: &TensorView, dt: Dtype, out: &mut Vec<f32>) {
    if !spec.conv1d {
        dt.decode(view.data(), out);
        return;
    }
    // stored [in, out]; the engine wants [out, in]
    let (inp, outd) = (view.shape()[0], view.shape()[1]);
    let mut tmp = Vec::with_capacity(inp * outd);
    dt.decode(view.data(), &mut tmp);
    let base = out.len();
    out.resize(base + inp * outd, 0.0);
    for i in 0..inp {
        for o in 0..outd {
            out[base + o * inp + i] = tmp[i * outd + o];
        }
    }
}

/// The values of one transformers tensor (`part`, at element `off` of its parameter's `data`):
/// transposed back for GPT-2's `Conv1D`.
fn part_values(spec: &ParamSpec, part_shape: &[usize], data: &[f32], off: usize) -> Vec<f32> {
    let n: usize = part_shape.iter().product();
    let chunk = &data[off..off + n];
    if !spec.conv1d {
        return chunk.to_vec();
    }
    let (inp, outd) = (part_shape[0], part_shape[1]);
    let mut t = vec![0.0; n];
    for o in 0..outd {
        for i in 0..inp {
            t[i * outd + o] = chunk[o * inp + i];
        }
    }
    t
}

/// The transformers tensors of a model, in layout order: (name, shape, f32 values).
pub fn hf_tensors(layout: &dyn WeightSet, tensors: &[Vec<f32>]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for (spec, data) in layout.specs().iter().zip(tensors).filter(|(s, _)| !s.adapter) {
        let mut off = 0;
        for part in &spec.parts {
            out.push((part.name.clone(), part.shape.clone(), part_values(spec, &part.shape, data, off)));
            off += part.shape.iter().product::<usize>();
        }
    }
    out
}

/// One tensor of a safetensors file written by [`write_streamed`]: name, dtype, shape.
pub type Entry = (String, StDtype, Vec<usize>);

/// Writes a safetensors file a tensor at a time: the header from `entries` (stored in name order,
/// as the safetensors crate orders tensors of one dtype), then each entry's values as `fill(k)`
/// produces them (f32, encoded in `dtype` a piece at a time as they are written), so that no more
/// than one tensor is in memory at once.
pub fn write_streamed(
    path: &Path,
    entries: &[Entry],
    dtype: Dtype,
    metadata: Option<HashMap<String, String>>,
    fill: &mut dyn FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    use safetensors::tensor::{Metadata, TensorInfo};
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| entries[a].0.cmp(&entries[b].0));
    let (mut offset, mut infos, mut sizes) = (0, Vec::new(), vec![0; entries.len()]);
    for &k in &order {
        let (name, dtype, shape) = &entries[k];
        sizes[k] = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        infos.push((name.clone(), TensorInfo { dtype: *dtype, shape: shape.clone(), data_offsets: (offset, offset + sizes[k]) }));
        offset += sizes[k];
    }
    let meta = Metadata::new(metadata, infos).map_err(|e| Error::weights(path, e.to_string()))?;
    let mut header = serde_json::to_string(&meta).map_err(|e| Error::weights(path, e.to_string()))?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    crate::files::write_file_streamed(path, |w| {
        let io = |e: std::io::Error| Error::io(path, e);
        w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&header).map_err(io)?;
        let mut bytes = Vec::new();
        for &k in &order {
            let values = fill(k)?;
            if values.len() * dtype.size() != sizes[k] {
                return Err(Error::tensor(path, &entries[k].0, format!("{} values produced, {} expected", values.len(), sizes[k] / dtype.size())));
            }
            if let Some(x) = values.iter().find(|x| !x.is_finite()) {
                return Err(Error::tensor(path, &entries[k].0, format!("holds a non-finite value ({x}); refusing to write it")));
            }
            for piece in values.chunks(1 << 20) {
                bytes.clear();
                dtype.encode(piece, &mut bytes);
                w.write_all(&bytes).map_err(io)?;
            }
        }
        Ok(())
    })
}

/// Parses a transformers `max_shard_size`: an integer number of bytes or a string like `"5GB"`,
/// `"500MB"`, `"2GiB"` (decimal units for B/KB/MB/GB, binary for KiB/MiB/GiB, as transformers).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = num * mult;
    (bytes >= 1.0).then_some(bytes as u64)
}

/// Writes the weights of `layout` into the folder `dir` (which must exist): one file, or shards
/// no larger than `max_shard_size` bytes plus the index, as `save_pretrained` does.
pub fn write_weights(dir: &Path, layout: &dyn WeightSet, tensors: &[Vec<f32>], dtype: Dtype, max_shard_size: u64) -> Result<Vec<PathBuf>> {
    write_weights_from(dir, layout, &mut |i| Ok(tensors[i].clone()), dtype, max_shard_size)
}

/// [`write_weights`] with each parameter's values (by index in the layout) from `source`, asked
/// for one at a time as the files are written (a fused parameter may be asked for once per
/// transformers tensor it holds): at most one parameter is held at once.
pub fn write_weights_from(
    dir: &Path,
    layout: &dyn WeightSet,
    source: &mut dyn FnMut(usize) -> Result<Vec<f32>>,
    dtype: Dtype,
    max_shard_size: u64,
) -> Result<Vec<PathBuf>> {
    // every transformers tensor: (parameter, offset in it, name, shape, bytes on disk)
    let mut plan = Vec::new();
    for (i, spec) in layout.specs().iter().enumerate().filter(|(_, s)| !s.adapter) {
        let mut off = 0;
        for part in &spec.parts {
            let n: usize = part.shape.iter().product();
            plan.push((i, off, part.name.clone(), part.shape.clone(), (n * dtype.size()) as u64));
            off += n;
        }
    }
    // shard: greedily, in order, starting a new shard when the next tensor would overflow this one
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (k, t) in plan.iter().enumerate() {
        if size + t.4 > max_shard_size && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("at least one shard").push(k);
        size += t.4;
    }
    let total: u64 = plan.iter().map(|t| t.4).sum();
    let n = shards.len();
    let metadata: Option<HashMap<String, String>> = Some([("format".to_string(), "pt".to_string())].into());
    let mut written = Vec::new();
    let mut weight_map = BTreeMap::new();
    // the parameter asked for last, kept for the next tensor of the same parameter
    let mut held: Option<(usize, Vec<f32>)> = None;
    for (k, shard) in shards.iter().enumerate() {
        let file_name = if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", k + 1, n) };
        let path = dir.join(&file_name);
        let entries: Vec<Entry> = shard.iter().map(|&t| (plan[t].2.clone(), dtype.st(), plan[t].3.clone())).collect();
        for e in &entries {
            weight_map.insert(e.0.clone(), Value::String(file_name.clone()));
        }
        write_streamed(&path, &entries, dtype, metadata.clone(), &mut |e| {
            let (i, off, _, shape, _) = &plan[shard[e]];
            let whole = layout.specs()[*i].parts.len() == 1 && !layout.specs()[*i].conv1d;
            if whole {
                // the parameter is this one tensor: handed over as it came
                held = None;
                return source(*i);
            }
            if held.as_ref().is_none_or(|h| h.0 != *i) {
                held = None;
                held = Some((*i, source(*i)?));
            }
            Ok(part_values(&layout.specs()[*i], shape, &held.as_ref().expect("just fetched").1, *off))
        })?;
        written.push(path);
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": Value::Object(weight_map.into_iter().collect::<Map<_, _>>()) });
        let path = dir.join(INDEX_FILE);
        write_file(&path, format!("{}\n", serde_json::to_string_pretty(&index).expect("JSON of strings")).as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// A tensor's dtype (as safetensors spells it), shape and file.
pub type TensorHeader = (String, Vec<usize>, PathBuf);

/// Name, dtype and shape of every tensor in a model folder's weight files, read from the headers
/// only (nothing is decoded), with the file that holds each.
pub fn read_headers(dir: &Path) -> Result<BTreeMap<String, TensorHeader>> {
    let mut out = BTreeMap::new();
    for path in weight_files(dir)? {
        let map = map_file(&path)?;
        let st = deserialize(&path, &map)?;
        for (name, view) in st.tensors() {
            out.insert(name, (format!("{:?}", view.dtype()), view.shape().to_vec(), path.clone()));
        }
    }
    Ok(out)
}
