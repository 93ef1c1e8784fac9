//! Encoder-decoder parity with transformers + PyTorch (`tests/parity/make_seq2seq_fixtures.py`):
//! T5 v1.1 (gated GELU, untied head, more decoder than encoder layers) and the original T5 (ReLU,
//! tied head with the output rescale): relative position buckets, logits, loss, every gradient.

mod common;

use common::{assert_close, fixtures, read_reference, RefTensor};
use runtime::backend::cpu::Cpu;
use runtime::model::io::hf_tensors;
use runtime::model::seq2seq::{Seq2SeqBatch, Seq2SeqModel};
use runtime::model::t5::relative_bucket;
use runtime::model::LoadOptions;
use std::collections::HashMap;

fn load(name: &str) -> (Seq2SeqModel<Cpu>, HashMap<String, RefTensor>, Seq2SeqBatch) {
    let dir = fixtures().join(name);
    let model = Seq2SeqModel::load(Cpu, &dir.join("model"), LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let r = read_reference(&dir.join("reference.safetensors"));
    let (ids, labels) = (&r["input_ids"], &r["labels"]);
    let batch = Seq2SeqBatch {
        batch: ids.shape[0],
        src_len: ids.shape[1],
        tgt_len: labels.shape[1],
        input_ids: ids.i32s(),
        attention_mask: r["attention_mask"].i32s(),
        decoder_input_ids: r["decoder_input_ids"].i32s(),
        labels: labels.i32s(),
    };
    (model, r, batch)
}

#[test]
fn relative_position_buckets_match_transformers() {
    let r = read_reference(&fixtures().join("t5/reference.safetensors"));
    for (nb, md) in [(32, 128), (8, 20)] {
        for bi in [true, false] {
            let want = r[&format!("buckets.{nb}.{md}.{}", if bi { "bi" } else { "causal" })].i32s();
            let ours: Vec<i32> = (-300..=300).map(|rel| relative_bucket(rel, bi, nb, md) as i32).collect();
            assert_eq!(ours, want, "buckets {nb} {md} bidirectional={bi}");
        }
    }
}

#[test]
fn shift_right_matches_transformers() {
    let (model, _, batch) = load("t5");
    let c = &model.config;
    assert_eq!(Seq2SeqBatch::shift_right(&batch.labels, batch.tgt_len, c.decoder_start_token_id, c.pad_token_id), batch.decoder_input_ids);
}

fn check_forward_backward(name: &str) {
    let (model, r, batch) = load(name);
    let (acts, loss) = model.forward(&batch, 0.0, None).unwrap();
    assert_close(&format!("{name} logits"), &acts.logits, &r["logits"].f32s(), 1e-5);
    let want = r["loss"].values[0];
    assert!(((loss.mean() as f64 - want) / want).abs() < 1e-5, "{name} loss {} vs {want}", loss.mean());

    let mut grads = model.zero_grads().unwrap();
    let (mut acts, _) = model.forward(&batch, 0.0, Some(1.0 / loss.n_tokens as f32)).unwrap();
    model.backward(&mut acts, &batch, &mut grads).unwrap();
    let hf = hf_tensors(&model.layout, &grads);
    let n = r.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(hf.len(), n, "{name}: every parameter has a gradient");
    for (hf_name, _, g) in &hf {
        assert_close(&format!("{name} grad {hf_name}"), g, &r[&format!("grad.{hf_name}")].f32s(), 1e-4);
    }
}

#[test]
fn t5_v1_1_gated_gelu_untied_matches_transformers() {
    check_forward_backward("t5");
}

#[test]
fn t5_v1_0_relu_tied_scaled_matches_transformers() {
    check_forward_backward("t5_v1_0");
}
