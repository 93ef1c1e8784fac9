//! LoRA against peft: adapters made by `tests/parity/make_lora_fixtures.py` (non-zero A and B on
//! the tiny GPT-2, Llama and Qwen2 bases; all-linear with the head in `modules_to_save`, Conv1D
//! targets with rsLoRA, a regex with per-module ranks and alphas and trained biases) load onto
//! their base, give peft's logits, loss and every trainable gradient, and save back as peft
//! wrote them.

mod common;

use common::{assert_close, fixtures, read_reference};
use runtime::backend::cpu::Cpu;
use runtime::model::{Activations, Grads, LoadOptions, LossOptions, Model};

const CASES: &[(&str, &str)] = &[("llama_all_linear", "llama"), ("gpt2_rslora", "gpt2"), ("qwen2_regex", "qwen2")];

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
    let cases: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>, &str)> = vec![
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
    let e = base().load_adapter(&fixtures().join("llama").join("model")).unwrap_err().to_string();
    assert!(e.contains("not a PEFT adapter folder"), "{e}");
}
