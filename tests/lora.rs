//! LoRA against peft: adapters made by `tests/parity/make_lora_fixtures.py` (non-zero A and B on
//! the tiny GPT-2, Llama and Qwen2 bases; all-linear with the head in `modules_to_save`, Conv1D
//! targets with rsLoRA, a regex with per-module ranks and alphas and trained biases) load onto
//! their base, give peft's logits, loss and every trainable gradient, and save back as peft
//! wrote them.

mod common;

use common::{assert_close, fixtures, read_reference};
use runtime::backend::cpu::Cpu;
use runtime::model::{Activations, Grads, LoadOptions, LossOptions, Model};

const CASES: &[(&str, &str)] = &[
    ("llama_all_linear", "llama"),
    ("gpt2_rslora", "gpt2"),
    ("qwen2_regex", "qwen2"),
    ("llama_dora", "llama"),
    ("gpt2_dora", "gpt2"),
    ("qwen2_dora_rslora", "qwen2"),
];

fn with_adapter(case: &str, arch: &str) -> Model<Cpu> {
    let mut model = Model::load(Cpu, &fixtures().join(arch).join("model"), LoadOptions::default()).unwrap();
    model.load_adapter(&fixtures().join("lora").join(case).join("adapter")).unwrap_or_else(|e| panic!("{case}: {e}"));
    model
}

#[test]
fn adapters_match_peft_logits_loss_and_gradients() {
    for &(case, arch) in CASES {
        let model = with_adapter(case, arch);
        let reference = read_reference(&fixtures().join("lora").join(case).join("reference.safetensors"));
        let batch = common::reference_batch(&reference);
        let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
        let out = model.forward(&mut acts, &batch, LossOptions::default(), false).unwrap().unwrap();
        assert_close(&format!("{case} logits"), &acts.logits, &reference["logits"].f32s(), 1e-5);
        let want = reference["loss"].values[0];
        assert!(((out.mean as f64 - want) / want).abs() < 1e-5, "{case} loss {} vs {want}", out.mean);

        let mut grads = Grads::zeros(&model).unwrap();
        model.forward_backward(&mut acts, &batch, &mut grads, LossOptions::default()).unwrap();
        let ours = model.adapter_tensors_of(&grads.tensors).unwrap();
        let n = reference.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(ours.len(), n, "{case}: the trainable tensors are peft's");
        for (key, _, g) in &ours {
            let want = reference.get(&format!("grad.{key}")).unwrap_or_else(|| panic!("{case}: peft has no gradient for {key}"));
            assert_close(&format!("{case} grad {key}"), g, &want.f32s(), 1e-4);
        }
        // the base is frozen: no gradient buffer for its linear weights
        let frozen = model.layout.specs.iter().zip(&model.trainable).filter(|(s, t)| !**t && s.shape.len() == 2).count();
        assert!(frozen > 0);
        for ((spec, t), g) in model.layout.specs.iter().zip(&model.trainable).zip(&grads.tensors) {
            if !t && spec.shape.len() == 2 {
                assert!(g.is_empty(), "{case}: frozen {} holds a gradient buffer", spec.name);
            }
        }
    }
}

/// The CPU runs a plain LoRA map over many rows as one product with its merged weight
/// (docs/TRAINING.md). The fixtures' batch is too short for that, so here it is repeated until
/// every adapted map merges: each copy's logits, the mean loss and every gradient are still
/// peft's.
#[test]
fn merged_adapters_over_a_long_batch_match_peft() {
    for &(case, arch) in CASES.iter().filter(|(c, _)| !c.contains("dora")) {
        let model = with_adapter(case, arch);
        let reference = read_reference(&fixtures().join("lora").join(case).join("reference.safetensors"));
        let one = common::reference_batch(&reference);
        // rows >= 2 max(in, out) merges a map (`nn::merge_pays`: rows (in + out) >= 2 in out)
        let d = model.lora_dims();
        let copies = (2 * d.inp.max(d.out)).div_ceil(one.batch * one.seq);
        assert!(copies > 1, "{case}: the fixture alone is long enough to merge");
        let rep = |v: &Option<Vec<i32>>| v.as_ref().map(|v| v.repeat(copies));
        let batch = runtime::model::Batch {
            batch: one.batch * copies,
            seq: one.seq,
            input_ids: one.input_ids.repeat(copies),
            attention_mask: rep(&one.attention_mask),
            labels: rep(&one.labels),
            ..Default::default()
        };
        let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
        let out = model.forward(&mut acts, &batch, LossOptions::default(), false).unwrap().unwrap();
        assert_close(&format!("{case} logits"), &acts.logits, &reference["logits"].f32s().repeat(copies), 1e-5);
        let want = reference["loss"].values[0];
        assert!(((out.mean as f64 - want) / want).abs() < 1e-5, "{case} loss {} vs {want}", out.mean);
        let mut grads = Grads::zeros(&model).unwrap();
        model.forward_backward(&mut acts, &batch, &mut grads, LossOptions::default()).unwrap();
        for (key, _, g) in &model.adapter_tensors_of(&grads.tensors).unwrap() {
            assert_close(&format!("{case} grad {key}"), g, &reference[&format!("grad.{key}")].f32s(), 1e-4);
        }
    }
}

/// The base of `case` loaded with `torch_dtype = "bfloat16"` (its weights rounded to bf16, held
/// in f32) and the case's adapter on it.
fn bf16_base(case: &str, arch: &str) -> Model<Cpu> {
    let opts = LoadOptions { torch_dtype: Some(runtime::model::Dtype::BF16), ..LoadOptions::default() };
    let mut m = Model::load(Cpu, &fixtures().join(arch).join("model"), opts).unwrap();
    m.load_adapter(&fixtures().join("lora").join(case).join("adapter")).unwrap();
    m
}

/// With `torch_dtype = "bfloat16"` the frozen base is held in bf16 (`Model::hold_frozen_base`):
/// logits, loss, every trainable gradient and greedy generation are bit for bit those of the same
/// bf16-rounded weights held in f32, in half the bytes. A base that is not bf16 is refused.
#[test]
fn a_bf16_held_base_computes_bit_for_bit_as_the_rounded_f32_base() {
    use runtime::generate::{greedy, GreedyOptions};
    for &(case, arch) in CASES {
        let (plain, mut held) = (bf16_base(case, arch), bf16_base(case, arch));
        let saved = held.hold_frozen_base().unwrap();
        let frozen: usize = plain.layout.specs.iter().zip(&plain.trainable).filter(|(_, t)| !**t).map(|(s, _)| s.numel()).sum();
        assert_eq!(saved, 2 * frozen, "{case}: two bytes saved per frozen value");
        assert_eq!(held.frozen.as_ref().unwrap().bytes(), 2 * frozen);
        let reference = read_reference(&fixtures().join("lora").join(case).join("reference.safetensors"));
        let batch = common::reference_batch(&reference);
        let run = |m: &Model<Cpu>| {
            let mut acts = Activations::new(m, batch.batch, batch.seq).unwrap();
            let out = m.forward(&mut acts, &batch, LossOptions::default(), false).unwrap().unwrap();
            let logits = acts.logits.clone();
            let mut grads = Grads::zeros(m).unwrap();
            m.forward_backward(&mut acts, &batch, &mut grads, LossOptions::default()).unwrap();
            (logits, out.mean.to_bits(), m.adapter_tensors_of(&grads.tensors).unwrap())
        };
        let (a, b) = (run(&plain), run(&held));
        assert!(a.0 == b.0, "{case}: logits differ");
        assert_eq!(a.1, b.1, "{case}: loss differs");
        assert_eq!(a.2.len(), b.2.len());
        for ((key, _, x), (_, _, y)) in a.2.iter().zip(&b.2) {
            assert!(x == y, "{case}: gradient of {key} differs");
        }
        let prompts: Vec<Vec<u32>> = (0..2).map(|r| batch.input_ids[r * batch.seq..r * batch.seq + 4].iter().map(|&t| t as u32).collect()).collect();
        let g = GreedyOptions { max_new_tokens: 6, eos_token_id: vec![], pad_token_id: 0 };
        assert_eq!(greedy(&plain, &prompts, &g, |_, _| {}).unwrap(), greedy(&held, &prompts, &g, |_, _| {}).unwrap(), "{case}: generation");
        let w = plain.trainable.iter().position(|t| !t).unwrap();
        assert!(plain.param_values(w).unwrap() == held.param_values(w).unwrap(), "{case}: a held weight's values");
    }
    // weights that bf16 does not hold exactly are not moved
    let mut f32_base = with_adapter("llama_all_linear", "llama");
    let err = f32_base.hold_frozen_in_bf16().unwrap_err().to_string();
    assert!(err.contains("is not a bf16 value") && f32_base.frozen.is_none(), "{err}");
    assert_eq!(f32_base.hold_frozen_base().unwrap(), 0, "an f32 base stays as it is");
}

/// A frozen LM head held in bf16 is made f32 a block of its rows at a time by the fused head and
/// loss (training and evaluation), so the whole head never exists in f32. With blocks of 3 rows,
/// which do not divide any fixture's vocabulary, the loss, the evaluation loss and every adapter
/// gradient match the same bf16-rounded head held whole in f32 (the input gradient is summed
/// block by block, so not bit for bit), and greedy generation gives the same tokens.
#[test]
fn a_bf16_held_head_in_blocks_of_rows_matches_the_whole_head() {
    use runtime::generate::{greedy, GreedyOptions};
    let mut blocked = 0;
    for &(case, arch) in CASES {
        let (plain, mut held) = (bf16_base(case, arch), bf16_base(case, arch));
        held.hold_frozen_base().unwrap();
        if !held.params[held.layout.head()].is_empty() {
            continue; // the head trains (modules_to_save): it is not held
        }
        blocked += 1;
        held.frozen.as_mut().unwrap().head_block_rows = Some(3);
        let reference = read_reference(&fixtures().join("lora").join(case).join("reference.safetensors"));
        let batch = common::reference_batch(&reference);
        let run = |m: &Model<Cpu>| {
            let mut acts = Activations::new(m, batch.batch, batch.seq).unwrap();
            let (eval, _) = m.eval_loss(&mut acts, &batch, LossOptions::default(), None).unwrap();
            let mut grads = Grads::zeros(m).unwrap();
            let out = m.forward_backward(&mut acts, &batch, &mut grads, LossOptions::default()).unwrap();
            (eval.unwrap().mean, out.mean, m.adapter_tensors_of(&grads.tensors).unwrap())
        };
        let (a, b) = (run(&plain), run(&held));
        assert!(((a.0 - b.0) / a.0).abs() < 1e-6, "{case}: evaluation loss {} vs {}", b.0, a.0);
        assert!(((a.1 - b.1) / a.1).abs() < 1e-6, "{case}: loss {} vs {}", b.1, a.1);
        assert_eq!(a.2.len(), b.2.len());
        for ((key, _, x), (_, _, y)) in a.2.iter().zip(&b.2) {
            assert!(x.iter().any(|v| *v != 0.0), "{case}: {key} has a zero gradient");
            assert_close(&format!("{case}: gradient of {key}"), y, x, 1e-5);
        }
        // generation's steps (the prompt's and each new token's) run the head in blocks too
        let prompts: Vec<Vec<u32>> = (0..2).map(|r| batch.input_ids[r * batch.seq..r * batch.seq + 4].iter().map(|&t| t as u32).collect()).collect();
        let g = GreedyOptions { max_new_tokens: 6, eos_token_id: vec![], pad_token_id: 0 };
        assert_eq!(greedy(&plain, &prompts, &g, |_, _| {}).unwrap(), greedy(&held, &prompts, &g, |_, _| {}).unwrap(), "{case}: generation");
    }
    assert!(blocked >= 3, "only {blocked} cases hold their head in bf16");
}

#[test]
fn saved_adapters_are_what_peft_wrote() {
    for &(case, arch) in CASES {
        let model = with_adapter(case, arch);
        let tmp = tempfile::tempdir().unwrap();
        model.write_adapter_into(tmp.path()).unwrap();
        let theirs = read_reference(&fixtures().join("lora").join(case).join("adapter/adapter_model.safetensors"));
        let ours = read_reference(&tmp.path().join("adapter_model.safetensors"));
        let mut a: Vec<_> = ours.keys().collect();
        let mut b: Vec<_> = theirs.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}: the saved keys");
        for (k, t) in &theirs {
            assert_eq!(ours[k].shape, t.shape, "{case} {k}");
            assert_eq!(ours[k].values, t.values, "{case} {k}: saved values");
        }
        // and the saved folder loads again, to the same logits
        let mut again = Model::load(Cpu, &fixtures().join(arch).join("model"), LoadOptions::default()).unwrap();
        again.load_adapter(tmp.path()).unwrap();
        let reference = read_reference(&fixtures().join("lora").join(case).join("reference.safetensors"));
        let batch = common::reference_batch(&reference);
        let mut acts = Activations::new(&again, batch.batch, batch.seq).unwrap();
        again.forward(&mut acts, &batch, LossOptions::default(), false).unwrap();
        assert_close(&format!("{case} logits after a save"), &acts.logits, &reference["logits"].f32s(), 1e-5);
    }
}

#[test]
fn bad_adapters_are_one_clear_error() {
    let base = || Model::load(Cpu, &fixtures().join("llama").join("model"), LoadOptions::default()).unwrap();
    let copy = |case: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let tmp = tempfile::tempdir().unwrap();
        let src = fixtures().join("lora").join(case).join("adapter");
        std::fs::copy(src.join("adapter_model.safetensors"), tmp.path().join("adapter_model.safetensors")).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(tmp.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        tmp
    };
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("llama_all_linear", Box::new(|c| c["peft_type"] = "PREFIX_TUNING".into()), "peft_type `PREFIX_TUNING`"),
        ("llama_all_linear", Box::new(|c| c["lora_alhpa"] = 3.into()), "unknown LoraConfig field `lora_alhpa`"),
        // an adapter of rank 8 read as rank 4: its tensors do not fit
        ("llama_all_linear", Box::new(|c| c["r"] = 4.into()), "lora_A.weight"),
        // a GPT-2 adapter on a Llama base
        ("gpt2_rslora", Box::new(|_| {}), "matches none of the model's linear modules"),
        ("llama_all_linear", Box::new(|c| c["target_modules"] = serde_json::json!(["q_proj", "lm_head"])), "lm_head"),
    ];
    for (case, edit, want) in cases {
        let dir = copy(case, &*edit);
        let e = base().load_adapter(dir.path()).unwrap_err().to_string();
        assert!(e.contains(want), "{case}: {e}");
    }
    // a lora_A stored transposed ([in, r] for [r, in]): the same count of values, refused by
    // its shape (PEFT's size mismatch), not merged wrong
    let dir = copy("llama_all_linear", &|_| {});
    let file = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let shape = if name == key { v.shape().iter().rev().copied().collect() } else { v.shape().to_vec() };
            (name, safetensors::tensor::TensorView::new(v.dtype(), shape, v.data()).unwrap())
        })
        .collect();
    assert_ne!(st.tensor(key).unwrap().shape()[0], st.tensor(key).unwrap().shape()[1], "the case needs a non-square lora_A");
    std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = base().load_adapter(dir.path()).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains("shape"), "{e}");
    let e = base().load_adapter(&fixtures().join("llama").join("model")).unwrap_err().to_string();
    assert!(e.contains("not a PEFT adapter folder"), "{e}");
}

fn flag(k: &str, v: &serde_json::Value) -> Vec<String> {
    let v = match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    vec![format!("--{k}"), v]
}

fn train(args: &[String]) -> std::process::Output {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_runtime")).arg("train").args(args).output().unwrap();
    assert!(o.status.success(), "runtime train failed:\n{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// The arguments of the LoRA trainer fixture (`tests/parity/make_lora_trainer_fixtures.py`).
fn trainer_fixture_args(out: &std::path::Path) -> (Vec<String>, serde_json::Value) {
    let dir = fixtures().join("trainer");
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("lora/reference.json")).unwrap()).unwrap();
    let mut args: Vec<String> = vec!["--disable_tqdm".into(), "true".into(), "--output_dir".into(), out.to_str().unwrap().into()];
    for (k, v) in refs["args"].as_object().unwrap() {
        if k != "report_to" {
            args.extend(flag(k, v));
        }
    }
    for (k, v) in [
        ("model_name_or_path", "init"),
        ("adapter_name_or_path", "lora/init_adapter"),
        ("train_file", "data/train.jsonl"),
        ("validation_file", "data/validation.jsonl"),
    ] {
        args.extend(flag(k, &serde_json::Value::String(dir.join(v).to_str().unwrap().into())));
    }
    (args, refs)
}

/// 12 steps of `runtime train` on a peft adapter against `transformers.Trainer` on a `PeftModel`:
/// the logged loss, gradient norm and learning rate of every step, the evaluation losses and the
/// final adapter agree.
#[test]
fn lora_training_matches_the_trainer_with_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (args, refs) = trainer_fixture_args(&out);
    train(&args);
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
    let ours = state["log_history"].as_array().unwrap();
    let theirs = refs["log_history"].as_array().unwrap();
    let pick =
        |log: &[serde_json::Value], key: &str| -> Vec<(u64, f64)> { log.iter().filter_map(|e| Some((e["step"].as_u64()?, e.get(key)?.as_f64()?))).collect() };
    let mut compared = 0;
    for (key, rel) in [("loss", 1e-5), ("grad_norm", 1e-5), ("learning_rate", 1e-9), ("eval_loss", 1e-5)] {
        let (a, b) = (pick(ours, key), pick(theirs, key));
        assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), b.iter().map(|x| x.0).collect::<Vec<_>>(), "steps logging `{key}`");
        for ((step, x), (_, y)) in a.iter().zip(&b) {
            assert!((x - y).abs() <= rel * y.abs().max(1e-12), "step {step} {key}: runtime {x} vs transformers {y}");
            compared += 1;
        }
    }
    assert!(compared >= 20, "only {compared} values compared");
    // the output is the adapter, as peft saves it, with the trained values
    assert!(!out.join("model.safetensors").exists() && out.join("adapter_config.json").is_file());
    let final_ref = read_reference(&fixtures().join("trainer/lora/final_adapter.safetensors"));
    let ours = read_reference(&out.join("adapter_model.safetensors"));
    assert_eq!(ours.len(), final_ref.len(), "tensor count");
    for (k, v) in &ours {
        assert_close(&format!("final {k}"), &v.f32s(), &final_ref[k].f32s(), 1e-5);
    }
}

/// A LoRA run resumed from its checkpoint ends byte for byte where the uninterrupted run does,
/// and a checkpoint holds the adapter and its optimizer state, not the base; also with the
/// frozen base held in bf16 (`torch_dtype = "bfloat16"`).
#[test]
fn lora_resume_is_exact_and_checkpoints_hold_the_adapter() {
    for dtype in [None, Some("bfloat16")] {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let extra: Vec<String> = dtype.map(|d| vec!["--torch_dtype".to_string(), d.to_string()]).unwrap_or_default();
        let (mut args, _) = trainer_fixture_args(&a);
        args.extend(["--save_strategy", "steps", "--save_steps", "4"].map(String::from));
        args.extend(extra.clone());
        let log = train(&args);
        let held = String::from_utf8_lossy(&log.stderr).contains("frozen base weights are held in bf16");
        assert_eq!(held, dtype.is_some(), "{dtype:?}: the log says whether the base is held in bf16");
        let ckpt = a.join("checkpoint-4");
        let names: Vec<String> = std::fs::read_dir(&ckpt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
        assert!(names.contains(&"adapter_model.safetensors".to_string()) && names.contains(&"optimizer.safetensors".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("model")), "a LoRA checkpoint holds no base weights: {names:?}");
        let adapter = std::fs::metadata(ckpt.join("adapter_model.safetensors")).unwrap().len();
        let base = std::fs::metadata(fixtures().join("trainer/init/model.safetensors")).unwrap().len();
        assert!(adapter * 2 < base, "adapter {adapter} bytes vs base {base}");
        // resume from step 4 in another folder
        std::fs::create_dir_all(&b).unwrap();
        let copy = b.join("checkpoint-4");
        std::fs::create_dir_all(&copy).unwrap();
        for n in &names {
            std::fs::copy(ckpt.join(n), copy.join(n)).unwrap();
        }
        let (mut args_b, _) = trainer_fixture_args(&b);
        args_b.extend(["--save_strategy", "steps", "--save_steps", "4", "--resume_from_checkpoint", "true"].map(String::from));
        args_b.extend(extra);
        train(&args_b);
        let (x, y) = (std::fs::read(a.join("adapter_model.safetensors")).unwrap(), std::fs::read(b.join("adapter_model.safetensors")).unwrap());
        assert!(x == y, "{dtype:?}: the resumed run's adapter differs from the uninterrupted run's");
    }
}

/// `runtime merge` equals peft's `merge_and_unload` (within 1e-6 relative) and writes a plain
/// transformers model; a bad adapter writes nothing.
#[test]
fn merge_equals_peft_merge_and_unload() {
    for &(case, arch) in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let (base, adapter) = (fixtures().join(arch).join("model"), fixtures().join("lora").join(case).join("adapter"));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args([
                "merge",
                "--model",
                base.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--output_dir",
                out.to_str().unwrap(),
                "--torch_dtype",
                "float32",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(out.join("config.json").is_file() && !out.join("adapter_config.json").exists());
        let theirs = read_reference(&fixtures().join("lora").join(case).join("merged.safetensors"));
        let ours = read_reference(&out.join("model.safetensors"));
        for (k, v) in &ours {
            let t = theirs.get(k).unwrap_or_else(|| panic!("{case}: peft's merged model has no {k}"));
            assert_eq!(v.shape, t.shape, "{case} {k}");
            assert_close(&format!("{case} merged {k}"), &v.f32s(), &t.f32s(), 1e-6);
        }
        assert!(ours.len() + 1 >= theirs.len(), "{case}: {} tensors vs peft's {}", ours.len(), theirs.len());
        // the merged model alone gives the adapted model's logits
        let merged = Model::load(Cpu, &out, LoadOptions::default()).unwrap();
        let reference = read_reference(&fixtures().join("lora").join(case).join("reference.safetensors"));
        let batch = common::reference_batch(&reference);
        let mut acts = Activations::new(&merged, batch.batch, batch.seq).unwrap();
        merged.forward(&mut acts, &batch, LossOptions::default(), false).unwrap();
        assert_close(&format!("{case} merged logits"), &acts.logits, &reference["logits"].f32s(), 1e-5);
    }
    // an adapter that does not fit its base: one error, no output folder
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let (base, adapter) = (fixtures().join("llama").join("model"), fixtures().join("lora").join("gpt2_rslora").join("adapter"));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["merge", "--model", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--output_dir", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("matches none of the model's linear modules"), "{err}");
    assert!(!out.exists(), "nothing is written");
}

/// A run whose adapter does not fit (another architecture's, or a target the model lacks) stops
/// with one error before writing anything.
#[test]
fn bad_lora_runs_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("--adapter_name_or_path", "lora/gpt2_rslora/adapter", "matches none of the model's linear modules"),
        ("--peft", r#"{"r": 4, "target_modules": ["q_proj", "w_in"]}"#, "`w_in` matches none"),
        ("--peft", r#"{"r": 4, "use_dora": "yes"}"#, "`use_dora` must be true or false"),
    ];
    for (i, (k, v, want)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        let (mut args, _) = trainer_fixture_args(&out);
        let pos = args.iter().position(|a| a == "--adapter_name_or_path").unwrap();
        args.drain(pos..pos + 2);
        let v = if k.starts_with("--adapter") { fixtures().join(v).to_str().unwrap().to_string() } else { v.to_string() };
        args.extend([k.to_string(), v.clone()]);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_runtime")).arg("train").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{k} {v}: {err}");
        assert!(!out.exists(), "{k} {v}: the output folder was created");
    }
}

/// SIGKILL a LoRA run (with `lora_dropout`) as soon as it has written a checkpoint, resume it from
/// the newest complete one, and get the straight run's adapter to the byte.
#[test]
fn a_killed_lora_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let args_for = |out: &std::path::Path, resume: bool| {
        let (mut args, _) = trainer_fixture_args(out);
        let pos = args.iter().position(|a| a == "--adapter_name_or_path").unwrap();
        args.drain(pos..pos + 2);
        let peft = r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.1}"#;
        args.extend(["--peft", peft, "--max_steps", "1500", "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "2"].map(String::from));
        args.extend(["--eval_strategy", "no", "--logging_steps", "50"].map(String::from));
        if resume {
            args.extend(["--resume_from_checkpoint", "true"].map(String::from));
        }
        args
    };
    let straight = tmp.path().join("straight");
    train(&args_for(&straight, false));
    let killed = tmp.path().join("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
        .arg("train")
        .args(args_for(&killed, false))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !killed.join("checkpoint-8").join("trainer_state.json").exists() {
        assert!(started.elapsed().as_secs() < 60, "no checkpoint-8 after a minute");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("adapter_model.safetensors").exists(), "the run finished before it was killed; the test needs a longer run");
    train(&args_for(&killed, true));
    let (a, b) = (std::fs::read(straight.join("adapter_model.safetensors")).unwrap(), std::fs::read(killed.join("adapter_model.safetensors")).unwrap());
    assert!(a == b, "the adapter after kill + resume differs from the straight run's");
}
