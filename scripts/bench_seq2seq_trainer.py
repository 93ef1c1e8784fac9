"""`runtime train` against `transformers.Seq2SeqTrainer` on the CPU, whole training runs side by
side: the `reverse` example's data (digit strings and their reversal), a T5 v1.1 initialised from
a config (or a BART), the same arguments (AdamW, cosine schedule with warmup, weight decay,
clipping, no evaluation or saving), alternating in one run on the same machine. Prints a markdown
table with the train_runtime of each and the ratio, per model shape:

  example  the example's config (d_model 64, 2 + 2 layers)
  wider    d_model 256, d_ff 512, 4 heads of 64, 4 + 4 layers
  bart     a BART of the wider shape (d_model 256, ffn 512, 4 heads, 4 + 4 layers, 64 positions;
           no dropout, as the example's T5)

    cargo build --release
    python scripts/bench_seq2seq_trainer.py [--steps 200] [--rounds 2] [--shapes example,wider,bart]
"""

import argparse
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "reverse"
SHAPES = {
    "example": {},
    "wider": {"d_model": 256, "d_ff": 512, "d_kv": 64, "num_heads": 4, "num_layers": 4, "num_decoder_layers": 4},
    "bart": {"model_type": "bart", "architectures": ["BartForConditionalGeneration"], "d_model": 256, "encoder_ffn_dim": 512,
             "decoder_ffn_dim": 512, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_layers": 4,
             "decoder_layers": 4, "max_position_embeddings": 64, "dropout": 0.0, "bos_token_id": 1, "decoder_start_token_id": 1,
             "forced_eos_token_id": 1},
}
ARGS = dict(per_device_train_batch_size=32, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01,
            max_grad_norm=1.0, seed=42, max_source_length=9, max_target_length=9)


def config_file(shape, tmp):
    """The shape's config.json in a folder of its own (the example's T5 config changed, or a BART
    with the example's vocabulary and special tokens)."""
    cfg = json.loads((EXAMPLE / "config.json").read_text())
    if SHAPES[shape].get("model_type") == "bart":
        cfg = {k: cfg[k] for k in ("vocab_size", "pad_token_id", "eos_token_id")}
    cfg.update(SHAPES[shape])
    path = Path(tmp) / shape / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def runtime(shape, steps, tmp):
    out = Path(tmp) / f"runtime-{shape}"
    cmd = [str(ROOT / "target" / "release" / "runtime"), "train", "--config", str(EXAMPLE / "train.toml"),
           "--config_name", str(config_file(shape, tmp)), "--output_dir", str(out), "--max_steps", str(steps),
           "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", str(steps), "--disable_tqdm", "true",
           "--predict_with_generate", "false"]
    for k, v in ARGS.items():
        cmd += [f"--{k}", str(v)]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    metrics = json.loads(next(l for l in lines if l.startswith("{") and "train_runtime" in l))
    return metrics["train_runtime"], metrics["train_loss"]


def seq2seq_trainer(shape, steps, tmp):
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(EXAMPLE)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(config_file(shape, tmp).parent))
    rows = [json.loads(l) for l in (EXAMPLE / "train.jsonl").read_text().splitlines()]
    n = steps * ARGS["per_device_train_batch_size"]
    data = [{"input_ids": tok(r["source"], max_length=9, truncation=True)["input_ids"],
             "labels": tok(text_target=r["target"], max_length=9, truncation=True)["input_ids"]} for r in rows[:n]]
    args = Seq2SeqTrainingArguments(
        output_dir=str(Path(tmp) / f"hf-{shape}"), max_steps=steps, eval_strategy="no", save_strategy="no", report_to="none",
        logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
        **{k: v for k, v in ARGS.items() if k not in ("max_source_length", "max_target_length")})
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tok, model=model))
    m = trainer.train().metrics
    return m["train_runtime"], m["train_loss"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    a = p.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} threads; {a.steps} steps per run, best of {a.rounds} alternating rounds\n")
    print("| shape | runtime train_runtime | Seq2SeqTrainer train_runtime | speed ratio (HF / runtime) | runtime train_loss | HF train_loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes.split(","):
            ours, theirs = [], []
            for _ in range(a.rounds):
                ours.append(runtime(shape, a.steps, tmp))
                theirs.append(seq2seq_trainer(shape, a.steps, tmp))
            o, t = min(ours), min(theirs)
            print(f"| {shape} | {o[0]:.2f} s | {t[0]:.2f} s | {t[0] / o[0]:.2f}x | {o[1]:.4f} | {t[1]:.4f} |")


if __name__ == "__main__":
    main()
