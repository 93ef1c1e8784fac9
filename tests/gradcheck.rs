//! Finite-difference checks of the analytic gradients on fresh random models and inputs beyond
//! the fixtures: other shapes, grouped-query attention, biases, tied and untied heads, left and
//! right padding, label smoothing, both attention implementations.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runtime::backend::cpu::Cpu;
use runtime::backend::AttnImpl;
use runtime::model::init::init_tensors;
use runtime::model::{Activations, Batch, Grads, Layout, LoadOptions, LossOptions, Model, ModelConfig};
use serde_json::{json, Value};

fn config(v: Value) -> ModelConfig {
    let Value::Object(map) = v else { panic!("object") };
    ModelConfig::from_json(std::path::Path::new("<test>"), map).unwrap()
}

fn random_model(cfg: ModelConfig, attn: AttnImpl, seed: u64) -> Model<Cpu> {
    let layout = Layout::new(&cfg);
    let mut tensors = init_tensors(&cfg, &layout, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for t in &mut tensors {
        for x in t.iter_mut() {
            *x += rng.random_range(-0.1f32..0.1); // biases and norm weights away from 0 and 1
        }
    }
    Model::from_tensors(Cpu, cfg, tensors, LoadOptions { attn_implementation: attn, ..LoadOptions::default() }).unwrap()
}

fn random_batch(vocab: usize, batch: usize, seq: usize, seed: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<i32> = (0..batch * seq).map(|_| rng.random_range(0..vocab as i32)).collect();
    let mut mask = vec![1; batch * seq];
    let mut labels = ids.clone();
    for b in 0..batch {
        let pad = rng.random_range(0..seq / 2);
        for t in 0..pad {
            // even rows pad on the right, odd rows on the left
            let pos = if b % 2 == 0 { seq - 1 - t } else { t };
            mask[b * seq + pos] = 0;
            labels[b * seq + pos] = -100;
        }
    }
    Batch { batch, seq, input_ids: ids, attention_mask: Some(mask), labels: Some(labels), ..Batch::default() }
}

/// The loss with the dropout masks of `key` (a training pass's).
fn loss_with(model: &Model<Cpu>, batch: &Batch, opts: LossOptions, key: Option<u64>) -> f64 {
    let mut acts = Activations::new(model, batch.batch, batch.seq).unwrap();
    acts.set_dropout(key);
    let out = model.forward(&mut acts, batch, opts, false).unwrap().unwrap();
    out.sum / out.n_tokens as f64
}

fn check(name: &str, cfg: ModelConfig, attn: AttnImpl, smoothing: f32, seed: u64) {
    check_model(name, random_model(cfg, attn, seed), smoothing, seed, None);
}

/// Every trainable tensor's gradient (its largest entry and two random ones) against central
/// differences of the loss, with the dropout masks of `key` when given.
fn check_model(name: &str, model: Model<Cpu>, smoothing: f32, seed: u64, key: Option<u64>) {
    check_model_where(name, model, smoothing, seed, key, &|_| true);
}

/// [`check_model`] over the trainable tensors whose name `which` accepts.
fn check_model_where(name: &str, mut model: Model<Cpu>, smoothing: f32, seed: u64, key: Option<u64>, which: &dyn Fn(&str) -> bool) {
    let batch = random_batch(model.config.vocab_size, 3, 9, seed + 2);
    let opts = LossOptions { label_smoothing: smoothing, num_items_in_batch: None };
    let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
    acts.set_dropout(key);
    let mut grads = Grads::zeros(&model).unwrap();
    model.forward_backward(&mut acts, &batch, &mut grads, opts).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 3);
    let h = 1e-2f32;
    let mut checked = 0;
    let trained: Vec<usize> = (0..model.layout.specs.len()).filter(|&i| model.trainable[i] && which(&model.layout.specs[i].name)).collect();
    for &i in &trained {
        let g = &grads.tensors[i];
        let biggest = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        for j in [biggest, rng.random_range(0..g.len()), rng.random_range(0..g.len())] {
            let orig = model.params[i][j];
            model.params[i][j] = orig + h;
            let up = loss_with(&model, &batch, opts, key);
            model.params[i][j] = orig - h;
            let down = loss_with(&model, &batch, opts, key);
            model.params[i][j] = orig;
            let fd = (up - down) / (2.0 * h as f64);
            let an = g[j] as f64;
            assert!((fd - an).abs() <= 1e-3 + 3e-2 * an.abs(), "{name}: {}[{j}]: analytic {an:.6e} vs finite difference {fd:.6e}", model.layout.specs[i].name);
            checked += 1;
        }
    }
    assert!(checked >= 3 * trained.len());
}

/// Dropout (embeddings, residual branches, a LoRA adapter's input) is part of the function the
/// gradients are of: with a training pass's masks fixed, they match finite differences.
#[test]
fn gradients_with_dropout_match_finite_differences() {
    let cfg = json!({"model_type": "gpt2", "vocab_size": 50, "n_positions": 16, "n_embd": 24, "n_layer": 2, "n_head": 3,
        "initializer_range": 0.3, "embd_pdrop": 0.2, "resid_pdrop": 0.3, "attn_pdrop": 0.0});
    let model = random_model(config(cfg), AttnImpl::Flash, 41);
    let batch = random_batch(50, 3, 9, 43);
    let (with, without) = (loss_with(&model, &batch, LossOptions::default(), Some(7)), loss_with(&model, &batch, LossOptions::default(), None));
    assert!(with != without, "the masks change the loss");
    check_model("gpt2 with dropout", model, 0.0, 41, Some(7));
    // dropout on the attention probabilities, in both implementations, which draw the same masks
    let cfg = json!({"model_type": "gpt2", "vocab_size": 50, "n_positions": 16, "n_embd": 24, "n_layer": 2, "n_head": 3,
        "initializer_range": 0.3, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.25});
    let (eager, flash) = (random_model(config(cfg.clone()), AttnImpl::Eager, 44), random_model(config(cfg), AttnImpl::Flash, 44));
    let batch = random_batch(50, 3, 9, 46);
    let (le, lf) = (loss_with(&eager, &batch, LossOptions::default(), Some(5)), loss_with(&flash, &batch, LossOptions::default(), Some(5)));
    assert!((le - lf).abs() < 1e-5 * le.abs(), "eager {le} vs flash {lf} with the same attention masks");
    assert!(le != loss_with(&eager, &batch, LossOptions::default(), None), "attention dropout had no effect");
    check_model("gpt2 eager with attention dropout", eager, 0.0, 44, Some(5));
    check_model("gpt2 flash with attention dropout", flash, 0.0, 44, Some(5));
    let cfg = json!({"model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.3});
    let mut model = random_model(config(cfg), AttnImpl::Flash, 42);
    let peft = json!({"r": 4, "lora_alpha": 8, "lora_dropout": 0.25, "target_modules": "all-linear", "init_lora_weights": false});
    model.add_lora(runtime::model::lora::LoraConfig::from_map(peft.as_object().unwrap(), "test").unwrap(), None, 3).unwrap();
    check_model("llama LoRA with lora_dropout", model, 0.0, 42, Some(9));
    // DoRA on GPT-2's biased Conv1D maps (the fused c_attn one adapter), biases trained, with and
    // without lora_dropout (PEFT recomputes the base map on the dropped-out input)
    for p in [0.0, 0.25] {
        let cfg = json!({"model_type": "gpt2", "vocab_size": 50, "n_positions": 16, "n_embd": 24, "n_layer": 2, "n_head": 3, "initializer_range": 0.3,
            "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0});
        let mut model = random_model(config(cfg), AttnImpl::Flash, 47);
        let peft = json!({"r": 4, "lora_alpha": 8, "lora_dropout": p, "target_modules": ["c_attn", "c_fc", "c_proj"], "use_dora": true,
            "init_lora_weights": false, "bias": "all"});
        model.add_lora(runtime::model::lora::LoraConfig::from_map(peft.as_object().unwrap(), "test").unwrap(), None, 5).unwrap();
        // magnitudes away from the norms they start at
        let mut rng = ChaCha8Rng::seed_from_u64(48);
        let mags: Vec<usize> = (0..model.layout.specs.len()).filter(|&i| model.layout.specs[i].name.ends_with("lora_magnitude_vector")).collect();
        assert_eq!(mags.len(), 8);
        for i in mags {
            model.params[i].iter_mut().for_each(|m| *m *= 1.0 + rng.random_range(-0.5f32..0.5));
        }
        // PEFT holds the weight norm constant in the backward pass (it is detached), so A's and
        // B's gradients are not the loss's derivative; the magnitudes' and the biases' are, and
        // the first layer's take in every term of the second layer's input gradient
        let name = format!("gpt2 DoRA with lora_dropout {p}");
        check_model_where(&name, model, 0.0, 47, Some(11), &|n| !n.contains(".lora_A.") && !n.contains(".lora_B."));
    }
}

#[test]
fn gpt2_gradients_match_finite_differences() {
    let cfg = json!({"model_type": "gpt2", "vocab_size": 50, "n_positions": 16, "n_embd": 24, "n_layer": 2, "n_head": 3, "initializer_range": 0.3});
    check("gpt2 eager", config(cfg.clone()), AttnImpl::Eager, 0.0, 11);
    check("gpt2 flash smoothed", config(cfg), AttnImpl::Flash, 0.1, 12);
}

#[test]
fn llama_gqa_gradients_match_finite_differences() {
    let cfg = json!({"model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 10, "rope_theta": 500.0, "initializer_range": 0.3,
        "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": true});
    check("llama flash", config(cfg.clone()), AttnImpl::Flash, 0.0, 21);
    check("llama eager smoothed", config(cfg), AttnImpl::Eager, 0.2, 22);
}

#[test]
fn qwen2_gradients_match_finite_differences() {
    let cfg = json!({"model_type": "qwen2", "vocab_size": 30, "hidden_size": 36, "intermediate_size": 20, "num_hidden_layers": 1,
        "num_attention_heads": 6, "num_key_value_heads": 2, "initializer_range": 0.3});
    check("qwen2 flash", config(cfg), AttnImpl::Flash, 0.0, 31);
}

/// The same gradients, bit for bit, with 1 and 2 threads: every reduction's order is fixed.
#[test]
fn gradients_do_not_depend_on_the_thread_count() {
    let cfg = json!({"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.1});
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let model = random_model(config(cfg.clone()), AttnImpl::Flash, 5);
            let batch = random_batch(300, 4, 200, 6);
            let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
            let mut grads = Grads::zeros(&model).unwrap();
            let loss = model.forward_backward(&mut acts, &batch, &mut grads, LossOptions::default()).unwrap();
            (loss.sum, grads.tensors)
        })
    };
    let (l1, g1) = run(1);
    let (l2, g2) = run(2);
    assert_eq!(l1.to_bits(), l2.to_bits(), "loss differs between 1 and 2 threads");
    assert!(g1 == g2, "gradients differ between 1 and 2 threads");
}

/// Gradient checkpointing recomputes each layer in backward, and `recompute_activations` each
/// layer's norm outputs and MLP activation: the same gradients, bit for bit, in each of the four
/// combinations, each with less memory than keeping everything; the batch planner's estimate is
/// what is allocated.
#[test]
fn gradient_checkpointing_gives_the_same_gradients_with_less_memory() {
    for (cfg, attn) in [
        (json!({"model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 4, "n_head": 4}), AttnImpl::Eager),
        (
            json!({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}),
            AttnImpl::Flash,
        ),
    ] {
        let batch = random_batch(64, 3, 20, 8);
        let mut results = Vec::new();
        for (ckpt, recompute) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut model = random_model(config(cfg.clone()), attn, 9);
            model.gradient_checkpointing = ckpt;
            model.recompute_activations = recompute;
            let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
            let mut grads = Grads::zeros(&model).unwrap();
            let loss = model.forward_backward(&mut acts, &batch, &mut grads, LossOptions::default()).unwrap();
            // after the pass, which allocates the logits; the estimate also counts the four id
            // buffers (ids, positions, mask, targets)
            let bytes = acts.bytes(&model.backend);
            let ids = 4 * 4 * batch.batch * batch.seq;
            assert_eq!(Activations::estimate_bytes(&model, batch.batch, batch.seq), (bytes + ids) as u128, "{cfg}: the estimate");
            results.push((loss.sum, grads.tensors, bytes));
        }
        let full = &results[0];
        for (i, r) in results.iter().enumerate().skip(1) {
            assert_eq!(full.0.to_bits(), r.0.to_bits(), "{cfg}: loss in setting {i}");
            assert!(full.1 == r.1, "{cfg}: gradients differ in setting {i}");
        }
        let bytes: Vec<usize> = results.iter().map(|r| r.2).collect();
        // under checkpointing one layer's buffers are kept either way; recomputing still lets the
        // backward pass's scratch, the logits and the branch outputs take turns
        assert!(bytes[1] < bytes[0] && bytes[2] < bytes[0] && bytes[3] < bytes[1], "{cfg}: bytes {bytes:?}");
    }
}

/// The backward pass says when each group of gradients is complete: every parameter exactly
/// once, the layers from the last to the first, and at that moment the group's gradients are
/// already what the whole pass ends with (what a data-parallel collective needs to start
/// reducing them while the backward pass goes on), and in the groups and order that
/// `Model::grad_groups` announces. Tied and untied heads, with and without gradient
/// checkpointing.
#[test]
fn gradients_ready_reports_each_parameter_once_when_its_gradient_is_final() {
    for (cfg, ckpt) in [
        (json!({"model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 3, "n_head": 4}), false),
        (
            json!({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": false}),
            true,
        ),
    ] {
        let mut model = random_model(config(cfg.clone()), AttnImpl::Flash, 21);
        model.gradient_checkpointing = ckpt;
        let batch = random_batch(64, 2, 12, 22);
        let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
        let mut grads = Grads::zeros(&model).unwrap();
        let mut seen: Vec<(Vec<usize>, Vec<Vec<f32>>)> = Vec::new();
        model
            .forward_backward_with(&mut acts, &batch, &mut grads, LossOptions::default(), None, &mut |group: &[usize], bufs: &mut [Vec<f32>]| {
                seen.push((group.to_vec(), group.iter().map(|&i| bufs[i].clone()).collect()));
            })
            .unwrap();
        let mut all: Vec<usize> = seen.iter().flat_map(|(g, _)| g.clone()).collect();
        all.sort();
        assert_eq!(all, (0..model.layout.specs.len()).collect::<Vec<_>>(), "{cfg}: every parameter exactly once");
        for (group, at_the_time) in &seen {
            for (&i, snapshot) in group.iter().zip(at_the_time) {
                assert!(snapshot == &grads.tensors[i], "{cfg}: `{}` changed after it was reported ready", model.layout.specs[i].name);
            }
        }
        // the layers come from the last to the first, between the final norm and the embeddings
        let layer_of = |g: &[usize]| model.layout.layers.iter().position(|lp| lp.qkv_w == g[0] || g.contains(&lp.qkv_w));
        let order: Vec<usize> = seen.iter().filter_map(|(g, _)| layer_of(g)).collect();
        assert_eq!(order, vec![2, 1, 0], "{cfg}");
        assert!(seen.first().unwrap().0.contains(&model.layout.lnf_w) && seen.last().unwrap().0.contains(&model.layout.wte), "{cfg}");
        // the groups the model announces (a collective lays out its buckets by them) are the
        // ones it reports, in its order
        let reported: Vec<Vec<usize>> = seen.iter().map(|(g, _)| g.clone()).collect();
        assert_eq!(model.grad_groups(), reported, "{cfg}");
    }
}

/// A frozen parameter (`Model::trainable` false) gets no gradient from the linear products and
/// no update from the optimizer; the trainable ones get exactly the gradients and updates they
/// get with nothing frozen. A frozen linear weight or embedding holds no gradient buffer and no
/// optimizer moments (a frozen norm keeps a gradient buffer: the norm ops always write it).
#[test]
fn frozen_weights_get_no_gradient_and_no_update() {
    use runtime::engine::{AdamWConfig, MicroLoss, MicroOptions, Step};
    let cfg = json!({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": false});
    let batch = random_batch(64, 2, 10, 31);
    let linears = |m: &Model<Cpu>| m.layout.layers.iter().flat_map(|lp| [lp.qkv_w, lp.fc_w]).collect::<Vec<usize>>();
    // everything but the LM head: embeddings and norms too
    let all_but_head = |m: &Model<Cpu>| (0..m.layout.specs.len()).filter(|&i| Some(i) != m.layout.lm_head).collect::<Vec<usize>>();
    for freeze_set in [linears as fn(&Model<Cpu>) -> Vec<usize>, all_but_head] {
        let run = |freeze: bool| {
            let mut model = random_model(config(cfg.clone()), AttnImpl::Flash, 30);
            let frozen = freeze_set(&model);
            if freeze {
                frozen.iter().for_each(|&i| model.trainable[i] = false);
            }
            let norms: Vec<usize> = model.layout.layers.iter().flat_map(|lp| [lp.ln1_w, lp.ln2_w]).chain([model.layout.lnf_w]).collect();
            let before = model.tensors().unwrap();
            let mut step = Step::new(model, AdamWConfig { lr: 1e-2, ..AdamWConfig::default() }).unwrap();
            for &i in frozen.iter().filter(|_| freeze) {
                assert!(step.opt.exp_avg[i].is_none() && step.opt.exp_avg_sq[i].is_none(), "frozen tensor {i} has optimizer moments");
                let want = if norms.contains(&i) { before[i].len() } else { 0 };
                assert_eq!(step.grads.tensors[i].len(), want, "frozen tensor {i}'s gradient buffer");
            }
            step.zero_grad().unwrap();
            step.micro_batch(&batch, MicroLoss::BuiltIn(LossOptions::default()), MicroOptions::default()).unwrap();
            let (norm, coef) = step.grad_norm(0.0).unwrap();
            let grads = step.grads.tensors.clone();
            step.apply(1e-2, coef).unwrap();
            (frozen, before, grads, step.model.tensors().unwrap(), norm)
        };
        let (frozen, before, g_frozen, after_frozen, norm_frozen) = run(true);
        let (_, _, g_all, after_all, norm_all) = run(false);
        for i in 0..before.len() {
            if frozen.contains(&i) {
                assert!(after_frozen[i] == before[i], "frozen tensor {i} was updated");
                assert!(after_all[i] != before[i], "tensor {i} is updated when trainable");
            } else {
                assert!(g_frozen[i] == g_all[i], "tensor {i}: a trainable gradient changed when others were frozen");
                assert!(after_frozen[i] == after_all[i], "tensor {i}: a trainable update changed when others were frozen");
            }
        }
        assert!(norm_frozen < norm_all, "the gradient norm covers trainable parameters only ({norm_frozen} vs {norm_all})");
    }
}

/// A collective that records what the step tells it.
#[derive(Default)]
struct Recorder {
    ready: Vec<(Vec<usize>, Vec<Vec<f32>>)>,
    reduced: usize,
}

impl runtime::engine::Collective<Cpu> for Recorder {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn grads_ready(&mut self, _: &Cpu, params: &[usize], grads: &mut [Vec<f32>]) -> runtime::error::Result<()> {
        self.ready.push((params.to_vec(), params.iter().map(|&i| grads[i].clone()).collect()));
        Ok(())
    }
    fn all_reduce_grads(&mut self, _: &Cpu, _: &mut Grads<Cpu>) -> runtime::error::Result<()> {
        self.reduced += 1;
        Ok(())
    }
}

/// Through a whole step of two micro-batches, the step's collective is told each trainable
/// parameter exactly once, in the last micro-batch's backward pass (the first one's gradients are
/// not final), with the gradient the window ends with; frozen parameters are never told; and the
/// all-reduce runs once, before the gradient norm.
#[test]
fn the_collective_is_told_each_trainable_gradient_once_when_final() {
    use runtime::engine::{AdamWConfig, Collective, Step};
    use std::sync::{Arc, Mutex};
    struct Shared(Arc<Mutex<Recorder>>);
    impl Collective<Cpu> for Shared {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            1
        }
        fn grads_ready(&mut self, be: &Cpu, params: &[usize], grads: &mut [Vec<f32>]) -> runtime::error::Result<()> {
            self.0.lock().unwrap().grads_ready(be, params, grads)
        }
        fn all_reduce_grads(&mut self, be: &Cpu, grads: &mut Grads<Cpu>) -> runtime::error::Result<()> {
            let mut r = self.0.lock().unwrap();
            r.all_reduce_grads(be, grads)?;
            // the step's gradients are final here: compare with what was reported
            for (group, seen) in &r.ready {
                for (&i, g) in group.iter().zip(seen) {
                    assert!(g == &grads.tensors[i], "parameter {i} changed after it was reported ready");
                }
            }
            Ok(())
        }
    }
    let cfg = json!({"model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4});
    let mut model = random_model(config(cfg), AttnImpl::Flash, 40);
    let frozen = [model.layout.wte, model.layout.layers[0].fc_w, model.layout.layers[1].ln1_w];
    frozen.iter().for_each(|&i| model.trainable[i] = false);
    let n = model.layout.specs.len();
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let mut step = Step::new(model, AdamWConfig::default()).unwrap();
    step.collective = Box::new(Shared(rec.clone()));
    let window = [random_batch(64, 2, 12, 41), random_batch(64, 2, 12, 42)];
    let report = step.run(&window, LossOptions::default(), 1e-3, 1.0).unwrap();
    assert!(report.applied);
    let r = rec.lock().unwrap();
    assert_eq!(r.reduced, 1);
    let mut told: Vec<usize> = r.ready.iter().flat_map(|(g, _)| g.clone()).collect();
    told.sort();
    let want: Vec<usize> = (0..n).filter(|i| !frozen.contains(i)).collect();
    assert_eq!(told, want, "each trainable parameter once, no frozen one");
}
