//! The roofline account of the CUDA backend (`backend/roofline`): the bytes of each op family
//! against hand counts from the kernels' access patterns (docs/KERNELS.md), and the launches of a
//! whole training step against a count from the model's structure.

use runtime::backend::roofline::{chip, Account, Chip, Roofline};
use runtime::backend::{loss_row_staged, Activation, AdamWStep, AttnImpl, AttnShape, Backend, SharedMemory};
use runtime::bench::{run_roofline, BenchConfig};

fn bytes(acc: &Account, family: &str) -> (f64, f64) {
    acc.families.get(family).map_or((0.0, 0.0), |f| (f.read, f.written))
}

fn h100(bf16: bool) -> Roofline {
    Roofline::new(chip("h100").unwrap(), bf16)
}

#[test]
fn products_count_their_operands_and_the_bf16_casts() {
    let be = h100(true);
    let (n, k, m) = (5, 4, 6);
    let (mut w, g, mut mo, mut v) = (be.zeros(m * k).unwrap(), be.zeros(m * k).unwrap(), be.zeros(m * k).unwrap(), be.zeros(m * k).unwrap());
    let (inp, bias, mut out) = (be.zeros(n * k).unwrap(), be.zeros(m).unwrap(), be.zeros(n * m).unwrap());
    let (dout, mut dinp, mut db) = (be.zeros(n * m).unwrap(), be.zeros(n * k).unwrap(), be.zeros(m).unwrap());
    let (pre, dact, mut dpre) = (be.zeros(n * m).unwrap(), be.zeros(n * m).unwrap(), be.zeros(n * m).unwrap());
    // no bf16 copy of the weight yet: both operands are cast (4 bytes read, 2 written each)
    be.reset();
    be.matmul_fwd(&mut out, &inp, &w, Some(&bias), n, k, m);
    let acc = be.account();
    assert_eq!(bytes(&acc, "cast to bf16"), ((4 * (m * k + n * k)) as f64, (2 * (m * k + n * k)) as f64));
    // the product: bf16 operands, the bias, the f32 output
    assert_eq!(bytes(&acc, "matmul (cuBLASLt)"), ((2 * (m * k + n * k) + 4 * m) as f64, (4 * n * m) as f64));
    assert_eq!(acc.families["matmul (cuBLASLt)"].tensor_flops, (2 * n * m * k) as f64);
    // after the fused AdamW step (p, g, m, v read; p, m, v and the bf16 copy written) the
    // weight's copy is used
    let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
    be.reset();
    be.adamw_multi(&mut [(&mut w, &g, &mut mo, &mut v, true)], hp);
    assert_eq!(bytes(&be.account(), "adamw"), ((16 * m * k) as f64, (14 * m * k) as f64));
    be.reset();
    be.matmul_fwd(&mut out, &inp, &w, None, n, k, m);
    assert_eq!(bytes(&be.account(), "cast to bf16"), ((4 * n * k) as f64, (2 * n * k) as f64));
    // a frozen weight's backward pass: only dinp, so only dout is cast (the weight has its copy,
    // and no product reads the input)
    be.reset();
    be.matmul_bwd(Some(&mut dinp), None, None, &dout, &inp, &w, n, k, m);
    let acc = be.account();
    assert_eq!(bytes(&acc, "cast to bf16"), ((4 * n * m) as f64, (2 * n * m) as f64));
    assert_eq!(bytes(&acc, "matmul (cuBLASLt)"), ((2 * (k * m + m * n)) as f64, (4 * k * n) as f64));
    // with a bias gradient, dout is read once for its bf16 operand and the column sums: no cast
    // launch; the partials pass reads dout and writes the partials and the bf16 dout, then the
    // partials and the bias are read and the bias written (the weight has its copy)
    be.reset();
    be.matmul_bwd(Some(&mut dinp), None, Some(&mut db), &dout, &inp, &w, n, k, m);
    let acc = be.account();
    assert!(!acc.families.contains_key("cast to bf16"), "{:?}", acc.families.keys());
    assert_eq!(bytes(&acc, "bias gradient"), ((4 * (n * m + m + m)) as f64, (4 * m + 2 * n * m + 4 * m) as f64));
    // the same through a GELU: the pre-activation and the activation's gradient read in that
    // pass instead of dout (no gelu_bwd launch, no f32 gradient written); its reduction as above
    be.reset();
    be.act_matmul_bwd(Activation::Gelu, Some(&mut dinp), None, Some(&mut db), &mut dpre, &dact, &pre, &inp, &w, n, k, m);
    let acc = be.account();
    assert!(!acc.families.contains_key("cast to bf16"), "{:?}", acc.families.keys());
    assert_eq!((acc.families["activation"].launches, acc.families["bias gradient"].launches), (1, 1));
    assert_eq!(bytes(&acc, "activation"), ((4 * 2 * n * m) as f64, (4 * m + 2 * n * m) as f64));
    assert_eq!(bytes(&acc, "bias gradient"), ((4 * (m + m)) as f64, (4 * m) as f64));
    // without a bias gradient, the GELU's backward pass writes dpre in f32 and the product's cast reads it
    be.reset();
    be.act_matmul_bwd(Activation::Gelu, Some(&mut dinp), None, None, &mut dpre, &dact, &pre, &inp, &w, n, k, m);
    let acc = be.account();
    assert_eq!(bytes(&acc, "activation"), ((4 * 2 * n * m) as f64, (4 * n * m) as f64));
    assert_eq!(bytes(&acc, "cast to bf16"), ((4 * n * m) as f64, (2 * n * m) as f64));
    // SwiGLU (m packed gate and up) without a bias: its backward kernel reads x and dout and
    // writes the bf16 operand; no cast, no f32 gradient
    be.reset();
    be.act_matmul_bwd(Activation::SwiGlu { intermediate: m / 2 }, Some(&mut dinp), None, None, &mut dpre, &dact, &pre, &inp, &w, n, k, m);
    let acc = be.account();
    assert!(!acc.families.contains_key("cast to bf16"), "{:?}", acc.families.keys());
    assert_eq!(acc.families["activation"].launches, 1);
    assert_eq!(bytes(&acc, "activation"), ((4 * (n * m + n * m / 2)) as f64, (2 * n * m) as f64));
    // a new buffer takes no live buffer's memory: the weight keeps its copy, as on the device
    // (only the input is cast)
    let _ = be.zeros(1).unwrap();
    be.reset();
    be.matmul_fwd(&mut out, &inp, &w, None, n, k, m);
    assert_eq!(be.account().families["cast to bf16"].launches, 1);
    assert_eq!(bytes(&be.account(), "cast to bf16"), ((4 * n * k) as f64, (2 * n * k) as f64));
    // f32 mode: no casts, 4-byte operands, CUDA-core FLOPs
    let be = h100(false);
    let (w, inp, mut out) = (be.zeros(m * k).unwrap(), be.zeros(n * k).unwrap(), be.zeros(n * m).unwrap());
    be.reset();
    be.matmul_fwd(&mut out, &inp, &w, None, n, k, m);
    let acc = be.account();
    assert!(!acc.families.contains_key("cast to bf16"));
    assert_eq!(bytes(&acc, "matmul (cuBLASLt)"), ((4 * (m * k + n * k)) as f64, (4 * n * m) as f64));
    assert_eq!(acc.families["matmul (cuBLASLt)"].fp32_flops, (2 * n * m * k) as f64);
}

#[test]
fn attention_counts_the_tiles_each_block_reads() {
    // seq 100, 2 query heads on 1 kv head, batch 1
    let be = h100(true);
    let ids = be.upload_ids(&[1; 100]).unwrap();
    // head dim 16: the FMA kernels (64 queries per block, key tiles of 32), bf16 operands
    let s = AttnShape { batch: 1, seq: 100, n_head: 2, n_kv_head: 1, head_dim: 16 };
    let (qkv, mut out, mut stats) = (be.zeros(100 * 4 * 16).unwrap(), be.zeros(100 * 32).unwrap(), be.zeros(200).unwrap());
    be.reset();
    be.attention_fwd(&mut out, &mut stats, &qkv, &ids, s, AttnImpl::Flash);
    let acc = be.account();
    assert_eq!(bytes(&acc, "cast to bf16"), (6400.0 * 4.0, 6400.0 * 2.0));
    // per head: tile 0 (64 queries) reads keys 0..64, tile 1 (36 queries) keys 0..100; each key
    // as K and V (2 bytes a value) and its mask entry (4); out and lse written in f32
    let read_head = 2 * 16 * (64 + 2 * 64) + 4 * 64 + 2 * 16 * (36 + 2 * 100) + 4 * 100;
    assert_eq!(bytes(&acc, "attention forward"), ((2 * read_head) as f64, (2 * 4 * 100 * 17) as f64));
    assert_eq!(acc.families["attention forward"].fp32_flops, (2 * (4 * 64 * 64 * 16 + 4 * 36 * 100 * 16)) as f64);

    // head dim 64: tensor cores (128 queries per block, key tiles of 64)
    let s = AttnShape { head_dim: 64, ..s };
    let (qkv, mut out, mut dqkv, dout) =
        (be.zeros(100 * 4 * 64).unwrap(), be.zeros(100 * 128).unwrap(), be.zeros(100 * 4 * 64).unwrap(), be.zeros(100 * 128).unwrap());
    be.reset();
    be.attention_fwd(&mut out, &mut stats, &qkv, &ids, s, AttnImpl::Flash);
    let acc = be.account();
    assert_eq!(bytes(&acc, "attention forward"), ((2 * (2 * 64 * (100 + 2 * 100) + 4 * 100)) as f64, (2 * 4 * 100 * 65) as f64));
    assert_eq!(acc.families["attention forward"].tensor_flops, (2 * 4 * 100 * 100 * 64) as f64);
    // backward (the two kernels training runs): delta (dout and out read, delta and dout's
    // bf16 copy written); dq per block of 128 queries, for each query head the 100 queries
    // (query, bf16 dout, lse, delta) and the keys up to them in tiles of 64 (K and V, their
    // mask entries), dq written;
    // dk and dv per 64 keys: K and V once, for both query heads the queries from its tile on,
    // dk and dv written. Every column of dqkv is written: nothing is zeroed first
    be.reset();
    be.attention_bwd(&mut dqkv, &dout, &qkv, &out, &stats, &ids, s, AttnImpl::Flash);
    let acc = be.account();
    let q_row = 2 * 64 + 2 * 64 + 8;
    let dq_read = 2 * (100 * q_row + 2 * 2 * 100 * 64 + 4 * 100);
    let kv_read = (2 * 2 * 64 * 64 + 4 * 64 + 2 * 100 * q_row) + (2 * 2 * 36 * 64 + 4 * 36 + 2 * 36 * q_row);
    let written = 2 * 4 * 100 * 64 + 8 * 64 * 64 + 8 * 36 * 64;
    let (delta_read, delta_written) = (2 * 4 * 100 * 128, 4 * 200 + 2 * 100 * 128);
    assert_eq!(bytes(&acc, "attention backward"), ((delta_read + dq_read + kv_read) as f64, (delta_written + written) as f64));
    assert_eq!(bytes(&acc, "fill"), (0.0, 0.0));
    assert_eq!(acc.families["attention backward"].launches, 3);
    // dq: 3 products per (query, key) pair of a tile; dk and dv: 4
    let flops = 2 * 3 * 2 * 100 * 100 * 64 + 2 * 4 * 2 * 64 * (100 * 64 + 36 * 36);
    assert_eq!(acc.families["attention backward"].tensor_flops, flops as f64);
    // with the output held (its copy written beside it by the forward pass) and dout held only
    // (its product wrote the copy alone): delta reads both as bf16 and writes no copy of dout;
    // the other two kernels read dout's held copy as they read the scratch copy
    let (mut out2, mut dout2, w, x) = (be.zeros(100 * 128).unwrap(), be.zeros(100 * 128).unwrap(), be.zeros(128 * 128).unwrap(), be.zeros(100 * 128).unwrap());
    be.hold_operand(&out2);
    be.attention_fwd(&mut out2, &mut stats, &qkv, &ids, s, AttnImpl::Flash);
    be.hold_operand_only(&dout2);
    be.keep_working_copy(&w);
    be.hold_operand(&x);
    be.matmul_bwd(Some(&mut dout2), None, None, &x, &x, &w, 100, 128, 128);
    be.reset();
    be.attention_bwd(&mut dqkv, &dout2, &qkv, &out2, &stats, &ids, s, AttnImpl::Flash);
    let held = be.account();
    let (r0, w0) = bytes(&acc, "attention backward");
    assert_eq!(bytes(&held, "attention backward"), (r0 - (4 * 100 * 128) as f64, w0 - (2 * 100 * 128) as f64));
    assert!(held.stale_reads.is_empty() && !held.families.contains_key("cast to f32"));
    // an output held `only`: the forward pass writes the lse and the bf16 copy, no f32 values;
    // the backward pass reads the copy as above, no stale read
    let mut out3 = be.zeros(100 * 128).unwrap();
    be.hold_operand_only(&out3);
    be.reset();
    be.attention_fwd(&mut out3, &mut stats, &qkv, &ids, s, AttnImpl::Flash);
    assert_eq!(bytes(&be.account(), "attention forward").1, (2 * 4 * 100 + 2 * 100 * 128) as f64);
    be.hold_operand_only(&dout2);
    be.matmul_bwd(Some(&mut dout2), None, None, &x, &x, &w, 100, 128, 128);
    be.reset();
    be.attention_bwd(&mut dqkv, &dout2, &qkv, &out3, &stats, &ids, s, AttnImpl::Flash);
    assert_eq!(bytes(&be.account(), "attention backward"), bytes(&held, "attention backward"));
    assert!(be.account().stale_reads.is_empty());
    // head dim 16 (the FMA kernels read dout in f32): the copy is widened first
    let s16 = AttnShape { head_dim: 16, ..s };
    let (qkv16, mut out16, mut dqkv16, mut dout16, w16, x16) = (
        be.zeros(100 * 4 * 16).unwrap(),
        be.zeros(100 * 32).unwrap(),
        be.zeros(100 * 4 * 16).unwrap(),
        be.zeros(100 * 32).unwrap(),
        be.zeros(32 * 32).unwrap(),
        be.zeros(100 * 32).unwrap(),
    );
    be.hold_operand(&out16);
    be.attention_fwd(&mut out16, &mut stats, &qkv16, &ids, s16, AttnImpl::Flash);
    be.hold_operand_only(&dout16);
    be.keep_working_copy(&w16);
    be.hold_operand(&x16);
    be.matmul_bwd(Some(&mut dout16), None, None, &x16, &x16, &w16, 100, 32, 32);
    be.reset();
    be.attention_bwd(&mut dqkv16, &dout16, &qkv16, &out16, &stats, &ids, s16, AttnImpl::Flash);
    let fma = be.account();
    assert_eq!(bytes(&fma, "cast to f32"), ((2 * 100 * 32) as f64, (4 * 100 * 32) as f64));
    assert!(fma.stale_reads.is_empty());
}

#[test]
fn the_loss_norms_and_embedding_count_their_passes() {
    let be = h100(true);
    let (rows, v, c) = (3, 10, 8);
    let targets = be.upload_ids(&[1, -100, 4]).unwrap();
    let (mut logits, mut loss) = (be.zeros(rows * v).unwrap(), be.zeros(rows).unwrap());
    be.reset();
    // with the gradient: one online pass, a second that overwrites the row; the targets and losses
    be.cross_entropy_into(&mut logits, &targets, v, 0.0, Some(1.0), &mut loss, 0);
    assert_eq!(bytes(&be.account(), "cross-entropy"), ((4 * (2 * rows * v + rows)) as f64, (4 * (rows * v + rows)) as f64));
    be.reset();
    be.cross_entropy_into(&mut logits, &targets, v, 0.0, None, &mut loss, 0);
    assert_eq!(bytes(&be.account(), "cross-entropy"), ((4 * (rows * v + rows)) as f64, (4 * rows) as f64));
    // the fused head and loss (bf16, training; an aligned vocabulary of 16, one product each):
    // the input and weight cast once; the product writes bf16 logits, the loss reads them (once,
    // each row staged in shared memory; twice on a chip whose shared memory does not take a
    // row) and writes the gradient over them once in bf16; then the input gradient and the
    // weight gradient from bf16 operands (the weight's accumulated)
    let no_smem = Roofline::new(Chip { smem: SharedMemory { per_block: 0, per_sm: 0 }, ..chip("h100").unwrap() }, true);
    for (be, reads) in [(&be, 1), (&no_smem, 2)] {
        let v = 16;
        let (hx, hw, mut dx, mut dwh) = (be.zeros(rows * c).unwrap(), be.zeros(v * c).unwrap(), be.zeros(rows * c).unwrap(), be.zeros(v * c).unwrap());
        be.reset();
        be.head_loss(&mut logits, &hx, &hw, &targets, (rows, c, v), 0.0, Some(1.0), &mut loss, 0, Some((&mut dx, Some(&mut dwh))));
        let acc = be.account();
        assert_eq!(bytes(&acc, "cast to bf16"), ((4 * (v * c + rows * c)) as f64, (2 * (v * c + rows * c)) as f64));
        assert_eq!(bytes(&acc, "cross-entropy"), ((reads * 2 * rows * v + 4 * rows) as f64, (2 * rows * v + 4 * rows) as f64));
        let products = (2 * (v * c + rows * c) + 2 * (v * c + rows * v) + (2 * (rows * c + rows * v) + 4 * v * c), 2 * rows * v + 4 * (rows * c + v * c));
        assert_eq!(bytes(&acc, "matmul (cuBLASLt)"), (products.0 as f64, products.1 as f64));
        assert_eq!(acc.families["matmul (cuBLASLt)"].launches, 3);
    }
    // which rows are staged: GPT-2's vocabulary (98 KiB of bf16) on the H100 and H200 but not on
    // the A100 (two blocks of it do not fit 164 KiB), and no row of Qwen2's 151936 anywhere
    for (name, gpt2, qwen2) in [("h100", true, false), ("h200", true, false), ("a100", false, false)] {
        let smem = chip(name).unwrap().smem;
        assert_eq!((loss_row_staged(50257, smem), loss_row_staged(151936, smem)), (gpt2, qwen2), "{name}");
    }
    // LayerNorm: x, w and b read, out, mean and rstd written; its backward: dx accumulated, then
    // the parameters' column sums
    let (x, w, b, mut out, mut mean, mut rstd) = (
        be.zeros(rows * c).unwrap(),
        be.zeros(c).unwrap(),
        be.zeros(c).unwrap(),
        be.zeros(rows * c).unwrap(),
        be.zeros(rows).unwrap(),
        be.zeros(rows).unwrap(),
    );
    be.reset();
    be.layernorm_fwd(&mut out, &mut mean, &mut rstd, &x, &w, Some(&b), c, 1e-5);
    assert_eq!(bytes(&be.account(), "norm"), ((4 * (rows * c + 2 * c)) as f64, (4 * (rows * c + 2 * rows)) as f64));
    let (mut dx, mut dw, mut db) = (be.zeros(rows * c).unwrap(), be.zeros(c).unwrap(), be.zeros(c).unwrap());
    be.reset();
    be.layernorm_bwd(&mut dx, &mut dw, Some(&mut db), &out, &x, &w, &mean, &rstd, c);
    // one pass reads dout, x, w, the statistics and dx, and writes dx and one partial per block of
    // 32 rows and parameter; then the partials and the parameters' gradients are read and written
    let blocks = rows.div_ceil(32);
    let fused = (4 * (3 * rows * c + c + 2 * rows), 4 * (rows * c + blocks * 2 * c));
    let reduce = (4 * (blocks * 2 * c + 2 * c), 4 * 2 * c);
    assert_eq!(bytes(&be.account(), "norm"), ((fused.0 + reduce.0) as f64, (fused.1 + reduce.1) as f64));
    assert_eq!(be.account().families["norm"].launches, 2);
    // rows wider than the fused kernel takes: dx in a pass of its own, then the parameters' column
    // sums read dout, x and the statistics again
    let wide = runtime::backend::NORM_FUSED_WIDTH + 1;
    let (wx, ww, mut wdx, mut wdw, mut wdb) =
        (be.zeros(rows * wide).unwrap(), be.zeros(wide).unwrap(), be.zeros(rows * wide).unwrap(), be.zeros(wide).unwrap(), be.zeros(wide).unwrap());
    be.reset();
    be.layernorm_bwd(&mut wdx, &mut wdw, Some(&mut wdb), &wx, &wx, &ww, &mean, &rstd, wide);
    let dx_pass = (4 * (3 * rows * wide + wide + 2 * rows), 4 * rows * wide);
    let params_pass = (4 * (2 * rows * wide + 2 * rows + blocks * 2 * wide + 2 * wide), 4 * (blocks * 2 * wide + 2 * wide));
    assert_eq!(bytes(&be.account(), "norm"), ((dx_pass.0 + params_pass.0) as f64, (dx_pass.1 + params_pass.1) as f64));
    assert_eq!(be.account().families["norm"].launches, 3);
    // the token and position tables: per row its id and its row of each table read, its sum written
    let (wte, wpe) = (be.zeros(v * c).unwrap(), be.zeros(16 * c).unwrap());
    let (ids, pos) = (be.upload_ids(&[1, 2, 3]).unwrap(), be.upload_ids(&[0, 1, 2]).unwrap());
    be.reset();
    be.embedding_fwd(&mut out, &ids, &wte, Some((&wpe, &pos)), c);
    assert_eq!(bytes(&be.account(), "embedding"), ((4 * 2 * rows * (1 + c)) as f64, (4 * rows * c) as f64));
}

/// A whole step of a 2-layer GPT-2 in bf16 (head dim 16: the FMA attention kernels), after a
/// warm-up step: the launches per family follow from the model's structure.
#[test]
fn a_training_step_launches_what_the_model_structure_says() {
    let (layers, hidden, heads, vocab, seq, batch) = (2u64, 64, 4, 256, 32, 2);
    let cfg = BenchConfig {
        arch: "gpt2".into(),
        n_layer: layers as usize,
        hidden,
        n_head: heads,
        n_kv_head: heads,
        intermediate: None,
        vocab,
        seq,
        batch,
        steps: 1,
        warmup: 1,
        attn: AttnImpl::Flash,
        gradient_checkpointing: false,
        loss_chunk_rows: None,
        lora_r: None,
        torch_dtype: None,
        shard: 0,
    };
    let r = run_roofline(&cfg, chip("h100").unwrap(), true).unwrap();
    let launches = |f: &str| r.ops.get(f).map_or(0, |f| f.launches);
    // per layer: 4 products forward, 8 backward (input and weight gradients); the head 1 + 2
    assert_eq!(launches("matmul (cuBLASLt)"), 12 * layers + 3);
    // casts: only the head's input (the fused head and loss writes the logits' gradient in bf16
    // and its backward products reuse the input's copy). The 4 product inputs of a layer are
    // written in bf16 by the ops that compute them (the norms and the GELU alone:
    // `hold_operand_only`; the attention beside its f32 output, which its backward pass reads)
    // and held for the weight gradients' products; qkv, held for the attention's forward and
    // backward passes, is written by its product in bf16 alone; weights have AdamW's copies; each
    // product's dout is cast by its bias gradient's column-sum pass
    assert_eq!(launches("cast to bf16"), 1);
    // attention: 1 forward, 3 backward (delta, dq, dk/dv) per layer
    assert_eq!(launches("attention forward"), layers);
    assert_eq!(launches("attention backward"), 3 * layers);
    // two LayerNorms per layer and the final one: 1 launch forward, 2 backward (dx with the
    // parameters' partial column sums, their reduction); the CUDA backend keeps the norm outputs
    // and the activation (`Backend::recompute_activations` is off)
    assert_eq!(launches("norm"), 3 * (2 * layers + 1));
    // GELU: forward, and backward in the MLP up-projection's partial column sums, per layer
    assert_eq!(launches("activation"), 2 * layers);
    // 4 biases per layer, each a partial column sum and its reduction (the up-projection's
    // partials counted under the GELU's backward pass above)
    assert_eq!(launches("bias gradient"), 7 * layers);
    assert_eq!(launches("adamw"), 1);
    // the gradient norm of every parameter tensor (12 per layer, wte, wpe, the final norm's 2) in
    // one launch, reading each gradient once and writing 512 f64 partials per tensor
    assert_eq!(launches("gradient norm"), 1);
    let tensors = (12 * layers + 4) as f64;
    let params = r.parameters as f64;
    assert_eq!((r.ops["gradient norm"].read, r.ops["gradient norm"].written), (4.0 * params, 8.0 * 512.0 * tensors));
    // zeroing: every gradient in one launch, and the residual stream's gradient
    assert_eq!(launches("fill"), 2);
    assert_eq!(r.ops["fill"].written, 4.0 * (params + (batch * seq * hidden) as f64));
    assert!(r.modeled_mfu > 0.0 && r.modeled_mfu < 1.0, "{}", r.modeled_mfu);
    assert_eq!(r.bytes_per_step, r.ops.values().map(|f| f.read + f.written).sum::<f64>());
    // the modeled time split by op kind adds up, and the kinds are the profiled backend's names:
    // every op kind a profiled run of the same step times has a modeled time
    let by_kind: f64 = r.op_kinds.values().sum();
    assert!((by_kind - r.modeled_step_seconds).abs() <= 1e-9 * r.modeled_step_seconds, "{by_kind} vs {}", r.modeled_step_seconds);
    let measured = runtime::bench::run_profiled(&cfg, runtime::backend::profiled::Profiled::new(runtime::backend::cpu::Cpu)).unwrap();
    for (kind, share) in &measured.ops {
        assert!(*share == 0.0 || r.op_kinds.contains_key(kind), "the profiled `{kind}` has no modeled time: {:?}", r.op_kinds.keys());
    }
    // with the timed calls per step of each kind (whole numbers: every step makes the same
    // calls; two optimizer calls a step, the gradient norm and the fused AdamW step, and one
    // fused head), and the idle wait's round trip
    let kinds = |v: &[(String, f64)]| v.iter().map(|o| o.0.clone()).collect::<Vec<_>>();
    assert_eq!(kinds(&measured.op_calls_per_step), kinds(&measured.ops));
    assert!(measured.op_calls_per_step.iter().all(|(_, n)| *n >= 1.0 && n.fract() == 0.0), "{:?}", measured.op_calls_per_step);
    let calls = |k: &str| measured.op_calls_per_step.iter().find(|o| o.0 == k).map(|o| o.1);
    assert_eq!((calls("optimizer"), calls("lm_head")), (Some(2.0), Some(1.0)), "{:?}", measured.op_calls_per_step);
    assert!(measured.sync_seconds >= 0.0 && measured.sync_seconds < 1e-3, "{}", measured.sync_seconds);
    // (no residual additions: each branch's product adds its skip connection, `matmul_fwd_add`)
    assert!(!r.ops.contains_key("residual"), "{:?}", r.ops.keys());
    for kind in ["matmul", "attention", "norm", "activation", "lm_head", "optimizer", "embedding"] {
        assert!(r.op_kinds.get(kind).is_some_and(|&s| s > 0.0), "no modeled time for {kind}");
    }
}

/// A LoRA step (every linear map of a 2-layer Llama, bf16, after a warm-up step): the frozen
/// weights keep their bf16 copies from step to step, a map's input and output gradient are cast
/// once for the base product and all its adapters, and the up-projections read and write the
/// adapted column blocks in place (no column-block passes).
#[test]
fn a_lora_step_casts_each_shared_operand_once() {
    let layers = 2u64;
    let cfg = BenchConfig {
        arch: "llama".into(),
        n_layer: layers as usize,
        // intermediate 96 * 8 / 3 = 256 and every other width a multiple of 8: one product each
        hidden: 96,
        n_head: 4,
        n_kv_head: 2,
        intermediate: None,
        vocab: 256,
        seq: 32,
        batch: 2,
        steps: 1,
        warmup: 1,
        attn: AttnImpl::Flash,
        gradient_checkpointing: false,
        loss_chunk_rows: None,
        lora_r: Some(4),
        torch_dtype: None,
        shard: 0,
    };
    let r = run_roofline(&cfg, chip("h100").unwrap(), true).unwrap();
    let launches = |f: &str| r.ops.get(f).map_or(0, |f| f.launches);
    // maps per layer: qkv (3 adapters), o, gate_up (2), down: 7 adapters. Forward: 4 base
    // products and 2 per adapter (down, up); backward: per adapter the down product again, the
    // up-projection's 2, the down-projection's weight gradient and its input gradient, and the
    // base map's input gradient, except in the first layer's qkv (frozen embeddings and norm:
    // no input gradient there); the head 1 + 1 (frozen: no weight gradient)
    assert_eq!(launches("matmul (cuBLASLt)"), (4 + 2 * 7) * layers + (4 * 7 + 7 + 4) * layers - 4 + 2);
    // casts, forward (the norms, the attention and SwiGLU write the 4 map inputs in bf16 too; all
    // 4 are held for the backward pass): each adapter's down-projection output, qkv for attention
    // (the adapters add into it after its product); backward: per map its output gradient, per
    // adapter its down-projection output and that output's gradient, qkv again; the head's input
    // (once: see the step above). The weights (frozen and adapters) have their copies.
    assert_eq!(launches("cast to bf16"), (7 + 1) * layers + (4 + 2 * 7 + 1) * layers + 1);
    assert!(!r.ops.contains_key("adapter"), "{:?}", r.ops.keys());
}

/// `Backend::hold_operand_only`: the op that computes a held buffer writes only its bf16 copy,
/// and an op that then reads the f32 values is recorded (the CUDA backend would read stale
/// values there).
#[test]
fn a_buffer_held_only_as_an_operand_is_written_in_bf16_and_its_f32_reads_are_caught() {
    let be = h100(true);
    let (rows, c) = (4, 8);
    let (x, w) = (be.zeros(rows * c).unwrap(), be.zeros(c).unwrap());
    let (mut out, mut rstd, mut other) = (be.zeros(rows * c).unwrap(), be.zeros(rows).unwrap(), be.zeros(rows * c).unwrap());
    be.hold_operand_only(&out);
    be.reset();
    be.rmsnorm_fwd(&mut out, &mut rstd, &x, &w, c, 1e-5);
    // x and w read; the bf16 copy (2 bytes a value) and the statistics written, no f32 output
    assert_eq!(bytes(&be.account(), "norm"), ((4 * (rows * c + c)) as f64, (2 * rows * c + 4 * rows) as f64));
    // a product reads the copy: no cast, nothing stale
    let mut y = be.zeros(rows * c).unwrap();
    let wm = be.zeros(c * c).unwrap();
    be.keep_working_copy(&wm);
    be.reset();
    be.matmul_fwd(&mut y, &out, &wm, None, rows, c, c);
    assert!(!be.account().families.contains_key("cast to bf16"));
    assert!(be.account().stale_reads.is_empty());
    // an elementwise op reading the f32 values is caught
    be.copy(&mut other, &out);
    assert_eq!(be.account().stale_reads, vec!["untimed".to_string()]);
    // a product into a buffer held `only` writes its bf16 copy alone (the f32 bias added first)
    let (mut q, bias) = (be.zeros(rows * c).unwrap(), be.zeros(c).unwrap());
    be.hold_operand_only(&q);
    be.reset();
    be.matmul_fwd(&mut q, &out, &wm, Some(&bias), rows, c, c);
    assert_eq!(bytes(&be.account(), "matmul (cuBLASLt)"), ((2 * (c * c + rows * c) + 4 * c) as f64, (2 * rows * c) as f64));
    be.rmsnorm_fwd(&mut other, &mut rstd, &q, &w, c, 1e-5);
    assert_eq!(be.account().stale_reads, vec!["norm".to_string()]);
    // the activations read such a pre-activation's copy (2 bytes a value), which is no stale read
    let (mut act, mut dx, dact) = (be.zeros(rows * c).unwrap(), be.zeros(rows * c).unwrap(), be.zeros(rows * c).unwrap());
    be.reset();
    be.gelu_fwd(&mut act, &q);
    be.gelu_bwd(&mut dx, &q, &dact);
    assert_eq!(bytes(&be.account(), "activation"), ((2 * rows * c + (2 + 4) * rows * c) as f64, (4 * 2 * rows * c) as f64));
    assert!(be.account().stale_reads.is_empty());
    // a branch's product adding its skip connection reads it as the product's `C`: no addition pass
    let (skip, mut sum) = (be.zeros(rows * c).unwrap(), be.zeros(rows * c).unwrap());
    be.reset();
    be.matmul_fwd_add(&mut sum, &y, &wm, Some(&bias), &skip, rows, c, c);
    let acc = be.account();
    assert_eq!(bytes(&acc, "matmul (cuBLASLt)"), ((2 * (c * c + rows * c) + 4 * (rows * c + c)) as f64, (4 * rows * c) as f64));
    // (only `y` cast: the weight keeps its working copy across the new buffers)
    assert_eq!((acc.families["matmul (cuBLASLt)"].launches, acc.families["cast to bf16"].launches, acc.families.len()), (1, 1, 2));
    // held without `only`, the f32 values are written too and may be read
    be.release_operands();
    be.hold_operand(&out);
    be.reset();
    be.rmsnorm_fwd(&mut out, &mut rstd, &x, &w, c, 1e-5);
    be.copy(&mut other, &out);
    assert_eq!(bytes(&be.account(), "norm").1, (4 * rows * c + 2 * rows * c + 4 * rows) as f64);
    assert!(be.account().stale_reads.is_empty());
}

/// An input gradient held `only`: the product that overwrites it writes its bf16 copy alone, the
/// norm's fused backward pass and the GELU backward's column-sum pass read that copy (2 bytes a
/// value), a kernel without a bf16 form widens it first, and after `release_operand` an op that
/// reads the stale f32 values is caught.
#[test]
fn an_input_gradient_held_only_is_written_and_read_in_bf16() {
    let be = h100(true);
    let (rows, c, i) = (64, 16, 32);
    let (dout, inp, w) = (be.zeros(rows * i).unwrap(), be.zeros(rows * c).unwrap(), be.zeros(i * c).unwrap());
    let (mut dln, mut dw) = (be.zeros(rows * c).unwrap(), be.zeros(i * c).unwrap());
    for b in [&dout, &inp] {
        be.hold_operand(b);
    }
    be.keep_working_copy(&w);
    be.hold_operand_only(&dln);
    be.reset();
    be.matmul_bwd(Some(&mut dln), Some(&mut dw), None, &dout, &inp, &w, rows, c, i);
    // dout and the input cast once (held), then the input gradient: dout and the weight read as
    // bf16, the gradient written as bf16 alone; the weight gradient accumulated in f32
    let acc = be.account();
    let products = (2 * (rows * i + i * c) + 2 * (rows * c + rows * i) + 4 * i * c, 2 * rows * c + 4 * i * c);
    assert_eq!(bytes(&acc, "matmul (cuBLASLt)"), (products.0 as f64, products.1 as f64));
    // the norm's fused backward pass reads it as bf16: dx (read and written), x, w, the statistics
    let (x, nw, mean, rstd, mut dx, mut gw, mut gb) = (
        be.zeros(rows * c).unwrap(),
        be.zeros(c).unwrap(),
        be.zeros(rows).unwrap(),
        be.zeros(rows).unwrap(),
        be.zeros(rows * c).unwrap(),
        be.zeros(c).unwrap(),
        be.zeros(c).unwrap(),
    );
    be.reset();
    be.layernorm_bwd(&mut dx, &mut gw, Some(&mut gb), &dln, &x, &nw, &mean, &rstd, c);
    let blocks = rows.div_ceil(32);
    let fused_read = 4 * (2 * rows * c + c + 2 * rows) + 2 * rows * c;
    assert_eq!(bytes(&be.account(), "norm").0, (fused_read + 4 * (blocks * 2 * c + 2 * c)) as f64);
    assert!(be.account().stale_reads.is_empty() && !be.account().families.contains_key("cast to f32"));
    // after its release the f32 values are still stale: an op reading them is caught
    be.release_operand(&dln);
    let mut other = be.zeros(rows * c).unwrap();
    be.reset();
    be.add(&mut other, &dln, &x);
    assert_eq!(be.account().stale_reads, vec!["residual".to_string()]);
    // a product that writes it in f32 (no hold) makes it current again
    be.matmul_bwd(Some(&mut dln), None, None, &dout, &inp, &w, rows, c, i);
    be.reset();
    be.add(&mut other, &dln, &x);
    assert!(be.account().stale_reads.is_empty());
    // the activation's gradient: read as bf16 by GELU's column-sum pass (2 bytes a value; the
    // pre-activation, not held here, 4), widened for GELU's own kernel (no bias: no fused pass)
    let (pre, mut dact, mut dpre, mut db) = (be.zeros(rows * i).unwrap(), be.zeros(rows * i).unwrap(), be.zeros(rows * i).unwrap(), be.zeros(i).unwrap());
    let (w2, mut dinp2, mut dw2) = (be.zeros(c * i).unwrap(), be.zeros(rows * i).unwrap(), be.zeros(c * i).unwrap());
    be.hold_operand_only(&dact);
    be.matmul_bwd(Some(&mut dact), None, None, &inp, &dout, &w2, rows, i, c);
    be.reset();
    be.act_matmul_bwd(Activation::Gelu, Some(&mut dinp2), Some(&mut dw2), Some(&mut db), &mut dpre, &dact, &pre, &inp, &w, rows, c, i);
    let acc = be.account();
    let partials = blocks * i;
    assert_eq!(bytes(&acc, "activation"), ((4 * rows * i + 2 * rows * i) as f64, (4 * partials + 2 * rows * i) as f64));
    assert!(acc.stale_reads.is_empty() && !acc.families.contains_key("cast to f32"));
    be.hold_operand_only(&dact);
    be.matmul_bwd(Some(&mut dact), None, None, &inp, &dout, &w2, rows, i, c);
    be.reset();
    be.act_matmul_bwd(Activation::Gelu, Some(&mut dinp2), Some(&mut dw2), None, &mut dpre, &dact, &pre, &inp, &w, rows, c, i);
    let acc = be.account();
    assert_eq!(bytes(&acc, "cast to f32"), ((2 * rows * i) as f64, (4 * rows * i) as f64));
    assert!(acc.stale_reads.is_empty());
}

/// A training step whose maps' inputs are held only as operands where nothing else reads them:
/// with LoRA dropout on some maps (their adapters copy the f32 input) and not on others, and with
/// attention dropout (Llama has no residual dropout), no op reads an input's stale f32 values, and
/// the maps without dropped-out adapters keep only the bf16 copies.
#[test]
fn training_with_adapter_dropout_reads_no_stale_activation() {
    use runtime::model::{Activations, Batch, Grads, Layout, LoadOptions, LossOptions, Model, ModelConfig};
    let cfg = serde_json::json!({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "attention_dropout": 0.1});
    let serde_json::Value::Object(map) = cfg else { unreachable!() };
    let cfg = ModelConfig::from_json(std::path::Path::new("<test>"), map).unwrap();
    let tensors = runtime::model::init::init_tensors(&cfg, &Layout::new(&cfg), 1);
    // targets with dropout: q_proj (ln1 is copied by its adapter) and down_proj (the activation
    // is), then o_proj only (no map input is copied: att_out is not a norm's or the MLP's output)
    let mut written = Vec::new();
    for targets in [serde_json::json!(["q_proj", "down_proj"]), serde_json::json!(["o_proj"])] {
        let mut model = Model::from_tensors(h100(true), cfg.clone(), tensors.clone(), LoadOptions::default()).unwrap();
        let peft = serde_json::json!({"r": 4, "lora_alpha": 8, "lora_dropout": 0.25, "target_modules": targets});
        model.add_lora(runtime::model::lora::LoraConfig::from_map(peft.as_object().unwrap(), "test").unwrap(), None, 3).unwrap();
        let (batch, seq) = (2, 8);
        let ids: Vec<i32> = (0..batch * seq).map(|i| (i * 7 % 64) as i32).collect();
        let b = Batch { batch, seq, input_ids: ids.clone(), labels: Some(ids), ..Batch::default() };
        let mut acts = Activations::new(&model, batch, seq).unwrap();
        acts.set_dropout(Some(11));
        let mut grads = Grads::zeros(&model).unwrap();
        model.backend.reset();
        model.forward_backward(&mut acts, &b, &mut grads, LossOptions::default()).unwrap();
        let acc = model.backend.account();
        assert!(acc.stale_reads.is_empty(), "{targets}: {:?}", acc.stale_reads);
        written.push((acc.families["norm"].written, acc.families["activation"].written));
    }
    // GPT-2 with residual, embedding and attention dropout, and adapters with dropout on the MLP's
    // up-projection only (its input, ln2, keeps its f32 values, and so does its output, which the
    // adapters add into; qkv is written by its product in bf16 alone): no stale read either
    let gpt2 = serde_json::json!({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 64, "n_positions": 16,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1});
    let serde_json::Value::Object(map) = gpt2 else { unreachable!() };
    let gcfg = ModelConfig::from_json(std::path::Path::new("<test>"), map).unwrap();
    let gtensors = runtime::model::init::init_tensors(&gcfg, &Layout::new(&gcfg), 2);
    let mut model = Model::from_tensors(h100(true), gcfg, gtensors, LoadOptions::default()).unwrap();
    let peft = serde_json::json!({"r": 4, "lora_alpha": 8, "lora_dropout": 0.25, "target_modules": ["c_fc"]});
    model.add_lora(runtime::model::lora::LoraConfig::from_map(peft.as_object().unwrap(), "test").unwrap(), None, 3).unwrap();
    let ids: Vec<i32> = (0..16).map(|i| i * 5 % 64).collect();
    let b = Batch { batch: 2, seq: 8, input_ids: ids.clone(), labels: Some(ids), ..Batch::default() };
    let mut acts = Activations::new(&model, 2, 8).unwrap();
    acts.set_dropout(Some(7));
    let mut grads = Grads::zeros(&model).unwrap();
    model.backend.reset();
    model.forward_backward(&mut acts, &b, &mut grads, LossOptions::default()).unwrap();
    assert!(model.backend.account().stale_reads.is_empty(), "{:?}", model.backend.account().stale_reads);
    // the first run writes each layer's first norm output and its activation in f32 as well (16
    // rows, widths 32 and 48, 2 layers); everything else is the same
    let rows = 16;
    assert_eq!(written[0].0 - written[1].0, (2 * 4 * rows * 32) as f64);
    assert_eq!(written[0].1 - written[1].1, (2 * 4 * rows * 48) as f64);
}
