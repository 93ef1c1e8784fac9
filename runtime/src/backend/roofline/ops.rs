//! The op set on the account: for each op, the launches `backend/cuda/*.rs` makes and what each
//! moves and computes (see the module above for the model).
// the ops take the trait's operands one by one
#![allow(clippy::too_many_arguments)]

use super::{Cost, Roofline, VBuf, VIds};
use crate::backend::{Activation, AdamWStep, AttnImpl, AttnShape, Backend, ColBlock, DropoutMask, LossRows, StatGrads, StatsWanted, TokenStats, IGNORE_INDEX};
use crate::error::Result;

/// The query tiles of a causal pass over `seq` positions: for each tile of `br` queries, its
/// rows and the keys its block reads (whole tiles of `bc` up to the diagonal).
fn query_tiles(seq: usize, br: usize, bc: usize) -> impl Iterator<Item = (f64, f64)> {
    (0..seq.div_ceil(br)).map(move |i| {
        let rows = br.min(seq - i * br);
        let keys = ((i * br + rows).div_ceil(bc) * bc).min(seq);
        (rows as f64, keys as f64)
    })
}

/// The key tiles of a causal backward pass: for each tile of `bk` keys, its rows and the queries
/// its block reads (whole tiles of `bq` from the one holding its first key to the end).
fn key_tiles(seq: usize, bk: usize, bq: usize) -> impl Iterator<Item = (f64, f64)> {
    (0..seq.div_ceil(bk)).map(move |j| {
        let rows = bk.min(seq - j * bk);
        let first = (j * bk) / bq * bq;
        (rows as f64, (seq - first) as f64)
    })
}

/// The FMA kernels' instantiation for a head dim (`D` in 32, 64, 128).
fn fma_dim(d: usize) -> usize {
    match d {
        0..=32 => 32,
        33..=64 => 64,
        _ => 128,
    }
}

impl Roofline {
    /// Whether attention runs on the tensor-core kernels (bf16, head dim 64 or 128, no dropout).
    fn tensor_core_attention(&self, s: AttnShape, drop: bool) -> bool {
        self.bf16 && (s.head_dim == 64 || s.head_dim == 128) && !drop
    }

    /// Splits `flops` between the tensor cores and the rest.
    fn flops(tc: bool, flops: f64) -> (f64, f64) {
        if tc {
            (flops, 0.0)
        } else {
            (0.0, flops)
        }
    }

    fn attention_fwd_cost(&self, out: &VBuf, qkv: &VBuf, s: AttnShape, drop: bool) {
        if self.bf16 && !self.held_read(qkv) {
            self.cast(qkv.len);
        }
        let tc = self.tensor_core_attention(s, drop);
        let (br, bc) = if tc { (128, 64) } else { (64, 32) };
        let (e, d, heads) = (self.operand_bytes(), s.head_dim as f64, (s.batch * s.n_head) as f64);
        // an output held `only`: its f32 values are not written (they go stale)
        let out_d = if self.copy_alone(out) { 0.0 } else { d };
        let mut c = Cost::default();
        for (rq, kr) in query_tiles(s.seq, br, bc) {
            c.read += heads * (e * d * (rq + 2.0 * kr) + 4.0 * kr);
            c.written += heads * 4.0 * rq * (out_d + 1.0);
            let (t, f) = Self::flops(tc, heads * 2.0 * 2.0 * rq * kr * d);
            c.tensor_flops += t;
            c.fp32_flops += f;
        }
        // a held output's bf16 copy beside it (as the CUDA backend)
        c.written += 4.0 * self.copy_beside(out) as f64;
        self.rec("attention forward", c);
    }

    fn attention_bwd_cost(&self, (dout_buf, out_buf): (&VBuf, &VBuf), qkv: &VBuf, s: AttnShape, drop: bool) {
        let (rows, d) = ((s.batch * s.seq) as f64, s.head_dim as f64);
        let stats = (s.batch * s.n_head * s.seq) as f64;
        let out = rows * (s.n_head * s.head_dim) as f64;
        let tc = self.tensor_core_attention(s, drop);
        // as the CUDA backend: the output read from its held copy when made; dout from its copy
        // when its product wrote only that, for the tensor-core kernels with the output's copy at
        // hand (else widened first)
        let out16 = self.held_made(out_buf);
        let dout_held = tc && out16 && self.read_as_bf16(dout_buf);
        if !dout_held {
            self.widen(dout_buf);
            self.reads(&[dout_buf]);
        }
        if !out16 {
            self.reads(&[out_buf]);
        }
        // delta from dout and out; for the tensor-core kernels it also writes dout's bf16 copy
        // unless that is dout's held copy
        let read = (if dout_held { 2.0 } else { 4.0 } + if out16 { 2.0 } else { 4.0 }) * out;
        let dout16 = if tc && !dout_held { 2.0 * out } else { 0.0 };
        self.rec("attention backward", Cost { read, written: 4.0 * stats + dout16, ..Cost::default() });
        if self.bf16 && !self.held_read(qkv) {
            self.cast(qkv.len);
        }
        let e = self.operand_bytes();
        let (kv_blocks, group) = ((s.batch * s.n_kv_head) as f64, (s.n_head / s.n_kv_head.max(1)) as f64);
        // per query row read by a key block: the query (operand), dout (its bf16 copy for the
        // tensor-core kernels, else f32), lse and delta
        let q_row = e * d + if tc { 2.0 } else { 4.0 } * d + 8.0;
        // the two kernels training runs (the deterministic form; the single kernel adding dq
        // atomically is only cuda-check's): dq per block of queries over key tiles, dk and dv
        // per 64 keys over query tiles. Tensor cores: 128 queries per dq block, key and query
        // tiles of 64 (32 at D = 128); FMA: 64 queries per dq block, tiles of 64 (32 at D = 128)
        let narrow = if tc { s.head_dim == 128 } else { fma_dim(s.head_dim) == 128 };
        let (dq_rows, tile) = (if tc { 128 } else { 64 }, if narrow { 32 } else { 64 });
        let q_heads = (s.batch * s.n_head) as f64;
        let mut dq = Cost::default();
        for (rq, kr) in query_tiles(s.seq, dq_rows, tile) {
            dq.read += q_heads * (rq * q_row + 2.0 * e * kr * d + 4.0 * kr);
            dq.written += q_heads * 4.0 * rq * d;
            let (t, f) = Self::flops(tc, q_heads * 3.0 * 2.0 * rq * kr * d);
            (dq.tensor_flops, dq.fp32_flops) = (dq.tensor_flops + t, dq.fp32_flops + f);
        }
        self.rec("attention backward", dq);
        let mut kv = Cost::default();
        for (rk, rq) in key_tiles(s.seq, 64, tile) {
            kv.read += kv_blocks * (2.0 * e * rk * d + 4.0 * rk + group * rq * q_row);
            kv.written += kv_blocks * 2.0 * 4.0 * rk * d;
            let (t, f) = Self::flops(tc, kv_blocks * group * 4.0 * 2.0 * rq * rk * d);
            (kv.tensor_flops, kv.fp32_flops) = (kv.tensor_flops + t, kv.fp32_flops + f);
        }
        self.rec("attention backward", kv);
    }
}

impl Backend for Roofline {
    type Buf = VBuf;
    type Ids = VIds;

    fn name(&self) -> &'static str {
        "roofline"
    }
    /// As the CUDA backend's.
    fn logits_chunk_floats(&self) -> usize {
        crate::backend::DEVICE_LOGITS_CHUNK_FLOATS
    }
    fn zeros(&self, n: usize) -> Result<VBuf> {
        let _op = self.op_kind("untimed");
        if n > 0 {
            self.elementwise("allocation (zeroed)", 0, n);
        }
        Ok(self.new_buf(n))
    }
    fn upload(&self, data: &[f32]) -> Result<VBuf> {
        let _op = self.op_kind("untimed");
        self.rec("host to device", Cost { written: 4.0 * data.len() as f64, ..Cost::default() });
        Ok(self.new_buf(data.len()))
    }
    fn upload_ids(&self, data: &[i32]) -> Result<VIds> {
        let _op = self.op_kind("untimed");
        self.rec("host to device", Cost { written: 4.0 * data.len() as f64, ..Cost::default() });
        Ok(VIds { data: data.to_vec() })
    }
    fn download(&self, buf: &VBuf) -> Result<Vec<f32>> {
        let _op = self.op_kind("untimed");
        self.reads(&[buf]);
        self.rec("device to host", Cost { read: 4.0 * buf.len as f64, ..Cost::default() });
        Ok(vec![0.0; buf.len])
    }
    fn len(&self, buf: &VBuf) -> usize {
        buf.len
    }
    fn fill(&self, buf: &mut VBuf, _value: f32) {
        let _op = self.op_kind("fill");
        self.forget(buf);
        self.elementwise("fill", 0, buf.len);
    }
    fn copy(&self, dst: &mut VBuf, src: &VBuf) {
        let _op = self.op_kind("untimed");
        self.reads(&[src]);
        self.forget(dst);
        self.elementwise("copy", src.len, src.len);
    }
    fn copy_range(&self, dst: &mut VBuf, _dst_off: usize, src: &VBuf, _src_off: usize, n: usize) {
        let _op = self.op_kind("copy");
        self.reads(&[src]);
        self.forget(dst);
        self.elementwise("copy", n, n);
    }

    fn embedding_fwd(&self, _out: &mut VBuf, ids: &VIds, _wte: &VBuf, wpe: Option<(&VBuf, &VIds)>, c: usize) {
        let _op = self.op_kind("embedding");
        let (r, tables) = (ids.data.len(), 1 + wpe.is_some() as usize);
        self.elementwise("embedding", tables * r * (1 + c), r * c);
    }
    fn embedding_bwd(&self, _dwte: &mut VBuf, dwpe: Option<(&mut VBuf, &VIds)>, ids: &VIds, dout: &VBuf, c: usize) {
        let _op = self.op_kind("embedding");
        self.reads(&[dout]);
        // per table: the ids, dout, and the rows it adds into (read and written)
        let r = ids.data.len();
        for _ in 0..1 + dwpe.is_some() as usize {
            self.elementwise("embedding", r + 2 * r * c, r * c);
        }
    }

    fn layernorm_fwd(&self, out: &mut VBuf, mean: &mut VBuf, _rstd: &mut VBuf, x: &VBuf, _w: &VBuf, b: Option<&VBuf>, c: usize, _eps: f32) {
        let _op = self.op_kind("norm");
        let rows = mean.len;
        self.reads(&[x]);
        let written = self.produced(out);
        self.elementwise("norm", x.len + c * (1 + b.is_some() as usize), written + 2 * rows);
    }
    fn layernorm_bwd(&self, dx: &mut VBuf, _dw: &mut VBuf, db: Option<&mut VBuf>, dout: &VBuf, x: &VBuf, _w: &VBuf, mean: &VBuf, _rstd: &VBuf, c: usize) {
        let _op = self.op_kind("norm");
        self.reads(&[dx, x]);
        self.norm_bwd_cost(dout, mean.len, c, 2, 1 + db.is_some() as usize);
    }
    fn rmsnorm_fwd(&self, out: &mut VBuf, rstd: &mut VBuf, x: &VBuf, _w: &VBuf, c: usize, _eps: f32) {
        let _op = self.op_kind("norm");
        self.reads(&[x]);
        let written = self.produced(out);
        self.elementwise("norm", x.len + c, written + rstd.len);
    }
    fn rmsnorm_bwd(&self, dx: &mut VBuf, _dw: &mut VBuf, dout: &VBuf, x: &VBuf, _w: &VBuf, rstd: &VBuf, c: usize) {
        let _op = self.op_kind("norm");
        self.reads(&[dx, x]);
        self.norm_bwd_cost(dout, rstd.len, c, 1, 1);
    }

    fn matmul_fwd(&self, out: &mut VBuf, inp: &VBuf, w: &VBuf, bias: Option<&VBuf>, n: usize, k: usize, m: usize) {
        let _op = self.op_kind("matmul");
        self.cast_operands(&[w, inp], Some(0), &[true, true]);
        if self.held_only_product(out, m) {
            // as the CUDA backend: the product writes the held copy alone, in bf16
            return self.gemm_out((m, n, k), false, bias.is_some(), 2.0);
        }
        // as the CUDA backend: a misaligned width in two products, written padded, then copied out
        let (main, rest) = crate::backend::aligned_split(m);
        for cols in [main, rest].into_iter().filter(|&c| c > 0) {
            self.gemm((cols, n, k), false, bias.is_some());
        }
        if crate::backend::aligned_ld(m) != m {
            self.elementwise("copy", n * m, n * m);
        }
    }
    fn matmul_fwd_add(&self, out: &mut VBuf, inp: &VBuf, w: &VBuf, bias: Option<&VBuf>, res: &VBuf, n: usize, k: usize, m: usize) {
        let _op = self.op_kind("matmul");
        if crate::backend::aligned_ld(m) != m {
            self.matmul_fwd(out, inp, w, bias, n, k, m);
            return self.add_assign(out, res);
        }
        // as the CUDA backend: one product reading the skip connection as its `C`
        self.reads(&[res]);
        self.cast_operands(&[w, inp], Some(0), &[true, true]);
        self.gemm((m, n, k), true, bias.is_some());
    }
    fn matmul_bwd(
        &self,
        dinp: Option<&mut VBuf>,
        dw: Option<&mut VBuf>,
        dbias: Option<&mut VBuf>,
        dout: &VBuf,
        inp: &VBuf,
        w: &VBuf,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let _op = self.op_kind("matmul");
        if dbias.is_some() {
            self.reads(&[dout]);
        }
        self.products_bwd_cost(dinp.as_deref(), dw.is_some(), dbias.is_some(), dout, inp, w, (n, k, m), None)
    }

    fn act_matmul_bwd(
        &self,
        act: Activation,
        dinp: Option<&mut VBuf>,
        dw: Option<&mut VBuf>,
        dbias: Option<&mut VBuf>,
        dpre: &mut VBuf,
        dact: &VBuf,
        pre: &VBuf,
        inp: &VBuf,
        w: &VBuf,
        n: usize,
        k: usize,
        m: usize,
    ) {
        let _op = self.op_kind("matmul");
        let pre16 = self.read_as_bf16(pre);
        self.products_bwd_cost(dinp.as_deref(), dw.is_some(), dbias.is_some(), dpre, inp, w, (n, k, m), Some((act, pre16, dact)))
    }

    fn attention_fwd(&self, out: &mut VBuf, _stats: &mut VBuf, qkv: &VBuf, _key_mask: &VIds, shape: AttnShape, _imp: AttnImpl) {
        let _op = self.op_kind("attention");
        self.attention_fwd_cost(out, qkv, shape, false)
    }
    fn has_attention_dropout(&self) -> bool {
        true
    }
    fn attention_fwd_dropout(&self, out: &mut VBuf, _stats: &mut VBuf, qkv: &VBuf, _key_mask: &VIds, shape: AttnShape, _imp: AttnImpl, _drop: DropoutMask) {
        let _op = self.op_kind("attention");
        self.attention_fwd_cost(out, qkv, shape, true)
    }
    fn attention_bwd_dropout(
        &self,
        _dqkv: &mut VBuf,
        dout: &VBuf,
        qkv: &VBuf,
        out: &VBuf,
        _stats: &VBuf,
        _key_mask: &VIds,
        shape: AttnShape,
        _imp: AttnImpl,
        _drop: DropoutMask,
    ) {
        let _op = self.op_kind("attention");
        self.attention_bwd_cost((dout, out), qkv, shape, true)
    }
    fn attention_bwd(&self, _dqkv: &mut VBuf, dout: &VBuf, qkv: &VBuf, out: &VBuf, _stats: &VBuf, _key_mask: &VIds, shape: AttnShape, _imp: AttnImpl) {
        let _op = self.op_kind("attention");
        self.attention_bwd_cost((dout, out), qkv, shape, false)
    }
    fn kv_append(&self, _k: &mut VBuf, _v: &mut VBuf, _qkv: &VBuf, _slot: usize, s: AttnShape, _max_len: usize) {
        let _op = self.op_kind("attention");
        let n = s.rows() * 2 * s.n_kv_head * s.head_dim;
        self.elementwise("generation", n, n);
    }
    fn attention_decode(&self, _out: &mut VBuf, _qkv: &VBuf, _k: &VBuf, _v: &VBuf, _mask: &VIds, slot: usize, s: AttnShape, _max_len: usize) {
        let _op = self.op_kind("attention");
        let keys = (slot + 1) * s.batch * s.n_kv_head * s.head_dim;
        let q = s.batch * s.n_head * s.head_dim;
        self.rec(
            "generation",
            Cost {
                read: 4.0 * (2 * keys + q + (slot + 1) * s.batch) as f64,
                written: 4.0 * q as f64,
                fp32_flops: 4.0 * ((slot + 1) * q) as f64,
                ..Cost::default()
            },
        );
    }
    fn rope(&self, qkv: &mut VBuf, _positions: &VIds, s: AttnShape, _theta: f32, _inverse: bool) {
        let _op = self.op_kind("rope");
        self.reads(&[qkv]);
        let n = s.rows() * (s.n_head + s.n_kv_head) * s.head_dim;
        self.elementwise("rope", n + s.rows(), n);
    }

    fn gelu_fwd(&self, out: &mut VBuf, x: &VBuf) {
        let _op = self.op_kind("activation");
        let read = self.act_input(x);
        let written = self.produced(out);
        self.elementwise("activation", read, written);
    }
    fn gelu_bwd(&self, _dx: &mut VBuf, x: &VBuf, dout: &VBuf) {
        let _op = self.op_kind("activation");
        self.widen(dout);
        self.reads(&[dout]);
        self.elementwise("activation", self.act_input(x) + x.len, x.len);
    }
    fn swiglu_fwd(&self, out: &mut VBuf, x: &VBuf, _i: usize) {
        let _op = self.op_kind("activation");
        let read = self.act_input(x);
        let written = self.produced(out);
        self.elementwise("activation", read, written);
    }
    fn swiglu_bwd(&self, _dx: &mut VBuf, x: &VBuf, dout: &VBuf, _i: usize) {
        let _op = self.op_kind("activation");
        self.widen(dout);
        self.reads(&[dout]);
        self.elementwise("activation", self.act_input(x) + x.len / 2, x.len);
    }
    fn add(&self, _out: &mut VBuf, a: &VBuf, b: &VBuf) {
        let _op = self.op_kind("residual");
        self.reads(&[a, b]);
        self.elementwise("residual", 2 * a.len, a.len);
    }
    fn dropout(&self, x: &mut VBuf, _mask: DropoutMask) {
        let _op = self.op_kind("dropout");
        self.reads(&[x]);
        self.forget(x);
        self.elementwise("dropout", x.len, x.len);
    }
    fn add_cols(&self, dst: &mut VBuf, src: &VBuf, rows: usize, width: usize, _ld: usize, _off: usize, _scale: f32) {
        let _op = self.op_kind("adapter");
        self.reads(&[dst, src]);
        self.forget(dst);
        self.elementwise("adapter", 2 * rows * width, rows * width);
    }
    fn take_cols(&self, _dst: &mut VBuf, src: &VBuf, rows: usize, width: usize, _ld: usize, _off: usize, _scale: f32) {
        let _op = self.op_kind("adapter");
        self.reads(&[src]);
        self.elementwise("adapter", rows * width, rows * width);
    }
    fn lora_up(&self, out: &mut VBuf, t: &VBuf, b: &VBuf, blk: ColBlock, rank: usize, _scale: f32, add: bool) {
        let _op = self.op_kind("matmul");
        // as the CUDA backend: one product accumulated into the block's columns
        self.cast_operands(&[b, t], Some(0), &[true, true]);
        self.forget(out);
        self.gemm((blk.width, blk.rows, rank), add, false);
    }
    fn lora_up_bwd(&self, (_, add): (&mut VBuf, bool), db: Option<&mut VBuf>, dout: &VBuf, t: &VBuf, b: &VBuf, blk: ColBlock, rank: usize, _scale: f32) {
        let _op = self.op_kind("matmul");
        // the products read the block's columns of the output gradient (or its bf16 copy) in place
        self.cast_operands(&[dout, b, t], Some(1), &[true, true, db.is_some()]);
        self.gemm((rank, blk.rows, blk.width), add, false);
        if db.is_some() {
            self.gemm((rank, blk.width, blk.rows), true, false);
        }
    }
    fn lora_down_bwd(&self, dx: Option<&mut VBuf>, da: Option<&mut VBuf>, dt: &VBuf, x: &VBuf, a: &VBuf, rows: usize, k: usize, rank: usize) {
        let _op = self.op_kind("matmul");
        // as matmul_bwd, the input gradient accumulated (made f32 first if only its copy was written)
        if let Some(dx) = dx.as_deref() {
            self.widen(dx);
        }
        self.cast_operands(&[dt, a, x], Some(1), &[dx.is_some() || da.is_some(), dx.is_some(), da.is_some()]);
        if dx.is_some() {
            self.gemm((k, rows, rank), true, false);
        }
        if da.is_some() {
            self.gemm((k, rank, rows), true, false);
        }
    }
    fn dora_norm(&self, n: &mut VBuf, _w: &VBuf, _a: &VBuf, _b: &VBuf, _off: usize, cols: usize, k: usize, r: usize, _scale: f32) {
        let _op = self.op_kind("adapter");
        self.forget(n);
        let c = Cost {
            read: 4.0 * (cols * k + r * k + cols * r) as f64,
            written: 4.0 * cols as f64,
            fp32_flops: (2 * cols * k * (r + 1)) as f64,
            ..Cost::default()
        };
        self.rec("adapter", c);
    }
    fn dora_fwd(&self, out: &mut VBuf, base: Option<&VBuf>, _bias: Option<&VBuf>, _u: &VBuf, _m: &VBuf, _n: &VBuf, blk: ColBlock, _scale: f32) {
        let _op = self.op_kind("adapter");
        self.forget(out);
        let e = blk.rows * blk.width;
        self.elementwise("adapter", e * (2 + base.is_some() as usize) + 3 * blk.width, e);
    }
    fn dora_bwd(
        &self,
        dm: Option<(&mut VBuf, &VBuf, &VBuf)>,
        gu: Option<&mut VBuf>,
        gb: Option<(&mut VBuf, f32)>,
        _dout: &VBuf,
        _m: &VBuf,
        _n: &VBuf,
        blk: ColBlock,
        _scale: f32,
    ) {
        let _op = self.op_kind("adapter");
        let e = blk.rows * blk.width;
        if dm.is_some() {
            self.column_sums("adapter", 3 * e + blk.width, blk.rows, blk.width, 1);
        }
        let outs = gu.is_some() as usize + gb.is_some() as usize;
        if outs > 0 {
            self.elementwise("adapter", e + 2 * blk.width, outs * e);
        }
    }

    fn cross_entropy(&self, logits: &mut VBuf, targets: &VIds, v: usize, smoothing: f32, grad_scale: Option<f32>) -> Result<LossRows> {
        let _op = self.op_kind("cross_entropy");
        let rows = targets.data.len();
        let mut loss = self.zeros(rows)?;
        self.cross_entropy_into(logits, targets, v, smoothing, grad_scale, &mut loss, 0);
        let n_targets = targets.data.iter().filter(|&&t| t != IGNORE_INDEX).count();
        Ok(LossRows { loss: self.download(&loss)?, n_targets })
    }
    fn cross_entropy_into(&self, logits: &mut VBuf, targets: &VIds, v: usize, _smoothing: f32, grad_scale: Option<f32>, _loss: &mut VBuf, _row0: usize) {
        let _op = self.op_kind("cross_entropy");
        // one online pass over each row, and with the gradient a second that overwrites it
        let (rows, grad) = (targets.data.len(), grad_scale.is_some() as usize);
        self.forget(logits);
        self.elementwise("cross-entropy", (1 + grad) * rows * v + rows, grad * rows * v + rows);
    }
    fn head_loss(
        &self,
        logits: &mut VBuf,
        x: &VBuf,
        w: &VBuf,
        targets: &VIds,
        (n, k, v): (usize, usize, usize),
        _smoothing: f32,
        grad_scale: Option<f32>,
        _loss: &mut VBuf,
        _row0: usize,
        back: Option<(&mut VBuf, Option<&mut VBuf>)>,
    ) {
        let _op = self.op_kind("lm_head");
        // as the CUDA backend: the product writes padded rows (no copy out; bf16 logits in bf16
        // mode), the loss reads them twice and writes the gradient over them once (bf16 in bf16
        // mode: the operand of the backward products); those reuse the forward's bf16 input and
        // weight
        self.cast_operands(&[w, x], Some(0), &[true, true]);
        self.forget(logits);
        let zbytes = if self.bf16 { 2.0 } else { 4.0 };
        let (main, rest) = crate::backend::aligned_split(v);
        for cols in [main, rest].into_iter().filter(|&c| c > 0) {
            self.gemm_out((cols, n, k), false, false, zbytes);
        }
        let back = back.filter(|_| grad_scale.is_some());
        let (rows, grad) = (targets.data.len() as f64, back.is_some() as usize as f64);
        let nv = rows * v as f64;
        // bf16 rows staged in shared memory are read once (`cross_entropy_bf16_staged`)
        let reads = if self.bf16 && back.is_some() && crate::backend::loss_row_staged(v, self.chip.smem) { 1.0 } else { 1.0 + grad };
        self.rec("cross-entropy", Cost { read: zbytes * reads * nv + 4.0 * rows, written: zbytes * grad * nv + 4.0 * rows, ..Cost::default() });
        if let Some((dx, dw)) = back {
            self.forget(dx);
            for (len, acc) in [(main, false), (rest, true)].into_iter().filter(|p| p.0 > 0) {
                self.gemm((k, n, len), acc, false);
            }
            if dw.is_some() {
                self.gemm((k, v, n), true, false);
            }
        }
    }
    fn token_stats(&self, _logits: &VBuf, targets: &VIds, v: usize, _want: StatsWanted) -> Result<TokenStats> {
        let _op = self.op_kind("cross_entropy");
        let rows = targets.data.len();
        self.elementwise("cross-entropy", 2 * rows * v + rows, 7 * rows);
        Ok(TokenStats::default())
    }
    fn token_stats_bwd(&self, logits: &mut VBuf, targets: &VIds, v: usize, _stats: &TokenStats, _grads: &StatGrads) {
        let _op = self.op_kind("cross_entropy");
        let rows = targets.data.len();
        self.forget(logits);
        self.elementwise("cross-entropy", rows * v + 7 * rows, rows * v);
    }

    fn check_head_dim(&self, head_dim: usize) -> std::result::Result<(), String> {
        if head_dim > 128 {
            return Err(format!("head dim {head_dim}: the CUDA attention kernels support head dims up to 128"));
        }
        Ok(())
    }
    fn sum_squares(&self, buf: &VBuf) -> Result<f64> {
        let _op = self.op_kind("optimizer");
        self.elementwise("gradient norm", buf.len, 2 * 512);
        Ok(0.0)
    }
    /// As the CUDA backend: one launch, 512 f64 partials per tensor.
    fn sum_squares_multi(&self, bufs: &[&VBuf]) -> Result<Vec<f64>> {
        let _op = self.op_kind("optimizer");
        self.elementwise("gradient norm", bufs.iter().map(|b| b.len).sum(), 2 * 512 * bufs.len());
        Ok(vec![0.0; bufs.len()])
    }
    /// As the CUDA backend: one launch.
    fn fill_multi(&self, bufs: &mut [&mut VBuf], _value: f32) {
        let _op = self.op_kind("fill");
        bufs.iter_mut().for_each(|b| self.forget(b));
        self.elementwise("fill", 0, bufs.iter().map(|b| b.len).sum());
    }
    fn scale(&self, buf: &mut VBuf, _s: f32) {
        let _op = self.op_kind("optimizer");
        self.forget(buf);
        self.elementwise("scale", buf.len, buf.len);
    }
    fn adamw(&self, p: &mut VBuf, g: &VBuf, m: &mut VBuf, v: &mut VBuf, hp: AdamWStep, decay: bool) {
        let _op = self.op_kind("optimizer");
        self.adamw_multi(&mut [(p, g, m, v, decay)], hp);
    }
    fn adamw_multi(&self, tensors: &mut [crate::backend::AdamWArgs<'_, Self>], _hp: AdamWStep) {
        let _op = self.op_kind("optimizer");
        // one launch over every tensor: p, g, m, v read; p, m, v and the bf16 copy written
        let n: usize = tensors.iter().map(|t| t.0.len).sum();
        if n == 0 {
            return;
        }
        let copy = if self.bf16 { 2.0 } else { 0.0 };
        self.rec("adamw", Cost { read: 16.0 * n as f64, written: (12.0 + copy) * n as f64, fp32_flops: 0.0, tensor_flops: 0.0 });
        if self.bf16 {
            let mut st = self.lock();
            for t in tensors.iter().filter(|t| t.0.len > 0) {
                st.copies.insert(t.0.id);
            }
        }
    }
    fn keep_working_copy(&self, w: &VBuf) {
        let _op = self.op_kind("matmul");
        self.keep_copy(w);
    }
    fn drop_working_copy(&self, w: &VBuf) {
        self.lock().copies.remove(&w.id);
    }
    fn begin_operand_reuse(&self, bufs: &[&VBuf]) {
        self.name_reused(bufs);
    }
    fn hold_operand(&self, buf: &VBuf) {
        self.hold(Some(buf), false);
    }
    fn hold_operand_only(&self, buf: &VBuf) {
        self.hold(Some(buf), true);
    }
    /// As the CUDA backend: the hold ends; f32 values left stale stay so until overwritten.
    fn release_operand(&self, buf: &VBuf) {
        self.lock().held.remove(&buf.id);
    }
    fn release_operands(&self) {
        self.hold(None, false);
    }
    fn end_operand_reuse(&self) {
        self.name_reused(&[]);
    }
}
