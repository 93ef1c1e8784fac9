"""Runs `transformers.Seq2SeqTrainer` on the generated digit-reversal data from a tiny T5 v1.1 (and a tiny BART), for
the Rust test `tests/seq2seq_trainer.rs`, which runs `runtime train` with the same arguments and
compares the logged losses, gradient norms, learning rates and evaluation losses step by step, the
final weights, and the ids `Seq2SeqTrainer.predict` generates with `predict_with_generate`.
Writes tests/fixtures/seq2seq_trainer/ (data, tokenizer, initial model, references).

Cases (12 optimizer steps each, warmup + cosine, weight decay, clipping, sequential sampling):
  plain            one micro-batch per step; evaluation with predict_with_generate (2 beams)
  label_smoothing  label_smoothing_factor 0.1 (transformers' LabelSmoother)
  accumulation     gradient_accumulation_steps 2, the loss a token sum over the window's
                   `num_items_in_batch`. T5's own loss ignores `num_items_in_batch` (its forward
                   takes **kwargs, so the Trainer neither divides by the accumulation steps: each
                   micro-batch's mean is added up); the runtime normalises every model kind by the
                   window's label tokens, which is what this `compute_loss_func` gives the Trainer.
  bart             a tiny BART (from init_bart/: the data's pad and EOS ids, decoder start and
                   forced EOS = EOS, scaled embeddings) trained as `plain`, predict_with_generate
                   under its generation config

Needs the release binary (for `runtime example reverse`) and a Python with torch + transformers:

    cargo build --release && python tests/parity/make_seq2seq_trainer_fixtures.py [bart]

(`bart` alone adds or redoes the BART case in the existing fixture.)
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, DataCollatorForSeq2Seq, DynamicCache, EncoderDecoderCache, Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_seq2seq_fixtures import untied  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "tests" / "fixtures" / "seq2seq_trainer"

COMMON = dict(
    learning_rate=5e-3, warmup_steps=2, lr_scheduler_type="cosine", weight_decay=0.1, max_grad_norm=0.5,
    per_device_train_batch_size=4, per_device_eval_batch_size=8, logging_steps=1, eval_strategy="steps", eval_steps=4,
    train_sampling_strategy="sequential", optim="adamw_torch", seed=0, save_strategy="no", report_to="none", max_steps=12,
)
CASES = {
    "plain": dict(predict_with_generate=True, generation_max_length=9, generation_num_beams=2),
    "label_smoothing": dict(label_smoothing_factor=0.1),
    "accumulation": dict(gradient_accumulation_steps=2),
}


def token_sum_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed over the label tokens and divided by the window's count (the batch's
    own count in evaluation)."""
    logits = outputs.logits
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
    return total / n


class Trainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` with a fresh cache that grows per layer for each generation: transformers 5
    sizes its default one by the encoder's layers, which fails for this decoder's three."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if not gen_kwargs and hasattr(self, "_gen_kwargs"):
            gen_kwargs = self._gen_kwargs.copy()
        if self.args.predict_with_generate and not prediction_loss_only:
            gen_kwargs["past_key_values"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)


class Examples(torch.utils.data.Dataset):
    """run_summarization.py's preprocessing: sources and targets tokenized with their special tokens."""

    def __init__(self, path, tok):
        self.items = []
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            self.items.append({"input_ids": tok(r["source"], max_length=64, truncation=True)["input_ids"],
                               "labels": tok(text_target=r["target"], max_length=64, truncation=True)["input_ids"]})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def generated(rows, eos, max_length):
    """Each generated row without the decoder start, up to and including the first EOS (the
    batches are padded to each other's length: a row is at most `max_length` long)."""
    out = []
    for row in rows.tolist():
        row = row[1:max_length]
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def run_case(name, extra, model, tok, train, evals, refs):
    args = Seq2SeqTrainingArguments(output_dir=str(OUT / "tmp" / name), **{**COMMON, **extra})
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                      data_collator=DataCollatorForSeq2Seq(tok, model=model, padding="longest", label_pad_token_id=-100),
                      compute_loss_func=token_sum_loss if name == "accumulation" else None)
    trainer.train()
    # aliases of the shared embedding, which transformers does not store either
    skip = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
    if model.config.model_type == "bart":
        skip += ("lm_head.weight",)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in skip}, OUT / f"final_{name}.safetensors")
    case = {"args": {**COMMON, **extra}, "log_history": trainer.state.log_history}
    if model.config.model_type == "bart":
        case["init"] = "init_bart"
    if extra.get("predict_with_generate"):
        case["predictions"] = generated(trainer.predict(evals).predictions, tok.eos_token_id, extra["generation_max_length"])
    refs["cases"][name] = case


def main():
    only_bart = sys.argv[1:] == ["bart"]
    data = OUT / "data"
    if not only_bart:
        if OUT.exists():
            shutil.rmtree(OUT)
        subprocess.run([str(ROOT / "target" / "release" / "runtime"), "example", "reverse", "--output_dir", str(data),
                        "--n_train", "48", "--n_eval", "16", "--digits", "6", "--seed", "3"], check=True, capture_output=True)
        for f in ["config.json", "train.toml", "generation_config.json"]:
            (data / f).unlink()
    tok = AutoTokenizer.from_pretrained(data)
    assert tok("4072")["input_ids"] == [7, 3, 10, 5, 1], tok("4072")
    train, evals = Examples(data / "train.jsonl", tok), Examples(data / "validation.jsonl", tok)
    if only_bart:
        refs = json.loads((OUT / "reference.json").read_text())
    else:
        refs = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
        torch.manual_seed(0)
        config = T5Config(
            vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=3,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
            dropout_rate=0.0, layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
        model = untied(T5ForConditionalGeneration(config))
        init = OUT / "init"
        model.save_pretrained(init)
        tok.save_pretrained(init)
        for name, extra in CASES.items():
            m = T5ForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
            assert m.lm_head.weight is not m.shared.weight
            run_case(name, extra, m, tok, train, evals, refs)
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, encoder_layers=2, decoder_layers=3, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True, init_std=0.1,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id,
    ))
    init = OUT / "init_bart"
    bart.save_pretrained(init)
    tok.save_pretrained(init)
    # a higher learning rate, so that 12 steps get it past predicting EOS alone
    run_case("bart", {**CASES["plain"], "learning_rate": 3e-2}, BartForConditionalGeneration.from_pretrained(init, dtype=torch.float32), tok, train, evals, refs)
    shutil.rmtree(OUT / "tmp")
    (OUT / "reference.json").write_text(json.dumps(refs, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
